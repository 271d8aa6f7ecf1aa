"""What earlier runs into the same OUT already finished, read from the index and rejects tables."""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

SHARD_NAME = re.compile(r"^(\d{6})\.tar$")


@dataclass
class Progress:
    done_paths: set[str] = field(default_factory=set)  # sources needing no more work
    done_source_ids: dict[str, str] = field(default_factory=dict)  # content already curated -> its path
    partial_keys: set[str] = field(default_factory=set)  # finished clips of unfinished sources
    reject_idents: set[tuple[str, str]] = field(default_factory=set)  # (level, key) in rejects
    next_shard: int = 0
    index_rows: int = 0


def _read(folder: Path, columns: list[str]) -> list[dict]:
    files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))
    rows: list[dict] = []
    for f in files:
        rows.extend(pq.read_table(f, columns=columns).to_pylist())
    return rows


def clean_temporaries(out: Path) -> int:
    """Remove what an interrupted run left uncommitted: temporary files, and shards whose index
    file was never written (the index file is the commit point of a shard)."""
    removed = 0
    for folder in ("shards", "index", "rejects", "runs"):
        for tmp in (out / folder).glob(".*.tmp"):
            tmp.unlink()
            removed += 1
    for tar in (out / "shards").glob("*.tar"):
        if not (out / "index" / f"{tar.stem}.parquet").exists():
            tar.unlink()
            removed += 1
    return removed


def scan(out: Path) -> Progress:
    progress = Progress()
    index = _read(out / "index", ["key", "source_id", "source_path", "clip_index", "is_last_clip"])
    rejects = _read(out / "rejects", ["key", "source_id", "source_path", "level", "reason", "clip_index", "is_last_clip"])
    progress.index_rows = len(index)
    shards = [int(m.group(1)) for p in (out / "shards").glob("*.tar") if (m := SHARD_NAME.match(p.name))]
    progress.next_shard = max(shards, default=-1) + 1

    clips: dict[str, dict[int, str]] = defaultdict(dict)  # source path -> clip index -> key
    last: dict[str, int] = {}
    for row in index + [r for r in rejects if r["level"] == "clip"]:
        clips[row["source_path"]][row["clip_index"]] = row["key"]
        if row["is_last_clip"]:
            last[row["source_path"]] = row["clip_index"]
    for r in rejects:
        progress.reject_idents.add((r["level"], r["key"]))
        # Duplicates are decided afresh each run (cheaply, after probing), since the copy they
        # duplicate may itself be unfinished.
        if r["level"] == "source" and r["reason"] != "duplicate":
            progress.done_paths.add(r["source_path"])
    for path, got in clips.items():
        if path in last and all(i in got for i in range(last[path] + 1)):
            progress.done_paths.add(path)
        else:
            progress.partial_keys.update(got.values())
    progress.done_source_ids = {r["source_id"]: r["source_path"] for r in index}
    return progress
