"""The hot path: our few statements, run on the driver connection SQLAlchemy's pool manages.

Why not SQLAlchemy's own execution: measured on a 2-core machine against
Postgres on loopback, `get_latest` through a Core `AsyncConnection` took
270-450 µs, the same statement on the asyncpg connection 100-150 µs: the
Connection object, its transaction bookkeeping and the result machinery cost
more than the round trip. On SQLite every aiosqlite call is a hop to the
connection's thread (0.1-0.2 ms each); Core used nine per write.

What stays SQLAlchemy: the engine, its pool (limits, timeouts, events such as
the SQLite pragmas, invalidation), the dialects and the schema. Statements are
the Core constructs of `_dialects`, compiled once per dialect by SQLAlchemy's
compiler, with parameters converted by SQLAlchemy's own type processors.
Only the execution is the driver's:

- Postgres (asyncpg): one `fetch*` per statement, which asyncpg prepares once
  per connection and reuses; no BEGIN/COMMIT around single statements.
- SQLite (aiosqlite): a whole write transaction (BEGIN IMMEDIATE, the two
  statements, COMMIT or ROLLBACK) runs as one function on the connection's
  thread: one hop. This uses aiosqlite's `_execute`, its internal "run this on
  the connection thread" entry point, because its public API has no way to
  run several statements in one hop; tests cover it on every supported version.
- SQLite reads run on the event loop's thread, on the same checked-out
  connection's `sqlite3.Connection` (aiosqlite's `_conn`), with no hop at all
  (`EngineSettings.sqlite_inline_reads`). The checkout gives this call the
  connection alone, so its thread is idle meanwhile; SQLAlchemy opens file
  connections with `check_same_thread=False` (for its QueuePool), and a
  connection opened without it makes reads fall back to the hop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from operator import itemgetter
from types import TracebackType
from typing import Any, NoReturn, Protocol, TypeVar

import asyncpg
from asyncpg.exceptions._base import InternalClientError
from sqlalchemy import ClauseElement, ColumnElement, Dialect
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.util import greenlet_spawn

from . import _deadlines
from ._dialects import (
    ROW_COLUMNS,
    STORED_COLUMNS,
    DialectName,
    claim_key_statement,
    delete_statements,
    forget_key_statement,
    history_statement,
    hold_key_statement,
    idempotent_write_statement,
    latest_many_statement,
    latest_statement,
    postgres_bulk_write_statement,
    postgres_erase_statement,
    postgres_write_statement,
    prune_statement,
    receipt_statement,
    sorted_batch,
    sqlite_bulk_write_statements,
    sqlite_erasure_feed_statements,
    sqlite_write_statements,
    version_statement,
    write_mode,
)
from ._translate import describe
from ._turns import Turns
from .engine import engine_settings
from .errors import ConnectionLostError, StorageError
from .tables import latest_table

__all__ = [
    "KEPT_CONNECTIONS",
    "DataKeyChanged",
    "DataKeyRef",
    "Erasure",
    "Operations",
    "PendingBatch",
    "PendingWrite",
    "Retention",
    "Row",
    "Scope",
    "is_retryable",
    "operations_for",
    "row_decoder",
]

_T = TypeVar("_T")
logger = logging.getLogger("snapshot_repo")

Row = tuple[Any, ...]
"""A stored snapshot row, its values in `ROW_COLUMNS` order, already type-converted."""


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a repository's rows live: a tenant ("" for none) and a namespace."""

    tenant: str
    namespace: str

    def key(self, user_id: str) -> dict[str, Any]:
        """The bound values that select one user's rows in this scope."""
        return {"tenant": self.tenant, "namespace": self.namespace, "user_id": user_id}


@dataclass(frozen=True, slots=True)
class Retention:
    """Which history versions a write drops in its own transaction (see `prune_condition`)."""

    keep_last: int | None
    cutoff: Any

    def params(self) -> dict[str, Any]:
        return {"keep_last": self.keep_last, "cutoff": self.cutoff}


@dataclass(frozen=True, slots=True)
class Erasure:
    """One user's erasure: where, when, why, and the receipt to record (if any)."""

    scope: Scope
    user_id: str
    at: Any
    cause: str = "delete"
    receipt_subject: str | None = None
    only_expired: bool = False
    notify: bool = False
    drop_data_key: bool = False
    checkpoint: bool = True
    """SQLite: checkpoint the WAL after this erasure's commit. A batch of erasures
    clears it and calls `checkpoint_erasures` once instead."""

    def key(self) -> dict[str, Any]:
        return self.scope.key(self.user_id)

    def feed_params(self, version: int) -> dict[str, Any]:
        return {
            **self.key(),
            "version": version,
            "created_at": self.at,
            "actor": None,
            "reason": None,
            "metadata": None,
        }

    def receipt_params(self, versions_erased: int) -> dict[str, Any]:
        return {
            "subject": self.receipt_subject,
            "tenant": self.scope.tenant,
            "namespace": self.scope.namespace,
            "created_at": self.at,
            "versions_erased": versions_erased,
            "cause": self.cause,
        }


@dataclass(frozen=True, slots=True)
class DataKeyRef:
    """The data key a write sealed its payload under, as the write must find it at commit.

    `new`: made for this write and not stored yet; the write stores it in its
    own transaction (so a write that fails leaves no key behind). Otherwise
    the write checks that the stored key is still this one (an erasure may
    have destroyed it since it was read). Either way, if not, the write rolls
    back and raises `DataKeyChanged`.
    """

    key_id: str
    wrapped_key: bytes
    new: bool
    created_at: Any

    def params(self, scope: Scope, user_id: str) -> dict[str, Any]:
        return {
            **scope.key(user_id),
            "key_id": self.key_id,
            "wrapped_key": self.wrapped_key,
            "created_at": self.created_at,
        }


