"""writer: samples -> WebDataset tar shards + one parquet index file per shard.

A shard is written to a staging file, then committed whole (a rename, or one upload to an object
store) under a name derived from its keys; its index file is written (the same way) only after the
tar is final. So `OUT/shards/*.tar` never holds a partial shard, a key in `OUT/index/` is always
readable from its tar, and a retried task overwrites its own shard rather than adding a copy."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.carry import REJECT, is_side, merge, node_id, take_stats
from pipeline.faults import fault
from pipeline.ownership import check
from pipeline.stage import Reject, Resources, Row, Stage
from pipeline.storage import Storage
from shards.schema import (ARRAY_MEMBERS, INDEX_SCHEMA, REJECT_SCHEMA, SCHEMA_VERSION, SHARD_META_KEY, STATS_META_KEY,
                           SampleMeta, index_row)

ENCODED_MEMBERS = ("flac", "jpg")  # encoded upstream (shards/media.py), packed as they are
MTIME = 1_700_000_000  # fixed member times: the same samples give byte-identical tars


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(row: Row) -> dict[str, bytes]:
    """The sample's tar members: its json, its arrays as .npy, and the FLAC and JPEG that segment
    encoded (shards/media.py), as they are."""
    # Whether the learned features are there, said plainly (their stages may have been skipped).
    features = {"has_clip": "clip_embeddings" in row, "has_latent": "latent" in row}
    meta = SampleMeta.model_validate({**row["meta"], **features, "key": row["key"], "schema_version": SCHEMA_VERSION})
    members = {"json": json.dumps(meta.model_dump(exclude_none=True), ensure_ascii=False).encode()}
    for field, member in ARRAY_MEMBERS.items():
        if field in row:
            members[member] = npy_bytes(row[field])
    for member in ENCODED_MEMBERS:
        if member in row:
            members[member] = np.asarray(row[member], np.uint8).tobytes()
    return members


class _HashingFile:
    """Hashes and counts the bytes written through it: the shard's checksum costs no second read."""

    def __init__(self, f):
        self._f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def content_name(keys: Iterable[str]) -> str:
    """A name derived from the keys a file holds: the same batch written twice (a retried task)
    gets the same name and overwrites, never a second copy."""
    h = hashlib.blake2b(digest_size=10)
    for key in sorted(keys):
        h.update(key.encode() + b"\n")
    return h.hexdigest()


def parquet_file(storage: Storage, rel: str, table: pa.Table) -> None:
    with storage.writing(rel) as tmp:
        pq.write_table(table, tmp)


def stats_metadata(run_id: str, stats: dict) -> dict[bytes, bytes]:
    return {STATS_META_KEY: json.dumps({"run_id": run_id, **stats})}


