"""clip_embed with a tiny random-weight open_clip model: embeddings, batching, preprocessing against
open_clip's own PIL transform, tag scoring against a direct computation, weights resolution."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import small_config
from tiny_clip import make_tiny_clip

from pipeline.stage import Reject
from pipeline.weights import WeightsMissing
from stages import clip_model
from stages.clip_embed import ClipEmbed

REPO = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def tiny_config(tiny, **extra):
    name, config_file, ckpt = tiny
    return small_config(**{"clip_embed.model": name, "clip_embed.config_file": config_file,
                           "clip_embed.pretrained": ckpt, **extra})


@pytest.fixture(scope="module")
def stage(tiny):
    s = ClipEmbed(tiny_config(tiny))
    s.setup()
    return s


def frames(seed: int, n: int = 40, size: int = 224) -> np.ndarray:
    """Smooth coloured patterns (not white noise, which a random CLIP maps close together)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        f, p = rng.uniform(1, 8, (3, 2)), rng.uniform(0, 6, 3)
        img = np.stack([127 + 120 * np.sin(f[c, 0] * 6 * xx + p[c]) * np.cos(f[c, 1] * 6 * yy) for c in range(3)], -1)
        out.append(np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def clip_row(key: str, arr) -> dict:
    return {"key": key, "meta": {"clip": {"index": 0, "is_last": False}, "source": {"source_id": key}}, "frames": arr}


def test_embeddings_shape_norm_and_identity(stage):
    arr = frames(0)
    arr[1] = arr[0]
    (row,) = stage.process([clip_row("a", arr)])
    emb = row["clip_embeddings"]
    assert emb.dtype == np.float16 and emb.shape == (40, stage.dim)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    np.testing.assert_array_equal(emb[0], emb[1])
    assert np.abs(emb[0].astype(np.float32) - emb[2].astype(np.float32)).max() > 0.05
    assert row["meta"]["clip_embed"] == {"model": "tiny-clip-test", "pretrained": stage.pretrained_name, "dim": 32,
                                         "fps": 4.0, "frames": 40, "precision": "fp32", "device": "cpu"}


def test_batching_invariance(stage):
    clips = [frames(s) for s in (1, 2, 3)]
    (alone,) = stage.process([clip_row("b", clips[1].copy())])
    batch = list(stage.process([clip_row(f"c{i}", c) for i, c in enumerate(clips)]))
    np.testing.assert_allclose(batch[1]["clip_embeddings"].astype(np.float32),
                               alone["clip_embeddings"].astype(np.float32), atol=1e-3)
    assert batch[1]["meta"]["visual_tags"] == alone["meta"]["visual_tags"]
    many = stage.embed([frames(4, n=300)])[0]  # more frames than one forward pass takes
    np.testing.assert_allclose(many[290:], stage.embed([frames(4, n=300)[290:]])[0], atol=1e-4)


@pytest.mark.parametrize("shape", [(224, 224), (180, 240)])
def test_preprocessing_matches_open_clip_transform(tiny, stage, shape):
    import open_clip
    from PIL import Image

    _, _, transform = open_clip.create_model_and_transforms(tiny[0], pretrained=tiny[2])
    img = frames(5, n=1, size=max(shape))[0][: shape[0], : shape[1]]
    ref = transform(Image.fromarray(img))
    ours = clip_model.preprocess(torch.from_numpy(np.ascontiguousarray(img))[None], stage.model)[0]
    assert ours.shape == ref.shape == (3, 64, 64)
    diff = (ours - ref).abs()
    assert diff.max() < 0.05 and diff.mean() < 0.01  # ~1/255 of rounding: PIL resizes in uint8


def test_tags_structure_and_scoring(tiny, stage):
    import open_clip
    from PIL import Image

    arr = frames(6, n=4)
    (row,) = stage.process([clip_row("t", arr)])
    tags = row["meta"]["visual_tags"]
    vocab = clip_model.load_vocabulary("visual_tags.v1")
    assert {"setting", "subject", "mood", "motion", "time_of_day"} <= set(tags) == set(vocab["categories"])
    for category, items in tags.items():
        assert len(items) == 3 and all(i["tag"] in vocab["categories"][category] for i in items)
        scores = [i["score"] for i in items]
        assert all(0.0 <= s <= 1.0 for s in scores) and scores == sorted(scores, reverse=True)

    # The same scores computed directly with open_clip's own model, transform and tokenizer.
    model, _, transform = open_clip.create_model_and_transforms(tiny[0], pretrained=tiny[2])
    tokenizer = open_clip.get_tokenizer(tiny[0])
    category, names = "setting", vocab["categories"]["setting"]
    with torch.no_grad():
        img = model.encode_image(torch.stack([transform(Image.fromarray(f)) for f in arr]))
        img = img / img.norm(dim=-1, keepdim=True)
        text = []
        for name in names:
            t = model.encode_text(tokenizer([tpl.format(name) for tpl in vocab["templates"]]))
            t = (t / t.norm(dim=-1, keepdim=True)).mean(0)
            text.append(t / t.norm())
        probs = (model.logit_scale.exp() * img @ torch.stack(text).T).softmax(dim=-1).mean(0)
    expected = sorted(zip(probs.tolist(), names), reverse=True)
    assert tags[category][0]["tag"] == expected[0][1]
    for item in tags[category]:
        assert item["score"] == pytest.approx(probs[names.index(item["tag"])].item(), abs=2e-3)


def test_prepare_local_file_and_errors(tiny, tmp_path, monkeypatch):
    assert ClipEmbed.prepare(tiny_config(tiny)) == {"clip_embed.pretrained": str(__import__("pathlib").Path(tiny[2]).resolve())}
    with pytest.raises(WeightsMissing, match="not a file"):
        ClipEmbed.prepare(small_config(**{"clip_embed.pretrained": str(tmp_path / "missing.pt")}))
    with pytest.raises(ValueError, match="laion2b_s34b_b79k"):
        ClipEmbed.prepare(small_config(**{"clip_embed.pretrained": "no_such_tag"}))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipEmbed.prepare(small_config(**{"clip_embed.model": "ViT-Nope-1"}))

    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsMissing, match=f"{REPO}/open_clip_model.safetensors") as info:
        ClipEmbed.prepare(small_config())  # the default: ViT-B-32 / laion2b_s34b_b79k
    assert "HF_HUB_OFFLINE" in str(info.value) and "hf download" in str(info.value)

    # A cached copy under open_clip's other file name is found offline, and maps back to its tag.
    repo_dir = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0" * 40)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"not real weights")
    path = ClipEmbed.prepare(small_config())["clip_embed.pretrained"]
    assert path.endswith("open_clip_pytorch_model.bin") and REPO.replace("/", "--") in path
    tag, cfg = clip_model.tag_cfg_for("ViT-B-32", path)
    assert tag == "laion2b_s34b_b79k" and cfg["hf_hub"].startswith(REPO)


