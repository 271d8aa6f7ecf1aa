"""What every process of a run finds in its environment: the node-local cache folder, and numba's
compiled kernels kept there (librosa's beat tracker, onset and peak picking are numba code), so a
worker after the first, and every later run, loads them instead of compiling them again. Set for
Ray workers through the job's runtime env and for this process (the loop engine) directly."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """~/.cache/video-robin (XDG_CACHE_HOME honoured): on every node's own disk."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "video-robin"


def worker_env() -> dict[str, str]:
    """Environment variables for every worker; a value the user set already is kept."""
    return {"NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR") or str(cache_root() / "numba")}


def apply_here() -> None:
    """The same settings for this process. numba reads NUMBA_CACHE_DIR when it is first imported,
    and stages import it only in setup(), after this runs; if it is loaded already, set its config."""
    import sys

    for name, value in worker_env().items():
        os.environ.setdefault(name, value)
    if "numba" in sys.modules:
        sys.modules["numba"].config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]
