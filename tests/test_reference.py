"""Self-checks of tests/reference.py against independent implementations
(transformers CLIP/DINOv2, scipy.ndimage, hand-written numpy resamplers, autograd
finite differences).  Every check here can fail."""

import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import reference as R  # noqa: E402
from hf_models import make_hf_dinov2  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

transformers = pytest.importorskip("transformers")


def _max_err(a, b):
    return float((torch.as_tensor(a) - torch.as_tensor(b)).detach().abs().max())


def _layer_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# ----------------------------------------------------------------------------------------
# CLIP tower vs transformers CLIPVisionModel
# ----------------------------------------------------------------------------------------

def _hf_clip(state, width, depth, heads, patch, grid, mlp_ratio=4):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=mlp_ratio * width, num_hidden_layers=depth,
                           num_attention_heads=heads, image_size=patch * grid, patch_size=patch,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
                           projection_dim=width // 2)
    torch.manual_seed(0)
    m = CLIPVisionModel(cfg).eval()
    sd = R.clip_to_hf(state)
    if not any(k.startswith("vision_model.") for k in m.state_dict()):   # transformers >= 5
        sd = {k[len("vision_model."):]: v for k, v in sd.items()}
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("position_ids" in k for k in missing), missing
    return m


def test_clip_tower_matches_transformers_every_block():
    W, L, P, G, H = 128, 3, 14, 5, 2
    st = R.random_clip_state(W, L, P, G, seed=1)
    m = _hf_clip(st, W, L, H, P, G)
    x = torch.randn(2, 3, P * G, P * G, generator=torch.Generator().manual_seed(3))
    ours = R.clip_tower(st, x, range(0, L + 1), heads=H)
    with torch.no_grad():
        hf = m(pixel_values=x, output_hidden_states=True)
    assert len(hf.hidden_states) == L + 1
    for l in range(L + 1):
        ref = hf.hidden_states[l]
        assert ref.abs().max() > 0.5          # activations are O(1), the check is meaningful
        assert _max_err(ours["hidden"][l], ref) < 1e-5, l
    assert _max_err(ours["final"], hf.last_hidden_state) < 1e-5
    pooled = F.layer_norm(ours["final"][:, 0], (W,), st["visual.ln_post.weight"], st["visual.ln_post.bias"], 1e-5)
    assert _max_err(pooled, hf.pooler_output) < 1e-5


def test_clip_tower_default_heads_is_width_over_64():
    W, L, P, G = 128, 2, 14, 3
    st = R.random_clip_state(W, L, P, G, seed=2)
    x = torch.randn(1, 3, P * G, P * G)
    a = R.clip_tower(st, x, [L])["final"]
    b = R.clip_tower(st, x, [L], heads=2)["final"]
    c = R.clip_tower(st, x, [L], heads=1)["final"]
    assert torch.equal(a, b)
    assert _max_err(a, c) > 1e-3


def test_clip_insert_aware_tower_matches_transformers_encoder():
    """[t_a, t_n, cls, patches], t_a/t_n/cls all with the class position (docs/method.md §2),
    run through HF's own encoder layers."""
    W, L, P, G, H = 128, 3, 14, 4, 2
    st = R.random_clip_state(W, L, P, G, seed=4)
    m = _hf_clip(st, W, L, H, P, G)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, P * G, P * G, generator=gen)
    ins = torch.randn(2, W, generator=gen)
    ours = R.clip_tower(st, x, range(L + 1), inserted=ins, heads=H)
    vm = getattr(m, "vision_model", m)
    with torch.no_grad():
        emb = vm.embeddings(x)                      # [B, 1+N, D], pos added
        cls_pos = st["visual.positional_embedding"][0]
        tok = (ins + cls_pos).unsqueeze(0).expand(2, -1, -1)
        h = torch.cat([tok, emb], 1)
        h = vm.pre_layrnorm(h)
        assert _max_err(ours["hidden"][0], h) < 1e-5
        for i, layer in enumerate(vm.encoder.layers):
            h = _layer_out(layer(h, None))
            assert _max_err(ours["hidden"][i + 1], h) < 1e-5, i
    assert ours["num_prefix"] == 3


