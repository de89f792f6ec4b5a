"""The scale benchmark's floor: the same reads as hand-written SQL on the bare driver.

A library call waits for the database's work and adds its own, which does not
grow with the users: its ratio big/small is the database's diluted by that
constant, and the faster the library, the closer it comes to the database's.
`raw get_latest` and `raw get_latest_many(100)` time the main benchmark's raw
baselines (asyncpg's prepared statements; stdlib `sqlite3` on a thread of its
own) on both databases, interleaved with the library's calls, so that every
run shows how much of a ratio the database itself makes. They are diluted a
little too (decoding each row; on SQLite the hop to the thread, which the
library's reads on the event loop do not make).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg

from snapshot_repo.engine import engine_settings

from ..harness.asyncpg_side import AsyncpgSide, keep_session
from ..harness.databases import open_sqlite3
from ..harness.sql import raw_statements
from ..harness.sqlite_sides import Sqlite3Side, Sqlite3Thread
from .databases import ScaleDatabase, asyncpg_dsn
from .load import user_id

__all__ = ["RAW_CALLS", "RawSide", "check_raw_reads", "open_raw_side"]

RAW_CALLS = ("raw get_latest", "raw get_latest_many(100)")
"""The floor's calls, as reported: the library's two key reads, on the bare driver."""

RawSide = AsyncpgSide | Sqlite3Side


@asynccontextmanager
async def open_raw_side(database: ScaleDatabase) -> AsyncIterator[RawSide]:
    """The raw baseline on `database`, in the scope its repository wrote (closed on exit)."""
    scope = {"tenant": database.repo.tenant or "", "namespace": database.repo.namespace}
    if database.backend == "postgres":
        pool = await asyncpg.create_pool(
            asyncpg_dsn(database.url), min_size=1, max_size=1, reset=keep_session
        )
        try:
            yield AsyncpgSide(pool, raw_statements("postgres", scope))
        finally:
            await pool.close()
        return
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scale-sqlite3")
    try:
        settings = engine_settings(database.repo.engine)  # the library side's own pragmas
        conn = await loop.run_in_executor(executor, open_sqlite3, Path(database.name), settings)
        try:
            yield Sqlite3Side(Sqlite3Thread(executor, conn), raw_statements("sqlite", scope))
        finally:
            await loop.run_in_executor(executor, conn.close)
    finally:
        executor.shutdown()


async def check_raw_reads(database: ScaleDatabase, raw: RawSide, users: int) -> None:
    """The raw side reads what the library reads, or the floor would measure something else.

    Raises:
        RuntimeError: the two disagree on the users and versions of a sample.
    """
    ids = [user_id(index) for index in random.Random(7).sample(range(users), min(users, 100))]
    library = {s.user_id: s.version for s in (await database.repo.get_latest_many(ids)).values()}
    direct = {s.user_id: s.version for s in await raw.bulk_read(ids)}
    single = await raw.get_latest(ids[0])
    if direct != library or len(library) != len(ids) or single is None:
        raise RuntimeError(
            f"the raw side reads other rows than the library on {database.label}: "
            f"{len(direct)} vs {len(library)} of {len(ids)} users"
        )
