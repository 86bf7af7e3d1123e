"""One training step (batch 8: forward, backward through the frozen backbone, AdamW) in visualad vs
the same step in PyTorch autograd on the CPU, same threads. Each side runs in its own process so
that its peak RSS is its own. Prints median step times, the ratio ours / PyTorch, and peak RSS.
Steps are timed inside one run of each side's loop (ours: consecutive epochs of one Detector.fit
with one batch each; PyTorch: consecutive calls of its step), after a warm-up.
--precision bf16 adds visualad in bf16 and PyTorch under torch.autocast('cpu', torch.bfloat16).

Usage: python benchmarks/bench_train.py [--model B16-224|L14-518] [--batch 8] [--threads N] [--ours-only]
       [--precision fp32|bf16]
(ViT-L/14 at 518 with batch 8 does not fit PyTorch autograd in 24 GB: use --ours-only for it.)
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
MODELS = {"B16-224": (768, 12, 16, 14, 224), "L14-336": (1024, 24, 14, 24, 336), "L14-518": (1024, 24, 14, 24, 518)}


def _setup(model, batch):
    import numpy as np
    sys.path.insert(0, HERE)
    from bench_encode import random_openai
    from visualad.head import init_head
    width, depth, patch, grid, size = MODELS[model]
    sd = random_openai(width, depth, patch, grid)
    layers = [depth // 4, depth // 2, 3 * depth // 4, depth]
    head = init_head(width, layers, (sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]), size, 0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    labels = np.arange(batch) % 2
    masks = [(rng.random((size, size)) > 0.95) if lab else None for lab in labels]
    return sd, head, layers, size, x, labels, masks


def run_ours(model, batch, threads, steps, bf16=False):
    import visualad
    sd, head, layers, size, x, labels, masks = _setup(model, batch)
    det = visualad.Detector(sd, head=head, image_size=size, layers=layers, num_threads=threads, batch_size=batch,
                            epochs=steps + 1, dropout=0.1, precision="bf16" if bf16 else "fp32", progress=False)
    det.fit(x, labels, masks)  # warm-up (loads the model, allocates the workspaces)
    # one epoch of one batch = one step; a step is the time between two epoch ends of one fit, so
    # like the PyTorch side it excludes fit's set-up (targets, head, optimiser state) done once per fit
    ends = []
    det.fit(x, labels, masks, on_epoch=lambda _det, _epoch: ends.append(time.perf_counter()))
    return [b - a for a, b in zip(ends, ends[1:])]


def run_torch(model, batch, threads, steps, bf16=False):
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import reference as ref
    from torch_eager import ClipVisualADTower
    from visualad.training import batch_targets
    sd, head, layers, size, x, labels, masks = _setup(model, batch)
    tower = ClipVisualADTower.from_openai(sd, head).train()
    for name, p in tower.named_parameters():
        p.requires_grad_(name in ("anomaly_token", "normal_token", "ln_post.weight", "ln_post.bias"))
    head_t = ref.head_to_torch(head, requires_grad=True)
    params = [p for p in tower.parameters() if p.requires_grad] + list(ref.flatten_head(head_t).values())[4:]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    mk, has = batch_targets(labels.astype(np.float32), masks, np.arange(batch), size)
    xt, yt, mt = torch.from_numpy(x), torch.from_numpy(labels.astype(np.float32)), torch.from_numpy(mk)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):  # the frozen tower only
            feats, ta, tn = tower(xt, layers)
        feats, ta, tn = [f.float() for f in feats], ta.float(), tn.float()
        losses = ref.visualad_head_losses(head_t, dict(zip(layers, feats)), ta, tn, yt, mt, layers, size,
                                          has_mask=torch.from_numpy(has.astype(bool)))
        losses["total"].backward()
        opt.step()

    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def child(args):
    fn = run_ours if args.which.startswith("ours") else run_torch
    times = fn(args.model, args.batch, args.threads, args.steps, bf16=args.which.endswith("bf16"))
    sys.path.insert(0, HERE)
    from timing import peak_rss_mb
    peak_mb = peak_rss_mb()
    print(json.dumps({"median_s": statistics.median(times), "peak_rss_mb": peak_mb}))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="B16-224", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ours-only", action="store_true")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: also visualad bf16 and PyTorch autocast bf16")
    ap.add_argument("--which", choices=("ours", "torch", "ours-bf16", "torch-bf16"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.which:
        return child(args)
    results = {}
    sides = ["ours"] + ([] if args.ours_only else ["torch"])
    if args.precision == "bf16":
        sides += ["ours-bf16"] + ([] if args.ours_only else ["torch-bf16"])
    for which in sides:
        cmd = [sys.executable, __file__, "--which", which, "--model", args.model, "--batch", str(args.batch),
               "--threads", str(args.threads), "--steps", str(args.steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[which] = json.loads(out)
    print(f"model {args.model}, batch {args.batch}, threads {args.threads}")
    names = {"ours": "visualad fp32", "torch": "autograd fp32", "ours-bf16": "visualad bf16",
             "torch-bf16": "autograd, autocast bf16"}
    for which, r in results.items():
        print(f"  {names[which]:24s}: step {r['median_s']:.3f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
    for mine in ("ours", "ours-bf16"):
        for ref in ("torch", "torch-bf16"):
            if mine in results and ref in results:
                print(f"  ratio {names[mine]} / {names[ref]}: {results[mine]['median_s'] / results[ref]['median_s']:.2f}")


if __name__ == "__main__":
    main()
