"""writer: samples -> WebDataset tar shards + one parquet index file per shard.

A shard is written under a hidden temporary name, fsynced, then renamed; its index file is written
(the same way) only after the tar is final. So `OUT/shards/*.tar` never holds a partial shard, and
a key in `OUT/index/` is always readable from its tar."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ownership import check
from pipeline.stage import Reject, Resources, Row, Stage
from shards.schema import ARRAY_MEMBERS, INDEX_SCHEMA, SCHEMA_VERSION, SHARD_META_KEY, SampleMeta, index_row

MTIME = 1_700_000_000  # fixed member times: the same samples give byte-identical tars


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def flac_bytes(audio: np.ndarray, rate: int = 48000) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(audio.T, -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def jpg_bytes(rgb: np.ndarray, quality: int = 85) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_sample(row: Row, write_audio: bool, write_thumbnail: bool) -> dict[str, bytes]:
    # Whether the learned features are there, said plainly (their stages may have been skipped).
    features = {"has_clip": "clip_embeddings" in row, "has_latent": "latent" in row}
    meta = SampleMeta.model_validate({**row["meta"], **features, "key": row["key"], "schema_version": SCHEMA_VERSION})
    members = {"json": json.dumps(meta.model_dump(exclude_none=True), ensure_ascii=False).encode()}
    for field, member in ARRAY_MEMBERS.items():
        if field in row:
            members[member] = npy_bytes(row[field])
    if write_audio and "audio48" in row:
        members["flac"] = flac_bytes(row["audio48"])
    if write_thumbnail and "frames" in row and len(row["frames"]):
        members["jpg"] = jpg_bytes(row["frames"][len(row["frames"]) // 2])
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


def _atomic_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class ShardSink:
    """Writes one shard at a time under a temporary name; `close()` makes it final."""

    def __init__(self, out_dir: Path, name: str, run_id: str):
        import webdataset as wds

        self.name, self.out_dir, self.run_id = name, out_dir, run_id
        self.final = out_dir / "shards" / f"{name}.tar"
        self.tmp = out_dir / "shards" / f".{name}.tar.tmp"
        self.index_path = out_dir / "index" / f"{name}.parquet"
        self._file = open(self.tmp, "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = wds.TarWriter(self._hashing, encoder=False, mtime=MTIME)
        self.rows: list[dict[str, Any]] = []
        self.bytes = 0

    def add(self, key: str, members: dict[str, bytes], meta: dict) -> None:
        self._tar.write({"__key__": key, **members})
        size = sum(len(v) for v in members.values())
        self.bytes += size
        self.rows.append(index_row({**meta, "key": key}, self.final.name, sorted(members), size))

    def close(self) -> None:
        """Commit: the tar under its final name, then its index file (the commit point). A run
        that lost the folder to a newer run commits nothing."""
        self._tar.close()  # a tar stream on a file object it did not open leaves the file open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        # The shard's checksum rides in its index file's metadata; the run record copies it from there.
        self.checksum = {"shard": self.final.name, "sha256": self._hashing.sha256.hexdigest(),
                         "bytes": self._hashing.bytes, "samples": len(self.rows)}
        table = pa.Table.from_pylist(self.rows, schema=INDEX_SCHEMA)
        table = table.replace_schema_metadata({SHARD_META_KEY: json.dumps(self.checksum)})
        try:
            check(self.out_dir, self.run_id)
            os.replace(self.tmp, self.final)
            check(self.out_dir, self.run_id)
            _atomic_parquet(table, self.index_path)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            if not self.index_path.exists():
                self.final.unlink(missing_ok=True)
            raise


class Writer(Stage):
    name = "writer"
    consumes = ("frames", "audio48", *ARRAY_MEMBERS)
    resources = Resources(num_cpus=0, pool_size=1, batch_size=256)  # sized from config below

    def __init__(self, config, context=None):
        super().__init__(config, context)
        # An actor pool: each actor keeps its encoders loaded and writes whole shards per call. It
        # reserves no CPU: an actor holding one would leave a 1-CPU Ray unable to run any task.
        self.resources = Resources(num_cpus=0, pool_size=config.writer.workers, batch_size=config.writer.samples_per_shard)

    def setup(self) -> None:
        import pandas  # noqa: F401  (pyarrow's first table build imports it: once, here)
        import PIL.Image  # noqa: F401  (encoders load once per worker, not inside the first shard)
        import soundfile  # noqa: F401
        import webdataset  # noqa: F401

        pa.Table.from_pylist([{"key": "warm-up"}]).to_pandas()

        out = Path(self.context.output_dir)
        (out / "shards").mkdir(parents=True, exist_ok=True)
        (out / "index").mkdir(parents=True, exist_ok=True)

    def process(self, rows: list[Row]) -> Iterable[Row | Reject]:
        """One call writes one shard (or more, when max_shard_bytes rolls it early)."""
        cfg = self.config.writer
        done = self.context.done_keys
        sink: ShardSink | None = None
        written: list[tuple[str, str]] = []
        for row in rows:
            if row["key"] in done:
                continue
            try:
                members = encode_sample(row, cfg.write_audio, cfg.write_thumbnail)
            except Exception as exc:  # e.g. a schema violation: this sample, not the shard, is lost
                yield Reject.for_row(self.name, row, "encode_failed", f"{type(exc).__name__}: {exc}")
                continue
            if sink is None:
                name = f"{self.context.ledger.next_shard_index():06d}"
                sink = ShardSink(Path(self.context.output_dir), name, self.context.run_id)
            sink.add(row["key"], members, row["meta"])
            written.append((row["key"], sink.name))
            if sink.bytes >= cfg.max_shard_bytes:
                sink.close()
                sink = None
        if sink is not None:
            sink.close()
        for key, shard in written:
            yield {"key": key, "meta": {"shard": shard}}
