"""Shard writer, ledger and resume scan: atomic shards, index rows, rolling, reject bookkeeping."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import webdataset as wds

import pytest

from pipeline.ledger import Ledger, LedgerClient
from pipeline.ownership import Superseded, claim
from pipeline.resume import clean_temporaries, scan
from pipeline.stage import Reject, RunContext
from shards.writer import Writer

from helpers import small_config


def clip_row(i: int, source: str = "s1", last: bool = False) -> dict:
    rng = np.random.default_rng(i)
    return {
        "key": f"{source}_{i * 10000:08d}",
        "meta": {
            "source": {"path": f"/videos/{source}.mp4", "source_id": source},
            "probe": {"duration": 60.0, "video": {"codec": "h264", "width": 320, "height": 240, "fps": 25.0}, "audio": {"channels": 2, "sample_rate": 48000}},
            "clip": {"index": i, "start": i * 10.0, "end": i * 10.0 + 10, "duration": 10.0, "cut_times": [], "shots": [[0.0, 10.0]], "decoder": "decord", "is_last": last},
            "music": {"tempo_bpm": 120.0 + i, "key": "C major", "mode": "major", "chords": [{"start": 0, "end": 10, "label": "C:maj"}]},
            "flags": {},
        },
        "rhythm": rng.random((4, 250)).astype(np.float16),
        "audio48": (rng.standard_normal((2, 480000)) * 0.1).astype(np.float32),
        "frames": rng.integers(0, 255, (40, 224, 224, 3), dtype=np.uint8),
    }


def take_over(out: Path, run_id: str) -> None:
    """Claim `out` for `run_id`, marking the previous owner finished (no grace wait)."""
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for f in (out / "runs").glob(".owner"):
        (out / "runs" / f"{f.read_text().strip()}.json").write_text("{}")
    claim(out, run_id)


def writer_for(out: Path, ledger: Ledger, done=frozenset(), **overrides) -> Writer:
    if not (out / "runs" / ".owner").exists():
        take_over(out, "r1")
    w = Writer(small_config(**overrides), RunContext(str(out), "r1", LedgerClient(ledger), done_keys=frozenset(done)))
    w.setup()
    return w


def test_one_call_writes_final_shards_and_their_index(tmp_path):
    ledger = Ledger(str(tmp_path), "r1")
    rows = [clip_row(i) for i in range(3)]
    out = list(writer_for(tmp_path, ledger).run(rows))
    assert [o["key"] for o in out] == [r["key"] for r in rows]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["000000.tar"]
    index = pads.dataset(str(tmp_path / "index")).to_table().to_pylist()
    assert [r["key"] for r in index] == [r["key"] for r in rows] and index[0]["tempo_bpm"] == 120.0
    samples = list(wds.WebDataset(str(tmp_path / "shards" / "000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [r["key"] for r in rows]
    assert np.array_equal(np.load(io.BytesIO(samples[1]["rhythm.npy"]), allow_pickle=False), rows[1]["rhythm"])
    assert json.loads(samples[0]["json"])["clip"]["index"] == 0
    assert index[0]["sample_bytes"] == sum(len(v) for k, v in samples[0].items() if not k.startswith("__"))


def test_shards_roll_at_the_byte_limit(tmp_path):
    ledger = Ledger(str(tmp_path), "r1")
    list(writer_for(tmp_path, ledger, **{"writer.max_shard_bytes": 1}).run([clip_row(i) for i in range(3)]))
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["000000.tar", "000001.tar", "000002.tar"]
    assert sorted(p.stem for p in (tmp_path / "index").iterdir()) == ["000000", "000001", "000002"]


def test_bad_sample_is_rejected_and_the_rest_written(tmp_path):
    ledger = Ledger(str(tmp_path), "r1")
    bad = clip_row(1)
    del bad["meta"]["clip"]["shots"]  # violates the sample schema
    out = list(writer_for(tmp_path, ledger).run([clip_row(0), bad, clip_row(2)]))
    assert [o.reason if isinstance(o, Reject) else o["key"] for o in out] == ["encode_failed", clip_row(0)["key"], clip_row(2)["key"]]


def test_same_samples_give_byte_identical_tars(tmp_path):
    digests = []
    for name in ("a", "b"):
        out = tmp_path / name
        list(writer_for(out, Ledger(str(out), "r1")).run([clip_row(i) for i in range(2)]))
        digests.append(hashlib.sha256((out / "shards" / "000000.tar").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_ledger_skips_rejects_an_earlier_run_recorded(tmp_path):
    rec = Reject("music_dsp", "silent", "quiet", "s1", "/v/s1.mp4", "s1_00000000", "clip", 0, False).to_record()
    take_over(tmp_path, "r1")
    first = Ledger(str(tmp_path), "r1")
    first.record("music_dsp", 1, 0, 0.1, [rec])
    first.finish()
    take_over(tmp_path, "r2")
    second = Ledger(str(tmp_path), "r2", known_rejects=scan(tmp_path).reject_idents)
    second.record("music_dsp", 1, 0, 0.1, [rec])
    snap = second.finish()
    assert pads.dataset(str(tmp_path / "rejects")).count_rows() == 1
    assert snap["reasons"] == [{"stage": "music_dsp", "level": "clip", "reason": "silent", "count": 1}]


def test_scan_tells_finished_from_partial_sources(tmp_path):
    ledger = Ledger(str(tmp_path), "r1")
    w = writer_for(tmp_path, ledger)
    list(w.run([clip_row(0, "done"), clip_row(1, "done", last=True), clip_row(0, "half")]))
    ledger.record("music_dsp", 1, 0, 0.0, [Reject("music_dsp", "silent", "", "gap", "/videos/gap.mp4", "gap_00000000", "clip", 0, False).to_record(),
                                           Reject("probe", "empty_file", "", "", "/videos/empty.mp4", "/videos/empty.mp4").to_record()])
    ledger.finish()
    (tmp_path / "shards" / ".000009.tar.tmp").write_bytes(b"partial")
    (tmp_path / "shards" / "000007.tar").write_bytes(b"renamed, but its index was never written")
    assert clean_temporaries(tmp_path) == 2
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["000000.tar"]
    progress = scan(tmp_path)
    assert progress.done_paths == {"/videos/done.mp4", "/videos/empty.mp4"}
    assert progress.partial_keys == {"half_00000000", "gap_00000000"}
    assert progress.next_shard == 1 and progress.done_source_ids == {"done": "/videos/done.mp4", "half": "/videos/half.mp4"}


def test_a_superseded_run_commits_nothing(tmp_path):
    ledger = Ledger(str(tmp_path), "r1")
    writer = writer_for(tmp_path, ledger)
    take_over(tmp_path, "r2")  # a newer run took the folder over, e.g. after this driver was killed
    with pytest.raises(Superseded, match="r2 took over"):
        list(writer.run([clip_row(0)]))
    assert list((tmp_path / "shards").iterdir()) == [] and list((tmp_path / "index").iterdir()) == []
    ledger.record("probe", 1, 0, 0.0, [Reject("probe", "empty_file", "", "", "/v/e.mp4", "/v/e.mp4").to_record()])
    with pytest.raises(Superseded):
        ledger.flush()
    assert not list((tmp_path / "rejects").glob("*.parquet"))
