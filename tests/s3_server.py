"""A real S3-compatible server for tests: moto's server in a subprocess, behind a TCP proxy that can
fake an outage. Clients find it only through environment variables (`s3_env`), so Ray workers and
subprocess drivers started by the pipeline reach it exactly as they would reach a real endpoint."""
from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    """What points boto3/botocore, s3fs and pyarrow-over-fsspec at `endpoint` and nowhere else."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # botocore (>= 1.31) reads AWS_ENDPOINT_URL itself, and s3fs passes endpoint_url=None on to it,
        # so this one variable covers boto3 and s3fs; the service-specific one would win over it,
        # so it is set too (a developer's shell may carry a real one).
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        # Never fall back to the instance metadata service (a 1 s+ timeout per client on a laptop),
        # nor to a profile or credentials in the developer's ~/.aws.
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


# Variables that would override the ones above (a session token from a real login, a profile).
S3_ENV_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")


def apply_s3_env(endpoint: str, environ=os.environ) -> None:
    for key in S3_ENV_UNSET:
        environ.pop(key, None)
    environ.update(s3_env(endpoint))


# `moto_server`'s own entry point, but first asking the kernel to SIGKILL it when the test process
# dies (PR_SET_PDEATHSIG): a pytest killed outright must not leave a server behind for good.
_MOTO_MAIN = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)
except Exception:
    pass
if os.getppid() == 1:
    sys.exit(1)
from moto.server import main
sys.exit(main(sys.argv[1:]))
"""


class MotoServer:
    """`moto_server` on 127.0.0.1:<port>, one process, all state in memory."""

    def __init__(self, port: int | None = None, log_path: str | Path | None = None):
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = Path(log_path) if log_path else Path(os.devnull)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "MotoServer":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", _MOTO_MAIN, "-H", HOST, "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}: {self._log_tail()}")
            try:  # moto's own health route; any HTTP answer means it is serving
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"moto_server did not answer on {self.url}: {self._log_tail()}")
                time.sleep(0.2)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class TcpProxy:
    """127.0.0.1:<listen_port> -> 127.0.0.1:<target_port>, byte for byte, one thread per connection.

    `pause()` closes the listening socket and resets every open connection, so clients see what a
    dead endpoint gives: ECONNREFUSED for new connections, ECONNRESET on pooled keep-alive ones.
    `resume()` listens on the same port again."""

    def __init__(self, target_port: int, listen_port: int | None = None, target_host: str = HOST):
        self.target = (target_host, target_port)
        self.port = listen_port or free_port()
        self._lock = threading.Lock()  # guards _conns
        self._switch = threading.RLock()  # one pause()/resume() at a time (outage() resumes from a thread)
        self._conns: dict[threading.Thread, tuple[socket.socket, socket.socket]] = {}  # pump -> ends
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stop = threading.Event()
        self.resume()

    @property
    def paused(self) -> bool:
        return self._listener is None

    def resume(self) -> None:
        with self._switch:
            if self._listener is not None:
                return
            sock = socket.socket()
            # The port was just closed with connections on it; without this a rebind can fail.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((HOST, self.port))
            sock.listen(128)
            self._stop = threading.Event()
            self._listener = sock
            self._acceptor = threading.Thread(target=self._accept_loop, args=(sock, self._stop),
                                              name=f"tcp-proxy-{self.port}", daemon=True)
            self._acceptor.start()

    def pause(self) -> None:
        with self._switch:
            sock, acceptor, self._listener = self._listener, self._acceptor, None
            if sock is None:
                return
            self._stop.set()
            acceptor.join()  # it polls with a short timeout: closing under a blocked accept() is unsafe
            sock.close()  # from here on: connection refused
            with self._lock:
                conns = dict(self._conns)
            for ends in conns.values():
                for end in ends:
                    # Wakes the pump's select() with EOF; the pump alone closes (with a RST), so an
                    # fd is never closed twice or under a thread that is still reading it.
                    try:
                        end.shutdown(socket.SHUT_RD)
                    except OSError:
                        pass
            for pump in conns:
                pump.join(timeout=5)

    def outage(self, seconds: float) -> threading.Thread:
        """Pause now, resume after `seconds` in the background; join the thread to wait for it."""
        self.pause()
        thread = threading.Thread(target=lambda: (time.sleep(seconds), self.resume()), daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.pause()

    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            pump = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            with self._lock:
                if stop.is_set():  # paused while we connected: this connection must not live on
                    _reset(client), _reset(upstream)
                    return
                self._conns[pump] = (client, upstream)
            pump.start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        """Copy both ways until either side closes, then close both (HTTP clients never half-close)."""
        sel = selectors.DefaultSelector()
        try:
            sel.register(client, selectors.EVENT_READ, upstream)
            sel.register(upstream, selectors.EVENT_READ, client)
            while True:
                for key, _ in sel.select():
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except (OSError, ValueError):  # reset by pause(), or the peer went away
            return
        finally:
            sel.close()
            _reset(client), _reset(upstream)
            with self._lock:
                self._conns.pop(threading.current_thread(), None)


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST (ECONNRESET), not a polite FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def upload_dir(local_dir: str | Path, url: str, fs=None) -> list[str]:
    """Upload a folder recursively to `url` (s3://bucket/prefix); returns the uploaded keys."""
    import fsspec

    fs, root = (fs, url.split("://", 1)[-1]) if fs is not None else fsspec.core.url_to_fs(url)
    local_dir = Path(local_dir)
    fs.put(str(local_dir) + "/", root.rstrip("/") + "/", recursive=True)
    return sorted(f"{root.rstrip('/')}/{p.relative_to(local_dir).as_posix()}" for p in local_dir.rglob("*") if p.is_file())
