"""pipeline/storage.py on a local disk and on a real S3 server: whole-file commits, listings that
see other writers, and clear refusals of outputs that cannot work."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from pipeline.registry import drops_after
from pipeline.storage import Storage, StorageError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "out"))
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(f"{bucket}/out")


def test_writes_commit_whole_files_and_listings_see_them(storage):
    storage.makedirs("shards", "index")
    storage.check_writable()
    storage.put_bytes("index/a.parquet", b"A")
    with storage.writing("shards/b.tar") as tmp:
        Path(tmp).write_bytes(b"B" * 1000)
        assert storage.names("shards") == []  # nothing under the final name before the commit
    staged = storage.staging("shards", ".tar")
    Path(staged).write_bytes(b"C")
    storage.commit(staged, "shards/c.tar")
    assert not Path(staged).exists()
    assert storage.names("shards", ".tar") == ["b.tar", "c.tar"] and storage.read_bytes("shards/b.tar") == b"B" * 1000
    # Another client writes: a listing must not answer from a cache.
    fs, root = fsspec.core.url_to_fs(storage.url("index/x.parquet"), skip_instance_cache=True)
    fs.pipe_file(root, b"X")
    assert storage.names("index", ".parquet") == ["a.parquet", "x.parquet"]
    storage.remove("index/a.parquet")
    storage.remove("index/never-there.parquet")  # removing what is gone is not an error
    assert storage.names("index") == ["x.parquet"] and not storage.exists("index/a.parquet")


def test_a_failed_write_leaves_nothing(storage):
    with pytest.raises(RuntimeError):
        with storage.writing("shards/broken.tar") as tmp:
            Path(tmp).write_bytes(b"half")
            raise RuntimeError("the writer died")
    assert storage.names("shards", hidden=True) == []


def test_outputs_that_cannot_work_are_refused(tmp_path, s3_server):
    with pytest.raises(StorageError, match="read-only"):
        Storage("https://example.com/out")
    # Straight to moto: S3 answers a PUT to a missing bucket before reading its body, which the test
    # proxy turns into a dropped connection (retried for a minute) where real S3 gives a clean 404.
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server.moto.url, "AWS_ENDPOINT_URL_S3": s3_server.moto.url}
    run = subprocess.run([sys.executable, str(ROOT / "pipeline/build.py"), "--input", str(tmp_path), "--output",
                          "s3://no-such-bucket-here/out", "runner.engine=loop", "clip_embed.on_missing=skip",
                          "vae_latents.on_missing=skip"], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 3, run.stderr[-2000:]
    assert "cannot write to s3://no-such-bucket-here/out: FileNotFoundError: The specified bucket does not exist" in run.stderr
    assert "s3:" not in {p.name for p in Path.cwd().iterdir()}  # never a local folder named after the URL


def test_arrays_stop_travelling_after_their_last_reader():
    stages = ["probe", "segment", "music_dsp", "visual_rhythm", "clip_embed", "vae_latents", "prompt_fusion", "writer"]
    drops = drops_after(stages)
    assert "frames" in drops["clip_embed"] and "audio16" in drops["music_dsp"] and "audio48" in drops["vae_latents"]
    assert {"flac", "jpg"} <= set(drops["writer"])  # encoded in segment: the writer reads bytes, not 40 frames
    assert "audio48" in drops_after([s for s in stages if s != "vae_latents"])["segment"]  # float audio never leaves segment
    without_clip = drops_after([s for s in stages if s != "clip_embed"])
    assert "frames" in without_clip["segment"]  # nothing reads them: they never leave the segment task
