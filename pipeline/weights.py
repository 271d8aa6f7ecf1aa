"""Where model weights come from: a local path, then the Hugging Face cache, then a download.

Resolution runs once on the driver before any worker starts (see `pipeline/preflight.py`), so
workers only ever open local files, and a run without weights fails (or skips the stage) in
seconds with a message that says exactly what to fetch, instead of in every worker."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse


class WeightsMissing(RuntimeError):
    """No usable weights; the message names the files and how to fetch them."""


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub: huggingface_hub itself retries a dead network for ~25 s."""
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def fetch_hint(repo: str, filename: str, setting: str) -> str:
    return (
        f"fetch it with `hf download {repo} {filename}` (on a machine with internet, then copy "
        f"~/.cache/huggingface), or point {setting}=/path/to/{Path(filename).name} at a local copy"
    )


def resolve_local(path: str, what: str) -> str:
    """A user-given path must exist: a typo should fail, not fall back to a download."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsMissing(f"{what}: {path} is not a file")
    return str(p.resolve())


def resolve_hub_file(repo: str, filename: str, what: str, setting: str, revision: str | None = None) -> str:
    """The cached copy of `repo/filename`, downloading it when the hub can be reached."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, revision=revision, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError, or an unknown repo layout)
        pass
    where = f"{what}: {repo}/{filename} is not in the Hugging Face cache"
    if hub_offline():
        raise WeightsMissing(f"{where} and HF_HUB_OFFLINE is set; {fetch_hint(repo, filename, setting)}")
    if not hub_reachable():
        raise WeightsMissing(f"{where} and {hub_endpoint()} cannot be reached; {fetch_hint(repo, filename, setting)}")
    try:
        return hf_hub_download(repo, filename, revision=revision)
    except Exception as exc:
        raise WeightsMissing(f"{where} and the download failed ({type(exc).__name__}: {str(exc)[:200]}); "
                             f"{fetch_hint(repo, filename, setting)}") from exc


def resolve(local: str | None, repo: str | None, filename: str | None, what: str, setting: str) -> str:
    """Local path if given, else the hub file (cache, then download)."""
    if local:
        return resolve_local(local, what)
    if not (repo and filename):
        raise WeightsMissing(f"{what}: no local file given ({setting}) and no Hugging Face repo to fetch from")
    return resolve_hub_file(repo, filename, what, setting)