def _np_bilinear_spec(src, out):
    """docs/method.md §2 formula: src = (dst+0.5)*(G0/g) - 0.5, negative clamped to 0, right edge
    replicated; separable.  src [G0,G0,D] -> [out,out,D]."""
    G0 = src.shape[0]
    def axis_weights(n_in, n_out):
        Wm = np.zeros((n_out, n_in))
        sc = n_in / n_out
        for d in range(n_out):
            s = max((d + 0.5) * sc - 0.5, 0.0)
            i0 = int(math.floor(s))
            t = s - i0
            i1 = min(i0 + 1, n_in - 1)
            Wm[d, i0] += 1 - t
            Wm[d, i1] += t
        return Wm
    A = axis_weights(G0, out)
    return np.einsum("ay,bx,yxd->abd", A, A, src.astype(np.float64))


@pytest.mark.parametrize("g", [3, 7, 10, 37])
def test_clip_position_resize_is_spec_bilinear(g):
    G0, D = 6, 5
    pos = torch.randn(1 + G0 * G0, D)
    got = R.clip_patch_positions(pos, g).reshape(g, g, D).numpy()
    want = _np_bilinear_spec(pos[1:].reshape(G0, G0, D).numpy(), g)
    assert np.abs(got - want).max() < 1e-5


# ----------------------------------------------------------------------------------------
# DINOv2 tower vs transformers Dinov2Model / Dinov2WithRegistersModel
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("registers,swiglu", [(0, False), (0, True), (4, False)])
def test_dinov2_tower_matches_transformers_at_518(registers, swiglu):
    W, L, H = 128, 3, 2
    st = R.random_dinov2_state(W, L, registers=registers, swiglu=swiglu, seed=7)
    if swiglu:
        assert st["blocks.0.mlp.w12.weight"].shape[0] == 2 * R.swiglu_hidden(W)
    m = make_hf_dinov2(st, W, L, H, registers=registers, swiglu=swiglu)
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(8))
    ours = R.dinov2_tower(st, x, range(L + 1), heads=H)
    with torch.no_grad():
        hf = m(pixel_values=x, output_hidden_states=True)
    assert ours["num_prefix"] == 1 + registers
    for l in range(L + 1):
        assert hf.hidden_states[l].abs().max() > 0.5
        assert _max_err(ours["hidden"][l], hf.hidden_states[l]) < 1e-5, l
    normed = F.layer_norm(ours["final"], (W,), st["norm.weight"], st["norm.bias"], 1e-6)
    assert _max_err(normed, hf.last_hidden_state) < 1e-5


def test_swiglu_hidden_rule():
    # DINOv2 SwiGLUFFNFused: (int(4*D*2/3)+7)//8*8 ; ViT-g (1536) -> 4096
    assert R.swiglu_hidden(1536) == 4096
    assert R.swiglu_hidden(64) == 176
    from transformers import Dinov2Config, Dinov2Model
    m = Dinov2Model(Dinov2Config(hidden_size=96, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=28, patch_size=14, use_swiglu_ffn=True))
    sd = m.state_dict()
    hf_h = next(v.shape[0] for k, v in sd.items() if k.endswith("mlp.gate_proj.weight") or
                k.endswith("mlp.weights_in.weight"))
    if any(k.endswith("mlp.weights_in.weight") for k in sd):
        hf_h //= 2
    assert hf_h == R.swiglu_hidden(96)


def test_dinov2_registers_resize_matches_transformers_at_other_size():
    """Register models: bicubic size=g with antialias (hub rule == HF Dinov2WithRegisters)."""
    W, L, H = 64, 2, 1
    st = R.random_dinov2_state(W, L, registers=4, seed=9)
    m = make_hf_dinov2(st, W, L, H, registers=4)
    for S in (224, 658):       # downsample (antialias matters) and upsample
        x = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(S))
        ours = R.dinov2_tower(st, x, range(L + 1), heads=H)
        with torch.no_grad():
            hf = m(pixel_values=x, output_hidden_states=True)
        for l in range(L + 1):
            assert _max_err(ours["hidden"][l], hf.hidden_states[l]) < 1e-5, (S, l)


def _cubic(t, A):
    t = abs(t)
    if t <= 1:
        return ((A + 2) * t - (A + 3)) * t * t + 1
    if t < 2:
        return (((t - 5) * t + 8) * t - 4) * A
    return 0.0


