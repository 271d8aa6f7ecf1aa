"""`python -m shards.browse` on a synthetic index of a million rows (or more): wall time and peak
memory of each subcommand, against a plain `pyarrow.dataset.to_table` of the same columns.

    .venv/bin/python -m bench.browse_scale [--rows 1000000] [--files 100] [--work bench/work/browse_scale]

The index has INDEX_SCHEMA, 4 clips per source, known tempo/key/mood/genre patterns (so the test
checks answers, tests/test_browse_scale.py), one empty stand-in tar per index file (listed, never
read: verify runs --index-only), a run record with checksums and a rejects table. Each command runs
in its own subprocess, spawned by a bare interpreter that reports its peak RSS (os.wait4).
Writes bench/results/browse_scale_<rows>.{json,md} (e.g. browse_scale_1M); the committed results are
1M, 4M and 20M rows (10,000 rows a file, as the writer makes them), to see how time and memory grow."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.record import save
from shards.schema import INDEX_SCHEMA, REJECT_SCHEMA, SCHEMA_VERSION, SHARD_META_KEY

TONICS = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
KEYS = [f"{t} {m}" for m in ("major", "minor") for t in TONICS]
MOODS = ["happy", "sad", "tense", "dreamy", "epic", "playful"]
GENRES = ["rock", "jazz", "ambient", "pop"]
INSTRUMENTS = ["piano", "guitar", "drums", "strings", "synth"]
CLIPS_PER_SOURCE = 4
REJECTS = {"no_audio": 600, "too_short": 400}


def truth(rows: int) -> dict:
    """What the generator put in, computed independently of the index (for the test)."""
    r = np.arange(rows)
    tempo = 60.0 + (r % 120) + 0.5
    return {
        "rows": rows, "sources": -(-rows // CLIPS_PER_SOURCE),
        "tempo_100_130": int(((tempo >= 100) & (tempo <= 130)).sum()),
        "key_counts": {KEYS[i]: int(n) for i, n in enumerate(np.bincount(r % 24, minlength=24))},
        "calm": int((r % 10 == 0).sum()),
        "calm_and_c_minor": int(((r % 10 == 0) & (r % 24 == KEYS.index("C minor"))).sum()),
        "hours": float(np.where(r % CLIPS_PER_SOURCE == CLIPS_PER_SOURCE - 1, 6.0, 10.0).sum() / 3600),
    }


def _lists(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values))


def _file(start: int, n: int, shard: str) -> pa.Table:
    r = np.arange(start, start + n)
    src, clip = r // CLIPS_PER_SOURCE, r % CLIPS_PER_SOURCE
    source_id = np.char.mod("%016x", src)
    key = np.char.add(np.char.add(source_id, "_"), np.char.mod("%08d", clip * 10000))
    tempo = 60.0 + (r % 120) + 0.5
    key_name = np.array(KEYS)[r % 24]
    calm = r % 10 == 0
    mood_len = 1 + calm  # every row has one mood; every tenth also "calm"
    mood_off = np.concatenate([[0], np.cumsum(mood_len)])
    moods = np.empty(mood_off[-1], dtype=object)
    moods[mood_off[:-1]] = np.array(MOODS)[r % len(MOODS)]
    moods[mood_off[:-1][calm] + 1] = "calm"
    two = np.arange(n + 1) * 2
    inst = np.stack([np.array(INSTRUMENTS)[r % 5], np.array(INSTRUMENTS)[(r + 1) % 5]], 1).ravel()
    prompt = np.char.add(np.char.add(np.char.add(np.array(MOODS)[r % 6], " music at "), tempo.astype(int).astype(str)), np.char.add(" BPM in ", key_name))
    short = np.char.add(np.array(MOODS)[r % 6], " music")
    prompts = pa.ListArray.from_arrays(pa.array(two, pa.int32()), pa.StructArray.from_arrays(
        [pa.array(np.tile(["short", "full_spec"], n)), pa.array(np.stack([short, prompt], 1).ravel())], ["level", "text"]))
    columns = {
        "key": pa.array(key), "shard": pa.array([shard] * n), "schema_version": pa.array(np.full(n, SCHEMA_VERSION, np.int32)),
        "source_id": pa.array(source_id), "source_path": pa.array(np.char.add(np.char.add("/data/videos/", source_id), ".mp4")),
        "clip_index": pa.array(clip.astype(np.int32)), "is_last_clip": pa.array(clip == CLIPS_PER_SOURCE - 1),
        "start_s": pa.array(clip * 10.0), "duration_s": pa.array(np.where(clip == CLIPS_PER_SOURCE - 1, 6.0, 10.0)),
        "tempo_bpm": pa.array(tempo), "key_name": pa.array(key_name), "tonic": pa.array(np.array(TONICS)[r % 12]),
        "mode": pa.array(np.where(r % 24 < 12, "major", "minor")), "has_clip": pa.array(np.ones(n, bool)),
        "has_latent": pa.array(np.ones(n, bool)), "latent_frames": pa.array(np.full(n, 250, np.int32)),
        "moods": _lists(moods, mood_off), "genres": _lists(np.array(GENRES)[r % 4], np.arange(n + 1)),
        "instruments": _lists(inst, two), "prompt": pa.array(prompt), "prompt_source": pa.array(["template"] * n),
        "prompts": prompts, "members": _lists(np.tile(["json", "latent.npy"], n), two),
        "flags": _lists(np.array([], dtype=object), np.zeros(n + 1, np.int64)).cast(pa.list_(pa.string())),
        "run_id": pa.array(["synthetic"] * n),
    }
    arrays = [columns[f.name].cast(f.type) if f.name in columns else pa.nulls(n, f.type) for f in INDEX_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=INDEX_SCHEMA)


def make_synthetic(out: Path, rows: int = 1_000_000, files: int = 100) -> dict:
    """OUT/ with `rows` index rows in `files` index files, stand-in tars, a run record, rejects."""
    for folder in ("index", "shards", "runs", "rejects"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    empty = io.BytesIO()
    tarfile.open(fileobj=empty, mode="w").close()
    tar_bytes = empty.getvalue()
    shards, per = {}, -(-rows // files)
    for i in range(files):
        start, n = i * per, min(per, rows - i * per)
        if n <= 0:
            break
        name = f"{i:06d}"
        (out / "shards" / f"{name}.tar").write_bytes(tar_bytes)
        meta = {"sha256": hashlib.sha256(tar_bytes).hexdigest(), "bytes": len(tar_bytes), "samples": n}
        table = _file(start, n, f"{name}.tar").replace_schema_metadata({SHARD_META_KEY: json.dumps({"shard": f"{name}.tar", **meta})})
        pq.write_table(table, out / "index" / f"{name}.parquet")
        shards[f"{name}.tar"] = meta
    reasons = [r for r, k in REJECTS.items() for _ in range(k)]
    rejects = {"stage": ["probe"] * len(reasons), "reason": reasons, "level": ["source"] * len(reasons),
               "retryable": [False] * len(reasons), "run_id": ["synthetic"] * len(reasons),
               "key": [f"reject{i}" for i in range(len(reasons))]}
    pq.write_table(pa.Table.from_pydict(rejects).cast(pa.schema([REJECT_SCHEMA.field(c) for c in rejects])), out / "rejects" / "synthetic-00000.parquet")
    record = {"run_id": "synthetic", "counts": {"clips_written": rows, "sources_reconcile": True, "clips_reconcile": True},
              "shards": shards, "output_totals": {"samples": rows, "rejects": len(reasons), "shards": len(shards)}}
    (out / "runs" / "synthetic.json").write_text(json.dumps(record))
    return truth(rows)


# Linux starts a child's ru_maxrss at the RSS of the process it was spawned from (exec records the
# old address space's high-water mark), so spawned straight from this bench, which holds the
# generator's arrays, every command would read at least this process's size. A bare interpreter
# spawns the command instead and reports the child's own peak, wall time and exit code.
TRAMPOLINE = """import os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(f"TRAMPOLINE {usage.ru_maxrss} {time.perf_counter() - t0} {os.waitstatus_to_exitcode(status)}", file=sys.stderr)"""


def measure(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS (MiB) of one command, each in a process of its own."""
    proc = subprocess.run([sys.executable, "-S", "-c", TRAMPOLINE, *cmd], capture_output=True, text=True)
    head, _, last = proc.stderr.rstrip().rpartition("\n")
    tag, maxrss, wall, rc = last.split()
    assert tag == "TRAMPOLINE", proc.stderr[-400:]
    return {"wall_s": round(float(wall), 2), "peak_rss_mib": int(maxrss) / 1024, "rc": int(rc),
            "stdout": proc.stdout[-400:], "stderr": head[-400:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--work", default="bench/work/browse_scale")
    args = ap.parse_args(argv)
    work = Path(args.work)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    t0 = time.perf_counter()
    known = make_synthetic(work / "out", args.rows, args.files)
    generated = time.perf_counter() - t0
    out, py = str(work / "out"), sys.executable
    from shards.browse.stats import COLUMNS

    cmds = {
        "baseline: pyarrow to_table (summary's columns)": [py, "-c", f"import pyarrow.dataset as ds; print(ds.dataset({out + '/index'!r}).to_table(columns={COLUMNS!r}).num_rows)"],
        "summary --json": [py, "-m", "shards.browse", out, "summary", "--json"],
        "query --where (tempo, key, 'calm' in moods) --count": [py, "-m", "shards.browse", out, "query", "--where", "100 <= tempo_bpm <= 130 or (key_name == 'C minor' and 'calm' in moods)", "--count"],
        "query --mood calm --format jsonl (all matches)": [py, "-m", "shards.browse", out, "query", "--mood", "calm", "--format", "jsonl", "--columns", "key,tempo_bpm,key_name,moods,prompt"],
        "query --sql GROUP BY key_name": [py, "-m", "shards.browse", out, "query", "--sql", "SELECT key_name, count(*) n, avg(tempo_bpm) t FROM idx GROUP BY 1 ORDER BY 1", "--format", "jsonl"],
        "show KEY": [py, "-m", "shards.browse", out, "show", "00000000000186a0_00000000", "--index-only"],
        "report": [py, "-m", "shards.browse", out, "report", str(work / "report.html")],
        "verify --index-only": [py, "-m", "shards.browse", out, "verify", "--index-only"],
    }
    results = {name: measure(cmd) for name, cmd in cmds.items()}
    base = results["baseline: pyarrow to_table (summary's columns)"]
    for r in results.values():
        r["x_baseline_wall"] = round(r["wall_s"] / base["wall_s"], 2)
        r["x_baseline_rss"] = round(r["peak_rss_mib"] / base["peak_rss_mib"], 2)
    report = {"rows": args.rows, "files": args.files, "generate_s": round(generated, 1), "cpus": os.cpu_count(),
              "machine": platform.platform(), "truth": known, "results": results}
    stem = f"browse_scale_{args.rows // 1_000_000}M" if args.rows % 1_000_000 == 0 else f"browse_scale_{args.rows}"
    lines = [f"# Browsing a {args.rows:,}-row index ({args.files} files) on {os.cpu_count()} CPU cores",
             "", f"Generated in {generated:.1f} s by `python -m bench.browse_scale`. Each command is its own process "
             "(interpreter start-up included); peak RSS is that process's own. Ratios are to the baseline, a plain "
             "`pyarrow.dataset.to_table` of the columns `summary` reads, measured in the same run.", "",
             "| command | rc | wall s | x baseline | peak RSS MiB | x baseline |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['rc']} | {r['wall_s']} | {r['x_baseline_wall']} | {r['peak_rss_mib']:.0f} | {r['x_baseline_rss']} |")
    save(stem, report, "\n".join(lines) + "\n")
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
