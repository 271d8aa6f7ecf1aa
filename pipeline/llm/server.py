"""One vLLM OpenAI-compatible server process, started from its own environment, and a Ray actor that
owns it (so the server is scheduled on a GPU node like any other stage, and dies with the run).

vLLM pins its own torch and transformers, so it runs from a separate interpreter
(`server.python`, by default `.venv-vllm/bin/python`, built by `make vllm-env`); the pipeline never
imports vllm, it starts `python -m vllm.entrypoints.openai.api_server` and speaks HTTP to it.

    server = VllmServer.from_section(section).start()   # returns at once
    server.wait_ready()                                 # /health, then /v1/models; raises with the log tail
    LLMClient(server.base_url, server.served_model_name)
    server.stop()                                       # SIGTERM to the process group, then SIGKILL

    handle, base_url = start_server_actor("fusion-llm", section)   # base_url on the actor's node IP
    stop_server_actor(handle)
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# Inherited variables that would make the vLLM interpreter import the caller's packages or pin its
# thread count to the Ray worker's (Ray sets OMP_NUM_THREADS=1 in workers).
_DROP_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "OMP_NUM_THREADS")


class ServerStartError(RuntimeError):
    """The server process exited or did not become healthy in time; the message ends with its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("0.0.0.0", "") else "", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_python(python: str) -> str:
    """An interpreter path as given (absolute), relative to the working directory or the repository
    root, or a name on PATH. Raises FileNotFoundError naming `make vllm-env` when none exists."""
    p = Path(python).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]
    for c in candidates:
        if c.exists() and os.access(c, os.X_OK):
            return str(c)
    if os.sep not in python and (found := shutil.which(python)):
        return found
    raise FileNotFoundError(
        f"no vLLM interpreter at {python!r} (looked in {', '.join(str(c) for c in candidates)}); "
        "build it with `make vllm-env` or set server.python to an interpreter with vllm installed")


def _arg_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


class VllmServer:
    """Owns one `vllm.entrypoints.openai.api_server` process: its own interpreter and environment,
    a free port, a log file, health checks, and a clean stop of the whole process group (vLLM forks
    an engine-core process that must die with it)."""

    def __init__(self, model: str, *, python: str = ".venv-vllm/bin/python", args: list[str] | None = None,
                 env: dict[str, str] | None = None, startup_timeout_s: float = 900.0, host: str = "127.0.0.1",
                 port: int | None = None, advertise_host: str | None = None, log_path: str | Path | None = None,
                 served_model_name: str | None = None):
        self.model = model
        self.python = python
        self.args = [str(a) for a in (args or [])]
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.startup_timeout_s = float(startup_timeout_s)
        self.host = host  # the address the server binds
        self.advertise_host = advertise_host or ("127.0.0.1" if host in ("0.0.0.0", "") else host)
        self.port = port
        self.log_path = Path(log_path) if log_path else None
        given = _arg_value(self.args, "--served-model-name")
        if served_model_name and not given:
            self.args += ["--served-model-name", served_model_name]
        self.served_model_name = given or served_model_name or model
        self.proc: subprocess.Popen | None = None
        self._last_pid: int | None = None
        self._log_file = None

    @classmethod
    def from_section(cls, section: Any, **kw) -> "VllmServer":
        """From an `LLMEndpointConfig`-like section: `section.model` is what vLLM loads (an HF id or a
        local folder) and the served name, `section.server` the interpreter, args, env and timeout."""
        srv = section.server
        return cls(section.model, python=srv.python, args=list(srv.args), env=dict(srv.env),
                   startup_timeout_s=srv.startup_timeout_s, **kw)

    # -- addresses ---------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://{self.advertise_host}:{self.port}/v1"

    @property
    def _local_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    # -- life cycle --------------------------------------------------------------------------
    def command(self) -> list[str]:
        cmd = [resolve_python(self.python), "-m", API_SERVER_MODULE, "--model", self.model,
               "--host", self.host, "--port", str(self.port)]
        return cmd + self.args

    def start(self) -> "VllmServer":
        """Spawn the process and return at once; `wait_ready()` blocks until it serves."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        if self.port is None:
            self.port = free_port(self.host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"vllm-{self.port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
        env.update(self.env)
        python = resolve_python(self.python)
        env["PATH"] = str(Path(python).parent) + os.pathsep + env.get("PATH", "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log_file = open(self.log_path, "ab", buffering=0)
        self._log_file.write(("$ " + " ".join(self.command()) + "\n").encode())
        self.proc = subprocess.Popen(self.command(), stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout_s: float = 2.0) -> bool:
        """/health answers 200 and /v1/models lists the served name."""
        if self.port is None:
            return False
        try:
            with urllib.request.urlopen(f"{self._local_url}/health", timeout=timeout_s) as r:
                if r.status != 200:
                    return False
            with urllib.request.urlopen(f"{self._local_url}/v1/models", timeout=timeout_s) as r:
                names = [m["id"] for m in json.loads(r.read())["data"]]
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return False
        return self.served_model_name in names

    def wait_ready(self, timeout_s: float | None = None, poll_s: float = 1.0) -> "VllmServer":
        timeout_s = self.startup_timeout_s if timeout_s is None else timeout_s
        if self.proc is None:
            raise ServerStartError("server not started")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.proc.returncode
                self.stop()
                raise ServerStartError(f"vLLM server exited with code {code} during start-up; "
                                       f"log {self.log_path}:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(poll_s)
        self.stop()
        raise ServerStartError(f"vLLM server not healthy after {timeout_s:.0f} s; log {self.log_path}:\n"
                               f"{self.log_tail()}")

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after `grace_s`; idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc is not None:
            self._signal(proc, signal.SIGKILL)  # stragglers in the group (the engine core) after the parent
            self._last_pid = proc.pid
        self._close_log()

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # start_new_session: the group id is the server's pid
        except (ProcessLookupError, PermissionError):
            pass

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_bytes()[-64_000:].decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "VllmServer":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):  # a forgotten server must not outlive its owner
        try:
            self.stop(grace_s=5.0)
        except Exception:  # noqa: BLE001
            pass


# -- as a Ray actor ----------------------------------------------------------------------------
class _ServerActor:
    """Lives on whichever node Ray places it (GPU nodes for num_gpus=1); binds 0.0.0.0 and
    advertises the node's IP so workers on other nodes can reach it."""

    def __init__(self, kwargs: dict):
        import ray

        self.node_ip = ray.util.get_node_ip_address()
        self.server = VllmServer(**kwargs, host="0.0.0.0", advertise_host=self.node_ip)

    def start(self, timeout_s: float | None = None) -> str:
        self.server.start().wait_ready(timeout_s)
        return self.server.base_url

    def base_url(self) -> str:
        return self.server.base_url

    def served_model_name(self) -> str:
        return self.server.served_model_name

    def alive(self) -> bool:
        return self.server.alive()

    def healthy(self) -> bool:
        return self.server.healthy()

    def pid(self) -> int | None:
        return self.server.proc.pid if self.server.proc else self.server._last_pid

    def log_tail(self, lines: int = 60) -> str:
        return self.server.log_tail(lines)

    def stop(self) -> bool:
        self.server.stop()
        return True


