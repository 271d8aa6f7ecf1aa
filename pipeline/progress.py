"""What OUT already holds, as columnar aggregates: which sources are finished (resume), which clips
of unfinished sources are done, what content is already curated (dedupe across runs), and the
end-of-run reconcile. DuckDB reads the index and rejects parquet files itself (through fsspec for
object stores) into a database file in the run's local work folder, within a memory cap, so the
driver's memory stays flat however many samples OUT holds."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from pipeline.storage import Storage
from shards.schema import SHARD_META_KEY, STATS_META_KEY

INDEX_COLUMNS = {"key": "VARCHAR", "shard": "VARCHAR", "source_id": "VARCHAR", "source_path": "VARCHAR",
                 "clip_index": "INTEGER", "is_last_clip": "BOOLEAN", "run_id": "VARCHAR"}
REJECT_COLUMNS = {"stage": "VARCHAR", "reason": "VARCHAR", "level": "VARCHAR", "key": "VARCHAR", "source_id": "VARCHAR",
                  "source_path": "VARCHAR", "clip_index": "INTEGER", "is_last_clip": "BOOLEAN", "retryable": "BOOLEAN",
                  "run_id": "VARCHAR"}
# A source is finished when all its clips are committed (as samples or clip rejects, up to the one
# marked last) or when it has a permanent source-level reject. Duplicates are decided afresh each
# run (the copy they duplicate may itself be unfinished); retryable rejects are tried again.
COMPLETE = """
    SELECT source_path FROM clips GROUP BY source_path
    HAVING max(CASE WHEN is_last_clip THEN clip_index END) IS NOT NULL
       AND count(DISTINCT clip_index) = max(CASE WHEN is_last_clip THEN clip_index END) + 1"""
FINAL_REJECT = "level = 'source' AND reason <> 'duplicate' AND NOT coalesce(retryable, false)"


@dataclass
class Resume:
    inputs: int  # input rows listed
    todo: int  # input rows this run works on
    partial_keys: frozenset[str]  # finished clips of unfinished sources (the stream skips them)
    index_rows: int


class Progress:
    """A DuckDB database over OUT's committed files plus this run's own tables (todo, seen, kept)."""

    def __init__(self, storage: Storage, workdir: str):
        import duckdb

        self.storage = storage
        self.con = duckdb.connect(os.path.join(workdir, "progress.duckdb"))
        self.con.execute("SET memory_limit = '256MB'")
        self.con.execute(f"SET temp_directory = '{os.path.join(workdir, 'duckdb-tmp')}'")
        self.con.execute("SET enable_progress_bar = false")
        if not storage.local:
            self.con.register_filesystem(storage.fs)
        self.refresh()

    def files(self, folder: str, prefix: str = "") -> list[str]:
        return [self.storage.url(f"{folder}/{n}") for n in self.storage.names(folder, ".parquet") if n.startswith(prefix)]

    def _view(self, name: str, files: list[str], columns: dict[str, str]) -> None:
        """A view with exactly `columns` (older files lack some: they read as NULL)."""
        if files:
            have = {r[0] for r in self.con.execute(f"DESCRIBE SELECT * FROM read_parquet({files!r}, union_by_name = true)").fetchall()}
            cols = ", ".join(c if c in have else f"NULL::{t} AS {c}" for c, t in columns.items())
            self.con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT {cols} FROM read_parquet({files!r}, union_by_name = true)")
        else:
            cols = ", ".join(f"NULL::{t} AS {c}" for c, t in columns.items())
            self.con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT {cols} WHERE false")

    def refresh(self) -> None:
        """Re-list OUT/index and OUT/rejects (one listing each)."""
        self._view("idx", self.files("index"), INDEX_COLUMNS)
        self._view("rej", self.files("rejects"), REJECT_COLUMNS)
        self.con.execute("""CREATE OR REPLACE TEMP VIEW clips AS
            SELECT source_path, clip_index, is_last_clip, key FROM idx
            UNION ALL SELECT source_path, clip_index, is_last_clip, key FROM rej WHERE level = 'clip'""")

    def plan(self, inputs: pa.Table) -> Resume:
        """Load the inputs (path, input_index) and decide what this run does."""
        con = self.con
        con.register("inputs_arrow", inputs)
        con.execute("CREATE OR REPLACE TABLE inputs AS SELECT path, input_index FROM inputs_arrow")
        con.unregister("inputs_arrow")
        con.execute(f"""CREATE OR REPLACE TABLE done_paths AS
            {COMPLETE} UNION SELECT source_path FROM rej WHERE {FINAL_REJECT}""")
        con.execute("""CREATE OR REPLACE TABLE todo AS SELECT i.* FROM inputs i
            WHERE i.path NOT IN (SELECT source_path FROM done_paths) ORDER BY input_index""")
        partial = con.execute("SELECT DISTINCT key FROM clips WHERE source_path NOT IN (SELECT source_path FROM done_paths)").fetchall()
        # Dedupe state: content already curated by earlier runs, and winners of this run so far.
        con.execute("CREATE OR REPLACE TABLE done_sources AS SELECT source_id, min(source_path) AS path FROM idx GROUP BY source_id")
        con.execute("CREATE OR REPLACE TABLE known_dups AS SELECT DISTINCT key FROM rej WHERE stage = 'dedupe'")
        con.execute("CREATE OR REPLACE TABLE seen (source_id VARCHAR PRIMARY KEY, path VARCHAR)")
        con.execute("CREATE OR REPLACE TABLE kept (path VARCHAR, source_id VARCHAR)")
        count = lambda q: con.execute(q).fetchall()[0][0]  # noqa: E731
        return Resume(inputs=count("SELECT count(*) FROM inputs"), todo=count("SELECT count(*) FROM todo"),
                      partial_keys=frozenset(k for (k,) in partial), index_rows=count("SELECT count(*) FROM idx"))

    def chunks(self, first: int, largest: int):
        """This run's inputs in input order, as arrow tables: `first` rows, then doubling up to `largest`."""
        size, after = max(1, first), -1
        while True:
            table = self.con.sql(f"SELECT path, input_index FROM todo WHERE input_index > {int(after)} "
                                 f"ORDER BY input_index LIMIT {int(size)}").to_arrow_table()
            if not table.num_rows:
                return
            after = table.column("input_index")[-1].as_py()
            yield table
            size = min(size * 2, max(largest, 1))

    def dedupe(self, probed_files: list[str]) -> tuple[pa.Table, list[dict], int]:
        """The accepted sources of one probed chunk split into winners and duplicates: the first
        input (in input order) with given content wins, over this run and earlier runs' index.
        Returns (winners as key/meta, new duplicate reject records, all duplicates decided)."""
        con = self.con
        rows = con.execute(f"""
            WITH p AS (SELECT DISTINCT ON (input_index) key, meta, path, input_index, source_id
                       FROM read_parquet({probed_files!r}) WHERE kind = 'row'),
            r AS (SELECT *, row_number() OVER (PARTITION BY source_id ORDER BY input_index) AS rn,
                         first_value(path) OVER (PARTITION BY source_id ORDER BY input_index) AS first_path FROM p)
            SELECT r.key, r.meta, r.path, r.input_index, r.source_id, r.rn, r.first_path, s.path, d.path
            FROM r LEFT JOIN seen s USING (source_id) LEFT JOIN done_sources d USING (source_id)
            ORDER BY r.input_index""").fetchall() if probed_files else []
        keep, dups, decided = [], [], 0
        for key, meta, path, index, sid, rn, first_path, seen_path, done_path in rows:
            first = seen_path or (first_path if rn > 1 else None) or (done_path if done_path and done_path != path else None)
            if not first:
                keep.append((key, meta, path, sid))
                continue
            decided += 1
            same = first == path
            dups.append({"stage": "dedupe", "reason": "duplicate", "source_id": sid, "source_path": path,
                         "detail": "the same path is listed twice" if same else f"same content as {first}",
                         "key": f"{path}#{index}" if same else path, "level": "source", "clip_index": -1,
                         "is_last_clip": False, "retryable": False})
        if dups:
            known = {k for (k,) in con.execute("SELECT key FROM known_dups WHERE key IN (SELECT unnest(?))", [[d["key"] for d in dups]]).fetchall()}
            dups = [d for d in dups if d["key"] not in known]
        winners = pa.table({"key": [k[0] for k in keep], "meta": [k[1] for k in keep]})
        if keep:
            con.register("new_kept", pa.table({"path": [k[2] for k in keep], "source_id": [k[3] for k in keep]}))
            con.execute("INSERT INTO kept SELECT path, source_id FROM new_kept")
            con.execute("INSERT OR IGNORE INTO seen SELECT source_id, path FROM new_kept")
            con.unregister("new_kept")
        return winners, dups, decided

    def reconcile(self, run_id: str) -> dict:
        """This run's outcome from what is committed in OUT (re-listed now)."""
        self.refresh()
        con = self.con
        one = lambda q, *a: con.execute(q, list(a)).fetchall()[0][0]  # noqa: E731
        con.execute(f"CREATE OR REPLACE TEMP TABLE complete AS {COMPLETE}")
        con.execute(f"""CREATE OR REPLACE TEMP TABLE outcome AS SELECT k.path,
                k.path IN (SELECT source_path FROM complete) AS complete,
                k.path IN (SELECT source_path FROM rej WHERE {FINAL_REJECT} AND run_id = ?) AS rejected,
                k.path IN (SELECT source_path FROM rej WHERE level = 'source' AND retryable AND run_id = ?) AS deferred,
                k.path IN (SELECT source_path FROM clips) AS has_clips
            FROM kept k""", [run_id, run_id])
        return {
            "kept": one("SELECT count(*) FROM outcome"),
            "accepted": one("SELECT count(*) FROM outcome WHERE complete AND NOT rejected"),
            "rejected_in_stream": one("SELECT count(*) FROM outcome WHERE rejected AND NOT complete"),
            "deferred_in_stream": one("SELECT count(*) FROM outcome WHERE deferred AND NOT complete AND NOT rejected"),
            "unaccounted": one("SELECT count(*) FROM outcome WHERE NOT (complete OR rejected OR deferred)"),
            "incomplete_with_clips": one("SELECT count(*) FROM outcome WHERE has_clips AND NOT complete AND NOT deferred"),
            "rejected_other": one(f"SELECT count(DISTINCT key) FROM rej WHERE {FINAL_REJECT} AND run_id = ? AND stage NOT IN ('probe', 'dedupe')", run_id),
            "clips_written": one("SELECT count(*) FROM idx WHERE run_id = ?", run_id),
            "clips_rejected": one("SELECT count(DISTINCT key) FROM rej WHERE level = 'clip' AND run_id = ?", run_id),
            "duplicate_keys": one("SELECT count(*) - count(DISTINCT key) FROM idx"),
            "shards": [s for (s,) in con.execute("SELECT DISTINCT shard FROM idx WHERE run_id = ? ORDER BY shard", [run_id]).fetchall()],
            "reasons": [{"stage": s, "level": lv, "reason": r, "count": n} for s, lv, r, n in con.execute(
                "SELECT stage, level, reason, count(DISTINCT key) FROM rej WHERE run_id = ? GROUP BY ALL ORDER BY ALL", [run_id]).fetchall()],
        }

    def totals(self) -> dict[str, int]:
        return {"samples": self.con.execute("SELECT count(*) FROM idx").fetchall()[0][0],
                "rejects": self.con.execute("SELECT count(*) FROM rej").fetchall()[0][0],
                "shards": len(self.storage.names("shards", ".tar"))}

    def close(self) -> None:
        self.con.close()


