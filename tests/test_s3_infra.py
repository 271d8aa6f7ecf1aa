"""The test infrastructure itself: a real S3 server (moto behind a TcpProxy that can go down) reached
only through the environment, and a real multi-node Ray cluster that subprocess drivers attach to."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from ray_nodes import local_cluster
from s3_server import upload_dir


def _fresh_fs(**kwargs):
    """A new s3fs client (no instance cache, no pooled connections), configured by env only."""
    import fsspec

    fs, _ = fsspec.core.url_to_fs("s3://any", skip_instance_cache=True, **kwargs)
    return fs


def _chain(exc: BaseException) -> list[type]:
    seen = []
    while exc is not None and len(seen) < 20:
        seen.append(type(exc))
        exc = exc.__cause__ or exc.__context__
    return seen


def test_env_alone_reaches_the_server_through_s3fs_and_pyarrow(s3_server, s3_bucket, tmp_path):
    import fsspec
    import pyarrow.fs as pafs

    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint
    fs, root = fsspec.core.url_to_fs(s3_bucket)
    assert fs.endpoint_url is None and not fs.client_kwargs  # nothing passed: the env did it
    fs.pipe(f"{root}/a/hello.txt", b"hello s3")
    assert fs.cat(f"{root}/a/hello.txt") == b"hello s3"

    # pyarrow over the same fsspec filesystem, as pyarrow.dataset / parquet would use it.
    pa_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    with pa_fs.open_output_stream(f"{root}/b/data.bin") as out:
        out.write(b"\x00\x01" * 1000)
    with pa_fs.open_input_stream(f"{root}/b/data.bin") as f:
        assert f.read() == b"\x00\x01" * 1000
    assert pa_fs.get_file_info(f"{root}/a/hello.txt").size == 8

    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "one.txt").write_text("1")
    (tmp_path / "d" / "sub" / "two.txt").write_text("22")
    keys = upload_dir(tmp_path / "d", f"{s3_bucket}/up")
    assert sorted(fs.find(f"{root}/up")) == keys == [f"{root}/up/one.txt", f"{root}/up/sub/two.txt"]
    assert fs.cat(f"{root}/up/sub/two.txt") == b"22"


def _settled(call, tries: int = 3):
    """A one-attempt client outside the outage: on a loaded 2-core CI machine a connect can fail
    once for reasons of its own (CI saw it before any pause); a real client's retries cover that."""
    for attempt in range(tries):
        try:
            return call()
        except Exception:  # noqa: BLE001 - retried, then re-raised
            if attempt == tries - 1:
                raise
            time.sleep(1.0)


def test_proxy_pause_refuses_connections_and_resume_restores_them(s3_server, s3_bucket):
    root = s3_bucket.removeprefix("s3://")
    pooled = _fresh_fs(config_kwargs={"retries": {"max_attempts": 1}})
    _settled(lambda: pooled.pipe(f"{root}/k", b"v"))  # this client now holds a keep-alive connection
    s3_server.proxy.pause()
    try:
        # One attempt each, or botocore's retries make this take ~10 s.
        for fs in (_fresh_fs(config_kwargs={"retries": {"max_attempts": 1}}), pooled):
            with pytest.raises(Exception) as info:
                fs.cat(f"{root}/k")
            chain = _chain(info.value)
            assert any(issubclass(t, ConnectionError) for t in chain), chain
    finally:
        s3_server.proxy.resume()
    assert _fresh_fs().cat(f"{root}/k") == b"v"
    assert _settled(lambda: pooled.cat(f"{root}/k")) == b"v"

    thread = s3_server.proxy.outage(0.5)
    assert s3_server.proxy.paused
    thread.join(timeout=5)
    assert not s3_server.proxy.paused and _fresh_fs().cat(f"{root}/k") == b"v"


# A driver in its own process, attached through RAY_ADDRESS: one SPREAD task per CPU slot, each
# reading the object from S3 with nothing but its environment.
SPREAD_DRIVER = textwrap.dedent("""
    import json, sys, ray
    ray.init()
    url, n = sys.argv[1], int(sys.argv[2])

    @ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
    def probe(url):
        import os, fsspec
        fs, path = fsspec.core.url_to_fs(url)
        return ray.get_runtime_context().get_node_id(), fs.cat(path).decode(), os.environ.get("AWS_ENDPOINT_URL")

    out = ray.get([probe.remote(url) for _ in range(n)], timeout=300)
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    print("RESULT " + json.dumps({"tasks": out, "alive": alive, "cpus": ray.cluster_resources().get("CPU")}))
""")


def run_driver(cluster, *args: str, timeout: float = 300) -> dict:
    done = subprocess.run([sys.executable, "-c", SPREAD_DRIVER, *args], env=cluster.driver_env(),
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (done.stdout + done.stderr)[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_multi_node_cluster_spreads_tasks_reads_s3_and_survives_a_node_loss(ray_local, s3_server, s3_bucket):
    import fsspec

    url = f"{s3_bucket}/probe.txt"
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe(path, b"from-s3")
    from ray.experimental import internal_kv
    session_kv = internal_kv.global_gcs_client
    with local_cluster(nodes=3) as cluster:
        workers = {n.node_id for n in cluster.worker_nodes}
        assert len(workers) == 3 and cluster.head_node.node_id not in workers
        assert cluster.live_node_ids() == workers | {cluster.head_node.node_id}

        first = run_driver(cluster, url, "6")
        ran_on = {node for node, _, _ in first["tasks"]}
        assert len(ran_on) >= 2 and ran_on <= workers, (ran_on, workers)  # head has 0 CPUs
        assert {(text, ep) for _, text, ep in first["tasks"]} == {("from-s3", s3_server.endpoint)}
        assert first["cpus"] == 3

        victim = cluster.worker_nodes[0]
        cluster.kill_node(victim, wait_dead=60)
        after = run_driver(cluster, url, "2")
        assert victim.node_id not in after["alive"] and len(after["alive"]) == 3
        assert {node for node, _, _ in after["tasks"]} <= workers - {victim.node_id}
        assert after["cpus"] == 2

    # The test process's own session Ray was left alone by all of this.
    assert ray_local.get(ray_local.remote(lambda: 41 + 1).remote(), timeout=120) == 42
    assert internal_kv.global_gcs_client is session_kv is not None