class ShardSink:
    """One shard being written to a local staging file; its name comes from its keys at `finish`."""

    def __init__(self, storage: Storage, run_id: str):
        import webdataset as wds

        self.storage, self.run_id = storage, run_id
        self.staged = storage.staging("shards", ".tar")
        self._file = open(self.staged, "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = wds.TarWriter(self._hashing, encoder=False, mtime=MTIME)
        self.entries: list[tuple[str, dict, list[str], int]] = []
        self.bytes = 0

    def add(self, key: str, members: dict[str, bytes], meta: dict) -> None:
        self._tar.write({"__key__": key, **members})
        size = sum(len(v) for v in members.values())
        self.bytes += size
        self.entries.append((key, meta, sorted(members), size))

    def finish(self) -> tuple[str, pa.Table]:
        """Close the tar and commit it under its content name; returns (name, index table). The
        index file, the shard's commit point, is written by the caller after everything else."""
        self._tar.close()  # a tar stream on a file object it did not open leaves the file open
        self._file.close()
        self.name = content_name(key for key, *_ in self.entries)
        tar = f"{self.name}.tar"
        rows = [index_row({**meta, "key": key}, tar, members, size, self.run_id) for key, meta, members, size in self.entries]
        checksum = {"shard": tar, "sha256": self._hashing.sha256.hexdigest(), "bytes": self._hashing.bytes, "samples": len(rows)}
        table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA).replace_schema_metadata({SHARD_META_KEY: json.dumps(checksum)})
        check(self.storage, self.run_id)
        self.storage.commit(self.staged, f"shards/{tar}")
        return self.name, table

    def abandon(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()
        self.storage.discard(self.staged)


class Writer(Stage):
    """Writes each batch as whole shards, plus the batch's rejects and statistics, then commits.
    A stateless Ray task: as many run at once as the cluster has room for (writer.workers caps it)."""

    name = "writer"
    consumes = (*ENCODED_MEMBERS, *ARRAY_MEMBERS)
    takes_side_rows = True
    resources = Resources(num_cpus=0.5, batch_size=256)  # sized from config below

    def __init__(self, config, context=None):
        super().__init__(config, context)
        self.resources = Resources(num_cpus=config.writer.num_cpus, batch_size=config.writer.samples_per_shard)

    def setup(self) -> None:
        import pandas  # noqa: F401  (pyarrow's first table build imports it: once, here)
        import webdataset  # noqa: F401

        pa.Table.from_pylist([{"key": "warm-up"}]).to_pandas()
        self.storage = Storage(self.context.output_dir)
        self._setup = {"setup_seconds": 0.0, "workers": 1}

    def process(self, rows: list[Row]) -> Iterable[Row]:
        """Commit order: the tars, then the rejects file, then each shard's index file (its commit
        point; the last one also holds the batch's statistics)."""
        t0 = time.perf_counter()
        cfg, run_id = self.config.writer, self.context.run_id
        done = self.context.done_keys
        stats: dict = {}
        rejects: list[dict] = []
        shards: list[tuple[str, pa.Table]] = []
        sink: ShardSink | None = None
        samples = written = finished = 0  # finished: sources whose end this batch holds (for the progress bar)
        try:
            for row in rows:
                merge(stats, take_stats(row))
                meta = row["meta"]
                if REJECT in meta:
                    rejects.append(meta[REJECT])
                    finished += meta[REJECT]["level"] == "source" or bool(meta[REJECT].get("is_last_clip"))
                    continue
                if is_side(row):
                    continue
                samples += 1
                finished += bool(meta.get("clip", {}).get("is_last"))
                if row["key"] in done:
                    continue
                try:
                    members = encode_sample(row)
                except Exception as exc:  # e.g. a schema violation: this sample, not the shard, is lost
                    rejects.append(Reject.for_row(self.name, row, "encode_failed", f"{type(exc).__name__}: {exc}").to_record())
                    continue
                sink = sink or ShardSink(self.storage, run_id)
                sink.add(row["key"], members, row["meta"])
                written += 1
                if sink.bytes >= cfg.max_shard_bytes:
                    shards.append(sink.finish())
                    sink = None
            if sink is not None:
                shards.append(sink.finish())
                sink = None
        finally:
            if sink is not None:
                sink.abandon()
        fault("writer.after_tar")  # failure tests: a writer that dies with its tars up, its index not
        own = {"rows_in": samples, "rows_out": written, "rejected": sum(1 for r in rejects if r["stage"] == self.name),
               "seconds": time.perf_counter() - t0, "calls": 1 if samples else 0, **self._setup}
        self._setup = {}
        merge(stats, {self.name: own})
        if samples and (node := node_id()):
            merge(stats, {"counters": {f"writer.calls_on_node.{node}": 1}})
        names = [name for name, _ in shards]
        batch = content_name([*(f"shard:{n}" for n in names), *(f"reject:{r['level']}:{r['key']}" for r in rejects)])
        if rejects or not shards:  # a batch of only statistics still commits them
            table = pa.Table.from_pylist([{**r, "run_id": run_id} for r in rejects], schema=REJECT_SCHEMA)
            if not shards:
                table = table.replace_schema_metadata(stats_metadata(run_id, stats))
            check(self.storage, run_id)
            parquet_file(self.storage, f"rejects/{run_id}-{batch}.parquet", table)
        for i, (name, table) in enumerate(shards):
            if i == len(shards) - 1:
                table = table.replace_schema_metadata({**table.schema.metadata, **stats_metadata(run_id, stats)})
            check(self.storage, run_id)
            parquet_file(self.storage, f"index/{name}.parquet", table)
        yield {"key": batch, "meta": {"shards": names, "samples": written, "rejects": len(rejects), "sources": finished}}