def committed_metadata(storage: Storage, run_id: str, shards: list[str]) -> tuple[dict, dict]:
    """({shard: checksum}, summed statistics) from the footers of the files this run committed:
    the index files of its shards and its rejects files (named `<run_id>-...`)."""
    import pyarrow.parquet as pq

    from pipeline.carry import merge

    files = [f"index/{s.removesuffix('.tar')}.parquet" for s in shards]
    files += [f"rejects/{n}" for n in storage.names("rejects", ".parquet") if n.startswith(f"{run_id}-")]

    def footer(rel: str):
        with storage.fs.open(storage.path(rel), "rb") as f:
            return pq.read_schema(f).metadata or {}

    checksums, stats = {}, {}
    with ThreadPoolExecutor(16) as pool:
        for meta in pool.map(footer, files):
            if SHARD_META_KEY in meta:
                checksum = json.loads(meta[SHARD_META_KEY])
                checksums[checksum.pop("shard")] = checksum
            if STATS_META_KEY in meta:
                found = json.loads(meta[STATS_META_KEY])
                if found.pop("run_id", None) == run_id:
                    merge(stats, found)
    return checksums, stats


def clean_uncommitted(storage: Storage) -> int:
    """Remove what an interrupted run left uncommitted: local temporaries, and shards whose index
    file was never written (the index file is the commit point of a shard). One listing a folder."""
    removed = 0
    for folder in ("shards", "index", "rejects", "runs"):
        for name in storage.names(folder, ".tmp", hidden=True):
            storage.remove(f"{folder}/{name}")
            removed += 1
    committed = {n.removesuffix(".parquet") for n in storage.names("index", ".parquet")}
    for name in storage.names("shards", ".tar"):
        if name.removesuffix(".tar") not in committed:
            storage.remove(f"shards/{name}")
            removed += 1
    return removed
