"""visual_rhythm: cut indicator and frame-difference motion at 25 Hz (the VAE latent rate), packed with
the music's onset and beat activations into `rhythm` [4, frames], plus how well cuts land on beats
(share of cuts within 0.5 s of a beat, as VeM's transition-beat IoU)."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from pipeline.stage import Reject, Resources, Row, Stage

RHYTHM_HZ = 25
RHYTHM_CHANNELS = ("onset", "beat", "cut", "motion")


def frame_motion(prev: np.ndarray, cur: np.ndarray) -> float:
    """Mean absolute difference of two small grey frames, 0..1."""
    return float(np.mean(np.abs(cur.astype(np.int16) - prev.astype(np.int16)))) / 255.0


def resample_max(times: np.ndarray, values: np.ndarray, seconds: float, rate: int) -> np.ndarray:
    """Values at `times` (s, clip-relative) onto a `rate` Hz grid: the max within each bin, linear
    interpolation for bins no sample falls in (frame rates below `rate`)."""
    n = int(round(seconds * rate))
    out = np.zeros(n, np.float32)
    if len(times) == 0:
        return out
    centers = (np.arange(n) + 0.5) / rate
    out[:] = np.interp(centers, times, values)
    bins = np.floor(times * rate).astype(int)
    ok = (bins >= 0) & (bins < n)
    if ok.any():
        pooled = np.full(n, -np.inf)
        np.maximum.at(pooled, bins[ok], values[ok])
        has = np.isfinite(pooled)
        out[has] = pooled[has]
    return out


def impulses(times: list[float], seconds: float, rate: int) -> np.ndarray:
    """1.0 at the frame nearest each event time."""
    n = int(round(seconds * rate))
    out = np.zeros(n, np.float32)
    for t in times:
        i = int(round(t * rate))
        if 0 <= i < n:
            out[i] = 1.0
    return out


def cut_beat_alignment(cuts: list[float], beats: list[float], tolerance: float) -> float | None:
    """Share of cuts within `tolerance` s of a beat; None for a clip without cuts."""
    if not cuts:
        return None
    if not beats:
        return 0.0
    beats_arr = np.asarray(beats)
    hits = sum(1 for c in cuts if np.min(np.abs(beats_arr - c)) <= tolerance)
    return hits / len(cuts)


class VisualRhythm(Stage):
    name = "visual_rhythm"
    resources = Resources(num_cpus=0.25, batch_size=16)
    consumes = ("onset_25hz", "beat_25hz", "motion_25hz")

    def process(self, rows: list[Row]) -> Iterable[Row | Reject]:
        cfg = self.config.visual_rhythm
        seconds = self.config.clip_seconds
        for row in rows:
            clip, music = row["meta"]["clip"], row["meta"].get("music", {})
            cuts, beats = clip["cut_times"], music.get("beat_times", [])
            cut_track = impulses(cuts, seconds, RHYTHM_HZ)
            motion = row["motion_25hz"].astype(np.float32)
            row["rhythm"] = np.stack([row["onset_25hz"], row["beat_25hz"], cut_track, motion]).astype(np.float16)
            score = cut_beat_alignment(cuts, beats, cfg.beat_tolerance_seconds)
            row["meta"]["visual"] = {
                "cut_count": len(cuts),
                "cuts_per_minute": round(60.0 * len(cuts) / seconds, 2),
                "motion_mean": round(float(motion.mean()), 5),
                "motion_peak": round(float(motion.max()), 5),
                "cut_beat_alignment": None if score is None else round(score, 4),
                "rhythm_channels": list(RHYTHM_CHANNELS),
                "rhythm_hz": RHYTHM_HZ,
            }
            if cfg.min_alignment is not None and score is not None and score < cfg.min_alignment:
                yield Reject.for_row(
                    self.name, row, "cuts_off_beat",
                    f"{score:.2f} of cuts within {cfg.beat_tolerance_seconds} s of a beat < min_alignment {cfg.min_alignment}",
                )
                continue
            yield row
