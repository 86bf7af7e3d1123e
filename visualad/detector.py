"""The scikit-learn style VisualAD detector (docs/api.md)."""
from __future__ import annotations

import copy
import inspect
import math
import os
import threading
import warnings

import numpy as np

from . import _engine, model_cache
from .backbone import EngineBackbone
from .engine_info import PRECISIONS
from .errors import CheckpointError, UntrainedHeadWarning
from .limits import MAX_IMAGE_SIDE, check_int, check_threads
from .head import default_layers, head_engine_config, init_head, pack_head, validate_head
from .preprocess import ImageSource
from .progress import Progress


def _load_head(spec, width: int) -> dict | None:
    if spec is None:
        return None
    if isinstance(spec, (str, os.PathLike)):
        from .checkpoint import load_head
        spec = load_head(spec)
    return validate_head(spec, width)


PAPER_IMAGE_SIZE = 518
_LOCKS_GUARD = threading.Lock()
LN_POST_CHOICES = ("head", "backbone")
MISSING_MASK_CHOICES = ("skip", "zeros")


def weights_kind(precision) -> str:
    """The precision kind of the weights a Detector of this ``precision`` loads
    (:mod:`visualad.model_cache`): "bf16" for bf16 (no float32 copy of the linear weights resident),
    else "fp32" (an unknown precision is refused when the engine runs)."""
    return "bf16" if precision == "bf16" else "fp32"


def _stored_settings(path, overrides: dict) -> dict:
    """The settings stored in a visualad file, loading it (once per process) in the precision kind
    the Detector made from it will run: ``overrides``' precision, else the file's."""
    from .checkpoint.detector_file import stored_precision
    precision = overrides["precision"] if "precision" in overrides else stored_precision(path)
    return model_cache.load(path, precision=weights_kind(precision)).settings


def default_image_size(bb: EngineBackbone) -> int:
    """The paper's S = 518 where the backbone's patch divides it, else the backbone's native size."""
    patch = bb.config["patch"]
    return PAPER_IMAGE_SIZE if PAPER_IMAGE_SIZE % patch == 0 else patch * bb.config["grid"]


def _layer_list(layers) -> list[int]:
    """``layers`` as a list of ints; a bare int is refused because it reads both as "layer 2" and as
    "two layers"."""
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        raise TypeError(f"layers must be a list of 1-based block indices, e.g. [{int(layers)}] for block "
                        f"{int(layers)}; got the int {int(layers)}")
    try:
        return [check_int(l, "layers[i]") for l in layers]  # 1.7 is refused, not read as 1
    except TypeError:
        raise TypeError(f"layers must be a list of 1-based block indices, got {type(layers).__name__}") from None


