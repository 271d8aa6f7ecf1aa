"""The pipeline as it runs at scale, against real parts: a real S3-compatible server (moto) for
inputs and outputs, a 3-node Ray cluster that loses a node mid-run, a store that goes down for a
few seconds, tasks that raise or die at the worst moment. Each ends with exactly the keys of an
uninterrupted run, none twice, no partial shard, and counts that reconcile."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest

from pipeline.build import build
from pipeline.faults import ENV as FAULTS_ENV, arm, fired
from shards.index import Out

from helpers import small_config
from s3_server import upload_dir

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
SETTINGS = {"writer.samples_per_shard": "2", "runner.first_chunk_sources": "2"}


def committed_keys(out: str) -> list[str]:
    fsspec.core.url_to_fs(out)[0].invalidate_cache()  # a retried writer rewrote files this process listed
    return sorted(Out(out).index().to_table(columns=["key"]).column("key").to_pylist())


def assert_exactly(out: str, expected: list[str]) -> None:
    """The same keys, none twice, every tar committed (an index file each) and readable."""
    keys = committed_keys(out)
    assert keys == expected, (len(keys), len(expected))
    o = Out(out)
    tars = [p.rsplit("/", 1)[-1].removesuffix(".tar") for p in o.tar_files()]
    assert sorted(tars) == sorted(p.rsplit("/", 1)[-1].removesuffix(".parquet") for p in o.index_files())
    from shards.browse.__main__ import main as browse

    assert browse([out, "verify"]) == 0


@pytest.fixture(scope="module")
def reference(media_dir, tmp_path_factory) -> list[str]:
    """Keys of an uninterrupted single-process run over the same videos."""
    out = tmp_path_factory.mktemp("reference")
    build(str(media_dir), str(out), small_config(**{**SETTINGS, "runner.engine": "loop"}), quiet=True)
    return committed_keys(str(out))


def wait_for(predicate, seconds: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}")
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def has_index(out: str) -> bool:
    fs, root = fsspec.core.url_to_fs(out)
    try:
        return any(p.endswith(".parquet") for p in fs.ls(f"{root}/index", detail=False, refresh=True))
    except FileNotFoundError:
        return False


def build_cmd(inp: str, out: str, *settings: str) -> list[str]:
    return [sys.executable, str(ROOT / "pipeline/build.py"), "--input", inp, "--output", out,
            "runner.progress_bars=false", "clip_embed.on_missing=skip", "vae_latents.on_missing=skip",
            *(f"{k}={v}" for k, v in SETTINGS.items()), *settings]


def records(out: str) -> list[dict]:
    return Out(out).run_records()


# --- object storage --------------------------------------------------------------------------------

def test_build_reads_and_writes_s3_and_resumes_there(ray_local, s3_bucket, media_dir, reference, tmp_path, monkeypatch):
    upload_dir(media_dir, f"{s3_bucket}/videos")
    monkeypatch.chdir(tmp_path)  # `--output s3://...` once became a local folder "s3:/..." in the cwd
    out = f"{s3_bucket}/curated"
    record = build(f"{s3_bucket}/videos", out, small_config(**SETTINGS), quiet=True)
    c = record["counts"]
    assert c["sources_reconcile"] and c["clips_reconcile"] and c["deferred_sources"] == 0
    assert c["clips_written"] == len(reference) and record["output_dir"] == out
    assert list(tmp_path.iterdir()) == []  # nothing landed on the local disk: not here, nor where the
    assert not (ROOT / "s3:").exists() and not Path(os.getcwd(), "s3:").exists()  # Ray workers run
    assert_exactly(out, reference)
    assert [r["run_id"] for r in records(out)] == [record["run_id"]]
    fs, root = fsspec.core.url_to_fs(out)
    assert fs.ls(f"{root}/probe/{record['run_id']}", detail=False)  # probe results went to the output too
    again = build(f"{s3_bucket}/videos", out, small_config(**SETTINGS), quiet=True)
    assert again["inputs_skipped"] == 3 and again["counts"]["clips"] == 0 and again["shards_written"] == 0
    assert_exactly(out, reference)


def test_a_store_outage_mid_run_loses_and_rejects_nothing(ray_local, s3_server, s3_bucket, media_dir, reference):
    """The endpoint refuses every connection for 4 s after the first shard landed: reads and
    commits are retried (botocore's own retries, then ours), nothing becomes a reject."""
    upload_dir(media_dir, f"{s3_bucket}/videos")
    out = f"{s3_bucket}/curated"
    window: dict[str, float] = {}

    def outage() -> None:
        wait_for(lambda: has_index(out), 300, "the first shard")
        window["start"] = time.time()
        s3_server.proxy.outage(4.0).join()
        window["end"] = time.time()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    started = time.time()
    record = build(f"{s3_bucket}/videos", out, small_config(**SETTINGS), quiet=True)
    finished = time.time()
    thread.join(10)
    assert started < window["start"] < finished, "the outage must fall inside the run"
    c = record["counts"]
    assert record["rejects"] == [] and c["deferred_sources"] == 0, record["rejects"]
    assert c["sources_reconcile"] and c["clips_reconcile"]
    assert_exactly(out, reference)


# --- a real multi-node cluster ---------------------------------------------------------------------

def test_a_worker_node_lost_mid_run(media_dir, s3_bucket, reference, tmp_path):
    """3 worker nodes; one is SIGKILLed (raylet, object store, workers) after the first shard is
    committed to S3. The run finishes, or a rerun resumes, to exactly the reference keys."""
    from ray_nodes import local_cluster

    out = f"{s3_bucket}/curated"
    with local_cluster(nodes=3, cpus_per_node=1) as cluster:
        env = cluster.driver_env()
        driver = subprocess.Popen(build_cmd(str(media_dir), out), env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            wait_for(lambda: has_index(out), 300, "the first shard", driver)
            cluster.kill_node(cluster.worker_nodes[0])
            log, _ = driver.communicate(timeout=400)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
        runs = [driver.returncode]
        if driver.returncode != 0:  # the run may give up on the lost node: a rerun resumes it
            rerun = subprocess.run(build_cmd(str(media_dir), out), env=env, capture_output=True, text=True, timeout=400)
            runs.append(rerun.returncode)
            log += rerun.stdout + rerun.stderr
    assert runs[-1] == 0, log[-4000:]
    assert re.search(r"counts reconcile\s+yes", log), log[-4000:]
    assert_exactly(out, reference)
    nodes = {name.rsplit(".", 1)[-1] for r in records(out) for name in r["counters"] if name.startswith("segment.calls_on_node.")}
    assert len(nodes) >= 2, nodes  # the videos were decoded on more than one node


# --- tasks that fail at the worst moment ------------------------------------------------------------

def test_a_task_that_raises_and_a_writer_killed_before_its_index(media_dir, reference, tmp_path):
    """music_dsp raises once and a writer process dies after its tars are up but before its index
    file: Ray runs both tasks again, the retried writer overwrites its own content-named tars."""
    faults = tmp_path / "faults"
    arm(str(faults), "stage.music_dsp", "raise")
    arm(str(faults), "writer.after_tar", "kill")
    out = tmp_path / "out"
    env = {**os.environ, FAULTS_ENV: str(faults)}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(build_cmd(str(media_dir), str(out), "runner.num_cpus=2"), env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert fired(str(faults), "stage.music_dsp") and fired(str(faults), "writer.after_tar")
    (record,) = records(str(out))
    assert record["rejects"] == [] and record["counts"]["clips_written"] == len(reference)
    assert_exactly(str(out), reference)


def test_a_run_killed_while_a_tar_has_no_index_resumes_to_one_copy(media_dir, reference, tmp_path):
    faults = tmp_path / "faults"
    arm(str(faults), "writer.after_tar", "hang")
    out = tmp_path / "out"
    env = {**os.environ, FAULTS_ENV: str(faults)}
    env.pop("RAY_ADDRESS", None)
    cmd = build_cmd(str(media_dir), str(out), "runner.num_cpus=2")
    driver = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: fired(str(faults), "writer.after_tar"), 300, "the writer to hang", driver)
        orphan = sorted(p.name for p in (out / "shards").glob("*.tar"))
        assert orphan and not list((out / "index").glob("*.parquet"))  # a tar is up, no index names it
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (record,) = records(str(out))  # the killed run never wrote a record
    assert record["temporaries_removed"] >= 1  # the uncommitted tar was removed before the rerun wrote
    assert_exactly(str(out), reference)
    assert json.loads(json.dumps(record["counts"]))["duplicate_keys"] == 0
