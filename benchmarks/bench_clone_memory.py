"""Memory of used clones: what ``sklearn.base.clone`` copies of a used ViT-B/16 Detector add to the
process's resident memory (RSS) once each has scored images, beside the size of the weights.

The clones share the process-wide loaded backbone and the packed head (visualad.model_cache); a
call checks out an engine state (workspaces), so clones used one after the other reuse one. Also
reported: two clones used from two threads at once (two states).

    python benchmarks/bench_clone_memory.py [--batch 8]
"""
from __future__ import annotations

import argparse
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("needs /proc/self/status (Linux)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per call (default 8)")
    parser.add_argument("--clones", type=int, default=3)
    args = parser.parse_args()
    from sklearn.base import clone
    import visualad
    from visualad.demo import random_clip_backbone
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "vitb16.safetensors")
        visualad.Detector(random_clip_backbone(768, 12, 16, 14, seed=0), image_size=224).save(path)
        x = np.random.default_rng(0).integers(0, 256, (args.batch, 224, 224, 3), dtype=np.uint8)
        start = rss_mb()
        det = visualad.Detector(path, image_size=224, batch_size=args.batch)
        want = det.anomaly_scores(x)
        first = rss_mb()
        weights = det._backbone_.params.nbytes / 2**20
        clones = [clone(det) for _ in range(args.clones)]
        for c in clones:
            assert np.array_equal(c.anomaly_scores(x), want)
        after = rss_mb()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda d: d.anomaly_scores(x), clones[:2]))
        threads = rss_mb()
    print(f"ViT-B/16 @ 224, batch {args.batch}: packed backbone weights {weights:.0f} MB")
    print(f"  first Detector, used:            +{first - start:7.1f} MB")
    print(f"  {args.clones} used clones (one at a time): +{after - first:7.1f} MB")
    print(f"  then 2 clones in 2 threads:      +{threads - after:7.1f} MB (a second engine state)")


if __name__ == "__main__":
    main()
