"""model/generate.py end to end on CPU: a debug checkpoint in the trainer's format, the tiny CLIP and
VAE, a short synthetic video -> a wav of the requested duration and an mp4 with the video stream
copied and AAC audio; without VAE weights the CLI stops with the download hint."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import pytest
import soundfile as sf
import torch

from model.config import preset
from model.text import ByteTokenizer
from model.video_robin import VideoRobin

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from pipeline.synth.media import make_video
    from tiny_clip import make_tiny_clip
    from tiny_vae import make_tiny_vae

    folder = tmp_path_factory.mktemp("gen")
    video = folder / "in.mp4"
    make_video(video, seconds=3.0, fps=25.0, width=160, height=120, seed=3)
    clip_name, clip_config, clip_ckpt = make_tiny_clip(folder)
    vae_config, vae_ckpt = make_tiny_vae(folder)
    return {"folder": folder, "video": video, "clip": (clip_name, clip_config, clip_ckpt), "vae": (vae_config, vae_ckpt)}


def save_ckpt(path: Path, stage: str, vae: str = "tiny", clip_name: str = "tiny-clip-test", clip_file: str = "x.pt") -> None:
    """A checkpoint in the trainer's format (random weights, as only tests may use)."""
    torch.manual_seed(0)
    v2m = stage == "v2m"
    cfg = preset("debug", latent_channels=8, clip_dim=32, max_frames=64, use_video=v2m, use_rhythm=v2m)
    model = VideoRobin(cfg, ByteTokenizer.vocab_size)
    model.set_latent_stats(torch.zeros(8), torch.full((8,), 0.5))
    torch.save({
        "model": model.state_dict(), "ema": model.state_dict(), "optimizer": {}, "scheduler": {}, "step": 7,
        "config": cfg.to_dict(), "stage": stage,
        "data": {"latent": {"vae": vae, "sample_rate": 48000, "hop": 1920, "latent_hz": 25.0, "channels": 8,
                            "checkpoint": "tiny_vae.ckpt"},
                 "clip_embed": {"model": clip_name, "pretrained": clip_file, "dim": 32, "fps": 4.0} if v2m else None},
    }, path)


def weight_args(assets) -> list[str]:
    _, clip_config, clip_ckpt = assets["clip"]
    vae_config, vae_ckpt = assets["vae"]
    return [f"clip_embed.pretrained={clip_ckpt}", f"clip_embed.config_file={clip_config}",
            f"vae_latents.config_file={vae_config}", "--set", f"vae_latents.checkpoint={vae_ckpt}"]


def streams(path: Path) -> dict:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = sum(1 for p in c.demux(v) if p.size)
    with av.open(str(path)) as c:
        a = c.streams.audio[0] if c.streams.audio else None
        return {"video_codec": v.codec_context.name, "video_frames": frames, "size": (v.width, v.height),
                "audio_codec": a.codec_context.name if a else None, "audio_rate": a.rate if a else None,
                "audio_seconds": float(a.duration * a.time_base) if a and a.duration else None}


def test_v2m_video_to_mp4(assets, capsys):
    from model.generate import main

    ckpt = assets["folder"] / "v2m.pt"
    save_ckpt(ckpt, "v2m")
    out = assets["folder"] / "out.mp4"
    rc = main(["--ckpt", str(ckpt), "--video", str(assets["video"]), "--prompt", "calm piano", "--seconds", "2",
               "--steps", "2", "--out", str(out), *weight_args(assets)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    audio, rate = sf.read(str(out.with_suffix(".wav")), always_2d=True)
    assert rate == 48000 and audio.shape == (96000, 2)  # exactly the 2 s asked for, stereo
    src, got = streams(assets["video"]), streams(out)
    assert got["video_codec"] == src["video_codec"] and got["video_frames"] == src["video_frames"]
    assert got["size"] == src["size"]
    assert got["audio_codec"] == "aac" and got["audio_rate"] == 48000
    assert got["audio_seconds"] == pytest.approx(2.0, abs=0.1)
    assert "2.00 s" in printed and "48000 Hz" in printed and "CLIP tiny-clip-test" in printed


def test_t2m_wav_default_seconds_and_audio_cut_to_video(assets, capsys):
    from model.generate import main

    ckpt = assets["folder"] / "t2m.pt"
    save_ckpt(ckpt, "t2m")
    out = assets["folder"] / "t2m.wav"
    assert main(["--ckpt", str(ckpt), "--prompt", "", "--seconds", "0.7", "--steps", "1", "--cfg", "1",
                 "--out", str(out), *weight_args(assets)]) == 0
    audio, rate = sf.read(str(out), always_2d=True)
    assert rate == 48000 and audio.shape == (33600, 2)  # 0.7 s: not a whole number of patches
    # A t2m checkpoint on a video: the video sets the length (3 s, over the 2.56 s trained: capped)
    # and the soundtrack is cut to the video.
    mp4 = assets["folder"] / "t2m.mp4"
    assert main(["--ckpt", str(ckpt), "--video", str(assets["video"]), "--steps", "1", "--out", str(mp4),
                 *weight_args(assets)]) == 0
    audio, _ = sf.read(str(mp4.with_suffix(".wav")), always_2d=True)
    assert audio.shape[0] == 64 * 1920  # the trained length: 64 latent frames
    assert streams(mp4)["audio_codec"] == "aac"
    capsys.readouterr()
    # v2m without a video is refused.
    v2m = assets["folder"] / "v2m_novideo.pt"
    save_ckpt(v2m, "v2m")
    assert main(["--ckpt", str(v2m), "--out", str(assets["folder"] / "x.wav"), *weight_args(assets)]) != 0
    assert "--video" in capsys.readouterr().err


def test_missing_vae_weights_exit_with_hint(assets, tmp_path):
    ckpt = tmp_path / "songbloom.pt"
    save_ckpt(ckpt, "t2m", vae="songbloom")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, str(ROOT / "model" / "generate.py"), "--ckpt", str(ckpt), "--out",
                           str(tmp_path / "o.wav"), "--seconds", "1"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "hf download" in proc.stderr and "SongBloom" in proc.stderr
    assert not (tmp_path / "o.wav").exists()


def test_missing_clip_weights_exit_with_hint(assets, capsys):
    from model.generate import main

    ckpt = assets["folder"] / "v2m_noclip.pt"
    save_ckpt(ckpt, "v2m", clip_file="not-here.pt")
    vae_config, vae_ckpt = assets["vae"]
    out = assets["folder"] / "noclip.mp4"
    rc = main(["--ckpt", str(ckpt), "--video", str(assets["video"]), "--out", str(out),
               f"vae_latents.config_file={vae_config}", f"vae_latents.checkpoint={vae_ckpt}"])
    assert rc != 0
    assert "clip_embed weights" in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".wav").exists()