def _np_bicubic_matrix(n_in, n_out, scale, A=-0.75):
    """PyTorch bicubic (align_corners=False, no antialias): src=(d+0.5)*scale-0.5 (NOT
    clamped), taps floor(src)-1..+2 clamped to the edge."""
    Wm = np.zeros((n_out, n_in))
    for d in range(n_out):
        s = (d + 0.5) * scale - 0.5
        i0 = math.floor(s)
        t = s - i0
        for k in range(-1, 3):
            Wm[d, min(max(i0 + k, 0), n_in - 1)] += _cubic(t - k, A)
    return Wm


def _np_aa_matrix(n_in, n_out, A=-0.5):
    """PyTorch antialiased bicubic (PIL-style): support 2*max(scale,1), taps truncated at
    the borders and the weights renormalised."""
    scale = n_in / n_out
    sup_scale = max(scale, 1.0)
    support = 2.0 * sup_scale
    Wm = np.zeros((n_out, n_in))
    for d in range(n_out):
        center = scale * (d + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in)
        w = np.array([_cubic((j - center + 0.5) / sup_scale, A) for j in range(xmin, xmax)])
        Wm[d, xmin:xmax] = w / w.sum()
    return Wm


@pytest.mark.parametrize("g", [16, 24, 40, 50])
def test_dinov2_offset_resize_rule(g):
    """No-register models: bicubic A=-0.75, scale_factor (g+0.1)/G0 -> the sampling step
    is G0/(g+0.1), not G0/g (facebookresearch/dinov2 interpolate_offset=0.1)."""
    G0, D = 37, 3
    pe = torch.randn(1, 1 + G0 * G0, D)
    got = R.dinov2_patch_positions(pe, g, registers=0).reshape(g, g, D).numpy()
    Am = _np_bicubic_matrix(G0, g, G0 / (g + 0.1))
    want = np.einsum("ay,bx,yxd->abd", Am, Am, pe[0, 1:].reshape(G0, G0, D).numpy().astype(np.float64))
    assert np.abs(got - want).max() < 1e-4
    # and it is really different from the size=g rule
    Bm = _np_bicubic_matrix(G0, g, G0 / g)
    other = np.einsum("ay,bx,yxd->abd", Bm, Bm, pe[0, 1:].reshape(G0, G0, D).numpy().astype(np.float64))
    assert np.abs(got - other).max() > 1e-3


@pytest.mark.parametrize("g", [16, 30, 40, 74])
def test_dinov2_register_resize_rule_is_pil_bicubic(g):
    """Register models: F.interpolate(bicubic, antialias=True) == PIL-style kernel A=-0.5
    (also when upsampling)."""
    G0, D = 37, 3
    pe = torch.randn(1, 1 + G0 * G0, D)
    got = R.dinov2_patch_positions(pe, g, registers=4).reshape(g, g, D).numpy()
    Am = _np_aa_matrix(G0, g)
    want = np.einsum("ay,bx,yxd->abd", Am, Am, pe[0, 1:].reshape(G0, G0, D).numpy().astype(np.float64))
    assert np.abs(got - want).max() < 1e-4


def test_dinov2_insert_aware_tower_matches_transformers_layers():
    """[t_a, t_n, cls, reg, patches]: t_a, t_n with the cls position, registers none."""
    W, L, H = 64, 2, 1
    st = R.random_dinov2_state(W, L, registers=4, seed=11)
    m = make_hf_dinov2(st, W, L, H, registers=4, image_size=518)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(1, 3, 518, 518, generator=gen)
    ins = torch.randn(2, W, generator=gen)
    ours = R.dinov2_tower(st, x, range(L + 1), inserted=ins, heads=H)
    assert ours["num_prefix"] == 3 + 4
    with torch.no_grad():
        emb = m.embeddings(x)                                   # [cls, reg, patches]
        cls_pos = st["pos_embed"][0, 0]
        h = torch.cat([(ins + cls_pos).unsqueeze(0), emb], 1)
        assert _max_err(ours["hidden"][0], h) < 1e-6
        for i, layer in enumerate(m.encoder.layer):
            h = _layer_out(layer(h))
            assert _max_err(ours["hidden"][i + 1], h) < 1e-5, i


