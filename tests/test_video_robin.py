"""Video-Robin assembled (debug preset, CPU): the loss learns a fixed batch and ignores padding,
the t2m -> v2m hand-off, freezing, latent statistics, KV-cached generation."""
from __future__ import annotations

import pytest
import torch

from model.config import preset
from model.text import ByteTokenizer, encode_batch
from model.video_robin import VideoRobin

C, CLIP = 8, 16
TOK = ByteTokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(**kw):
    base = dict(latent_channels=C, clip_dim=CLIP, max_frames=64)
    base.update(kw)
    return preset("debug", **base)


def make_batch(cfg, seed=0, real=(64, 41)):
    g = torch.Generator().manual_seed(seed)
    b, t = len(real), cfg.max_frames
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, n in enumerate(real):
        mask[i, :n] = True
    latent = torch.randn(b, C, t, generator=g) * 2.0 + 0.5
    latent[~mask[:, None].expand_as(latent)] = 0.0
    ids, tmask = encode_batch(TOK, ["calm piano at night", ""][:b], cfg.text_max_tokens)
    batch = {"latent": latent, "latent_mask": mask, "text_ids": ids, "text_mask": tmask, "keys": [f"k{i}" for i in range(b)]}
    if cfg.use_video:
        batch["video"] = torch.nn.functional.normalize(torch.randn(b, cfg.video_len, cfg.clip_dim, generator=g), dim=-1)
        batch["video_mask"] = torch.ones(b, cfg.video_len, dtype=torch.bool)
    if cfg.use_rhythm:
        batch["rhythm"] = torch.rand(b, cfg.rhythm_channels, t, generator=g)
    return batch


def fixed_loss(model, batch, seed=1234):
    torch.manual_seed(seed)
    with torch.no_grad():
        return float(model.loss(batch)[0])


@pytest.mark.parametrize("video", [False, True])
def test_loss_halves_on_a_fixed_batch(video):
    torch.manual_seed(0)
    cfg = make_cfg(use_video=video, use_rhythm=video)
    model = VideoRobin(cfg, TOK.vocab_size)
    batch = make_batch(cfg)
    model.eval()
    start = fixed_loss(model, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(200):  # a fresh seed per step: new t, noise and condition dropout every time
        torch.manual_seed(step)
        loss, metrics = model.loss(batch)
        assert set(metrics) >= {"loss"} and all(isinstance(v, float) for v in metrics.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    end = fixed_loss(model, batch)
    assert end <= 0.5 * start, (start, end)


def test_padded_frames_do_not_count():
    torch.manual_seed(0)
    cfg = make_cfg(use_video=True, use_rhythm=True)
    model = VideoRobin(cfg, TOK.vocab_size).train()
    batch = make_batch(cfg, real=(64, 41))
    other = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}
    pad = ~other["latent_mask"]
    other["latent"][pad[:, None].expand_as(other["latent"])] = 1e3  # garbage in the padded frames
    assert fixed_loss(model, batch) == fixed_loss(model, other)
    real = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}
    real["latent"][1, :, 10] += 1.0  # a real frame does count
    assert fixed_loss(model, batch) != fixed_loss(model, real)


def test_latent_stats_are_buffers_and_normalise():
    torch.manual_seed(0)
    cfg = make_cfg()
    model = VideoRobin(cfg, TOK.vocab_size)
    batch = make_batch(cfg)
    ref = fixed_loss(model, batch)
    mean, std = torch.linspace(-3, 3, C), torch.linspace(0.5, 4, C)
    model.set_latent_stats(mean, std)
    scaled = dict(batch, latent=batch["latent"] * std[:, None] + mean[:, None])
    assert fixed_loss(model, scaled) == pytest.approx(ref, rel=1e-5)
    sd = model.state_dict()
    assert torch.equal(sd["latent_mean"], mean) and torch.equal(sd["latent_std"], std)
    with pytest.raises(ValueError):
        model.set_latent_stats(mean[:3], std[:3])


