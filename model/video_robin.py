"""Video-Robin assembled: AR-Head (LM + FSQ + RITE) plans each latent patch, the Loc-DiT denoises it
with rectified flow. Training loss, KV-cached generation, the t2m -> v2m hand-off, freezing, sizes.

Shapes: latents [B, C, T] in the VAE's scale outside, normalised per channel (latent_mean /
latent_std buffers) inside; patches [B, N, P, C] with N = T / P."""
from __future__ import annotations

import math

import torch
from torch import nn

from model import flow
from model.ar_head import ARHead
from model.config import VideoRobinConfig
from model.loc_dit import LocDiT


def to_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, T] (T a multiple of patch) -> [B, T / patch, patch, C]."""
    b, c, t = x.shape
    return x.transpose(1, 2).reshape(b, t // patch, patch, c)


def pad_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Crop or zero-pad the last axis to `frames`."""
    if x.shape[-1] >= frames:
        return x[..., :frames]
    return torch.nn.functional.pad(x, (0, frames - x.shape[-1]))


class VideoRobin(nn.Module):
    def __init__(self, cfg: VideoRobinConfig, vocab_size: int, load_pretrained: bool = True):
        """load_pretrained=False skips reading `lm_init`'s weights (its config is still read): for
        building a model that a checkpoint is about to fill."""
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.head = ARHead(cfg, vocab_size, load_pretrained)
        self.dit = LocDiT(cfg.latent_channels, cfg.patch, cfg.dit_hidden, cfg.dit_layers, cfg.dit_heads)
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    # -- latent statistics ----------------------------------------------------------------------

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != self.latent_mean.shape or std.shape != self.latent_std.shape:
            raise ValueError(f"latent stats must be [{self.cfg.latent_channels}]; got {list(mean.shape)}, {list(std.shape)}")
        if not torch.isfinite(std).all() or (std <= 0).any():
            raise ValueError("latent std must be finite and positive")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    def normalise(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent - self.latent_mean[:, None]) / self.latent_std[:, None]

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.latent_std[:, None] + self.latent_mean[:, None]

    # -- conditions -----------------------------------------------------------------------------

    def _rhythm_patches(self, rhythm: torch.Tensor | None, b: int, frames: int, device) -> torch.Tensor | None:
        if not self.cfg.use_rhythm:
            return None
        if rhythm is None:  # absent = the dropped condition (zeros)
            rhythm = torch.zeros(b, self.cfg.rhythm_channels, frames, device=device)
        return to_patches(pad_frames(rhythm.to(device).float(), frames), self.cfg.patch)

    # -- training -------------------------------------------------------------------------------

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Flow-matching MSE over the real frames of a batch (see the trainer's loader for the keys).
        Randomness (condition dropout, t, noise) comes from the torch global RNG."""
        cfg, dev = self.cfg, self.latent_mean.device
        p = cfg.patch
        latent = batch["latent"].to(dev).float()
        b, _, t_len = latent.shape
        frames = math.ceil(t_len / p) * p
        fmask = pad_frames(batch["latent_mask"].to(dev).bool(), frames)
        x0 = to_patches(pad_frames(self.normalise(latent), frames) * fmask[:, None], p)  # [B, N, P, C]
        fm = fmask.view(b, -1, p)  # [B, N, P]
        n = x0.shape[1]

        video = video_mask = rhythm = None
        drop_video = torch.zeros(b, dtype=torch.bool, device=dev)
        if cfg.use_video or cfg.use_rhythm:
            if self.training and cfg.p_drop_video > 0:
                drop_video = torch.rand(b, device=dev) < cfg.p_drop_video
        if cfg.use_video:
            video = batch["video"].to(dev).float()
            video_mask = batch.get("video_mask")
            video_mask = torch.ones(video.shape[:2], dtype=torch.bool, device=dev) if video_mask is None else video_mask.to(dev).bool()
            video_mask = video_mask & ~drop_video[:, None]
        if cfg.use_rhythm:
            rhythm = self._rhythm_patches(batch.get("rhythm"), b, frames, dev)
            rhythm = rhythm * (~drop_video).to(rhythm.dtype)[:, None, None, None]

        plan, idx = self.head(batch["text_ids"].to(dev), batch["text_mask"].to(dev), x0, video, video_mask, rhythm)
        if self.training and cfg.p_drop_plan > 0:  # the unconditional branch of CFG: a zero plan
            keep = torch.rand(b, n, device=dev) >= cfg.p_drop_plan
            plan = plan * keep[..., None].to(plan.dtype)

        prev = torch.cat([torch.zeros_like(x0[:, :1]), x0[:, :-1]], dim=1)
        prev_mask = torch.cat([torch.zeros_like(fm[:, :1]), fm[:, :-1]], dim=1)
        sel = fm.any(-1)  # patches holding at least one real frame; the rest never reach the DiT
        x0_s, nm = x0[sel], fm[sel]
        t = flow.sample_t(x0_s.shape[0], cfg.t_logit_mean, cfg.t_logit_std, device=dev)
        eps = torch.randn_like(x0_s)
        pred = self.dit(t, plan[sel], prev[sel], flow.interpolate(x0_s, eps, t), prev_mask[sel], nm)
        loss = flow.masked_mse(pred.float(), flow.target(x0_s, eps), nm)
        metrics = {"loss": float(loss.detach()), "frames": float(fm.sum())}
        if idx is not None:  # share of the FSQ codebook this batch used (none without the quantiser)
            with torch.no_grad():
                metrics["code_usage"] = float(idx[sel].unique().numel() / self.head.fsq.codebook_size)
        return loss, metrics

    # -- generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, text_ids, text_mask, video=None, video_mask=None, rhythm=None, frames: int = 250,
                 steps: int | None = None, cfg_scale: float | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Latents [B, C, frames] in the VAE's scale, patch by patch: one LM step per patch (KV cache),
        plan = FSQ + RITE over the patches so far, then `steps` Euler steps of the Loc-DiT with CFG
        (unconditional = a zero plan, the condition dropped in training with p_drop_plan)."""
        cfg, dev = self.cfg, self.latent_mean.device
        steps = cfg.sample_steps if steps is None else int(steps)
        scale = cfg.cfg_scale if cfg_scale is None else float(cfg_scale)
        p, c = cfg.patch, cfg.latent_channels
        n = math.ceil(frames / p)
        text_ids, text_mask = text_ids.to(dev), text_mask.to(dev)
        b = text_ids.shape[0]
        if video is not None:
            video = video.to(dev).float()
            video_mask = None if video_mask is None else video_mask.to(dev)
        rhythm_p = self._rhythm_patches(rhythm, b, n * p, dev)
        noise_dev = generator.device if generator is not None else dev

        pre, mask = self.head.prefix(text_ids, text_mask, video, video_mask)
        tok = self.head.bos.expand(b, 1, -1)
        if rhythm_p is not None:
            tok = tok + self.head.rhythm_in(rhythm_p[:, :1].flatten(2))
        seq, past, states, out = pre, None, [], []
        ones = torch.ones(b, 1, dtype=torch.bool, device=dev)
        ts = flow.timesteps(steps).tolist()
        for i in range(n):
            mask = torch.cat([mask, ones], dim=1)
            if use_cache:
                h, past = self.head.run(torch.cat([pre, tok], 1) if i == 0 else tok, mask, past=past, use_cache=True)
            else:  # the reference path: the whole sequence again
                seq = torch.cat([seq, tok], dim=1)
                h, _ = self.head.run(seq, mask)
            states.append(h[:, -1:])
            plan = self.head.plan(torch.cat(states, dim=1))[0][:, -1]
            prev = out[-1] if out else torch.zeros(b, p, c, device=dev)
            prev_mask = torch.full((b, p), bool(out), device=dev)
            x = torch.randn(b, p, c, generator=generator, device=noise_dev).to(dev)
            for k in range(steps):
                t = torch.full((b,), ts[k], device=dev)
                if scale == 1.0:
                    v = self.dit(t, plan, prev, x, prev_mask)
                else:
                    v2 = self.dit(torch.cat([t, t]), torch.cat([plan, torch.zeros_like(plan)]), torch.cat([prev, prev]),
                                  torch.cat([x, x]), torch.cat([prev_mask, prev_mask]))
                    v = flow.cfg_combine(v2[:b], v2[b:], scale)
                x = flow.euler_step(x, v, ts[k], ts[k + 1])
            out.append(x)
            if i + 1 < n:
                tok = self.head.patch_tokens(x[:, None], None if rhythm_p is None else rhythm_p[:, i + 1 : i + 2])
        latent = torch.cat(out, dim=1).transpose(1, 2)[..., :frames]  # [B, C, frames]
        return self.denormalise(latent)

    # -- stages, freezing, sizes ----------------------------------------------------------------

    def load_t2m(self, state_dict: dict) -> dict[str, list[str]]:
        """Stage v2m: load every tensor of a t2m model. Any t2m key this model lacks, or whose shape
        differs, is an error; keys only this model has (the video projection) are reported as new."""
        own = self.state_dict()
        unused = sorted(k for k in state_dict if k not in own)
        wrong = sorted(f"{k} {list(state_dict[k].shape)} vs {list(own[k].shape)}"
                       for k in state_dict if k in own and tuple(state_dict[k].shape) != tuple(own[k].shape))
        if unused or wrong:
            raise ValueError(f"t2m weights do not fit this model: unused keys {unused}; wrong shapes {wrong}")
        result = self.load_state_dict(state_dict, strict=False)
        return {"loaded": sorted(state_dict), "new": sorted(result.missing_keys)}

    def parts(self) -> dict[str, list[nn.Parameter]]:
        emb = self.head.backbone.get_input_embeddings()
        emb_ids = {id(q) for q in emb.parameters()}
        out = {
            "text": list(emb.parameters()),
            "lm": [q for q in self.head.backbone.parameters() if id(q) not in emb_ids],
            "patch": [self.head.bos, *self.head.patch_in.parameters()],
            "fsq": list(self.head.fsq.parameters()),
            "rite": list(self.head.rite.parameters()),
            "dit": list(self.dit.parameters()),
        }
        if self.cfg.use_video:
            out["video"] = list(self.head.video_in.parameters())
        if self.cfg.use_rhythm:
            out["rhythm"] = list(self.head.rhythm_in.parameters())
        return out

    def freeze(self, parts: list[str]) -> None:
        have = self.parts()
        bad = [p for p in parts if p not in have]
        if bad:
            raise ValueError(f"unknown model parts {bad}; valid: {sorted(have)}")
        for name in parts:
            for q in have[name]:
                q.requires_grad_(False)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(q.numel() for q in self.parameters() if q.requires_grad or not trainable_only)

    def flops_per_sample(self, text_tokens: int | None = None) -> float:
        """Approximate training FLOPs of one sample (forward + backward = 3 x forward):
        6 x (matmul params x tokens) per part, plus 12 x layers x width x seq^2 for attention (QK^T and AV,
        forward and backward). text_tokens defaults to cfg.text_max_tokens (an upper bound)."""
        cfg = self.cfg
        n = cfg.patches
        lm_tokens = (cfg.text_max_tokens if text_tokens is None else text_tokens) + n + (cfg.video_len if cfg.use_video else 0)
        emb = self.head.backbone.get_input_embeddings().weight.numel()
        lm_params = sum(q.numel() for q in self.head.backbone.parameters()) - emb
        lm_w = self.head.hidden
        lm_layers = self.head.backbone.config.num_hidden_layers
        in_params = sum(q.numel() for name, q in self.head.named_parameters()
                        if not name.startswith(("backbone.", "fsq.", "rite.")))
        rite_params = sum(q.numel() for q in self.head.rite.parameters()) + sum(q.numel() for q in self.head.fsq.parameters())
        dit_params = sum(q.numel() for q in self.dit.parameters())
        dit_tokens = 2 + 2 * cfg.patch
        flops = 6 * (lm_params * lm_tokens + in_params * n + rite_params * n + dit_params * n * dit_tokens)
        flops += 12 * lm_layers * lm_w * lm_tokens ** 2
        flops += (12 * cfg.rite_layers * cfg.dit_hidden * n ** 2) if cfg.use_rite else 0
        flops += 12 * cfg.dit_layers * cfg.dit_hidden * dit_tokens ** 2 * n
        return float(flops)