class DataKeyChanged(Exception):
    """A write's data key was destroyed or replaced before it committed; nothing was written.

    The repository reseals the payload under the user's current key and
    writes again (see `RepositoryCore._write`); it never reaches callers.
    """


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """One validated write, ready for the database."""

    scope: Scope
    user_id: str
    schema_version: int
    payload: bytes
    created_at: Any
    expected_version: int | None = None
    idempotency_key: str | None = None
    actor: str | None = None
    reason: str | None = None
    metadata: bytes | None = None
    expires_at: Any = None
    retention: Retention | None = None
    notify: bool = False
    data_key: DataKeyRef | None = None

    def params(self) -> dict[str, Any]:
        scope = self.scope
        params = {
            "w_tenant": scope.tenant,
            "w_namespace": scope.namespace,
            "w_user_id": self.user_id,
            "w_schema_version": self.schema_version,
            "w_payload": self.payload,
            "w_created_at": self.created_at,
            "w_idempotency_key": self.idempotency_key,
            "w_actor": self.actor,
            "w_reason": self.reason,
            "w_metadata": self.metadata,
            "w_expires_at": self.expires_at,
            "expected_version": self.expected_version,
        }
        if self.retention is not None:
            params.update(self.retention.params())
        return params

    def keyed_params(self) -> dict[str, Any]:
        return {**self.scope.key(self.user_id), "idempotency_key": self.idempotency_key}


@dataclass(frozen=True, slots=True)
class PendingBatch:
    """Validated writes of many users (`upsert_many`), as parallel lists.

    Everything but the user, the schema version and the payload is the
    batch's, so nothing per write is built beyond the three values: at 500
    writes a call, per-write objects were a visible share of the call.
    """

    scope: Scope
    user_ids: list[str]
    schema_versions: list[int]
    payloads: list[bytes]
    created_at: Any
    actor: str | None = None
    reason: str | None = None
    metadata: bytes | None = None
    retention: Retention | None = None
    notify: bool = False
    data_keys: Mapping[str, DataKeyRef] | None = None
    """Encrypted batches: each user's data key (see `DataKeyRef`)."""

    def write(self, index: int) -> PendingWrite:
        """The batch's write number `index` on its own (for one-at-a-time paths)."""
        return PendingWrite(
            scope=self.scope,
            user_id=self.user_ids[index],
            schema_version=self.schema_versions[index],
            payload=self.payloads[index],
            created_at=self.created_at,
            actor=self.actor,
            reason=self.reason,
            metadata=self.metadata,
            retention=self.retention,
            notify=self.notify,
        )

    def distinct_users(self) -> bool:
        return len(set(self.user_ids)) == len(self.user_ids)


WriteOutcome = int | Row | None
"""The new version; the earlier row when the idempotency key was used before; None on a
compare-and-set that found another version."""


class Operations(Protocol):
    """What the repository needs from a backend; each call is one transaction or statement."""

    async def write(self, write: PendingWrite) -> WriteOutcome: ...
    async def latest(self, scope: Scope, user_id: str, now: Any) -> Row | None: ...
    async def history(self, scope: Scope, user_id: str, limit: int) -> list[Row]: ...
    async def current_version(self, scope: Scope, user_id: str) -> int: ...
    async def delete(self, erasure: Erasure) -> tuple[int, int]:
        """Erase the user; (versions erased, the last version) or (0, 0) if absent."""
        ...

    async def write_many(self, batch: PendingBatch) -> list[int]:
        """Store the batch in one transaction; the version of each write, in batch order."""
        ...

    async def latest_many(self, scope: Scope, user_ids: Sequence[str], now: Any) -> list[Row]: ...
    async def vacuum(self) -> None:
        """Reclaim dead rows of the snapshot tables now (Postgres VACUUM; SQLite checkpoint)."""
        ...

    async def checkpoint_erasures(self) -> None:
        """Leave no trace of erasures committed with `checkpoint=False`.

        SQLite (with `secure_delete`): the WAL checkpoint each erasure would have
        run; a failure is logged, since the erasures stand. Postgres: nothing.
        """
        ...

    async def finish_erasures(self, wait: float) -> bool:
        """Complete what committed erasures left to do, waiting up to `wait` s for readers.

        SQLite: the WAL truncation that readers held up (see `_truncate_wal`);
        True when none is pending. Postgres: nothing to do (dead tuples are
        VACUUM's, see `erase(vacuum=True)`), so True.
        """
        ...

    async def fetch(self, statement: ClauseElement, params: Mapping[str, Any]) -> list[Any]: ...
    async def execute_in_transaction(
        self, work: Sequence[tuple[ClauseElement, Mapping[str, Any]]]
    ) -> list[int]:
        """Run the statements in order in one write transaction; their row counts."""
        ...

    def decode_snapshot_row(self, raw: Sequence[Any]) -> Row: ...
    async def release(self) -> None: ...
    def keep_connections(self, count: int) -> None: ...


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A Core statement compiled for one dialect, with its positional parameters."""

    sql: str
    names: tuple[str, ...]
    defaults: Mapping[str, Any]
    processors: Mapping[str, Callable[[Any], Any]]
    _pick: Callable[[Mapping[str, Any]], tuple[Any, ...]] = field(init=False, repr=False)
    _converting: tuple[tuple[int, Callable[[Any], Any]], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = self.names
        pick: Callable[[Mapping[str, Any]], tuple[Any, ...]]
        if len(names) > 1:
            pick = itemgetter(*names)
        else:  # itemgetter of one name returns the value itself, of none fails
            pick = lambda values: tuple(values[name] for name in names)  # noqa: E731
        converting = tuple(
            (position, self.processors[name])
            for position, name in enumerate(names)
            if name in self.processors
        )
        object.__setattr__(self, "_pick", pick)
        object.__setattr__(self, "_converting", converting)

    def stored_args(self, stored: Mapping[str, Any]) -> tuple[Any, ...]:
        """Positional values taken as they are: `stored` came from the database already."""
        return tuple(stored[n] if n in stored else self.defaults[n] for n in self.names)

    def args_many(
        self, shared: Mapping[str, Any], varying: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> list[tuple[Any, ...]]:
        """Positional values of one execution per row of `rows` (for `executemany`).

        The executions bind the same `shared` values except for the names in
        `varying`, which take each row's values, in that order. Converting the
        shared values once is what makes this cheaper than `args` per row.
        """
        template = list(self.args(shared))
        slots = [(self.names.index(name), self.processors.get(name)) for name in varying]
        executions = []
        for row in rows:
            for (position, process), value in zip(slots, row, strict=True):
                template[position] = value if process is None or value is None else process(value)
            executions.append(tuple(template))
        return executions

    def args(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        """Positional values for `params`, defaults filled in, converted for the driver.

        Picked by one `itemgetter` from the defaults overlaid with `params`, then
        only the few converting positions touched: a write binds 14 values, and
        a Python loop over them was a tenth of the library's CPU per write.
        """
        values = self._pick({**self.defaults, **params})
        if not self._converting:
            return values
        converted = list(values)
        for position, process in self._converting:
            if converted[position] is not None:
                converted[position] = process(converted[position])
        return tuple(converted)


def _compile(statement: ClauseElement, dialect: Dialect) -> _Compiled:
    compiled = statement.compile(dialect=dialect)
    assert isinstance(compiled, SQLCompiler)
    processors = {}
    for name, bind in compiled.binds.items():
        processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            processors[name] = processor
    return _Compiled(
        sql=compiled.string,
        names=tuple(compiled.positiontup or ()),
        defaults={name: bind.effective_value for name, bind in compiled.binds.items()},
        processors=processors,
    )


def row_decoder(
    dialect: Dialect, columns: Sequence[ColumnElement[Any]]
) -> Callable[[Sequence[Any]], Row]:
    """Converts raw driver rows of `columns` with SQLAlchemy's result processors."""
    processors = [
        column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
    ]

    converting = [(index, process) for index, process in enumerate(processors) if process]

    def decode(raw: Sequence[Any]) -> Row:
        # Only the few columns with a processor are touched (per row, on the hot path).
        values = list(raw)
        for index, process in converting:
            if values[index] is not None:
                values[index] = process(values[index])
        return tuple(values)

    return decode