# ----------------------------------------------------------------------------------------
# gaussian filter vs scipy
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,sigma", [((518, 518), 4.0), ((37, 50), 4.0), ((10, 7), 4.0),
                                         ((3, 64, 40), 1.5), ((1, 5), 2.0), ((33, 33), 4)])
def test_gaussian_filter_matches_scipy(shape, sigma):
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    got = R.gaussian_filter_ref(torch.from_numpy(x), sigma).numpy()
    if len(shape) == 3:
        want = np.stack([gaussian_filter(x[i], sigma=sigma) for i in range(shape[0])])
    else:
        want = gaussian_filter(x, sigma=sigma)
    assert want.dtype == np.float32 and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-6 * max(1.0, np.abs(x).max())


def test_gaussian_kernel_radius():
    k = R.gaussian_kernel1d(4.0)
    assert k.numel() == 33 and abs(float(k.sum()) - 1) < 1e-15


# ----------------------------------------------------------------------------------------
# the head
# ----------------------------------------------------------------------------------------

def _small_clip(seed=0, W=64, L=3, P=14, G=4):
    return R.random_clip_state(W, L, P, G, seed=seed)


def test_topk_count():
    assert R.topk_count(518, 0.01) == 2684
    assert R.topk_count(56, 0.01) == 32            # 31.36 -> 32


def test_encode_uses_final_block_tokens_and_head_ln_post():
    st = _small_clip()
    head = R.random_head(64, [1], seed=1)
    x = torch.randn(2, 3, 56, 56)
    enc = R.visualad_encode("clip", st, head, x, [1])
    tw = R.clip_tower(st, x, [1, 3], inserted=torch.stack([head["anomaly_token"], head["normal_token"]]))
    ln = lambda t: F.layer_norm(t, (64,), head["ln_post_weight"], head["ln_post_bias"], 1e-5)
    assert torch.allclose(enc["anomaly_token"], ln(tw["final"])[:, 0])
    assert torch.allclose(enc["normal_token"], ln(tw["final"])[:, 1])
    assert torch.allclose(enc["layers"][1], ln(tw["hidden"][1])[:, 3:])
    assert enc["layers"][1].shape == (2, 16, 64)
    # block-1 tokens would differ
    assert _max_err(ln(tw["hidden"][1])[:, 0], enc["anomaly_token"]) > 1e-2


def _manual_sca(prm, token, P):
    """Loop-per-anchor restatement of docs/method.md §5 (written differently on purpose)."""
    B, N, D = P.shape
    E = prm["pos_encoding"][0, :N]
    out = []
    for b in range(B):
        K = F.layer_norm((P[b] + E) @ prm["k_proj.weight"].T, (D,), prm["k_norm.weight"], prm["k_norm.bias"])
        V = P[b] @ prm["v_proj.weight"].T
        gate = torch.sigmoid(prm["gate.0.weight"] @ token[b] + prm["gate.0.bias"])
        acc = torch.zeros(D)
        for i in range(prm["anchor_queries"].shape[0]):
            q = F.layer_norm(prm["q_proj.weight"] @ prm["anchor_queries"][i], (D,), prm["q_norm.weight"],
                             prm["q_norm.bias"])
            a = torch.softmax(K @ q / math.sqrt(D), 0)
            acc = acc + gate[i] * (a @ V)
        out.append(token[b] + prm["res_scale"][0] * (prm["out_proj.weight"] @ acc + prm["out_proj.bias"]))
    return torch.stack(out)


def test_sca_against_loop_restatement():
    head = R.random_head(32, [6], seed=3)
    prm = R._sca_params(head, 6)
    gen = torch.Generator().manual_seed(1)
    tok, P = torch.randn(3, 32, generator=gen), torch.randn(3, 20, 32, generator=gen)
    got = R.sca(prm, tok, P)
    assert _max_err(got, _manual_sca(prm, tok, P)) < 1e-5
    assert _max_err(got, tok) > 0.05               # the SCA path is not negligible
    with pytest.raises(ValueError):
        R.sca(prm, tok, torch.randn(1, 1537, 32))