def test_t2m_to_v2m_loads_every_weight():
    torch.manual_seed(0)
    t2m = VideoRobin(make_cfg(), TOK.vocab_size)
    t2m.set_latent_stats(torch.full((C,), 0.3), torch.full((C,), 2.0))
    v2m = VideoRobin(make_cfg(use_video=True), TOK.vocab_size)
    sd = t2m.state_dict()
    report = v2m.load_t2m(sd)
    assert sorted(report["loaded"]) == sorted(sd)
    own = v2m.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k
    assert report["new"] and all(k.startswith("head.video_in.") for k in report["new"])
    assert set(report["new"]) == set(own) - set(sd)
    # A key the v2m model does not have, or a tensor of another shape, is an error naming it.
    with pytest.raises(ValueError, match="head.bogus"):
        v2m.load_t2m({**sd, "head.bogus": torch.zeros(1)})
    bad = dict(sd)
    bad["dit.out.bias"] = torch.zeros(C + 1)
    with pytest.raises(ValueError, match="dit.out.bias"):
        v2m.load_t2m(bad)


def test_freeze_keeps_frozen_parts():
    torch.manual_seed(0)
    cfg = make_cfg(use_video=True)
    model = VideoRobin(cfg, TOK.vocab_size).train()
    with pytest.raises(ValueError, match="valid"):
        model.freeze(["lm", "nonsense"])
    model.freeze(["text", "lm", "fsq"])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    loss, _ = model.loss(make_batch(cfg))
    loss.backward()
    opt.step()
    after = dict(model.named_parameters())
    frozen = [k for k in before if k.startswith(("head.backbone.", "head.fsq."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["dit.out.weight"], after["dit.out.weight"])
    assert not torch.equal(before["head.video_in.1.weight"], after["head.video_in.1.weight"])
    assert model.num_params(trainable_only=True) < model.num_params()


@pytest.mark.parametrize("video", [False, True])
def test_generate_shape_and_kv_cache_matches_recompute(video):
    torch.manual_seed(0)
    cfg = make_cfg(use_video=video, use_rhythm=video)
    model = VideoRobin(cfg, TOK.vocab_size)
    for p in model.dit.out.parameters():  # leave the zero init, so the DiT output matters
        torch.nn.init.normal_(p, std=0.05)
    model.set_latent_stats(torch.full((C,), 1.0), torch.full((C,), 3.0))
    model.eval()
    batch = make_batch(cfg)
    kw = dict(video=batch.get("video"), video_mask=batch.get("video_mask"), rhythm=batch.get("rhythm"),
              frames=37, steps=3, cfg_scale=2.0)
    fast = model.generate(batch["text_ids"], batch["text_mask"], generator=torch.Generator().manual_seed(5), **kw)
    slow = model.generate(batch["text_ids"], batch["text_mask"], generator=torch.Generator().manual_seed(5),
                          use_cache=False, **kw)
    assert fast.shape == (2, C, 37)  # 37 frames: not a whole number of 16-frame patches
    assert torch.isfinite(fast).all()
    assert torch.allclose(fast, slow, atol=1e-4), (fast - slow).abs().max()
    # Another seed, another result; one patch exactly; no video for a v2m model is allowed.
    other = model.generate(batch["text_ids"], batch["text_mask"], generator=torch.Generator().manual_seed(6), **kw)
    assert not torch.allclose(fast, other)
    one = model.generate(batch["text_ids"][:1], batch["text_mask"][:1], frames=16, steps=2)
    assert one.shape == (1, C, 16)


def test_lm_init_loads_pretrained_backbone(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    lm = Qwen3ForCausalLM(Qwen3Config(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=16, intermediate_size=64))
    lm.save_pretrained(tmp_path / "lm")
    cfg = make_cfg(lm_init=str(tmp_path / "lm"))
    model = VideoRobin(cfg, 300)
    assert model.head.hidden == 32
    assert torch.equal(model.head.backbone.get_input_embeddings().weight, lm.model.embed_tokens.weight)
    assert torch.equal(model.head.backbone.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)
    loss, _ = model.loss(make_batch(cfg))
    assert torch.isfinite(loss)


def test_sizes():
    model = VideoRobin(make_cfg(), TOK.vocab_size)
    n = model.num_params()
    assert n == sum(p.numel() for p in model.parameters())
    flops = model.flops_per_sample()
    assert flops > 6 * (n - model.head.backbone.get_input_embeddings().weight.numel()) * model.cfg.patches


@pytest.mark.parametrize("video", [False, True])
def test_every_parameter_gets_a_gradient(video):
    """So DDP needs no find_unused_parameters: even a dropped video or plan keeps its weights in the graph."""
    torch.manual_seed(0)
    cfg = make_cfg(use_video=video, use_rhythm=video, p_drop_video=1.0, p_drop_plan=0.5)
    model = VideoRobin(cfg, TOK.vocab_size).train()
    loss, _ = model.loss(make_batch(cfg))
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


ABLATIONS = {"no_fsq": dict(use_fsq=False), "no_rite": dict(use_rite=False),
             "every_frame": dict(use_video=True, video_tokens="frames")}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablations_train_and_generate(name):
    """Each switch the paper's ablations use: a finite loss whose gradient reaches every parameter
    (the plan path included), and generation whose KV cache matches the recompute."""
    torch.manual_seed(0)
    cfg = make_cfg(**ABLATIONS[name], p_drop_video=0.0)
    model = VideoRobin(cfg, TOK.vocab_size).train()
    for p in model.dit.out.parameters():  # off the zero init, so gradients reach the plan
        torch.nn.init.normal_(p, std=0.05)
    batch = make_batch(cfg)
    loss, metrics = model.loss(batch)
    assert torch.isfinite(loss)
    assert ("code_usage" in metrics) == cfg.use_fsq  # no codebook without the quantiser
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    for part in ("fsq", "rite", *(["video"] if cfg.use_video else [])):
        assert sum(float(p.grad.abs().sum()) for p in model.parts()[part]) > 0, part
    model.eval()
    kw = dict(video=batch.get("video"), video_mask=batch.get("video_mask"), frames=37, steps=2, cfg_scale=2.0)
    fast = model.generate(batch["text_ids"], batch["text_mask"], generator=torch.Generator().manual_seed(5), **kw)
    slow = model.generate(batch["text_ids"], batch["text_mask"], generator=torch.Generator().manual_seed(5), use_cache=False, **kw)
    assert fast.shape == (2, C, 37) and torch.allclose(fast, slow, atol=1e-4)


def test_no_fsq_keeps_the_plan_continuous_and_no_rite_keeps_patches_apart():
    torch.manual_seed(0)
    h = torch.randn(1, 4, 64)
    nudged = h.clone()
    nudged[0, 2] += 1e-3 * torch.randn(64)
    quantised, continuous = VideoRobin(make_cfg(), TOK.vocab_size).head, VideoRobin(make_cfg(use_fsq=False), TOK.vocab_size).head
    codes, idx = continuous.fsq(h)
    assert idx is None and torch.equal(codes, continuous.fsq.proj_in(h))  # the projection itself, unrounded
    assert not torch.equal(continuous.fsq(nudged)[0][0, 2], codes[0, 2])  # a tiny change moves the plan
    q_codes, q_idx = quantised.fsq(h)
    assert q_idx.shape == (1, 4) and torch.equal(quantised.fsq(nudged)[0], q_codes)  # ... but not the codes
    # RITE integrates causally over patches: patch 1 changes what patches 1.. get; without it, only patch 1.
    with torch.no_grad():
        h2 = h.clone()
        h2[0, 1] += 3.0
        rite, plain = quantised, VideoRobin(make_cfg(use_rite=False), TOK.vocab_size).head
        moved = lambda head: (head.plan(h)[0] - head.plan(h2)[0]).abs().amax(-1)[0] > 1e-6  # noqa: E731
        assert moved(rite).tolist() == [False, True, True, True]
        assert moved(plain).tolist() == [False, True, False, False]
        assert not any(n.startswith("encoder") for n, _ in plain.rite.named_parameters())


def test_every_frame_tokens_honour_their_mask():
    torch.manual_seed(0)
    cfg = make_cfg(use_video=True, video_tokens="frames", p_drop_video=0.0, max_frames=64)
    assert cfg.video_len == 11  # 64 frames at 25 Hz = 2.56 s of 4 fps frames
    model = VideoRobin(cfg, TOK.vocab_size).eval()
    for p in model.dit.out.parameters():  # off the zero init, so the plan shows in the loss
        torch.nn.init.normal_(p, std=0.05)
    batch = make_batch(cfg)
    batch["video_mask"][:, 8:] = False
    other = dict(batch, video=batch["video"].clone())
    other["video"][:, 8:] = 5.0  # masked tokens: anything
    assert fixed_loss(model, batch) == fixed_loss(model, other)
    other["video"][:, 3] = 5.0  # a real token does count
    assert fixed_loss(model, batch) != fixed_loss(model, other)
