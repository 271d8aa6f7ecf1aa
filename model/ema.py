"""Exponential moving average of the weights, kept as a plain copy of the model (so its state_dict
has the model's own keys and loads straight into a `VideoRobin` for sampling)."""
from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float = 0.999, warmup: bool = True):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def current_decay(self) -> float:
        # Early on the average would mostly remember the random init: ramp the decay up.
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        self.updates += 1
        ema = dict(self.module.named_parameters())
        pairs = [(ema[n], p.detach()) for n, p in model.named_parameters() if p.dtype.is_floating_point]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - d)
        ema_buffers = dict(self.module.named_buffers())
        for n, b in model.named_buffers():
            ema_buffers[n].copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates
