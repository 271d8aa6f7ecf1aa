"""A real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster): a head plus N worker
nodes, each its own raylet, object store and workers. Only subprocess drivers attach to it
(RAY_ADDRESS=<.address>); the test process keeps its own session Ray (`ray_local`) and never
connects, so the cluster is started here without disturbing that session (see `_session_guard`)."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from unittest import mock

from ray._private import ray_constants


class LocalCluster:
    def __init__(self, cluster, temp_dir: str, node_args: dict):
        self.cluster = cluster
        self.temp_dir = temp_dir
        self._node_args = node_args  # what add_node() starts another worker node with
        self.address = cluster.address  # GCS host:port, for RAY_ADDRESS
        # The driver must use the auth mode the nodes were started with (they inherited this
        # process's environment): Ray 2.60's ray.init(address="local") sets RAY_AUTH_MODE=token in
        # the process that calls it and keeps the token in ~/.ray/auth_token, which drivers find
        # the same way. An explicit RAY_ADDRESS never turns token mode on by itself, so say it.
        self.env = {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}

    @property
    def head_node(self):
        return self.cluster.head_node

    @property
    def worker_nodes(self) -> list:
        return sorted(self.cluster.worker_nodes, key=lambda n: n.node_id)

    def driver_env(self, **extra: str) -> dict[str, str]:
        """os.environ (S3 settings included) plus what attaches a driver to this cluster."""
        return {**os.environ, **self.env, **extra}

    def kill_node(self, node, wait_dead: float | None = None) -> None:
        """Abrupt loss of a worker node, as if its machine died: its raylet (with the object store)
        and everything the raylet started (workers, dashboard and runtime-env agents) get SIGKILL.
        remove_node alone would leave the agents running as orphans for a minute or two.
        The GCS notices the loss only after its health checks fail (seconds); `wait_dead=<s>` waits
        until it has (a test of "the run survives a node loss" wants the default: no wait)."""
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        children = _descendants(raylet)
        with _session_guard():
            self.cluster.remove_node(node, allow_graceful=False)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if wait_dead:
            deadline = time.monotonic() + wait_dead
            while node.node_id in self.live_node_ids():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the GCS still lists node {node.node_id} as alive")
                time.sleep(0.5)

    def live_node_ids(self) -> set[str]:
        """Node ids (hex) the cluster's GCS considers alive."""
        with _session_guard():
            return set(self.cluster.global_state._live_node_ids())

    def add_node(self, **node_args):
        with _session_guard():
            return self.cluster.add_node(**{**self._node_args, **node_args})


@contextlib.contextmanager
def local_cluster(nodes: int = 3, cpus_per_node: int = 1, object_store_bytes: int = 128 << 20,
                  head_cpus: int = 0, keep_logs_on_error: bool = True):
    """A head with `head_cpus` CPUs (0: tasks run on the worker nodes only, so killing a worker
    never takes the driver's node down) plus `nodes` worker nodes with `cpus_per_node` CPUs each.
    Yields a LocalCluster; always shut down on exit, whatever the test did."""
    from ray.cluster_utils import Cluster

    # Its own temp dir (sessions, sockets, logs) away from the session Ray's /tmp/ray; short, as
    # unix socket paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rayc-", dir="/tmp")
    common = {"object_store_memory": object_store_bytes, "temp_dir": temp_dir, "num_gpus": 0}
    cluster = None
    ok = False
    previous_term = _term_as_interrupt()
    try:
        with _session_guard():
            # Cluster(initialize_head=True) would start the head in its constructor: if that
            # failed half-way we would have no handle to clean up, so the head is added here.
            cluster = Cluster(initialize_head=False, connect=False, shutdown_at_exit=True)
            cluster.add_node(num_cpus=head_cpus, include_dashboard=False, **common)
            for _ in range(nodes):
                cluster.add_node(num_cpus=cpus_per_node, **common)
            cluster.wait_for_nodes(timeout=120)
        yield LocalCluster(cluster, temp_dir, {"num_cpus": cpus_per_node, **common})
        ok = True
    finally:
        if cluster is not None:
            _shutdown(cluster)
        if previous_term is not _NOT_SET:
            signal.signal(signal.SIGTERM, previous_term if previous_term is not None else signal.SIG_DFL)
        if ok or not keep_logs_on_error:
            shutil.rmtree(temp_dir, ignore_errors=True)
        else:
            print(f"local_cluster: logs kept in {temp_dir}/session_latest/logs", file=sys.stderr)


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc, Linux only)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _term_as_interrupt():
    """While the cluster is up, SIGTERM (`timeout`, CI cancelling) acts like Ctrl-C: pytest unwinds,
    the `finally` above shuts the nodes down and session fixtures tear down. Killed outright, the
    nodes' raylets die with this process (Ray's PR_SET_PDEATHSIG), but their dashboard and runtime
    env agents linger for a minute or two. Returns the handler to restore (_NOT_SET: none was set)."""
    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # signal handlers can only be set from the main thread
        return _NOT_SET


_NOT_SET = object()


def _shutdown(cluster) -> None:
    with _session_guard():
        try:
            cluster.shutdown()
            return
        except Exception as exc:  # noqa: BLE001 - never leave processes behind
            print(f"local_cluster: shutdown failed ({exc!r}); killing every node", file=sys.stderr)
        for node in [*cluster.worker_nodes, *([cluster.head_node] if cluster.head_node else [])]:
            with contextlib.suppress(Exception):
                node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)


@contextlib.contextmanager
def _session_guard():
    """Undo what starting/stopping nodes in-process does to this process's own (session) Ray:
    - Node() points the process-wide internal-KV client at the NEW cluster's GCS, and
      Cluster.shutdown() resets it to None: either breaks the session Ray's internal KV users
      (runtime envs, Ray Data/Train);
    - the head writes its address to /tmp/ray/ray_current_cluster and shutdown deletes that file:
      a plain ray.init() anywhere on the machine would then attach to (or miss) the wrong cluster;
    - every Node installs a SIGTERM handler that kills that node and sys.exit(1)s, replacing
      the one in place (see _term_as_interrupt).
    """
    from ray.experimental import internal_kv

    saved_kv = internal_kv.global_gcs_client, getattr(internal_kv, "_initialized", False)
    saved_term = signal.getsignal(signal.SIGTERM)
    try:
        with mock.patch("ray._private.utils.write_ray_address"), \
                mock.patch("ray._common.utils.reset_ray_address"):
            yield
    finally:
        internal_kv.global_gcs_client, internal_kv._initialized = saved_kv
        if saved_term is not None:
            with contextlib.suppress(ValueError):  # not the main thread: Node could not set one either
                signal.signal(signal.SIGTERM, saved_term)
