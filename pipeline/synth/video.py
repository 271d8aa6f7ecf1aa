"""Frames for synthetic shots: each shot a distinct texture and mean luminance, with gentle motion.

Frames are rendered straight into YUV 4:2:0 so the luma a decoder sees is the luma we planned
(no RGB->YUV rounding surprises), and so cut detectors on luma or on colour both fire.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEXTURES = ["h_stripes", "v_stripes", "diagonal", "checker", "rings", "blobs"]


@dataclass
class Shot:
    start: float         # seconds (pts of its first frame)
    end: float
    texture: str
    luma: float          # mean Y, 16-235 range
    u: int               # constant chroma: each shot has its own tint
    v: int
    speed: float         # pixels per frame the texture drifts
    period: float        # texture period in pixels
    seed: int


def frame_times(seconds: float, fps: float, vfr: bool) -> list[float]:
    """Presentation times of every frame. VFR alternates 1/30 s and 1/20 s (3000/4500 ticks at
    1/90000), so its times are exact in that time base."""
    if not vfr:
        n = max(1, int(round(seconds * fps)))
        return [i / fps for i in range(n)]
    times, ticks, k = [], 0, 0
    while ticks / 90000 < seconds - 1e-9:
        times.append(ticks / 90000)
        ticks += 3000 if k % 2 == 0 else 4500
        k += 1
    return times


def plan_shot_lengths(seconds: float, rng: np.random.Generator) -> list[float]:
    """Random 2-6 s shots covering `seconds`; a tail under 1.5 s joins the previous shot."""
    lengths, total = [], 0.0
    while total < seconds:
        lengths.append(float(rng.uniform(2.0, 6.0)))
        total += lengths[-1]
    lengths[-1] -= total - seconds
    if len(lengths) > 1 and lengths[-1] < 1.5:
        tail = lengths.pop()
        lengths[-1] += tail
    return lengths


def plan_shots(times: list[float], shot_seconds: list[float], rng: np.random.Generator) -> list[Shot]:
    """Snap the requested shot boundaries to frames and give each shot a look unlike its
    predecessor: another texture and a mean luma at least 45 levels away."""
    bounds, acc = [], 0.0
    for length in shot_seconds[:-1]:
        acc += length
        bounds.append(acc)
    ts = np.asarray(times)
    starts = [0.0]
    for b in bounds:
        idx = int(np.searchsorted(ts, b - 1e-9))
        if idx < len(ts) and ts[idx] > starts[-1]:
            starts.append(float(ts[idx]))
    end = times[-1] + (times[-1] - times[-2] if len(times) > 1 else 1.0)
    shots: list[Shot] = []
    for i, start in enumerate(starts):
        prev = shots[-1] if shots else None
        texture = rng.choice([t for t in TEXTURES if prev is None or t != prev.texture])
        while True:
            luma = float(rng.uniform(50, 200))
            if prev is None or abs(luma - prev.luma) >= 45:
                break
        shots.append(Shot(
            start=start, end=starts[i + 1] if i + 1 < len(starts) else end,
            texture=str(texture), luma=luma,
            u=int(rng.integers(90, 166)), v=int(rng.integers(90, 166)),
            speed=float(rng.uniform(0.4, 1.0)) * rng.choice([-1, 1]),
            period=float(rng.uniform(32, 64)), seed=int(rng.integers(1 << 30))))
    return shots


class ShotRenderer:
    """Renders the luma of frame `t` of a shot. Textures are smooth sinusoids so a drift of about
    one pixel per frame changes pixels by a few levels only: motion, never a cut."""

    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.y, self.x = np.mgrid[0:height, 0:width].astype(np.float32)
        self._diag_index = (self.x + self.y).astype(np.int64)
        self._blob_cache: dict[int, np.ndarray] = {}

    def _blobs(self, seed: int, period: float) -> np.ndarray:
        # Smooth random field, tiled twice as wide so it can scroll without wrapping artefacts.
        if seed not in self._blob_cache:
            rng = np.random.default_rng(seed)
            field = np.zeros((self.h, 2 * self.w), np.float32)
            yy, xx = np.mgrid[0:self.h, 0:2 * self.w].astype(np.float32)
            for _ in range(6):
                fx, fy = rng.uniform(0.5, 1.5, 2) * 2 * np.pi / period
                field += np.sin(fx * xx + rng.uniform(0, 6.3)) * np.sin(fy * yy + rng.uniform(0, 6.3))
            self._blob_cache[seed] = field / np.abs(field).max()
        return self._blob_cache[seed]

    def luma(self, shot: Shot, frame_index: int) -> np.ndarray:
        d = shot.speed * frame_index
        k = 2 * np.pi / shot.period
        x, y = self.x, self.y
        # Separable textures are built from 1-D profiles (cheap), broadcast to the frame.
        xs, ys = x[0], y[:, 0]
        if shot.texture == "h_stripes":
            tex = np.broadcast_to(np.sin(k * (ys + d))[:, None], x.shape)
        elif shot.texture == "v_stripes":
            tex = np.broadcast_to(np.sin(k * (xs + d))[None, :], x.shape)
        elif shot.texture == "diagonal":
            diag = np.sin(k * (np.arange(self.w + self.h, dtype=np.float32) + d) / np.sqrt(2))
            tex = diag[self._diag_index]
        elif shot.texture == "checker":
            tex = np.sin(k * (ys - d / 2))[:, None] * np.sin(k * (xs + d))[None, :]
        elif shot.texture == "rings":
            cx, cy = self.w / 2 + d, self.h / 2
            tex = np.sin(k * np.hypot(x - cx, y - cy))
        else:
            off = int(abs(d)) % self.w
            tex = self._blobs(shot.seed, shot.period)[:, off:off + self.w]
        img = shot.luma + 35.0 * tex
        # A small bright square crossing the frame: a moving object, as in real footage.
        side = max(4, self.h // 10)
        span = self.w - side
        ox = int(abs((frame_index * 2) % (2 * span) - span))   # bounces, never teleports
        oy = self.h // 3
        img[oy:oy + side, ox:ox + side] = np.where(shot.luma < 128, 230.0, 25.0)
        return img

    def yuv420(self, shot: Shot, frame_index: int) -> np.ndarray:
        """[h*3/2, w] uint8 planar I420, as `av.VideoFrame.from_ndarray(..., format='yuv420p')`
        expects."""
        y = np.clip(self.luma(shot, frame_index), 16, 235).astype(np.uint8)
        u = np.full((self.h // 2, self.w // 2), shot.u, np.uint8)
        v = np.full((self.h // 2, self.w // 2), shot.v, np.uint8)
        return np.concatenate([y, u.reshape(-1, self.w), v.reshape(-1, self.w)], axis=0)
