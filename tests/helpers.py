"""Helpers shared by the test modules (import as `from helpers import ...`)."""
from __future__ import annotations

import json
from pathlib import Path


def load_truth(video: Path) -> dict:
    return json.loads(video.with_suffix(".truth.json").read_text())


def small_config(**overrides):
    """The test preset: no progress bars, small shards, a 2-CPU local Ray, and the model stages
    skipped for want of weights (tests that need them pass tiny models; see test_features_e2e)."""
    from pipeline.config import load_config

    items = {
        "runner.progress_bars": "false", "runner.num_cpus": "2", "writer.samples_per_shard": "4",
        "clip_embed.on_missing": "skip", "vae_latents.on_missing": "skip", **overrides,
    }
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def stable_audio_tools_stand_ins() -> None:
    """Two modules in stable-audio-tools' import chain cannot be imported here; each gets a stand-in
    that only satisfies the import (shared, so tests in one session agree on what they see):
      torchaudio  PyPI's wheels are CUDA 13.0 builds that refuse to load beside torch 2.15+cu132
                  ("compiled with different CUDA versions"); stable-audio-tools uses only
                  torchaudio.transforms.Resample, in pretransforms and input preprocessing.
      clip        OpenAI CLIP (clip-anytorch) imports pkg_resources, gone from setuptools >= 81;
                  only k_diffusion.evaluation (FID/CLIP metrics) imports it."""
    import importlib
    import sys
    import types

    import torch

    for name in ("torchaudio", "clip"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - not installed, or installed but unloadable
            for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[mod]
            stub = types.ModuleType(name)
            stub.__path__ = []  # a package, so `from torchaudio import transforms` finds the submodule
            sys.modules[name] = stub
            if name == "torchaudio":
                transforms = types.ModuleType("torchaudio.transforms")
                transforms.Resample = type("Resample", (torch.nn.Module,), {})  # never constructed
                stub.transforms = sys.modules["torchaudio.transforms"] = transforms
