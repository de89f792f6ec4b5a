"""Waiting until SIGSTOP has taken effect: `os.kill` returns once the signal is queued,
not once the process has stopped.

A thread busy on the other core goes on running until the kernel interrupts it,
so a fault test that calls the server right after freezing it could still get an
answer (a MariaDB fault test did, once, on the two busy cores of CI).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["wait_until_stopped"]

_POLL_INTERVAL = 0.001


def _threads_running(pid: int) -> bool:
    """Whether any thread of `pid` is not yet stopped (a gone process counts as stopped)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            stat_line = (task / "stat").read_text()
        except OSError:
            continue  # the thread exited while we looked
        # The command name is in parentheses and may contain spaces: the state follows it.
        if stat_line[stat_line.rindex(")") + 2] not in "TtZX":
            return True
    return False


def wait_until_stopped(pids: Iterable[int], timeout: float = 10.0) -> None:
    """Return once every thread of every process of `pids` is stopped (or gone).

    Raises:
        RuntimeError: some thread still runs after `timeout` seconds.
    """
    waiting = list(pids)
    deadline = time.monotonic() + timeout
    while waiting := [pid for pid in waiting if _threads_running(pid)]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes still running {timeout} s after SIGSTOP: {waiting}")
        time.sleep(_POLL_INTERVAL)
