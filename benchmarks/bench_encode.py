"""encode() vs the same model in PyTorch eager (same weights, same threads).

Prints, per configuration: median times (the two timed alternately, see timing.py), the ratio
ours / PyTorch, achieved GFLOP/s, the percentage of this machine's large-SGEMM peak measured in the
same run (through the engine's BLAS and thread pool) and the CPU share the hypervisor took meanwhile. Usage: python benchmarks/bench_encode.py [--threads N] [--repeats R] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import StealMeter, paired_medians  # noqa: E402
from torch_eager import ClipVisualADTower, clip_flops  # noqa: E402

import visualad  # noqa: E402

DINOV2_CONFIGS = [("DINOv2-L/14", 1024, 24, 14, 37, 518, 1), ("DINOv2-L/14", 1024, 24, 14, 37, 518, 4)]
CLIP_HF_CONFIGS = [("ViT-B/16", 768, 12, 16, 14, 224, 1), ("ViT-B/16", 768, 12, 16, 14, 224, 4),
                   ("ViT-L/14", 1024, 24, 14, 37, 518, 1)]

CONFIGS = [  # name, width, depth, patch, native grid, image size, batch
    ("ViT-B/16", 768, 12, 16, 14, 224, 1),
    ("ViT-B/16", 768, 12, 16, 14, 224, 4),
    ("ViT-L/14", 1024, 24, 14, 24, 336, 1),
    ("ViT-L/14", 1024, 24, 14, 24, 336, 4),
    ("ViT-L/14", 1024, 24, 14, 24, 518, 1),
    ("ViT-L/14", 1024, 24, 14, 24, 518, 4),
]


def random_openai(width, depth, patch, grid, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s, std=0.02: (rng.standard_normal(s) * std).astype(np.float32)  # noqa: E731
    sd = {"visual.conv1.weight": f(width, 3, patch, patch), "visual.class_embedding": f(width),
          "visual.positional_embedding": f(1 + grid * grid, width),
          "visual.ln_pre.weight": 1 + f(width), "visual.ln_pre.bias": f(width),
          "visual.ln_post.weight": 1 + f(width), "visual.ln_post.bias": f(width)}
    for i in range(depth):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({p + "ln_1.weight": 1 + f(width), p + "ln_1.bias": f(width),
                   p + "attn.in_proj_weight": f(3 * width, width), p + "attn.in_proj_bias": f(3 * width),
                   p + "attn.out_proj.weight": f(width, width), p + "attn.out_proj.bias": f(width),
                   p + "ln_2.weight": 1 + f(width), p + "ln_2.bias": f(width),
                   p + "mlp.c_fc.weight": f(4 * width, width), p + "mlp.c_fc.bias": f(4 * width),
                   p + "mlp.c_proj.weight": f(width, 4 * width), p + "mlp.c_proj.bias": f(width)})
    return sd


def dinov2_models(width, depth, size):
    """transformers Dinov2Model (random init, SDPA attention) and the same weights for visualad."""
    from transformers import Dinov2Config, Dinov2Model
    from visualad.backbone import build_backbone
    from visualad.checkpoint import load_backbone
    torch.manual_seed(0)
    hf = Dinov2Model(Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=width // 64,
                                  image_size=size, patch_size=14, layerscale_value=1.0)).eval()
    bw = load_backbone({k: v.detach().numpy() for k, v in hf.state_dict().items()})
    return hf, build_backbone(bw.tensors, bw.family, bw.hints)


def clip_hf_models(width, depth, patch, size):
    """transformers CLIPVisionModel (random init, SDPA attention, QuickGELU) and the same weights for visualad."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from visualad.backbone import build_backbone
    from visualad.checkpoint import load_backbone
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                           num_attention_heads=width // 64, image_size=size, patch_size=patch, hidden_act="quick_gelu",
                           attn_implementation="sdpa")
    hf = CLIPVisionModel(cfg).eval()
    assert hf.config._attn_implementation == "sdpa", hf.config._attn_implementation
    bw = load_backbone({k: v.detach().numpy() for k, v in hf.state_dict().items()})
    return hf, build_backbone(bw.tensors, bw.family, bw.hints)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="only ViT-B/16 at 224")
    ap.add_argument("--family", choices=("clip", "clip-hf", "dinov2"), default="clip",
                    help="clip: OpenAI-style towers vs nn.MultiheadAttention; clip-hf: vs transformers "
                         "CLIPVisionModel with SDPA attention; dinov2: ViT-L/14 at 518 vs transformers (SDPA)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = 4096
    peak = 2 * n ** 3 / visualad._engine.testing.sgemm_seconds(n, 3, args.threads) / 1e9
    print(f"threads={args.threads}  large-SGEMM peak (n={n}, engine BLAS): {peak:.1f} GFLOP/s  torch {torch.__version__}")
    print(f"{'model':9s} {'S':>4s} {'B':>2s} {'ours s':>8s} {'torch s':>8s} {'ratio':>6s} {'GFLOP/s':>8s} {'%peak':>6s}"
          f" {'steal':>6s}")
    configs = {"dinov2": DINOV2_CONFIGS, "clip-hf": CLIP_HF_CONFIGS}.get(args.family, CONFIGS)
    configs = configs[:2] if args.quick else configs
    cache = {}
    for name, width, depth, patch, grid, size, batch in configs:
        if name not in cache:
            cache.clear()
            if args.family == "dinov2":
                cache[name] = dinov2_models(width, depth, size)
            elif args.family == "clip-hf":
                cache[name] = clip_hf_models(width, depth, patch, size)
            else:
                sd = random_openai(width, depth, patch, grid)
                cache[name] = (ClipVisualADTower.from_openai(sd), sd)
        tmodel, backbone = cache[name]
        layers = [depth // 4, depth // 2, 3 * depth // 4, depth]
        det = visualad.Detector(backbone, image_size=size, layers=layers, num_threads=args.threads, batch_size=batch)
        x = np.random.default_rng(1).standard_normal((batch, 3, size, size)).astype(np.float32)
        xt = torch.from_numpy(x)
        det.encode(x)  # loads weights
        if args.family in ("dinov2", "clip-hf"):
            run_ref = lambda: tmodel(pixel_values=xt, output_hidden_states=True)  # noqa: E731
        else:
            run_ref = lambda: tmodel(xt, layers)  # noqa: E731
        with torch.inference_mode(), StealMeter() as steal:
            ours, ref = paired_medians(lambda: det.encode(x), run_ref, args.repeats)
        gflops = clip_flops(width, depth, patch, size, batch) / ours / 1e9
        print(f"{name:9s} {size:4d} {batch:2d} {ours:8.3f} {ref:8.3f} {ours / ref:6.2f} {gflops:8.1f} {100 * gflops / peak:5.1f}%"
              f" {steal.percent:5.1f}%", flush=True)


if __name__ == "__main__":
    main()
