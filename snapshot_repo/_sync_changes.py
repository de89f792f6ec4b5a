"""Live changes of a `SyncSnapshotRepository`: `SyncSubscription` and `SyncChangeStream`.

Both wrap their async counterparts (`Subscription`, `ChangeStream`) running
on the repository's background loop. A subscription hands changes to a
worker thread through a bounded queue, so a slow or blocking callback never
holds up writers; a stream turns waiting for the next change into a blocking
call that another thread's `close` can end. `snapshot_repo.sync` re-exports
both classes.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future
from typing import Self

import anyio
import anyio.to_thread

from ._context import logger
from ._sync_loop import SyncLoop
from .changes import Change, ChangeCallback, ChangeStream, Subscription

__all__ = ["SyncChangeStream", "SyncSubscription"]

_MAX_QUEUED = 10_000
"""Changes a subscription buffers for a slow callback before dropping the oldest."""


class SyncSubscription:
    """A live listener of a `SyncSnapshotRepository`; `close()` (or leaving `with`) stops it.

    Changes are delivered to the callback in a worker thread, one at a time,
    in the order they were published; up to 10,000 wait for a slow callback,
    after which the oldest are dropped with a warning (live delivery is best
    effort: catch up with `changes_since`). Errors raised by the callback are
    logged, never raised into writers.
    """

    def __init__(self, loop: SyncLoop, callback: ChangeCallback) -> None:
        self._loop = loop
        self._callback = callback
        self._send, self._receive = anyio.create_memory_object_stream[Change](_MAX_QUEUED)
        self._subscription: Subscription | None = None
        self._stopped = False

    def close(self) -> None:
        """Stop delivery. A callback already running finishes; no further one starts.

        Safe from any thread, the callback's own included. Idempotent.
        """
        if self._stopped:
            return
        self._loop.untrack(self)
        self._stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _stop(self) -> None:
        """`close` without untracking (the loop's own close calls this)."""
        if self._stopped:
            return
        self._stopped = True
        if self._loop.on_loop_thread():
            self._stop_on_loop()
        else:
            self._loop.call_sync(self._stop_on_loop, closing=True)

    def _stop_on_loop(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
        self._send.close()

    def _enqueue(self, change: Change) -> None:
        """The async subscription's callback: runs on the loop, never blocks."""
        try:
            self._send.send_nowait(change)
        except anyio.WouldBlock:
            self._receive.receive_nowait()
            self._send.send_nowait(change)
            logger.warning("snapshot_repo change listener fell behind; dropped the oldest change")
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # stopped: a change published while it stops is not delivered

    async def _deliver(self) -> None:
        """The task that feeds the callback, until the subscription stops."""
        async with self._receive:
            async for change in self._receive:
                if self._stopped:
                    return
                outcome: object
                try:
                    if inspect.iscoroutinefunction(self._callback):
                        outcome = self._callback(change)
                    else:
                        outcome = await anyio.to_thread.run_sync(
                            self._loop.run_callback, self._callback, change
                        )
                    if inspect.isawaitable(outcome):
                        await outcome
                except Exception:
                    logger.exception("snapshot_repo change listener failed")


class SyncChangeStream:
    """Live changes of one scope as a blocking iterator (see `ChangeStream`).

    `with repo.changes() as stream:` starts listening on entry, so nothing
    committed after the `with` line is missed; `for change in stream:`
    blocks for each change and ends when the stream (or its repository) is
    closed from another thread. `get(timeout)` waits a bounded time. One
    thread at a time may read a stream.
    """

    def __init__(self, loop: SyncLoop, stream: ChangeStream) -> None:
        self._loop = loop
        self._stream = stream
        self._waiting: set[Future[Change | None]] = set()
        self._lock = threading.Lock()
        self._stopped = False

    def open(self) -> None:
        """Start listening (idempotent); iteration and `get` also start it."""
        self._loop.call(self._stream.open)

    def get(self, timeout: float | None = None) -> Change | None:
        """The next change; None when `timeout` seconds passed first or the stream is closed.

        None as the timeout waits for as long as it takes.
        """
        with self._lock:
            if self._stopped:
                return None
            future = self._loop.submit(lambda: self._next(timeout))
            self._waiting.add(future)
        try:
            return future.result()
        except CancelledError:  # by `close`, from another thread
            if self._stopped:
                return None
            raise
        finally:
            future.cancel()  # a no-op once done; a wait interrupted here is withdrawn
            with self._lock:
                self._waiting.discard(future)

    async def _next(self, seconds: float | None) -> Change | None:
        # The timeout is the loop's, not the waiting thread's: a change that arrives as
        # the time runs out is either returned or stays queued, never lost in between.
        with anyio.move_on_after(seconds):
            return await self._stream.__anext__()
        return None

    def close(self) -> None:
        """Stop listening; a `get` or iteration waiting in another thread returns (ends)."""
        self._loop.untrack(self)
        self._stop()

    def _stop(self) -> None:
        """`close` without untracking (the loop's own close calls this)."""
        if self._loop.on_loop_thread():
            raise RuntimeError("a SyncChangeStream cannot be closed from its repository's loop")
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            waiting = list(self._waiting)
        for future in waiting:
            future.cancel()
        self._loop.call(self._stream.aclose, closing=True)

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Change]:
        return self

    def __next__(self) -> Change:
        change = self.get()
        if change is None:
            raise StopIteration
        return change
