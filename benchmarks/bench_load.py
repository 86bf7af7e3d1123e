"""Peak memory of loading a ViT-L-sized backbone checkpoint without PyTorch.

Writes a random OpenAI-named ViT-L/14 vision tower (width 1024, depth 24, patch 14, grid 24,
~303M parameters) with torch.save, in fp16 as OpenAI ships it (LayerNorms and embeddings fp32) and
in fp32, then loads each with ``visualad.checkpoint.load_backbone`` in a fresh process that never
imports torch, and reports the size on disk, the size of the float32 result, the process's peak RSS
(VmHWM) before and after loading, and the load time.

    python benchmarks/bench_load.py [--dir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap

WIDTH, DEPTH, PATCH, GRID = 1024, 24, 14, 24

MAKE = textwrap.dedent("""
    import sys, torch
    width, depth, patch, grid, half, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), \\
        int(sys.argv[4]), sys.argv[5] == "fp16", sys.argv[6]
    g = torch.Generator().manual_seed(0)
    def r(*shape, low=False):
        t = torch.randn(shape, generator=g) * 0.02
        return t.half() if half and low else t
    d, h = width, 4 * width
    s = {"visual.conv1.weight": r(d, 3, patch, patch, low=True), "visual.class_embedding": r(d),
         "visual.positional_embedding": r(1 + grid * grid, d), "visual.ln_pre.weight": r(d),
         "visual.ln_pre.bias": r(d), "visual.ln_post.weight": r(d), "visual.ln_post.bias": r(d),
         "visual.proj": r(d, 768, low=True)}
    for i in range(depth):
        p = f"visual.transformer.resblocks.{i}."
        s.update({p + "ln_1.weight": r(d), p + "ln_1.bias": r(d), p + "attn.in_proj_weight": r(3 * d, d, low=True),
                  p + "attn.in_proj_bias": r(3 * d, low=True), p + "attn.out_proj.weight": r(d, d, low=True),
                  p + "attn.out_proj.bias": r(d, low=True), p + "ln_2.weight": r(d), p + "ln_2.bias": r(d),
                  p + "mlp.c_fc.weight": r(h, d, low=True), p + "mlp.c_fc.bias": r(h, low=True),
                  p + "mlp.c_proj.weight": r(d, h, low=True), p + "mlp.c_proj.bias": r(d, low=True)})
    torch.save(s, path)
    print(sum(t.numel() for t in s.values()))
""")

LOAD = textwrap.dedent("""
    import json, sys, time

    def hwm_mb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024

    from visualad.checkpoint import load_backbone
    before = hwm_mb()
    t0 = time.perf_counter()
    bw = load_backbone(sys.argv[1])
    seconds = time.perf_counter() - t0
    result = sum(a.nbytes for a in bw.tensors.values()) / 2**20
    print(json.dumps({"before_mb": before, "peak_mb": hwm_mb(), "result_mb": result, "seconds": seconds,
                      "torch_imported": "torch" in sys.modules}))
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="where to write the checkpoints (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = args.dir or tempfile.mkdtemp(prefix="visualad-bench-load-")
    os.makedirs(folder, exist_ok=True)
    print(f"ViT-L/14 vision tower: width {WIDTH}, depth {DEPTH}, patch {PATCH}, grid {GRID}")
    print(f"{'checkpoint':<22}{'params':>12}{'on disk MB':>12}{'fp32 result MB':>16}{'RSS before MB':>15}"
          f"{'peak RSS MB':>13}{'load s':>8}")
    import json
    for precision in ("fp16", "fp32"):
        path = os.path.join(folder, f"vit_l14_{precision}.pt")
        made = subprocess.run([sys.executable, "-c", MAKE, str(WIDTH), str(DEPTH), str(PATCH), str(GRID), precision,
                               path], check=True, capture_output=True, text=True)
        params = int(made.stdout.split()[-1])
        loaded = subprocess.run([sys.executable, "-c", LOAD, path], check=True, capture_output=True, text=True,
                                cwd=root)
        r = json.loads(loaded.stdout.strip().splitlines()[-1])
        assert not r["torch_imported"]
        print(f"{'torch.save ' + precision:<22}{params:>12,}{os.path.getsize(path) / 2**20:>12.0f}"
              f"{r['result_mb']:>16.0f}{r['before_mb']:>15.0f}{r['peak_mb']:>13.0f}{r['seconds']:>8.2f}")
        if not args.keep:
            os.remove(path)
    if not args.keep and not args.dir:
        os.rmdir(folder)


if __name__ == "__main__":
    main()
