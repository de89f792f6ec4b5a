"""The SQLite raw baselines: hand-written SQL on aiosqlite, and on stdlib `sqlite3`.

`aiosqlite` is what an asyncio application would reach for; the `sqlite3`
side runs each whole operation in one hop to a thread of its own, the
cheapest an asyncio program can reach SQLite through a thread.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiosqlite

from .rows import RawSnapshot, decode_row, require_distinct, sqlite_time
from .sides import CHECKPOINT, Side
from .sql import RawSql
from .state import BenchState, payload_of

__all__ = ["AiosqliteSide", "Sqlite3Side", "Sqlite3Thread"]

_ResultT = TypeVar("_ResultT")


class AiosqliteSide(Side):
    """Hand-written SQL on one aiosqlite connection.

    One connection is shared by every task, so each call holds an
    `asyncio.Lock`: a read issued between another task's BEGIN and COMMIT
    would otherwise run inside that task's transaction. Each aiosqlite call
    is one hop to its thread; `execute_fetchall` runs and fetches in one hop.
    """

    name = "aiosqlite"

    def __init__(self, conn: aiosqlite.Connection, sql: RawSql) -> None:
        self._conn = conn
        self._sql = sql
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    async def write(self, user_id: str, state: BenchState) -> int:
        payload = payload_of(state)
        created_at = sqlite_time(datetime.now(UTC))
        async with self._transaction() as conn:
            rows = await conn.execute_fetchall(self._sql.write, (user_id, 1, payload, created_at))
            version = int(next(iter(rows))[0])
            await conn.execute(self._sql.append, (user_id, version, 1, payload, created_at))
        return version

    async def get_latest(self, user_id: str) -> RawSnapshot | None:
        async with self._lock:
            rows = list(await self._conn.execute_fetchall(self._sql.latest, (user_id,)))
        return decode_row(rows[0]) if rows else None

    async def get_history(self, user_id: str, limit: int) -> list[RawSnapshot]:
        async with self._lock:
            rows = await self._conn.execute_fetchall(self._sql.history, (user_id, limit))
        return [decode_row(row) for row in rows]

    async def delete(self, user_id: str) -> int:
        async with self._transaction() as conn:
            rows = list(await conn.execute_fetchall(self._sql.delete_latest, (user_id,)))
            if not rows:
                return 0
            cursor = await conn.execute(self._sql.delete_history, (user_id, rows[0][0]))
        return cursor.rowcount

    def traceless_delete_unavailable(self) -> str | None:
        return None

    async def traceless_delete(self, user_id: str) -> int:
        erased = await self.delete(user_id)
        async with self._lock:
            await self._conn.execute(CHECKPOINT)
        return erased

    async def bulk_write(self, items: Sequence[tuple[str, BenchState]]) -> list[Any]:
        user_ids = [user_id for user_id, _ in items]
        require_distinct(user_ids)
        created_at = sqlite_time(datetime.now(UTC))
        rows = [(user_id, 1, payload_of(state), created_at) for user_id, state in items]
        async with self._transaction() as conn:
            await conn.executemany(self._sql.upsert, rows)
            cursor = await conn.execute(self._sql.bulk_write, (json.dumps(user_ids),))
            return list(await cursor.fetchall())

    async def bulk_read(self, user_ids: Sequence[str]) -> list[RawSnapshot]:
        async with self._lock:
            rows = await self._conn.execute_fetchall(
                self._sql.latest_many, (json.dumps(list(user_ids)),)
            )
        return [decode_row(row) for row in rows]


class Sqlite3Thread:
    """One stdlib `sqlite3` connection owned by one worker thread; every call is one hop."""

    def __init__(self, executor: ThreadPoolExecutor, conn: sqlite3.Connection) -> None:
        self._executor = executor
        self.conn = conn

    async def call(self, fn: Callable[..., _ResultT], *args: Any) -> _ResultT:
        """Run `fn(*args)` on the connection's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def transaction(self, work: Callable[[sqlite3.Connection], _ResultT]) -> _ResultT:
        """On the thread: `work(conn)` inside BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(self.conn)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return result

    def fetch(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        """On the thread: every row of `sql`."""
        return self.conn.execute(sql, params).fetchall()


class Sqlite3Side(Side):
    """Hand-written SQL on stdlib `sqlite3`, one connection owned by one worker thread.

    Each call is one hop to the thread, which runs the whole transaction, so
    calls are serialized by the thread itself and need no lock. Encoding and
    decoding stay on the event loop, as in the other sides.
    """

    name = "sqlite3"

    def __init__(self, thread: Sqlite3Thread, sql: RawSql) -> None:
        self._thread = thread
        self._sql = sql

    def _write_sync(self, user_id: str, payload: bytes, created_at: str) -> int:
        def work(conn: sqlite3.Connection) -> int:
            rows = conn.execute(self._sql.write, (user_id, 1, payload, created_at)).fetchall()
            version = int(rows[0][0])
            conn.execute(self._sql.append, (user_id, version, 1, payload, created_at))
            return version

        return self._thread.transaction(work)

    def _delete_sync(self, user_id: str) -> int:
        def work(conn: sqlite3.Connection) -> int:
            rows = conn.execute(self._sql.delete_latest, (user_id,)).fetchall()
            if not rows:
                return 0
            return conn.execute(self._sql.delete_history, (user_id, rows[0][0])).rowcount

        return self._thread.transaction(work)

    def _bulk_write_sync(self, rows: list[tuple[str, int, bytes, str]], user_ids: str) -> list[Any]:
        def work(conn: sqlite3.Connection) -> list[Any]:
            conn.executemany(self._sql.upsert, rows)
            return conn.execute(self._sql.bulk_write, (user_ids,)).fetchall()

        return self._thread.transaction(work)

    async def write(self, user_id: str, state: BenchState) -> int:
        payload = payload_of(state)
        created_at = sqlite_time(datetime.now(UTC))
        return await self._thread.call(self._write_sync, user_id, payload, created_at)

    async def get_latest(self, user_id: str) -> RawSnapshot | None:
        rows = await self._thread.call(self._thread.fetch, self._sql.latest, (user_id,))
        return decode_row(rows[0]) if rows else None

    async def get_history(self, user_id: str, limit: int) -> list[RawSnapshot]:
        rows = await self._thread.call(self._thread.fetch, self._sql.history, (user_id, limit))
        return [decode_row(row) for row in rows]

    async def delete(self, user_id: str) -> int:
        return await self._thread.call(self._delete_sync, user_id)

    def traceless_delete_unavailable(self) -> str | None:
        return None

    async def traceless_delete(self, user_id: str) -> int:
        def work() -> int:
            erased = self._delete_sync(user_id)
            self._thread.conn.execute(CHECKPOINT)
            return erased

        return await self._thread.call(work)

    async def bulk_write(self, items: Sequence[tuple[str, BenchState]]) -> list[Any]:
        user_ids = [user_id for user_id, _ in items]
        require_distinct(user_ids)
        created_at = sqlite_time(datetime.now(UTC))
        rows = [(user_id, 1, payload_of(state), created_at) for user_id, state in items]
        return await self._thread.call(self._bulk_write_sync, rows, json.dumps(user_ids))

    async def bulk_read(self, user_ids: Sequence[str]) -> list[RawSnapshot]:
        rows = await self._thread.call(
            self._thread.fetch, self._sql.latest_many, (json.dumps(list(user_ids)),)
        )
        return [decode_row(row) for row in rows]
