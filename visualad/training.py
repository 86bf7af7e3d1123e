"""Training the VisualAD head (SPEC §3): targets, one loss-and-gradient pass, and the AdamW loop.

The C engine does all the numerical work: the backbone's training forward and its input-gradient
backward (``Backbone.encode_train`` / ``encode_backward``), the head's losses and gradients
(``Head.loss_and_grad``), gradient clipping and the AdamW update (``adamw_step``). This module only
moves buffers between them. The head's parameters live in one float32 buffer laid out by
``_engine.head_layout``; gradients and the two Adam moments share that layout.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from . import _engine
from .datasets import preprocess_mask
from .head import _engine_names, head_engine_config, pack_head

TOKEN_KEYS = ("anomaly_token", "normal_token")
LN_KEYS = ("ln_post.weight", "ln_post.bias")
WEIGHT_DECAY = 0.01
CLIP_NORM = 1.0
ETA_MIN = 1e-4


def check_labels(y, masks, n: int) -> np.ndarray:
    """Validates y (n labels in {0, 1}) and masks (None or n entries); returns float32 labels."""
    labels = np.asarray(y)
    if labels.shape != (n,):
        raise ValueError(f"y must have shape ({n},) (one label per image), got {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("y must hold 0 (normal) and 1 (anomalous) labels")
    if masks is not None and len(masks) != n:
        raise ValueError(f"masks must hold one entry (or None) per image: {len(masks)} for {n} images")
    return labels.astype(np.float32)


def _mask_image(m, i: int) -> Image.Image:
    if isinstance(m, (str, os.PathLike)):
        with Image.open(m) as im:
            return im.copy()
    if isinstance(m, Image.Image):
        return m
    arr = np.asarray(m)
    if arr.ndim != 2:
        raise ValueError(f"mask {i} must be 2-D, got shape {arr.shape}")
    if arr.dtype != bool and not np.isfinite(arr).all():
        raise ValueError(f"mask {i} contains NaN or Inf")
    return Image.fromarray((arr > 0).astype(np.uint8) * 255, mode="L")


def batch_targets(labels: np.ndarray, masks, idx, size: int, missing_mask: str = "skip"):
    """masks float32 (len(idx), S, S) in {0,1} and has_mask uint8 for the images `idx`.

    Each mask entry is None, a path, a PIL image or an array of any size (binarised > 0, resized
    to S x S with PIL bilinear, >= 128 anomalous). A good image without a mask counts as
    all-normal; a defective one without a mask gets has_mask = 0 with ``missing_mask="skip"`` (it
    then contributes only to the classification and contrastive terms), or an all-zero mask that
    counts in the segmentation loss with ``missing_mask="zeros"`` (the official loader's rule)."""
    idx = np.asarray(idx)
    out = np.zeros((len(idx), size, size), np.float32)
    has = (labels[idx] == 0).astype(np.uint8) if missing_mask == "skip" else np.ones(len(idx), np.uint8)
    if masks is not None:
        for j, i in enumerate(idx):
            if masks[int(i)] is not None:
                out[j] = preprocess_mask(_mask_image(masks[int(i)], int(i)), size)
                has[j] = 1
    return out, has


@dataclass
class HeadBuffers:
    """The head's parameters (packed), gradient and Adam moments, plus their C head."""

    config: dict
    layout: list
    params: np.ndarray
    engine: object
    grad: np.ndarray = field(init=False)
    exp_avg: np.ndarray = field(init=False)
    exp_avg_sq: np.ndarray = field(init=False)
    step: int = 0

    def __post_init__(self):
        self.grad = np.zeros_like(self.params)
        self.exp_avg = np.zeros_like(self.params)
        self.exp_avg_sq = np.zeros_like(self.params)
        self.offsets = {name: (offset, int(np.prod(shape))) for name, shape, offset, _panel in self.layout}

    @classmethod
    def from_head(cls, head: dict, layers: list, width: int, num_threads: int) -> "HeadBuffers":
        cfg = head_engine_config(head, layers, width)
        layout, total = _engine.head_layout(cfg)
        params = pack_head(head, layers, width, layout, total)
        return cls(cfg, layout, params, _engine.Head(cfg, params, num_threads))

    def view(self, buf: np.ndarray, name: str) -> np.ndarray:
        off, size = self.offsets[name]
        return buf[off:off + size]

    def to_official(self, head: dict, layers: list, buf: np.ndarray | None = None) -> dict:
        """A copy of `head` (official layout) holding the values of `buf` (default: the params)."""
        buf = self.params if buf is None else buf
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in head.items()}
        out["layer_transforms"] = {k: dict(v) for k, v in head["layer_transforms"].items()}
        out["cross_attn"] = dict(head["cross_attn"])
        for name, path in _engine_names(head, layers):
            if name not in self.offsets:
                continue
            node = out
            for part in path[:-1]:
                node = node[part]
            shape = np.shape(node[path[-1]])
            node[path[-1]] = self.view(buf, name).reshape(shape).copy()
        return out

    def flat_gradients(self, head: dict, layers: list) -> dict:
        """The gradient keyed by flattened official names (API.md loss_and_grad)."""
        from .savefile import flatten_head
        return {k: np.asarray(v, np.float32) for k, v in flatten_head(self.to_official(head, layers, self.grad)).items()}

    def segments(self, token_lr: float, head_lr: float) -> list:
        """AdamW groups (SPEC §3): t_a and t_n at token_lr, everything else at head_lr; wd 0.01."""
        segs = []
        for name, (off, size) in self.offsets.items():
            lr = token_lr if name in TOKEN_KEYS else head_lr
            segs.append((off, size, lr, WEIGHT_DECAY))
        return segs


