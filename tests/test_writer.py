"""Shard writer and progress scan: atomic content-named shards, index rows, rolling, rejects and
statistics committed with the batch, retries that overwrite, resume aggregates."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import webdataset as wds

import pytest

from pipeline.carry import attach_stats, reject_row
from pipeline.ownership import Superseded, claim
from pipeline.progress import Progress, clean_uncommitted, committed_metadata
from pipeline.stage import Reject, RunContext
from pipeline.storage import Storage
from shards.media import encode_media
from shards.schema import STATS_META_KEY
from shards.writer import Writer, content_name

from helpers import small_config


def clip_row(i: int, source: str = "s1", last: bool = False) -> dict:
    rng = np.random.default_rng(i)
    row = {
        "key": f"{source}_{i * 10000:08d}",
        "meta": {
            "source": {"path": f"/videos/{source}.mp4", "source_id": source},
            "probe": {"duration": 60.0, "video": {"codec": "h264", "width": 320, "height": 240, "fps": 25.0}, "audio": {"channels": 2, "sample_rate": 48000}},
            "clip": {"index": i, "start": i * 10.0, "end": i * 10.0 + 10, "duration": 10.0, "cut_times": [], "shots": [[0.0, 10.0]], "decoder": "pyav", "is_last": last},
            "music": {"tempo_bpm": 120.0 + i, "key": "C major", "mode": "major", "chords": [{"start": 0, "end": 10, "label": "C:maj"}]},
            "flags": {},
        },
        "rhythm": rng.random((4, 250)).astype(np.float16),
    }
    audio = (rng.standard_normal((2, 480000)) * 0.1).astype(np.float32)
    return encode_media(row, audio, rng.integers(0, 255, (224, 224, 3), dtype=np.uint8), True, True)


def take_over(out, run_id: str) -> None:
    """Claim `out` for `run_id`, marking the previous owner finished (no grace wait)."""
    storage = Storage(str(out))
    storage.makedirs("runs")
    if storage.exists("runs/.owner"):
        storage.put_bytes(f"runs/{storage.read_bytes('runs/.owner').decode().strip()}.json", b"{}")
    claim(storage, run_id)


def writer_for(out, run_id: str = "r1", done=frozenset(), **overrides) -> Writer:
    storage = Storage(str(out))
    if not storage.exists("runs/.owner"):
        take_over(out, run_id)
    w = Writer(small_config(**overrides), RunContext(str(out), run_id, done_keys=frozenset(done)))
    w.setup()
    return w


def tars(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "shards").iterdir())


def test_one_call_writes_final_shards_and_their_index(tmp_path):
    rows = [clip_row(i, last=i == 2) for i in range(3)]
    (result,) = list(writer_for(tmp_path).run(rows))
    name = content_name(r["key"] for r in rows)
    # "sources": the sources this batch finished (their last clip is in it), for the progress bar
    assert result["meta"] == {"shards": [name], "samples": 3, "rejects": 0, "sources": 1}
    assert tars(tmp_path) == [f"{name}.tar"]
    index = pads.dataset(str(tmp_path / "index")).to_table().to_pylist()
    assert [r["key"] for r in index] == [r["key"] for r in rows] and index[0]["tempo_bpm"] == 120.0
    assert {r["run_id"] for r in index} == {"r1"} and {r["shard"] for r in index} == {f"{name}.tar"}
    samples = list(wds.WebDataset(str(tmp_path / "shards" / f"{name}.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [r["key"] for r in rows]
    assert np.array_equal(np.load(io.BytesIO(samples[1]["rhythm.npy"]), allow_pickle=False), rows[1]["rhythm"])
    assert json.loads(samples[0]["json"])["clip"]["index"] == 0 and "jpg" in samples[0] and "flac" in samples[0]
    assert index[0]["sample_bytes"] == sum(len(v) for k, v in samples[0].items() if not k.startswith("__"))


def test_shards_roll_at_the_byte_limit(tmp_path):
    rows = [clip_row(i) for i in range(3)]
    (result,) = list(writer_for(tmp_path, **{"writer.max_shard_bytes": 1}).run(rows))
    assert result["meta"]["shards"] == [content_name([r["key"]]) for r in rows]
    assert len(tars(tmp_path)) == 3 and sorted(p.stem for p in (tmp_path / "index").iterdir()) == sorted(result["meta"]["shards"])


def test_a_retried_batch_overwrites_its_own_shard(tmp_path):
    """The same batch written twice (a Ray task retried after a crash) leaves one copy of each key."""
    writer = writer_for(tmp_path)
    for _ in range(2):
        list(writer.run([clip_row(i) for i in range(3)]))
    keys = pads.dataset(str(tmp_path / "index")).to_table(columns=["key"]).column("key").to_pylist()
    assert len(tars(tmp_path)) == 1 and sorted(keys) == sorted(clip_row(i)["key"] for i in range(3))


def test_bad_sample_is_rejected_and_the_rest_written(tmp_path):
    bad = clip_row(1)
    del bad["meta"]["clip"]["shots"]  # violates the sample schema
    (result,) = list(writer_for(tmp_path).run([clip_row(0), bad, clip_row(2)]))
    assert result["meta"]["samples"] == 2 and result["meta"]["rejects"] == 1
    (reject,) = pads.dataset(str(tmp_path / "rejects")).to_table().to_pylist()
    assert reject["reason"] == "encode_failed" and reject["key"] == bad["key"] and reject["run_id"] == "r1"


def test_same_samples_give_byte_identical_tars(tmp_path):
    digests = []
    for name in ("a", "b"):
        out = tmp_path / name
        list(writer_for(out).run([clip_row(i) for i in range(2)]))
        (tar,) = (out / "shards").iterdir()
        digests.append(hashlib.sha256(tar.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_rejects_and_statistics_ride_with_the_batch(tmp_path):
    """Reject rows and stage statistics that travelled with the data are committed by the writer:
    the rejects beside the shard, the statistics in the metadata of the batch's last file."""
    silent = Reject("music_dsp", "silent", "quiet", "s1", "/videos/s1.mp4", "s1_00010000", "clip", 1, False).to_record()
    rows = [attach_stats(clip_row(0), {"music_dsp": {"rows_in": 2, "rows_out": 1, "rejected": 1}}),
            attach_stats(reject_row(silent), {"segment": {"rows_in": 1, "rows_out": 2}}), clip_row(2)]
    (result,) = list(writer_for(tmp_path).run(rows))
    (reject,) = pads.dataset(str(tmp_path / "rejects")).to_table().to_pylist()
    assert reject["key"] == "s1_00010000" and reject["run_id"] == "r1" and result["meta"]["rejects"] == 1
    stats = json.loads(pq.read_schema(tmp_path / "index" / f"{result['meta']['shards'][0]}.parquet").metadata[STATS_META_KEY])
    assert stats["run_id"] == "r1" and stats["music_dsp"] == {"rows_in": 2, "rows_out": 1, "rejected": 1}
    assert stats["segment"]["rows_out"] == 2 and stats["writer"]["rows_in"] == 2 and stats["writer"]["rows_out"] == 2
    _, summed = committed_metadata(Storage(str(tmp_path)), "r1", result["meta"]["shards"])
    assert summed["music_dsp"]["rows_in"] == 2 and summed["writer"]["rows_out"] == 2
    sample = json.loads(next(iter(wds.WebDataset(str(tmp_path / "shards" / f"{result['meta']['shards'][0]}.tar"), shardshuffle=False)))["json"])
    assert "_stats" not in sample  # statistics never leak into the sample


