"""bfloat16 rounding in NumPy (round to nearest, ties to even, as the engine's kernels round
fp32 values before each bf16 product) for float64 references of the bf16 kernels."""
import numpy as np

BF16_UNIT = 2.0 ** -8  # unit roundoff: bf16 has 8 significant bits, |round(x) - x| <= 2^-8 |x| (half an ulp)


def round_bf16(x) -> np.ndarray:
    """float32 values rounded to the nearest bf16 (returned as float32)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32).reshape(np.shape(x))
