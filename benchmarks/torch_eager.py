"""The same models in PyTorch eager, built the way the public VisualAD release builds them
(OpenAI-CLIP style blocks with nn.MultiheadAttention), for speed comparisons only."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * d, d))]))
        self.ln_2 = nn.LayerNorm(d)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ClipVisualADTower(nn.Module):
    """OpenAI CLIP vision tower with [t_a, t_n, cls, patches] and the class position for the tokens."""

    def __init__(self, width, depth, patch, grid):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(1 + grid * grid, width))
        self.ln_pre = nn.LayerNorm(width)
        self.resblocks = nn.ModuleList([Block(width, width // 64) for _ in range(depth)])
        self.ln_post = nn.LayerNorm(width)
        self.anomaly_token = nn.Parameter(torch.zeros(width))
        self.normal_token = nn.Parameter(torch.zeros(width))
        self.grid = grid

    @classmethod
    def from_openai(cls, sd: dict, head: dict | None = None):
        t = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in sd.items() if not isinstance(v, dict)}
        w = t["visual.conv1.weight"]
        width, patch = w.shape[0], w.shape[-1]
        grid = int(round((t["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        depth = len({k.split(".")[3] for k in t if k.startswith("visual.transformer.resblocks.")})
        m = cls(width, depth, patch, grid)
        own = {"conv1.weight": t["visual.conv1.weight"], "class_embedding": t["visual.class_embedding"],
               "positional_embedding": t["visual.positional_embedding"],
               "ln_pre.weight": t["visual.ln_pre.weight"], "ln_pre.bias": t["visual.ln_pre.bias"],
               "ln_post.weight": t["visual.ln_post.weight"], "ln_post.bias": t["visual.ln_post.bias"],
               "anomaly_token": torch.randn(width) * 0.01, "normal_token": torch.randn(width) * 0.01}
        for i in range(depth):
            p = f"visual.transformer.resblocks.{i}."
            q = f"resblocks.{i}."
            own[q + "attn.in_proj_weight"] = t[p + "attn.in_proj_weight"]
            own[q + "attn.in_proj_bias"] = t[p + "attn.in_proj_bias"]
            own[q + "attn.out_proj.weight"] = t[p + "attn.out_proj.weight"]
            own[q + "attn.out_proj.bias"] = t[p + "attn.out_proj.bias"]
            for a in ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj"):
                own[q + a + ".weight"] = t[p + a + ".weight"]
                own[q + a + ".bias"] = t[p + a + ".bias"]
        if head is not None:
            own["anomaly_token"] = torch.from_numpy(np.asarray(head["anomaly_token"], np.float32))
            own["normal_token"] = torch.from_numpy(np.asarray(head["normal_token"], np.float32))
            own["ln_post.weight"] = torch.from_numpy(np.asarray(head["ln_post_weight"], np.float32))
            own["ln_post.bias"] = torch.from_numpy(np.asarray(head["ln_post_bias"], np.float32))
        m.load_state_dict(own)
        return m.eval()

    def forward(self, x, layers):
        B = x.shape[0]
        x = self.conv1(x).flatten(2).transpose(1, 2)
        g = int(round(int(x.shape[1]) ** 0.5))  # int(): a constant when traced (ONNX export)
        pos = self.positional_embedding
        patch_pos = pos[1:]
        if g != self.grid:
            pp = patch_pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(pp, (g, g), mode="bilinear").flatten(2).transpose(1, 2)[0]
        toks = torch.stack([self.anomaly_token, self.normal_token, self.class_embedding]) + pos[:1]
        x = torch.cat([toks.unsqueeze(0).expand(B, -1, -1), x + patch_pos], 1)
        x = self.ln_pre(x)
        outs = []
        for i, blk in enumerate(self.resblocks):
            x = blk(x)
            if i + 1 in layers:
                outs.append(self.ln_post(x)[:, 3:])
        fin = self.ln_post(x[:, :2])
        return outs, fin[:, 0], fin[:, 1]


def clip_flops(width, depth, patch, size, batch, n_tokens=3):
    """Multiply-adds x 2 of the tower's GEMMs and attention products."""
    g = size // patch
    T = g * g + n_tokens
    D = width
    per_block = 2 * T * D * 3 * D + 2 * T * D * D + 2 * 2 * T * D * 4 * D + 2 * 2 * T * T * D
    embed = 2 * g * g * D * 3 * patch * patch
    return batch * (depth * per_block + embed)
