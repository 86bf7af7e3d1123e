"""Images per second of ``visualad.dask.anomaly_scores`` on LocalClusters of 1 and 2 worker
processes, beside the same call in this process, on the embedded demo model and on a ViT-B/16 at
224 px (random weights, the real model's shapes).

Each configuration's cluster is started once and warmed up (every worker loads the model on its
first batch); then the sides are timed in turn (local, 1 worker, 2 workers, local, ...) and the
medians reported, with the CPU steal of the run. ``--threads`` is the engine thread count of every
worker and of the local run (it sets the rounding, so the numbers agree exactly; the script checks
that they do). On a 2-core machine, 2 workers with 2 engine threads each oversubscribe the cores:
compare ``--threads 1`` too.

    flock /tmp/visualad-bench.lock python benchmarks/bench_dask.py [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import StealMeter  # noqa: E402


def demo_case(folder):
    from visualad.demo import DEFAULT_MODEL, write_demo_dataset
    root = write_demo_dataset(os.path.join(folder, "demo"), n_good=8, n_bad=8)
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                   if f.endswith(".png") and "ground_truth" not in d)
    return "demo model (width 96, depth 2, 128 px)", DEFAULT_MODEL, {}, paths


def vitb_case(folder, n_images):
    import visualad
    from PIL import Image
    from visualad.demo import random_clip_backbone
    path = os.path.join(folder, "vitb16.safetensors")
    visualad.Detector(random_clip_backbone(768, 12, 16, 14, seed=0), image_size=224).save(path)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n_images):
        p = os.path.join(folder, f"img{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return "ViT-B/16 @ 224", path, {"image_size": 224}, paths


def run_case(name, model, params, paths, threads, batch_size, repeats):
    import distributed
    import visualad
    import visualad.dask
    det = visualad.Detector(model, num_threads=threads, batch_size=batch_size, **params)
    want = det.anomaly_scores(paths)  # loads here, warm
    clusters = {n: distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0")
                for n in (1, 2)}
    clients = {n: distributed.Client(c) for n, c in clusters.items()}
    try:
        sides = {"local": lambda: det.anomaly_scores(paths)}
        for n, client in clients.items():
            sides[f"{n} worker{'s' if n > 1 else ''}"] = (lambda c: lambda: visualad.dask.anomaly_scores(det, paths, c))(client)
        for label, fn in sides.items():  # warm-up: every worker loads the model
            assert np.array_equal(fn(), want), f"{label}: scores differ from the local run"
        times = {label: [] for label in sides}
        with StealMeter() as steal:
            for _ in range(repeats):
                for label, fn in sides.items():
                    t0 = time.perf_counter()
                    fn()
                    times[label].append(time.perf_counter() - t0)
    finally:
        for n in clients:
            clients[n].close()
            clusters[n].close()
    print(f"\n{name}: {len(paths)} images, batch {batch_size}, engine threads {threads}, "
          f"median of {repeats}, steal {steal.percent if steal.percent is not None else float('nan'):.1f}%")
    base = None
    for label, ts in times.items():
        rate = len(paths) / statistics.median(ts)
        base = base or rate
        print(f"  {label:<10} {rate:8.2f} images/s   x{rate / base:.2f} of local   "
              f"(runs: {', '.join(f'{t:.2f}' for t in ts)} s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="engine threads per worker and locally (default 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vitb-images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--skip-vitb", action="store_true")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; timings are noisy when other work shares the machine")
    with tempfile.TemporaryDirectory() as folder:
        cases = [demo_case(folder)]
        if not args.skip_vitb:
            cases.append(vitb_case(folder, args.vitb_images))
        for case in cases:
            run_case(*case, args.threads, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
