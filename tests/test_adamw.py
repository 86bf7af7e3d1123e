"""AdamW, clipping and the cosine schedule (docs/method.md §11) against torch.optim.AdamW.

Ten steps over three epochs from the same start with fixed random gradients: the published
groups (lr 1e-3 for t_a and t_n, 1e-4 for ln_post / SAF / SCA, weight decay 0.01, betas
(0.9, 0.999), eps 1e-8), separate norm clipping of the t_a and t_n gradients to 1.0, cosine
annealing per epoch (T_max = epochs, eta_min = 1e-4). Every parameter within 1e-5."""
import math

import numpy as np
import pytest
import torch

import reference as ref
from fixtures import to_numpy
from visualad import _engine
from visualad.head import _engine_names, head_engine_config, pack_head, validate_head

LR, ETA_MIN, WD = 1e-3, 1e-4, 0.01
TOKENS = ("anomaly_token", "normal_token")


def setup(D=16, layers=(1, 2), seed=0):
    layers = list(layers)
    head = validate_head(to_numpy(ref.random_head(D, layers, max_patches=20, seed=seed)), D)
    cfg = head_engine_config(head, layers, D)
    layout, total = _engine.head_layout(cfg)
    params = pack_head(head, layers, D, layout, total)
    return head, layers, cfg, layout, total, params


def official_key(head, layers):
    return {name: ".".join(path) for name, path in _engine_names(head, layers)}


def segments(layout, key, epoch, epochs):
    """Our per-tensor lr table for one epoch (each tensor its own segment)."""
    lr_tok = _engine.cosine_annealing_lr(LR, ETA_MIN, epoch, epochs)
    lr_rest = _engine.cosine_annealing_lr(LR * 0.1, ETA_MIN, epoch, epochs)
    return [(off, int(np.prod(shape)), lr_tok if key[name] in TOKENS else lr_rest, WD)
            for name, shape, off, _panel in layout]


