"""MySQL/MariaDB's hot operations on asyncmy's own connection, in autocommit mode.

Why not SQLAlchemy's execution, as for the rest of the MySQL backend: measured
against MariaDB 10.11 on loopback, `get_latest` through a Core
`AsyncConnection` took 1.14 ms (p50) against 0.33 ms for the same SELECT on
an asyncmy pool, and a write 3-4 times the raw one: the pooled connection's
ROLLBACK on return is a round trip, and the Connection, its transaction
bookkeeping and the result machinery cost more than the round trips. Here the
statements are the same Core constructs (`statements`, `mysql_sql`),
compiled once by SQLAlchemy's MySQL dialect with its type processors
(`_compiled`); only the execution is the driver's, on connections borrowed
from SQLAlchemy's pool and kept between calls (`_pool.Connections`).

How its connections run (autocommit, explicit transactions): `mysql_session`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from typing import Any

import asyncmy.errors
from sqlalchemy import ClauseElement, event
from sqlalchemy.ext.asyncio import AsyncEngine

from ..errors import StorageError
from ..tables import latest_table
from ._compiled import (
    Compiled,
    compile_statement,
    expired,
    result_processor,
    snapshot_row_decoder,
)
from ._pool import Connections
from .core_sql import orphan_key_drop, orphan_key_lock
from .mysql_packets import (
    CHUNK_BYTES,
    STATEMENT_ROOM,
    VALUE_OVERHEAD,
    check_batch_packets,
    check_packet,
    chunks,
    text_length,
    utf8_length,
)
from .mysql_session import (
    autocommit,
    bulk_executes,
    error_code,
    execute,
    in_transaction,
    transactional_on_checkout,
)
from .mysql_sql import (
    batch_feed_copy_statement,
    batch_history_copy_returning_statement,
    batch_history_copy_statement,
    batch_versions_statement,
    delete_latest_statement,
    erase_entry_under_gate_statement,
    feed_copy_statement,
    gate_shared_statement,
    history_copy_returning_statement,
    history_copy_statement,
    latest_for_erasure_statement,
    latest_many_statement,
    latest_write_statement,
    max_packet_statement,
    version_under_gate_statement,
)
from .statements import (
    delete_statements,
    forget_key_statement,
    history_statement,
    idempotent_write_statement,
    latest_statement,
    receipt_statement,
    sqlite_erasure_feed_statements,
    version_statement,
    write_mode,
)
from .values import Erasure, PendingBatch, PendingWrite, Row, Scope, WriteOutcome

__all__ = ["DUPLICATE_KEY", "MysqlDriver", "error_code"]


DUPLICATE_KEY = 1062

_BATCH_VARYING = ("w_user_id", "w_schema_version", "w_payload")
"""The upsert's values that differ between a batch's writes; the rest are the batch's."""

_ONE_ROW = re.compile(r"(?s)^(INSERT INTO .+? VALUES )(\([%s, ]+\))( ON DUPLICATE KEY UPDATE .+)$")
"""The single-row upsert as SQLAlchemy compiles it: head, the row's placeholders, tail."""


