"""`model/train.py --workers 2`: the training loop under Ray Train's TorchTrainer (DDP over gloo) on
the session's 2-CPU local Ray; shards written by the real pipeline."""
from __future__ import annotations

import json

import torch

from model.checkpoint import list_checkpoints, load_checkpoint
from model.train import main, parameter_digest

STEPS = 4


def test_two_gloo_workers_keep_identical_parameters(ray_local, feature_shards, tmp_path):
    out, _ = feature_shards
    run_dir = tmp_path / "ddp"
    summary = main(["--stage", "t2m", "--shards", str(out), "--out", str(run_dir), "--preset", "debug",
                    "--steps", str(STEPS), "--batch-size", "2", "--num-workers", "0", "--warmup", "1",
                    "--stats-batches", "2", "--shuffle-buffer", "4", "--log-every", "1", "--ckpt-every", "100",
                    "--no-tensorboard", "--workers", "2"])
    ranks = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["step"] for r in ranks] == [STEPS, STEPS]  # the same number of steps on both ranks
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]  # DDP kept them in lockstep
    assert ranks[0]["samples"] == ranks[1]["samples"] == 2 * STEPS
    assert ranks[0]["keys_sha256"] != ranks[1]["keys_sha256"]  # but each rank read its own stream
    # Rank 0 alone wrote the checkpoint and the metrics, once.
    assert [p.name for p in list_checkpoints(run_dir)] == [f"step_{STEPS:08d}.pt"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    ckpt = load_checkpoint(run_dir)
    assert ckpt["resume"]["world_size"] == 2 and ckpt["step"] == STEPS
    # The checkpoint holds the trained (unwrapped) weights the ranks agree on.
    from model.config import VideoRobinConfig
    from model.video_robin import VideoRobin

    model = VideoRobin(VideoRobinConfig.from_dict(ckpt["config"]), ckpt["vocab_size"])
    model.load_state_dict(ckpt["model"])
    assert parameter_digest(model) == ranks[0]["params_sha256"]
    assert summary["step"] == STEPS and summary["params_sha256"] == ranks[0]["params_sha256"]
    assert torch.isfinite(torch.tensor(rows[-1]["loss"]))
