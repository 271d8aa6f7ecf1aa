"""Remote inputs stream into the decoders through range reads (no local copy), give the same clips
as the local file, fall back to a bounded temporary copy only for what cannot stream, and turn
transient errors into retries and deferred (retryable) sources instead of permanent rejects.

The remote store is an in-process fsspec filesystem (`rangemem://`) whose files are fsspec's own
AbstractBufferedFile, so reads go through the real block cache as they do with s3fs or gcsfs; it
can drop the connection (a real ConnectionResetError from `read`) to simulate a flaky network."""
from __future__ import annotations

import errno
import os

import fsspec
import numpy as np
import pytest
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from pipeline import sources
from pipeline.sources import open_input
from pipeline.stage import Reject, RunContext
from pipeline.synth.media import make_video
from stages.probe import Probe
from stages.segment import Segment

from helpers import small_config


class RangeMemoryFS(AbstractFileSystem):
    """Objects in a dict, read by byte ranges. Test scaffolding: it records how it is opened and
    read, and can make reads fail like a dropped connection."""

    protocol = "rangemem"
    blobs: dict[str, bytes] = {}
    opens: list[dict] = []
    fetches: list[tuple[int, int]] = []
    fail_first_reads = 0  # this many opened files raise on their first read
    fail_after_bytes: int | None = None  # every file raises once it has returned this many bytes
    failures = 0

    @classmethod
    def reset(cls):
        cls.opens, cls.fetches = [], []
        cls.fail_first_reads, cls.fail_after_bytes, cls.failures = 0, None, 0

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        if path not in self.blobs:
            raise FileNotFoundError(errno.ENOENT, "No such object", path)
        return {"name": path, "size": len(self.blobs[path]), "type": "file"}

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, cache_type="readahead", **kwargs):
        self.opens.append({"path": path, "block_size": block_size, "cache_type": cache_type, "cache_options": cache_options})
        return RangeFile(self, path, mode, block_size=block_size, cache_type=cache_type, cache_options=cache_options)


class RangeFile(AbstractBufferedFile):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.returned = 0
        cls = type(self.fs)
        self.fail_first = cls.fail_first_reads > 0
        cls.fail_first_reads -= self.fail_first

    def _fetch_range(self, start, end):
        type(self.fs).fetches.append((start, end))
        return self.fs.blobs[self.path][start:end]

    def read(self, length=-1):
        cls = type(self.fs)
        limit = cls.fail_after_bytes
        if self.fail_first or (limit is not None and self.returned >= limit):
            self.fail_first = False
            cls.failures += 1
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        data = super().read(length)
        self.returned += len(data)
        return data


class NoSeekMemoryFS(RangeMemoryFS):
    """The same objects, served like an HTTP server without range support: not seekable."""

    protocol = "noseekmem"

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, cache_type="readahead", **kwargs):
        self.opens.append({"path": path, "block_size": block_size, "cache_type": cache_type, "cache_options": cache_options})
        return NoSeekFile(self, path, mode, block_size=block_size, cache_type=cache_type, cache_options=cache_options)


class NoSeekFile(RangeFile):
    def seekable(self):
        return False


fsspec.register_implementation("rangemem", RangeMemoryFS, clobber=True)
fsspec.register_implementation("noseekmem", NoSeekMemoryFS, clobber=True)
REMOTE = "rangemem://bucket/videos/v.mp4"
NOSEEK = "noseekmem://bucket/videos/v.mp4"


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 24 s video (two clips; its moov atom is at the end, so streaming it needs seeks),
    local and in the remote store."""
    path = tmp_path_factory.mktemp("remote") / "v.mp4"
    make_video(path, seconds=24.0, seed=31)
    RangeMemoryFS.blobs["bucket/videos/v.mp4"] = path.read_bytes()
    yield path
    RangeMemoryFS.blobs.pop("bucket/videos/v.mp4", None)


@pytest.fixture
def store():
    RangeMemoryFS.reset()
    yield RangeMemoryFS
    RangeMemoryFS.reset()


@pytest.fixture
def tmpdir_watch(tmp_path, monkeypatch):
    """tempfile's folder, empty to begin with: where a local copy would appear."""
    import tempfile

    folder = tmp_path / "tempdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def config(**overrides):
    # PyAV on both sides: remote inputs always decode with PyAV, so the frames must be identical.
    return small_config(**{"sources.io_backoff_seconds": "0.01", **overrides})


