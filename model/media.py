"""Video in, audio out for generation: the conditions Video-Robin reads from a video (the CLIP frames
its video tokens take, the cut and motion rhythm channels), decoded with the pipeline's own
code (stages/decode.py, stages/segment.py), and writing the result (a wav, and the input video
with the new soundtrack muxed in by PyAV, video packets copied, audio AAC)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def token_frame_times(cfg, seconds: float, fps: float) -> np.ndarray:
    """For each video token of `seconds` of music, the time of the CLIP frame (on the pipeline's
    `fps` grid) that training gives that token (model.data.clip_frames_at): the same frame, not
    merely a near one."""
    from model.data import clip_frames_at, video_token_times

    times = video_token_times(cfg)
    if cfg.video_tokens == "patch":
        times = times[: math.ceil(seconds * cfg.latent_rate / cfg.patch - 1e-9)]
    else:
        times = times[: math.ceil(seconds * cfg.video_fps - 1e-9)]
    return clip_frames_at(times, fps, np.iinfo(np.int64).max) / fps


def read_conditions(path: str, config, seconds: float, grid_times: np.ndarray | None, rhythm: bool,
                    rhythm_hz: float = 25.0) -> dict:
    """One decoding pass over [0, seconds] of the video, as the segment stage does it (frames scaled to
    `frame_size` on the short side, centre-cropped). Returns frames [len(grid_times), S, S, 3] uint8
    nearest the requested times, and with `rhythm` the [2, frames] cut and motion channels."""
    from stages.decode import RGB, luma, scaled_size, video_frames
    from stages.probe import read_streams
    from stages.segment import ShotDetector, analysis_steps, center_crop
    from stages.visual_rhythm import frame_motion, impulses, resample_max

    info = read_streams(path)
    video = info.get("video")
    if not video:
        raise ValueError(f"{path}: no video stream")
    size = config.frame_size
    to_rgb = RGB(*scaled_size(video["width"], video["height"], size))
    want = np.asarray([] if grid_times is None else grid_times, np.float64)
    best: list[tuple[float, object] | None] = [None] * len(want)  # (distance, decoded frame) per time
    seg = config.segment
    fps = video.get("fps") or 25.0
    detector = ShotDetector(fps, seg.adaptive_threshold, seg.min_content_val, seg.min_shot_seconds) if rhythm else None
    cuts, motion_t, motion_v, prev, index, steps = [], [], [], None, 0, None
    horizon = seconds + 0.5
    frames = video_frames(path)
    try:
        for t, frame in frames:
            if t > horizon:
                break
            for i in np.flatnonzero(np.abs(want - t) <= 1.0):
                d = abs(want[i] - t)
                if best[i] is None or d < best[i][0]:
                    best[i] = (d, frame)
            if detector is not None:  # luma only, as segment does it
                y = luma(frame)
                steps = steps or analysis_steps(y)
                small = y[:: steps[1], :: steps[1]]
                if prev is not None:
                    motion_t.append(t)
                    motion_v.append(frame_motion(prev, small))
                prev = small
                cuts.extend(detector.feed(index, t, np.ascontiguousarray(y[:: steps[0], :: steps[0]])))
            index += 1
    finally:
        frames.close()
    converted: dict[int, np.ndarray] = {}  # RGB once per kept frame, however many times pick it
    for b in best:
        if b is not None and id(b[1]) not in converted:
            converted[id(b[1])] = center_crop(to_rgb(b[1]), size)
    best = [None if b is None else (b[0], converted[id(b[1])]) for b in best]
    if index == 0:
        raise ValueError(f"{path}: no decodable video frames")
    out: dict = {"duration": float(info.get("duration") or 0.0), "video": video}
    if len(want):
        filled = [b for b in best if b is not None]
        last = filled[-1][1] if filled else None
        picked = []
        for b in reversed(best):  # a time past the last frame takes the last frame
            last = b[1] if b is not None else last
            picked.append(last)
        out["frames"] = np.stack(picked[::-1])
    if rhythm:
        out["rhythm"] = np.stack([impulses(cuts, seconds, int(rhythm_hz)),
                                  resample_max(np.asarray(motion_t), np.asarray(motion_v), seconds, int(rhythm_hz))])
    return out


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """audio [channels, samples] float -> a float wav."""
    import soundfile as sf

    sf.write(str(path), np.ascontiguousarray(audio.T), sample_rate, subtype="FLOAT")


def mux(video_in: str | Path, audio: np.ndarray, sample_rate: int, out: str | Path, bitrate: int = 192_000) -> float:
    """Copy `video_in`'s video stream (no re-encode) and add `audio` [2, samples] as AAC, cut to the
    video's duration. Returns the seconds of audio written."""
    import av

    with av.open(str(video_in)) as src:
        vin = src.streams.video[0]
        duration = None
        if vin.duration and vin.time_base:
            duration = float(vin.duration * vin.time_base)
        elif src.duration:
            duration = src.duration / 1_000_000
        if duration:
            audio = audio[:, : int(round(duration * sample_rate))]
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        if audio.shape[0] == 1:
            audio = np.repeat(audio, 2, axis=0)
        with av.open(str(out), "w", format="mp4") as dst:
            vout = dst.add_stream_from_template(vin)
            aout = dst.add_stream("aac", rate=sample_rate)
            aout.layout = "stereo"
            aout.bit_rate = bitrate
            for packet in src.demux(vin):
                if packet.dts is None:
                    continue
                packet.stream = vout
                dst.mux(packet)
            step = 1024
            for start in range(0, audio.shape[1], step):
                frame = av.AudioFrame.from_ndarray(audio[:, start : start + step], format="fltp", layout="stereo")
                frame.sample_rate = sample_rate
                frame.pts = start
                dst.mux(aout.encode(frame))
            dst.mux(aout.encode(None))
    return audio.shape[1] / sample_rate
