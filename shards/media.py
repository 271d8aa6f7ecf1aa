"""The clip's audio and thumbnail encoded for the shard (FLAC, JPEG). Segment encodes them as it
cuts each clip, in its own parallel task, so the writer only packs bytes, and what crosses the
object store to the writer is the compressed members, not 3.8 MB of float audio and an RGB frame."""
from __future__ import annotations

import io

import numpy as np

from pipeline.stage import Row


def flac_bytes(audio: np.ndarray, rate: int = 48000) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(audio.T, -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def jpg_bytes(rgb: np.ndarray, quality: int = 85) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def as_array(data: bytes) -> np.ndarray:
    """Encoded bytes as a uint8 array: rows carry arrays only."""
    return np.frombuffer(data, np.uint8)


def encode_media(row: Row, audio48: np.ndarray | None, thumbnail: np.ndarray | None, write_audio: bool, write_thumbnail: bool) -> Row:
    """Adds the `flac` and `jpg` members (uint8 arrays of the encoded files) the writer config asks for."""
    if write_audio and audio48 is not None:
        row["flac"] = as_array(flac_bytes(audio48))
    if write_thumbnail and thumbnail is not None:
        row["jpg"] = as_array(jpg_bytes(thumbnail))
    return row
