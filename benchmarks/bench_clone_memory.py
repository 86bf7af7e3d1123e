"""Weight memory per precision, and what used clones add: random ViT-B/16 at 224 and ViT-L/14 at 518
backbones saved as files (so no caller-held dict of arrays is counted), each precision in its own
process.

Per model and precision the child process reports: the weights the engine holds (its own query,
``LoadedBackbone.weight_bytes``: the fp32 buffer, or bf16's small fp32 tensors, and the bf16 packs),
RSS after the load (over the RSS before it), the load's peak RSS, the peak RSS of one encode (the
high-water mark reset after the load, /proc/self/clear_refs), what ``--clones`` used
``sklearn.base.clone`` copies add (RSS and engine weight bytes: the clones share the process-wide
loaded backbone, visualad.model_cache, and a call checks out an engine state, so clones used one after
the other reuse one), then two clones scoring in two threads at once (a second engine state).

    python benchmarks/bench_clone_memory.py [--models B16-224 L14-518] [--batch 1] [--clones 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from timing import peak_rss_mb, rss_mb  # noqa: E402

MODELS = {"B16-224": (768, 12, 16, 14, 224), "L14-518": (1024, 24, 14, 24, 518)}  # width, depth, patch, grid, S
MB = 2 ** 20


def reset_peak() -> None:
    """Sets this process's VmHWM to its current RSS (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(path: str, model: str, precision: str, batch: int, n_clones: int) -> dict:
    from sklearn.base import clone
    import visualad
    size = MODELS[model][4]
    x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    start = rss_mb()
    det = visualad.Detector(path, image_size=size, batch_size=batch, num_threads=2, precision=precision)
    det._model()
    loaded, load_peak = rss_mb(), peak_rss_mb()
    weights = det._loaded_.weight_bytes()
    reset_peak()
    want = det.anomaly_scores(x)  # the first call: the bf16 packs, a state, its workspaces
    used, encode_peak = rss_mb(), peak_rss_mb()
    clones = [clone(det) for _ in range(n_clones)]
    for c in clones:
        assert np.array_equal(c.anomaly_scores(x), want)
    after = rss_mb()
    clone_weights = det._loaded_.weight_bytes()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda d: d.anomaly_scores(x), clones[:2]))
    threads = rss_mb()
    return {"fp32_mb": weights["fp32"] / MB, "bf16_mb": weights["bf16"] / MB, "load_mb": loaded - start,
            "load_peak_mb": load_peak - start, "encode_peak_mb": encode_peak - start, "used_mb": used - start,
            "clones_mb": after - used, "clone_weights_mb": (sum(clone_weights.values()) - sum(weights.values())) / MB,
            "threads_mb": threads - after}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--clones", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("PATH", "MODEL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.batch, args.clones)))
        return
    import visualad
    from visualad.demo import random_clip_backbone
    print("MB over the process's RSS before the load; weights as the engine reports them")
    for model in args.models:
        width, depth, patch, grid, size = MODELS[model]
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, f"{model}.safetensors")
            det = visualad.Detector(random_clip_backbone(width, depth, patch, grid, seed=0), image_size=size)
            det.save(path)
            fp32_file = det._backbone_.params.nbytes / MB
            del det
            rows = {}
            for precision in ("fp32", "bf16"):
                cmd = [sys.executable, __file__, "--child", path, model, precision, "--batch", str(args.batch),
                       "--clones", str(args.clones)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                rows[precision] = json.loads(out)
        print(f"\n{model}, batch {args.batch} (packed fp32 weights {fp32_file:.0f} MB)")
        print(f"  {'':5s} {'weights fp32 + bf16':>20s} {'RSS after load':>15s} {'load peak':>10s} "
              f"{'encode peak':>12s} {f'{args.clones} clones add':>15s} {'(weights)':>10s} {'2 threads add':>14s}")
        for p, r in rows.items():
            print(f"  {p:5s} {r['fp32_mb']:9.1f} + {r['bf16_mb']:7.1f} {r['load_mb']:15.0f} {r['load_peak_mb']:10.0f} "
                  f"{r['encode_peak_mb']:12.0f} {r['clones_mb']:15.1f} {r['clone_weights_mb']:10.1f} "
                  f"{r['threads_mb']:14.1f}")
        w32, w16 = (rows[p]["fp32_mb"] + rows[p]["bf16_mb"] for p in ("fp32", "bf16"))
        print(f"  bf16 / fp32 resident weights (engine): {w16 / w32:.3f}; RSS after load: "
              f"{rows['bf16']['load_mb'] / rows['fp32']['load_mb']:.3f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
