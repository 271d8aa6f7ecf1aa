"""`ray job submit` of pipeline/build.py against a real `ray start --head` cluster with token auth."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline.synth import make_video

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_dashboard(port: int, head: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"dashboard on port {port} never came up")


@pytest.fixture
def head(tmp_path):
    """A head node in its own process group (ray stop would also kill the tests' own Ray)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    # The documented set-up: a token in ~/.ray/auth_token, RAY_AUTH_MODE=token for server and clients.
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    assert (home / ".ray" / "auth_token").exists()
    dash = free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", f"--port={free_port()}",
           "--include-dashboard=true", f"--dashboard-port={dash}", f"--temp-dir=/tmp/rayjob{os.getpid()}",
           # Its own agent ports: the tests' session Ray already holds the default ones, and a head
           # whose job agent cannot bind answers every submit with "No available agent".
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--ray-client-server-port={free_port()}",
           f"--object-store-memory={256 << 20}"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_dashboard(dash, proc)
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_ray_job_submit_against_a_local_head(head, tmp_path):
    env, address = head
    videos, out = tmp_path / "videos", tmp_path / "out"
    for i in range(2):
        make_video(videos / f"v{i}.mp4", seconds=12.0, seed=60 + i)
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
              "python", "pipeline/build.py", "--input", str(videos), "--output", str(out), "runner.progress_bars=false",
              "clip_embed.on_missing=skip", "vae_latents.on_missing=skip"]

    # Without the token the job server refuses, and says why.
    no_token = subprocess.run(submit, env={**env, "RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert no_token.returncode != 0 and "token" in (no_token.stdout + no_token.stderr).lower()

    code, log = submit_when_ready(submit, env)
    assert code == 0, log[-4000:]
    assert "succeeded" in log.lower() and "counts reconcile" in log
    assert "embedded local Ray" not in log  # it attached to the cluster
    keys = pads.dataset(str(out / "index")).to_table(columns=["key"]).column("key").to_pylist()
    assert len(keys) == 2 and len(list((out / "runs").glob("*.json"))) == 1


def submit_when_ready(submit: list[str], env: dict) -> tuple[int, str]:
    for _ in range(30):  # the job agent starts a little after the dashboard answers
        done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=420)
        log = done.stdout + done.stderr
        if "No available agent" not in log:
            break
        time.sleep(2)
    return done.returncode, log


def test_training_under_ray_job_submit(head, feature_shards, tmp_path):
    """model/train.py --workers 2 as a Ray job: it attaches to the cluster (no local Ray of its own),
    runs DDP on two gloo workers there and writes its checkpoint into the (absolute) --out."""
    import json

    env, address = head
    shards, _ = feature_shards
    run = tmp_path / "run"
    code, log = submit_when_ready(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
         "python", "model/train.py", "--stage", "t2m", "--shards", str(shards), "--out", str(run), "--preset", "debug",
         "--workers", "2", "--steps", "3", "--batch-size", "2", "--num-workers", "0", "--warmup", "1",
         "--stats-batches", "1", "--log-every", "1", "--no-tensorboard"], env)
    assert code == 0, log[-4000:]
    assert "succeeded" in log.lower()
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["world_size"], r["step"]) for r in ranks] == [(2, 3), (2, 3)]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]  # DDP kept the two ranks identical
    assert len(list((run / "checkpoints").glob("*.pt"))) == 1