def is_retryable(exc: BaseException) -> bool:
    """Whether `exc` says the connection was lost, so that repeating a read is safe and useful.

    Cancellation and timeouts are not: the caller asked to stop.
    """
    return isinstance(exc, ConnectionLostError)


def _is_disconnect(exc: BaseException, driver_connection: Any) -> bool:
    """Whether the connection must never be handed out again after `exc`."""
    if isinstance(exc, asyncio.CancelledError | TimeoutError | OSError):
        return True  # interrupted mid-protocol, or the socket failed: state unknown
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.PostgresConnectionError):
        return True
    if isinstance(exc, InternalClientError):  # the protocol state is corrupt
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


class _Connections:
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

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._kept: list[Any] = []
        self.keep = 0
        self._keep_while_busy = 0
        self._turns: Turns | None = None
        pool = engine.sync_engine.pool
        self._size = pool.size() if isinstance(pool, QueuePool) else 0
        overflow: int = getattr(pool, "_max_overflow", -1)
        # None: no limit to admit against (overflow unbounded, or not a queue pool).
        self._capacity = self._size + overflow if self._size and overflow >= 0 else None
        self._pool_timeout: float = getattr(pool, "_timeout", 30.0)

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
        except asyncio.CancelledError as cancelled:
            _deadlines.stop(deadline)
            if deadline.expired_for(type(cancelled)):
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
        keep = exc is None or not _is_disconnect(exc, fairy.driver_connection)
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
            record = fairy._connection_record
            closed = getattr(fairy.driver_connection, "is_closed", None)
            if (
                fairy.is_valid
                and record is not None
                and record.starttime >= pool._invalidate_time
                and not (closed and closed())
            ):
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
        await greenlet_spawn(self._engine.sync_engine.pool._invalidate, fairy, exc)
        while self._kept:  # same generation: dead too
            await greenlet_spawn(self._kept.pop().close)
        raise ConnectionLostError(
            f"the database connection was lost ({describe(exc)}); a write's outcome is "
            "unknown: retry it with the same idempotency key"
        ) from exc


class _Checkout:
    """One use of a connection of `_Connections`, as `async with`.

    A class rather than an `asynccontextmanager`: every operation goes
    through it, and the generator machinery costs a few microseconds a call.
    """

    __slots__ = ("_connections", "_fairy")

    def __init__(self, connections: _Connections) -> None:
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


def operations_for(engine: AsyncEngine) -> Operations:
    """The backend operations for `engine`'s dialect (Postgres or SQLite)."""
    if engine.dialect.name == "postgresql":
        return _PostgresOperations(engine)
    return _SqliteOperations(engine)


