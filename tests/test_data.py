"""The training loader (model/data.py) over shards written by the real pipeline (feature_shards:
6 clips of 250 latent frames, 8 latent channels, CLIP dim 32 at 4 fps, template prompts)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import preset
from model.data import (clip_frames_at, epoch_batches, iter_raw_samples, latent_stats, load_npy, make_pipeline, read_geometry,
                        resolve_shards, video_token_times)


@pytest.fixture(scope="module")
def shards(feature_shards):
    out, _ = feature_shards
    return resolve_shards(str(out))


@pytest.fixture(scope="module")
def raw(shards):
    """key -> {"meta": json, arrays...} of every sample."""
    samples = {}
    for s in iter_raw_samples(shards):
        samples[s["__key__"]] = {"meta": json.loads(s["json"]),
                                 **{k[:-4]: load_npy(s[k]) for k in s if k.endswith(".npy")}}
    return samples


def config(**changes):
    base = dict(latent_channels=8, clip_dim=32, latent_rate=25.0, p_drop_text=0.0)
    return preset("debug", **{**base, **changes})


def take(shards, cfg, n=3, batch_size=2, seed=0, rank=0, epoch=0, **kw):
    return list(epoch_batches(shards, cfg, batch_size=batch_size, seed=seed, rank=rank, epoch=epoch, batches=n,
                              shuffle_buffer=4, **kw))


def write_tar(path: Path, samples: list[dict]) -> str:
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})
    return str(path)


def test_shard_specs_resolve_alike(feature_shards, shards):
    out, _ = feature_shards
    assert len(shards) == 2 and all(s.endswith(".tar") for s in shards)
    assert resolve_shards(str(out / "shards" / "*.tar")) == shards
    stems = ",".join(s.rsplit("/", 1)[-1].removesuffix(".tar") for s in shards)  # shards are named by content
    assert resolve_shards(str(out / "shards" / f"{{{stems}}}.tar")) == shards
    assert resolve_shards(f"{shards[0]}::{shards[1]}") == shards
    with pytest.raises(FileNotFoundError, match="matches no shard"):
        resolve_shards(str(out / "nothing-*.tar"))


def test_geometry_from_the_shards(shards):
    g = read_geometry(shards, need_clip=True)
    assert (g.latent_channels, g.latent_rate, g.latent_frames, g.clip_dim) == (8, 25.0, 250, 32)
    assert g.latent["channels"] == 8 and g.clip_embed["fps"] == 4.0


def test_batch_shapes_mask_and_padding(shards, raw):
    cfg = config()
    batches = take(shards, cfg)
    assert len(batches) == 3
    for b in batches:
        assert b["latent"].dtype == torch.float32 and b["latent"].shape == (2, 8, 256)
        assert b["latent_mask"].dtype == torch.bool and b["latent_mask"].shape == (2, 256)
        assert b["text_ids"].dtype == torch.long and b["text_mask"].dtype == torch.bool
        assert b["text_ids"].shape == b["text_mask"].shape and b["text_ids"].shape[0] == 2
        assert "video" not in b and "rhythm" not in b
        assert b["latent_mask"].sum(1).tolist() == [250, 250]  # True exactly on the real frames
        assert b["latent_mask"][:, :250].all()
        assert (b["latent"][:, :, 250:] == 0).all()  # the padding is zeros
        for i, key in enumerate(b["keys"]):
            expected = torch.from_numpy(raw[key]["latent"].astype(np.float32))
            assert torch.equal(b["latent"][i, :, :250], expected)


def test_crop_when_max_frames_is_shorter(shards, raw):
    cfg = config(max_frames=240)
    b = take(shards, cfg, n=1)[0]
    assert b["latent"].shape == (2, 8, 240) and b["latent_mask"].all()
    for i, key in enumerate(b["keys"]):
        assert torch.equal(b["latent"][i], torch.from_numpy(raw[key]["latent"][:, :240].astype(np.float32)))


def test_prompt_is_one_of_the_samples_and_dropout(shards, raw):
    cfg = config()
    seen = set()
    for b in take(shards, cfg, n=6):
        for key, text in zip(b["keys"], b["texts"]):
            assert text in raw[key]["meta"]["prompts"].values()
            seen.add(text)
    assert len(seen) > 1  # drawn per step, not always the same level
    from model.text import ByteTokenizer

    for b in take(shards, cfg, n=2, p_drop_text=1.0):
        assert b["texts"] == ["", ""]
        assert b["text_ids"].tolist() == [[ByteTokenizer.eos_id]] * 2  # "" = the lone end-of-text token


def test_clip_frames_align_with_patch_centres(shards, raw):
    # 16-frame patches at 25 Hz (0.64 s) over CLIP frames at 4 fps: patch i's centre (i + 0.5) * 0.64 s
    # lies in CLIP frame floor(centre * 4); the last patches (past the 40 frames) take the last frame.
    cfg = config(use_video=True)
    centres = (np.arange(16) + 0.5) * 0.64
    assert np.allclose(video_token_times(cfg), centres)
    idx = clip_frames_at(centres, clip_fps=4.0, clip_frames=40)
    assert idx[:3].tolist() == [1, 3, 6]  # 0.32 s, 0.96 s, 1.60 s
    assert (idx == np.minimum(np.floor(centres * 4), 39)).all()
    assert clip_frames_at(centres, 1.0, 8)[-1] == 7  # clipped to the frames there are
    for b in take(shards, cfg, n=2):
        assert b["video"].dtype == torch.float32 and b["video"].shape == (2, cfg.patches, 32)
        assert b["video_mask"].shape == (2, cfg.patches) and b["video_mask"].all()  # 250 frames reach patch 15
        for i, key in enumerate(b["keys"]):
            clip = raw[key]["clip"].astype(np.float32)
            fps = raw[key]["meta"]["clip_embed"]["fps"]
            want = clip_frames_at(centres, fps, len(clip))
            assert torch.equal(b["video"][i], torch.from_numpy(clip[want]))


def test_every_clip_frame_as_a_video_token(shards, raw):
    # video_tokens=frames: one token per 4 fps CLIP frame. 256 latent frames = 10.24 s -> 41 tokens;
    # the clips hold 250 latent frames (10 s) and 40 CLIP frames, so tokens 0..39 are real, token 40 padding.
    cfg = config(use_video=True, video_tokens="frames")
    assert cfg.video_len == 41
    for b in take(shards, cfg, n=2):
        assert b["video"].shape == (2, 41, 32) and b["video_mask"].shape == (2, 41)
        assert b["video_mask"][:, :40].all() and not b["video_mask"][:, 40].any()
        for i, key in enumerate(b["keys"]):
            clip = raw[key]["clip"].astype(np.float32)
            assert raw[key]["meta"]["clip_embed"]["fps"] == 4.0 and len(clip) == 40
            assert torch.equal(b["video"][i, :40], torch.from_numpy(clip))  # frame k is token k


def test_rhythm_channels_behind_the_flag(shards, raw):
    cfg = config(use_rhythm=True)
    b = take(shards, cfg, n=1)[0]
    assert b["rhythm"].shape == (2, 2, 256) and b["rhythm"].dtype == torch.float32
    for i, key in enumerate(b["keys"]):
        rhythm = raw[key]["rhythm"]
        assert torch.equal(b["rhythm"][i, :, :250], torch.from_numpy(rhythm[[2, 3]].astype(np.float32)))
        assert (b["rhythm"][i, :, 250:] == 0).all()


def test_stream_is_a_function_of_seed_rank_epoch(shards):
    cfg = config(p_drop_text=0.5)

    def stream(**kw):
        return [(tuple(b["keys"]), tuple(b["texts"])) for b in take(shards, cfg, n=6, **kw)]

    a = stream(seed=1, rank=0)
    assert stream(seed=1, rank=0) == a
    assert stream(seed=1, rank=1) != a
    assert stream(seed=2, rank=0) != a
    assert stream(seed=1, rank=0, epoch=1) != a
    # Resuming mid-epoch: skipping k batches gives the tail of the same stream.
    tail = [(tuple(b["keys"]), tuple(b["texts"])) for b in take(shards, cfg, n=6, seed=1, skip=4)]
    assert tail == a[4:]


def test_with_epoch_gives_exactly_the_requested_batches(shards):
    cfg = config()
    pipeline = make_pipeline(shards, cfg, batch_size=2, seed=0, rank=0, epoch=0, batches=5, shuffle_buffer=2)
    assert sum(1 for _ in pipeline) == 5  # the resampled stream is endless; with_epoch cuts it
    # DataLoader workers: the same count, and the same batches every time.
    a = [b["keys"] for b in take(shards, cfg, n=5, num_workers=2)]
    assert len(a) == 5
    assert [b["keys"] for b in take(shards, cfg, n=5, num_workers=2)] == a


def test_samples_without_latent_or_clip_are_skipped(shards, tmp_path):
    samples = list(iter_raw_samples(shards))
    dropped = samples[0]["__key__"]
    no_latent = {k: v for k, v in samples[0].items() if k not in ("latent.npy", "latent_std.npy")}
    meta = json.loads(no_latent["json"])
    no_latent["json"] = json.dumps({**meta, "has_latent": False}).encode()
    no_clip = {k: v for k, v in samples[1].items() if k != "clip.npy"}
    tar = write_tar(tmp_path / "mixed" / "000000.tar", [no_latent, no_clip, *samples[2:]])
    batches = take([tar], config(), n=4)
    assert dropped not in {k for b in batches for k in b["keys"]}
    assert sum(b["skipped"] for b in batches) > 0
    video = take([tar], config(use_video=True), n=4)
    assert not {dropped, samples[1]["__key__"]} & {k for b in video for k in b["keys"]}

    empty = write_tar(tmp_path / "empty" / "000000.tar", [])
    with pytest.raises(ValueError, match="held no sample"):  # an error, not an endless resampled loop
        take([empty], config(), n=1)

    only_missing = write_tar(tmp_path / "bare" / "000000.tar", [no_latent])
    with pytest.raises(ValueError, match="vae_latents"):
        read_geometry([only_missing])
    with pytest.raises(ValueError, match="clip_embed"):
        read_geometry([write_tar(tmp_path / "noclip" / "000000.tar", [no_clip])], need_clip=True)


def test_latent_stats_match_numpy(shards, raw):
    cfg = config()
    mean, std = latent_stats(shards, cfg, seed=0, batches=2, batch_size=3)
    # Recompute from the samples that stream drew (rank -1, epoch 0).
    keys = [k for b in epoch_batches(shards, cfg, batch_size=3, seed=0, rank=-1, epoch=0, batches=2, p_drop_text=0.0)
            for k in b["keys"]]
    frames = np.concatenate([raw[k]["latent"].astype(np.float64) for k in keys], axis=1)
    assert np.allclose(mean.numpy(), frames.mean(1), atol=1e-5)
    assert np.allclose(std.numpy(), frames.std(1), atol=1e-5)


def test_tar_index_matches_tarfile_and_falls_back(shards, tmp_path):
    import io
    import tarfile

    from model.data import _TarSamples, ustar_members

    for url in shards:
        with open(url, "rb") as f:
            fast = ustar_members(f)
        with tarfile.open(url) as tar:
            assert fast == [(m.name, m.offset_data, m.size) for m in tar if m.isreg()]
    # A pax header (a long name): the fast index declines, Python's tarfile reads the shard instead.
    long_key = "k" * 150
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for ext, data in (("json", b"{}"), ("latent.npy", b"abc"), ("flac", b"zz")):
            info = tarfile.TarInfo(f"{long_key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        assert ustar_members(f) is None
    samples = list(_TarSamples({"json", "latent.npy"})(iter([{"url": str(path)}])))
    assert samples == [{"__key__": long_key, "__url__": str(path), "json": b"{}", "latent.npy": b"abc"}]


@pytest.mark.parametrize("tokens", ["patch", "frames"])
def test_generation_reads_the_frames_training_reads(tokens):
    # model/media.py asks the decoder for frames at these times; frame k of the pipeline's 4 fps
    # grid lies at k / 4 s, so the frame generation gets must be the one the loader gives the token.
    from model.media import token_frame_times

    cfg = config(use_video=True, video_tokens=tokens)
    times = token_frame_times(cfg, 10.24, 4.0)
    assert len(times) == cfg.video_len
    want = clip_frames_at(video_token_times(cfg), 4.0, 10**9)
    assert np.array_equal(np.rint(times * 4.0).astype(int), want)
    assert len(token_frame_times(cfg, 2.0, 4.0)) == (4 if tokens == "patch" else 8)  # 2 s: 4 patches of 0.64 s, 8 frames
