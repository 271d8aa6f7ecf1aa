"""Inputs: a directory, a glob, a manifest (parquet / jsonl / csv) or one file; local or any fsspec URL."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import fsspec

MANIFEST_SUFFIXES = (".parquet", ".jsonl", ".csv")
PATH_COLUMNS = ("path", "url", "video", "file")


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _unstrip(fs, path: str, like: str) -> str:
    """fsspec strips the protocol from listed paths; put it back for remote filesystems."""
    if "://" in like and "://" not in path:
        return fs.unstrip_protocol(path)
    return path


def read_manifest(location: str) -> list[str]:
    """Paths from a manifest; relative entries resolve against the manifest's folder."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    with fsspec.open(location, "rb") as f:
        if location.endswith(".parquet"):
            table = pq.read_table(f)
        elif location.endswith(".jsonl"):
            table = pajson.read_json(f)
        else:
            table = pacsv.read_csv(f)
    column = next((c for c in PATH_COLUMNS if c in table.column_names), None)
    if column is None:
        raise ValueError(f"manifest {location} has none of the columns {PATH_COLUMNS}; found {table.column_names}")
    base = location.rsplit("/", 1)[0] if "/" in location else "."
    paths = []
    for value in table.column(column).to_pylist():
        if value is None or not str(value).strip():
            continue
        value = str(value).strip()
        if "://" not in value and not os.path.isabs(value):
            value = f"{base}/{value}"
        paths.append(value)
    return paths


def list_sources(location: str, extensions: list[str], recursive: bool = True) -> list[str]:
    """Every input path, in a stable order. Manifest rows keep their order and duplicates
    (duplicates are resolved later by content); listed folders are sorted."""
    if location.endswith(MANIFEST_SUFFIXES):
        return read_manifest(location)
    fs, root = fsspec.core.url_to_fs(location)
    wanted = tuple(e.lower() for e in extensions)
    if _is_glob(location):
        found = fs.glob(root)
    elif fs.isdir(root):
        found = fs.find(root) if recursive else [p for p in fs.ls(root, detail=False)]
    elif fs.exists(root):
        return [location]
    else:
        raise FileNotFoundError(f"input {location!r} is neither a folder, a glob, a manifest nor a file")
    paths = sorted(p for p in found if p.lower().endswith(wanted) and not fs.isdir(p))
    return [_unstrip(fs, p, location) for p in paths]


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local filename for `path`: itself when local, else a temporary download (decoders
    seek a lot; a local copy is faster and works with every decoder)."""
    if is_local(path):
        yield path.removeprefix("file://")
        return
    suffix = Path(path.split("?")[0]).suffix
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        with fsspec.open(path, "rb") as src:
            while chunk := src.read(8 << 20):
                tmp.write(chunk)
        tmp.flush()
        yield tmp.name
