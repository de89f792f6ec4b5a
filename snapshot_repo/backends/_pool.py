"""Connections borrowed from SQLAlchemy's pool, kept between calls, taken in turns.

The one module that reads SQLAlchemy's pool internals (see `_privates`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn

from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import greenlet_spawn

from .. import _deadlines
from .._translate import describe
from .._turns import Turns
from ..errors import ConnectionLostError, StorageError
from ._privates import connection_is_current, invalidate_generation, pool_capacity

__all__ = ["KEPT_CONNECTIONS", "Connections"]

logger = logging.getLogger("snapshot_repo")


def _never(_exc: BaseException) -> bool:
    return False


def is_disconnect(
    exc: BaseException, driver_connection: Any, driver_lost: Callable[[BaseException], bool]
) -> bool:
    """Whether the connection must never be handed out again after `exc`.

    `driver_lost` is the backend's own test for its driver's connection errors.
    """
    if isinstance(exc, asyncio.CancelledError | TimeoutError | OSError):
        return True  # interrupted mid-protocol, or the socket failed: state unknown
    if driver_lost(exc):
        return True
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if sqlstate.startswith(("57P", "08")):  # admin shutdown, crash, connection failure
        return True
    is_closed = getattr(driver_connection, "is_closed", None)
    return bool(is_closed and is_closed())


KEPT_CONNECTIONS = 2
"""How many connections a repository that owns its engine keeps between its operations."""


_TURN_PATIENCE = 0.002
"""Seconds a call may wait for a connection before later calls stop going ahead of it."""


class Connections:
    """Borrows connections from SQLAlchemy's pool, keeping a few between operations.

    Each borrow and return through SQLAlchemy's async pool runs in a greenlet
    (a switch in and out each time): measured at about a third of a
    `get_latest`'s client CPU. Keeping up to `keep` connections checked out
    between operations skips both for sequential callers, and while calls
    overlap up to all but one of the pool's connections stay with the
    repository (see `_checkin`); other borrowing goes through the pool as
    usual, so pool limits and timeouts still apply. A kept connection is
    checked against the pool's invalidation time before reuse, and
    `release()` (called by the repository's `close()`) returns them all.
    Only repositories that own their engine keep connections (`from_url`): a
    repository made on a borrowed engine may be short-lived and never
    closed, and must not hold the caller's connections.

    Operations take turns (`Turns`, as many as the pool has connections):
    first come, first served once anyone has waited `_TURN_PATIENCE`.
    Without turns, when more tasks than connections ran at once, the tasks
    holding connections took them again and again (from the kept ones, or
    straight back from the pool's queue, which does not hand a returned
    connection to the waiter it wakes) while the others waited: 16 writers
    on a pool of 10 had a p99 of 25 ms against 5 ms for asyncpg's pool. A
    task with a turn never waits inside SQLAlchemy's pool for a connection
    held by this repository.
    """

    def __init__(
        self, engine: AsyncEngine, driver_lost: Callable[[BaseException], bool] = _never
    ) -> None:
        self._engine = engine
        self._driver_lost = driver_lost
        self._kept: list[Any] = []
        self.keep = 0
        self._keep_while_busy = 0
        self._turns: Turns | None = None
        self._size, capacity, self._pool_timeout = pool_capacity(engine.sync_engine.pool)
        # None: no limit to admit against (overflow unbounded, or not a queue pool).
        self._capacity = capacity if self._size else None

    async def admit(self) -> None:
        """Wait for this task's turn to use a connection (up to the pool timeout)."""
        if self._capacity is None:
            return
        if self._turns is None:  # made inside the running loop it belongs to
            self._turns = Turns(self._capacity, patience=_TURN_PATIENCE)
        if self._turns.try_take():
            return
        deadline = _deadlines.start(self._pool_timeout)
        try:
            await self._turns.take()
        except BaseException as failed:
            _deadlines.stop(deadline)  # whatever ended the wait: it can no longer fire
            if isinstance(failed, asyncio.CancelledError) and deadline.expired_for(type(failed)):
                # As SQLAlchemy's pool says it, so callers see one message either way.
                raise PoolTimeoutError(
                    f"QueuePool limit of size {self._size} overflow "
                    f"{(self._capacity or 0) - self._size} reached, connection timed out, "
                    f"timeout {self._pool_timeout:.2f}"
                ) from None
            raise
        _deadlines.stop(deadline)

    def leave(self) -> None:
        """End a turn begun by `admit`."""
        if self._turns is not None:
            self._turns.give_back()

    def keep_up_to(self, count: int) -> None:
        """Keep up to `count` idle connections, but always leave the pool one.

        The engine's other users (`migrate`, `dump`, your own `engine.connect()`)
        take connections from the same pool: had an idle repository kept every
        connection of a small pool, they would wait out `pool_timeout` and fail.
        """
        self.keep = count if self._capacity is None else max(0, min(count, self._capacity - 1))
        # None: no turns, so no telling busy from idle.
        busy_limit = self.keep if self._capacity is None else self._capacity - 1
        self._keep_while_busy = busy_limit if self.keep else 0

    @property
    def waiting(self) -> int:
        """How many calls wait for a connection now (for the pool's pending-requests gauge)."""
        return 0 if self._turns is None else self._turns.waiting

    @property
    def kept(self) -> int:
        """How many idle connections are held for reuse (counted as checked out by the pool)."""
        return len(self._kept)

    async def release(self) -> None:
        """Return every kept connection to SQLAlchemy's pool, and keep none from now on."""
        self.keep = self._keep_while_busy = 0
        while self._kept:
            await greenlet_spawn(self._kept.pop().close)

    def checkout(self) -> _Checkout:
        """`async with` a driver connection; see `_checkout_failed` for what a failure does."""
        return _Checkout(self)

    async def _checkin(self, fairy: Any, exc: BaseException | None) -> None:
        """Take back a connection after use: keep it, return it to the pool, or discard it.

        While other calls of this repository run or wait (`Turns.others_active`),
        up to all but one of the pool's connections are kept, so that under
        concurrency calls pass connections on without SQLAlchemy's pool (two
        greenlet round trips a call, about a tenth of the client CPU of a write
        with 16 writers on 10 connections). The last call of a burst returns
        the extra ones, leaving `keep` idle.
        """
        keep = exc is None or not is_disconnect(exc, fairy.driver_connection, self._driver_lost)
        busy = self.keep > 0 and self._turns is not None and self._turns.others_active
        try:
            if not keep:
                assert exc is not None
                await self._checkout_failed(fairy, exc)
        finally:
            limit = self._keep_while_busy if busy else self.keep
            if keep and fairy.is_valid and len(self._kept) < limit:
                self._kept.append(fairy)
            else:
                await greenlet_spawn(fairy.close)
            while not busy and len(self._kept) > self.keep:
                await greenlet_spawn(self._kept.pop().close)

    async def _take(self) -> Any:
        pool = self._engine.sync_engine.pool
        while self._kept:
            fairy = self._kept.pop()
            closed = getattr(fairy.driver_connection, "is_closed", None)
            if fairy.is_valid and connection_is_current(fairy, pool) and not (closed and closed()):
                return fairy
            await greenlet_spawn(fairy.close)  # stale: the pool recycles it
        try:
            return await greenlet_spawn(self._engine.sync_engine.raw_connection)
        except self._engine.dialect.loaded_dbapi.Error as exc:
            # Raised by the driver while connecting (refused, starting up, shutting
            # down); SQLAlchemy's pool passes it on without wrapping it.
            raise StorageError(f"cannot connect to the database: {describe(exc)}") from exc

    async def _checkout_failed(self, fairy: Any, exc: BaseException) -> NoReturn:
        """Discard a connection whose state is unknown after `exc`, then re-raise.

        Cancellation and timeouts drop the socket at once (a polite close would
        wait on a server that may be frozen) and discard only this connection.
        A lost connection means the server went away: every connection of its
        pool generation is invalidated (as SQLAlchemy does on a disconnect), the
        kept ones included, so no stale connection is handed out again.
        """
        if isinstance(exc, asyncio.CancelledError | TimeoutError):
            terminate = getattr(fairy.driver_connection, "terminate", None)
            if terminate is not None:
                terminate()
            await greenlet_spawn(fairy.invalidate, exc)
            raise exc
        await greenlet_spawn(invalidate_generation, self._engine.sync_engine.pool, fairy, exc)
        while self._kept:  # same generation: dead too
            await greenlet_spawn(self._kept.pop().close)
        raise ConnectionLostError(
            f"the database connection was lost ({describe(exc)}); a write's outcome is "
            "unknown: retry it with the same idempotency key"
        ) from exc


class _Checkout:
    """One use of a connection of `Connections`, as `async with`.

    A class rather than an `asynccontextmanager`: every operation goes
    through it, and the generator machinery costs a few microseconds a call.
    """

    __slots__ = ("_connections", "_fairy")

    def __init__(self, connections: Connections) -> None:
        self._connections = connections
        self._fairy: Any = None

    async def __aenter__(self) -> Any:
        connections = self._connections
        await connections.admit()
        try:
            self._fairy = await connections._take()
        except BaseException:
            connections.leave()
            raise
        return self._fairy.driver_connection

    async def __aexit__(
        self,
        _exc_type: type[BaseException] | None,
        exc: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        # Returns None: an exception propagates (or `_checkin` raised the one replacing it).
        try:
            await self._connections._checkin(self._fairy, exc)
        finally:
            self._connections.leave()  # after the connection is back, for the next in line
