"""One scale run on one backend: open (or reuse) both databases, load, analyze, time, size.

The big and the small database are loaded the same way (`load.load`,
through `upsert_many`), timed without statistics once, analyzed, measured
for bytes per row, then timed interleaved (`measure.interleave`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from .created_at import VARIANTS, VariantResult, run_experiment
from .databases import SETTINGS, ScaleBackend, ScaleDatabase, open_scale_database
from .load import analyze, analyzed, load, set_autovacuum
from .measure import CALLS, Target, interleave, time_before_analyze
from .raw import check_raw_reads, open_raw_side
from .report import ScaleReport
from .sizes import relation_sizes
from .working_set import WorkingSetRow, run_working_set

__all__ = ["ScaleOptions", "created_at_experiment", "run_scale", "working_set_experiment"]


@dataclass(frozen=True)
class ScaleOptions:
    """What to load and how to time it.

    Attributes:
        backend: "postgres" or "sqlite".
        users: users in the big database.
        small_users: users in the small one (the issue's baseline: 1,000).
        versions: versions per user in both.
        batch: snapshots per `upsert_many` call while loading.
        workers: concurrent `upsert_many` calls while loading.
        rounds: timed rounds (after one untimed warm-up round).
        block: calls of one kind on one database before switching to the other.
        before_analyze_calls: `get_latest_many(100)` calls timed before ANALYZE.
        postgres_url: the server throwaway databases are created on.
        directory: where SQLite files go (None: a temporary directory).
        keep: keep the databases created (their names are in the report's notes).
        big_database: an existing database (name or path) to use as the big one.
        small_database: the same for the small one.
        sqlite_mmap_size: `EngineSettings.sqlite_mmap_size` of both SQLite databases'
            connections, the library's and the raw side's (0: off, the default).
    """

    backend: ScaleBackend
    users: int
    small_users: int = 1000
    versions: int = 10
    batch: int = 1000
    workers: int = 2
    rounds: int = 30
    block: int = 25
    before_analyze_calls: int = 3
    postgres_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    directory: Path | None = None
    keep: bool = False
    big_database: str | None = None
    small_database: str | None = None
    sqlite_mmap_size: int = 0


async def _prepare(
    database: ScaleDatabase,
    users: int,
    options: ScaleOptions,
    report: ScaleReport,
    progress: Callable[[str], None],
) -> int:
    """Load `database` if empty and time it unanalysed; the number of users it holds."""
    label = database.label
    if await database.repo.count_users() == 0:
        await set_autovacuum(database, False)
        report.load_seconds[label] = await load(
            database,
            users,
            options.versions,
            batch=options.batch,
            workers=options.workers,
            progress=progress,
        )
    began = time.perf_counter()
    held = await database.repo.count_users()
    if label in report.load_seconds:
        report.first_count_ms[label] = (time.perf_counter() - began) * 1000
    if not await analyzed(database):
        target = Target(database, held)
        report.before_analyze_ms[label] = await time_before_analyze(
            target, options.before_analyze_calls
        )
        progress(f"{label}: analyzing")
        report.analyze_seconds[label] = await analyze(database)
    await set_autovacuum(database, True)
    return held


async def _open_pair(
    stack: AsyncExitStack,
    options: ScaleOptions,
    backend: ScaleBackend,
    directory: Path | None,
    keep: bool,
) -> dict[str, ScaleDatabase]:
    """The big and the small database (made, or the existing ones named), closed by `stack`."""
    opened = {}
    for label, existing in (("big", options.big_database), ("small", options.small_database)):
        opened[label] = await stack.enter_async_context(
            open_scale_database(
                label,
                backend,
                postgres_url=options.postgres_url,
                directory=directory,
                keep=keep,
                existing=existing,
                settings=replace(SETTINGS, sqlite_mmap_size=options.sqlite_mmap_size),
            )
        )
    return opened


async def run_scale(
    options: ScaleOptions, progress: Callable[[str], None] = lambda _: None
) -> ScaleReport:
    """Run the scale benchmark on `options.backend`; the databases go unless `keep`."""
    async with AsyncExitStack() as stack:
        opened = await _open_pair(stack, options, options.backend, options.directory, options.keep)
        big, small = opened["big"], opened["small"]
        report = ScaleReport(
            backend=options.backend,
            server=await _server(big),
            big_users=options.users,
            small_users=options.small_users,
            versions=options.versions,
            load_seconds={},
            analyze_seconds={},
            before_analyze_ms={},
            ratios=[],
            sizes={},
        )
        report.big_users = await _prepare(big, options.users, options, report, progress)
        report.small_users = await _prepare(small, options.small_users, options, report, progress)
        for database in (big, small):
            report.sizes[database.label] = await relation_sizes(database)
        raw = {}
        for database, users in ((big, report.big_users), (small, report.small_users)):
            raw[database.label] = await stack.enter_async_context(open_raw_side(database))
            await check_raw_reads(database, raw[database.label], users)
        progress("timing, interleaved")
        report.ratios = await interleave(
            Target(big, report.big_users, raw["big"]),
            Target(small, report.small_users, raw["small"]),
            rounds=options.rounds,
            block=options.block,
            calls=CALLS,
        )
        if options.keep:
            report.notes += [f"kept {db.label} database: {db.name}" for db in (big, small)]
        return report


async def _server(database: ScaleDatabase) -> str:
    async with database.repo.engine.connect() as conn:
        if database.backend == "postgres":
            version = (await conn.exec_driver_sql("SHOW server_version")).scalar()
            return f"PostgreSQL {version}"
        version = (await conn.exec_driver_sql("SELECT sqlite_version()")).scalar()
        return f"SQLite {version}"


async def created_at_experiment(
    options: ScaleOptions, progress: Callable[[str], None] = lambda _: None
) -> list[VariantResult]:
    """The created_at index experiment on two loaded, analyzed Postgres databases.

    Every variant in turn, then the first (today's schema: no index) again, so
    the lead sees how far the machine drifted between the first and the last
    and the databases end as the migrations left them.
    """
    async with AsyncExitStack() as stack:
        opened = await _open_pair(stack, options, "postgres", None, keep=True)
        targets = {label: Target(db, await db.repo.count_users()) for label, db in opened.items()}
        names = tuple(VARIANTS)
        return await run_experiment(
            targets["big"],
            targets["small"],
            order=(*names, names[0]),
            rounds=options.rounds,
            block=options.block,
            progress=progress,
        )


async def working_set_experiment(
    options: ScaleOptions, progress: Callable[[str], None] = lambda _: None
) -> list[WorkingSetRow]:
    """The working-set experiment on two loaded, analyzed databases (kept as they are)."""
    async with AsyncExitStack() as stack:
        opened = await _open_pair(stack, options, options.backend, options.directory, keep=True)
        targets = {}
        for label, database in opened.items():
            users = await database.repo.count_users()
            raw = await stack.enter_async_context(open_raw_side(database))
            await check_raw_reads(database, raw, users)
            targets[label] = Target(database, users, raw)
        return await run_working_set(
            targets["big"],
            targets["small"],
            rounds=options.rounds,
            block=options.block,
            progress=progress,
        )
