"""Rectified-flow math for the Loc-DiT, with no parameters (the network lives in loc_dit.py).

Convention (SongBloom / DiTAR / SD3): t = 0 is data, t = 1 is noise.
    x_t = (1 - t) x0 + t eps,   target v = eps - x0 = dx_t/dt,
so sampling integrates dx/dt = v from t = 1 down to t = 0 with Euler steps."""
from __future__ import annotations

import torch


def sample_t(shape, mean: float = 0.0, std: float = 1.0, device=None, generator=None) -> torch.Tensor:
    """Logit-normal times in (0, 1): sigmoid(N(mean, std)) (SD3's choice, used by SongBloom)."""
    return torch.sigmoid(mean + std * torch.randn(shape, device=device, generator=generator))


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t [*lead] -> broadcastable against `like` [*lead, ...]."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(t.shape + (1,) * (like.dim() - t.dim()))


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps."""
    t = _expand(t, x0)
    return (1 - t) * x0 + t * eps


def target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The velocity the network regresses: v = eps - x0."""
    return eps - x0


def timesteps(steps: int, device=None) -> torch.Tensor:
    """steps + 1 times from 1 down to 0 (uniform grid)."""
    if steps < 1:
        raise ValueError(f"need at least one sampling step, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device)


def euler_step(x_t: torch.Tensor, v: torch.Tensor, t: float | torch.Tensor, t_next: float | torch.Tensor) -> torch.Tensor:
    """One Euler step of dx/dt = v from t to t_next (t_next < t while sampling)."""
    return x_t + (_expand(t_next, x_t) - _expand(t, x_t)) * v


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_u + s (v_c - v_u); scale 1 = the conditional prediction."""
    return v_uncond + scale * (v_cond - v_uncond)


def masked_mse(pred: torch.Tensor, tgt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the positions where mask is True; pred/tgt [..., C], mask [...]."""
    err = (pred - tgt).pow(2).mean(-1)
    m = mask.to(err.dtype)
    return (err * m).sum() / m.sum().clamp_min(1.0)
