"""Fault injection for the failure tests (and for users who want to see a run survive one).

With VIDEO_ROBIN_FAULTS=DIR set, a file DIR/<point> arms that point once: the first process to
reach it renames the file away (so exactly one process fires) and then, as the file says:
`kill` ends the process at once (as SIGKILL or a lost node would), `raise` raises, `hang` blocks
(for a test to kill the run while it is stuck there). Unset, a point costs one environment lookup."""
from __future__ import annotations

import os
import time

ENV = "VIDEO_ROBIN_FAULTS"


class InjectedFault(RuntimeError):
    pass


def fault(point: str) -> None:
    folder = os.environ.get(ENV)
    if not folder:
        return
    armed = os.path.join(folder, point)
    fired = f"{armed}.fired.{os.getpid()}"
    try:
        os.rename(armed, fired)  # atomic: one process wins
    except FileNotFoundError:
        return
    with open(fired) as f:
        action = f.read().strip()
    if action == "kill":
        os._exit(137)
    if action == "hang":
        while True:
            time.sleep(60)
    raise InjectedFault(f"injected fault at {point}")


def arm(folder: str, point: str, action: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, point), "w") as f:
        f.write(action)


def fired(folder: str, point: str) -> bool:
    return any(name.startswith(f"{point}.fired.") for name in os.listdir(folder))
