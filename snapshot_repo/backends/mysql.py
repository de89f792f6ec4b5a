"""The MySQL and MariaDB backend: the core backend's transactions, in MySQL's SQL.

It runs on SQLAlchemy's public async API with asyncmy, as the core backend
does (see `core`), and differs only where MySQL does:

- Writes: `INSERT ... ON DUPLICATE KEY UPDATE version = version + 1` takes
  the X lock on the user's primary-key record (a new user's writers wait on
  the duplicate-key check of the row the first one inserted), so versions are
  gapless with no read-then-write race; the row is then read back under that
  lock. A create-only write is a plain INSERT (a duplicate key means the user
  exists), a replace an UPDATE with the expected version. No RETURNING.
- Erasure: `SELECT ... FOR UPDATE` of the latest row, then its DELETE, in
  place of `DELETE ... RETURNING`.
- The feed: one `snapshot_changes` row per entry, as on SQLite, ordered
  against late commits by the feed gate (see `mysql_sql.gate_shared_statement`).
- Deadlocks (1213) and lock wait timeouts (1205) roll a transaction back;
  the backend runs it again, up to `_retry.ROLLED_BACK_ATTEMPTS` times.
- `vacuum`: `OPTIMIZE TABLE`, which rebuilds the tables without the deleted
  rows (see the README on what InnoDB keeps after an erasure).

Connections run READ COMMITTED (set by `engine.create_engine`), so each
statement sees what committed before it, as on Postgres.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncmy.errors
from sqlalchemy import ClauseElement
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._translate import register_driver_errors, register_missing_schema
from ..errors import StorageError, redact
from ._retry import register_rolled_back, retry_rolled_back
from .core import CoreBackend
from .mysql_sql import (
    claim_key_statement,
    delete_latest_statement,
    gate_exclusive_statement,
    gate_shared_statement,
    latest_for_erasure_statement,
    latest_write_statement,
    max_packet_statement,
    stored_latest_statement,
)
from .statements import hold_key_statement, write_mode
from .values import DataKeyChanged, DataKeyRef, Erasure, PendingBatch, PendingWrite, Scope

__all__ = ["MysqlBackend", "error_code"]

_DUPLICATE_KEY = 1062
_ROLLED_BACK = frozenset({1213, 1205})
"""ER_LOCK_DEADLOCK (the transaction was rolled back) and ER_LOCK_WAIT_TIMEOUT (the
statement was; the backend then rolls back the rest): the whole transaction runs again."""
_NO_SUCH_TABLE = 1146

_SNAPSHOT_TABLES = ("snapshot_latest", "snapshot_history", "snapshot_changes", "snapshot_data_keys")


_GATE_HELD_BY = "snapshot_repo_feed_gate"
"""`conn.info` key: the transaction that holds the feed gate's share lock on this connection."""

_STATEMENT_ROOM = 4096
"""Bytes of a write statement besides its values: the SQL text, numbers and timestamps."""

_ESCAPED = (b"\x00", b"\n", b"\r", b"\\", b"'", b'"', b"\x1a")
"""Bytes the text protocol sends as two (MySQL's string escaping)."""


def _escaped_length(value: bytes) -> int:
    return len(value) + sum(value.count(byte) for byte in _ESCAPED)


