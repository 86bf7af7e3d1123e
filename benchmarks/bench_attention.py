"""The backbone's attention core alone (`_engine.testing.attention` and `attention_backward`) at the
towers' shapes: fp32 on the fused kernel, fp32 on the per-head BLAS path, bf16; forward and the
input-gradient backward the training step runs through every frozen block.

Each engine build given (this checkout's `visualad`, plus any `--against` folders holding another
build's `visualad` package) runs in its own child process, the children alternating round by round,
so that a burst of load lands on every build alike. Prints the median wall seconds per call (one
layer), the achieved GFLOP/s (4 T^2 D per image forward; the backward, with the score recomputation,
10 T^2 D) and the median CPU seconds of the process (all threads) per call.

Usage: python benchmarks/bench_attention.py [--threads 2] [--rounds 5] [--shapes B16-1 B16-8 L14-518]
       [--against /folder/with/old/visualad ...] [--no-backward]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SHAPES = {  # name: batch, tokens, width, heads
    "B16-1": (1, 197, 768, 12),
    "B16-8": (8, 197, 768, 12),
    "L14-518": (1, 1372, 1024, 16),
}


def worker(shapes, threads, repeats, backward):
    """Median seconds of every (shape, side) in this process's engine, as JSON on stdout."""
    import numpy as np

    from visualad import _engine

    testing = _engine.testing
    has_backward = backward and hasattr(testing, "attention_backward")
    bf16 = _engine.precision_kernel("bf16") != "none"
    out = {}
    for name in shapes:
        B, T, D, H = SHAPES[name]
        rng = np.random.default_rng(0)
        qkv = rng.standard_normal((B, T, 3 * D)).astype(np.float32)
        dout = rng.standard_normal((B, T, D)).astype(np.float32)
        sides = {"fp32 fused": ("fp32", True), "fp32 blas": ("fp32", False)}
        if bf16:
            sides["bf16"] = ("bf16", True)
        for side, (precision, fused) in sides.items():
            previous = _engine.set_fused_attention(fused)
            calls = {"forward": lambda: testing.attention(qkv, H, precision, num_threads=threads)}
            if has_backward:
                calls["backward"] = lambda: testing.attention_backward(qkv, dout, H, precision, num_threads=threads)
            for what, fn in calls.items():
                if what == "backward" and side == "fp32 fused":
                    continue  # the fp32 backward has one path (per-head BLAS)
                fn()
                wall, cpu = [], []
                for _ in range(repeats):
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn()
                    wall.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                out[f"{name} {what} {side}"] = (statistics.median(wall), statistics.median(cpu))
            _engine.set_fused_attention(previous)
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="child processes per build, alternating")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per child and measurement")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--against", nargs="*", default=[], help="folders that hold another build's visualad package")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.shapes, args.threads, args.repeats, not args.no_backward)
        return
    builds = [ROOT] + [os.path.abspath(p) for p in args.against]
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(args.threads), "--repeats",
           str(args.repeats), "--shapes", *args.shapes] + (["--no-backward"] if args.no_backward else [])
    results = {b: {} for b in builds}
    for _ in range(args.rounds):
        for b in builds:
            env = dict(os.environ, PYTHONPATH=b)
            run = subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True, check=True)
            for key, t in json.loads(run.stdout.strip().splitlines()[-1]).items():
                results[b].setdefault(key, []).append(t)  # (wall, cpu) per round
    keys = list(results[ROOT])
    print(f"threads={args.threads}, medians of {args.rounds} rounds x {args.repeats} calls; wall seconds per call "
          "(GFLOP/s), and the process's CPU seconds (all threads: on a shared machine less noisy than wall time)")
    header = "  ".join(f"{'build ' + str(i) + ' wall':>18} {'cpu':>8}" for i in range(len(builds)))
    print(f"{'':38}{header}")
    for key in keys:
        name, what = key.split()[:2]
        B, T, D, _ = SHAPES[name]
        flop = B * T * T * D * (4 if what == "forward" else 10)
        cells = []
        for b in builds:
            if key not in results[b]:
                cells.append(f"{'-':>18} {'-':>8}")
                continue
            t = statistics.median(r[0] for r in results[b][key])
            cells.append(f"{t:9.5f} ({flop / t / 1e9:5.0f}) {statistics.median(r[1] for r in results[b][key]):8.5f}")
        print(f"  {key:36}" + "  ".join(cells))
    for i, b in enumerate(builds):
        print(f"  build {i}: {b}")


if __name__ == "__main__":
    main()
