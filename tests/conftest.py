import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the relative error measure the issues use."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
        torch.set_num_threads(2)
    except ImportError:
        pass
