"""One file per awkward input the pipeline must reject or handle: each case has a test upstream."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.synth.media import av1_encoder, make_audio_only, make_video, truth_path

UNICODE_DIR = "ünï cödé dir"
UNICODE_NAME = "vidéo à écouter 🎵.mp4"

# What each case is, for readers of the folder and for reject-reason tests.
CASES = {
    "zero_byte": "0-byte .mp4",
    "truncated": "normal mp4 cut to ~40% of its bytes (moov atom lost: unparseable)",
    "text_as_mp4": "plain text file named .mp4",
    "no_audio": "12 s H.264 video, no audio stream",
    "audio_only": "12 s AAC .m4a, no video stream",
    "tiny": "0.5 s video with audio",
    "silent": "12 s video whose AAC track is all zeros",
    "av1": "12 s AV1 video + AAC",
    "vfr": "12 s variable-frame-rate video (1/30 s and 1/20 s frames alternate)",
    "surround": "12 s video with 5.1 AAC",
    "mono_8k": "12 s video with mono 8 kHz AAC",
    "unicode_path": "normal 12 s video under a non-ASCII folder and file name",
    "duplicate_a": "normal 12 s video",
    "duplicate_b": "byte-identical copy of duplicate_a under another name",
}


def make_bad_inputs(folder, seconds: float = 12.0) -> dict[str, Path]:
    """Create every case in `folder` and return {case_name: path}; media cases get truth sidecars.
    The AV1 case is skipped (absent from the result) only if PyAV has no AV1 encoder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    out["zero_byte"] = folder / "zero_byte.mp4"
    out["zero_byte"].write_bytes(b"")

    out["text_as_mp4"] = folder / "text_as_mp4.mp4"
    out["text_as_mp4"].write_text("This is not a video. It is a text file with an .mp4 name.\n" * 20)

    # Truncate a real file: PyAV writes the moov atom at the end, so the cut loses it.
    whole = folder / "_truncated_source.mp4"
    make_video(whole, seconds=seconds, seed=11)
    data = whole.read_bytes()
    out["truncated"] = folder / "truncated.mp4"
    out["truncated"].write_bytes(data[: int(len(data) * 0.4)])
    whole.unlink()
    truth_path(whole).unlink()

    media = {
        "no_audio": dict(audio="none", seed=12),
        "tiny": dict(seconds=0.5, shot_seconds=[0.5], seed=13),
        "silent": dict(silent=True, seed=14),
        "vfr": dict(vfr=True, seed=16),
        "surround": dict(audio="5.1", seed=17),
        "mono_8k": dict(audio="mono", sample_rate=8000, seed=18),
        "duplicate_a": dict(seed=19),
    }
    if av1_encoder() is not None:
        media["av1"] = dict(codec="av1", seed=15)
    for name, kwargs in media.items():
        kwargs = {"seconds": seconds, **kwargs}
        out[name] = folder / f"{name}.mp4"
        make_video(out[name], **kwargs)

    out["audio_only"] = folder / "audio_only.m4a"
    make_audio_only(out["audio_only"], seconds=seconds, seed=20)

    out["unicode_path"] = folder / UNICODE_DIR / UNICODE_NAME
    make_video(out["unicode_path"], seconds=seconds, seed=21)

    out["duplicate_b"] = folder / "duplicate_b.mp4"
    shutil.copyfile(out["duplicate_a"], out["duplicate_b"])
    truth = json.loads(truth_path(out["duplicate_a"]).read_text(encoding="utf-8"))
    truth["path"] = str(out["duplicate_b"])
    truth_path(out["duplicate_b"]).write_text(json.dumps(truth, indent=1), encoding="utf-8")
    return out