def test_maps_pipeline_and_sca_optional():
    st = _small_clip(seed=5)
    layers = [1, 2, 3]
    head = R.random_head(64, layers, seed=6)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    out = R.visualad_maps("clip", st, head, x, layers)
    S = 56
    assert out["final"].shape == (2, S, S) and out["scores"].shape == (2,)
    fused = sum(out["layer_maps"][l] for l in layers)
    assert torch.allclose(out["fused"], fused, atol=1e-6)
    assert out["fused"].abs().max() <= len(layers) * 2 + 1e-4
    # scores = top-k mean of the filtered map
    k = R.topk_count(S, 0.01)
    want = torch.sort(out["final"].reshape(2, -1), dim=1, descending=True).values[:, :k].mean(1)
    assert torch.allclose(out["scores"], want)
    # the per-layer map is cos(SAF(P), ta') - cos(SAF(P), tn') upsampled
    enc = out["encode"]
    l = 2
    ta, tn = out["tokens"][l]
    Ph = R.saf(head["layer_transforms"]["layer_2"], enc["layers"][l])
    s = (F.cosine_similarity(Ph, ta[:, None], dim=2) - F.cosine_similarity(Ph, tn[:, None], dim=2))
    up = F.interpolate(s.reshape(2, 1, 4, 4), size=(S, S), mode="bilinear", align_corners=False)[:, 0]
    assert _max_err(up, out["layer_maps"][l]) < 1e-5
    # head without SCA on the last layer: its tokens pass unchanged, others still change
    head2 = R.random_head(64, layers, seed=6, sca_layers=layers[:-1])
    out2 = R.visualad_maps("clip", st, head2, x, layers)
    assert torch.equal(out2["tokens"][3][0], out2["encode"]["anomaly_token"])
    assert _max_err(out2["tokens"][1][0], out2["encode"]["anomaly_token"]) > 1e-2
    assert torch.allclose(out2["layer_maps"][1], out["layer_maps"][1])
    assert _max_err(out2["layer_maps"][3], out["layer_maps"][3]) > 1e-3


def test_dinov2_maps_patch_start_after_registers():
    W = 64
    st = R.random_dinov2_state(W, 2, patch=14, grid=4, registers=2, seed=3)
    head = R.random_head(W, [1, 2], seed=4)
    x = torch.randn(1, 3, 56, 56)
    enc = R.visualad_encode("dinov2", st, head, x, [1, 2])
    assert enc["patch_start"] == 5 and enc["layers"][2].shape == (1, 16, W)
    tw = R.dinov2_tower(st, x, [2], inserted=torch.stack([head["anomaly_token"], head["normal_token"]]))
    ln = F.layer_norm(tw["hidden"][2], (W,), head["ln_post_weight"], head["ln_post_bias"], 1e-6)
    assert torch.allclose(enc["layers"][2], ln[:, 5:])
    out = R.visualad_maps("dinov2", st, head, x, [1, 2])
    assert torch.isfinite(out["final"]).all()


# ----------------------------------------------------------------------------------------
# losses and gradients
# ----------------------------------------------------------------------------------------

def test_focal_and_dice_formulas():
    p = torch.tensor([[[0.9, 0.2], [0.4, 0.7]]])
    gt = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    pt = torch.tensor([0.9 * (1 - 1e-5) + 0.1 * 1e-5, 0.8 * (1 - 1e-5) + 0.2 * 1e-5,
                       0.4 * (1 - 1e-5) + 0.6 * 1e-5, 0.3 * (1 - 1e-5) + 0.7 * 1e-5]) + 1e-5
    want = (-(1 - pt) ** 2 * torch.log(pt)).mean()
    assert abs(float(R.focal_loss(p, gt)) - float(want)) < 1e-6
    dice = 1 - (2 * (0.9 + 0.4) + 1) / (2.2 + 2 + 1)
    assert abs(float(R.dice_loss(p, gt)) - dice) < 1e-6