def probe_row(cfg, path):
    row = next(Probe(cfg).process([{"key": "x", "meta": {"source": {"path": str(path), "input_index": 0}}}]))
    assert not isinstance(row, Reject), row
    return row


def segment(cfg, row, done=frozenset(), watch=None):
    """(items, counters, temp folder listing at each item) of the segment stage on one row."""
    stage = Segment(cfg, RunContext(output_dir="unused", run_id="test", done_keys=frozenset(done)))
    items, listings = [], []
    for item in stage.process([row]):
        items.append(item)
        listings.append(sorted(os.listdir(watch)) if watch is not None else None)
    return items, stage.take_counters(), listings


@pytest.fixture(scope="module")
def local(video):
    cfg = config()
    row = probe_row(cfg, video)
    clips, _, _ = segment(cfg, row)
    assert len(clips) == 2 and all(isinstance(c, dict) for c in clips)
    return row, clips


def test_open_input_local_and_remote(video, store):
    local = open_input(str(video))
    assert local.local_path == str(video) and not local.remote
    assert open_input(f"file://{video}").local_path == str(video)
    remote = open_input(REMOTE, small_config().sources)
    assert remote.local_path is None and remote.remote
    with remote.open() as a, remote.open() as b:  # independent readers
        a.seek(1000)
        assert b.read(10) == video.read_bytes()[:10] and a.read(10) == video.read_bytes()[1000:1010]
    assert [o["cache_type"] for o in store.opens] == [sources.STREAM_CACHE_TYPE] * 2
    assert [o["block_size"] for o in store.opens] == [sources.STREAM_BLOCK_SIZE] * 2


def test_remote_input_streams_to_the_same_clips_without_a_copy(video, local, store, tmpdir_watch):
    cfg = config()
    local_row, local_clips = local
    row = probe_row(cfg, REMOTE)
    assert row["key"] == local_row["key"]  # content ids come from the bytes
    assert row["meta"]["probe"] == local_row["meta"]["probe"]
    probe_opens = len(store.opens)
    # content_id reads its three 1 MiB windows as exact ranges, not whole blocks
    assert store.opens[0]["cache_type"] == "none"

    clips, counters, listings = segment(cfg, row, watch=tmpdir_watch)
    assert all(isinstance(c, dict) for c in clips), clips
    assert [c["key"] for c in clips] == [c["key"] for c in local_clips]
    for got, want in zip(clips, local_clips):
        g, w = got["meta"]["clip"], want["meta"]["clip"]
        assert (g["start"], g["end"], g["cut_times"], g["is_last"]) == (w["start"], w["end"], w["cut_times"], w["is_last"])
        assert g["decoder"] == "pyav"
        np.testing.assert_array_equal(got["frames"], want["frames"])
        np.testing.assert_array_equal(got["audio48"], want["audio48"])
        np.testing.assert_array_equal(got["motion_25hz"], want["motion_25hz"])
    # No local copy, ever: the temp folder stayed empty and the fallback never ran.
    assert listings == [[]] * len(clips) and os.listdir(tmpdir_watch) == []
    assert "segment.local_copies" not in counters
    # The frame decoder and the audio track each read their own stream of range requests.
    seg_opens = store.opens[probe_opens:]
    assert len(seg_opens) == 2
    assert all((o["cache_type"], o["block_size"]) == ("blockcache", sources.STREAM_BLOCK_SIZE) for o in seg_opens)


def test_a_missing_remote_input_is_missing(store):
    got = next(Probe(config()).process([{"key": "x", "meta": {"source": {"path": "rangemem://bucket/none.mp4", "input_index": 0}}}]))
    assert (got.reason, got.retryable) == ("missing_file", False)


def test_transient_errors_before_the_first_clip_are_retried(video, local, store):
    cfg = config()
    row = probe_row(cfg, REMOTE)
    store.fail_first_reads = 2  # two attempts fail on their first read, the third streams
    clips, counters, _ = segment(cfg, row)
    assert store.failures == 2
    assert [c["key"] for c in clips] == [c["key"] for c in local[1]]
    assert [c["meta"]["clip"]["is_last"] for c in clips] == [False, True]


