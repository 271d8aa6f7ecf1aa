"""probe: container, streams, codecs, duration, fps, resolution, audio layout; a content-derived
source id; clear reject reasons for what cannot become clips."""
from __future__ import annotations

import hashlib
import re
from fractions import Fraction
from typing import Any, Iterable

from pipeline.errors import configure_fsspec, is_retryable, retry_io
from pipeline.sources import InputFile, open_input
from pipeline.stage import Reject, Resources, Row, Stage
from stages.decode import MediaSource, open_container

HASH_WINDOW = 1 << 20  # bytes hashed at the start, middle and end of each file
MAX_TAG_CHARS = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def content_id(source: str | InputFile) -> tuple[str, int]:
    """A stable id from the size and three 1 MiB windows of the file: the same bytes under
    two names give the same id, without reading whole videos twice (remotely: three range reads
    of exactly those windows)."""
    source = open_input(source) if isinstance(source, str) else source
    with source.open(block_size=HASH_WINDOW, cache_type="none") as f:
        size = f.seek(0, 2)
        h = hashlib.blake2b(str(size).encode(), digest_size=8)
        for offset in sorted({0, max(0, size // 2 - HASH_WINDOW // 2), max(0, size - HASH_WINDOW)}):
            f.seek(offset)
            h.update(f.read(HASH_WINDOW))
    return h.hexdigest(), size


def clean_tag(value: Any) -> str:
    """Container metadata is untrusted: no control characters, bounded length."""
    return _CONTROL.sub(" ", str(value))[:MAX_TAG_CHARS].strip()


def _rate(value: Fraction | None) -> float:
    return float(value) if value else 0.0


def read_streams(source: MediaSource) -> dict[str, Any]:
    """Stream facts from the container header (raises av errors for unreadable input). `source`
    is a path or URL, or an opener such as `InputFile.open` (remote inputs stream)."""
    if isinstance(source, str):
        source = open_input(source).open
    with open_container(source) as container:
        info: dict[str, Any] = {"format": container.format.name, "duration": None, "video": None, "audio": None}
        if container.duration:
            info["duration"] = container.duration / 1_000_000
        video = next(iter(container.streams.video), None)
        audio = next(iter(container.streams.audio), None)
        if video is not None:
            ctx = video.codec_context
            avg, base = _rate(video.average_rate), _rate(video.base_rate)
            info["video"] = {
                "codec": video.codec.name if video.codec else "unknown",
                "width": ctx.width,
                "height": ctx.height,
                "fps": round(avg or base, 4),
                "frames": video.frames,
                # Containers report a base (max) rate apart from the average for variable frame rate.
                "vfr_suspected": bool(avg and base and abs(avg - base) / base > 0.01),
            }
            if video.duration and video.time_base:
                info["duration"] = info["duration"] or float(video.duration * video.time_base)
        if audio is not None:
            ctx = audio.codec_context
            info["audio"] = {
                "codec": audio.codec.name if audio.codec else "unknown",
                "sample_rate": ctx.sample_rate,
                "channels": ctx.channels,
                "layout": ctx.layout.name if ctx.layout else "",
            }
        tags = {k: clean_tag(v) for k, v in (container.metadata or {}).items() if k.lower() in ("title", "artist", "comment", "genre")}
        info["tags"] = tags
    return info


class Probe(Stage):
    name = "probe"
    resources = Resources(num_cpus=1, batch_size=16)

    def process(self, rows: list[Row]) -> Iterable[Row | Reject]:
        for row in rows:
            yield self._probe(row)

    def _reject(self, path: str, reason: str, detail: str, source_id: str = "") -> Reject:
        return Reject(stage=self.name, reason=reason, detail=detail, source_id=source_id, source_path=path, key=path)

    def _retry(self, fn, what: str):
        io = self.config.sources
        return retry_io(fn, attempts=io.io_attempts, backoff_seconds=io.io_backoff_seconds, what=what)

    def _io_error(self, path: str, exc: BaseException, what: str, source_id: str = "") -> Reject:
        """A transient failure that outlasted the retries: not finished, the next run tries again."""
        attempts = self.config.sources.io_attempts
        detail = f"{what} failed {attempts} times with a transient error: {type(exc).__name__}: {exc}"
        reject = self._reject(path, "io_error", detail[:500], source_id)
        reject.retryable = True
        return reject

    def _probe(self, row: Row) -> Row | Reject:
        import av

        path = row["meta"]["source"]["path"]
        cfg = self.config
        configure_fsspec()
        source = open_input(path, cfg.sources)
        try:
            # info, not exists: fsspec's exists() answers False for a refused connection.
            self._retry(source.info, f"looking up {path}")
        except Exception as exc:
            if is_retryable(exc):  # also HTTP's FileNotFoundError(url) from a refused connection
                return self._io_error(path, exc, "looking the file up")
            if isinstance(exc, FileNotFoundError):
                return self._reject(path, "missing_file", f"{path} does not exist")
            # Anything else is settled by reading: S3 answers a HEAD without a body, so an expired
            # token there is a bare "400 Bad Request", while the GET below names ExpiredToken.
        try:
            source_id, size = self._retry(lambda: content_id(source), f"hashing {path}")
        except Exception as exc:
            if is_retryable(exc):
                return self._io_error(path, exc, "reading the file")
            if not isinstance(exc, (OSError, ValueError)):  # ValueError: fsspec's HTTP without ranges
                raise
            return self._reject(path, "unreadable", f"cannot read {path}: {exc}")
        if size == 0:
            return self._reject(path, "empty_file", "file has 0 bytes", source_id)
        try:
            info = self._retry(lambda: read_streams(source.open), f"reading the header of {path}")
        except Exception as exc:
            if is_retryable(exc):
                return self._io_error(path, exc, "reading the container header", source_id)
            if not isinstance(exc, (av.error.FFmpegError, ValueError, OSError)):
                raise
            return self._reject(path, "unreadable", f"not a readable media container: {exc}", source_id)
        reason = None
        if info["video"] is None:
            reason = ("no_video_stream", f"no video stream ({info['format']}, audio={bool(info['audio'])})")
        elif info["audio"] is None and cfg.probe.require_audio:
            reason = ("no_audio_stream", "video has no audio stream, so no music to learn from")
        elif info["duration"] is None:
            reason = ("unknown_duration", "container reports no duration")
        elif info["duration"] < cfg.clip_seconds:
            reason = ("too_short", f"{info['duration']:.2f} s is shorter than clip_seconds={cfg.clip_seconds}")
        elif info["duration"] > cfg.probe.max_seconds:
            reason = ("too_long", f"{info['duration']:.0f} s exceeds probe.max_seconds={cfg.probe.max_seconds:.0f}")
        elif not info["video"]["width"] or not info["video"]["height"]:
            reason = ("no_video_size", "video stream reports no frame size")
        if reason:
            return self._reject(path, *reason, source_id=source_id)
        meta = dict(row["meta"])
        meta["source"] = {**meta["source"], "source_id": source_id, "size_bytes": size}
        meta["probe"] = info
        return {"key": source_id, "meta": meta}
