"""A checkpoint must never run code: pickles naming any global outside the allow-list are refused
before anything executes (a marker file the payload would create must not appear)."""
import builtins
import os
import pickle
import subprocess
import zipfile

import numpy as np
import pytest
import torch

from visualad.checkpoint import load_backbone, read_checkpoint
from visualad.errors import CheckpointError


class Payload:
    """Pickles as a call of `fn(*args)`: what a malicious checkpoint does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def payloads(marker: str):
    return {
        "os.system": Payload(os.system, f"touch '{marker}'"),
        "builtins.eval": Payload(builtins.eval, f"open({marker!r}, 'w').close()"),
        "builtins.exec": Payload(builtins.exec, f"open({marker!r}, 'w').close()"),
        "subprocess.Popen": Payload(subprocess.Popen, ["touch", marker]),
    }


def write_zip(path, members: dict):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen"])
def test_malicious_torch_zip_is_refused(tmp_path, kind, protocol):
    marker = str(tmp_path / "pwned")
    state = {"visual.class_embedding": payloads(marker)[kind]}
    path = write_zip(tmp_path / "evil.pt", {"evil/data.pkl": pickle.dumps(state, protocol=protocol),
                                             "evil/version": b"3\n"})
    for reader in (load_backbone, read_checkpoint):
        with pytest.raises(CheckpointError, match="refusing to unpickle global") as info:
            reader(path)
        assert str(path) in str(info.value)
    assert not os.path.exists(marker)


def test_malicious_legacy_file_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil_legacy.pt"
    with open(path, "wb") as f:
        for obj in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True},
                    {"w": payloads(marker)["os.system"]}):
            pickle.dump(obj, f, protocol=2)
    with pytest.raises(CheckpointError, match="posix.system|nt.system"):
        read_checkpoint(path)
    assert not os.path.exists(marker)


def test_malicious_torchscript_attribute_is_refused(tmp_path):
    """Inside a real TorchScript archive, a module attribute replaced by a payload."""
    marker = str(tmp_path / "pwned")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x)

    good = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(Tiny()), str(good))
    evil_pickle = b"\x80\x02c__torch__\nTiny\n)\x81}X\x03\x00\x00\x00lin" + \
        pickle.dumps(payloads(marker)["subprocess.Popen"], protocol=2, fix_imports=False)[2:-1] + b"sb."
    with zipfile.ZipFile(good) as src:
        members = {n: (evil_pickle if n.endswith("/data.pkl") else src.read(n)) for n in src.namelist()}
    path = write_zip(tmp_path / "evil_script.pt", members)
    with pytest.raises(CheckpointError, match="subprocess.Popen"):
        load_backbone(path)
    assert not os.path.exists(marker)


def test_pickled_module_objects_are_refused(tmp_path):
    """torch.save of a whole nn.Module needs its class: refused, the user must save a state dict."""
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError, match="torch.nn.modules.linear.Linear"):
        read_checkpoint(path)


def test_numpy_objects_are_refused(tmp_path):
    path = tmp_path / "np.pt"
    torch.save({"w": np.ones(3)}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle global 'numpy"):
        read_checkpoint(path)


def test_torchscript_class_cannot_be_called_with_arguments(tmp_path):
    """`__torch__.*` names become inert attribute holders; calling one with arguments is an error."""
    data = b"\x80\x02c__torch__\nX\n(X\x03\x00\x00\x00abctR."
    path = write_zip(tmp_path / "x.pt", {"x/data.pkl": data})
    with pytest.raises(CheckpointError, match="corrupt pickle"):
        read_checkpoint(path)
