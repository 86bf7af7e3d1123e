"""fp32 and bf16 side by side: visualad (both precisions) against ONNX Runtime, OpenVINO (f32 and
bf16 inference precision) and PyTorch (fp32 and autocast bf16) on the same random CLIP tower, same
threads, every side timed round-robin in one run (timing.interleaved_medians).

Prints per configuration: median seconds per call, achieved TFLOP/s, the percentage of the bf16 GEMM
rate measured in the same run (a 1372 x 1024 x 4096 product on the engine's bf16 kernel), and the
deviation of each bf16 side's features from its own fp32 (max abs / max abs); then the anomaly-maps
pipeline in both precisions (time, map error / map range, score error) and a profile of the bf16 tower
(its products timed alone at the model's shapes). Weight memory and peak RSS per precision are
benchmarks/bench_clone_memory.py; the one training step is benchmarks/bench_train.py --precision bf16 /
--autocast.

Needs the `bench` extra (onnxruntime, openvino). Usage:
  python benchmarks/bench_precision.py [--threads 2] [--repeats 3] [--quick] [--skip-peers] [--config I ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_encode import random_openai  # noqa: E402
from timing import StealMeter, interleaved_medians  # noqa: E402
from torch_eager import ClipVisualADTower, clip_flops  # noqa: E402

import visualad  # noqa: E402
from visualad import _engine  # noqa: E402
from visualad.head import init_head  # noqa: E402

CONFIGS = [  # name, width, depth, patch, native grid, image size, batch
    ("ViT-B/16", 768, 12, 16, 14, 224, 1),
    ("ViT-B/16", 768, 12, 16, 14, 224, 8),
    ("ViT-L/14", 1024, 24, 14, 24, 518, 1),
]


class LastLayers(torch.nn.Module):
    """The tower returning the requested layers' ln_post patch tokens (what encode returns)."""

    def __init__(self, tower, layers):
        super().__init__()
        self.tower, self.layers = tower, layers

    def forward(self, x):
        outs, _, _ = self.tower(x, self.layers)
        return tuple(outs)


def deviation(a, b) -> float:
    """max |a - b| / max |b| over a list of arrays."""
    return max(float(np.abs(np.asarray(u, np.float64) - v).max() / np.abs(v).max()) for u, v in zip(a, b))


def peer_sides(tower, layers, x, threads, onnx_dir):
    """name -> (callable, features fn) for ONNX Runtime, OpenVINO f32/bf16, PyTorch fp32/autocast."""
    import onnxruntime as ort
    import openvino as ov
    model = LastLayers(tower, layers).eval()
    xt = torch.from_numpy(x)
    path = os.path.join(onnx_dir, "tower.onnx")
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused op has no ONNX export
    try:
        with torch.no_grad():
            torch.onnx.export(model, (xt,), path, dynamo=False, opset_version=17, input_names=["x"])
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    core = ov.Core()
    ov_model = core.read_model(path)
    compiled = {p: core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": p, "INFERENCE_NUM_THREADS": threads,
                                                         "PERFORMANCE_HINT": "LATENCY"})
                for p in ("f32", "bf16")}

    def torch_run(autocast):
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            return [o.float().numpy() for o in model(xt)]

    def ov_run(p):
        res = compiled[p]([x])
        return [res[o] for o in compiled[p].outputs]

    return {
        "onnxruntime fp32": lambda: sess.run(None, {"x": x}),
        "openvino f32": lambda: ov_run("f32"),
        "openvino bf16": lambda: ov_run("bf16"),
        "pytorch fp32": lambda: torch_run(False),
        "pytorch autocast bf16": lambda: torch_run(True),
    }


def encode_features(det, x, layers):
    e = det.encode(x)
    return [e["layers"][l] for l in layers]


