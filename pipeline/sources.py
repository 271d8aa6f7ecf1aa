"""Inputs: a directory, a glob, a manifest (parquet / jsonl / csv) or one file; local or any fsspec URL.

`open_input` gives the stages one handle per input: local files by name, remote ones (s3://, gs://,
https://) as fresh fsspec files streamed through range reads; `local_copy` is the bounded fallback
for what cannot be decoded while it streams."""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import fsspec

from pipeline.errors import configure_fsspec

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

    configure_fsspec()
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
    configure_fsspec()
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


# Remote inputs stream through fsspec files: PyAV's reads (32 KiB) and seeks are served from an LRU
# of 8 MiB blocks, each block one range request, so a seek (the moov atom at the end of an mp4,
# then back to the media data) costs one request, not a re-download. At most 32 MiB per open file.
STREAM_BLOCK_SIZE = 8 << 20
STREAM_CACHE_TYPE = "blockcache"
STREAM_MAX_BLOCKS = 4
COPY_CHUNK = 8 << 20
COPY_PREFIX = "video-robin-input-"


class TooLargeToCopy(ValueError):
    """A remote input that cannot be streamed is larger than `sources.max_local_copy_bytes`."""


@dataclass
class InputFile:
    """One input, to be read by several readers independently.

    `local_path` is a filename for local inputs (any decoder can read it) and None for remote
    ones; `open()` returns a new binary file object on every call (the frame decoder and the audio
    track each hold their own), streaming remote bytes through range reads."""

    path: str
    local_path: str | None
    max_local_copy_bytes: int = 8 << 30

    @property
    def remote(self) -> bool:
        return self.local_path is None

    def _fs(self):
        configure_fsspec()
        return fsspec.core.url_to_fs(self.path)

    def open(self, block_size: int | None = None, cache_type: str | None = None) -> BinaryIO:
        """A new binary file object; remote: `block_size`-byte range reads (STREAM_BLOCK_SIZE)
        through fsspec's `cache_type` cache (STREAM_CACHE_TYPE)."""
        if self.local_path is not None:
            return open(self.local_path, "rb")
        block_size = block_size or STREAM_BLOCK_SIZE
        cache_type = cache_type or STREAM_CACHE_TYPE
        fs, root = self._fs()
        options = {"maxblocks": STREAM_MAX_BLOCKS} if cache_type == "blockcache" else {}
        return fs.open(root, "rb", block_size=block_size, cache_type=cache_type, cache_options=options)

    def info(self) -> dict[str, Any]:
        """The store's facts about the input (raises FileNotFoundError when there is none)."""
        if self.local_path is not None:
            st = os.stat(self.local_path)
            return {"name": self.local_path, "size": st.st_size, "type": "directory" if os.path.isdir(self.local_path) else "file"}
        fs, root = self._fs()
        return fs.info(root)

    @contextlib.contextmanager
    def local_copy(self, size: int | None = None) -> Iterator[str]:
        """A local filename: the file itself, or a temporary copy of a remote one, refused
        (TooLargeToCopy) above `max_local_copy_bytes` and deleted when the block exits."""
        with local_copy(self.path, max_bytes=self.max_local_copy_bytes, size=size) as name:
            yield name


def open_input(path: str, sources_cfg: Any = None) -> InputFile:
    """The input at `path` (local or any fsspec URL); `sources_cfg` is a SourcesConfig (for
    `max_local_copy_bytes`), defaults when None."""
    limit = getattr(sources_cfg, "max_local_copy_bytes", None)
    local = path.removeprefix("file://") if is_local(path) else None
    return InputFile(path=path, local_path=local, max_local_copy_bytes=8 << 30 if limit is None else int(limit))


@contextlib.contextmanager
def local_copy(path: str, max_bytes: int | None = None, size: int | None = None) -> Iterator[str]:
    """A local filename for `path`: itself when local, else a temporary download, for what cannot
    be decoded while it streams. Raises TooLargeToCopy when the file (its known `size`, the store's
    size, or what arrives) exceeds `max_bytes`; the copy is deleted when the block exits."""
    if is_local(path):
        yield path.removeprefix("file://")
        return
    configure_fsspec()
    fs, root = fsspec.core.url_to_fs(path)
    if max_bytes is not None:
        if size is None:
            size = fs.info(root).get("size")
        if size is not None and size > max_bytes:
            raise TooLargeToCopy(f"{path} has {size} bytes, more than sources.max_local_copy_bytes={max_bytes}")
    suffix = Path(path.split("?")[0]).suffix
    with tempfile.NamedTemporaryFile(prefix=COPY_PREFIX, suffix=suffix) as tmp:
        copied = 0
        with fs.open(root, "rb", block_size=COPY_CHUNK, cache_type="none") as src:
            while chunk := src.read(COPY_CHUNK):
                copied += len(chunk)
                if max_bytes is not None and copied > max_bytes:
                    raise TooLargeToCopy(f"{path} is larger than sources.max_local_copy_bytes={max_bytes}")
                tmp.write(chunk)
        tmp.flush()
        yield tmp.name
