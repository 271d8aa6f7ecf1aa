"""segment: one decoding pass per video feeds PySceneDetect's AdaptiveDetector, the frame-difference
motion signal and the frame grid, and cuts shot-aware clip windows of `clip_seconds` as it goes,
so memory stays bounded by one window however long the video is."""
from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from pipeline.errors import configure_fsspec, is_retryable, retry_io
from pipeline.sources import InputFile, TooLargeToCopy, open_input
from pipeline.stage import Reject, Resources, Row, Stage
from shards.media import encode_media
from stages.decode import RGB, AudioTrack, MediaSource, luma, scaled_size, video_frames
from stages.visual_rhythm import RHYTHM_HZ, frame_motion, resample_max

DETECT_SHORT_SIDE = 112  # the shot detector sees ~112 px of luma: cuts do not need detail
MOTION_SHORT_SIDE = 56  # and the motion signal ~56 px: motion, not detail
DECODER = "pyav"  # recorded per clip (meta.clip.decoder)
PENDING_FRAMES = 8  # decoded frames held until it is known whether a clip keeps them (> the detector's lag)


def analysis_steps(y: np.ndarray) -> tuple[int, int]:
    """Subsampling strides of the luma plane for the shot detector and for the motion signal."""
    return tuple(max(1, round(min(y.shape) / side)) for side in (DETECT_SHORT_SIDE, MOTION_SHORT_SIDE))


class ShotDetector:
    """PySceneDetect's AdaptiveDetector on the luma plane we already decoded (its `luma_only`
    mode, without the HSV conversion that mode still pays); returns cut times in seconds."""

    def __init__(self, fps: float, threshold: float, min_content_val: float, min_shot_seconds: float):
        from scenedetect import AdaptiveDetector, FrameTimecode
        from scenedetect.detectors.content_detector import _mean_pixel_distance

        class LumaAdaptiveDetector(AdaptiveDetector):
            def _calculate_frame_score(self, timecode, lum: np.ndarray) -> float:
                last, self._last_frame = self._last_frame, lum
                return 0.0 if last is None else _mean_pixel_distance(lum, last)

        self._timecode = lambda i: FrameTimecode(i, fps=fps)
        self._detector = LumaAdaptiveDetector(
            adaptive_threshold=threshold,
            min_content_val=min_content_val,
            min_scene_len=max(1, int(round(min_shot_seconds * fps))),
            luma_only=True,
        )
        self._times: list[float] = []

    def feed(self, index: int, seconds: float, lum: np.ndarray) -> list[float]:
        self._times.append(seconds)
        cuts = self._detector.process_frame(self._timecode(index), lum)
        # Cuts come back as frame numbers a few frames late; map them to true (VFR-safe) times.
        return [self._times[c.frame_num] for c in cuts]


@dataclass
class Window:
    start: float
    end: float
    index: int = 0
    cuts: list[float] = field(default_factory=list)


