"""The plain CLIP tower (no inserted tokens) against transformers' CLIPVisionModel."""
import numpy as np
import pytest
import torch

from conftest import rel_err
from hf_models import hf_clip_to_openai, make_hf_clip
import visualad
from visualad.backbone import build_backbone


@pytest.mark.parametrize("width,depth,patch,size,batch", [(128, 2, 14, 56, 1), (256, 3, 16, 64, 3), (128, 4, 14, 42, 2)])
def test_plain_tower_matches_transformers(width, depth, patch, size, batch):
    model = make_hf_clip(width, depth, patch, size, seed=width + depth)
    bb = build_backbone(hf_clip_to_openai(model))
    engine = visualad._engine.Backbone(bb.config, bb.params, 2)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(pixel_values=x, output_hidden_states=True).hidden_states
    ours = engine.forward(x.numpy(), list(range(depth + 1)))
    assert len(ours) == len(ref) == depth + 1
    for l in range(depth + 1):
        err = rel_err(ours[l], ref[l].numpy())
        assert err < 1e-4, f"block {l}: relative error {err:.2e}"