class _SharedStatements:
    """The statements both backends compile alike (set by `_compile_shared`)."""

    _engine: AsyncEngine
    _connections: _Connections

    @property
    def kept_connections(self) -> int:
        """Idle connections held for reuse between operations (see `_Connections`)."""
        return self._connections.kept

    async def release(self) -> None:
        """Return the kept connections to the pool (before the engine is disposed)."""
        await self._connections.release()

    def keep_connections(self, count: int) -> None:
        """Keep up to `count` idle connections between operations (see `_Connections`)."""
        self._connections.keep_up_to(count)

    _decode: Callable[[Sequence[Any]], Row]
    _prepared: dict[int, tuple[ClauseElement, _Compiled]]

    def decode_snapshot_row(self, raw: Sequence[Any]) -> Row:
        """Convert a raw row of `ROW_COLUMNS` (from `fetch`) like the built-in reads do."""
        return self._decode(raw)

    def _compiled(self, statement: ClauseElement) -> _Compiled:
        """`statement` compiled once per backend (statements are module-level singletons)."""
        hit = self._prepared.get(id(statement))
        if hit is None or hit[0] is not statement:
            hit = (statement, _compile(statement, self._engine.dialect))
            self._prepared[id(statement)] = hit
        return hit[1]

    _keyed: _Compiled
    _latest: _Compiled
    _expiry: Callable[[Any], Any]
    _history_tail: tuple[Any, ...]
    _history: _Compiled
    _version: _Compiled
    _latest_many: _Compiled


def _compile_shared(target: _SharedStatements, dialect: Dialect) -> None:
    name: DialectName = "postgresql" if dialect.name == "postgresql" else "sqlite"
    target._prepared = {}
    target._keyed = _compile(idempotent_write_statement(), dialect)
    target._latest = _compile(latest_statement(), dialect)
    target._history = _compile(history_statement(), dialect)
    # The two hottest reads bind their values positionally, without a dict (see
    # `latest`); what a dialect adds after them (SQLite: OFFSET 0) is constant.
    history_names = target._history.names
    if target._latest.names != _KEY_ARGS or history_names[:4] != (*_KEY_ARGS, "limit"):
        raise AssertionError("latest/history statements bind other parameters than expected")
    target._history_tail = tuple(target._history.defaults[n] for n in history_names[4:])
    target._expiry = _result_processor(latest_table.c.expires_at, dialect)
    target._version = _compile(version_statement(), dialect)
    target._latest_many = _compile(latest_many_statement(name), dialect)


_KEY_ARGS = ("tenant", "namespace", "user_id")


def _result_processor(column: ColumnElement[Any], dialect: Dialect) -> Callable[[Any], Any]:
    """How `dialect` turns a raw value of `column` into its Python value."""
    process = column.type.dialect_impl(dialect).result_processor(dialect, None)
    return process if process is not None else (lambda value: value)


def expired(expires_at: Any, now: datetime) -> bool:
    """Whether a latest row with this (decoded) expiry reads as absent at `now`."""
    return expires_at is not None and expires_at <= now


def _compile_all(statements: Sequence[ClauseElement], dialect: Dialect) -> tuple[_Compiled, ...]:
    return tuple(_compile(statement, dialect) for statement in statements)


