"""The process-wide cache of loaded backbones: each model's packed weights exist once per process.

A :class:`LoadedBackbone` is a backbone as the engine runs it — configuration, preprocessing and the
packed weights wrapped in one read-only ``_engine.BackboneModel`` — plus the head and settings
stored with it when it came from a visualad file. It is shared by every Detector that
names the same weights (clones, unpickled copies, GridSearchCV candidates, the tasks of a joblib or
Dask worker) and by every thread. What a call writes into (thread pool, workspaces, the training
forward's activations) is a *state* (``_engine.Backbone``) checked out for the duration of the call
with :meth:`LoadedBackbone.state` and returned to a small idle list afterwards, so sequential users
reuse one state and concurrent users get one each.

Weights are loaded per precision kind, each kind holding only what its engine runs on:

* ``"fp32"``: the packed float32 buffer (``backbone.params``), which fp32 states run on;
* ``"bf16"``: a bf16-only model: the blocks' linear weights and the patch embedding only as the
  engine's bf16 packs (made once, shared by every bf16 state), the small tensors (norms, biases,
  positions, tokens, LayerScale) in float32; the float32 buffer is dropped once packed
  (``backbone.params`` is None), so its resident weights are about half of fp32's. Whoever needs
  the float32 weights again (saving the backbone into a file) gets them from :func:`fp32_backbone`,
  which reads them from the source again unless the fp32 kind is loaded anyway.

Cache keys are the identity of the weights (plus the precision kind):

* a file: its real path, device, inode, size and modification time (``stat``; a file replaced or
  rewritten gets a new key and is loaded again);
* a Hugging Face folder: the same for every file in it;
* a dict of arrays (or an ``EngineBackbone``): a SHA-256 digest of its names, dtypes, shapes and
  bytes, so equal weights given as different objects (a deep copy, an unpickled Detector) share
  one load.

The content digest of a file (SHA-256 of its bytes, or of every file of a folder) is computed only
when asked for — when a Detector is pickled, or when an unpickled one checks that the file it
finds is the one it was pickled with — and is remembered per file identity.

Entries stay alive while a Detector uses them; the most recently used :data:`KEEP_RECENT` stay
loaded after their last user has gone (so a pool worker that unpickles a Detector per task loads
each model once).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import threading
import weakref
from collections import OrderedDict

import numpy as np

from . import _engine
from .backbone import EngineBackbone, build_backbone
from .errors import CheckpointError

#: loaded backbones kept after their last user has gone (most recently used first)
KEEP_RECENT = 2

_lock = threading.RLock()
_entries: "weakref.WeakValueDictionary[tuple, LoadedBackbone]" = weakref.WeakValueDictionary()
_recent: "OrderedDict[tuple, LoadedBackbone]" = OrderedDict()
_file_digests: dict = {}  # file identity -> content digest
#: how many backbones this process has loaded (each load reads and packs the weights once)
load_count = 0


class EngineStates:
    """Idle engine states by kind (e.g. thread count and precision): :meth:`state` checks one out
    for a call (an idle one, or a new one from ``make(*kind)``) and returns it afterwards.
    Sequential users reuse one state; concurrent users get one each."""

    def __init__(self, make):
        self._make = make
        self._idle: dict[tuple, list] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def state(self, *kind):
        with self._lock:
            idle = self._idle.setdefault(kind, [])
            engine = idle.pop() if idle else None
        if engine is None:
            engine = self._make(*kind)
        try:
            yield engine
        finally:
            with self._lock:
                self._idle[kind].append(engine)


class LoadedHead:
    """A head packed for the engine (``params``, read-only in use) with its idle ``_engine.Head``
    states; shared by the Detectors whose untrained head comes from the same source."""

    def __init__(self, config: dict, params: np.ndarray):
        self.config, self.params = config, params
        self.states = EngineStates(lambda n: _engine.Head(config, params, n))


class LoadedBackbone:
    """One loaded backbone: ``backbone`` (EngineBackbone: configuration, preprocessing and, for the
    fp32 kind, the read-only float32 weights; None params for bf16), ``model`` (the engine's
    read-only model), ``precision`` (its kind, "fp32" or "bf16": the precision its states run),
    ``stored_head`` / ``settings`` (from a visualad file, else None / {}), ``key`` (the identity of
    the weights), idle engine ``states`` and the packed heads in use with it (:meth:`head`)."""

    def __init__(self, key: tuple, backbone: EngineBackbone, stored_head=None, settings=None, shared_from=None,
                 precision: str = "fp32"):
        self.key = key
        self.precision = precision
        self.stored_head = stored_head
        self.settings = dict(settings or {})
        self._heads: dict = {}
        self._head_dicts: dict = {}
        self._heads_lock = threading.Lock()
        if shared_from is not None:  # a visualad file that refers to another checkpoint: share its weights
            self.backbone, self.model, self.states = shared_from.backbone, shared_from.model, shared_from.states
            self._base = shared_from
            return
        if precision == "fp32":
            backbone.params.flags.writeable = False
        self.model = _engine.BackboneModel(backbone.config, backbone.params, precision)
        # a bf16-only model has packed what it needs: its backbone does not keep the float32 buffer
        self.backbone = backbone if precision == "fp32" else dataclasses.replace(backbone, params=None)
        self.states = EngineStates(functools.partial(self.model.state, precision=precision))  # no cycle via self

    def state(self, num_threads: int):
        """An engine state (``_engine.Backbone``, in this kind's precision) over this model for one
        call (context manager)."""
        return self.states.state(num_threads)

    def weight_bytes(self) -> dict:
        """``{"fp32": bytes, "bf16": bytes}`` of weights the engine model holds (the fp32 buffer, or a
        bf16 model's small tensors; the bf16 packs made so far), whatever the number of states."""
        return self.model.weight_bytes()

    def head(self, key: tuple, make) -> LoadedHead:
        """The packed head known by ``key`` (its source and layers), made once by ``make()``."""
        with self._heads_lock:
            loaded = self._heads.get(key)
            if loaded is None:
                loaded = self._heads[key] = make()
            return loaded

    def head_dict(self, source: tuple, make) -> dict:
        """The validated head dict (official layout, read-only) known by ``source``, made once by
        ``make()``: Detectors whose head comes from the same source share its arrays."""
        with self._heads_lock:
            head = self._head_dicts.get(source)
            if head is None:
                head = self._head_dicts[source] = make()
            return head


# ----------------------------------------------------------------------------- identities


def file_identity(path) -> tuple:
    """("file" | "dir", real path, (name, device, inode, size, mtime_ns) per file): cheap (stat only)."""
    real = os.path.realpath(os.fspath(path))
    if os.path.isdir(real):
        files = []
        for root, dirs, names in os.walk(real):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(root, name)
                st = os.stat(full)
                files.append((os.path.relpath(full, real), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return ("dir", real, tuple(files))
    st = os.stat(real)
    return ("file", real, ((os.path.basename(real), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns),))


def _hash_file(h, path: str) -> None:
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])


def file_digest(path) -> str:
    """SHA-256 of a file's bytes (a folder: of every file's relative name, size and bytes), hex;
    remembered per file identity."""
    ident = file_identity(path)
    with _lock:
        if ident in _file_digests:
            return _file_digests[ident]
    h = hashlib.sha256()
    if ident[0] == "file":
        _hash_file(h, ident[1])
    else:
        for name, _, _, size, _ in ident[2]:
            h.update(f"{name}\0{size}\0".encode())
            _hash_file(h, os.path.join(ident[1], name))
    digest = h.hexdigest()
    with _lock:
        _file_digests[ident] = digest
    return digest


def arrays_digest(spec) -> str:
    """SHA-256 of a dict of arrays (names, dtypes, shapes, bytes) or of an EngineBackbone, hex."""
    h = hashlib.sha256()
    if isinstance(spec, EngineBackbone):
        h.update(json.dumps([spec.family, spec.config, spec.mean, spec.std], sort_keys=True).encode())
        spec = {"params": spec.params}
    for name in sorted(spec, key=str):
        arr = np.ascontiguousarray(np.asarray(spec[name]))
        h.update(f"{name}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        h.update(memoryview(arr).cast("B") if arr.size else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------- loading


def _remember(entry: LoadedBackbone) -> LoadedBackbone:
    global load_count
    key = (entry.key, entry.precision)
    with _lock:
        load_count += 1
        _entries[key] = entry
        _recent[key] = entry
        _recent.move_to_end(key, last=False)
        while len(_recent) > KEEP_RECENT:
            _recent.popitem()
    return entry


def _cached(key: tuple):
    with _lock:
        entry = _entries.get(key)
        if entry is not None and key in _recent:
            _recent.move_to_end(key, last=False)
        return entry


def _read_path(path):
    """(EngineBackbone or None, backbone_path or None, stored head, settings) of a checkpoint or a
    visualad file (None and the path it refers to for a file without its backbone)."""
    from .checkpoint import load_backbone
    from .checkpoint.detector_file import is_visualad_file, read_detector_file
    if is_visualad_file(path):
        return read_detector_file(path)
    weights = load_backbone(path)
    try:
        backbone = build_backbone(weights.tensors, weights.family, weights.hints)
    except CheckpointError:
        raise
    except (ValueError, TypeError) as exc:  # weights the reader accepts but the engine cannot run (NaN, ...)
        raise CheckpointError(f"{os.fspath(path)}: {exc}") from None
    return backbone, None, None, None


def _identify(spec, digest: str | None):
    """(identity of the weights, a function reading them as :func:`_read_path` returns)."""
    if isinstance(spec, (str, os.PathLike)):
        if not os.path.exists(spec):
            _read_path(spec)  # the checkpoint reader's own error for a missing file
        if digest is not None and file_digest(spec) != digest:
            raise CheckpointError(f"{os.fspath(spec)}: the file's content differs from the backbone this "
                                  "Detector was pickled with (content digest mismatch)")
        return file_identity(spec), lambda: _read_path(spec)
    if isinstance(spec, EngineBackbone) and spec.params is None:
        raise TypeError("this EngineBackbone holds no float32 weights (a bf16 load's backbone): pass the "
                        "backbone it was loaded from")
    if isinstance(spec, (dict, EngineBackbone)):
        return ("arrays", digest or arrays_digest(spec)), lambda: (
            spec if isinstance(spec, EngineBackbone) else build_backbone(spec), None, None, None)
    raise TypeError(f"backbone must be a path or a dict of arrays, got {type(spec).__name__}")


def load(spec, digest: str | None = None, precision: str = "fp32") -> LoadedBackbone:
    """The loaded backbone of a path, a dict of arrays or an EngineBackbone in a precision kind
    ("fp32" or "bf16", see the module's docstring), loading it (once per process and kind) if needed.

    ``digest``: for a path, the content digest the file must have (an unpickled Detector's
    reference; a different file raises CheckpointError); for a dict, its known digest (skips
    hashing it again)."""
    key, read = _identify(spec, digest)
    entry = _cached((key, precision))
    if entry is not None:
        return entry
    with _lock:  # one load per key, even when several threads ask at once
        entry = _entries.get((key, precision))
        if entry is None:
            backbone, backbone_path, head, settings = read()
            shared = load(backbone_path, precision=precision) if backbone is None else None
            entry = _remember(LoadedBackbone(key, backbone, head, settings, shared, precision))
    return entry


def fp32_backbone(spec, digest: str | None = None, key: tuple | None = None) -> EngineBackbone:
    """The EngineBackbone of ``spec`` with its float32 weights (``params``), for a user of a bf16
    backbone that needs them (a file holding the backbone): the loaded fp32 kind's when it is
    cached, else read from ``spec`` again and not cached (dropped when the caller drops it).
    ``key``: the identity the weights were loaded with (a dict edited in place since is refused)."""
    found, read = _identify(spec, digest)
    if key is not None and found != key:
        raise ValueError("the backbone's weights changed since they were loaded (a dict edited in place?): "
                         "give the Detector a new dict of them, e.g. set_params(backbone=dict(weights))")
    key = found
    entry = _cached((key, "fp32"))
    if entry is not None:
        return entry.backbone
    backbone, backbone_path, _, _ = read()
    return backbone if backbone is not None else fp32_backbone(backbone_path)


def clear() -> None:
    """Forgets every cached backbone and digest (Detectors in use keep theirs)."""
    with _lock:
        _entries.clear()
        _recent.clear()
        _file_digests.clear()