def test_transient_errors_that_outlast_the_retries_defer_the_source(video, store):
    cfg = config(**{"sources.io_attempts": "3"})
    row = probe_row(cfg, REMOTE)
    store.fail_first_reads = 100
    items, _, _ = segment(cfg, row)
    assert store.failures == 3
    assert len(items) == 1 and isinstance(items[0], Reject)
    reject = items[0]
    assert (reject.stage, reject.reason, reject.retryable, reject.level) == ("segment", "io_error", True, "source")
    assert reject.key == row["key"] and "ConnectionResetError" in reject.detail


def test_a_transient_error_mid_video_defers_the_rest_and_the_rerun_finishes(video, local, store):
    cfg = config()
    row = probe_row(cfg, REMOTE)
    store.fail_after_bytes = int(len(store.blobs["bucket/videos/v.mp4"]) * 0.75)  # after the first clip
    items, _, _ = segment(cfg, row)
    assert store.failures >= 1
    clips = [i for i in items if isinstance(i, dict)]
    rejects = [i for i in items if isinstance(i, Reject)]
    assert [c["key"] for c in clips] == [local[1][0]["key"]]
    assert not any(c["meta"]["clip"]["is_last"] for c in clips)  # the source is not finished
    assert isinstance(items[-1], Reject) and len(rejects) == 1
    assert (rejects[0].reason, rejects[0].retryable, rejects[0].level, rejects[0].is_last_clip) == ("io_error", True, "source", False)
    np.testing.assert_array_equal(clips[0]["frames"], local[1][0]["frames"])  # the clip that left is whole

    store.fail_after_bytes = None  # the network is back: the rerun skips what is done and finishes
    again, _, _ = segment(cfg, row, done={clips[0]["key"]})
    assert [c["key"] for c in again] == [c["key"] for c in local[1][1:]]
    assert again[-1]["meta"]["clip"]["is_last"]


def noseek_row(cfg, local_row):
    """Probe reads the header of a file it cannot seek in (FFmpeg reads through to the moov atom
    at the end); decoding then needs to go back to the media data, which it cannot."""
    row = probe_row(cfg, NOSEEK)
    assert row["key"] == local_row["key"]
    return row


def test_what_cannot_stream_decodes_from_a_copy_that_is_deleted(video, local, store, tmpdir_watch):
    cfg = config()
    row = noseek_row(cfg, local[0])
    items, counters, listings = segment(cfg, row, watch=tmpdir_watch)
    assert [c["key"] for c in items] == [c["key"] for c in local[1]], items
    assert counters.get("segment.local_copies") == 1
    # While clips were being cut the copy existed (whole); it was gone before the last clip left.
    (name,) = listings[0]
    assert name.startswith(sources.COPY_PREFIX) and name.endswith(".mp4")
    assert listings[-1] == [] and os.listdir(tmpdir_watch) == []
    assert items[-1]["meta"]["clip"]["is_last"]


def test_the_copy_respects_max_local_copy_bytes(video, local, store, tmpdir_watch):
    size = len(store.blobs["bucket/videos/v.mp4"])
    cfg = config(**{"sources.max_local_copy_bytes": str(size - 1)})
    row = noseek_row(cfg, local[0])
    items, counters, _ = segment(cfg, row, watch=tmpdir_watch)
    assert len(items) == 1 and isinstance(items[0], Reject)
    assert (items[0].reason, items[0].retryable) == ("too_large_to_copy", False)
    assert "max_local_copy_bytes" in items[0].detail
    assert "segment.local_copies" not in counters and os.listdir(tmpdir_watch) == []
    # Without a size from the probe, the store's size decides, and nothing is left behind.
    with pytest.raises(sources.TooLargeToCopy):
        with sources.local_copy(NOSEEK, max_bytes=size // 2, size=None):
            pass
    assert os.listdir(tmpdir_watch) == []
    cfg_ok = config(**{"sources.max_local_copy_bytes": str(size), "segment.max_clips_per_video": "1"})
    items, counters, _ = segment(cfg_ok, noseek_row(cfg_ok, local[0]), watch=tmpdir_watch)
    assert counters.get("segment.local_copies") == 1 and [i["key"] for i in items] == [local[1][0]["key"]]
