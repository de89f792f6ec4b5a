"""The core backend: the `Backend` contract through SQLAlchemy's public async API only.

The reference the fast backends are measured and tested against (one
conformance suite runs on all of them), the fallback when a private name they
need is missing (see `_privates`), and the way onto drivers they do not cover.
It opens connections with `engine.connect()`, runs Core statements with
`AsyncConnection.execute` and reads rows by name; no driver call, no private
name of SQLAlchemy or of a driver.

A write or an erasure is one transaction of separate statements, the steps
the SQLite backend takes, on every database: no data-modifying CTE and no
PL/pgSQL function. Write transactions begin with `BEGIN IMMEDIATE` on SQLite
(the engine's `WRITE_TRANSACTION` option, see `engine.install_sqlite_settings`)
and run READ COMMITTED elsewhere, where the latest-row upsert comes first and
takes the user's row lock, which orders the user's writers and erasers.

What is not dialect-neutral, and why:

- ON CONFLICT: SQLAlchemy has no neutral upsert, so the latest-row upsert and
  the data-key claim (`statements.latest_write_statement`,
  `claim_key_statement`) use `postgresql.insert` on Postgres and
  `sqlite.insert` elsewhere (a dialect needs one of the two forms, plus RETURNING).
- Postgres's feed (revision 0010): a write's entry is its history row
  (`feed_txid`, `feed_seq`), erase entries and pruned versions' entries carry
  the transaction id (`pg_current_xact_id`), and NOTIFY is `pg_notify`. Every
  other database keeps the SQLite feed: one `snapshot_changes` row per entry.
- SQLite: WAL truncation after erasures is a PRAGMA (`exec_driver_sql`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from sqlalchemy import ClauseElement, Insert, Select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..engine import WRITE_TRANSACTION, EngineSettings, engine_settings, install_sqlite_settings
from ..errors import ConnectionLostError
from ._compiled import expired, snapshot_row_decoder
from .core_sql import (
    DriverSql,
    feed_entry,
    history_append,
    latest_many,
    notify_statement,
    orphan_key_drop,
    orphan_key_lock,
    pruned_entries_move,
    pruning,
)
from .count_sql import fold_statements
from .feed_sql import changes_since_statement
from .sqlite_commit import pending_truncation
from .statements import (
    CHANGE_COLUMNS,
    ROW_COLUMNS,
    STORED_COLUMNS,
    DialectName,
    claim_key_statement,
    delete_statements,
    forget_key_statement,
    history_statement,
    hold_key_statement,
    idempotent_write_statement,
    latest_statement,
    latest_write_statement,
    prune_statement,
    receipt_statement,
    sqlite_erasure_feed_statements,
    version_statement,
    write_mode,
)
from .values import (
    DataKeyChanged,
    DataKeyRef,
    Erasure,
    PendingBatch,
    PendingWrite,
    Retention,
    Row,
    Scope,
    StoredRow,
    WriteOutcome,
)

__all__ = ["CoreBackend"]

logger = logging.getLogger("snapshot_repo")


class CoreBackend:
    """`Backend` on any async dialect, through `AsyncConnection` and Core statements.

    No I/O in the constructor. Connections come from the engine's pool for each
    call and go back after it: nothing is kept between calls.
    """

    kept_connections = 0
    """Idle connections held between calls: none (the pool keeps them)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        name = engine.dialect.name
        self._postgres = name == "postgresql"
        self._sqlite = name == "sqlite"
        self._flavour: DialectName = "postgresql" if self._postgres else "sqlite"
        self.notifies = self._postgres
        self.prune_statement = prune_statement(self._flavour)
        self.fold_statements = fold_statements(self._flavour)
        self.changes_since_statement = changes_since_statement(self._flavour)
        self.claim_key_statement: Insert = claim_key_statement(self._flavour)
        if self._sqlite:
            install_sqlite_settings(engine, EngineSettings())  # BEGIN IMMEDIATE; idempotent
        settings = engine_settings(engine)
        self._truncates_wal = self._sqlite and settings.sqlite_secure_delete
        self._busy_ms = int(settings.busy_timeout * 1000)
        # SQLite serializes writers on BEGIN IMMEDIATE and knows no isolation levels.
        self._write_options: dict[str, Any] = (
            {WRITE_TRANSACTION: True} if self._sqlite else {"isolation_level": "READ COMMITTED"}
        )
        self._decode = snapshot_row_decoder(engine.dialect)
        self._driver_sql: dict[int, tuple[ClauseElement, DriverSql]] = {}
        self._truncation = pending_truncation(engine)

    # --- writes ------------------------------------------------------------------------

    async def write(self, write: PendingWrite) -> WriteOutcome:
        """Store one write; see `_write_in` for the statements of its one write transaction.

        On Postgres two first uses of an idempotency key can both miss the
        lookup; the later one's history append then violates the unique key
        index and its transaction rolls back. The row the earlier one wrote is
        then read in a new transaction and returned; if there is none, the
        error was another and is raised.
        """
        try:
            async with self._write_transaction() as conn:
                outcome = await self._write_in(conn, write)
        except IntegrityError:
            if write.idempotency_key is None:
                raise
            async with self._connect() as conn:
                found = await conn.execute(idempotent_write_statement(), write.keyed_params())
                earlier = found.first()
            if earlier is None:
                raise
            return _stored_row(earlier._mapping)
        await self._retry_pending_truncation()
        return outcome

    async def write_many(self, batch: PendingBatch) -> list[int]:
        """Store the batch in one write transaction: each write's `_write_in` statements.

        Writes run in code point order of their user ids (a user's own writes
        in batch order), the order Postgres batches lock users' rows in, so
        concurrent batches sharing users cannot deadlock; then each user's
        data key is claimed or held, in the same order.
        """
        order = sorted(range(len(batch.user_ids)), key=batch.user_ids.__getitem__)
        versions = [0] * len(order)
        async with self._write_transaction() as conn:
            for index in order:
                version = await self._write_in(conn, batch.write(index))
                assert isinstance(version, int)  # a batch write has no key, no compare-and-set
                versions[index] = version
            keys = batch.data_keys or {}
            for user_id in sorted(keys):
                await self._keep_key(conn, batch.scope, user_id, keys[user_id])
        await self._retry_pending_truncation()
        return versions

    async def _write_in(self, conn: AsyncConnection, write: PendingWrite) -> WriteOutcome:
        """One write's statements, in the caller's write transaction, in this order.

        1. With an idempotency key: the user's history row written with it;
           if there is one, it is the outcome and nothing is written.
        2. The latest-row upsert (`latest_write_statement`), which takes the user's row
           lock first and returns the row as stored; none (a compare-and-set
           that found another version): the outcome is None.
        3. The history append of that row; on Postgres the row carries its
           feed entry, elsewhere 4. a `snapshot_changes` entry follows.
        5. Postgres with `notify`: `pg_notify` (delivered at commit).
        6. With retention, the pruning (`_prune`); 7. with a data key, its
           claim or hold (`_keep_key`), raising `DataKeyChanged`.
        """
        if write.idempotency_key is not None:
            found = await conn.execute(idempotent_write_statement(), write.keyed_params())
            earlier = found.first()
            if earlier is not None:
                return _stored_row(earlier._mapping)
        row = await self._write_latest(conn, write)
        if row is None:
            return None
        stored = {name: row[name] for name in STORED_COLUMNS}
        await conn.execute(history_append(self._postgres), stored)
        if not self._postgres:
            await self._record(conn, "write", {n: stored[n] for n in CHANGE_COLUMNS})
        version = int(stored["version"])
        if write.notify and self._postgres:
            params = {**write.scope.key(write.user_id), "version": version, "kind": "write"}
            await conn.execute(notify_statement(), params)
        if write.retention is not None:
            await self._prune(conn, write.scope, write.user_id, version, write.retention)
        if write.data_key is not None:
            await self._keep_key(conn, write.scope, write.user_id, write.data_key)
        return version

    async def _write_latest(
        self, conn: AsyncConnection, write: PendingWrite
    ) -> Mapping[str, Any] | None:
        """Write the user's latest row (`latest_write_statement`, which takes its row lock
        first); the row as stored, or None for a compare-and-set that found another version."""
        written = await conn.execute(
            latest_write_statement(self._flavour, write_mode(write.expected_version)),
            write.params(),
        )
        row = written.first()
        return None if row is None else dict(row._mapping)

    async def _record(self, conn: AsyncConnection, kind: str, entry: Mapping[str, Any]) -> None:
        """Append a `snapshot_changes` entry for a write or an erasure (not Postgres writes,
        whose entry is their history row)."""
        await conn.execute(feed_entry(kind, self._postgres), entry)

    async def _prune(
        self, conn: AsyncConnection, scope: Scope, user_id: str, newest: int, policy: Retention
    ) -> None:
        """Drop the history versions `policy` no longer keeps (see `prune_condition`).

        Postgres first copies their feed entries to `snapshot_changes` (with
        their txid and seq), since there a write's entry is its history row.
        The write holds the user's row lock, which every statement deleting the
        user's history takes first, so both statements see the same rows.
        """
        params = {**scope.key(user_id), "newest": newest, **policy.params()}
        if self._postgres:
            await conn.execute(pruned_entries_move(), params)
        await conn.execute(pruning(), params)

    async def _keep_key(
        self, conn: AsyncConnection, scope: Scope, user_id: str, key: DataKeyRef
    ) -> None:
        """Store (`new`) or share-lock the write's data key, after its latest-row upsert.

        An erasure deletes the latest row before the key, so the two take
        their locks in one order. No row: the key changed, `DataKeyChanged`
        rolls the write back.
        """
        statement = self.claim_key_statement if key.new else hold_key_statement()
        found = await conn.execute(statement, key.params(scope, user_id))
        if found.first() is None:
            raise DataKeyChanged

    # --- erasure -----------------------------------------------------------------------

    async def delete(self, erasure: Erasure) -> tuple[int, int]:
        """Erase the user in one write transaction (see `_erase_in`), then on SQLite with
        `secure_delete` truncate the WAL without waiting for readers (see `_truncate_wal`)."""
        async with self._write_transaction() as conn:
            outcome = await self._erase_in(conn, erasure)
        if self._truncates_wal and erasure.checkpoint and (outcome[0] or self._truncation.pending):
            await self._truncate_wal(0)
        return outcome

    async def _erase_in(self, conn: AsyncConnection, erasure: Erasure) -> tuple[int, int]:
        """The erasure's statements, in `snapshot_repo_erase`'s order (revision 0012).

        The latest row is deleted first, alone: on Postgres that waits out and
        then excludes every writer of the user, and each later statement
        (READ COMMITTED) sees what they committed. Then history up to that
        version, the user's feed entries, the erase entry, the receipt (with a
        subject), the data key (`drop_data_key`) and the NOTIFY (`notify`).
        Without a latest row, only the data key is dropped (unless
        `only_expired`), locked first and only if no latest row appeared.
        """
        key = erasure.key()
        version = await self._delete_latest(conn, erasure)
        if version is None:
            if erasure.drop_data_key and not erasure.only_expired:
                await conn.execute(orphan_key_lock(), key)
                if (await conn.execute(orphan_key_drop(), key)).rowcount:
                    self._truncation.pending = True  # its bytes must leave the WAL too
            return 0, 0
        delete_history = delete_statements(erasure.only_expired)[1]
        erased = (await conn.execute(delete_history, {**key, "version": version})).rowcount
        await conn.execute(sqlite_erasure_feed_statements()[0], key)
        await self._record(conn, "erase", erasure.feed_params(version))
        if erasure.receipt_subject is not None:
            await conn.execute(receipt_statement(), erasure.receipt_params(erased))
        if erasure.drop_data_key:
            await conn.execute(forget_key_statement(), key)
        if erasure.notify and self._postgres:
            entry = {**key, "user_id": erasure.feed_subject, "version": version, "kind": "erase"}
            await conn.execute(notify_statement(), entry)
        return erased, version

    async def _delete_latest(self, conn: AsyncConnection, erasure: Erasure) -> int | None:
        """Delete the user's latest row (with `only_expired`, only if expired); its version,
        or None if there was none."""
        delete_latest = delete_statements(erasure.only_expired)[0]
        found = (await conn.execute(delete_latest, {**erasure.key(), "now": erasure.at})).first()
        return None if found is None else int(found._mapping["version"])

    async def checkpoint_erasures(self) -> None:
        """SQLite with `secure_delete`: truncate the WAL without waiting for readers."""
        if self._truncates_wal:
            await self._truncate_wal(0)

    async def finish_erasures(self, wait: float) -> bool:
        """SQLite: a truncation readers held up, waiting up to `wait` s; True when none is
        pending. Elsewhere nothing is pending."""
        if self._truncation.pending:
            await self._truncate_wal(int(wait * 1000))
        return not self._truncation.pending

    async def vacuum(self, full: bool = False) -> None:
        """Postgres: VACUUM (FULL) the snapshot tables, outside a transaction (autocommit).
        SQLite: truncate the WAL, waiting for readers up to the busy timeout."""
        if self._postgres:
            async with self._connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                tables = "snapshot_latest, snapshot_history, snapshot_changes, snapshot_data_keys"
                await conn.exec_driver_sql(f"{'VACUUM FULL' if full else 'VACUUM'} {tables}")
        elif self._sqlite:
            await self._truncate_wal(self._busy_ms)

    async def _truncate_wal(self, wait_ms: int) -> None:
        """SQLite: copy the WAL into the database file and truncate it, or note it pending.

        A truncating checkpoint waits for every reader of an older snapshot, so
        the busy timeout is `wait_ms` meanwhile (0: give up at once), then
        restored. Runs after the erasures committed: a failure is logged, not raised.
        """
        busy = True
        attempt = self._truncation.begin()
        try:
            async with self._connect() as conn:
                await conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(wait_ms)}")
                try:
                    result = await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                    busy = bool(result.one()[0])
                finally:
                    await conn.exec_driver_sql(f"PRAGMA busy_timeout = {self._busy_ms}")
        except (DBAPIError, ConnectionLostError, OSError) as exc:
            logger.warning("snapshot_repo: WAL checkpoint after an erasure failed: %s", exc)
        self._truncation.note(not busy, attempt)

    async def _retry_pending_truncation(self) -> None:
        """After a write: retry a truncation readers held up, at most once a second."""
        if self._truncation.due():
            await self._truncate_wal(0)

    # --- reads -------------------------------------------------------------------------

    async def latest(self, scope: Scope, user_id: str, now: Any) -> Row | None:
        """The user's latest row (`latest_statement`), None if absent or expired by `now`."""
        async with self._connect() as conn:
            row = (await conn.execute(latest_statement(), scope.key(user_id))).mappings().first()
        return None if row is None or expired(row["expires_at"], now) else _stored_row(row)

    async def history(self, scope: Scope, user_id: str, limit: int) -> list[Row]:
        """The newest `limit` versions, newest first (`history_statement`)."""
        return await self._rows(history_statement(), {**scope.key(user_id), "limit": limit})

    async def current_version(self, scope: Scope, user_id: str) -> int:
        async with self._connect() as conn:
            version = await conn.scalar(version_statement(), scope.key(user_id))
        return int(version or 0)

    async def latest_many(self, scope: Scope, user_ids: Sequence[str], now: Any) -> list[Row]:
        """The live latest rows of `user_ids`, one statement with an expanding IN list."""
        params = {"tenant": scope.tenant, "namespace": scope.namespace, "now": now}
        return await self._rows(latest_many(), {**params, "user_ids": list(user_ids)})

    async def _rows(self, statement: Select[Any], params: dict[str, Any]) -> list[Row]:
        async with self._connect() as conn:
            return [_stored_row(row) for row in (await conn.execute(statement, params)).mappings()]

    async def feed_page(self, params: Mapping[str, Any]) -> list[Any]:
        """One page of the feed: `changes_since_statement`, read as any other statement."""
        return await self.fetch(self.changes_since_statement, params)

    async def fetch(self, statement: ClauseElement, params: Mapping[str, Any]) -> list[Any]:
        """The rows of a read, as the driver returns them (callers decode them, see
        `decode_snapshot_row`): compiled by the dialect, run with `exec_driver_sql`."""
        sql = self._compiled(statement)
        async with self._connect() as conn:
            result = await conn.exec_driver_sql(sql.text, sql.parameters(params))
            return list(result.all())

    def decode_snapshot_row(self, raw: Sequence[Any]) -> Row:
        return self._decode(raw)

    async def execute_in_transaction(
        self, work: Sequence[tuple[ClauseElement, Mapping[str, Any]]]
    ) -> list[int]:
        """Run the statements in order in one write transaction; their row counts.

        Each runs as driver SQL compiled once (`_compiled`), as `fetch` does:
        an UPDATE whose bound values share names with its columns (`tenant`)
        compiles there, where `execute` refuses it (SQLAlchemy reserves those
        names for the SET clause).
        """
        counts = []
        async with self._write_transaction() as conn:
            for statement, params in work:
                sql = self._compiled(statement)
                result = await conn.exec_driver_sql(sql.text, sql.parameters(params))
                counts.append(max(result.rowcount, 0))
        return counts

    async def missing_database(self) -> str | None:
        database = self._engine.url.database
        if not self._sqlite or database in (None, "", ":memory:"):
            return None
        if await asyncio.to_thread(os.path.exists, str(database)):
            return None
        return f"SQLite database file {database} does not exist"

    async def release(self) -> None:
        """Nothing: no connection is kept between calls."""

    def keep_connections(self, count: int) -> None:
        """Nothing: the engine's pool keeps idle connections."""

    # --- connections -------------------------------------------------------------------

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[AsyncConnection]:
        """A pooled connection for one call; its transaction, if any, rolls back at the end."""
        with _lost_connection():
            async with self._engine.connect() as conn:
                yield conn

    @asynccontextmanager
    async def _write_transaction(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction, committed when the block ends, rolled back if it raises.

        SQLite: `BEGIN IMMEDIATE` (the write lock first, waiting up to the busy
        timeout), so writers never upgrade a read lock; elsewhere READ COMMITTED.
        """
        with _lost_connection():
            async with self._engine.connect() as conn:
                await conn.execution_options(**self._write_options)
                async with conn.begin():
                    yield conn

    def _compiled(self, statement: ClauseElement) -> DriverSql:
        """`statement` compiled once per backend (statements are module-level singletons)."""
        hit = self._driver_sql.get(id(statement))
        if hit is None or hit[0] is not statement:
            hit = (statement, DriverSql(statement, self._engine))
            self._driver_sql[id(statement)] = hit
        return hit[1]


@contextmanager
def _lost_connection() -> Iterator[None]:
    """Raise `ConnectionLostError` for an error SQLAlchemy took for a lost connection (it
    then invalidated the pool's connections of that generation)."""
    try:
        yield
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        raise ConnectionLostError(
            f"the database connection was lost ({type(exc.orig).__name__}); a write's "
            "outcome is unknown: retry it with the same idempotency key"
        ) from exc


def _stored_row(mapping: Mapping[str, Any]) -> StoredRow:
    """A row read by name, as the `StoredRow` the repository builds snapshots from."""
    return StoredRow(*(mapping[name] for name in ROW_COLUMNS))
