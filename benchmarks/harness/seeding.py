"""Seeding: untimed bulk SQL, so a deep history costs one statement, not 100,000 calls.

Never through the API being measured: every side must find the same rows,
and seeding through one side would warm that side's caches only.
"""

from __future__ import annotations

import abc
import sqlite3
from datetime import UTC, datetime
from typing import Any

from .rows import sqlite_time
from .sql import RawSql
from .sqlite_sides import Sqlite3Thread

__all__ = ["MariadbSeeder", "PostgresSeeder", "Seeder", "SqliteSeeder"]

_SEED_TIMEOUT = 600.0  # seconds: bulk seeding of a deep history is one long statement


class Seeder(abc.ABC):
    """Creates users with N versions each directly in SQL, and refreshes statistics."""

    @abc.abstractmethod
    async def seed(self, prefix: str, users: int, versions: int, payload: bytes) -> None:
        """Users `prefix0` .. `prefix{users-1}`, each with versions 1 to `versions`."""

    @abc.abstractmethod
    async def settle(self) -> None:
        """Refresh planner statistics and flush after a large seed."""

    @abc.abstractmethod
    async def level(self) -> None:
        """Leave nothing of earlier work for the next timed sample to pay for."""


class PostgresSeeder(Seeder):
    """Seeds with `generate_series`, one transaction per call, on the asyncpg side's pool."""

    def __init__(self, pool: Any, sql: RawSql) -> None:
        self._pool = pool
        self._sql = sql

    async def seed(self, prefix: str, users: int, versions: int, payload: bytes) -> None:
        args = (prefix, users, versions, payload, datetime.now(UTC))
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(self._sql.seed_history, *args, timeout=_SEED_TIMEOUT)
            await conn.execute(self._sql.seed_latest, *args, timeout=_SEED_TIMEOUT)

    async def settle(self) -> None:
        await self._pool.execute(
            "VACUUM ANALYZE snapshot_latest, snapshot_history", timeout=_SEED_TIMEOUT
        )

    async def level(self) -> None:
        """Nothing: Postgres checkpoints in a process of its own, not inside a client's call."""


class MariadbSeeder(Seeder):
    """Seeds with the sequence engine's tables (`seq_0_to_N`), one transaction per call, on the
    raw side's pool (its connections are in autocommit mode)."""

    def __init__(self, pool: Any, sql: RawSql) -> None:
        self._pool = pool
        self._sql = sql

    async def seed(self, prefix: str, users: int, versions: int, payload: bytes) -> None:
        def sized(statement: str) -> str:
            return statement.replace("{last_user}", str(users - 1)).replace(
                "{versions}", str(versions)
            )

        args = (prefix, payload, datetime.now(UTC).replace(tzinfo=None))
        async with self._pool.acquire() as conn:
            await conn.begin()
            try:
                async with conn.cursor() as cursor:
                    await cursor.execute(sized(self._sql.seed_history), args)
                    await cursor.execute(sized(self._sql.seed_latest), args)
            except BaseException:
                await conn.rollback()
                raise
            await conn.commit()

    async def settle(self) -> None:
        async with self._pool.acquire() as conn, conn.cursor() as cursor:
            await cursor.execute(
                "ANALYZE TABLE snapshot_latest, snapshot_history, snapshot_changes"
            )
            await cursor.fetchall()

    async def level(self) -> None:
        """Nothing: InnoDB flushes and purges in threads of its own, not inside a client's call."""


class SqliteSeeder(Seeder):
    """Seeds through the `sqlite3` side's connection and thread."""

    def __init__(self, thread: Sqlite3Thread, sql: RawSql) -> None:
        self._thread = thread
        self._sql = sql

    async def seed(self, prefix: str, users: int, versions: int, payload: bytes) -> None:
        params = {
            "prefix": prefix,
            "users": users,
            "versions": versions,
            "payload": payload,
            "created_at": sqlite_time(datetime.now(UTC)),
        }

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(self._sql.seed_history, params)
            conn.execute(self._sql.seed_latest, params)

        await self._thread.call(self._thread.transaction, work)

    async def settle(self) -> None:
        def work() -> None:
            self._thread.conn.execute("ANALYZE")
            self._thread.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        await self._thread.call(work)

    async def level(self) -> None:
        """Checkpoint the WAL into the database file and empty it.

        Otherwise the first commit past `wal_autocheckpoint` (1,000 pages)
        copies the whole WAL inside its own call, whichever side wrote the
        frames, so a side timed after another paid for the other's writes:
        library bulk writes measured 0.57 to 0.59 of aiosqlite's that way, and
        0.66 to 0.73 with every sample starting from an empty WAL.
        """

        def work() -> None:
            self._thread.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

        await self._thread.call(work)
