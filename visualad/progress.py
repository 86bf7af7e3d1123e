"""A minimal progress bar (tqdm when installed, a plain stderr line otherwise).

In Jupyter, tqdm's widget bar needs ipywidgets; without it tqdm warns "IProgress not found" and
draws nothing useful, so the text bar is used there instead."""
from __future__ import annotations

import importlib.util
import sys
import time


def tqdm_class():
    """tqdm's notebook-aware bar when ipywidgets can draw it, else its text bar; None without tqdm."""
    try:
        if importlib.util.find_spec("ipywidgets") is not None:
            from tqdm.auto import tqdm
        else:
            from tqdm.std import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    def __init__(self, total: int, desc: str = "", enabled: bool = True):
        self.total, self.desc, self.enabled, self.n = total, desc, enabled, 0
        self._bar = None
        self._t0 = time.perf_counter()
        if enabled:
            tqdm = tqdm_class()
            self._bar = tqdm(total=total, desc=desc, leave=True) if tqdm is not None else None

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            return
        rate = self.n / max(time.perf_counter() - self._t0, 1e-9)
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        sys.stderr.write(f"\r{self.desc} {self.n}/{self.total} ({rate:.2f}/s) {extra}")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
