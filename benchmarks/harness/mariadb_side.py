"""The MariaDB raw baseline: hand-written SQL on an asyncmy pool (in the main benchmark,
on the library's own connections: see `SharedConnections`).

The library's operations, statement by statement, on the bare driver:

- a write is one transaction (`BEGIN` on a connection in autocommit mode):
  the upsert (`INSERT ... ON DUPLICATE KEY UPDATE version = version + 1`,
  whose row lock orders the user's writers), the version read back under that
  lock (MariaDB has no RETURNING for the upsert's UPDATE), the history row
  and the feed entry (`snapshot_changes`, which MariaDB keeps as SQLite does),
  `COMMIT`;
- a read is one primary-key `SELECT` in autocommit mode (no transaction to end);
- a delete is one transaction: the latest row (`DELETE ... RETURNING version`,
  which takes its lock), the history up to that version and the user's feed
  entries, and the erasure's own feed entry;
- a batch is one transaction: `executemany` of the upsert (one
  `COM_STMT_BULK_EXECUTE` on connections with a statement cache, else one
  multi-row text statement: see `sql.upsert_row`), then one
  `INSERT ... SELECT ... RETURNING` copying the batch's new latest rows into the
  history (each user's new version back, as the library's batch returns them)
  and one copying them into the feed.

Connections run READ COMMITTED, as the library's (`init_command`). The same
class runs on aiomysql's pool, whose API is asyncmy's (both come from
PyMySQL): `benchmarks/mysql_drivers.py` uses it to compare the two drivers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from .rows import RawSnapshot, decode_row, require_distinct
from .sides import Side
from .sql import RawSql, with_ids
from .state import BenchState, payload_of

__all__ = ["READ_COMMITTED", "MariadbSide", "SharedConnections"]

READ_COMMITTED = "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"
"""Every raw connection's `init_command`: the isolation level the library's connections run."""


def _now() -> datetime:
    """Now, as the library stores a moment on MariaDB: a naive UTC `DATETIME(6)`."""
    return datetime.now(UTC).replace(tzinfo=None)


class SharedConnections:
    """The library repository's own connections, lent to the raw side as a pool (`acquire`).

    Why the main benchmark's raw side runs on them: on this project's machine (a
    VM with 2 vCPUs) a MariaDB connection's round trip is about 20 or about
    80 us, by chance at connect time (presumably where the server's thread for
    it runs): of 15 connections opened in 5 processes, 6 answered `SELECT 1` in
    about 20 us and 9 in about 80 (medians of 1,000 interleaved calls each).
    The library's sequential calls run on one kept connection while an asyncmy
    pool hands out all of its in turn, so the two sides compared that draw as
    much as the library: the write ratio moved between 0.6 and 1.1 from run to
    run of one build. On the same connections the sides differ only in what
    each does with them.

    Connections are taken as the library's driver path takes them
    (`Connections.checkout`, not a public API: this harness is not shipped) and
    switched to autocommit as it switches them. The pool's admission (turns)
    then applies to both sides alike under concurrency.
    """

    def __init__(self, repository: Any) -> None:
        self._connections = repository._backend._driver.connections

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        async with self._connections.checkout() as conn:
            if not conn.get_autocommit():
                await conn.autocommit(True)
            yield conn


class MariadbSide(Side):
    """Hand-written SQL on a pool of a PyMySQL-style driver (asyncmy; aiomysql for comparison).

    The pool's connections must be in autocommit mode, so a read is one round
    trip; a write transaction begins with `BEGIN`.
    """

    def __init__(self, pool: Any, sql: RawSql, name: str = "asyncmy") -> None:
        self.name = name
        self._pool = pool
        self._sql = sql
        self._in_lists: dict[tuple[str, int], str] = {}

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        """A cursor inside `BEGIN` ... `COMMIT` (`ROLLBACK` on error) on a pooled connection."""
        async with self._pool.acquire() as conn:
            await conn.begin()
            try:
                async with conn.cursor() as cursor:
                    yield cursor
            except BaseException:
                await conn.rollback()
                raise
            await conn.commit()

    def _with_ids(self, statement: str, count: int) -> str:
        key = (statement, count)
        built = self._in_lists.get(key)
        if built is None:
            built = self._in_lists[key] = with_ids(statement, count)
        return built

    async def write(self, user_id: str, state: BenchState) -> int:
        payload = payload_of(state)
        created_at = _now()
        sql = self._sql
        async with self._transaction() as cursor:
            await cursor.execute(sql.upsert, sql.upsert_row(user_id, payload, created_at))
            await cursor.execute(sql.read_back, (user_id,))
            (version,) = await cursor.fetchone()
            await cursor.execute(sql.append, (user_id, version, 1, payload, created_at))
            await cursor.execute(sql.feed, (user_id, version, created_at))
        return int(version)

    async def get_latest(self, user_id: str) -> RawSnapshot | None:
        async with self._pool.acquire() as conn, conn.cursor() as cursor:
            await cursor.execute(self._sql.latest, (user_id,))
            row = await cursor.fetchone()
        return None if row is None else decode_row(row)

    async def get_history(self, user_id: str, limit: int) -> list[RawSnapshot]:
        async with self._pool.acquire() as conn, conn.cursor() as cursor:
            await cursor.execute(self._sql.history, (user_id, limit))
            rows = await cursor.fetchall()
        return [decode_row(row) for row in rows]

    async def delete(self, user_id: str) -> int:
        sql = self._sql
        async with self._transaction() as cursor:
            await cursor.execute(sql.delete_latest, (user_id,))
            row = await cursor.fetchone()
            if row is None:
                return 0
            erased = await cursor.execute(sql.delete_history, (user_id, row[0]))
            await cursor.execute(sql.forget_feed, (user_id,))
            await cursor.execute(sql.erase_entry, (row[0], _now()))
        return int(erased)

    async def bulk_write(self, items: Sequence[tuple[str, BenchState]]) -> list[Any]:
        user_ids = [user_id for user_id, _ in items]
        require_distinct(user_ids)
        created_at = _now()
        rows = [self._sql.upsert_row(u, payload_of(state), created_at) for u, state in items]
        copy_history = self._with_ids(self._sql.bulk_write, len(user_ids))
        copy_feed = self._with_ids(self._sql.bulk_feed, len(user_ids))
        async with self._transaction() as cursor:
            await cursor.executemany(self._sql.upsert, rows)
            await cursor.execute(copy_history, user_ids)
            versions = list(await cursor.fetchall())
            await cursor.execute(copy_feed, user_ids)
        return versions

    async def bulk_read(self, user_ids: Sequence[str]) -> list[RawSnapshot]:
        query = self._with_ids(self._sql.latest_many, len(user_ids))
        async with self._pool.acquire() as conn, conn.cursor() as cursor:
            await cursor.execute(query, list(user_ids))
            rows = await cursor.fetchall()
        return [decode_row(row) for row in rows]