class ClipCutter:
    """Buffers the last few seconds of frames and motion and emits clip windows.

    A window is [start, start + L). The next window starts at the first cut within `snap` seconds
    after the previous end (so clips begin on shot boundaries when one is near), else at the end.
    A clip keeps the frame nearest each point of its frame_fps grid. Frames arrive undecoded to
    RGB and wait PENDING_FRAMES frames (until the cuts around them are known); then only those
    that some possible window start would keep are converted (`to_rgb`), the rest dropped."""

    def __init__(self, cfg, fps_hint: float, to_rgb):
        self.length = cfg.clip_seconds
        self.snap = cfg.segment.snap_seconds
        self.frame_fps = cfg.frame_fps
        self.grid_n = int(round(self.length * self.frame_fps))
        self.lag = 4.0 / max(fps_hint, 1.0)  # the detector reports cuts a couple of frames late
        self.to_rgb = to_rgb
        self.times: list[float] = []
        self.frames: list[np.ndarray | None] = []  # RGB crops; None for frames no window keeps
        self.pending: list[tuple[int, object]] = []  # (position in times, decoded frame)
        self.motion_t: list[float] = []
        self.motion_v: list[float] = []
        self.cuts: list[float] = []
        self.start = 0.0
        self.index = 0
        self.converted = 0
        self.fallbacks = 0  # picks whose frame was not converted (the selection missed one): should stay 0

    def add(self, t: float, frame, motion: float | None, cuts: list[float]) -> None:
        self.times.append(t)
        self.frames.append(None)
        self.pending.append((len(self.times) - 1, frame))
        if motion is not None:
            self.motion_t.append(t)
            self.motion_v.append(motion)
        self.cuts.extend(cuts)
        self._settle(keep=PENDING_FRAMES)

    def _starts(self, until: float) -> list[float]:
        """Every window start up to `until` that the known cuts allow (a superset of the real one)."""
        found, frontier = [], [self.start]
        while frontier:
            o = frontier.pop()
            if o > until or any(abs(o - f) < 1e-9 for f in found):
                continue
            found.append(o)
            end = o + self.length
            frontier += [end, *(c for c in self.cuts if end <= c <= end + self.snap)]
        return found

    def _kept(self, i: int, last: bool) -> bool:
        """Whether frame i is the nearest frame to a grid point of some possible window: the grid
        points it wins lie in (midpoint with the previous frame, midpoint with the next], as in take()."""
        t, eps = self.times[i], 1e-6
        lo = (self.times[i - 1] + t) / 2 - eps if i else -np.inf
        hi = np.inf if last else (t + self.times[i + 1]) / 2 + eps
        for o in self._starts(min(hi, self.times[-1])):  # no window that fits starts after the last frame
            m = max(0, int(np.floor((lo - o) * self.frame_fps)) + 1) if np.isfinite(lo) else 0
            if m < self.grid_n and o + m / self.frame_fps <= hi:
                return True
        return False

    def _settle(self, keep: int = 0, before: float = np.inf, end_of_video: bool = False) -> None:
        """Decide the pending frames, oldest first, but the newest `keep` and those from `before` on."""
        while len(self.pending) > keep and self.times[self.pending[0][0]] < before:
            i, frame = self.pending[0]
            last = end_of_video and i == len(self.times) - 1
            if not last and i + 1 >= len(self.times):  # its successor is not decoded yet
                return
            self.pending.pop(0)
            if self._kept(i, last):
                self.frames[i] = self.to_rgb(frame)
                self.converted += 1

    def ready(self, now: float) -> bool:
        return now >= self.start + self.length + self.snap + self.lag

    def take(self, end_of_video: bool = False) -> dict:
        """The current window's clip, then advance to the next window."""
        start, end = self.start, self.start + self.length
        # This window's frames are decided now; later ones wait for the cuts around them.
        self._settle(before=np.inf if end_of_video else end + 1.0 / self.frame_fps, end_of_video=end_of_video)
        times = np.asarray(self.times)
        grid = start + np.arange(self.grid_n) / self.frame_fps
        nearest = np.clip(np.searchsorted(times, grid), 0, len(times) - 1)
        earlier = np.clip(nearest - 1, 0, len(times) - 1)
        pick = np.where(np.abs(times[earlier] - grid) <= np.abs(times[nearest] - grid), earlier, nearest)
        inside = [c for c in self.cuts if start < c < end]
        clip = {
            "start": start,
            "end": end,
            "index": self.index,
            "cuts": [round(c - start, 4) for c in inside],
            "frames": np.stack([self._frame(i) for i in pick]),
            "motion_25hz": resample_max(np.asarray(self.motion_t) - start, np.asarray(self.motion_v), self.length, RHYTHM_HZ),
        }
        after = [c for c in self.cuts if end <= c <= end + self.snap]
        self.start = after[0] if after else end
        self.index += 1
        keep = int(np.searchsorted(times, self.start - 1.0 / max(self.frame_fps, 1.0)))
        self.times, self.frames = self.times[keep:], self.frames[keep:]
        self.pending = [(i - keep, f) for i, f in self.pending if i >= keep]
        m = np.searchsorted(np.asarray(self.motion_t), self.start - 1.0)
        self.motion_t, self.motion_v = self.motion_t[m:], self.motion_v[m:]
        self.cuts = [c for c in self.cuts if c > self.start - 1.0]
        return clip

    def _frame(self, i: int) -> np.ndarray:
        if self.frames[i] is None:  # not expected; the nearest converted frame stands in
            self.fallbacks += 1
            i = min((j for j, f in enumerate(self.frames) if f is not None), key=lambda j: abs(self.times[j] - self.times[i]))
        return self.frames[i]

    def fits(self, end_of_video: float) -> bool:
        return self.start + self.length <= end_of_video + 1e-6


def center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(rgb[top : top + size, left : left + size])