def error_code(exc: BaseException) -> int | None:
    """The MySQL error number of a driver error (wrapped by SQLAlchemy or not), or None."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


register_driver_errors(asyncmy.errors.MySQLError)
register_rolled_back(lambda exc: error_code(exc) in _ROLLED_BACK)
register_missing_schema(lambda exc: error_code(exc) == _NO_SUCH_TABLE)


class MysqlBackend(CoreBackend):
    """`Backend` on MySQL and MariaDB (InnoDB), through `AsyncConnection` and Core statements."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.claim_key_statement = claim_key_statement()
        self._packet_limit: int | None = None  # the server's max_allowed_packet, once read
        # `create_engine` sets READ COMMITTED on each new connection; setting it for each
        # write too would cost a round trip, and on a dead connection fail outside
        # SQLAlchemy's disconnect handling.
        self._write_options = {}

    # --- whole transactions, run again when InnoDB rolled them back -------------------

    async def write(self, write: PendingWrite) -> Any:
        try:
            return await super().write(write)
        except DBAPIError as exc:
            return await retry_rolled_back(exc, super().write, write)

    async def write_many(self, batch: PendingBatch) -> list[int]:
        try:
            return await super().write_many(batch)
        except DBAPIError as exc:
            return await retry_rolled_back(exc, super().write_many, batch)

    async def delete(self, erasure: Erasure) -> tuple[int, int]:
        try:
            return await super().delete(erasure)
        except DBAPIError as exc:
            return await retry_rolled_back(exc, super().delete, erasure)

    async def execute_in_transaction(
        self, work: Sequence[tuple[ClauseElement, Mapping[str, Any]]]
    ) -> list[int]:
        try:
            return await super().execute_in_transaction(work)
        except DBAPIError as exc:
            return await retry_rolled_back(exc, super().execute_in_transaction, work)

    # --- the steps that differ from the core backend's -------------------------------

    async def _write_latest(
        self, conn: AsyncConnection, write: PendingWrite
    ) -> Mapping[str, Any] | None:
        """Write the latest row (see `mysql_sql.latest_write_statement`), then read it back."""
        params = write.params()
        await self._check_packet(conn, write, params)
        mode = write_mode(write.expected_version)
        statement = latest_write_statement(mode)
        if mode == "create":
            try:
                await conn.execute(statement, params)
            except IntegrityError as exc:  # InnoDB rolled back this statement alone
                if error_code(exc) != _DUPLICATE_KEY:
                    raise
                return None
        elif (await conn.execute(statement, params)).rowcount == 0:
            return None  # a replace that found another version, or no row
        found = await conn.execute(stored_latest_statement(), write.scope.key(write.user_id))
        row = found.first()
        return None if row is None else dict(row._mapping)

    async def _check_packet(
        self, conn: AsyncConnection, write: PendingWrite, params: Mapping[str, Any]
    ) -> None:
        """Refuse, before sending, a write whose statement the server would not take.

        A statement longer than the server's `max_allowed_packet` makes the server
        drop the connection (the client sees "server has gone away"), which would
        read as a lost connection to be retried, and would fail again. The limit is
        read once per backend; the statement's length is its text values (payload,
        metadata, ids, actor, reason, key) as the text protocol escapes them, plus
        room for the rest. Escaping at most doubles a value, so the values are only
        scanned when twice their length could exceed the limit (never with the
        default 1 MiB states and a 16 MiB limit: no scan on the write path).
        """
        if self._packet_limit is None:
            self._packet_limit = int(await conn.scalar(max_packet_statement()) or 0)
        values = [
            value if isinstance(value, bytes) else value.encode()
            for value in params.values()
            if isinstance(value, bytes | str)
        ]
        if 2 * sum(map(len, values)) + _STATEMENT_ROOM <= self._packet_limit:
            return
        needed = sum(map(_escaped_length, values))
        if needed + _STATEMENT_ROOM > self._packet_limit:
            raise StorageError(
                f"a write for user {redact(write.user_id)} needs a statement of about "
                f"{needed + _STATEMENT_ROOM} bytes, over the server's max_allowed_packet "
                f"({self._packet_limit}): raise max_allowed_packet or lower "
                "max_payload_bytes; nothing was written"
            )

    async def _record(self, conn: AsyncConnection, kind: str, entry: Mapping[str, Any]) -> None:
        """Append the feed entry under the feed gate's share lock (held until commit),
        taken once per transaction: a batch's entries share it."""
        sync = conn.sync_connection
        transaction = sync.get_transaction() if sync is not None else None
        if transaction is None or conn.info.get(_GATE_HELD_BY) is not transaction:
            await conn.execute(gate_shared_statement())
            conn.info[_GATE_HELD_BY] = transaction
        await super()._record(conn, kind, entry)

    async def _keep_key(
        self, conn: AsyncConnection, scope: Scope, user_id: str, key: DataKeyRef
    ) -> None:
        """Store the write's new key unless another exists, then share-lock the write's key.

        Without RETURNING, whether the claim stored this key is read back: the
        share-locked read finds it (ours, stored or kept) or not (a racer's key,
        or an erasure's deletion): then `DataKeyChanged` rolls the write back.
        """
        params = key.params(scope, user_id)
        if key.new:
            await conn.execute(self.claim_key_statement, params)
        if (await conn.execute(hold_key_statement(), params)).first() is None:
            raise DataKeyChanged

    async def _delete_latest(self, conn: AsyncConnection, erasure: Erasure) -> int | None:
        """Lock the latest row (`latest_for_erasure_statement`), then delete it."""
        key = erasure.key()
        locked = latest_for_erasure_statement(erasure.only_expired)
        version = await conn.scalar(locked, {**key, "now": erasure.at})
        if version is None:
            return None
        await conn.execute(delete_latest_statement(), key)
        return int(version)

    # --- the feed and maintenance -----------------------------------------------------

    async def feed_page(self, params: Mapping[str, Any]) -> list[Any]:
        """One page of the feed, read under the feed gate's exclusive lock.

        The lock waits until every writer that holds an uncommitted seq has
        committed or rolled back (see `mysql_sql.gate_shared_statement`), and
        keeps new ones out while the page is read: the page cannot skip an
        entry that commits later. A waiting reader also holds back writers
        that ask for the gate after it, so a batch writer waiting on such a
        writer's row closes a cycle that InnoDB breaks by rolling one back,
        usually the reader: the read then runs again (it is safe to repeat).
        """
        try:
            return await self._feed_page(params)
        except DBAPIError as exc:
            return await retry_rolled_back(exc, self._feed_page, params)

    async def _feed_page(self, params: Mapping[str, Any]) -> list[Any]:
        async with self._write_transaction() as conn:
            await conn.execute(gate_exclusive_statement())
            sql = self._compiled(self.changes_since_statement)
            result = await conn.exec_driver_sql(sql.text, sql.parameters(params))
            return list(result.all())

    async def vacuum(self, full: bool = False) -> None:
        """`OPTIMIZE TABLE` the snapshot tables: InnoDB rebuilds them without deleted rows
        (online: writes go on), so `full` asks nothing more."""
        async with self._connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql(f"OPTIMIZE TABLE {', '.join(_SNAPSHOT_TABLES)}")