class _PostgresOperations(_SharedStatements):
    """asyncpg: each single-statement operation is one round trip, autocommitted."""

    def __init__(self, engine: AsyncEngine) -> None:
        dialect = engine.dialect
        self._engine = engine
        self._connections = _Connections(engine)
        self._decode = row_decoder(dialect, [latest_table.c[name] for name in ROW_COLUMNS])
        self._writes = {
            mode: _compile(postgres_write_statement(mode), dialect)
            for mode in ("upsert", "create", "replace")
        }
        self._write_many = _compile(postgres_bulk_write_statement(distinct_users=True), dialect)
        self._erase = _compile(postgres_erase_statement(), dialect)
        self._claim_key = _compile(claim_key_statement("postgresql"), dialect)
        self._hold_key = _compile(hold_key_statement(), dialect)
        _compile_shared(self, dialect)

    async def write_many(self, batch: PendingBatch) -> list[int]:
        distinct_users = batch.distinct_users()
        user_ids, schema_versions, payloads = (
            sorted_batch(batch.user_ids, batch.schema_versions, batch.payloads)
            if distinct_users  # the statement upserts in array order: the lock order
            else (batch.user_ids, batch.schema_versions, batch.payloads)
        )
        params = {
            "user_ids": user_ids,
            "schema_versions": schema_versions,
            "payloads": payloads,
            "created_at": batch.created_at,
            "tenant": batch.scope.tenant,
            "namespace": batch.scope.namespace,
            "actor": batch.actor,
            "reason": batch.reason,
            "metadata": batch.metadata,
        }
        if batch.retention is not None:
            params.update(batch.retention.params())
        statement = (
            self._write_many
            if distinct_users and not batch.notify and batch.retention is None
            else self._compiled(
                postgres_bulk_write_statement(
                    notifying=batch.notify,
                    prune=batch.retention is not None,
                    distinct_users=distinct_users,
                )
            )
        )
        async with self._connections.checkout() as conn:
            if batch.data_keys is None:
                rows = await conn.fetch(statement.sql, *statement.args(params))
            else:
                async with conn.transaction():
                    rows = await conn.fetch(statement.sql, *statement.args(params))
                    for user_id in sorted(batch.data_keys):  # the order the batch locked in
                        await self._keep_key(conn, batch.scope, user_id, batch.data_keys[user_id])
        return _versions_in_input_order(batch.user_ids, rows, distinct_users)

    async def _keep_key(self, conn: Any, scope: Scope, user_id: str, key: DataKeyRef) -> None:
        """Store or share-lock the write's data key after its write (see `DataKeyRef`).

        Inside the write's transaction, after the write statement locked the
        latest row: an erasure locks the latest row, then deletes the key, so
        the two never wait for each other in opposite orders.
        """
        statement = self._claim_key if key.new else self._hold_key
        if await conn.fetchval(statement.sql, *statement.args(key.params(scope, user_id))) is None:
            raise DataKeyChanged

    async def latest_many(self, scope: Scope, user_ids: Sequence[str], now: Any) -> list[Row]:
        params = {
            "tenant": scope.tenant,
            "namespace": scope.namespace,
            "user_ids": list(user_ids),
            "now": now,
        }
        args = self._latest_many.args(params)
        async with self._connections.checkout() as conn:
            rows = await conn.fetch(self._latest_many.sql, *args)
        return [self._decode(raw) for raw in rows]

    async def write(self, write: PendingWrite) -> WriteOutcome:
        mode = write_mode(write.expected_version)
        statement = (
            self._writes[mode]
            if write.retention is None and not write.notify
            else self._compiled(
                postgres_write_statement(
                    mode, prune=write.retention is not None, notifying=write.notify
                )
            )
        )
        async with self._connections.checkout() as conn:
            try:
                if write.data_key is None:
                    version = await conn.fetchval(statement.sql, *statement.args(write.params()))
                else:
                    async with conn.transaction():
                        version = await conn.fetchval(
                            statement.sql, *statement.args(write.params())
                        )
                        if version is not None:
                            await self._keep_key(conn, write.scope, write.user_id, write.data_key)
            except asyncpg.UniqueViolationError:
                # The unique (user_id, idempotency_key) index refused a replay and the
                # statement wrote nothing; any other unique violation is a real error.
                if write.idempotency_key is None:
                    raise
                version = None
            if version is not None or write.idempotency_key is None:
                return int(version) if version is not None else None
            earlier = await conn.fetchrow(self._keyed.sql, *self._keyed.args(write.keyed_params()))
        return None if earlier is None else self._decode(earlier)

    async def fetch(self, statement: ClauseElement, params: Mapping[str, Any]) -> list[Any]:
        compiled = self._compiled(statement)
        async with self._connections.checkout() as conn:
            return list(await conn.fetch(compiled.sql, *compiled.args(params)))

    async def execute_in_transaction(
        self, work: Sequence[tuple[ClauseElement, Mapping[str, Any]]]
    ) -> list[int]:
        counts = []
        async with self._connections.checkout() as conn, conn.transaction():
            for statement, params in work:
                compiled = self._compiled(statement)
                status: str = await conn.execute(compiled.sql, *compiled.args(params))
                last = status.rsplit(" ", 1)[-1]
                counts.append(int(last) if last.isdigit() else 0)
        return counts

    async def latest(self, scope: Scope, user_id: str, now: Any) -> Row | None:
        async with self._connections.checkout() as conn:
            raw = await conn.fetchrow(self._latest.sql, scope.tenant, scope.namespace, user_id)
        if raw is None or expired(raw[-1], now):
            return None
        return self._decode(raw[:-1])

    async def history(self, scope: Scope, user_id: str, limit: int) -> list[Row]:
        async with self._connections.checkout() as conn:
            rows = await conn.fetch(
                self._history.sql,
                scope.tenant,
                scope.namespace,
                user_id,
                limit,
                *self._history_tail,
            )
        return [self._decode(raw) for raw in rows]

    async def current_version(self, scope: Scope, user_id: str) -> int:
        async with self._connections.checkout() as conn:
            version = await conn.fetchval(
                self._version.sql, *self._version.args(scope.key(user_id))
            )
        return int(version or 0)

    async def delete(self, erasure: Erasure) -> tuple[int, int]:
        params = {
            **erasure.key(),
            "at": erasure.at,
            "only_expired": erasure.only_expired,
            "subject": erasure.receipt_subject,
            "cause": erasure.cause,
            "drop_data_key": erasure.drop_data_key,
            "notify": erasure.notify,
        }
        async with self._connections.checkout() as conn:
            # One statement under autocommit: the function's work commits or rolls back whole.
            erased, version = await conn.fetchrow(self._erase.sql, *self._erase.args(params))
        return (int(erased), int(version)) if version else (0, 0)

    async def vacuum(self) -> None:
        async with self._connections.checkout() as conn:
            # Outside a transaction (asyncpg autocommits); removes the dead tuples that
            # still hold erased rows' bytes until autovacuum would have.
            await conn.execute("VACUUM snapshot_latest, snapshot_history, snapshot_changes")

    async def checkpoint_erasures(self) -> None:
        """Nothing: Postgres erasures leave dead tuples to VACUUM (`erase(vacuum=True)`)."""

    async def finish_erasures(self, wait: float) -> bool:
        """Nothing pending: an erasure is complete when it commits (see `Operations`)."""
        return True


def _versions_in_input_order(
    user_ids: Sequence[str], rows: Sequence[Any], distinct_users: bool
) -> list[int]:
    """Give each write its version: a user's versions, ascending, in the order of its writes."""
    if distinct_users:
        by_id = dict(rows)  # one version per user
        return [int(by_id[user_id]) for user_id in user_ids]
    by_user: dict[str, list[int]] = {}
    for user_id, version in rows:
        by_user.setdefault(user_id, []).append(int(version))
    for versions in by_user.values():
        versions.sort(reverse=True)
    return [by_user[user_id].pop() for user_id in user_ids]


def _append_history(
    conn: sqlite3.Connection, history_append: _Compiled, feed_entry: _Compiled, written: Any
) -> int:
    """Append the row the latest write returned to history and the feed, exactly as stored.

    Returns the row's version.
    """
    stored = dict(zip(STORED_COLUMNS, written, strict=True))
    conn.execute(history_append.sql, history_append.stored_args(stored))
    conn.execute(feed_entry.sql, feed_entry.stored_args(stored))
    return int(stored["version"])


