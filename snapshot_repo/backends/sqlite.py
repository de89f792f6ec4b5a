"""SQLite through aiosqlite: every write is one function on the connection's thread.

- A whole write transaction (BEGIN IMMEDIATE, the statements, COMMIT or
  ROLLBACK) runs as one function on the connection's thread: one hop. This
  uses aiosqlite's `_execute`, its internal "run this on the connection
  thread" entry point, because its public API has no way to run several
  statements in one hop (looked up once in `_privates`).
- Reads run on the event loop's thread, on the same checked-out
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
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

from sqlalchemy import ClauseElement, Executable
from sqlalchemy.ext.asyncio import AsyncEngine

from .. import _deadlines
from .._translate import register_driver_errors
from ..engine import EngineSettings, engine_settings, install_sqlite_settings
from ._compiled import (
    Compiled,
    SharedStatements,
    compile_all,
    compile_shared,
    compile_statement,
    expired,
    snapshot_row_decoder,
)
from ._pool import Connections
from ._privates import run_on_thread, sqlite_connection
from .count_sql import fold_statements
from .feed_sql import changes_since_statement
from .sqlite_commit import Commit, pending_truncation, truncate_committed
from .sqlite_sql import sqlite_bulk_write_statements, sqlite_write_statements
from .statements import (
    SCAN,
    STORED_COLUMNS,
    claim_key_statement,
    delete_statements,
    forget_key_statement,
    hold_key_statement,
    prune_statement,
    receipt_statement,
    sqlite_erasure_feed_statements,
    write_mode,
)
from .values import (
    DataKeyChanged,
    DataKeyRef,
    Erasure,
    PendingBatch,
    PendingWrite,
    Row,
    Scope,
    WriteOutcome,
)

__all__ = ["SqliteBackend"]

register_driver_errors(sqlite3.Error)

_T = TypeVar("_T")
logger = logging.getLogger("snapshot_repo")


def _append_history(
    conn: sqlite3.Connection, history_append: Compiled, feed_entry: Compiled, written: Any
) -> int:
    """Append the row the latest write returned to history and the feed, exactly as stored.

    Returns the row's version.
    """
    stored = dict(zip(STORED_COLUMNS, written, strict=True))
    conn.execute(history_append.sql, history_append.stored_args(stored))
    conn.execute(feed_entry.sql, feed_entry.stored_args(stored))
    return int(stored["version"])


class SqliteBackend(SharedStatements):
    """aiosqlite: every write is one function on the connection's thread; reads run inline.

    Writes of one repository queue on an `asyncio.Lock` so that concurrent
    tasks take turns in order instead of polling SQLite's lock; writers in
    other processes or repositories wait on `BEGIN IMMEDIATE` and the busy timeout.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        install_sqlite_settings(engine, EngineSettings())  # the write path needs them; idempotent
        dialect = engine.dialect
        self._engine = engine
        self.notifies = False
        self.prune_statement = prune_statement("sqlite")
        self.fold_statements = fold_statements("sqlite")
        self.changes_since_statement = changes_since_statement("sqlite")
        self.claim_key_statement = claim_key_statement("sqlite")
        self._connections = Connections(engine)
        self._decode = snapshot_row_decoder(dialect)
        self._write_lock = asyncio.Lock()
        self._writes = {
            mode: compile_all(sqlite_write_statements(mode), dialect)
            for mode in ("upsert", "create", "replace")
        }
        self._bulk_writes = compile_all(sqlite_bulk_write_statements(), dialect)
        # A write's retention runs as its own statement here (Postgres: inside the write).
        self._prune = compile_statement(self.prune_statement, dialect)
        settings = engine_settings(engine)
        self._erase_without_trace = settings.sqlite_secure_delete
        self._inline_reads = settings.sqlite_inline_reads
        self._busy_ms = int(settings.busy_timeout * 1000)
        self._truncation = pending_truncation(engine)
        # An erasure's statements (Postgres: one function call, see `postgres_erase_statement`).
        self._delete_latest, self._delete_history = compile_all(delete_statements(), dialect)
        self._delete_expired = compile_statement(delete_statements(only_expired=True)[0], dialect)
        self._receipt = compile_statement(receipt_statement(), dialect)
        self._forget_key = compile_statement(forget_key_statement(), dialect)
        self._forget_feed, self._erasure_entry = compile_all(
            sqlite_erasure_feed_statements(), dialect
        )
        self._claim_key = compile_statement(self.claim_key_statement, dialect)
        self._hold_key = compile_statement(hold_key_statement(), dialect)
        compile_shared(self, dialect)

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
                # A key without rows (an older release's failed write) is still personal
                # data, whose bytes the truncation after the commit must remove too.
                if (
                    erasure.drop_data_key
                    and not erasure.only_expired
                    and conn.execute(forget_key.sql, forget_key.args(key)).rowcount
                ):
                    self._truncation.pending = True
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

    async def vacuum(self, full: bool = False) -> None:
        """Truncate the WAL now, waiting for readers as long as the call's deadline allows.

        `full` changes nothing: with `secure_delete` freed bytes are zeroed already.
        """
        await self._truncate_now(self._busy_ms)

    async def checkpoint_erasures(self) -> None:
        if self._erase_without_trace:
            await self._truncate_now(0)

    async def missing_database(self) -> str | None:
        database = self._engine.url.database
        if database in (None, "", ":memory:") or await asyncio.to_thread(
            os.path.exists, str(database)
        ):
            return None
        return f"SQLite database file {database} does not exist"

    async def finish_erasures(self, wait: float) -> bool:
        if self._truncation.pending:
            await self._truncate_now(int(wait * 1000))
        return not self._truncation.pending

    async def _truncate_now(self, wait_ms: int) -> None:
        left = _deadlines.remaining()
        if left is not None:
            wait_ms = min(wait_ms, int(left * 1000))

        def truncate(conn: sqlite3.Connection) -> None:
            self._truncate(conn, wait_ms)

        async with self._write_lock, self._connections.checkout() as aconn:
            await run_on_thread(aconn, truncate, sqlite_connection(aconn))

    def _truncate_after_erasure(self, conn: sqlite3.Connection, outcome: tuple[int, int]) -> None:
        """After an erasure's commit: truncate the WAL without waiting for any reader."""
        if outcome[0] or self._truncation.pending:
            self._truncate(conn, 0)

    def _truncate_if_pending(self, conn: sqlite3.Connection, _result: object) -> None:
        """After any write's commit: retry a pending truncation, at most once a second."""
        if self._truncation.due():
            self._truncate(conn, 0)

    def _truncate(self, conn: sqlite3.Connection, wait_ms: int) -> None:
        attempt = self._truncation.begin()
        self._truncation.note(truncate_committed(conn, wait_ms, self._busy_ms), attempt)

    async def feed_page(self, params: Mapping[str, Any]) -> list[Any]:
        """One page of the feed: `changes_since_statement`, read as any other statement."""
        return await self.fetch(self.changes_since_statement, params)

    async def fetch(self, statement: ClauseElement, params: Mapping[str, Any]) -> list[Any]:
        compiled = self._compiled(statement)
        if isinstance(statement, Executable) and statement.get_execution_options().get(SCAN):
            # Its cost grows with the table: 50-76 ms at 200,000 users, which inline
            # would freeze every other task of the loop for as long.
            async with self._connections.checkout() as conn:
                return list(await conn.execute_fetchall(compiled.sql, compiled.args(params)))
        return await self._fetch(compiled, params)

    async def execute_in_transaction(
        self, work: Sequence[tuple[ClauseElement, Mapping[str, Any]]]
    ) -> list[int]:
        prepared = [(self._compiled(statement), params) for statement, params in work]

        def run(conn: sqlite3.Connection) -> list[int]:
            return [conn.execute(c.sql, c.args(params)).rowcount for c, params in prepared]

        return await self._in_write_transaction(run)

    async def _fetch(self, statement: Compiled, params: Mapping[str, Any]) -> list[Any]:
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
            rows: list[Any] = sqlite_connection(conn).execute(sql, args).fetchall()
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
        timed out (see `sqlite_commit.Commit`).
        """
        commit = Commit()
        finish = after_commit if after_commit is not None else self._truncate_if_pending
        busy_ms = self._busy_ms  # cut to the deadline once the lock and connection are ours

        def transaction(conn: sqlite3.Connection) -> _T:
            try:
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
                commit.result = result
                finish(conn, result)
                return result
            finally:
                commit.finished.set()

        async with self._write_lock, self._connections.checkout() as aconn:
            left = _deadlines.remaining()
            if left is not None:
                busy_ms = min(busy_ms, int(left * 1000))
            try:
                # aiosqlite's own "run on the connection thread" entry point; see the module doc.
                result: _T = await run_on_thread(aconn, transaction, sqlite_connection(aconn))
            except asyncio.CancelledError:
                if commit.abandon() or not _deadlines.expired():
                    raise  # rolled back (or not our deadline's cancel): nothing was written
                # The deadline passed after COMMIT began: report what the COMMIT did.
                await asyncio.shield(asyncio.to_thread(commit.finished.wait))
                if commit.result is None:
                    raise
                return cast(_T, commit.result)
            return result