def test_stage_end_to_end_with_bad_rows(tiny):
    s = ClipEmbed(tiny_config(tiny, **{"clip_embed.batch_size": 5, "clip_embed.top_k": 2}))
    assert (s.resources.batch_size, s.resources.pool_size, s.resources.num_cpus) == (5, 1, 0.0)
    s.setup()
    rows = [clip_row(f"ok{i}", frames(10 + i)) for i in range(3)]
    rows += [clip_row("empty", np.zeros((0, 224, 224, 3), np.uint8)),
             clip_row("float", frames(20).astype(np.float32)), clip_row("none", None)]
    out = list(s.run(rows, drop=("frames",)))
    accepted = [o for o in out if isinstance(o, dict)]
    rejects = {o.key: o for o in out if isinstance(o, Reject)}
    assert [r["key"] for r in accepted] == ["ok0", "ok1", "ok2"]
    assert set(rejects) == {"empty", "float", "none"}
    assert all(r.reason == "clip_failed" and r.stage == "clip_embed" and r.level == "clip" for r in rejects.values())
    assert "no frames" in rejects["empty"].detail and "uint8" in rejects["float"].detail
    for r in accepted:
        assert "frames" not in r and r["clip_embeddings"].shape == (40, 32)
        assert all(len(v) == 2 for v in r["meta"]["visual_tags"].values())


def test_tag_embeddings_are_cached_on_disk(tiny, stage, tmp_path, monkeypatch):
    """The second worker loads what the first computed; another dtype is another cache entry."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    name, _, ckpt = tiny
    fresh = clip_model.tag_embeddings(stage.model, __import__("open_clip").get_tokenizer(name),
                                      clip_model.load_vocabulary("visual_tags.v1"), stage.device, stage.dtype)
    first = clip_model.cached_tag_embeddings(stage.model, name, ckpt, "visual_tags.v1", stage.device, stage.dtype)
    files = list((tmp_path / "video-robin" / "clip_tags").glob("*.npz"))
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(clip_model, "tag_embeddings", lambda *a: calls.append(a) or fresh)
    second = clip_model.cached_tag_embeddings(stage.model, name, ckpt, "visual_tags.v1", stage.device, stage.dtype)
    assert calls == []  # served from disk
    for cat in fresh:
        np.testing.assert_allclose(first[cat], fresh[cat], atol=1e-6)
        np.testing.assert_array_equal(second[cat], first[cat])
    clip_model.cached_tag_embeddings(stage.model, name, ckpt, "visual_tags.v1", stage.device, torch.float16)
    assert len(calls) == 1 and len(list((tmp_path / "video-robin" / "clip_tags").glob("*.npz"))) == 2
