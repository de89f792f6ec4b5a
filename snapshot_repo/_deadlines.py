"""Deadlines for many concurrent calls, on one timer per event loop.

Every public call runs under a deadline (`operation_timeout`), and calls
waiting for a connection under another (`pool_timeout`). A timer per call
(`asyncio.timeout`, `loop.call_later`) costs about 3 us to schedule and
cancel, a noticeable share of a call's client CPU when many run at once; a
registered deadline costs a dict insert and delete. One watchdog timer per
loop, running only while deadlines are registered, cancels the tasks whose
deadline passed. The price is precision: a deadline fires late by up to an
eighth of the shortest limit registered at the time (and never early).

Tasks are cancelled as `asyncio.timeout` cancels them, and `expired_for`
tells a deadline's own cancellation from one requested by anybody else.
Work that runs outside the loop and cannot be cancelled (a SQLite busy wait
on a connection's thread) asks `remaining()` how long it may wait.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from contextvars import ContextVar, Token

__all__ = ["Deadline", "expired", "remaining", "start", "stop"]

_MIN_TICK = 0.005
"""Seconds: the watchdog never checks more often than this."""


class Deadline:
    """One registered deadline: the task it cancels and when."""

    __slots__ = ("cancelling", "expired", "task", "token", "watchdog", "when")
    watchdog: _Watchdog
    token: Token[Deadline | None]

    def __init__(self, task: asyncio.Task[object], when: float) -> None:
        self.task = task
        self.when = when
        self.cancelling = task.cancelling()  # cancel requests already pending at the start
        self.expired = False

    def expired_for(self, exc_type: type[BaseException] | None) -> bool:
        """Whether the block ended because this deadline (and nothing else) cancelled it.

        Call once, on leaving the block, after `stop`: it withdraws the
        deadline's cancel request, as `asyncio.timeout` does.
        """
        if not self.expired:
            return False
        return self.task.uncancel() <= self.cancelling and exc_type is asyncio.CancelledError


class _Watchdog:
    """The deadlines of one event loop and the one timer that enforces them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._active: dict[Deadline, None] = {}  # an ordered set
        self._tick = math.inf
        self._timer: asyncio.TimerHandle | None = None

    def start(self, task: asyncio.Task[object], seconds: float) -> Deadline:
        deadline = Deadline(task, self._loop.time() + seconds)
        self._active[deadline] = None
        tick = max(seconds / 8, _MIN_TICK)
        if self._timer is None or tick < self._tick:
            if self._timer is not None:
                self._timer.cancel()
            self._tick = tick
            self._timer = self._loop.call_later(tick, self._check)
        return deadline

    def _check(self) -> None:
        now = self._loop.time()
        for deadline in list(self._active):
            if deadline.when <= now:
                del self._active[deadline]
                deadline.expired = True
                deadline.task.cancel()
        if self._active:
            self._timer = self._loop.call_later(self._tick, self._check)
        else:
            self._timer, self._tick = None, math.inf


_innermost: ContextVar[Deadline | None] = ContextVar("snapshot_repo_deadline", default=None)
"""The deadline of the block the current task is in, if any."""

_watchdogs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watchdog] = (
    weakref.WeakKeyDictionary()
)


def start(seconds: float) -> Deadline:
    """Cancel the current task once `seconds` have passed, unless `stop` comes first."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("a deadline needs a running task")
    loop = task.get_loop()
    watchdog = _watchdogs.get(loop)
    if watchdog is None:
        watchdog = _watchdogs[loop] = _Watchdog(loop)
    deadline = watchdog.start(task, seconds)
    deadline.watchdog = watchdog
    deadline.token = _innermost.set(deadline)
    return deadline


def stop(deadline: Deadline) -> None:
    """Withdraw `deadline` (it can no longer fire)."""
    deadline.watchdog._active.pop(deadline, None)
    _innermost.reset(deadline.token)


def expired() -> bool:
    """Whether the current task's innermost deadline has fired (its cancel is the deadline's)."""
    deadline = _innermost.get()
    return deadline is not None and deadline.expired


def remaining() -> float | None:
    """Seconds left before the current task's innermost deadline fires; None without one.

    Never below zero. Deadlines nest (a pool wait inside an operation), and
    each is stopped before the block around it ends, so this is the
    deadline of the block the caller is in.
    """
    deadline = _innermost.get()
    if deadline is None:
        return None
    return max(0.0, deadline.when - deadline.task.get_loop().time())
