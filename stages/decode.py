"""decode: one sequential PyAV pass over a video's frames and its audio (48 kHz stereo + 16 kHz
mono). The segment stage drives both streams and cuts clips from them."""
from __future__ import annotations

import contextlib
from typing import BinaryIO, Callable, Iterator, Union

import numpy as np

# What PyAV reads: a local filename, or an opener that returns a fresh binary file object per call
# (`pipeline.sources.InputFile.open`: a remote input streamed through range reads).
MediaSource = Union[str, Callable[[], BinaryIO]]
# Pixel formats whose first plane is 8-bit luma: read in place, no conversion.
LUMA_FIRST = {"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "yuv411p", "yuv440p", "nv12", "nv21", "gray"}


@contextlib.contextmanager
def open_container(source: MediaSource):
    """A PyAV input container over a filename or over a new file from an opener (closed after)."""
    import av

    if isinstance(source, str):
        with av.open(source, metadata_errors="ignore") as container:
            yield container
        return
    with source() as f, av.open(f, metadata_errors="ignore") as container:
        yield container


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Aspect-preserving size whose short side is `short_side` (even numbers for the scaler)."""
    scale = short_side / min(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def video_frames(source: MediaSource) -> Iterator[tuple[float, object]]:
    """(time, decoded frame) in display order, time 0 at the first frame. Frames stay in the
    decoder's own pixel format: the shot detector and the motion signal read the luma plane, and
    only the few frames the clips keep are converted to RGB (`rgb`)."""
    with open_container(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        origin = None
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = frame.time
            origin = t if origin is None else origin
            yield t - origin, frame


def luma(frame) -> np.ndarray:
    """The frame's luma plane as uint8 [h, w]: a view of the decoded plane where its format has one
    (no copy), else a conversion to grey (RGB, 10-bit and other layouts)."""
    if frame.format.name in LUMA_FIRST:
        plane = frame.planes[0]
        rows = np.frombuffer(plane, np.uint8, count=plane.line_size * plane.height).reshape(plane.height, plane.line_size)
        return rows[: frame.height, : frame.width]
    return frame.to_ndarray(format="gray")


class RGB:
    """Frames to RGB at one size. One reformatter per video: it keeps its scaler between frames
    (a fresh one per frame costs more than the conversion at small sizes); area averaging, the
    right filter for shrinking."""

    def __init__(self, width: int, height: int):
        from av.video.reformatter import VideoReformatter

        self.width, self.height, self._reformatter = width, height, VideoReformatter()

    def __call__(self, frame) -> np.ndarray:
        return self._reformatter.reformat(frame, width=self.width, height=self.height, format="rgb24",
                                          interpolation="AREA").to_ndarray()


class AudioTrack:
    """Pulls audio on demand, keeping only what the current clip needs: 48 kHz stereo for the
    VAE and the FLAC member, 16 kHz mono for analysis and captioning."""

    RATES = {"stereo48": (48000, "stereo"), "mono16": (16000, "mono")}

    def __init__(self, source: MediaSource):
        import av

        self._file = None if isinstance(source, str) else source()
        self._container = None
        try:
            self._container = av.open(source if self._file is None else self._file, metadata_errors="ignore")
            self._stream = self._container.streams.audio[0]
        except BaseException:
            self.close()
            raise
        video = next(iter(self._container.streams.video), None)
        self._video_origin = float(video.start_time * video.time_base) if video is not None and video.start_time else 0.0
        self._packets = self._container.decode(self._stream)
        self._resamplers = {k: av.AudioResampler(format="flt", layout=lay, rate=r) for k, (r, lay) in self.RATES.items()}
        self._chunks: dict[str, list[np.ndarray]] = {k: [] for k in self.RATES}
        self._samples = {k: 0 for k in self.RATES}  # samples held in _chunks
        self._origin = {k: 0.0 for k in self.RATES}  # time of the first buffered sample
        self._decoded_until = 0.0
        self._start_time: float | None = None
        self._done = False

    def _buffered_seconds(self, name: str) -> float:
        rate, _ = self.RATES[name]
        return self._origin[name] + self._samples[name] / rate

    def _pull(self) -> None:
        try:
            frame = next(self._packets)
        except StopIteration:
            self._done = True
            for name, resampler in self._resamplers.items():
                self._append(name, resampler.resample(None))
            return
        if self._start_time is None:
            # Place audio on the video's timeline, whose 0 is the first video frame.
            self._start_time = float(frame.pts * self._stream.time_base) if frame.pts is not None else 0.0
            for name in self._origin:
                self._origin[name] = self._start_time - self._video_origin
        for name, resampler in self._resamplers.items():
            self._append(name, resampler.resample(frame))

    def _append(self, name: str, frames) -> None:
        channels = 2 if name == "stereo48" else 1
        for out in frames:
            data = out.to_ndarray().reshape(-1, channels).T  # packed "flt" -> [channels, n]
            self._chunks[name].append(np.ascontiguousarray(data, dtype=np.float32))
            self._samples[name] += data.shape[1]

    def read(self, start: float, end: float) -> dict[str, np.ndarray]:
        """Samples in [start, end) of the video timeline, zero-padded where the track is short."""
        while not self._done and min(self._buffered_seconds(n) for n in self.RATES) < end:
            self._pull()
        out = {}
        for name, (rate, _) in self.RATES.items():
            buf = np.concatenate(self._chunks[name], axis=1) if self._chunks[name] else np.zeros((2 if name == "stereo48" else 1, 0), np.float32)
            self._chunks[name] = [buf]
            n = int(round((end - start) * rate))
            offset = int(round((start - self._origin[name]) * rate))
            clip = np.zeros((buf.shape[0], n), np.float32)
            lo, hi = max(offset, 0), min(offset + n, buf.shape[1])
            if hi > lo:
                clip[:, lo - offset : hi - offset] = buf[:, lo:hi]
            out[name] = clip
        return {"audio48": out["stereo48"], "audio16": out["mono16"][0]}

    def discard_before(self, seconds: float) -> None:
        """Free samples older than `seconds`; later clips never start earlier."""
        for name, (rate, _) in self.RATES.items():
            if not self._chunks[name]:
                continue
            buf = np.concatenate(self._chunks[name], axis=1)
            drop = max(0, min(int((seconds - self._origin[name]) * rate), buf.shape[1]))
            self._chunks[name] = [buf[:, drop:]]
            self._samples[name] = buf.shape[1] - drop
            self._origin[name] += drop / rate

    def close(self) -> None:
        try:
            if self._container is not None:
                self._container.close()
        finally:
            if self._file is not None:
                self._file.close()