class MysqlDriver:
    """Reads and plain writes of a MySQL backend, run on asyncmy connections directly.

    No I/O in the constructor. What a write needs beyond the plain case (a
    retention policy, a data key, a batch that repeats a user) is the core
    path's (`MysqlBackend` decides); the statements run here are those the
    core path runs, or an equivalent that saves round trips and says why.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        dialect = engine.dialect
        self.connections = Connections(engine, self._lost)
        self._is_disconnect = dialect.is_disconnect
        pool = engine.sync_engine.pool
        if not event.contains(pool, "checkout", transactional_on_checkout):
            event.listen(pool, "checkout", transactional_on_checkout)
        self._dialect = dialect
        self._decode = snapshot_row_decoder(dialect)
        self._expiry = result_processor(latest_table.c.expires_at, dialect)
        self._latest = compile_statement(latest_statement(), dialect)
        self._history = compile_statement(history_statement(), dialect)
        self._version = compile_statement(version_statement(), dialect)
        self._keyed = compile_statement(idempotent_write_statement(), dialect)
        self._writes = {
            mode: compile_statement(latest_write_statement(mode), dialect)
            for mode in ("upsert", "create", "replace")
        }
        self._version_under_gate = compile_statement(version_under_gate_statement(), dialect)
        self._gate = compile_statement(gate_shared_statement(), dialect)
        self._history_copy = compile_statement(history_copy_statement(), dialect)
        # MariaDB 10.5+: the gate's share lock, the history copy and the version read
        # back in one statement (`INSERT ... SELECT ... RETURNING`); MySQL has no RETURNING.
        # Whether the server has it is the dialect's answer after the first connection
        # (`_returns`), read at each use: a `mysql://` URL may reach a MariaDB.
        self._history_copy_returning = compile_statement(
            history_copy_returning_statement(), dialect
        )
        self._feed_copy = compile_statement(feed_copy_statement(), dialect)
        self._erasing = _ErasureStatements(dialect)
        self._packet_limit: int | None = None  # the server's max_allowed_packet, once read
        self._sized: dict[tuple[Callable[[int], ClauseElement], int], Compiled] = {}
        self._upsert_parts = _ONE_ROW.match(self._writes["upsert"].sql)
        if self._upsert_parts is None:  # a SQLAlchemy that renders it otherwise: fail loudly
            raise AssertionError("the MySQL upsert compiles to an unexpected form")
        self._multi_row: dict[tuple[str, int], str] = {}
        self._bulk: dict[str, str] = {}

    def _returns(self) -> bool:
        """Whether the server takes `INSERT ... RETURNING` (MariaDB 10.5+): SQLAlchemy's
        dialect knows once a connection was made, so every use asks on a connection."""
        return bool(self._dialect.insert_returning)

    def _bulk_upserts(self, conn: Any) -> bool:
        """Whether a batch's upserts go as one bulk execution on `conn` (MariaDB's
        `COM_STMT_BULK_EXECUTE`, see `bulk_executes`), else as multi-row statements:
        on MySQL, which has none, and behind a proxy that does not offer it."""
        return bulk_executes(conn)

    def _lost(self, exc: BaseException) -> bool:
        """Whether asyncmy's `exc` leaves its connection unusable (SQLAlchemy's own test)."""
        return isinstance(exc, asyncmy.errors.Error) and bool(
            self._is_disconnect(exc, None, None)  # type: ignore[arg-type]
        )

    def _upsert_rows(self, row: str, rows: int) -> str:
        """The upsert of `rows` rows of placeholders `row` in one statement: the single-row
        upsert's VALUES list repeated (what asyncmy's `executemany` sends as text, here one
        prepared statement). For connections without bulk execution: MySQL's, and those
        to a server or proxy not offering it (`write_many`)."""
        key = (row, rows)
        sql = self._multi_row.get(key)
        if sql is None:
            assert self._upsert_parts is not None
            head, _, tail = self._upsert_parts.groups()
            if len(self._multi_row) >= 64:
                self._multi_row.clear()
            sql = self._multi_row[key] = head + ", ".join([row] * rows) + tail
        return sql

    def _bulk_upsert(self, row: str) -> str:
        """The single-row upsert with placeholders `row`, which MariaDB runs for each row
        of a `COM_STMT_BULK_EXECUTE` (asyncmy's `executemany` on a prepared statement)."""
        sql = self._bulk.get(row)
        if sql is None:
            assert self._upsert_parts is not None
            head, _, tail = self._upsert_parts.groups()
            sql = self._bulk[row] = head + row + tail  # one per NULL pattern: a few
        return sql

    def _batch_upsert(
        self, batch: PendingBatch, written: Sequence[tuple[str, int, bytes]]
    ) -> tuple[str, list[tuple[Any, ...]]]:
        """The placeholders of a batch's upsert row, and the values of a row for each
        `(user_id, schema_version, payload)` of `written`, in that order.

        A shared value that is None (the batch's key, actor, reason, metadata,
        expiry, usually all five) is written into the row as `NULL` rather than
        bound for every row: fewer values to pack, and no all-NULL column, which
        asyncmy's bulk execution refuses. It then falls back, silently, to text:
        one multi-row statement escaping every payload on the client when the row
        is all placeholders (14 ms of CPU for 500 states of 1 KB here, against 1.5
        ms for the bulk execution; 25 ms a batch against 5), one statement per row
        otherwise.
        """
        upsert = self._writes["upsert"]
        template = upsert.args(batch.write(0).params())
        kept = [
            position
            for position, (name, value) in enumerate(zip(upsert.names, template, strict=True))
            if value is not None or name in _BATCH_VARYING
        ]
        row = "(" + ", ".join("%s" if p in kept else "NULL" for p in range(len(template))) + ")"
        values = [template[position] for position in kept]
        slots = [
            (kept.index(upsert.names.index(name)), upsert.processors.get(name))
            for name in _BATCH_VARYING
        ]
        rows = []
        for varying in written:
            for (position, process), value in zip(slots, varying, strict=True):
                values[position] = value if process is None else process(value)
            rows.append(tuple(values))
        return row, rows

    def _for_size(self, build: Callable[[int], ClauseElement], count: int) -> Compiled:
        """`build(count)` compiled once: statements with an IN list of `count` placeholders."""
        key = (build, count)
        compiled = self._sized.get(key)
        if compiled is None:
            if len(self._sized) >= 256:
                self._sized.clear()
            compiled = self._sized[key] = compile_statement(build(count), self._dialect)
        return compiled

    # --- reads -------------------------------------------------------------------------

    async def latest(self, scope: Scope, user_id: str, now: Any) -> Row | None:
        async with self.connections.checkout() as conn:
            await autocommit(conn)
            async with conn.cursor() as cursor:
                await cursor.execute(self._latest.sql, (scope.tenant, scope.namespace, user_id))
                raw = await cursor.fetchone()
        if raw is None:
            return None
        expires_at = raw[-1]  # DATETIME(6) comes back naive: made aware only when set
        if expires_at is not None and expired(self._expiry(expires_at), now):
            return None
        return self._decode(raw[:-1])

    async def history(self, scope: Scope, user_id: str, limit: int) -> list[Row]:
        args = self._history.args({**scope.key(user_id), "limit": limit})
        return [self._decode(raw) for raw in await self.fetch_compiled(self._history, args)]

    async def current_version(self, scope: Scope, user_id: str) -> int:
        rows = await self.fetch_compiled(self._version, self._version.args(scope.key(user_id)))
        return int(rows[0][0]) if rows else 0

    async def latest_many(self, scope: Scope, user_ids: Sequence[str], now: Any) -> list[Row]:
        statement = self._for_size(latest_many_statement, len(user_ids))
        params: dict[str, Any] = {"tenant": scope.tenant, "namespace": scope.namespace, "now": now}
        params.update((f"u{index}", user_id) for index, user_id in enumerate(user_ids))
        return [
            self._decode(raw)
            for raw in await self.fetch_compiled(statement, statement.args(params))
        ]

    async def fetch(self, statement: Compiled, params: Mapping[str, Any]) -> list[Any]:
        return await self.fetch_compiled(statement, statement.args(params))

    async def fetch_compiled(self, statement: Compiled, args: Sequence[Any]) -> list[Any]:
        async with self.connections.checkout() as conn:
            await autocommit(conn)
            async with conn.cursor() as cursor:
                await cursor.execute(statement.sql, args)
                return list(await cursor.fetchall())

    # --- writes ------------------------------------------------------------------------

    async def write(self, write: PendingWrite) -> WriteOutcome:
        """One write in one transaction (no retention policy, no data key).

        Statements: the idempotency lookup (with a key), the latest-row write
        (`latest_write_statement`, whose X lock on the user's row orders the
        user's writers), the version read back with the feed gate's share lock
        (`version_under_gate_statement`), the row copied into history and into
        the feed. On MariaDB the read back and the history copy are one
        statement (`history_copy_returning_statement`): a write is then five
        round trips with BEGIN and COMMIT. A compare-and-set that lost writes
        nothing and returns None.
        Two first uses of one idempotency key can both miss the lookup: the later
        one's history row then violates the key's unique index, its transaction
        rolls back, and the row the earlier one wrote is returned.
        """
        params = write.params()
        async with self.connections.checkout() as conn:
            await autocommit(conn)
            async with conn.cursor() as cursor:
                await self._check_packet(cursor, write.user_id, params)
                try:
                    return await in_transaction(conn, self._write_in(cursor, write, params))
                except asyncmy.errors.IntegrityError as exc:
                    if write.idempotency_key is None or error_code(exc) != DUPLICATE_KEY:
                        raise
                    earlier = await self._earlier(cursor, write)
                    if earlier is None:
                        raise
                    return earlier

    async def _write_in(
        self, cursor: Any, write: PendingWrite, params: Mapping[str, Any]
    ) -> WriteOutcome:
        if write.idempotency_key is not None:
            earlier = await self._earlier(cursor, write)
            if earlier is not None:
                return earlier
        mode = write_mode(write.expected_version)
        statement = self._writes[mode]
        try:
            changed = await cursor.execute(statement.sql, statement.args(params))
        except asyncmy.errors.IntegrityError as exc:  # InnoDB rolled back this statement alone
            if mode != "create" or error_code(exc) != DUPLICATE_KEY:
                raise
            return None  # a create-only write found the user
        if mode == "replace" and not changed:
            return None  # a replace that found another version, or no row
        key = write.scope.key(write.user_id)
        if self._returns():
            copy = self._history_copy_returning
            await cursor.execute(copy.sql, copy.args(key))
            version = _gated(await cursor.fetchone())[0]
        else:
            gated = self._version_under_gate
            await cursor.execute(gated.sql, gated.args(key))
            version = _gated(await cursor.fetchone())[0]
            await cursor.execute(self._history_copy.sql, self._history_copy.args(key))
        await cursor.execute(self._feed_copy.sql, self._feed_copy.args(key))
        return int(version)

    async def _earlier(self, cursor: Any, write: PendingWrite) -> Row | None:
        """The history row an earlier write with the write's idempotency key stored."""
        await cursor.execute(self._keyed.sql, self._keyed.args(write.keyed_params()))
        raw = await cursor.fetchone()
        return None if raw is None else self._decode(raw)

    async def write_many(self, batch: PendingBatch) -> list[int]:
        """A batch of distinct users (no retention, no data keys) in one transaction.

        The upserts (`INSERT ... ON DUPLICATE KEY UPDATE`) go in code point order of
        the user ids, the order every batch locks users in, so concurrent batches
        cannot deadlock: on MariaDB as one bulk execution of the prepared single-row
        upsert (`_bulk_upsert`), on MySQL as multi-row statements (`_upsert_rows`);
        one for 500 small states, more past 4 MiB or 65,535 values. Then the feed
        gate's share lock, the rows copied into history and the feed, and their
        versions read back (on MariaDB the first three are one statement,
        `batch_history_copy_returning_statement`).
        """
        order = sorted(batch.user_ids)
        count = len(order)
        stored_as = zip(batch.schema_versions, batch.payloads, strict=True)
        by_user = dict(zip(batch.user_ids, stored_as, strict=True))
        written = [(user_id, *by_user[user_id]) for user_id in order]
        row, rows = self._batch_upsert(batch, written)
        scoped: dict[str, Any] = {"tenant": batch.scope.tenant, "namespace": batch.scope.namespace}
        scoped.update((f"u{index}", user_id) for index, user_id in enumerate(order))
        feed = self._for_size(batch_feed_copy_statement, count)

        # What each row adds to a statement: its own user id and payload, plus what
        # every row repeats (the shared values, and each value's overhead).
        width = len(rows[0])
        first_id, _, first_payload = written[0]
        repeated = VALUE_OVERHEAD * width + text_length(rows[0])
        repeated -= text_length((first_id, first_payload))
        sizes = [repeated + len(payload) + utf8_length(user_id) for user_id, _, payload in written]

        async def statements(conn: Any, cursor: Any) -> list[Any]:
            assert self._packet_limit is not None  # read by `_check_packet` first
            # The server drops a statement longer than its `max_allowed_packet` (and the
            # connection with it): half of it, as text escaping can double a value.
            budget = min(CHUNK_BYTES, (self._packet_limit - STATEMENT_ROOM) // 2)
            bulk = self._bulk_upserts(conn)
            for chunk in chunks(rows, sizes, width, budget):
                if bulk:
                    await cursor.executemany(self._bulk_upsert(row), chunk)
                else:
                    values = list(chain.from_iterable(chunk))
                    await cursor.execute(self._upsert_rows(row, len(chunk)), values)
            # Asked here, connected: a `mysql://` URL may reach a MariaDB (`_returns`).
            if self._returns():
                history = self._for_size(batch_history_copy_returning_statement, count)
                await cursor.execute(history.sql, history.args(scoped))
                stored = list(await cursor.fetchall())
                if len(stored) != count:  # no gate row to join: nothing copied
                    raise StorageError(_NO_GATE)
                await cursor.execute(feed.sql, feed.args(scoped))
                return stored
            history = self._for_size(batch_history_copy_statement, count)
            versions = self._for_size(batch_versions_statement, count)
            await cursor.execute(self._gate.sql, self._gate.args({}))
            _gated(await cursor.fetchone())
            await cursor.execute(history.sql, history.args(scoped))
            await cursor.execute(feed.sql, feed.args(scoped))
            await cursor.execute(versions.sql, versions.args(scoped))
            return list(await cursor.fetchall())

        async with self.connections.checkout() as conn:
            await autocommit(conn)
            async with conn.cursor() as cursor:
                limit = await self._packet_limit_of(cursor)
                check_batch_packets(limit, batch.user_ids, batch.payloads, batch.metadata)
                stored = await in_transaction(conn, statements(conn, cursor))
        version_of = dict(stored)
        return [int(version_of[user_id]) for user_id in batch.user_ids]

    # --- erasure -----------------------------------------------------------------------

    async def delete(self, erasure: Erasure) -> tuple[int, int]:
        """Erase the user in one transaction, in the core backend's order (`_erase_in`)."""
        async with self.connections.checkout() as conn:
            await autocommit(conn)
            async with conn.cursor() as cursor:
                return await in_transaction(conn, self._erase_in(cursor, erasure))

    async def _erase_in(self, cursor: Any, erasure: Erasure) -> tuple[int, int]:
        """The core backend's erasure statements (see `CoreBackend._erase_in`).

        The latest row goes first, alone: its lock waits out and then excludes
        the user's writers, and each later statement (READ COMMITTED) sees what
        they committed. On MariaDB that is one `DELETE ... RETURNING version`;
        MySQL has no RETURNING, so there a locking read of the version precedes
        the DELETE. Then history up to that version, the user's feed entries,
        the feed gate's share lock and the erase entry (one statement,
        `erase_entry_under_gate_statement`), the receipt (with a
        subject) and the data key (`drop_data_key`). Without a latest row only
        the data key is dropped (unless `only_expired`), locked first, and only
        if no latest row appeared meanwhile.
        """
        run = self._erasing
        key = erasure.key()
        version = await self._delete_latest(cursor, erasure)
        if version is None:
            if erasure.drop_data_key and not erasure.only_expired:
                await execute(cursor, run.orphan_key_lock, key)
                await cursor.fetchall()
                await execute(cursor, run.orphan_key_drop, key)
            return 0, 0
        history = run.delete_history[erasure.only_expired]
        erased = await execute(cursor, history, {**key, "version": version})
        await execute(cursor, run.forget_feed, key)
        # The gate's share lock and the erase entry, one statement (no gate row: no entry).
        if not await execute(cursor, run.erase_entry, erasure.feed_params(version)):
            raise StorageError(_NO_GATE)
        if erasure.receipt_subject is not None:
            await execute(cursor, run.receipt, erasure.receipt_params(erased))
        if erasure.drop_data_key:
            await execute(cursor, run.forget_key, key)
        return int(erased), version

    async def _delete_latest(self, cursor: Any, erasure: Erasure) -> int | None:
        """Delete the user's latest row (with `only_expired`, only if expired); its version,
        or None if there was none."""
        run = self._erasing
        params = {**erasure.key(), "now": erasure.at}
        returning = run.delete_returning[erasure.only_expired]
        if self._dialect.delete_returning:  # MariaDB (known once connected, as `_returns`)
            await execute(cursor, returning, params)
            found = await cursor.fetchone()
            return None if found is None else int(found[0])
        await execute(cursor, run.lock_latest[erasure.only_expired], params)
        found = await cursor.fetchone()
        if found is None:
            return None
        await execute(cursor, run.delete_latest, params)
        return int(found[0])

    async def _check_packet(self, cursor: Any, user_id: str, params: Mapping[str, Any]) -> None:
        """`check_packet` against the server's `max_allowed_packet`."""
        check_packet(await self._packet_limit_of(cursor), user_id, params)

    async def _packet_limit_of(self, cursor: Any) -> int:
        """The server's `max_allowed_packet`, read on first use."""
        if self._packet_limit is None:
            statement = compile_statement(max_packet_statement(), self._dialect)
            await cursor.execute(statement.sql, statement.args({}))
            self._packet_limit = int((await cursor.fetchone())[0] or 0)
        return self._packet_limit


class _ErasureStatements:
    """An erasure's statements, compiled once (per `only_expired` where it matters)."""

    def __init__(self, dialect: Any) -> None:
        def compiled(statement: ClauseElement) -> Compiled:
            return compile_statement(statement, dialect)

        both = (False, True)
        self.delete_returning = {only: compiled(delete_statements(only)[0]) for only in both}
        self.lock_latest = {only: compiled(latest_for_erasure_statement(only)) for only in both}
        self.delete_latest = compiled(delete_latest_statement())
        self.delete_history = {only: compiled(delete_statements(only)[1]) for only in both}
        forget_feed, _ = sqlite_erasure_feed_statements()
        self.forget_feed = compiled(forget_feed)
        self.erase_entry = compiled(erase_entry_under_gate_statement())
        self.receipt = compiled(receipt_statement())
        self.forget_key = compiled(forget_key_statement())
        self.orphan_key_lock = compiled(orphan_key_lock())
        self.orphan_key_drop = compiled(orphan_key_drop())


_NO_GATE = (
    "the feed gate row (snapshot_feed_gate, id 1) is missing, so no feed entry can be "
    "ordered: run migrate() (revision 0013 creates it, and nothing else removes it); "
    "nothing was written"
)


def _gated(row: Any) -> Any:
    """`row`, read under the feed gate's lock; a missing gate row (None) is refused with a
    `StorageError`, inside the transaction, which then rolls back whole."""
    if row is None:
        raise StorageError(_NO_GATE)
    return row
