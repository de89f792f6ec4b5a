"""Loading N users x M versions through the library's own `upsert_many`, then statistics.

Versions are written round by round (every user's version 1, then every
user's version 2, ...), as a live service writes them over time: a user's
versions then lie on M different history pages, not on one, which is what a
read of a user's history pays for at scale. Each round is cut into batches of
`batch` users; `workers` batches run concurrently (different users, so they
never wait for one another), so that encoding in Python and writing in the
database overlap on a two-core machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import asyncpg

from snapshot_repo import Snapshot, SnapshotRepository

from ..harness.state import BenchState, make_states
from .databases import ScaleDatabase, asyncpg_dsn

__all__ = [
    "SCALE_STATE_TAGS",
    "analyze",
    "analyzed",
    "load",
    "scale_states",
    "set_autovacuum",
    "user_id",
]

SCALE_STATE_TAGS = 8
"""Tags per state: about 450 bytes of JSON, the history row size the issue measured
(the created_at index's 70 bytes a row were 14% of history)."""

_STATE_VARIANTS = 64


def user_id(index: int) -> str:
    """The id of user `index`: fixed width, so ids sort as their numbers do."""
    return f"user-{index:08d}"


def scale_states() -> list[BenchState]:
    """The states the load and the timed writes cycle through, about 450 bytes each."""
    return make_states(_STATE_VARIANTS, tags=SCALE_STATE_TAGS)


def _batches(users: int, batch: int) -> Iterator[range]:
    for start in range(0, users, batch):
        yield range(start, min(start + batch, users))


async def load(
    database: ScaleDatabase,
    users: int,
    versions: int,
    *,
    batch: int = 1000,
    workers: int = 2,
    progress: Callable[[str], None] | None = None,
) -> float:
    """Write versions 1..`versions` of users 0..`users`-1 with `upsert_many`; the seconds taken.

    Only into an empty database: each round's write is each user's next version.
    """
    states = scale_states()
    repo: SnapshotRepository[BenchState] = database.repo
    began = time.perf_counter()
    for version in range(1, versions + 1):
        pending = _batches(users, batch)

        async def worker(round_: int = version, work: Iterator[range] = pending) -> None:
            for span in work:  # a shared iterator: each batch goes to one worker
                await repo.upsert_many(
                    [
                        Snapshot(user_id=user_id(i), state=states[(i + round_) % len(states)])
                        for i in span
                    ]
                )

        async with asyncio.TaskGroup() as group:
            for _ in range(min(workers, max(1, users // batch))):
                group.create_task(worker())
        if progress is not None:
            elapsed = time.perf_counter() - began
            done = f"version {version}/{versions} of {users:,} users"
            progress(f"{database.label}: {done}, {elapsed:,.0f} s")
    return time.perf_counter() - began


async def analyze(database: ScaleDatabase) -> float:
    """Planner statistics and a vacuumed table, as autovacuum leaves a live one; seconds taken.

    Postgres: VACUUM ANALYZE of the three tables (the load leaves a dead
    latest row per rewritten version, and an unvacuumed heap has no
    visibility map for index-only scans) and of `snapshot_user_counts`, where
    the first `count_users` folded a row per user loaded (autovacuum's
    threshold for a table of a few live rows is 50 dead ones). SQLite:
    ANALYZE and a WAL checkpoint.
    """
    began = time.perf_counter()
    if database.backend == "postgres":
        conn = await asyncpg.connect(asyncpg_dsn(database.url))
        try:
            await conn.execute(
                "VACUUM ANALYZE snapshot_latest, snapshot_history, snapshot_changes, "
                "snapshot_user_counts"
            )
        finally:
            await conn.close()
        return time.perf_counter() - began
    async with database.repo.engine.connect() as conn:
        await conn.exec_driver_sql("ANALYZE")
        await conn.commit()
        await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    return time.perf_counter() - began


async def set_autovacuum(database: ScaleDatabase, enabled: bool) -> None:
    """Turn autovacuum of the three tables off for a load, or back on (Postgres only).

    Off during the load, so that nothing analyzes the tables before the
    benchmark has timed `get_latest_many` without statistics (the issue's
    3.6 s case), and the load is not slowed by vacuums of a table still growing.
    A storage parameter of these tables only: nothing server-wide changes.
    """
    if database.backend != "postgres":
        return
    conn = await asyncpg.connect(asyncpg_dsn(database.url))
    try:
        for table in ("snapshot_latest", "snapshot_history", "snapshot_changes"):
            if enabled:
                await conn.execute(f"ALTER TABLE {table} RESET (autovacuum_enabled)")
            else:
                await conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    finally:
        await conn.close()


async def analyzed(database: ScaleDatabase) -> bool:
    """Whether the tables have planner statistics (SQLite: `sqlite_stat1` exists)."""
    if database.backend == "postgres":
        conn = await asyncpg.connect(asyncpg_dsn(database.url))
        try:
            return bool(
                await conn.fetchval(
                    "SELECT bool_or(coalesce(last_analyze, last_autoanalyze) IS NOT NULL)"
                    " FROM pg_stat_user_tables"
                    " WHERE relname IN ('snapshot_latest', 'snapshot_history')"
                )
            )
        finally:
            await conn.close()
    async with database.repo.engine.connect() as sqlite:
        found = await sqlite.exec_driver_sql(
            "SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'"
        )
        return bool(found.scalar())
