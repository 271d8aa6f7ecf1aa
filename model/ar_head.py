"""The AR-Head: a decoder LM from transformers (built from its config, or a pretrained small LM
when `lm_init` is set) over

    [text prompt tokens | projected CLIP frame tokens (stage v2m) | one token per latent patch]

where the token of patch i carries the previous patch i-1 (a learned BOS for patch 0) and, with
`use_rhythm`, the visual-rhythm channels of patch i. The LM's hidden state at patch token i goes
through the FSQ bottleneck and RITE and becomes the plan (the Loc-DiT's condition) of patch i.

Text embeddings are the LM's own input embeddings. Right-padded text is kept in place and
masked; positions count real tokens only (cumsum of the mask), so a sample's positions do not
depend on what else is in its batch."""
from __future__ import annotations

import torch
from torch import nn

from model.fsq import PlanQuantizer
from model.rite import RITE, CodeProjection


def build_backbone(cfg, vocab_size: int, load_pretrained: bool = True) -> nn.Module:
    """The base LM (no LM head). With `lm_init`: its weights (or, load_pretrained=False, only its
    architecture, for a checkpoint that will overwrite them anyway)."""
    from transformers import AutoConfig, AutoModel

    if cfg.lm_init and load_pretrained:
        return AutoModel.from_pretrained(cfg.lm_init, dtype=torch.float32, attn_implementation="sdpa")
    if cfg.lm_init:
        lm_cfg = AutoConfig.from_pretrained(cfg.lm_init)
        lm_cfg._attn_implementation = "sdpa"
        return AutoModel.from_config(lm_cfg, dtype=torch.float32)
    lm_cfg = AutoConfig.for_model(
        cfg.lm_arch, vocab_size=vocab_size, hidden_size=cfg.lm_hidden, num_hidden_layers=cfg.lm_layers,
        num_attention_heads=cfg.lm_heads, num_key_value_heads=cfg.lm_kv_heads, intermediate_size=cfg.lm_ffn,
        head_dim=cfg.lm_hidden // cfg.lm_heads, max_position_embeddings=8192, tie_word_embeddings=False,
    )
    lm_cfg._attn_implementation = "sdpa"
    return AutoModel.from_config(lm_cfg)


class ARHead(nn.Module):
    def __init__(self, cfg, vocab_size: int, load_pretrained: bool = True):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg, vocab_size, load_pretrained)
        self.hidden = h = self.backbone.config.hidden_size
        self.frame_dim = cfg.patch * cfg.latent_channels
        self.bos = nn.Parameter(torch.randn(h) * 0.02)
        self.patch_in = nn.Sequential(nn.Linear(self.frame_dim, h), nn.SiLU(), nn.Linear(h, h))
        if cfg.use_rhythm:
            self.rhythm_in = nn.Linear(cfg.patch * cfg.rhythm_channels, h)
        if cfg.use_video:
            self.video_in = nn.Sequential(nn.LayerNorm(cfg.clip_dim), nn.Linear(cfg.clip_dim, h), nn.SiLU(), nn.Linear(h, h))
        self.fsq = PlanQuantizer(h, cfg.fsq_levels, quantize=cfg.use_fsq)
        self.rite = (RITE(h, self.fsq.dim, cfg.dit_hidden, cfg.rite_layers, cfg.rite_heads) if cfg.use_rite
                     else CodeProjection(self.fsq.dim, cfg.dit_hidden))

    # -- inputs ---------------------------------------------------------------------------------

    def prefix(self, text_ids, text_mask, video=None, video_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, L (+ Nv), H] and mask of the condition prefix (text, then video frames)."""
        emb = self.backbone.get_input_embeddings()(text_ids)
        mask = text_mask.bool()
        if self.cfg.use_video:
            b = text_ids.shape[0]
            if video is None:  # no video: zero tokens, all masked (the dropped video condition)
                video = emb.new_zeros(b, 1, self.cfg.clip_dim)
                video_mask = torch.zeros(b, 1, dtype=torch.bool, device=emb.device)
            elif video_mask is None:
                video_mask = torch.ones(video.shape[:2], dtype=torch.bool, device=emb.device)
            emb = torch.cat([emb, self.video_in(video.to(emb.dtype))], dim=1)
            mask = torch.cat([mask, video_mask.bool()], dim=1)
        return emb, mask

    def patch_tokens(self, prev: torch.Tensor, rhythm: torch.Tensor | None = None) -> torch.Tensor:
        """prev [B, n, P, C] (normalised latents of patches i-1; row 0 may be anything when it is the
        BOS slot, see `tokens_for`) -> [B, n, H]."""
        x = self.patch_in(prev.flatten(2))
        if self.cfg.use_rhythm and rhythm is not None:
            x = x + self.rhythm_in(rhythm.flatten(2).to(x.dtype))
        return x

    def tokens_for(self, x0: torch.Tensor, rhythm: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: patches x0 [B, N, P, C] -> the N patch tokens (BOS, x0[0], ..., x0[N-2])."""
        b, n = x0.shape[:2]
        tok = self.patch_tokens(x0[:, : n - 1], None if rhythm is None else rhythm[:, 1:])
        first = self.bos.expand(b, 1, -1)
        if self.cfg.use_rhythm and rhythm is not None:
            first = first + self.rhythm_in(rhythm[:, :1].flatten(2).to(first.dtype))
        return torch.cat([first, tok], dim=1)

    # -- backbone -------------------------------------------------------------------------------

    def run(self, embeds, mask, past=None, positions=None, use_cache=False):
        """The LM over `embeds`; `mask` covers past + new tokens. Returns (hidden [B, n, H], cache)."""
        if positions is None:
            positions = (mask.long().cumsum(1) - 1).clamp_min(0)[:, -embeds.shape[1]:]
        out = self.backbone(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=positions,
                            past_key_values=past, use_cache=use_cache)
        return out.last_hidden_state, out.past_key_values

    def plan(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LM states of patches 0..n-1 [B, n, H] -> (plan tokens [B, n, dit_hidden], FSQ indices [B, n] or None)."""
        codes, idx = self.fsq(h)
        return self.rite(codes, h), idx

    def forward(self, text_ids, text_mask, x0, video=None, video_mask=None, rhythm=None):
        """Teacher-forced plan of every patch: x0 [B, N, P, C] -> (plan [B, N, D], indices [B, N])."""
        pre, pre_mask = self.prefix(text_ids, text_mask, video, video_mask)
        tok = self.tokens_for(x0, rhythm)
        mask = torch.cat([pre_mask, torch.ones(tok.shape[:2], dtype=torch.bool, device=tok.device)], dim=1)
        h, _ = self.run(torch.cat([pre, tok], dim=1), mask)
        return self.plan(h[:, -x0.shape[1]:])
