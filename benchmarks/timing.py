"""Timing helpers shared by the benchmarks.

This machine is a VM whose CPU time can be taken by the host ("steal" in /proc/stat), in bursts:
timing one implementation after the other lets a burst land on one side only. `paired_medians`
therefore alternates the two calls repeat by repeat, and `StealMeter` reports how much CPU the
host took while a benchmark ran, so a noisy run can be recognised as such."""
from __future__ import annotations

import resource
import statistics
import time


def paired_medians(fn_a, fn_b, repeats, warmup=1):
    """Median wall times of `fn_a()` and `fn_b()`, timed alternately (a, b, a, b, ...) after
    `warmup` calls of each."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((fn_a, ta), (fn_b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def interleaved_medians(fns: dict, repeats, warmup=1) -> dict:
    """Median wall time of every `fns[name]()`, the calls interleaved round-robin (a, b, c, a, b,
    c, ...) after `warmup` rounds, so that a burst of load lands on every side alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _cpu_times():
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    return sum(values[:8]), (values[7] if len(values) > 7 else 0)


class StealMeter:
    """`with StealMeter() as m: ...` then `m.percent`: the share of CPU time the hypervisor took
    from this VM during the block (None where /proc/stat is unavailable)."""

    def __enter__(self):
        self._start = _cpu_times()
        self.percent = None
        return self

    def __exit__(self, *exc):
        end = _cpu_times()
        if self._start and end and end[0] > self._start[0]:
            self.percent = 100.0 * (end[1] - self._start[1]) / (end[0] - self._start[0])
        return False


def _status_mb(field: str):
    """A memory field of /proc/self/status (e.g. VmRSS, VmHWM) in MB, None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """This process's resident set now (VmRSS; Linux)."""
    value = _status_mb("VmRSS")
    if value is None:
        raise RuntimeError("needs /proc/self/status (Linux)")
    return value


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: unlike ru_maxrss it does not carry the parent's
    peak across exec)."""
    value = _status_mb("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
