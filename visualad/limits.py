"""Size limits for everything that reaches visualad from a file or an argument, in one place.

The engine limits are the values of ``csrc/vad_limits.h`` (``_engine.limits()`` returns them; a
test checks both agree). They are far above every released CLIP / DINOv2 model (ViT-g: width
1536, depth 40, patch 14, grid 37, 4 registers) and far below sizes whose arithmetic could
overflow. The reader limits bound what a file may make the readers allocate before its tensors are
read; ``MAX_IMAGE_PIXELS`` bounds image decoding and may be changed at run time
(``visualad.limits.MAX_IMAGE_PIXELS = ...``).
"""
from __future__ import annotations

import math
import numbers
import os

# engine (csrc/vad_limits.h)
MAX_WIDTH = 16384
MAX_DEPTH = 256
MAX_HEADS = 1024
MAX_PATCH = 64
MAX_GRID = 1024
MAX_REGISTERS = 64
MAX_MLP_HIDDEN = 65536
MAX_IMAGE_SIDE = 8192  # the input side S (image_size)
MAX_THREADS = 256  # no thread pool is ever larger; num_threads is also capped at the usable cores
MAX_LAYERS = 64  # layers one call may ask for (features, the head's used layers)

# readers
MAX_PICKLE_BYTES = 64 << 20  # a torch data.pkl (ViT-L/14 TorchScript: ~0.2 MB)
MAX_JSON_BYTES = 16 << 20  # a safetensors header, a config.json, a shard index (ViT-g: ~0.1 MB)
MAX_SMALL_MEMBER_BYTES = 64  # the 'byteorder' member of a torch zip
MAX_TENSOR_DIMS = 16
MAX_TENSOR_ELEMENTS = 1 << 40  # far beyond any real tensor; stops absurd shapes before arithmetic

# images: decoding refuses more pixels than this (about 67 M, below Pillow's own bomb error)
MAX_IMAGE_PIXELS = 8192 * 8192


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def check_int(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``: ints, NumPy integers and integral floats (``8.0``)
    are accepted; bools, non-integral or non-finite floats (``128.9``, NaN) and anything else are
    refused with a TypeError / ValueError naming ``name``."""
    if isinstance(value, (bool, type(None))) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if isinstance(value, numbers.Integral):
        out = int(value)
    else:
        as_float = float(value)
        if not math.isfinite(as_float) or not as_float.is_integer():
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        out = int(as_float)
    if (low is not None and out < low) or (high is not None and out > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name} must be in {bounds}, got {out}")
    return out


def check_threads(value) -> int:
    """The thread count to use for ``num_threads``: None means every usable core; an int must be
    in [1, MAX_THREADS] and is capped at the number of usable cores (more threads than cores only
    slow the engine down; results do not depend on the count)."""
    cores = min(usable_cores(), MAX_THREADS)
    if value is None:
        return cores
    return min(check_int(value, "num_threads", 1, MAX_THREADS), cores)