def loss_and_grad(backbone_engine, buffers: HeadBuffers, batch: np.ndarray, layers: list, labels, masks, has_mask,
                  topk: int, dropout: float, seed: int) -> dict:
    """One forward/backward pass over a batch; leaves the full gradient in ``buffers.grad``."""
    p = buffers.params
    tokens = np.stack([buffers.view(p, "anomaly_token"), buffers.view(p, "normal_token")])
    ln_w, ln_b = buffers.view(p, "ln_post.weight"), buffers.view(p, "ln_post.bias")
    size = batch.shape[-1]
    feats, ta, tn = backbone_engine.encode_train(batch, layers, tokens, ln_w, ln_b)
    buffers.grad[:] = 0.0
    losses, _, dfeats, dta, dtn = buffers.engine.loss_and_grad(feats, ta, tn, size, labels, masks, has_mask, topk,
                                                              dropout=dropout, seed=seed, grad=buffers.grad)
    dtok, dlnw, dlnb = backbone_engine.encode_backward(dfeats, dta, dtn)
    buffers.view(buffers.grad, "anomaly_token")[:] += dtok[0]
    buffers.view(buffers.grad, "normal_token")[:] += dtok[1]
    buffers.view(buffers.grad, "ln_post.weight")[:] += dlnw
    buffers.view(buffers.grad, "ln_post.bias")[:] += dlnb
    return {k: float(v) for k, v in losses.items()}


def adamw_update(buffers: HeadBuffers, token_lr: float, head_lr: float, num_threads: int) -> bool:
    """Clips t_a's and t_n's gradients separately to norm 1, then one AdamW step. Returns False
    (and changes nothing) when a token gradient is NaN/Inf."""
    for key in TOKEN_KEYS:
        norm = _engine.clip_grad_norm(buffers.view(buffers.grad, key), CLIP_NORM)
        if not math.isfinite(norm):
            return False
    if not np.isfinite(buffers.grad).all():
        return False
    buffers.step += 1
    _engine.adamw_step(buffers.params, buffers.grad, buffers.exp_avg, buffers.exp_avg_sq,
                       buffers.segments(token_lr, head_lr), buffers.step, num_threads=num_threads)
    return True


def epoch_lr(base: float, epoch: int, epochs: int) -> float:
    """CosineAnnealingLR (T_max = epochs, eta_min = 1e-4) at the start of `epoch` (0-based)."""
    return float(_engine.cosine_annealing_lr(base, ETA_MIN, epoch, epochs))


def step_seed(random_state: int, epoch: int, step: int) -> int:
    """The dropout seed of one step: distinct per step, reproducible from random_state."""
    return int(np.random.SeedSequence([int(random_state) & 0xFFFFFFFF, epoch, step]).generate_state(1, np.uint64)[0])


# ------------------------------------------------------------------------ resumable training state

HISTORY_KEYS = ("epoch", "total", "cls", "seg", "contrastive")


def save_training_state(path, buffers: HeadBuffers, epochs_done: int, run: dict, history: list,
                        skipped: int) -> None:
    """Writes what resuming after ``epochs_done`` epochs needs (an ``.npz``, atomically): the packed
    head, both AdamW moments, the step count, the loss history and ``run`` (the settings that must
    match on resume)."""
    from ._files import atomic_write
    hist = np.array([[h[k] for k in HISTORY_KEYS] for h in history], np.float64).reshape(-1, len(HISTORY_KEYS))

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, params=buffers.params, exp_avg=buffers.exp_avg, exp_avg_sq=buffers.exp_avg_sq,
                     step=np.int64(buffers.step), epochs_done=np.int64(epochs_done), skipped=np.int64(skipped),
                     history=hist, run=np.array(json.dumps(run, sort_keys=True)))
    atomic_write(path, write)


def load_training_state(path, buffers: HeadBuffers, run: dict) -> tuple[int, list, int]:
    """Restores a state written by :func:`save_training_state` into ``buffers``; returns
    (epochs_done, history, skipped). Refuses a state from another run (other images, layers,
    hyper-parameters or head layout)."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            state = {k: z[k] for k in z.files}
        saved_run = json.loads(str(state["run"]))
        arrays = [state[k] for k in ("params", "exp_avg", "exp_avg_sq")]
    except FileNotFoundError:
        raise FileNotFoundError(f"training state not found: {path} (nothing to resume)") from None
    except Exception as exc:
        raise ValueError(f"{path}: not a visualad training state ({exc})") from exc
    if saved_run != json.loads(json.dumps(run, sort_keys=True)):
        diff = sorted(k for k in set(saved_run) | set(run) if saved_run.get(k) != run.get(k))
        raise ValueError(f"{path} comes from another training run (differs in {', '.join(diff)}); "
                         "train without resuming to start again")
    if any(a.dtype != np.float32 or a.shape != buffers.params.shape for a in arrays):
        raise ValueError(f"{path}: its head buffers do not fit this head")
    buffers.params[:], buffers.exp_avg[:], buffers.exp_avg_sq[:] = arrays
    buffers.step = int(state["step"])
    history = [dict(zip(HISTORY_KEYS, row)) for row in state["history"].tolist()]
    for h in history:
        h["epoch"] = int(h["epoch"])
    return int(state["epochs_done"]), history, int(state["skipped"])
