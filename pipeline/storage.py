"""Where a run writes: OUT on a local disk, `file://`, `s3://`, `gs://` or any fsspec filesystem
that can write. Every write goes through here.

A file appears under its final name only when complete: locally through a hidden temporary and a
rename, on object stores through one PUT (or a multipart upload, which S3 and GCS make visible
only when it completes). Names carry no sequence numbers: whoever writes the same content writes
the same name, so a retried task overwrites its own earlier attempt instead of adding a copy."""
from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from typing import Iterator

from shards.index import Out

READ_ONLY = ("http", "https", "ftp")


class StorageError(RuntimeError):
    """OUT cannot be written: says what was tried and what to change."""


class Storage(Out):
    def __init__(self, location: str):
        from pipeline.errors import configure_fsspec

        configure_fsspec()
        location = str(location)
        protocol = location.split("://", 1)[0] if "://" in location else "file"
        if protocol in READ_ONLY:
            raise StorageError(f"--output {location}: {protocol}:// is read-only; write to a local path, s3:// or gs://")
        try:
            super().__init__(location)
        except ImportError as exc:  # fsspec names the package it needs (s3fs, gcsfs, ...)
            raise StorageError(f"--output {location}: {exc}") from exc
        if self.local:
            self.root = os.path.abspath(self.root)

    def makedirs(self, *folders: str) -> None:
        if self.local:  # object stores have no folders
            for folder in folders:
                os.makedirs(self.path(folder), exist_ok=True)

    def check_writable(self) -> None:
        """Write and delete one object before any work: a missing bucket, a read-only mount or
        missing credentials fail the run at once, with the store's own words."""
        probe = self.path("runs", ".write-check")
        try:
            self.makedirs("runs")
            self.put_bytes("runs/.write-check", b"ok")
            self.fs.rm(probe)
        except Exception as exc:  # noqa: BLE001 - any failure here means the run cannot write
            raise StorageError(
                f"cannot write to {self.location}: {type(exc).__name__}: {exc}. On a cluster every node "
                "writes shards, so every node needs write access (an IAM role with s3:PutObject, "
                "s3:GetObject, s3:ListBucket and s3:DeleteObject on the bucket)") from exc

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def put_bytes(self, rel: str, data: bytes) -> None:
        if self.local:
            with self.writing(rel) as tmp, open(tmp, "wb") as f:
                f.write(data)
        else:
            self.fs.pipe_file(self.path(rel), data)

    def staging(self, folder: str, suffix: str = "") -> str:
        """A fresh local filename to write something whose final name is not known yet; `commit`
        moves it to OUT. Locally a hidden temporary inside OUT/folder (a rename commits it), for
        object stores a local temporary file (an upload commits it)."""
        import uuid

        if self.local:
            os.makedirs(self.path(folder), exist_ok=True)
            return os.path.join(self.path(folder), f".{uuid.uuid4().hex}{suffix}.tmp")
        return os.path.join(tempfile.mkdtemp(prefix="video-robin-upload-"), f"part{suffix}")

    def commit(self, staged: str, rel: str) -> None:
        """`staged` becomes OUT/rel in one step: an fsync and a rename, or one whole upload (S3 and
        GCS show a multipart upload only once it completes), so OUT never holds a partial file."""
        try:
            if self.local:
                with open(staged, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(staged, self.path(rel))
            else:
                self.fs.put_file(staged, self.path(rel))
        finally:
            self.discard(staged)

    def discard(self, staged: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)
        if not self.local:
            shutil.rmtree(os.path.dirname(staged), ignore_errors=True)

    @contextlib.contextmanager
    def writing(self, rel: str) -> Iterator[str]:
        """A local filename to write; on a clean exit it becomes OUT/rel (see `commit`)."""
        staged = self.staging(posixpath.dirname(rel) or ".", posixpath.splitext(rel)[1])
        try:
            yield staged
        except BaseException:
            self.discard(staged)
            raise
        self.commit(staged, rel)

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(rel))

    def names(self, folder: str, suffix: str = "", hidden: bool = False) -> list[str]:
        """Sorted file names in OUT/folder (one listing, no per-file calls). Never from a cache:
        other processes write here, and s3fs would otherwise answer from its listing cache."""
        if not self.local:
            self.fs.invalidate_cache(self.path(folder))
        try:
            entries = self.fs.ls(self.path(folder), detail=False)
        except FileNotFoundError:
            return []
        names = (posixpath.basename(str(p).rstrip("/")) for p in entries)
        return sorted(n for n in names if n.endswith(suffix) and (hidden or not n.startswith(".")))

    def url(self, rel: str) -> str:
        """A full URL (or local path) for libraries that take one."""
        full = self.path(rel)
        return full if self.local else self.fs.unstrip_protocol(full)
