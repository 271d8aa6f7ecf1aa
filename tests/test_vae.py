"""The music VAE: stable-audio-tools checkpoints loaded into diffusers' AutoencoderOobleck give the
same numbers as stable-audio-tools itself; bad checkpoints and configs fail naming what is wrong;
the audio plumbing (mono, padding, resampling) and the vae_latents stage, on the tiny preset."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import stable_audio_tools_stand_ins
from tiny_vae import make_tiny_vae, randomize_, tiny_spec

from model.oobleck import PRESETS, VaeConfigError, diffusers_to_sat, parse_config, sat_to_diffusers
from model.vae import AudioVAE, frames_for, new_model, read_state_dict
from pipeline.config import Config
from pipeline.stage import Reject
from pipeline.weights import WeightsMissing

SR = 48000
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*weight_norm. is deprecated:FutureWarning",  # stable-audio-tools builds its convs with it
    "ignore:jsonschema.RefResolver is deprecated:DeprecationWarning",  # jsonmerge, via k_diffusion
)


def import_stable_audio_tools():
    """stable-audio-tools' own Oobleck classes (installed --no-deps by the Makefile), behind the
    stand-ins of `helpers.stable_audio_tools_stand_ins` (neither is reached by OobleckEncoder /
    OobleckDecoder / VAEBottleneck / AudioAutoencoder.encode)."""
    stable_audio_tools_stand_ins()
    from stable_audio_tools.models import autoencoders

    return autoencoders


def write_config(path, spec_or_dict) -> str:
    data = spec_or_dict if isinstance(spec_or_dict, dict) else spec_or_dict.to_sat_config()
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("tiny_vae"), seed=3)


@pytest.fixture(scope="module")
def tiny_vae(tiny_files):
    return AudioVAE.load(*tiny_files, preset="tiny")


@pytest.mark.parametrize("final_tanh", [False, True])
def test_same_numbers_as_stable_audio_tools(tmp_path, final_tanh):
    sat = import_stable_audio_tools()
    spec = tiny_spec(final_tanh)
    torch.manual_seed(7)
    ref = sat.create_autoencoder_from_config(spec.to_sat_config()).eval()
    assert isinstance(ref.encoder, sat.OobleckEncoder) and type(ref.bottleneck).__name__ == "VAEBottleneck"
    randomize_(ref, 7)
    ckpt = tmp_path / "ref.ckpt"
    torch.save({"state_dict": ref.state_dict()}, ckpt)
    vae = AudioVAE.load(write_config(tmp_path / "ref.json", spec), str(ckpt), "tiny")

    x = 0.3 * torch.randn(2, 2, 8 * 1920, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, info = ref.encode(x, return_info=True)
        ref_mean, scale = info["pre_bottleneck_latents"].chunk(2, dim=1)
        ref_std = torch.nn.functional.softplus(scale) + 1e-4
        ref_audio = ref.decode(ref_mean)
    mean, std = vae.encode(x.numpy(), SR)
    assert mean.shape == (2, 8, 8) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, ref_mean.numpy(), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(std, ref_std.numpy(), atol=1e-5, rtol=1e-4)
    audio = vae.decode(ref_mean.numpy())
    assert audio.shape == (2, 2, 8 * 1920)
    np.testing.assert_allclose(audio, ref_audio.numpy(), atol=1e-5, rtol=1e-4)
    assert float(np.abs(mean).max()) > 1e-3 and float(np.abs(audio).max()) > 1e-3  # not trivially zero


def _target():
    return new_model(tiny_spec()).state_dict()


def test_corrupted_checkpoint_names_the_key(tiny_files, tmp_path):
    state = read_state_dict(tiny_files[1])
    target = _target()
    assert len(sat_to_diffusers(state, target, 5)) == len(target)

    missing = dict(state)
    del missing["encoder.layers.1.layers.0.layers.1.weight_v"]
    with pytest.raises(VaeConfigError, match=r"missing 1 key\(s\): encoder\.layers\.1\.layers\.0\.layers\.1\.weight_v"):
        sat_to_diffusers(missing, target, 5, source="x.ckpt")

    extra = {**state, "encoder.layers.9.alpha": torch.zeros(4)}
    with pytest.raises(VaeConfigError, match=r"unexpected 1 key\(s\): encoder\.layers\.9\.alpha"):
        sat_to_diffusers(extra, target, 5)

    shaped = {**state, "decoder.layers.2.layers.0.alpha": torch.zeros(3)}
    with pytest.raises(VaeConfigError, match=r"1 shape mismatch\(es\): decoder\.layers\.2\.layers\.0\.alpha: "
                                             r"checkpoint \(3,\) vs expected \(16,\)") as err:
        sat_to_diffusers(shaped, target, 5)
    assert "missing" not in str(err.value)

    # Through the loader the message also names the file.
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": missing}, bad)
    with pytest.raises(VaeConfigError, match="bad.ckpt does not match"):
        AudioVAE.load(tiny_files[0], str(bad), "tiny")
    with pytest.raises(VaeConfigError, match="no Oobleck encoder/decoder weights"):
        sat_to_diffusers({"foo.weight": torch.zeros(1)}, target, 5)


def test_prefixed_and_folded_checkpoints_load_identically(tiny_files, tiny_vae, tmp_path):
    """A full model holding the VAE as its pretransform (Stable Audio Open's layout), and weights
    saved with weight norm folded, give the same encoder as the plain checkpoint."""
    state = read_state_dict(tiny_files[1])
    full = {f"pretransform.model.{k}": v for k, v in state.items()}
    full["model.model.transformer.layers.0.weight"] = torch.zeros(3)  # the diffusion model: not ours
    from safetensors.torch import save_file

    save_file(full, tmp_path / "model.safetensors")
    config = json.loads(open(tiny_files[0]).read())
    wrapped = {"model_type": "diffusion_cond", "sample_rate": config["sample_rate"],
               "model": {"pretransform": {"type": "autoencoder", "config": config["model"]}, "diffusion": {}}}
    assert parse_config(wrapped).embedded
    prefixed = AudioVAE.load(write_config(tmp_path / "model_config.json", wrapped), str(tmp_path / "model.safetensors"), "tiny")

    folded = {}
    for k, v in state.items():
        if k.endswith("weight_g"):
            continue
        if k.endswith("weight_v"):
            g = state[k.replace("weight_v", "weight_g")]
            v = g * v / torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
            k = k.replace("weight_v", "weight")
        folded[f"model.{k}"] = v
    torch.save({"state_dict": folded}, tmp_path / "folded.ckpt")
    refolded = AudioVAE.load(tiny_files[0], str(tmp_path / "folded.ckpt"), "tiny")

    x = np.random.default_rng(1).standard_normal((1, 2, 4 * 1920)).astype(np.float32) * 0.2
    want = tiny_vae.encode(x)
    for vae in (prefixed, refolded):
        got = vae.encode(x)
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)
        np.testing.assert_allclose(got[1], want[1], atol=1e-5)


def test_inverse_conversion_round_trips(tiny_files):
    target = _target()
    back = sat_to_diffusers(diffusers_to_sat(target, 5), target, 5)
    assert set(back) == set(target) and all(torch.equal(back[k], target[k]) for k in target)


def test_geometry_mismatch_names_the_field(tmp_path, tiny_files):
    sao_like = dataclasses.replace(tiny_spec(), strides=(2, 4, 4, 8, 8), latent_dim=64, channels=128)
    config = write_config(tmp_path / "sao_like.json", sao_like)
    with pytest.raises(VaeConfigError) as err:
        AudioVAE.load(config, tiny_files[1], "songbloom")
    msg = str(err.value)
    assert "sao_like.json does not describe the 'songbloom' VAE" in msg
    assert "strides: expected [2, 4, 4, 6, 10], found [2, 4, 4, 8, 8] (hop 1920 vs 2048)" in msg
    assert "latent_dim" not in msg and "sample_rate" not in msg

    rate = write_config(tmp_path / "rate.json", dataclasses.replace(tiny_spec(), sample_rate=44100))
    with pytest.raises(VaeConfigError, match="sample_rate: expected 48000, found 44100"):
        AudioVAE.load(rate, tiny_files[1], "tiny")

    no_snake = tiny_spec().to_sat_config()
    no_snake["model"]["decoder"]["config"]["use_snake"] = False
    with pytest.raises(VaeConfigError, match=r"model\.decoder\.config\.use_snake is False"):
        parse_config(no_snake, "x.json")
    with pytest.raises(VaeConfigError, match="unknown VAE preset 'nope'"):
        AudioVAE.load(tiny_files[0], tiny_files[1], "nope")


def test_ten_second_clip_round_trip_and_mono(tiny_vae):
    t = np.arange(10 * SR) / SR
    clip = np.stack([np.sin(2 * np.pi * 220 * t), 0.5 * np.sin(2 * np.pi * 330 * t)]).astype(np.float32)[None]
    mean, std = tiny_vae.encode(clip, SR)
    assert mean.shape == std.shape == (1, 8, 250) and (std > 0).all()
    audio = tiny_vae.decode(mean)
    assert audio.shape == (1, 2, 480000) and audio.dtype == np.float32 and np.isfinite(audio).all()

    mono = clip[:, :1, : SR]  # 1 s: mono is encoded as the same signal on both channels
    got = tiny_vae.encode(mono, SR)
    want = tiny_vae.encode(np.repeat(mono, 2, axis=1), SR)
    assert got[0].shape == (1, 8, 25)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])

    # Whole hops: a length that is not one is zero-padded; another rate is resampled first.
    assert tiny_vae.prepare_audio(clip[:, :, : SR + 100]).shape == (1, 2, 26 * 1920)
    assert tiny_vae.prepare_audio(clip[:, :, :44100], sample_rate=44100).shape == (1, 2, 25 * 1920)
    assert frames_for(480000, SR, "songbloom") == 250 and frames_for(480000, SR, "stable_audio_open") == 216
    with pytest.raises(ValueError, match="3 channels"):
        tiny_vae.prepare_audio(np.zeros((1, 3, 1920), np.float32))


def _row(i: int, audio: np.ndarray) -> dict:
    return {"key": f"src_{i}", "audio48": audio,
            "meta": {"source": {"source_id": "src", "path": "/videos/src.mp4"}, "clip": {"index": i, "is_last": False}}}


def test_stage_end_to_end(tiny_files):
    from pipeline.config import _set
    from stages.vae_latents import VaeLatents

    config = Config.model_validate({"vae_latents": {"preset": "tiny", "config_file": tiny_files[0],
                                                    "checkpoint": tiny_files[1], "batch_size": 3}})
    updates = VaeLatents.prepare(config)
    assert set(updates) == {"vae_latents.config_file", "vae_latents.checkpoint"}
    data = config.model_dump()
    for key, value in updates.items():
        _set(data, key.split("."), value)
    stage = VaeLatents(Config.model_validate(data))
    assert stage.resources.batch_size == 3 and stage.resources.pool_size == 1
    stage.setup()

    rng = np.random.default_rng(0)
    good = (0.1 * rng.standard_normal((2, 10 * SR))).astype(np.float32)
    nan = good.copy()
    nan[0, 1000] = np.nan
    short = (0.1 * rng.standard_normal((2, 3 * SR))).astype(np.float32)  # another length: its own pass
    out = list(stage.process([_row(0, good), _row(1, nan), _row(2, short)]))

    rows = [o for o in out if isinstance(o, dict)]
    rejects = [o for o in out if isinstance(o, Reject)]
    assert [r["key"] for r in rows] == ["src_0", "src_2"]
    assert [(r.reason, r.key, r.level, r.clip_index) for r in rejects] == [("vae_failed", "src_1", "clip", 1)]
    assert "non-finite" in rejects[0].detail
    for row, frames in zip(rows, (250, 75)):
        assert row["latent"].dtype == row["latent_std"].dtype == np.float16
        assert row["latent"].shape == row["latent_std"].shape == (8, frames)
        assert row["meta"]["latent"] == {
            "vae": "tiny", "sample_rate": 48000, "hop": 1920, "latent_hz": 25.0, "channels": 8, "frames": frames,
            "precision": "fp32", "device": "cpu", "checkpoint": "tiny_vae.ckpt",
        }
    direct, _ = stage.vae.encode(good[None])
    np.testing.assert_allclose(rows[0]["latent"], direct[0], rtol=2e-3, atol=2e-3)  # float16 of the same numbers


def test_prepare_without_files_says_what_to_fetch(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from stages.vae_latents import VaeLatents

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(WeightsMissing) as err:
        VaeLatents.prepare(Config())
    msg = str(err.value)
    assert "CypressYang/SongBloom/stable_audio_1920_vae.json" in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download CypressYang/SongBloom stable_audio_1920_vae.json" in msg

    with pytest.raises(WeightsMissing, match="vae_latents.checkpoint"):
        VaeLatents.prepare(Config.model_validate({"vae_latents": {"preset": "tiny", "config_file": __file__}}))
    assert PRESETS["tiny"].repo is None