class Segment(Stage):
    name = "segment"
    resources = Resources(num_cpus=1, batch_size=1)
    # The FLAC and the thumbnail JPEG are encoded here, in parallel tasks (shards/media.py): the
    # 4 fps frames stop after their last consumer (clip_embed), or right here when nothing reads
    # them, and the float audio after vae_latents, or here.
    produces = ("frames", "motion_25hz", "audio48", "audio16", "flac", "jpg")

    def setup(self) -> None:
        import av  # noqa: F401  (the decoder, the detector and the encoders load once, here)
        import PIL.Image  # noqa: F401
        import scenedetect  # noqa: F401
        import soundfile  # noqa: F401

    def process(self, rows: list[Row]) -> Iterable[Row | Reject]:
        for row in rows:
            yield from self._clips(row)

    def _clips(self, row: Row) -> Iterator[Row | Reject]:
        """Clips of one source. Local inputs decode by filename; remote ones
        stream into PyAV through range reads, with no local copy. Transient I/O errors before the
        first clip restart the source (sources.io_attempts); one that outlasts the retries, or one
        after clips went out, defers the rest of the source to the next run (a retryable reject;
        the next run skips the clips already done)."""
        cfg = self.config
        done = self.context.done_keys if self.context else frozenset()
        configure_fsspec()
        source = open_input(row["meta"]["source"]["path"], cfg.sources)
        error = None
        with contextlib.ExitStack() as copies:  # a fallback local copy lives until the source is done
            started = self._start(row, source, copies)
            if isinstance(started, Reject):
                yield started
                return
            windows, first = started
            if first is None:
                probe = row["meta"]["probe"]
                yield Reject.for_row(
                    self.name, row, "no_clips",
                    f"no full {cfg.clip_seconds:g} s window in {probe.get('duration') or 0:.2f} s of decodable video",
                )
                return
            held = self._clip_row(row, *first)  # one clip is held back until we know whether it is the last
            try:
                for clip, decoder in windows:
                    if held["key"] not in done:
                        yield held
                    held = self._clip_row(row, clip, decoder)
            except Exception as exc:  # a broken file ends its own stream, never the run
                if is_retryable(exc):
                    windows.close()
                    copies.close()
                    if held["key"] not in done:
                        yield held  # complete, but not known to be the last: is_last stays False
                    yield self._deferred(row, exc, f"after clip {held['meta']['clip']['index']}")
                    return
                error = f"{type(exc).__name__}: {exc}"
            finally:
                windows.close()
        # The decoders are closed and any local copy is deleted before the last clip leaves.
        held["meta"]["clip"]["is_last"] = True
        if error:
            held["meta"]["flags"]["decode_error"] = error[:300]
        if held["key"] not in done:
            yield held

    def _deferred(self, row: Row, exc: BaseException, where: str) -> Reject:
        """A transient failure that outlasted the retries: the source is not finished."""
        reject = Reject.for_row(
            self.name, row, "io_error",
            f"transient I/O error {where}, the source is left for the next run: {type(exc).__name__}: {exc}",
        )
        reject.retryable = True
        return reject

    def _first_window(self, media: MediaSource, probe: dict):
        """(windows, first clip or None); the decoders are closed again when this raises."""
        windows = self._windows(media, probe)
        try:
            first = next(windows)
        except StopIteration:
            return windows, None
        except BaseException:
            windows.close()
            raise
        return windows, first

    def _start(self, row: Row, source: InputFile, copies: contextlib.ExitStack):
        """Open the decoders and cut the first clip, retried as a whole while that fails with a
        transient error. A remote input that PyAV cannot stream (a permanent error before any clip)
        is decoded from a local temporary copy instead, at most sources.max_local_copy_bytes.
        Returns (windows, first) or the Reject that ends the source."""
        io = self.config.sources
        path, probe = source.path, row["meta"]["probe"]

        def retried(fn, what):
            return retry_io(fn, attempts=io.io_attempts, backoff_seconds=io.io_backoff_seconds, what=what)

        def failure(exc: BaseException, prefix: str = "") -> Reject:
            if is_retryable(exc):
                return self._deferred(row, exc, f"before the first clip ({io.io_attempts} attempts)")
            tail = traceback.format_exception(exc, limit=2)[-1].strip()
            return Reject.for_row(self.name, row, "decode_failed", f"{prefix}{type(exc).__name__}: {exc} ({tail})")

        media: MediaSource = source.local_path if source.local_path is not None else source.open
        try:
            return retried(lambda: self._first_window(media, probe), f"decoding {path}")
        except Exception as exc:
            if not source.remote or is_retryable(exc):
                return failure(exc)
            streaming_error = f"{type(exc).__name__}: {exc}"
        try:
            local = retried(lambda: copies.enter_context(source.local_copy(size=row["meta"]["source"].get("size_bytes"))),
                            f"copying {path}")
        except TooLargeToCopy as exc:
            return Reject.for_row(
                self.name, row, "too_large_to_copy",
                f"cannot decode it while it streams ({streaming_error}) and {exc}",
            )
        except Exception as exc:
            return failure(exc, f"streaming failed ({streaming_error}); copying failed: ")
        self.count("segment.local_copies")
        try:
            return retried(lambda: self._first_window(local, probe), f"decoding a local copy of {path}")
        except Exception as exc:
            return failure(exc, f"streaming failed ({streaming_error}); the local copy failed too: ")

    def _windows(self, media: MediaSource, probe: dict) -> Iterator[tuple[dict, str]]:
        cfg = self.config
        seg = cfg.segment
        video = probe["video"]
        fps = video["fps"] or 25.0
        width, height = scaled_size(video["width"], video["height"], cfg.frame_size)
        frames = video_frames(media)
        audio, index = None, 0
        to_rgb = RGB(width, height)
        cutter = ClipCutter(cfg, fps, lambda frame: center_crop(to_rgb(frame), cfg.frame_size))
        try:
            detector = ShotDetector(fps, seg.adaptive_threshold, seg.min_content_val, seg.min_shot_seconds)
            audio = AudioTrack(media)
            prev_small, last_t, frame_step = None, 0.0, 1.0 / fps
            max_clips = seg.max_clips_per_video
            steps = None
            for t, frame in frames:
                y = luma(frame)
                steps = steps or analysis_steps(y)  # from the decoded size
                small = y[:: steps[1], :: steps[1]]
                motion = frame_motion(prev_small, small) if prev_small is not None else None
                prev_small = small
                cuts = detector.feed(index, t, np.ascontiguousarray(y[:: steps[0], :: steps[0]]))
                cutter.add(t, frame, motion, cuts)
                if index:
                    frame_step = t - last_t
                last_t, index = t, index + 1
                while cutter.ready(last_t):
                    yield self._with_audio(cutter.take(), audio), DECODER
                    if max_clips and cutter.index >= max_clips:
                        return
            end_of_video = last_t + frame_step
            while cutter.fits(end_of_video) and not (max_clips and cutter.index >= max_clips):
                yield self._with_audio(cutter.take(end_of_video=True), audio), DECODER
        finally:
            self.count("decoded_frames", index)
            self.count("rgb_frames", cutter.converted)
            if cutter.fallbacks:
                self.count("frame_fallbacks", cutter.fallbacks)
            try:
                if audio is not None:
                    audio.close()
            finally:
                frames.close()

    @staticmethod
    def _with_audio(clip: dict, audio: AudioTrack) -> dict:
        clip.update(audio.read(clip["start"], clip["end"]))
        audio.discard_before(clip["end"])
        return clip

    def _clip_row(self, row: Row, clip: dict, decoder: str) -> Row:
        source_id = row["meta"]["source"]["source_id"]
        start_ms = int(round(clip["start"] * 1000))
        meta = {k: v for k, v in row["meta"].items()}
        cuts = clip["cuts"]
        meta["clip"] = {
            "index": clip["index"],
            "start": round(clip["start"], 4),
            "end": round(clip["end"], 4),
            "duration": round(clip["end"] - clip["start"], 4),
            "cut_times": cuts,
            "shots": [[a, b] for a, b in zip([0.0, *cuts], [*cuts, round(clip["end"] - clip["start"], 4)])],
            "decoder": decoder,
            "is_last": False,
        }
        meta["flags"] = {}
        row = {
            "key": f"{source_id}_{start_ms:08d}",
            "meta": meta,
            "frames": clip["frames"],
            "motion_25hz": clip["motion_25hz"],
            "audio48": clip["audio48"],
            "audio16": clip["audio16"],
        }
        out = self.config.writer
        return encode_media(row, clip["audio48"], clip["frames"][len(clip["frames"]) // 2], out.write_audio, out.write_thumbnail)
