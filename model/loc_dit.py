"""Loc-DiT: the per-patch refinement network (network only; the flow math is in flow.py).

Following SongBloom's local DiT: a small NON-causal transformer over the tokens
    [time, plan, previous clean patch (P frames), noisy patch (P frames)]
with the velocity read off the last P positions. Frames are projected from the latent channels;
learned position and type embeddings; the output projection is zero-initialised, so an untrained
head predicts v = 0. Padded frames (frame masks False) are excluded as attention keys."""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as in DiT) -> [*, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


class LocDiT(nn.Module):
    def __init__(self, channels: int, patch: int, width: int, layers: int, heads: int):
        super().__init__()
        self.channels, self.patch, self.width = channels, patch, width
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.plan_in = nn.Linear(width, width)
        self.clean_in = nn.Linear(channels, width)
        self.noisy_in = nn.Linear(channels, width)
        self.pos = nn.Parameter(torch.zeros(2 + 2 * patch, width))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, t: torch.Tensor, plan: torch.Tensor, prev: torch.Tensor, noisy: torch.Tensor,
                prev_mask: torch.Tensor | None = None, noisy_mask: torch.Tensor | None = None) -> torch.Tensor:
        """t [M], plan [M, width], prev / noisy [M, P, C], masks [M, P] (True = real frame)
        -> velocity [M, P, C]."""
        m, p = noisy.shape[:2]
        tokens = torch.cat([
            self.time_mlp(timestep_embedding(t, self.width).to(noisy.dtype))[:, None],
            self.plan_in(plan)[:, None],
            self.clean_in(prev),
            self.noisy_in(noisy),
        ], dim=1) + self.pos[: 2 + 2 * p]
        pad = None
        if prev_mask is not None or noisy_mask is not None:
            ones = torch.ones(m, p, dtype=torch.bool, device=noisy.device)
            keep = torch.cat([torch.ones(m, 2, dtype=torch.bool, device=noisy.device),
                              ones if prev_mask is None else prev_mask.bool(),
                              ones if noisy_mask is None else noisy_mask.bool()], dim=1)
            pad = ~keep  # the time and plan tokens are always kept, so no row is fully masked
        x = self.encoder(tokens, src_key_padding_mask=pad)
        return self.out(self.norm(x[:, -p:]))
