"""The plan bottleneck: a linear projection of the LM's hidden state onto len(levels) dimensions,
then finite scalar quantisation (vector_quantize_pytorch.FSQ; Mentzer et al. 2023) with a
straight-through gradient. Codes lie on the FSQ grid in [-1, 1]; the codebook is implicit with
prod(levels) entries ([8, 5, 5, 5] -> 1000 ~ 2^10). With quantize=False (the `use_fsq=false` ablation)
the projection's output goes on continuous and there are no indices."""
from __future__ import annotations

import math

import torch
from torch import nn


class PlanQuantizer(nn.Module):
    def __init__(self, hidden: int, levels: tuple[int, ...], quantize: bool = True):
        super().__init__()
        from vector_quantize_pytorch import FSQ

        self.levels = tuple(int(v) for v in levels)
        self.quantize = quantize
        self.proj_in = nn.Linear(hidden, len(self.levels))
        self.fsq = FSQ(levels=list(self.levels))  # no dim: no projections inside, codes = its input width

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def dim(self) -> int:
        return len(self.levels)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h [B, N, hidden] -> (codes [B, N, len(levels)] on the grid, indices [B, N] in [0, codebook_size));
        unquantised: (the projection, None)."""
        z = self.proj_in(h)
        if not self.quantize:
            return z, None
        codes, indices = self.fsq(z.float())  # FSQ quantises in fp32
        return codes.to(h.dtype), indices