def test_ten_steps_match_torch_adamw():
    head, layers, cfg, layout, total, params = setup()
    key = official_key(head, layers)
    head_t = ref.head_to_torch(head)
    flat_t = ref.flatten_head(head_t)
    opt = ref.make_optimizer(head_t, lr=LR, weight_decay=WD)
    epochs, steps_per_epoch = 3, 4
    sched = ref.make_scheduler(opt, epochs, lr=LR)
    m = np.zeros(total, np.float32)
    v = np.zeros(total, np.float32)
    rng = np.random.default_rng(1)
    clipped = 0
    for step in range(1, 11):
        epoch = (step - 1) // steps_per_epoch
        grads = np.empty(total, np.float32)
        for name, shape, off, _panel in layout:
            n = int(np.prod(shape))
            # token gradients sometimes above, sometimes below the clipping norm
            scale = (1.5 if step % 2 else 0.05) if key[name] in TOKENS else 0.3
            grads[off:off + n] = rng.standard_normal(n).astype(np.float32) * scale
        # torch: the same gradients on the official tensors, clip t_a / t_n separately, step
        opt.zero_grad(set_to_none=True)
        for name, shape, off, _panel in layout:
            t = flat_t[key[name]]
            t.grad = torch.from_numpy(grads[off:off + int(np.prod(shape))].copy()).reshape(t.shape)
        assert ref.clip_token_grads(head_t, 1.0)
        opt.step()
        # ours
        for name, shape, off, _panel in layout:
            if key[name] in TOKENS:
                norm = _engine.clip_grad_norm(grads[off:off + int(np.prod(shape))], 1.0)
                clipped += norm > 1.0
        _engine.adamw_step(params, grads, m, v, segments(layout, key, epoch, epochs), step, num_threads=2)
        if step % steps_per_epoch == 0:
            sched.step()
        # the schedules agree
        for group in opt.param_groups[:1]:
            assert abs(group["lr"] - _engine.cosine_annealing_lr(LR, ETA_MIN, step // steps_per_epoch, epochs)) < 1e-12
    assert clipped >= 5
    worst = 0.0
    moved = 0
    start = pack_head(head, layers, 16, layout, total)
    for name, shape, off, _panel in layout:
        n = int(np.prod(shape))
        want = flat_t[key[name]].detach().numpy().ravel()
        err = np.abs(params[off:off + n] - want).max()
        worst = max(worst, float(err))
        assert err < 1e-5, (name, err)
        moved += np.abs(params[off:off + n] - start[off:off + n]).max() > 1e-4
    assert moved == len(layout)  # every tensor was updated
    assert worst < 1e-5


def test_adamw_is_thread_independent_and_respects_segments():
    head, layers, cfg, layout, total, params = setup(seed=3)
    rng = np.random.default_rng(4)
    grads = rng.standard_normal(total).astype(np.float32)
    outs = []
    for threads in (1, 4):
        p = params.copy()
        m = np.zeros(total, np.float32)
        v = np.zeros(total, np.float32)
        # only the second half is covered by a segment
        _engine.adamw_step(p, grads, m, v, [(total // 2, total - total // 2, 1e-3, 0.01)], 1, num_threads=threads)
        outs.append(p)
        np.testing.assert_array_equal(p[:total // 2], params[:total // 2])
        assert (m[:total // 2] == 0).all() and (m[total // 2:] != 0).any()
    np.testing.assert_array_equal(outs[0], outs[1])


def test_clip_grad_norm_matches_torch():
    rng = np.random.default_rng(5)
    for scale in (0.01, 0.3, 3.0, 100.0):
        g = (rng.standard_normal(50) * scale).astype(np.float32)
        t = torch.zeros(50, requires_grad=True)
        t.grad = torch.from_numpy(g.copy())
        want_norm = float(torch.nn.utils.clip_grad_norm_([t], max_norm=1.0))
        norm = _engine.clip_grad_norm(g, 1.0)
        assert abs(norm - want_norm) < 1e-5 * want_norm
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-6, atol=1e-8)
    bad = np.array([1.0, np.nan], np.float32)
    assert math.isnan(_engine.clip_grad_norm(bad, 1.0))
    with pytest.raises(TypeError):
        _engine.clip_grad_norm(np.zeros(4, np.float64), 1.0)
    with pytest.raises(TypeError):
        _engine.clip_grad_norm(np.zeros(8, np.float32)[::2], 1.0)  # not contiguous: no silent copy


def test_head_sees_parameters_updated_in_place():
    """The Head keeps a pointer to the params buffer: an AdamW step on it changes the maps."""
    head, layers, cfg, layout, total, params = setup(D=32, seed=6)
    eng = _engine.Head(cfg, params, 1)
    rng = np.random.default_rng(7)
    feats = [rng.standard_normal((1, 16, 32)).astype(np.float32) for _ in layers]
    ta = rng.standard_normal((1, 32)).astype(np.float32)
    tn = rng.standard_normal((1, 32)).astype(np.float32)
    before = eng.maps(feats, ta, tn, 28, 0.0, 8)[0]
    grads = rng.standard_normal(total).astype(np.float32)
    _engine.adamw_step(params, grads, np.zeros(total, np.float32), np.zeros(total, np.float32),
                       [(0, total, 1e-2, 0.01)], 1)
    after = eng.maps(feats, ta, tn, 28, 0.0, 8)[0]
    fresh = _engine.Head(cfg, params.copy(), 1).maps(feats, ta, tn, 28, 0.0, 8)[0]
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_array_equal(after, fresh)


def test_adamw_bad_arguments():
    p = np.zeros(10, np.float32)
    with pytest.raises(ValueError):
        _engine.adamw_step(p, p.copy(), p.copy(), p.copy(), [(5, 6, 1e-3, 0.0)], 1)
    with pytest.raises(ValueError):
        _engine.adamw_step(p, p.copy(), p.copy(), p.copy(), [(0, 10, 1e-3, 0.0)], 0)
    with pytest.raises(ValueError):
        _engine.adamw_step(p, np.zeros(9, np.float32), p.copy(), p.copy(), [(0, 9, 1e-3, 0.0)], 1)
    with pytest.raises(TypeError):
        _engine.adamw_step(p, p.copy(), np.zeros(10), p.copy(), [(0, 10, 1e-3, 0.0)], 1)
    with pytest.raises(TypeError):
        _engine.adamw_step(p, p.copy(), p.copy(), p.copy(), [(0, 10)], 1)
