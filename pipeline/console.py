"""What a run prints: one progress bar (videos accounted for, clips written, clips/s, ETA) and the
summary last. Ray's own logs and Ray Data's per-operator bars stay off unless asked for
(`--verbose`): a newcomer should not scroll past hundreds of scheduler lines to reach the result."""
from __future__ import annotations

import logging
import sys
import time

QUIET_LOGGERS = ("ray", "ray.data", "ray.data._internal.execution.streaming_executor")


def quiet_ray() -> None:
    """Ray's and Ray Data's loggers to warnings (their INFO lines describe the scheduler, not the run)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class RunBar:
    """Inputs accounted for (curated to their last clip, rejected or a duplicate) out of those to do,
    with clips written and clips/s; an ETA from the inputs' rate. Off when `enabled` is false; then,
    unless `silent`, the run logs a line per chunk instead (a cluster job's log has no bar)."""

    def __init__(self, total: int, enabled: bool, silent: bool = False):
        self.clips, self.t0, self._bar, self.silent = 0, time.perf_counter(), None, silent
        if enabled and total:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="video", desc="[build]", file=sys.stderr, dynamic_ncols=True,
                             bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} videos "
                                        "[{elapsed}<{remaining}{postfix}]")

    def advance(self, inputs: int = 0, clips: int = 0) -> None:
        self.clips += clips
        if self._bar is not None:
            rate = self.clips / max(time.perf_counter() - self.t0, 1e-9)
            self._bar.set_postfix_str(f"{self.clips} clips, {rate:.2f} clips/s", refresh=False)
            self._bar.update(inputs)

    @property
    def lines_instead(self) -> bool:
        return self._bar is None and not self.silent

    def write(self, line: str) -> None:
        """A line above the bar (or plain, without one)."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