def test_progress_tells_finished_from_partial_sources(tmp_path):
    w = writer_for(tmp_path)
    gap = Reject("music_dsp", "silent", "", "gap", "/videos/gap.mp4", "gap_00000000", "clip", 0, False).to_record()
    empty = Reject("probe", "empty_file", "", "", "/videos/empty.mp4", "/videos/empty.mp4").to_record()
    flaky = Reject("probe", "io_error", "", "", "/videos/flaky.mp4", "/videos/flaky.mp4", retryable=True).to_record()
    list(w.run([clip_row(0, "done"), clip_row(1, "done", last=True), clip_row(0, "half"),
                reject_row(gap), reject_row(empty), reject_row(flaky)]))
    (tmp_path / "shards" / ".abc.tar.tmp").write_bytes(b"partial")
    (tmp_path / "shards" / "0123456789abcdef0123.tar").write_bytes(b"committed, but its index was never written")
    before = tars(tmp_path)
    assert clean_uncommitted(Storage(str(tmp_path))) == 2
    assert tars(tmp_path) == [t for t in before if t not in (".abc.tar.tmp", "0123456789abcdef0123.tar")]
    paths = ["/videos/done.mp4", "/videos/half.mp4", "/videos/gap.mp4", "/videos/empty.mp4", "/videos/flaky.mp4", "/videos/new.mp4"]
    work = tmp_path / "work"
    work.mkdir()
    progress = Progress(Storage(str(tmp_path)), str(work))
    plan = progress.plan(pa.table({"path": paths, "input_index": list(range(len(paths)))}))
    assert plan.inputs == 6 and plan.todo == 4  # done and empty are finished; a retryable reject is not
    todo = [p for chunk in progress.chunks(1, 8) for p in chunk.column("path").to_pylist()]
    assert todo == ["/videos/half.mp4", "/videos/gap.mp4", "/videos/flaky.mp4", "/videos/new.mp4"]
    assert plan.partial_keys == {"half_00000000", "gap_00000000"}
    progress.close()


def test_chunks_start_small_and_double(tmp_path):
    progress = Progress(Storage(str(tmp_path)), str(tmp_path))
    progress.plan(pa.table({"path": [f"/v/{i}.mp4" for i in range(40)], "input_index": list(range(40))}))
    sizes = [c.num_rows for c in progress.chunks(3, 10)]
    assert sizes == [3, 6, 10, 10, 10, 1]
    progress.close()


def test_a_superseded_run_commits_nothing(tmp_path):
    writer = writer_for(tmp_path)
    take_over(tmp_path, "r2")  # a newer run took the folder over, e.g. after this driver was killed
    with pytest.raises(Superseded, match="r2 took over"):
        list(writer.run([clip_row(0), reject_row(Reject("probe", "empty_file", "", "", "/v/e.mp4", "/v/e.mp4").to_record())]))
    assert tars(tmp_path) == [] and not list(tmp_path.glob("index/*")) and not list(tmp_path.glob("rejects/*"))
