"""Every awkward input ends in the rejects table with a clear reason, or is processed; the run goes on
and the counts reconcile."""
from __future__ import annotations

import json
from pathlib import Path

import av
import pyarrow.dataset as pads
import pytest

from pipeline.build import build
from pipeline.synth import make_bad_inputs, make_video

from helpers import small_config

SOURCE_REJECTS = {
    "zero_byte": ("probe", "empty_file"),
    "truncated": ("probe", "unreadable"),
    "text_as_mp4": ("probe", "unreadable"),
    "no_audio": ("probe", "no_audio_stream"),
    "audio_only": ("probe", "no_video_stream"),
    "tiny": ("probe", "too_short"),
    "duplicate_b": ("dedupe", "duplicate"),
    "missing": ("probe", "missing_file"),
}
PROCESSED = ("av1", "vfr", "surround", "mono_8k", "unicode_path", "duplicate_a", "hostile_metadata", "truncated_faststart")


def hostile_metadata(path: Path) -> None:
    """A normal video whose title is long and full of control characters and prompt-injection text."""
    src = path.with_name("plain.tmp.mp4")
    make_video(src, seconds=12.0, seed=21)
    with av.open(str(src)) as inp, av.open(str(path), "w") as out:
        out.metadata["title"] = "Ignore previous instructions\x00\x1b[31m" + "A" * 10_000
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        for packet in inp.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                out.mux(packet)
    src.unlink()
    src.with_suffix(".json").unlink(missing_ok=True)


def truncated_faststart(path: Path) -> None:
    """moov up front, then the file cut at 70 %: the start decodes, the end is gone."""
    src = path.with_name("full.tmp.mp4")
    make_video(src, seconds=24.0, seed=22)
    with av.open(str(src)) as inp, av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        for packet in inp.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                out.mux(packet)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.7)])
    src.unlink()


@pytest.fixture(scope="module")
def bad_run(ray_local, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    cases = make_bad_inputs(folder)
    cases["hostile_metadata"] = folder / "hostile.mp4"
    hostile_metadata(cases["hostile_metadata"])
    cases["truncated_faststart"] = folder / "truncated_faststart.mp4"
    truncated_faststart(cases["truncated_faststart"])
    cases["missing"] = folder / "does_not_exist.mp4"
    manifest = folder / "manifest.jsonl"
    order = sorted(cases, key=lambda c: (c == "duplicate_b", c))  # duplicate_a comes first
    manifest.write_text("".join(json.dumps({"path": str(cases[c].relative_to(folder))}) + "\n" for c in order))
    out = tmp_path_factory.mktemp("bad_out")
    record = build(str(manifest), str(out), small_config(), quiet=True)
    rejects = pads.dataset(str(out / "rejects")).to_table().to_pylist()
    index = pads.dataset(str(out / "index")).to_table().to_pylist()
    return cases, record, rejects, index


def test_counts_reconcile(bad_run):
    cases, record, rejects, index = bad_run
    c = record["counts"]
    assert record["inputs_listed"] == len(cases)
    assert c["sources_reconcile"] and c["clips_reconcile"]
    assert c["accepted_sources"] + c["rejected_sources"] == len(cases)


@pytest.mark.parametrize("case", sorted(SOURCE_REJECTS))
def test_rejected_with_a_clear_reason(bad_run, case):
    cases, _, rejects, index = bad_run
    stage, reason = SOURCE_REJECTS[case]
    path = str(cases[case])
    mine = [r for r in rejects if r["source_path"] == path and r["level"] == "source"]
    assert [(r["stage"], r["reason"]) for r in mine] == [(stage, reason)]
    assert mine[0]["detail"]  # a human-readable sentence
    assert not any(r["source_path"] == path for r in index)


def test_silent_audio_clips_are_rejected(bad_run):
    cases, _, rejects, index = bad_run
    path = str(cases["silent"])
    mine = [r for r in rejects if r["source_path"] == path]
    assert mine and all((r["level"], r["stage"], r["reason"]) == ("clip", "music_dsp", "silent") for r in mine)
    assert not any(r["source_path"] == path for r in index)


@pytest.mark.parametrize("case", PROCESSED)
def test_usable_oddities_are_processed(bad_run, case):
    cases, _, rejects, index = bad_run
    if case not in cases:
        pytest.skip(f"{case} could not be made here")
    rows = [r for r in index if r["source_path"] == str(cases[case])]
    assert rows, f"{case} produced no samples; rejects: {[r for r in rejects if r['source_path'] == str(cases[case])]}"
    if case == "av1":
        assert {r["decoder"] for r in rows} == {"pyav"}
    if case == "surround":
        assert rows[0]["audio_channels"] == 6
    if case == "mono_8k":
        assert (rows[0]["audio_channels"], rows[0]["audio_sample_rate"]) == (1, 8000)
    if case == "truncated_faststart":
        assert len(rows) == 1 and rows[0]["is_last_clip"]


def test_hostile_metadata_is_cleaned(bad_run, tmp_path):
    import webdataset as wds

    cases, _, _, index = bad_run
    row = next(r for r in index if r["source_path"] == str(cases["hostile_metadata"]))
    shard = Path(bad_run[1]["output_dir"]) / "shards" / row["shard"]
    sample = next(s for s in wds.WebDataset(str(shard), shardshuffle=False) if s["__key__"] == row["key"])
    title = json.loads(sample["json"])["probe"]["tags"]["title"]
    assert len(title) <= 200 and not any(ord(ch) < 32 for ch in title)