class Detector:
    """VisualAD anomaly detector: a frozen ViT backbone plus the learned VisualAD head.

    Parameters
    ----------
    backbone : path or dict
        A CLIP or DINOv2 checkpoint (file or Hugging Face folder, any supported format), or a dict
        ``{name: ndarray}`` in OpenAI-CLIP (``visual.*``) or DINOv2-hub naming.
    head : path, dict or None
        A VisualAD head (official ``CLIP.pth`` layout or a dict in that layout). None: a fresh
        head initialised from ``random_state``.
    image_size : int, optional
        Input side S (default: the head's ``image_size``, else the paper's 518 where the backbone's
        patch divides it, else the backbone's native size). Must be divisible by the patch.
    layers : list of int, optional
        1-based block indices (default: the head's ``features_list``, else 4 evenly spaced). A bare
        int is a TypeError (say ``[2]`` for block 2).
    sigma : float
        Gaussian filter on the final map (0 disables).
    topk_ratio : float
        Image score = mean of the top ``ceil(S*S*topk_ratio)`` map values.
    threshold : float
        Decision threshold on ``anomaly_scores`` (:meth:`calibrate` sets it from normal images).
    num_threads : int, optional
        Threads for the C engine (None = all usable cores). Larger values are capped at the usable
        cores; values above ``visualad.limits.MAX_THREADS`` (256) are refused.
    precision : {"fp32", "bf16"}
        Arithmetic of the backbone. "fp32" (the default) is the parity-tested path. "bf16" runs the
        backbone's products with bf16 inputs and fp32 accumulation on the CPU's bf16 instructions
        (AVX512-BF16; refused with an error naming the feature where the CPU lacks it); the head,
        LayerNorm, softmax and the residual stream stay fp32. See :func:`visualad.engine_info`.
        Memory: a bf16 Detector loads the backbone bf16-only (the linear weights and the patch
        embedding only as bf16 packs, shared by every clone and thread; the small tensors fp32),
        about half the fp32 weight memory; :meth:`save` reads the fp32 weights from the source
        again, and switching ``precision`` loads the other kind and keeps a trained ``head_``.
    random_state : int
        Seed for fresh heads and training.
    batch_size : int
        Images per engine call (bounds memory); also the training batch size.
    progress : bool
        Show progress bars on long runs.
    epochs, learning_rate, head_learning_rate, dropout :
        Training hyper-parameters used by :meth:`fit` (the paper's defaults, docs/method.md §11);
        ``epochs=0`` makes ``fit(X, y)`` keep the given head (model selection over inference settings).
    ln_post : {"head", "backbone"}
        Which final LayerNorm makes the features: ``"head"`` (default) the trained one stored in the
        head, as the method trains it; ``"backbone"`` the backbone's own, as the official test script
        runs (it never restores the trained ln_post, so its maps differ from ours by up to about 0.12).
        Inference only: :meth:`fit` always trains the head's.
    missing_mask : {"skip", "zeros"}
        Training on a defective image given without a mask: ``"skip"`` (default) leaves it out of the
        segmentation loss (it still counts in the classification and contrastive terms); ``"zeros"``
        gives it an all-zero mask, as the official data loader does.

    Weights load lazily, once per process, into a cache shared by every Detector naming the same
    weights (:mod:`visualad.model_cache`); each call runs on its own engine state, so threads and
    clones run at once with the sequential results. A Detector pickles as its parameters plus a
    reference to its weights (:meth:`__getstate__`).
    """

    def __init__(self, backbone, head=None, *, image_size=None, layers=None, sigma=4.0, topk_ratio=0.01,
                 threshold=0.0, num_threads=None, random_state=111, batch_size=8, progress=False,
                 epochs=1, learning_rate=1e-3, head_learning_rate=1e-4, dropout=0.1, ln_post="head",
                 missing_mask="skip", precision="fp32"):
        self.backbone = backbone
        self.head = head
        self.image_size = image_size
        self.layers = layers
        self.sigma = sigma
        self.topk_ratio = topk_ratio
        self.threshold = threshold
        self.num_threads = num_threads
        self.random_state = random_state
        self.batch_size = batch_size
        self.progress = progress
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.head_learning_rate = head_learning_rate
        self.dropout = dropout
        self.precision = precision
        self.ln_post = ln_post
        self.missing_mask = missing_mask

    @classmethod
    def default(cls, **params) -> "Detector":
        """The embedded default model (``--backbone default`` on the command line): a tiny
        CLIP-architecture ViT with seeded random weights and a head trained on synthetic defects
        (see :mod:`visualad.demo`). It runs offline and shows the pipeline end to end; real-world
        accuracy needs real weights. ``params`` override its stored settings."""
        from .demo import DEFAULT_MODEL
        if not os.path.exists(DEFAULT_MODEL):
            raise FileNotFoundError(f"the embedded default model is missing: {DEFAULT_MODEL}")
        settings = {k: v for k, v in _stored_settings(DEFAULT_MODEL, params).items()
                    if k in cls._get_param_names() and k not in ("num_threads", "progress")}
        settings.update(params)
        return cls(DEFAULT_MODEL, **settings)

    # ------------------------------------------------------------------ scikit-learn protocol
    @classmethod
    def _get_param_names(cls):
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.name != "self"]

    def get_params(self, deep=True):
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params):
        valid = set(self._get_param_names())
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"invalid parameter {key!r} for Detector; valid: {sorted(valid)}")
            setattr(self, key, value)
        return self

    def __sklearn_tags__(self):
        """scikit-learn's estimator tags (called by scikit-learn only, so it is importable then): an
        outlier detector taking images -- paths, PIL images or pixel arrays, not tabular 2-D data
        -- that needs no fit (zero-shot) and no labels."""
        from sklearn.utils import InputTags, Tags, TargetTags
        return Tags(estimator_type="outlier_detector", target_tags=TargetTags(required=False),
                    transformer_tags=None, classifier_tags=None, regressor_tags=None,
                    input_tags=InputTags(one_d_array=False, two_d_array=False, three_d_array=True, string=True),
                    requires_fit=False)

    def __sklearn_clone__(self):
        """``sklearn.base.clone``: a new unfitted Detector with deep copies of the parameters, except
        ``backbone`` and ``head``, which are passed as the same objects (weights are read-only and
        loaded once per process; a dict of arrays is not copied and not hashed again)."""
        params = {k: v if k in ("backbone", "head") else copy.deepcopy(v) for k, v in self.get_params().items()}
        clone = type(self)(**params)
        loaded = self.__dict__.get("_loaded_")
        if loaded is not None and not isinstance(self.backbone, (str, os.PathLike)):
            clone._loaded_spec, clone._loaded_ = self.backbone, loaded
        return clone

    # ------------------------------------------------------------------ pickling
    def _pickle_state(self, with_digest: bool) -> dict:
        """The parameters, a reference to the weights and what fit / calibrate learned (nothing loaded)."""
        state = {"params": self.get_params()}
        spec, ref = self.backbone, self.__dict__.get("_weights_ref")
        if ref is not None and ref["spec"] is spec:
            state["weights"] = {k: v for k, v in ref.items() if k != "spec"}
        elif isinstance(spec, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(spec))
            state["weights"] = {"path": path, "digest": model_cache.file_digest(path) if with_digest else None}
        else:
            loaded = self.__dict__.get("_loaded_")
            state["weights"] = {"path": None, "digest": loaded.key[1] if loaded is not None and
                                self._loaded_spec is spec else None}
        if self.__dict__.get("_head_trained"):
            state["fitted"] = {"head_": self.head_, "training_history_": self.training_history_,
                               "n_skipped_steps_": self.n_skipped_steps_}
        if self.__dict__.get("calibration_") is not None:
            state["calibration_"] = self.calibration_
        return state

    def __getstate__(self) -> dict:
        """Pickles as the parameters plus a reference to the weights: for a path, the absolute path
        and the SHA-256 of its content (checked when the unpickled Detector first loads it); for a
        dict of arrays, the arrays themselves (they are the parameter) and their digest. A head
        trained by fit travels with it. Nothing loaded is pickled: unpickling is cheap and the
        weights load lazily, once per process (:mod:`visualad.model_cache`)."""
        return self._pickle_state(with_digest=True)

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state["params"])
        weights = state.get("weights") or {}
        if weights.get("digest") or weights.get("path"):
            self._weights_ref = dict(weights, spec=self.backbone)
        fitted = state.get("fitted")
        if fitted:
            self.__dict__.update(fitted)
            self._head_src, self._head_trained, self._keep_head = self.head, True, True
            self._head_source_, self._untrained_head = None, False
        if state.get("calibration_") is not None:
            self.calibration_ = state["calibration_"]

    def __deepcopy__(self, memo):
        """A deep copy: copied parameters and fitted head; the loaded weights stay shared."""
        new = type(self).__new__(type(self))
        new.__setstate__(copy.deepcopy(self._pickle_state(with_digest=False), memo))
        return new

    def __repr__(self):
        b = self.backbone if isinstance(self.backbone, (str, os.PathLike)) else f"<{type(self.backbone).__name__}>"
        return f"Detector(backbone={b!r}, image_size={self.image_size}, layers={self.layers})"

    # ------------------------------------------------------------------ lazy model state
    def _threads(self) -> int:
        """num_threads resolved: None = every usable core; capped at the cores and MAX_THREADS."""
        return check_threads(self.num_threads)

    def _precision(self) -> str:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if _engine.precision_kernel(self.precision) == "none":  # checked per call: engine states are reused
            from .engine_info import engine_info
            raise ValueError(f"precision {self.precision!r} cannot run here: "
                             f"{engine_info()['precisions'][self.precision]['reason']}")
        return self.precision

    def _lock(self) -> threading.RLock:
        """This Detector's lock (created on first use; not a parameter, not pickled): guards the
        lazy loading so that threads sharing one Detector resolve its model once."""
        lock = self.__dict__.get("_lock_")
        if lock is None:
            with _LOCKS_GUARD:
                lock = self.__dict__.setdefault("_lock_", threading.RLock())
        return lock

    def _weights_kind(self) -> str:
        return weights_kind(self.precision)

    def _weights_source(self):
        """(spec, digest) to load the weights from: the ``backbone`` parameter (for an unpickled
        Detector, the absolute path it was pickled with while that file exists) and the content
        digest it must have (None when unknown)."""
        spec, ref = self.backbone, self.__dict__.get("_weights_ref")
        if ref is None or ref["spec"] is not spec:  # not unpickled, or the parameter changed since
            return spec, None
        if isinstance(spec, (str, os.PathLike)) and os.path.exists(ref["path"]):
            spec = ref["path"]
        return spec, ref["digest"]

    def _backbone_entry(self) -> model_cache.LoadedBackbone:
        """The process-wide loaded backbone named by the ``backbone`` parameter, in the precision
        kind of ``precision`` (see :mod:`visualad.model_cache`): a path is checked by its file
        identity (stat) on every call, a dict or EngineBackbone by object identity once resolved
        (its content digest keys the cache, so equal weights load once). The engine runs on its own
        packed copy: a dict edited in place is not noticed, even when passed again; give a new dict
        (e.g. ``dict(weights)``) with ``set_params(backbone=...)``."""
        spec, current, kind = self.backbone, self.__dict__.get("_loaded_"), self._weights_kind()
        source, digest = self._weights_source()
        if current is not None and self._loaded_spec is spec and current.precision == kind and (
                not isinstance(spec, (str, os.PathLike)) or current.key == model_cache.file_identity(source)):
            return current
        entry = model_cache.load(source, digest, kind)
        self._loaded_spec = spec
        return entry

    def _model(self) -> model_cache.LoadedBackbone:
        """Resolves the loaded backbone and the head once; the head is rebuilt only when the
        weights or the ``head`` parameter change (a trained ``head_`` survives e.g. a new
        ``num_threads`` or ``precision``). Returns the loaded backbone; engine states come from
        :meth:`_engine`."""
        with self._lock():
            entry = self._backbone_entry()
            previous = self.__dict__.get("_loaded_")
            if entry is not previous:
                keep = self.__dict__.pop("_keep_head", False)  # a head restored by unpickling
                self._loaded_ = entry
                if not keep and (previous is None or previous.key != entry.key):  # other weights
                    self.head_ = None
            if self.__dict__.get("head_") is None or self.__dict__.get("_head_src", self) is not self.head:
                self._reset_head()
            return entry

    def _engine(self):
        """A backbone engine state for one call (context manager): the shared read-only weights
        with this call's own workspaces, so threads and clones run at once without copies."""
        self._precision()  # before loading: a precision this CPU cannot run loads nothing
        return self._model().state(self._threads())

    @property
    def _backbone_(self) -> EngineBackbone:
        """The loaded backbone (configuration, preprocessing; packed float32 weights in ``params``
        for fp32, None for bf16 -- :meth:`_fp32_backbone` has them)."""
        return self._model().backbone

    def _fp32_backbone(self) -> EngineBackbone:
        """The loaded backbone with its float32 weights: the loaded ones (fp32), or for bf16, which
        keeps none resident, read from the source again (:func:`visualad.model_cache.fp32_backbone`)."""
        loaded = self._model()
        if loaded.backbone.params is not None:
            return loaded.backbone
        return model_cache.fp32_backbone(*self._weights_source(), key=loaded.key)

    def _reset_head(self):
        """head_ from the ``head`` parameter, else the head stored in a visualad backbone file, else a
        fresh seeded head; shared (read-only) with every Detector whose head has the same source."""
        loaded = self._loaded_

        def build():
            head = _load_head(self.head if self.head is not None else loaded.stored_head, loaded.backbone.width)
            return head if head is not None else self._fresh_head(loaded.backbone)

        source = self._head_source()
        self.head_ = build() if source is None else loaded.head_dict(source, build)
        self._head_src = self.head
        self._head_trained = False
        self._untrained_head = self.head is None and loaded.stored_head is None  # until fit() trains it
        self._head_source_ = source
        self._head_version = getattr(self, "_head_version", 0) + 1

    def _fresh_head(self, bb: EngineBackbone) -> dict:
        layers = _layer_list(self.layers) if self.layers is not None else default_layers(bb.depth)
        size = check_int(self.image_size if self.image_size is not None else default_image_size(bb), "image_size", 1,
                         MAX_IMAGE_SIDE)
        layers = [check_int(l, "layers[i]", 1, bb.depth) for l in layers]
        return init_head(bb.width, layers, bb.default_ln_post, size, self.random_state)

    def _settings(self):
        """Resolved (image_size, layers) after the model is loaded, validated."""
        bb = self._loaded_.backbone
        size = self.image_size if self.image_size is not None else self.head_.get("image_size", default_image_size(bb))
        size = check_int(size, "image_size", 1, MAX_IMAGE_SIDE)
        patch = bb.config["patch"]
        if size % patch:
            raise ValueError(f"image_size {size} is not a positive multiple of the patch size {patch}")
        layers = self.layers if self.layers is not None else self.head_.get("features_list")
        if layers is None:
            layers = default_layers(bb.depth)
        layers = _layer_list(layers)
        if not layers:
            raise ValueError("layers must not be empty")
        for l in layers:
            if not 1 <= l <= bb.depth:
                raise ValueError(f"layer {l} is outside 1..{bb.depth} for this backbone")
        return size, layers

    def _ln_post(self) -> tuple:
        """(weight, bias) of the final LayerNorm chosen by the ``ln_post`` parameter."""
        if self.ln_post == "head":
            return self.head_["ln_post_weight"], self.head_["ln_post_bias"]
        if self.ln_post == "backbone":
            return self._loaded_.backbone.default_ln_post
        raise ValueError(f"ln_post must be one of {', '.join(map(repr, LN_POST_CHOICES))}, got {self.ln_post!r}")

    def _source(self, X, size):
        bb = self._loaded_.backbone
        return ImageSource(X, size, bb.mean, bb.std)

    def _batch_size(self) -> int:
        return check_int(self.batch_size, "batch_size", 1)

    # ------------------------------------------------------------------ API
    def encode(self, X) -> dict:
        """Backbone features as VisualAD sees them.

        Returns ``{"layers": {l: (N, patches, D)}, "anomaly_token": (N, D), "normal_token": (N, D)}``:
        ln_post (the head's) of the residual stream after block ``l`` at the patch positions, and of
        the two inserted tokens after the final block (before SCA)."""
        self._model()
        size, layers = self._settings()
        src = self._source(X, size)
        ta_all, tn_all = [], []
        feats_parts = {l: [] for l in layers}
        with self._engine() as engine:
            for _, feats, ta, tn in self._encoded_batches(engine, src, layers, "encode"):
                for l, f in zip(layers, feats):
                    feats_parts[l].append(f)
                ta_all.append(ta)
                tn_all.append(tn)
        join = lambda parts: parts[0] if len(parts) == 1 else np.concatenate(parts)  # noqa: E731
        return {"layers": {l: join(p) for l, p in feats_parts.items()}, "anomaly_token": join(ta_all),
                "normal_token": join(tn_all)}

    def _encoded_batches(self, engine, src, layers, desc: str):
        """(start, feats, t_a, t_n) for each batch of ``src``: the tower with the head's tokens and
        ln_post (the one loop behind encode and the maps), with a progress bar."""
        head = self.head_
        tokens = np.stack([head["anomaly_token"], head["normal_token"]])
        ln_post = self._ln_post()
        n = len(src)
        with Progress(n, desc, bool(self.progress) and n > 1) as bar:
            for start, batch in src.batches(self._batch_size()):
                feats, ta, tn = engine.encode(batch, layers, tokens, *ln_post)
                yield start, feats, ta, tn
                bar.update(len(batch))

    def features(self, X, layers=None) -> dict:
        """Features of the plain backbone (no VisualAD tokens inserted), for any feature-based method.

        Returns ``{"hidden": {l: (N, T, D)}, "final": (N, T, D)}`` float32: the residual stream after
        block ``l`` (1-based; default: the detector's layers) and the tower's own final norm (CLIP
        ``ln_post`` / DINOv2 ``norm``, the backbone's weights, not the head's) over every token of
        the last block. T = class token + registers + patches, in the model's order."""
        self._model()
        size, default = self._settings()
        depth = self._loaded_.backbone.depth
        layers = default if layers is None else [int(l) for l in layers]
        for l in layers:
            if not 1 <= l <= depth:
                raise ValueError(f"layer {l} is outside 1..{depth} for this backbone")
        src = self._source(X, size)
        hidden, final = {l: [] for l in layers}, []
        with self._engine() as engine, Progress(len(src), "features", self.progress and len(src) > 1) as bar:
            for _, batch in src.batches(self._batch_size()):
                streams, last = engine.forward(batch, layers, None, final_norm=True)
                for l, s in zip(layers, streams):
                    hidden[l].append(s)
                final.append(last)
                bar.update(len(batch))
        join = lambda parts: parts[0] if len(parts) == 1 else np.concatenate(parts)  # noqa: E731
        return {"hidden": {l: join(p) for l, p in hidden.items()}, "final": join(final)}

    # ------------------------------------------------------------------ training
    def _train_setup(self, X, y, masks, fresh_start: bool):
        from .training import HeadBuffers, check_labels
        self._model()
        if self.ln_post != "head":
            raise ValueError(f"training trains the head's ln_post: use ln_post='head', not {self.ln_post!r}")
        if self.missing_mask not in MISSING_MASK_CHOICES:
            raise ValueError(f"missing_mask must be one of {', '.join(map(repr, MISSING_MASK_CHOICES))}, "
                             f"got {self.missing_mask!r}")
        if fresh_start:
            self._reset_head()  # fit starts from `head` if given, else from a fresh head
        size, layers = self._settings()
        src = self._source(X, size)
        labels = check_labels(y, masks, len(src))
        buffers = HeadBuffers.from_head(self.head_, layers, self._loaded_.backbone.width, self._threads())
        return size, layers, src, labels, buffers

    def loss_and_grad(self, X, y, masks=None, dropout=0.0):
        """The training losses of X (one batch) and their gradients w.r.t. every trainable tensor.

        Returns ``(losses, grads)``: losses ``{"cls", "seg", "contrastive", "total"}`` as floats;
        grads keyed by the flattened official head names (``anomaly_token``, ``ln_post_weight``,
        ``layer_transforms.layer_6.mlp.0.weight``, ``cross_attn.layer_attentions.layer_6.q_proj.weight``,
        ...). The gradient reaches t_a and t_n through the frozen backbone. Nothing is updated."""
        from .training import batch_targets, loss_and_grad
        size, layers, src, labels, buf = self._train_setup(X, y, masks, fresh_start=False)
        d = float(dropout)
        if not 0.0 <= d < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        mask_arr, has_mask = batch_targets(labels, masks, np.arange(len(src)), size, self.missing_mask)
        with self._engine() as engine:
            losses = loss_and_grad(engine, buf, src.batch(0, len(src)), layers, labels, mask_arr, has_mask,
                                   self._topk(size), d, int(self.random_state))
        return losses, buf.flat_gradients(self.head_, layers)

    def fit(self, X, y=None, masks=None, *, checkpoint=None, resume=False, on_epoch=None):
        """Zero-shot without labels; with labels, trains the head (the paper's recipe, docs/method.md
        §10-§11). Returns self.

        ``y=None`` (or ``epochs=0``): nothing to learn -- ``head_`` is the given head (``head``, else
        the head stored in a visualad backbone file, else a fresh seeded head); X's form is checked,
        its images are not decoded. This makes a Detector with a fixed head usable inside
        scikit-learn model selection: e.g. ``GridSearchCV(Detector(bb, head=h, epochs=0),
        {"sigma": [...]}, scoring=visualad.scoring.image_auroc).fit(X, y)`` tunes the inference
        settings (``sigma``, ``topk_ratio``, ``threshold``, ``layers``) without training anything.

        With labels: X images in any accepted form; y 0/1 labels; masks: None or one entry per image (None, a
        path, a PIL image or an array; see visualad.training.batch_targets). AdamW with t_a/t_n at
        ``learning_rate`` and the rest at ``head_learning_rate``, weight decay 0.01, cosine annealing
        per epoch (eta_min 1e-4), t_a/t_n gradients clipped separately to norm 1, NaN steps skipped,
        ``dropout`` in SAF and SCA. Progress (running loss terms) with ``progress=True``. If
        interrupted, ``head_`` keeps the last completed step. Each call starts again from ``head``
        (or a fresh head); ``loss_and_grad`` evaluates the current ``head_``. Returns self.

        checkpoint : path, optional
            A training-state file (``.npz``) written after every epoch: head, AdamW moments, step.
        resume : bool
            Continue from ``checkpoint`` after its last epoch; the result equals an uninterrupted
            run. The state must come from the same images, layers and hyper-parameters.
        on_epoch : callable, optional
            ``on_epoch(detector, epoch)`` after each epoch (1-based count), with ``head_`` holding
            that epoch's head (e.g. to save it)."""
        from .progress import Progress
        from .training import (adamw_update, batch_targets, epoch_lr, load_training_state, loss_and_grad,
                               save_training_state, step_seed)
        if resume and checkpoint is None:
            raise ValueError("resume=True needs the checkpoint path to resume from")
        epochs = check_int(self.epochs, "epochs", 0)
        if y is None or epochs == 0:
            if y is None and masks is not None:
                raise ValueError("masks were given without labels y")
            self._model()
            self._reset_head()
            self._source(X, self._settings()[0])  # checks X's form (type, shape, NaN); images are not decoded
            self.training_history_, self.n_skipped_steps_ = [], 0
            return self
        size, layers, src, labels, buf = self._train_setup(X, y, masks, fresh_start=True)
        bs = self._batch_size()
        d = float(self.dropout)
        if not 0.0 <= d < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        topk, n = self._topk(size), len(src)
        rng = np.random.default_rng(self.random_state)
        history, skipped, first_epoch = [], 0, 0
        start_head = self.head_
        steps_per_epoch = (n + bs - 1) // bs
        run = dict(n_images=n, labels=int(labels.sum()), layers=list(layers), image_size=size, epochs=epochs,
                   batch_size=bs, learning_rate=float(self.learning_rate),
                   head_learning_rate=float(self.head_learning_rate), dropout=d, random_state=int(self.random_state),
                   missing_mask=self.missing_mask, head_floats=int(buf.params.size))
        if resume:
            first_epoch, history, skipped = load_training_state(checkpoint, buf, run)

        def publish(epochs_done):
            self.head_ = buf.to_official(start_head, layers)
            self.head_["features_list"] = list(layers)
            self.head_["image_size"] = size
            self.head_["epoch"] = epochs_done
            self._head_version = getattr(self, "_head_version", 0) + 1
            self._untrained_head = False
            self._head_trained, self._head_source_ = True, None
            self.training_history_ = history
            self.n_skipped_steps_ = skipped

        epochs_done = first_epoch
        try:
            with self._engine() as engine, Progress(epochs * steps_per_epoch, "fit", bool(self.progress)) as bar:
                bar.update(first_epoch * steps_per_epoch)
                for epoch in range(epochs):
                    if epoch < first_epoch:  # resumed: replay the shuffles of the epochs already done
                        rng.permutation(n)
                        continue
                    token_lr = epoch_lr(float(self.learning_rate), epoch, epochs)
                    head_lr = epoch_lr(float(self.head_learning_rate), epoch, epochs)
                    order = rng.permutation(n)
                    running = {}
                    for step in range(steps_per_epoch):
                        idx = np.sort(order[step * bs:(step + 1) * bs])
                        batch = np.stack([src.batch(int(i), int(i) + 1)[0] for i in idx])
                        mask_arr, has_mask = batch_targets(labels, masks, idx, size, self.missing_mask)
                        losses = loss_and_grad(engine, buf, batch, layers, labels[idx], mask_arr, has_mask,
                                               topk, d, step_seed(self.random_state, epoch, step))
                        if not all(math.isfinite(v) for v in losses.values()) or \
                                not adamw_update(buf, token_lr, head_lr, self._threads()):
                            skipped += 1
                        else:
                            history.append(dict(losses, epoch=epoch))
                            for k, v in losses.items():
                                running[k] = 0.9 * running.get(k, v) + 0.1 * v
                        bar.update(1, **{k: running[k] for k in ("total", "cls", "seg", "contrastive") if k in running})
                    epochs_done = epoch + 1
                    if checkpoint is not None:
                        save_training_state(checkpoint, buf, epochs_done, run, history, skipped)
                    if on_epoch is not None:
                        publish(epochs_done)
                        on_epoch(self, epochs_done)
        finally:
            publish(epochs_done)
        return self

    # ------------------------------------------------------------------ persistence
    def save_official_head(self, path) -> None:
        """Writes the head in the official VisualAD layout (CLIP.pth) as a torch zip that
        ``torch.load`` reads; written without PyTorch."""
        from .head import official_head
        from .checkpoint.torchzip_writer import save_torch_zip
        self._model()
        size, layers = self._settings()
        name = os.path.basename(os.fspath(self.backbone)) if isinstance(self.backbone, (str, os.PathLike)) else "custom"
        save_torch_zip(path, official_head(self.head_, layers, size, name))

    def save(self, path, include_backbone: bool = True) -> None:
        """Writes one self-describing file: backbone weights (or, with include_backbone=False, the
        path they came from), the head, and the settings. Read it with :meth:`Detector.load`."""
        from .checkpoint.detector_file import save_detector_file
        self._model()
        settings = {k: v for k, v in self.get_params().items() if k not in ("backbone", "head")}
        size, layers = self._settings()
        settings.update(image_size=size, layers=layers)
        if getattr(self, "calibration_", None) is not None:
            settings["calibration"] = self.calibration_
        backbone_path = self.backbone if isinstance(self.backbone, (str, os.PathLike)) else None
        backbone = self._fp32_backbone() if include_backbone else self._loaded_.backbone
        save_detector_file(path, backbone, self.head_, settings, backbone_path, include_backbone)

    @classmethod
    def load(cls, path, **overrides) -> "Detector":
        """A Detector from a file written by :meth:`save` (settings may be overridden).

        Its ``backbone`` is the file's path (the file brings its weights or weights reference and
        its head), so it pickles as a reference and shares the process-wide loaded backbone."""
        from .checkpoint.detector_file import is_visualad_file
        if not os.path.isfile(path):
            raise FileNotFoundError(f"detector file not found: {path}")
        if not is_visualad_file(path):
            raise CheckpointError(f"{path} is not a visualad detector file (one written by Detector.save, visualad "
                                  "train or visualad convert); to use a backbone checkpoint, give it to "
                                  "Detector(backbone=...)")
        stored = _stored_settings(path, overrides)
        settings = {k: v for k, v in stored.items() if k in cls._get_param_names()}
        settings.update(overrides)
        det = cls(os.fspath(path), **settings)
        if stored.get("calibration") is not None and "threshold" not in overrides:
            det.calibration_ = dict(stored["calibration"])
        return det

    # ------------------------------------------------------------------ maps and scores
    def _head_source(self):
        """Where ``head_`` came from, as a cache key: heads from the same source are packed once
        per loaded backbone and shared (clones). None for a head of this Detector alone (trained
        by fit, or a fresh head without a seed)."""
        if self.head is None:
            if self._loaded_.stored_head is not None:
                return ("stored",)
            if self.random_state is None:
                return None
            layers = None if self.layers is None else tuple(int(l) for l in self.layers)
            return ("fresh", layers, self.image_size, int(self.random_state))
        if isinstance(self.head, (str, os.PathLike)):
            return ("file", model_cache.file_identity(self.head))
        if not isinstance(self.head, dict):
            return None  # _load_head raises the type error
        from .checkpoint.detector_file import flatten_head
        try:
            digest = model_cache.arrays_digest(flatten_head(self.head))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None  # not a valid head: _load_head says what is wrong
        info = sorted((k, repr(v)) for k, v in self.head.items() if not isinstance(v, (dict, np.ndarray)))
        return ("arrays", digest, tuple(info))

    def _pack_head(self, layers) -> model_cache.LoadedHead:
        width = self._loaded_.backbone.width
        cfg = head_engine_config(self.head_, layers, width)
        layout, total = _engine.head_layout(cfg)
        return model_cache.LoadedHead(cfg, pack_head(self.head_, layers, width, layout, total))

    def _head_state(self, layers):
        """A C head state for the current head_ and layers for one call (context manager): shared
        packed weights when head_ is untouched from its source, this Detector's own otherwise."""
        with self._lock():
            source = self.__dict__.get("_head_source_")
            if source is not None:
                loaded = self._loaded_.head(source + (tuple(layers),), lambda: self._pack_head(layers))
            else:
                key = (getattr(self, "_head_version", 0), tuple(layers))
                own = self.__dict__.get("_own_head_")
                if own is None or own[0] != key:
                    own = self._own_head_ = (key, self._pack_head(layers))
                loaded = own[1]
        return loaded.states.state(self._threads())

    def _topk(self, size: int) -> int:
        r = float(self.topk_ratio)
        if not 0.0 < r <= 1.0:
            raise ValueError(f"topk_ratio must be in (0, 1], got {self.topk_ratio}")
        return max(1, min(size * size, math.ceil(size * size * r)))

    def _sigma(self) -> float:
        s = float(self.sigma)
        if not (math.isfinite(s) and s >= 0):
            raise ValueError(f"sigma must be a finite number >= 0, got {self.sigma}")
        return s

    def _run(self, X, keep_maps: bool, desc: str):
        """Runs backbone + head batch by batch; returns (maps or None, scores)."""
        self._model()
        size, layers = self._settings()
        topk, sigma = self._topk(size), self._sigma()
        src = self._source(X, size)
        if self._untrained_head:
            warnings.warn("no trained head: these maps and scores come from a fresh, randomly initialised "
                          "VisualAD head; give a trained one (head=..., --head, or a file written by train / "
                          "convert / Detector.save)", UntrainedHeadWarning, stacklevel=3)
        n = len(src)
        maps = np.empty((n, size, size), np.float32) if keep_maps else None
        scores = np.empty(n, np.float32)
        with self._engine() as engine, self._head_state(layers) as head_engine:
            for start, feats, ta, tn in self._encoded_batches(engine, src, layers, desc):
                final, sc, _, _ = head_engine.maps(feats, ta, tn, size, sigma, topk)
                if keep_maps:
                    maps[start:start + len(sc)] = final
                scores[start:start + len(sc)] = sc
        return maps, scores

    def maps_and_scores(self, X) -> tuple[np.ndarray, np.ndarray]:
        """``(anomaly_maps(X), anomaly_scores(X))`` from one pass of the backbone."""
        return self._run(X, True, "anomaly maps")

    def anomaly_maps(self, X) -> np.ndarray:
        """Final fused, gaussian-filtered anomaly maps, float32 (N, S, S); higher = more anomalous."""
        return self._run(X, True, "anomaly maps")[0]

    def anomaly_scores(self, X) -> np.ndarray:
        """Image scores, float32 (N,): mean of the top ceil(S*S*topk_ratio) values of each final map."""
        return self._run(X, False, "anomaly scores")[1]

    def score_samples(self, X) -> np.ndarray:
        """``-anomaly_scores(X)`` (scikit-learn outlier convention: lower = more abnormal)."""
        return -self.anomaly_scores(X)

    def decision_function(self, X) -> np.ndarray:
        """``score_samples(X) + threshold``: negative = anomaly."""
        threshold = np.float32(self._threshold())
        return self.score_samples(X) + threshold

    def _threshold(self) -> float:
        t = float(self.threshold)
        if not math.isfinite(t):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}")
        return t

    def predict(self, X) -> np.ndarray:
        """-1 for anomalies, +1 for normal images."""
        return np.where(self.decision_function(X) < 0, -1, 1).astype(int)

    # ------------------------------------------------------------------ calibration
    def calibrate(self, normal_images, max_fpr=0.01) -> "Detector":
        """Chooses ``threshold`` from images known to be normal: the smallest of their scores that
        flags at most ``max_fpr`` of them (an image is flagged when its score exceeds the
        threshold). Also records, in ``calibration_``, what :meth:`normalized_scores` and the
        overlays' common colour scale use: the normal scores' minimum and the 1st / 99.9th
        percentiles of the normal maps' pixels. Saved with :meth:`save`. Returns self."""
        fpr = float(max_fpr)
        if not 0.0 <= fpr < 1.0:
            raise ValueError(f"max_fpr must be in [0, 1), got {max_fpr}")
        maps, scores = self.maps_and_scores(normal_images)
        if len(scores) < 2:
            raise ValueError(f"calibrate needs at least 2 normal images, got {len(scores)}")
        allowed = int(math.floor(fpr * len(scores) + 1e-9))  # images that may score above the threshold
        threshold = float(np.sort(scores)[::-1][allowed])
        lo, hi = (float(v) for v in np.percentile(maps, [1.0, 99.9]))
        self.threshold = threshold
        self.calibration_ = {"n_images": int(len(scores)), "max_fpr": fpr, "threshold": threshold,
                             "score_min": float(scores.min()), "score_max": float(scores.max()),
                             "map_range": [lo, hi]}
        return self

    def normalized_scores(self, X) -> np.ndarray:
        """Image scores mapped to [0, 1] as anomalib users expect: 0.5 at ``threshold``, 0 at the
        lowest calibration score, 1 at ``threshold + (threshold - that minimum)`` and above;
        linear in between. Needs :meth:`calibrate` first."""
        return self.normalize_scores(self.anomaly_scores(X))

    def normalize_scores(self, scores) -> np.ndarray:
        """:meth:`normalized_scores` for scores already computed (e.g. by :meth:`maps_and_scores`)."""
        cal = getattr(self, "calibration_", None)
        if cal is None:
            raise ValueError("normalized scores need a calibration: call calibrate(normal_images) first")
        t = float(self.threshold)
        spread = max(t - cal["score_min"], 1e-12 * max(1.0, abs(t)))
        z = 0.5 + 0.5 * (np.asarray(scores, np.float64) - t) / spread
        return np.clip(z, 0.0, 1.0).astype(np.float32)
