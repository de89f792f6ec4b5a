"""The MySQL and MariaDB backend: the core backend's transactions, in MySQL's SQL.

Reads and plain writes (no retention policy, no data key; batches of
distinct users) run on asyncmy's own connections (`mysql_driver`), the rest
on SQLAlchemy's public async API with asyncmy, as the core backend does (see
`core`); `backend="core"` runs everything there. It differs from the core
backend only where MySQL does:

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
from ._compiled import Compiled, compile_statement
from ._retry import register_rolled_back, retry_rolled_back
from .core import CoreBackend
from .mysql_driver import DUPLICATE_KEY, MysqlDriver, error_code
from .mysql_packets import check_packet
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

__all__ = ["MysqlBackend", "error_code"]

_ROLLED_BACK = frozenset({1213, 1205})
"""ER_LOCK_DEADLOCK (the transaction was rolled back) and ER_LOCK_WAIT_TIMEOUT (the
statement was; the backend then rolls back the rest): the whole transaction runs again."""
_NO_SUCH_TABLE = 1146

_SNAPSHOT_TABLES = ("snapshot_latest", "snapshot_history", "snapshot_changes", "snapshot_data_keys")


_GATE_HELD_BY = "snapshot_repo_feed_gate"
"""`conn.info` key: the transaction that holds the feed gate's share lock on this connection."""

_FAILED = (DBAPIError, asyncmy.errors.MySQLError)
"""What a failed transaction raises: SQLAlchemy's wrapper (core path) or asyncmy's own."""


register_driver_errors(asyncmy.errors.MySQLError)
register_rolled_back(lambda exc: error_code(exc) in _ROLLED_BACK)
register_missing_schema(lambda exc: error_code(exc) == _NO_SUCH_TABLE)


class MysqlBackend(CoreBackend):
    """`Backend` on MySQL and MariaDB (InnoDB): reads, plain writes, batches of distinct
    users and erasures on asyncmy's connections (`MysqlDriver`), the rest through
    `AsyncConnection` and Core statements, as the core backend runs them."""

    def __init__(self, engine: AsyncEngine, *, driver: bool = True) -> None:
        """`driver=False` (`backend="core"`): everything through `AsyncConnection`."""
        super().__init__(engine)
        self.claim_key_statement = claim_key_statement()
        self._packet_limit: int | None = None  # the server's max_allowed_packet, once read
        # `create_engine` sets READ COMMITTED on each new connection; setting it for each
        # write too would cost a round trip, and on a dead connection fail outside
        # SQLAlchemy's disconnect handling.
        self._write_options = {}
        self._driver = MysqlDriver(engine) if driver else None
        self._prepared: dict[int, tuple[ClauseElement, Compiled]] = {}

    # --- connections kept by the driver path -----------------------------------------

    @property
    def kept_connections(self) -> int:  # type: ignore[override]
        """Idle connections the driver path holds for reuse (see `_pool.Connections`)."""
        return 0 if self._driver is None else self._driver.connections.kept

    @property
    def waiting_calls(self) -> int:
        """Calls of the driver path waiting for a connection now (`Connections.waiting`)."""
        return 0 if self._driver is None else self._driver.connections.waiting

    async def release(self) -> None:
        if self._driver is not None:
            await self._driver.connections.release()

    def keep_connections(self, count: int) -> None:
        if self._driver is not None:
            self._driver.connections.keep_up_to(count)

    # --- reads: the driver path ---------------------------------------------------------

    async def latest(self, scope: Scope, user_id: str, now: Any) -> Row | None:
        if self._driver is None:
            return await super().latest(scope, user_id, now)
        return await self._driver.latest(scope, user_id, now)

    async def history(self, scope: Scope, user_id: str, limit: int) -> list[Row]:
        if self._driver is None:
            return await super().history(scope, user_id, limit)
        return await self._driver.history(scope, user_id, limit)

    async def current_version(self, scope: Scope, user_id: str) -> int:
        if self._driver is None:
            return await super().current_version(scope, user_id)
        return await self._driver.current_version(scope, user_id)

    async def latest_many(self, scope: Scope, user_ids: Sequence[str], now: Any) -> list[Row]:
        if self._driver is None or not user_ids:
            return await super().latest_many(scope, user_ids, now)
        return await self._driver.latest_many(scope, user_ids, now)

    async def fetch(self, statement: ClauseElement, params: Mapping[str, Any]) -> list[Any]:
        if self._driver is None:
            return await super().fetch(statement, params)
        hit = self._prepared.get(id(statement))
        if hit is None or hit[0] is not statement:  # statements are module-level singletons
            hit = (statement, compile_statement(statement, self._engine.dialect))
            self._prepared[id(statement)] = hit
        return await self._driver.fetch(hit[1], params)

    # --- whole transactions, run again when InnoDB rolled them back -------------------

    async def write(self, write: PendingWrite) -> WriteOutcome:
        """The driver path for a plain write (`MysqlDriver.write`), else the core path."""
        run = (
            self._driver.write
            if self._driver is not None and write.retention is None and write.data_key is None
            else super().write
        )
        try:
            return await run(write)
        except _FAILED as exc:
            return await retry_rolled_back(exc, run, write)

    async def write_many(self, batch: PendingBatch) -> list[int]:
        """The driver path for a batch of distinct users with no retention policy and no
        data keys (`MysqlDriver.write_many`), else the core path."""
        plain = batch.retention is None and batch.data_keys is None and batch.distinct_users()
        run = (
            self._driver.write_many
            if self._driver is not None and plain and batch.user_ids
            else super().write_many
        )
        try:
            return await run(batch)
        except _FAILED as exc:
            return await retry_rolled_back(exc, run, batch)

    async def delete(self, erasure: Erasure) -> tuple[int, int]:
        """The driver path's erasure (`MysqlDriver.delete`), or the core path's."""
        run = super().delete if self._driver is None else self._driver.delete
        try:
            return await run(erasure)
        except _FAILED as exc:
            return await retry_rolled_back(exc, run, erasure)

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
                if error_code(exc) != DUPLICATE_KEY:
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
        """`mysql_packets.check_packet` against the server's `max_allowed_packet`, read once."""
        if self._packet_limit is None:
            self._packet_limit = int(await conn.scalar(max_packet_statement()) or 0)
        check_packet(self._packet_limit, write.user_id, params)

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
