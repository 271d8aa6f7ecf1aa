"""RITE, the Residual Integration Transformer Encoder (our reading of the paper, which does not
publish it): the quantised plan of each patch and the continuous residual the quantiser dropped
(h - up(codes)) are projected to the DiT's width, summed, and integrated by a small transformer
encoder that is CAUSAL over patches, so that generation can run patch by patch and a patch's
condition never depends on later patches."""
from __future__ import annotations

import torch
from torch import nn


def causal_mask(n: int, device=None) -> torch.Tensor:
    """Boolean [n, n], True = blocked (a patch may not attend to later patches)."""
    return torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1)


class RITE(nn.Module):
    def __init__(self, lm_hidden: int, code_dim: int, width: int, layers: int, heads: int, max_patches: int = 1024):
        super().__init__()
        self.code_up = nn.Linear(code_dim, lm_hidden)  # codes -> the LM's space, to form the residual
        self.code_in = nn.Linear(code_dim, width)
        self.resid_in = nn.Linear(lm_hidden, width)
        self.pos = nn.Embedding(max_patches, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, codes: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """codes [B, N, code_dim], h [B, N, lm_hidden] -> plan tokens [B, N, width]."""
        n = codes.shape[1]
        residual = h - self.code_up(codes)
        x = self.code_in(codes) + self.resid_in(residual) + self.pos(torch.arange(n, device=codes.device))
        x = self.encoder(x, mask=causal_mask(n, codes.device), is_causal=True)
        return self.norm(x)


class CodeProjection(nn.Module):
    """The `use_rite=false` ablation: each patch's plan is its codes projected to the DiT's width,
    without the residual and without integration across patches."""

    def __init__(self, code_dim: int, width: int):
        super().__init__()
        self.code_in = nn.Linear(code_dim, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, codes: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.code_in(codes))
