"""anomaly_maps() end to end vs the same model in PyTorch eager (the public release's pipeline:
nn.MultiheadAttention tower, SCA/SAF/cosine maps in torch, scipy gaussian_filter, top-k mean).

Usage: python benchmarks/bench_maps.py [--threads N] [--repeats R] [--quick]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import scipy.ndimage
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from bench_encode import random_openai  # noqa: E402
from timing import StealMeter, paired_medians  # noqa: E402
from torch_eager import ClipVisualADTower  # noqa: E402
import reference as ref  # noqa: E402

import visualad  # noqa: E402
from visualad.head import init_head  # noqa: E402

CONFIGS = [  # name, width, depth, patch, native grid, image size, batch
    ("ViT-B/16", 768, 12, 16, 14, 224, 1),
    ("ViT-L/14", 1024, 24, 14, 24, 518, 1),
]


def torch_maps(tower, head_t, x, layers, sigma, topk_ratio):
    feats, ta, tn = tower(x, layers)
    S, g = x.shape[-1], int(round(feats[0].shape[1] ** 0.5))
    fused = 0
    for l, P in zip(layers, feats):
        prm = ref._sca_params(head_t, l)
        a, n = ref.sca(prm, ta, P), ref.sca(prm, tn, P)
        fused = fused + ref.layer_map(ref.saf(head_t["layer_transforms"][f"layer_{l}"], P), a, n, g, S)
    final = np.stack([scipy.ndimage.gaussian_filter(m, sigma=sigma) for m in fused.numpy()])
    k = math.ceil(S * S * topk_ratio)
    scores = torch.from_numpy(final).flatten(1).topk(k, dim=1).values.mean(1)
    return final, scores


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="only ViT-B/16 at 224")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}  torch {torch.__version__}")
    print(f"{'model':9s} {'S':>4s} {'B':>2s} {'ours s':>8s} {'torch s':>8s} {'ratio':>6s} {'max|diff|':>10s} {'steal':>6s}")
    for name, width, depth, patch, grid, size, batch in (CONFIGS[:1] if args.quick else CONFIGS):
        sd = random_openai(width, depth, patch, grid)
        layers = [depth // 4, depth // 2, 3 * depth // 4, depth]
        head = init_head(width, layers, (sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]), size, 0)
        det = visualad.Detector(sd, head=head, image_size=size, num_threads=args.threads, batch_size=batch)
        tower = ClipVisualADTower.from_openai(sd, head)
        head_t = ref.head_to_torch(head, requires_grad=False)
        x = np.random.default_rng(1).standard_normal((batch, 3, size, size)).astype(np.float32)
        xt = torch.from_numpy(x)
        ours_maps = det.anomaly_maps(x)
        with torch.inference_mode(), StealMeter() as steal:
            ref_maps, _ = torch_maps(tower, head_t, xt, layers, 4.0, 0.01)
            ours, theirs = paired_medians(lambda: det.anomaly_maps(x),
                                          lambda: torch_maps(tower, head_t, xt, layers, 4.0, 0.01), args.repeats)
        diff = float(np.abs(ours_maps - ref_maps).max())
        print(f"{name:9s} {size:4d} {batch:2d} {ours:8.3f} {theirs:8.3f} {ours / theirs:6.2f} {diff:10.2e}"
              f" {steal.percent:5.1f}%", flush=True)


if __name__ == "__main__":
    main()
