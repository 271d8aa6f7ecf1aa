"""An output folder (OUT/) opened for reading: its index as a pyarrow dataset, its rejects, run
records and tars, on a local path or any fsspec URL (file://, memory://, s3://, gs://, ...).

Nothing here loads the whole index: scans stream record batches of the projected columns, and a
tar is opened only to read the members asked for."""
from __future__ import annotations

import json
import posixpath
import sys
import tarfile
from typing import Any, Iterator

from shards.schema import INDEX_SCHEMA

BATCH_ROWS = 64 * 1024


class Out:
    def __init__(self, location: str):
        import fsspec

        self.location = str(location)
        self.fs, root = fsspec.core.url_to_fs(self.location)
        self.root = root.rstrip("/") or "/"
        self.local = "file" in _protocols(self.fs)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def listing(self, folder: str, suffix: str) -> list[str]:
        """Sorted full paths of the committed files in OUT/folder (temporaries start with a dot)."""
        try:
            entries = self.fs.ls(self.path(folder), detail=False)
        except FileNotFoundError:
            return []
        names = (posixpath.basename(str(p).rstrip("/")) for p in entries)
        return sorted(self.path(folder, n) for n in names if n.endswith(suffix) and not n.startswith("."))

    def index_files(self) -> list[str]:
        return self.listing("index", ".parquet")

    def tar_files(self) -> list[str]:
        return self.listing("shards", ".tar")

    def arrow_fs(self):
        import pyarrow.fs as pafs

        if self.local:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def index(self, files: list[str] | None = None):
        """The index as one pyarrow dataset. The explicit schema lets files written by older schema
        versions (fewer columns) scan together with new ones: missing columns read as null."""
        import pyarrow.dataset as ds

        files = self.index_files() if files is None else files
        if not files:
            raise FileNotFoundError(f"no index files under {self.location}/index (is this an output folder?)")
        return ds.dataset(files, schema=INDEX_SCHEMA, format="parquet", filesystem=self.arrow_fs())

    def rejects(self):
        import pyarrow.dataset as ds

        files = self.listing("rejects", ".parquet")
        return ds.dataset(files, format="parquet", filesystem=self.arrow_fs()) if files else None

    def run_records(self) -> list[dict[str, Any]]:
        """Every run record, oldest first (run ids start with a UTC timestamp)."""
        records = []
        for path in self.listing("runs", ".json"):
            with self.fs.open(path, "rb") as f:
                records.append(json.load(f))
        return sorted(records, key=lambda r: r.get("run_id", ""))

    def index_metadata(self, path: str):
        """The parquet footer of one index file (row count and its key-value metadata)."""
        import pyarrow.parquet as pq

        with self.fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata

    def find(self, key: str, columns: list[str] | None = None) -> dict[str, Any] | None:
        import pyarrow.compute as pc

        dataset = self.index()
        for batch in scan(dataset, columns or dataset.schema.names, filter=pc.field("key") == key):
            return batch.slice(0, 1).to_pylist()[0]  # file by file, stopping at the first match
        return None

    def read_members(self, shard: str, key: str, members: list[str]) -> dict[str, bytes]:
        """The named members of one sample, read from its tar alone (members of a sample are
        adjacent, so the scan stops right after them)."""
        wanted = {f"{key}.{m}": m for m in members}
        found: dict[str, bytes] = {}
        with self.fs.open(self.path("shards", shard), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if info.name in wanted:
                    found[wanted[info.name]] = tar.extractfile(info).read()
                elif found:
                    break
        return found


def duckdb_index(out: Out, progress: bool = False):
    """A DuckDB connection with the index as the view `idx` (and `rejects`). DuckDB reads the parquet
    files itself, within a memory cap, so a GROUP BY over tens of millions of keys spills to a
    temporary folder instead of growing (a registered pyarrow dataset would be read ahead without
    bound: 1.5 GB for verify at 20M rows, against ~0.6 GB this way). Files of older schema versions
    read their missing columns as null (union_by_name)."""
    import tempfile

    import duckdb

    con = duckdb.connect()
    con.execute("SET memory_limit = '256MB'")
    con.execute(f"SET temp_directory = '{tempfile.gettempdir()}/video-robin-duckdb'")
    con.execute(f"SET enable_progress_bar = {'true' if progress else 'false'}")
    files = out.index_files()
    if not files:
        raise FileNotFoundError(f"no index files under {out.location}/index (is this an output folder?)")
    if not out.local:
        con.register_filesystem(out.fs)
    url = (lambda p: p) if out.local else (lambda p: f"{_protocols(out.fs)[0]}://{p.lstrip('/')}")
    con.from_parquet([url(p) for p in files], union_by_name=True).create_view("idx")
    rejects = out.listing("rejects", ".parquet")
    if rejects:
        con.from_parquet([url(p) for p in rejects], union_by_name=True).create_view("rejects")
    return con


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def show_progress(flag: bool | None) -> bool:
    """Bars go to stderr, on a terminal or when asked (--progress); stdout stays data."""
    return sys.stderr.isatty() if flag is None else flag


def progress_bar(total: int, desc: str, unit: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def scan(dataset, columns: list[str], filter=None, progress: bool = False, desc: str = "scan") -> Iterator:
    """Record batches of `columns` (rows matching `filter`), with a bar over the index files.

    One file at a time, each through a fresh fragment: the dataset-wide scanner reads ahead of a
    slow consumer without bound (at 4M rows `summary` held ~400 MB of batches it had not reached),
    and the dataset's own fragments keep each file's parquet footer once read (~120 KB a file).
    This way memory stays flat however many files the index has."""
    files = dataset.files
    bar = progress_bar(len(files), desc, "file", progress)
    rows = 0
    try:
        for path in files:
            fragment = dataset.format.make_fragment(path, dataset.filesystem)
            for batch in fragment.to_batches(schema=dataset.schema, columns=columns, filter=filter,
                                             batch_size=BATCH_ROWS, batch_readahead=2):
                rows += batch.num_rows
                if batch.num_rows:
                    yield batch
            bar.update(1)
            if progress:
                bar.set_postfix(rows=rows, refresh=False)
    finally:
        bar.close()
