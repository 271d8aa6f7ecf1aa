"""model/train.py, single process, debug preset, on shards written by the real pipeline: outputs,
checkpoint contents, exact resume, and the t2m -> v2m hand-off through the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import list_checkpoints, load_checkpoint
import model.train
from model.train import main

TRAIN_PY = Path(model.train.__file__).resolve()
REPO = TRAIN_PY.parents[1]
K = 3  # the resume test: 2K steps in one go vs K steps, stop, resume to 2K
CONTRACT = {"model", "ema", "optimizer", "scheduler", "step", "config", "stage", "data", "train_args"}


def common(shards: Path, out: Path, *extra: str) -> list[str]:
    # epoch_steps=2: the 6 steps cross epochs, and the stop at step 3 falls inside one.
    return ["--shards", str(shards), "--out", str(out), "--preset", "debug", "--batch-size", "2", "--num-workers", "0",
            "--warmup", "2", "--stats-batches", "2", "--shuffle-buffer", "4", "--epoch-steps", "2", "--log-every", "1",
            *extra]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def t2m(feature_shards, tmp_path_factory):
    """One uninterrupted t2m run of 2K steps, checkpoint every K."""
    out, _ = feature_shards
    run_dir = tmp_path_factory.mktemp("t2m-straight")
    main(["--stage", "t2m", "--steps", str(2 * K), "--ckpt-every", str(K), *common(out, run_dir)])
    return run_dir


def test_outputs_and_checkpoint_contract(t2m):
    rows = [json.loads(line) for line in (t2m / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 2 * K + 1))
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "steps_per_s"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert list((t2m / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert [p.name for p in list_checkpoints(t2m)] == [f"step_{K:08d}.pt", f"step_{2 * K:08d}.pt"]
    ckpt = torch.load(list_checkpoints(t2m)[-1], weights_only=True)  # tensors, dicts, lists, numbers, strings
    assert CONTRACT <= set(ckpt)
    assert ckpt["step"] == 2 * K and ckpt["stage"] == "t2m"
    assert ckpt["config"]["latent_channels"] == 8 and ckpt["config"]["use_video"] is False
    assert ckpt["data"]["latent"]["channels"] == 8 and ckpt["data"]["clip_embed"] is None
    assert set(ckpt["ema"]) == set(ckpt["model"])
    # The latent statistics were measured (not the identity defaults) and travel in the weights.
    assert not torch.equal(ckpt["model"]["latent_std"], torch.ones(8))
    # The EMA has moved from the initial weights but is not the live weights.
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])


def test_resume_gives_the_same_curve(t2m, feature_shards, tmp_path):
    out, _ = feature_shards
    run_dir = tmp_path / "t2m-resumed"
    args = ["--stage", "t2m", "--steps", str(2 * K), "--ckpt-every", "100", *common(out, run_dir)]
    main([*args, "--stop-at", str(K)])
    assert [p.name for p in list_checkpoints(run_dir)] == [f"step_{K:08d}.pt"]
    assert sorted(losses(run_dir)) == list(range(1, K + 1))
    summary = main(args)  # the same command again: resumes from step K
    assert summary["step"] == 2 * K
    straight, resumed = losses(t2m), losses(run_dir)
    assert sorted(resumed) == list(range(1, 2 * K + 1))
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
    a, b = load_checkpoint(t2m), load_checkpoint(run_dir)
    for part in ("model", "ema"):
        for key, value in a[part].items():
            assert torch.allclose(value, b[part][key], atol=1e-6, rtol=0), (part, key)


def test_v2m_init_through_the_cli_loads_every_t2m_weight(t2m, feature_shards, tmp_path):
    out, _ = feature_shards
    t2m_ckpt = list_checkpoints(t2m)[-1]
    run_dir = tmp_path / "v2m"
    cmd = [sys.executable, str(TRAIN_PY), "--stage", "v2m", "--init", str(t2m_ckpt),
           "--steps", "0", *common(out, run_dir), "--no-tensorboard"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "t2m tensors loaded" in done.stdout
    t2m_weights = load_checkpoint(t2m_ckpt)["model"]
    v2m = load_checkpoint(run_dir)
    assert v2m["step"] == 0 and v2m["stage"] == "v2m" and v2m["config"]["use_video"] is True
    assert v2m["config"]["clip_dim"] == 32 and v2m["data"]["clip_embed"]["dim"] == 32
    for key, value in t2m_weights.items():  # every t2m weight, unchanged, in the model and its EMA
        assert torch.equal(v2m["model"][key], value), key
        assert torch.equal(v2m["ema"][key], value), key
    report = json.loads((run_dir / "init_report.json").read_text())
    assert sorted(report["loaded"]) == sorted(t2m_weights)
    new = set(v2m["model"]) - set(t2m_weights)
    assert new and set(report["new"]) == new
    assert all("video" in k for k in new), new  # only the video projection is new


def test_v2m_freeze_keeps_those_parts(t2m, feature_shards, tmp_path):
    out, _ = feature_shards
    t2m_weights = load_checkpoint(t2m)["model"]
    run_dir = tmp_path / "v2m-frozen"
    summary = main(["--stage", "v2m", "--init", str(t2m), "--steps", "2", "--freeze", "lm,text",
                    *common(out, run_dir), "--no-tensorboard"])
    frozen = summary["frozen"]
    assert frozen and all(k in t2m_weights for k in frozen)
    trained = load_checkpoint(run_dir)["model"]
    for key in frozen:
        assert torch.equal(trained[key], t2m_weights[key]), key
    moved = [k for k in t2m_weights if k not in frozen and not torch.equal(trained[k], t2m_weights[k])]
    assert any(k.startswith("dit.") for k in moved)  # the rest did train


def test_clear_errors(feature_shards, tmp_path):
    out, _ = feature_shards
    with pytest.raises(FileNotFoundError, match="matches no shard"):
        main(["--stage", "t2m", *common(tmp_path / "empty", tmp_path / "run")])
    with pytest.raises(ValueError, match="expected a t2m checkpoint"):
        v2m_dir = tmp_path / "v2m"
        main(["--stage", "v2m", "--steps", "0", *common(out, v2m_dir), "--no-tensorboard"])
        main(["--stage", "v2m", "--init", str(v2m_dir), "--steps", "0", *common(out, tmp_path / "again"),
              "--no-tensorboard"])
