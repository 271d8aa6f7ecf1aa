"""`python -m shards.browse` on shards written by the real pipeline (the `feature_shards` fixture:
6 clips of 3 videos in 2 shards with json, clip, latent, rhythm, flac and jpg members)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from shards.browse.__main__ import main
from shards.writer import content_name

ROOT = Path(__file__).resolve().parents[1]


def browse(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def index(feature_shards):
    out, _ = feature_shards
    return ds.dataset(str(out / "index")).to_table().to_pylist()


def tar_member(out: Path, shard: str, name: str) -> bytes:
    with tarfile.open(out / "shards" / shard) as tar:
        return tar.extractfile(name).read()


def test_index_is_a_plain_dataset_with_checksums_in_metadata_and_run_record(feature_shards, index):
    out, record = feature_shards
    dataset = ds.dataset(str(out / "index"))
    assert dataset.count_rows() == 6
    assert pa.types.is_list(dataset.schema.field("moods").type)
    assert pa.types.is_struct(dataset.schema.field("prompts").type.value_type)
    names = sorted(record["shards"])
    assert len(names) == 2 and names == sorted({r["shard"] for r in index})
    for shard in names:  # each named by the keys it holds: `<20 hex>.tar`
        assert re.fullmatch(r"[0-9a-f]{20}\.tar", shard)
        assert shard == f"{content_name(r['key'] for r in index if r['shard'] == shard)}.tar"
    for shard, meta in record["shards"].items():
        data = (out / "shards" / shard).read_bytes()
        assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["bytes"] == len(data)
        assert meta["samples"] == sum(r["shard"] == shard for r in index)
        footer = json.loads(pq.read_schema(out / "index" / shard.replace(".tar", ".parquet")).metadata[b"video_robin.shard"])
        assert footer == {"shard": shard, **meta}


def test_summary_counts_and_distributions(feature_shards, index):
    out, _ = feature_shards
    rc, text, _ = browse(out, "summary", "--json")
    s = json.loads(text)
    assert rc == 0
    assert (s["rows"], s["sources"], s["shards"], s["has_latent"], s["has_clip"]) == (6, 3, 2, 6, 6)
    assert s["hours"] == pytest.approx(sum(r["duration_s"] for r in index) / 3600)
    tempos = [r["tempo_bpm"] for r in index if r["tempo_bpm"] is not None]
    assert s["tempo"]["measured"] == len(tempos) and s["tempo"]["mean"] == pytest.approx(np.mean(tempos))
    assert sum(s["tempo"]["counts"]) == len(tempos)
    keys: dict[str, int] = {}
    for r in index:
        keys[r["key_name"]] = keys.get(r["key_name"], 0) + 1
    assert sorted(s["key_name"].items()) == sorted(keys.items())
    assert s["clips_per_source"] == {"2": 3}
    assert s["prompt_source"] == {"template": 6}
    assert s["rejects"]["rows"] == 0
    rc, text, _ = browse(out, "summary")
    assert rc == 0 and "samples                     6" in text and "clips per source" in text


def test_query_where_flags_and_list_membership(feature_shards, index):
    out, _ = feature_shards
    tempos = sorted(r["tempo_bpm"] for r in index)
    cut = tempos[2]
    rc, text, _ = browse(out, "query", "--where", f"tempo_bpm > {cut}", "--format", "jsonl", "--columns", "key,tempo_bpm")
    assert rc == 0
    assert sorted(r["key"] for r in jsonl(text)) == sorted(r["key"] for r in index if r["tempo_bpm"] > cut)
    lo, hi = tempos[1], tempos[4]
    rc, text, _ = browse(out, "query", "--tempo", f"{lo}:{hi}", "--format", "jsonl", "--columns", "key")
    assert len(jsonl(text)) == sum(lo <= r["tempo_bpm"] <= hi for r in index)
    first = index[0]
    rc, text, _ = browse(out, "query", "--key", first["key_name"], "--source", Path(first["source_path"]).name, "--format", "jsonl")
    rows = jsonl(text)
    assert rows and all(r["key_name"] == first["key_name"] and r["source_path"] == first["source_path"] for r in rows)
    assert set(rows[0]) == set(ds.dataset(str(out / "index")).schema.names)  # jsonl defaults to every column
    # List membership runs on record batches after the scan (no pyarrow expression for it).
    rc, text, _ = browse(out, "query", "--where", "'latent.npy' in members and not 'nothing' in members", "--count")
    assert text.strip() == "6"
    rc, text, _ = browse(out, "query", "--where", "'latent.npy' not in members or len(members) > 99", "--count")
    assert text.strip() == "0"
    rc, text, _ = browse(out, "query", "--where", f"key in [{first['key']!r}, 'x']", "--limit", "5")
    assert rc == 0 and first["key"] in text and text.count("\n") == 2  # header + one row
    rc, text, _ = browse(out, "query", "--min-duration", "5", "--has-latent", "--count")
    assert int(text) == sum(r["duration_s"] >= 5 for r in index)


def test_query_sql_over_the_same_index(feature_shards, index):
    out, record = feature_shards
    rc, text, _ = browse(out, "query", "--sql", "SELECT shard, count(*) AS n, sum(duration_s) AS s FROM idx GROUP BY shard ORDER BY shard", "--format", "jsonl")
    assert rc == 0
    got = jsonl(text)
    assert len(got) == 2 and [g["shard"] for g in got] == sorted(record["shards"])
    for g in got:
        assert g["n"] == sum(r["shard"] == g["shard"] for r in index)
        assert g["s"] == pytest.approx(sum(r["duration_s"] for r in index if r["shard"] == g["shard"]))
    rc, _, err = browse(out, "query", "--sql", "SELECT nope FROM idx")
    assert rc == 2 and "SQL failed" in err


@pytest.mark.parametrize("where, message", [
    ("bogus > 1", "unknown column 'bogus'"),
    ("__import__('os').system('true')", "unknown function"),
    ("tempo_bpm.real > 1", "does not allow Attribute"),
    ("tempo_bpm >", "cannot parse"),
])
def test_query_rejects_bad_filters_with_a_clear_error(feature_shards, where, message):
    out, _ = feature_shards
    rc, text, err = browse(out, "query", "--where", where)
    assert rc == 2 and message in err and text == ""


def test_show_prints_every_prompt_and_the_json_member(feature_shards, index):
    out, _ = feature_shards
    row = index[3]
    rc, text, _ = browse(out, "show", row["key"], "--json")
    shown = json.loads(text)
    assert rc == 0 and shown["index"]["key"] == row["key"] and shown["meta"]["key"] == row["key"]
    assert shown["meta"]["prompts"] == {p["level"]: p["text"] for p in row["prompts"]}
    assert len(row["prompts"]) >= 2
    rc, text, _ = browse(out, "show", row["key"])
    assert all(p["text"] in text for p in row["prompts"]) and f"tempo_bpm                {row['tempo_bpm']}" in text
    proc = subprocess.run([sys.executable, "-m", "shards.browse", str(out), "show", "no_such_key"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "no sample with key 'no_such_key'" in proc.stderr


def test_export_writes_audio_thumbnail_json_and_arrays(feature_shards, index, tmp_path):
    import soundfile as sf
    from PIL import Image

    out, _ = feature_shards
    row = index[1]
    rc, text, _ = browse(out, "export", row["key"], tmp_path)
    assert rc == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(f"{row['key']}.{m}" for m in row["members"])
    audio, rate = sf.read(tmp_path / f"{row['key']}.flac")
    assert rate == 48000 and audio.shape == (round(row["duration_s"] * 48000), 2)
    assert Image.open(tmp_path / f"{row['key']}.jpg").size[0] > 0
    assert json.loads((tmp_path / f"{row['key']}.json").read_text())["key"] == row["key"]
    latent = np.load(tmp_path / f"{row['key']}.latent.npy", allow_pickle=False)
    stored = np.load(io.BytesIO(tar_member(out, row["shard"], f"{row['key']}.latent.npy")), allow_pickle=False)
    assert latent.dtype == np.float16 and np.array_equal(latent, stored)


def test_export_decodes_the_latent_with_the_vae(feature_shards, index, tiny_feature_models, tmp_path):
    import soundfile as sf

    out, _ = feature_shards
    row = index[0]
    m = tiny_feature_models
    rc, _, err = browse(out, "export", row["key"], tmp_path, "--from-latent", "--vae-config", m["vae_latents.config_file"],
                        "--vae-checkpoint", m["vae_latents.checkpoint"], "--vae-preset", m["vae_latents.preset"])
    assert rc == 0, err
    info = sf.info(tmp_path / f"{row['key']}.wav")
    assert not (tmp_path / f"{row['key']}.flac").exists()
    assert info.samplerate == 48000 and info.channels == 2 and info.frames == row["latent_frames"] * 1920
    rc, _, err = browse(out, "export", row["key"], tmp_path, "--from-latent")
    assert rc == 2 and "--vae-config" in err


def test_fsspec_urls_file_and_memory(feature_shards, index):
    import fsspec

    out, _ = feature_shards
    rc, text, _ = browse(f"file://{out}", "query", "--format", "jsonl", "--columns", "key")
    assert rc == 0 and sorted(r["key"] for r in jsonl(text)) == sorted(r["key"] for r in index)
    mem = fsspec.filesystem("memory")
    for path in out.rglob("*"):
        if path.is_file():
            mem.pipe(f"/browse-test/{path.relative_to(out)}", path.read_bytes())
    rc, text, _ = browse("memory://browse-test", "summary", "--json")
    assert rc == 0 and json.loads(text)["rows"] == 6
    rc, text, _ = browse("memory://browse-test", "show", index[2]["key"], "--json")  # reads the tar through fsspec
    assert rc == 0 and json.loads(text)["meta"]["key"] == index[2]["key"]
    rc, text, _ = browse("memory://browse-test", "verify")
    assert rc == 0 and "verify: OK" in text
    mem.rm("/browse-test", recursive=True)


def test_report_is_self_contained_with_every_plot_and_escapes_index_text(feature_shards, index, tmp_path):
    out, record = feature_shards
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    path = copy / "index" / sorted(record["shards"])[1].replace(".tar", ".parquet")
    table = pq.read_table(path)
    evil = "<script>alert('x')</script> & co"
    prompts = table.column("prompt").to_pylist()
    prompts[0] = evil
    table = table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(prompts))
    pq.write_table(table, path)
    rc, text, _ = browse(copy, "report", tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert rc == 0 and text.strip() == str(tmp_path / "report.html")
    titles = ["Tempo (BPM)", "Keys by tonic and mode", "Moods", "Genres", "Instruments", "Clip duration",
              "Clips per source", "Reject reasons", "Prompt length"]
    assert page.count('src="data:image/png;base64,') == len(titles)
    for t in titles:
        assert f'alt="{t}"' in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in page
    for r in index:
        assert f'<td class="key">{r["key"]}</td>' in page


def stable_audio_tools_dataset():
    """stable-audio-tools' own data module. It imports torchaudio at the top (not installed here:
    its pins clash with ours) but its pre-encoded path never calls it, so an empty stand-in lets the
    real PreEncodedDataset and create_dataloader_from_config run unchanged."""
    from helpers import stable_audio_tools_stand_ins

    stable_audio_tools_stand_ins()
    from stable_audio_tools.data import dataset

    return dataset


def test_export_sat_loads_in_stable_audio_tools(feature_shards, index, tmp_path):
    out, _ = feature_shards
    dest = tmp_path / "sat"
    rc, text, _ = browse(out, "export-sat", dest)
    assert rc == 0 and json.loads(text)["written"] == 6
    sat = stable_audio_tools_dataset()
    data = sat.PreEncodedDataset([sat.LocalDatasetConfig("vr", str(dest))])
    assert len(data) == 6
    by_key = {r["key"]: r for r in index}
    for i in range(len(data)):
        latents, info = data[i]
        assert info["latent_filename"] == data.filenames[i]  # not a silent fallback to another file
        row = by_key[Path(info["latent_filename"]).stem]
        stored = np.load(io.BytesIO(tar_member(out, row["shard"], f"{row['key']}.latent.npy")), allow_pickle=False)
        assert latents.dtype == __import__("torch").float32 and np.array_equal(latents.numpy(), stored.astype(np.float32))
        assert info["prompt"] == row["prompt"] and info["seconds_total"] == row["duration_s"]
    # Its trainer's loader, from the dataset config we wrote, with a latent crop.
    config = {**json.loads((dest / "dataset_config.json").read_text()), "latent_crop_length": 16}
    loader = sat.create_dataloader_from_config(config, batch_size=2, sample_size=16 * 1920, sample_rate=48000, num_workers=1, shuffle=False)
    latents, infos = next(iter(loader))
    assert tuple(latents.shape) == (2, stored.shape[0], 16) and all(i["prompt"] in {r["prompt"] for r in index} for i in infos)

    # Another prompt level, and only what a filter keeps.
    level = index[0]["prompts"][0]["level"]
    chosen = [r for r in index if r["tempo_bpm"] > sorted(x["tempo_bpm"] for x in index)[2]]
    rc, text, _ = browse(out, "export-sat", tmp_path / "sat2", "--prompt-level", level,
                         "--where", f"tempo_bpm > {sorted(x['tempo_bpm'] for x in index)[2]}", "--dtype", "float16")
    assert rc == 0 and json.loads(text)["written"] == len(chosen)
    lines = (tmp_path / "sat2" / "filelist.txt").read_text().split()
    assert sorted(Path(line).stem for line in lines) == sorted(r["key"] for r in chosen)
    for r in chosen:
        meta = json.loads((tmp_path / "sat2" / r["shard"].removesuffix(".tar") / f"{r['key']}.json").read_text())
        assert meta["prompt"] == r["prompts"][0]["text"] and meta["padding_mask"] == [1] * r["latent_frames"]