def _section_kwargs(section: Any) -> dict:
    srv = section.server
    return dict(model=section.model, python=srv.python, args=list(srv.args), env=dict(srv.env),
                startup_timeout_s=srv.startup_timeout_s)


def start_server_actor(name: str, section: Any, *, served_model_name: str | None = None,
                       log_dir: str | Path | None = None):
    """Start a vLLM server inside a Ray actor (resources from `section.server.num_gpus/num_cpus`),
    wait until it is healthy, return (actor_handle, base_url). Raises ServerStartError (with the
    server's log) and removes the actor when the server does not come up."""
    import ray

    srv = section.server
    kwargs = _section_kwargs(section)
    if served_model_name:
        kwargs["served_model_name"] = served_model_name
    if log_dir is not None:
        kwargs["log_path"] = str(Path(log_dir) / f"{name}.log")
    actor_cls = ray.remote(num_gpus=srv.num_gpus, num_cpus=srv.num_cpus, max_restarts=0)(_ServerActor)
    handle = actor_cls.options(name=name).remote(kwargs)
    try:
        # The actor waits for health itself; the outer timeout also covers placement and process start.
        base_url = ray.get(handle.start.remote(srv.startup_timeout_s), timeout=srv.startup_timeout_s + 120)
    except Exception as exc:
        stop_server_actor(handle)
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ServerStartError):
            raise cause from None
        raise ServerStartError(f"LLM server actor {name!r} did not start: {exc}") from exc
    return handle, base_url


def stop_server_actor(handle, timeout_s: float = 60.0) -> None:
    """Stop the server process (terminate, then kill), then the actor; never raises."""
    import ray

    try:
        ray.get(handle.stop.remote(), timeout=timeout_s)
    except Exception:  # noqa: BLE001 - the actor may be gone already
        pass
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001
        pass


if __name__ == "__main__":  # a manual check: python -m pipeline.llm.server MODEL [api_server args...]
    s = VllmServer(sys.argv[1], args=sys.argv[2:]).start()
    try:
        s.wait_ready()
        print(s.base_url, flush=True)
        s.proc.wait()
    finally:
        s.stop()