def _truncate_wal(conn: sqlite3.Connection, wait_ms: int, busy_ms: int) -> bool:
    """Copy the WAL into the database file and truncate the WAL to nothing; True if done.

    With `secure_delete` on (see `engine`), the freed cells of an erasure are
    zeroed in the pages it writes; the WAL still holds the frames that wrote
    the erased rows, and the main file their old pages, until this checkpoint.

    A truncating checkpoint must wait for every reader of an older snapshot
    (a backup, a long report) and blocks new writers while it waits, so it
    waits at most `wait_ms` (0 after a write: other users' writes never queue
    behind a reader), then gives up, leaving what it could not copy for a
    later attempt. `busy_ms` is the connection's own busy timeout, restored after.
    """
    conn.execute(f"PRAGMA busy_timeout = {wait_ms}")
    try:
        busy, _log, _moved = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
    return not busy


def _truncate_committed(conn: sqlite3.Connection, wait_ms: int, busy_ms: int) -> bool:
    """`_truncate_wal` after erasures have committed; a failure is logged, not raised."""
    try:
        return _truncate_wal(conn, wait_ms, busy_ms)
    except (sqlite3.Error, OSError) as exc:
        # The erasures committed; only the WAL still holds the old bytes.
        logger.warning("snapshot_repo: WAL checkpoint after an erasure failed: %s", exc)
        return False


class _Commit:
    """Whether a write transaction running on a connection's thread may still commit.

    The caller's deadline cancels the awaiting task, but not the function
    running on the connection's thread: without this, a write reported as
    timed out could commit a moment later, and a caller retrying it without
    an idempotency key would write twice. Whichever comes first wins, under a
    lock: the thread starting COMMIT, or the caller abandoning the write.
    """

    __slots__ = ("_lock", "_state")

    _RUNNING, _COMMITTING, _ABANDONED = range(3)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = self._RUNNING

    def begin(self) -> None:
        """Called by the thread before COMMIT; raises `_Abandoned` if the caller gave up."""
        with self._lock:
            if self._state == self._ABANDONED:
                raise _Abandoned
            self._state = self._COMMITTING

    def abandon(self) -> bool:
        """Called by a caller that stops waiting: True if the write can no longer commit."""
        with self._lock:
            if self._state == self._COMMITTING:
                return False
            self._state = self._ABANDONED
            return True


class _Abandoned(Exception):
    """The caller stopped waiting before COMMIT: the transaction was rolled back."""


_TRUNCATE_RETRY_SECONDS = 1.0
"""While an erasure's WAL truncation is pending, how often later writes try again."""