def profile_bf16(width, depth, patch, size, batch, threads, repeats):
    """Seconds the bf16 tower spends in its products (each timed alone at the model's shapes, x depth)
    and in attention; the rest of the measured time is LayerNorm, activations, residual adds, embedding."""
    g = size // patch
    T = g * g + 3
    M = batch * T
    parts = {}
    for name, n, k in (("qkv", 3 * width, width), ("proj", width, width), ("fc1", 4 * width, width),
                       ("fc2", width, 4 * width)):
        parts[f"linear {name}"] = depth * _engine.testing.bf16_gemm_seconds(M, n, k, repeats, threads)
    qkv = np.random.default_rng(0).standard_normal((batch, T, 3 * width)).astype(np.float32)
    _engine.testing.attention(qkv, width // 64, "bf16", num_threads=threads)
    t0 = time.perf_counter()
    for _ in range(repeats):
        _engine.testing.attention(qkv, width // 64, "bf16", num_threads=threads)
    parts["attention"] = depth * (time.perf_counter() - t0) / repeats
    return parts


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="only ViT-B/16 at 224, batch 1")
    ap.add_argument("--skip-peers", action="store_true", help="visualad only (no ONNX Runtime / OpenVINO / PyTorch)")
    ap.add_argument("--config", type=int, action="append", metavar="I",
                    help="run only CONFIGS[I] (0: ViT-B/16 b1, 1: ViT-B/16 b8, 2: ViT-L/14@518 b1); repeatable")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = visualad.engine_info()
    print(f"threads={args.threads}  kernels: fp32 {info['precisions']['fp32']['kernel']}, bf16 "
          f"{info['precisions']['bf16']['kernel']}; AMX tiles: {info['cpu_features']['amx_tile']}")
    bf16_rate = 2 * 1372 * 1024 * 4096 / _engine.testing.bf16_gemm_seconds(1372, 4096, 1024, 5, args.threads) / 1e12
    fp32_rate = 2 * 4096 ** 3 / _engine.testing.sgemm_seconds(4096, 2, args.threads) / 1e12
    print(f"bf16 GEMM rate (1372x1024 @ 1024x4096, engine kernel): {bf16_rate:.3f} TFLOP/s; "
          f"fp32 SGEMM 4096^3 (OpenBLAS): {fp32_rate:.3f} TFLOP/s")
    chosen = [0] if args.quick else (args.config or range(len(CONFIGS)))
    towers = {}
    for ci in chosen:
        name, width, depth, patch, grid, size, batch = CONFIGS[ci]
        if name not in towers:
            towers.clear()
            sd = random_openai(width, depth, patch, grid)
            towers[name] = (sd, ClipVisualADTower.from_openai(sd))
        sd, tower = towers[name]
        layers = [depth // 4, depth // 2, 3 * depth // 4, depth]
        x = np.random.default_rng(1).standard_normal((batch, 3, size, size)).astype(np.float32)
        dets = {p: visualad.Detector(sd, image_size=size, layers=layers, num_threads=args.threads, batch_size=batch,
                                     precision=p) for p in ("fp32", "bf16")}
        sides = {f"visualad {p}": (lambda d=d: encode_features(d, x, layers)) for p, d in dets.items()}
        with tempfile.TemporaryDirectory() as tmp:
            if not args.skip_peers:
                sides.update(peer_sides(tower, layers, x, args.threads, tmp))
            outputs = {k: [np.asarray(o, np.float32) for o in fn()] for k, fn in sides.items()}
            with StealMeter() as steal:
                med = interleaved_medians(sides, args.repeats)
        flops = clip_flops(width, depth, patch, size, batch)
        print(f"\n{name} @ {size}, batch {batch} (steal {steal.percent or 0:.1f}%): {flops / 1e12:.3f} TFLOP per call")
        print(f"  {'side':24s} {'median s':>9s} {'TFLOP/s':>8s} {'% bf16 GEMM':>11s} {'bf16 vs own fp32':>17s}")
        own_fp32 = {"visualad bf16": "visualad fp32", "openvino bf16": "openvino f32",
                    "pytorch autocast bf16": "pytorch fp32"}
        for k, t in med.items():
            dev = f"{deviation(outputs[k], outputs[own_fp32[k]]):.2e}" if k in own_fp32 and own_fp32[k] in outputs else ""
            print(f"  {k:24s} {t:9.3f} {flops / t / 1e12:8.3f} {100 * flops / t / 1e12 / bf16_rate:10.1f}% {dev:>17s}")
        if "visualad bf16" in med:
            parts = profile_bf16(width, depth, patch, size, batch, args.threads, args.repeats)
            total = med["visualad bf16"]
            print("  profile of visualad bf16 (parts timed alone at the model's shapes):")
            for k, t in parts.items():
                print(f"    {k:16s} {t:7.3f} s  {100 * t / total:5.1f}%")
            print(f"    {'rest':16s} {total - sum(parts.values()):7.3f} s  {100 * (1 - sum(parts.values()) / total):5.1f}%")
        # the anomaly-maps pipeline (backbone + head + filter + scores) in both precisions
        head = init_head(width, layers, (sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]), size, 0)
        mdets = {p: visualad.Detector(sd, head=head, image_size=size, layers=layers, num_threads=args.threads,
                                      batch_size=batch, precision=p) for p in ("fp32", "bf16")}
        res = {p: d.maps_and_scores(x) for p, d in mdets.items()}
        mt = interleaved_medians({p: (lambda d=d: d.maps_and_scores(x)) for p, d in mdets.items()}, args.repeats)
        m32, s32 = res["fp32"]
        m16, s16 = res["bf16"]
        span = float(m32.max() - m32.min())
        print(f"  anomaly maps: fp32 {mt['fp32']:.3f} s, bf16 {mt['bf16']:.3f} s; bf16 max|map err| / map range "
              f"{np.abs(m16 - m32).max() / span:.2e}, max|score err| {np.abs(s16 - s32).max():.2e} (range {span:.3e})")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
