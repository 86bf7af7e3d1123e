"""Short, bounded descriptions of values read from untrusted files, for error messages.

``repr`` of what a hostile file builds can be huge (a list shared a thousand times at each of ten
levels), slow, or fail outright (an int of more than 4300 digits); :func:`describe` looks at most a
few levels deep and a few items wide and never raises.
"""
from __future__ import annotations

_WIDTH, _DEPTH, _CHARS = 6, 3, 160


def _describe(x, depth: int) -> str:
    if isinstance(x, bool) or x is None or isinstance(x, float):
        return repr(x)
    if isinstance(x, int):
        return repr(x) if x.bit_length() <= 128 else f"<int of {x.bit_length()} bits>"
    if isinstance(x, (str, bytes, bytearray)):
        return repr(x[:40]) + ("..." if len(x) > 40 else "")
    if isinstance(x, (list, tuple, dict)):
        if depth >= _DEPTH:
            return f"<{type(x).__name__} of {len(x)}>"
        items = list(x.items())[:_WIDTH] if isinstance(x, dict) else list(x[:_WIDTH])
        if isinstance(x, dict):
            parts = [f"{_describe(k, depth + 1)}: {_describe(v, depth + 1)}" for k, v in items]
        else:
            parts = [_describe(v, depth + 1) for v in items]
        more = ", ..." if len(x) > _WIDTH else ""
        open_, close = {list: "[]", tuple: "()"}.get(type(x), "{}")
        return open_ + ", ".join(parts) + more + close
    return f"<{type(x).__name__}>"


def describe(x) -> str:
    """A short description of ``x`` (at most about 160 characters)."""
    try:
        text = _describe(x, 0)
    except Exception:  # a hostile object whose len/items fail
        text = f"<{type(x).__name__}>"
    return text if len(text) <= _CHARS else text[:_CHARS] + "..."
