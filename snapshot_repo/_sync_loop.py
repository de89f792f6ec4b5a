"""The background event loop behind `SyncSnapshotRepository`, and its process-wide upkeep.

A `SyncLoop` is one daemon thread running an event loop through anyio's
blocking portal; a sync repository hands each call to it and blocks the
calling thread until the call is done. This module also keeps the set of
loops still open, so that the interpreter's exit closes the repositories a
program forgot (a portal left open would hang the exit) and a forked child
refuses calls on loops whose threads it does not have. See `snapshot_repo.sync`
for where callers' code runs.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future
from contextlib import ExitStack
from typing import Any, Protocol, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._context import logger

__all__ = ["SyncLoop"]

_T = TypeVar("_T")


class _Live(Protocol):
    """A live stream or subscription that the loop's `close` ends (`SyncSubscription`, ...)."""

    def _stop(self) -> None: ...


_callback_thread = threading.local()
"""`loop`: the `SyncLoop` whose change callback this worker thread is running, if any."""


_open_loops: set[SyncLoop] = set()
"""Every loop not closed yet, held until it is (a loop owns a thread, as an executor does)."""


@atexit.register
def _close_forgotten() -> None:
    """Close the repositories a program forgot to close, while their loops still run.

    At exit, after this, daemon threads stop: a portal left open would then
    be stopped by its generator's finalizer, which waits forever for a loop
    that no longer runs (the interpreter hangs on exit).
    """
    for loop in list(_open_loops):
        try:
            loop.close()
        except Exception:  # at exit: log and go on closing the others
            logger.exception("snapshot_repo: closing a SyncSnapshotRepository at exit failed")


def _forked() -> None:
    """In a child process: the loops' threads were not copied, so their repositories are dead.

    Refuse their calls (which would wait forever for a loop that does not run
    here) with a message saying why, and leave their connections, which are
    the parent's, alone.
    """
    for loop in _open_loops:
        loop._closed = True
        loop._refusal = (
            "this SyncSnapshotRepository was made in the parent of this forked process; "
            "make one in each process (e.g. after a pre-fork server forked its workers)"
        )
        loop._abandon_portal()
    _open_loops.clear()


os.register_at_fork(after_in_child=_forked)


class SyncLoop:
    """The background event loop that a sync repository and its tenant views share.

    Thread-safe: `call` may be used from any thread but the loop's own.
    """

    def __init__(self, final: Callable[[], Awaitable[None]]) -> None:
        self._final = final
        self._exit = ExitStack()
        self._portal: BlockingPortal = self._exit.enter_context(
            start_blocking_portal(name="snapshot-repo-sync")
        )
        self._thread_id = self._portal.call(threading.get_ident)
        self._lock = threading.Lock()
        self._closed = False
        self._refusal = "this SyncSnapshotRepository is closed"
        self._live: set[_Live] = set()
        _open_loops.add(self)

    def _abandon_portal(self) -> None:
        """Mark the portal stopped without its loop, which does not run in this (forked) process.

        Otherwise the portal's context manager, finalized at this process's
        exit, would wait forever for its loop to stop it, and the child would
        hang on exit. anyio's own `BlockingPortal.stop` marks a portal stopped
        the same way (the only private name of anyio used here); without it
        the child still refuses calls, and may hang on exit.
        """
        if hasattr(self._portal, "_event_loop_thread_id"):
            self._portal._event_loop_thread_id = None

    @property
    def closed(self) -> bool:
        return self._closed

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread_id

    def submit(self, func: Callable[[], Awaitable[_T]], *, closing: bool = False) -> Future[_T]:
        """Start `func()` as a task on the loop; the future holds its outcome."""
        return self._start(func, closing)

    def call(self, func: Callable[[], Awaitable[_T]], *, closing: bool = False) -> _T:
        """Run `func()` on the loop and wait for its result (or exception)."""
        future: Future[_T] = self._start(func, closing)
        return self._wait(future)

    def call_sync(self, func: Callable[[], _T], *, closing: bool = False) -> _T:
        """Run the plain function `func()` on the loop's thread and wait for its result."""
        future: Future[_T] = self._start(func, closing)
        return self._wait(future)

    def _start(self, func: Callable[[], Any], closing: bool) -> Future[Any]:
        if self._closed and not closing:
            raise RuntimeError(self._refusal)
        if self.on_loop_thread():
            raise RuntimeError(
                "SyncSnapshotRepository called from its own event loop's thread (a progress "
                "callback or a coroutine listener?), where it would wait for itself; use the "
                "async repository there"
            )
        try:
            return self._portal.start_task_soon(func)
        except RuntimeError:
            if self._closed:  # closed by another thread after the check above
                raise RuntimeError(self._refusal) from None
            raise

    @staticmethod
    def _wait(future: Future[_T]) -> _T:
        try:
            return future.result()
        finally:
            # A no-op once the call is done; when this thread's wait was interrupted
            # (KeyboardInterrupt), it cancels the call on the loop.
            future.cancel()

    def iterate(self, items: AsyncIterator[_T]) -> Iterator[_T]:
        """`items` as a blocking iterator: each item is one call on the loop."""
        finished = False
        try:
            while True:
                try:
                    item = self.call(items.__anext__)
                except StopAsyncIteration:
                    finished = True
                    return
                yield item
        finally:
            # An iterator abandoned early closes its async generator (releasing what it
            # holds); not possible once the loop is gone, or from the loop's own thread
            # (garbage collection there), where asyncio finalizes the generator itself.
            if (
                not finished
                and isinstance(items, AsyncGenerator)
                and not self._closed
                and not self.on_loop_thread()
            ):
                self.call(items.aclose)

    def run_callback(self, callback: Callable[[_T], object], argument: _T) -> object:
        """`callback(argument)` in this (worker) thread, marked as this loop's callback thread.

        The mark lets `close` refuse to run there, where it would wait for itself.
        """
        _callback_thread.loop = self
        try:
            return callback(argument)
        finally:
            _callback_thread.loop = None

    def track(self, live: _Live) -> None:
        with self._lock:
            self._live.add(live)

    def untrack(self, live: _Live) -> None:
        with self._lock:
            self._live.discard(live)

    def close(self) -> None:
        """Refuse new calls, end live streams and subscriptions, run `final()`, stop the loop.

        Stopping the loop waits for the calls still running (each bounded by the
        repository's timeouts) and for a subscription callback in progress.
        """
        if self.on_loop_thread() or getattr(_callback_thread, "loop", None) is self:
            # Closing waits for the loop's tasks, a callback's delivery among them.
            raise RuntimeError(
                "a SyncSnapshotRepository cannot be closed from its own loop or change callbacks"
            )
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live = list(self._live)
            self._live.clear()
        _open_loops.discard(self)
        try:
            for item in live:
                item._stop()
        finally:
            try:
                self.call(self._final, closing=True)
            finally:
                self._exit.close()
