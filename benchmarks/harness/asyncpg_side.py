"""The Postgres raw baseline: hand-written SQL on an asyncpg pool."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from .rows import RawSnapshot, decode_row, require_distinct
from .sides import Side
from .sql import RawSql
from .state import BenchState, payload_of

__all__ = ["AsyncpgSide", "keep_session"]


async def keep_session(_connection: Any) -> None:
    """asyncpg pool reset that keeps the session as it is.

    The default reset sends `RESET ALL; UNLISTEN *; ...`, one extra round trip
    per release. These statements leave no session state behind, and
    SQLAlchemy's pool only rolls back (free outside a transaction), so the
    default would handicap the raw side. The pool still rolls back any open
    transaction before calling this.
    """


class AsyncpgSide(Side):
    """Hand-written SQL on an asyncpg pool: prepared statements, one round trip per call."""

    name = "asyncpg"

    def __init__(self, pool: Any, sql: RawSql) -> None:
        self._pool = pool
        self._sql = sql

    async def write(self, user_id: str, state: BenchState) -> int:
        payload = payload_of(state)
        version: int = await self._pool.fetchval(
            self._sql.write, user_id, 1, payload, datetime.now(UTC)
        )
        return version

    async def get_latest(self, user_id: str) -> RawSnapshot | None:
        row = await self._pool.fetchrow(self._sql.latest, user_id)
        return None if row is None else decode_row(row)

    async def get_history(self, user_id: str, limit: int) -> list[RawSnapshot]:
        return [
            decode_row(row) for row in await self._pool.fetch(self._sql.history, user_id, limit)
        ]

    async def delete(self, user_id: str) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            version = await conn.fetchval(self._sql.delete_latest, user_id)
            if version is None:
                return 0
            status: str = await conn.execute(self._sql.delete_history, user_id, version)
        return int(status.rsplit(" ", 1)[1])

    async def bulk_write(self, items: Sequence[tuple[str, BenchState]]) -> list[Any]:
        user_ids = [user_id for user_id, _ in items]
        require_distinct(user_ids)
        payloads = [payload_of(state) for _, state in items]
        rows: list[Any] = await self._pool.fetch(
            self._sql.bulk_write, user_ids, [1] * len(items), payloads, datetime.now(UTC)
        )
        return rows

    async def bulk_read(self, user_ids: Sequence[str]) -> list[RawSnapshot]:
        rows = await self._pool.fetch(self._sql.latest_many, list(user_ids))
        return [decode_row(row) for row in rows]
