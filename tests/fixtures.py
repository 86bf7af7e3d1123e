"""Small random models for the parity tests (built by tests/reference.py) as NumPy dicts."""
import numpy as np
import torch

import reference as ref


def to_numpy(tree):
    """Nested dict/list of torch tensors -> the same structure with float32 ndarrays."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().numpy().astype(np.float32)
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_numpy(v) for v in tree]
    return tree


def random_images(batch, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


def clip_case(width, depth, patch, grid, layers, seed=0, **head_kw):
    state = ref.random_clip_state(width, depth, patch, grid, seed=seed)
    head = ref.random_head(width, layers, seed=seed + 1, **head_kw)
    return state, head