class _SqliteOperations(_SharedStatements):
    """aiosqlite: every write is one function on the connection's thread; reads run inline.

    Writes of one repository queue on an `asyncio.Lock` so that concurrent
    tasks take turns in order instead of polling SQLite's lock; writers in
    other processes or repositories wait on `BEGIN IMMEDIATE` and the busy timeout.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        dialect = engine.dialect
        self._engine = engine
        self._connections = _Connections(engine)
        self._decode = row_decoder(dialect, [latest_table.c[name] for name in ROW_COLUMNS])
        self._write_lock = asyncio.Lock()
        self._writes = {
            mode: _compile_all(sqlite_write_statements(mode), dialect)
            for mode in ("upsert", "create", "replace")
        }
        self._bulk_writes = _compile_all(sqlite_bulk_write_statements(), dialect)
        # A write's retention runs as its own statement here (Postgres: inside the write).
        self._prune = _compile(prune_statement("sqlite"), dialect)
        settings = engine_settings(engine)
        self._erase_without_trace = settings.sqlite_secure_delete
        self._inline_reads = settings.sqlite_inline_reads
        self._busy_ms = int(settings.busy_timeout * 1000)
        # An erasure committed, but readers kept its WAL frames from being truncated:
        # later writes retry (no sooner than this `time.monotonic()`), as do
        # `finish_erasures` and the repository's `close()`.
        self.traces_pending = False
        self._next_truncation = 0.0
        # An erasure's statements (Postgres: one function call, see `postgres_erase_statement`).
        self._delete_latest, self._delete_history = _compile_all(delete_statements(), dialect)
        self._delete_expired = _compile(delete_statements(only_expired=True)[0], dialect)
        self._receipt = _compile(receipt_statement(), dialect)
        self._forget_key = _compile(forget_key_statement(), dialect)
        self._forget_feed, self._erasure_entry = _compile_all(
            sqlite_erasure_feed_statements(), dialect
        )
        self._claim_key = _compile(claim_key_statement("sqlite"), dialect)
        self._hold_key = _compile(hold_key_statement(), dialect)
        _compile_shared(self, dialect)

    async def write_many(self, batch: PendingBatch) -> list[int]:
        if batch.distinct_users():
            return await self._write_distinct_users(batch)
        latest_write, history_append, feed_entry = self._writes["upsert"]
        prune = self._prune
        writes = [batch.write(index) for index in range(len(batch.user_ids))]

        def run(conn: sqlite3.Connection) -> list[int]:
            versions = []
            for write in writes:
                written = conn.execute(latest_write.sql, latest_write.args(write.params()))
                versions.append(
                    _append_history(conn, history_append, feed_entry, written.fetchone())
                )
                if write.retention is not None:
                    params = {**write.scope.key(write.user_id), **write.retention.params()}
                    conn.execute(prune.sql, prune.args(params))
            self._keep_keys(conn, batch)
            return versions

        return await self._in_write_transaction(run)

    async def _write_distinct_users(self, batch: PendingBatch) -> list[int]:
        """A batch without repeated users, set-based (see `sqlite_bulk_write_statements`)."""
        upsert, history_copy, feed_copy = self._bulk_writes
        user_ids, scope, retention = batch.user_ids, batch.scope, batch.retention
        upserts = upsert.args_many(
            batch.write(0).params(),  # the values every write of the batch shares
            ("w_user_id", "w_schema_version", "w_payload"),
            list(zip(user_ids, batch.schema_versions, batch.payloads, strict=True)),
        )
        copied = {**scope.key(user_ids[0]), "user_ids_json": json.dumps(user_ids)}
        prune = self._prune
        prunes = (
            []
            if retention is None
            else [prune.args({**scope.key(user), **retention.params()}) for user in user_ids]
        )

        def run(conn: sqlite3.Connection) -> list[int]:
            conn.executemany(upsert.sql, upserts)
            versions = dict(conn.execute(history_copy.sql, history_copy.args(copied)).fetchall())
            conn.execute(feed_copy.sql, feed_copy.args(copied))
            if prunes:
                conn.executemany(prune.sql, prunes)
            self._keep_keys(conn, batch)
            return [int(versions[user_id]) for user_id in user_ids]

        return await self._in_write_transaction(run)

    async def latest_many(self, scope: Scope, user_ids: Sequence[str], now: Any) -> list[Row]:
        params = {
            "tenant": scope.tenant,
            "namespace": scope.namespace,
            "user_ids_json": json.dumps(list(user_ids)),
            "now": now,
        }
        rows = await self._fetch(self._latest_many, params)
        return [self._decode(raw) for raw in rows]

    async def write(self, write: PendingWrite) -> WriteOutcome:
        latest_write, history_append, feed_entry = self._writes[write_mode(write.expected_version)]
        keyed, prune = self._keyed, self._prune

        def run(conn: sqlite3.Connection) -> WriteOutcome:
            if write.idempotency_key is not None:
                # Under the write lock nothing can race this lookup.
                earlier = conn.execute(keyed.sql, keyed.args(write.keyed_params())).fetchone()
                if earlier is not None:
                    return self._decode(earlier)
            written = conn.execute(latest_write.sql, latest_write.args(write.params())).fetchone()
            if written is None:
                return None
            version = _append_history(conn, history_append, feed_entry, written)
            if write.retention is not None:
                params = {**write.scope.key(write.user_id), **write.retention.params()}
                conn.execute(prune.sql, prune.args(params))
            if write.data_key is not None:
                self._keep_key(conn, write.scope, write.user_id, write.data_key)
            return version

        return await self._in_write_transaction(run)

    def _keep_key(
        self, conn: sqlite3.Connection, scope: Scope, user_id: str, key: DataKeyRef
    ) -> None:
        """Store or find the write's data key in its transaction (see `DataKeyRef`).

        Under the write lock nothing can change the key between this and COMMIT.
        """
        statement = self._claim_key if key.new else self._hold_key
        if (
            conn.execute(statement.sql, statement.args(key.params(scope, user_id))).fetchone()
            is None
        ):
            raise DataKeyChanged

    def _keep_keys(self, conn: sqlite3.Connection, batch: PendingBatch) -> None:
        if batch.data_keys is not None:
            for user_id, key in batch.data_keys.items():
                self._keep_key(conn, batch.scope, user_id, key)

    async def latest(self, scope: Scope, user_id: str, now: Any) -> Row | None:
        rows = await self._rows(self._latest.sql, (scope.tenant, scope.namespace, user_id))
        if not rows:
            return None
        raw = rows[0]
        expires_at = raw[-1]
        if expires_at is not None and expired(self._expiry(expires_at), now):
            return None
        return self._decode(raw[:-1])

    async def history(self, scope: Scope, user_id: str, limit: int) -> list[Row]:
        args = (scope.tenant, scope.namespace, user_id, limit, *self._history_tail)
        return [self._decode(raw) for raw in await self._rows(self._history.sql, args)]

    async def current_version(self, scope: Scope, user_id: str) -> int:
        rows = await self._fetch(self._version, scope.key(user_id))
        return int(rows[0][0]) if rows else 0

    async def delete(self, erasure: Erasure) -> tuple[int, int]:
        delete_latest = self._delete_expired if erasure.only_expired else self._delete_latest
        delete_history, receipt, forget_key = self._delete_history, self._receipt, self._forget_key
        forget_feed, erasure_entry = self._forget_feed, self._erasure_entry
        key = erasure.key()

        def run(conn: sqlite3.Connection) -> tuple[int, int]:
            found = conn.execute(delete_latest.sql, delete_latest.args({**key, "now": erasure.at}))
            row = found.fetchone()
            found.close()
            if row is None:
                if erasure.drop_data_key and not erasure.only_expired:
                    # A key without rows (an older release's failed write): still personal data.
                    conn.execute(forget_key.sql, forget_key.args(key))
                return 0, 0
            args = delete_history.args({**key, "version": row[0]})
            erased: int = conn.execute(delete_history.sql, args).rowcount
            conn.execute(forget_feed.sql, forget_feed.args(key))
            conn.execute(erasure_entry.sql, erasure_entry.args(erasure.feed_params(row[0])))
            if erasure.receipt_subject is not None:
                conn.execute(receipt.sql, receipt.args(erasure.receipt_params(erased)))
            if erasure.drop_data_key:
                conn.execute(forget_key.sql, forget_key.args(key))
            return erased, int(row[0])

        # Truncating the WAL in the same hop, right after the commit and still under
        # the write lock, saves a second thread hop and lock wait per erasure.
        checkpoint = self._erase_without_trace and erasure.checkpoint
        return await self._in_write_transaction(
            run, self._truncate_after_erasure if checkpoint else None
        )

    async def vacuum(self) -> None:
        """Truncate the WAL now, waiting for readers as long as the call's deadline allows."""
        await self._truncate_now(self._busy_ms)

    async def checkpoint_erasures(self) -> None:
        if self._erase_without_trace:
            await self._truncate_now(0)

    async def finish_erasures(self, wait: float) -> bool:
        if self.traces_pending:
            await self._truncate_now(int(wait * 1000))
        return not self.traces_pending

    async def _truncate_now(self, wait_ms: int) -> None:
        left = _deadlines.remaining()
        if left is not None:
            wait_ms = min(wait_ms, int(left * 1000))

        def truncate(conn: sqlite3.Connection) -> None:
            self._note_truncation(_truncate_committed(conn, wait_ms, self._busy_ms))

        async with self._write_lock, self._connections.checkout() as aconn:
            await aconn._execute(truncate, aconn._conn)

    def _truncate_after_erasure(self, conn: sqlite3.Connection, outcome: tuple[int, int]) -> None:
        """After an erasure's commit: truncate the WAL without waiting for any reader."""
        if outcome[0] or self.traces_pending:
            self._note_truncation(_truncate_committed(conn, 0, self._busy_ms))

    def _truncate_if_pending(self, conn: sqlite3.Connection, _result: object) -> None:
        """After any write's commit: retry a pending truncation, at most once a second."""
        if self.traces_pending and time.monotonic() >= self._next_truncation:
            self._note_truncation(_truncate_committed(conn, 0, self._busy_ms))

    def _note_truncation(self, done: bool) -> None:
        if done:
            self.traces_pending = False
            return
        if not self.traces_pending:
            logger.warning(
                "snapshot_repo: an erasure committed, but readers hold old snapshots of the "
                "SQLite file, so the WAL still holds the erased bytes; later writes, "
                "finish_erasures() and close() truncate it once the readers are done"
            )
        self.traces_pending = True
        self._next_truncation = time.monotonic() + _TRUNCATE_RETRY_SECONDS

    async def fetch(self, statement: ClauseElement, params: Mapping[str, Any]) -> list[Any]:
        return await self._fetch(self._compiled(statement), params)

    async def execute_in_transaction(
        self, work: Sequence[tuple[ClauseElement, Mapping[str, Any]]]
    ) -> list[int]:
        prepared = [(self._compiled(statement), params) for statement, params in work]

        def run(conn: sqlite3.Connection) -> list[int]:
            return [conn.execute(c.sql, c.args(params)).rowcount for c, params in prepared]

        return await self._in_write_transaction(run)

    async def _fetch(self, statement: _Compiled, params: Mapping[str, Any]) -> list[Any]:
        return await self._rows(statement.sql, statement.args(params))

    async def _rows(self, sql: str, args: Sequence[Any]) -> list[Any]:
        """Every row of the read `sql`: on the loop's thread if allowed (see the module doc).

        Why it may hold the loop: the hop costs the loop more than the read.
        Measured for `get_latest`'s statement (1 KB states, warm cache): 17 to
        18 µs of the loop thread's CPU per read in all when inline, against 42
        to 43 µs of its CPU (70 to 75 µs of latency) for the hop to the
        connection's thread and back. In WAL mode a reader never waits for
        writers or checkpoints: it waits (on the busy handler) only while
        another process holds the file exclusively, to recover it after a
        crash or in `locking_mode=EXCLUSIVE`.

        An inline read still yields to the loop once, after giving the
        connection back (3 µs), as the hop did: a task reading in a loop
        cannot starve the others, and a cancellation lands there.
        """
        async with self._connections.checkout() as conn:
            rows = self._inline_rows(conn, sql, args) if self._inline_reads else None
            if rows is None:
                return list(await conn.execute_fetchall(sql, args))
        await asyncio.sleep(0)
        return rows

    def _inline_rows(self, conn: Any, sql: str, args: Sequence[Any]) -> list[Any] | None:
        """`sql`'s rows, read on this thread; None if the connection is bound to its own."""
        try:
            rows: list[Any] = conn._conn.execute(sql, args).fetchall()
        except sqlite3.ProgrammingError as exc:
            if "thread" not in str(exc):
                raise
            # Opened with check_same_thread (an application's engine, or SQLAlchemy's
            # for :memory:): this engine's reads hop from now on.
            self._inline_reads = False
            return None
        return rows

    async def _in_write_transaction(
        self,
        work: Callable[[sqlite3.Connection], _T],
        after_commit: Callable[[sqlite3.Connection, _T], None] | None = None,
    ) -> _T:
        """Run `work` inside BEGIN IMMEDIATE ... COMMIT on the connection's thread, in one hop.

        Any failure, commit included, rolls the whole transaction back before
        it is raised: SQLite versions differ in what they roll back by themselves
        (a full disk may end a transaction or only a statement). `after_commit`,
        if given, runs next in the same hop with the result; it must not raise.
        Without it, a pending WAL truncation is retried there.

        Bounded by the call's deadline: the wait for another process's write
        lock (SQLite's busy timeout) is cut to the time the call has left, and
        a call cancelled before COMMIT began (its deadline passed) rolls the
        transaction back instead of committing after the caller was told it
        timed out (see `_Commit`).
        """
        left = _deadlines.remaining()
        busy_ms = self._busy_ms if left is None else min(self._busy_ms, int(left * 1000))
        commit = _Commit()
        finish = after_commit if after_commit is not None else self._truncate_if_pending

        def transaction(conn: sqlite3.Connection) -> _T:
            if busy_ms < self._busy_ms:
                conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
            try:
                conn.execute("BEGIN IMMEDIATE")
            finally:
                if busy_ms < self._busy_ms:
                    conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            try:
                result = work(conn)
                commit.begin()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finish(conn, result)
            return result

        async with self._write_lock, self._connections.checkout() as aconn:
            try:
                # aiosqlite's own "run on the connection thread" entry point; see the module doc.
                result: _T = await aconn._execute(transaction, aconn._conn)
            except asyncio.CancelledError:
                commit.abandon()  # False only while COMMIT runs: the outcome is unknown
                raise
            return result