def _loss_setup(seed=0):
    st = _small_clip(seed=seed, L=2)
    layers = [1, 2]
    head = R.random_head(64, layers, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(2, 3, 56, 56, generator=gen)
    masks = torch.zeros(2, 56, 56)
    masks[0, 10:30, 20:40] = 1
    labels = torch.tensor([1.0, 0.0])
    return st, layers, head, x, labels, masks


def test_losses_backward_reaches_every_head_tensor():
    st, layers, head, x, labels, masks = _loss_setup()
    th = R.head_to_torch(head, requires_grad=True)
    losses = R.visualad_losses("clip", st, th, x, labels, masks, layers)
    assert set(losses) == {"cls", "seg", "contrastive", "total"}
    assert float(losses["contrastive"].detach()) >= 0
    assert abs(float(losses["total"].detach()) - sum(float(losses[k].detach()) for k in ("cls", "seg", "contrastive"))) < 1e-5
    losses["total"].backward()
    grads = R.head_grads(th)
    assert "cross_attn.layer_attentions.layer_1.q_proj.weight" in grads
    assert "layer_transforms.layer_2.mlp.0.weight" in grads
    for k, gr in grads.items():
        assert torch.isfinite(gr).all(), k
        if k.endswith("pos_encoding"):
            assert gr[0, :16].abs().sum() > 0 and gr[0, 16:].abs().sum() == 0
        else:
            assert gr.abs().sum() > 0, k


def test_token_gradient_matches_finite_difference():
    """The gradient through the frozen backbone to t_a (directional derivative check)."""
    st, layers, head, x, labels, masks = _loss_setup(seed=3)
    th = R.head_to_torch(head, requires_grad=True)
    R.visualad_losses("clip", st, th, x, labels, masks, layers)["total"].backward()
    for name in ("anomaly_token", "normal_token", "ln_post_weight"):
        gr = th[name].grad.clone()
        d = gr / gr.norm()
        h = 1e-2
        def f(sign):
            h2 = R.head_to_torch(head, requires_grad=False)
            h2[name] = h2[name] + sign * h * d
            with torch.no_grad():
                return float(R.visualad_losses("clip", st, h2, x, labels, masks, layers)["total"])
        fd = (f(1) - f(-1)) / (2 * h)
        assert abs(fd - float(gr.norm())) < 0.05 * float(gr.norm()) + 1e-3, (name, fd, float(gr.norm()))


def test_train_step_updates_and_clips():
    st, layers, head, x, labels, masks = _loss_setup(seed=5)
    th = R.head_to_torch(head, requires_grad=True)
    opt = R.make_optimizer(th)
    sched = R.make_scheduler(opt, epochs=2)
    assert [g["lr"] for g in opt.param_groups][:3] == [1e-3, 1e-3, 1e-4]
    before = {k: v.detach().clone() for k, v in R.flatten_head(th).items()}
    out = R.train_step("clip", st, th, opt, x, labels, masks, layers)
    assert out is not None and np.isfinite(out["total"])
    for k in ("anomaly_token", "normal_token"):
        assert float(th[k].grad.norm()) <= 1.0 + 1e-5
    after = R.flatten_head(th)
    assert all(not torch.equal(before[k], after[k].detach()) for k in ("anomaly_token", "ln_post_bias",
               "cross_attn.layer_attentions.layer_2.res_scale", "layer_transforms.layer_1.mlp.3.bias"))
    sched.step()
    assert abs(opt.param_groups[0]["lr"] - (1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi / 2)))) < 1e-12
    assert abs(opt.param_groups[3]["lr"] - 1e-4) < 1e-12


# ----------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------

def test_preprocess_reference():
    from PIL import Image
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    for fam, mean, std in (("clip", R.CLIP_MEAN, R.CLIP_STD), ("dinov2", R.DINOV2_MEAN, R.DINOV2_STD)):
        got = R.preprocess_reference(img, 28, fam)
        assert got.shape == (3, 28, 28) and got.dtype == np.float32
        rs = np.array(img.resize((28, 28), Image.BICUBIC)).astype(np.float32) / np.float32(255)
        want = (rs.transpose(2, 0, 1) - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]
        assert np.abs(got - want).max() < 1e-6
    # grey images are converted to RGB
    assert R.preprocess_reference(img.convert("L"), 14, "clip").shape == (3, 14, 14)


def test_preprocess_mask_reference():
    from PIL import Image
    m = np.zeros((40, 40), np.uint8)
    m[10:20, 10:30] = 1                # any non-zero value is anomalous
    out = R.preprocess_mask_reference(Image.fromarray(m), 20)
    assert out.shape == (20, 20) and set(np.unique(out)) == {0.0, 1.0}
    assert out[7, 10] == 1 and out[0, 0] == 0
