"""Running the benchmark: every backend, every round, every workload on every side.

`run_benchmark` is the whole run; the sides, the databases and the workloads
come from the modules named after them.
"""

from __future__ import annotations

import gc
import os
import platform
import sqlite3
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from .config import CORE, LIBRARY, WORKLOADS, BackendName, BenchConfig
from .databases import BackendUnavailable, open_mariadb, open_postgres, open_sqlite
from .parity import check_parity
from .results import BackendReport, BenchReport, WorkloadResult
from .state import STATE_VARIANTS, make_states, payload_of
from .stats import bulk_speedups, median, paired_ratio, summarize
from .timing import Sample
from .workloads import Workloads

__all__ = ["run_benchmark"]


async def _run_backend(
    backend: BackendName, config: BenchConfig, progress: Callable[[str], None]
) -> BackendReport:
    started = time.perf_counter()
    opener = {"sqlite": open_sqlite, "postgres": open_postgres, "mariadb": open_mariadb}[backend]
    async with opener(config) as setup:
        sides = setup.sides
        names = tuple(side.name for side in sides)
        workloads = Workloads(config, setup.seeder)
        progress(f"[{backend}] {setup.server}; seeding ({config.deep_versions:,}-version history)")
        await workloads.seed_shared(sides)
        await check_parity(sides)
        if config.warmup_ops:
            progress(f"[{backend}] warming up")
            for name in WORKLOADS:
                for side in sides:
                    await workloads.run(name, side, "warmup", warmup=True)
        samples: dict[str, dict[str, list[Sample | str]]] = {
            name: {side.name: [] for side in sides} for name in WORKLOADS
        }
        depth: dict[str, list[float]] = {side.name: [] for side in sides}
        for round_index in range(config.rounds):
            # Rotate who goes first so no side always runs on a warmer (or colder) machine.
            order = sides[round_index % len(sides) :] + sides[: round_index % len(sides)]
            progress(f"[{backend}] round {round_index + 1}/{config.rounds}")
            for name in WORKLOADS:
                for side in order:
                    sample = await workloads.run(name, side, f"r{round_index}", warmup=False)
                    samples[name][side.name].append(sample)
            for side in order:
                depth[side.name].append(await workloads.depth(side, f"r{round_index}"))
        results: dict[str, WorkloadResult] = {}
        # The core side against every side but the library's: the raw drivers and the peer.
        under_core = [side for side in names[1:] if side != CORE] if CORE in names else []
        for name in WORKLOADS:
            per_side = {side: summarize(samples[name][side]) for side in names}
            description, latency_per = workloads.describe(name)
            results[name] = WorkloadResult(
                description=description,
                latency_per=latency_per,
                results=per_side,
                ratio={raw: paired_ratio(per_side[LIBRARY], per_side[raw]) for raw in names[1:]},
                core_ratio={
                    other: paired_ratio(per_side[CORE], per_side[other]) for other in under_core
                },
            )
        durability = setup.durability
        server = setup.server
    return BackendReport(
        server=server,
        sides=names,
        durability=durability,
        workloads=results,
        depth_ratio={side: median(ratios) for side, ratios in depth.items()},
        bulk_speedup=bulk_speedups(results, names),
        seconds=time.perf_counter() - started,
    )


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _environment() -> dict[str, Any]:
    return {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": _loadavg(),
        "packages": {
            name: _package_version(name)
            for name in (
                "snapshot-repo",
                "sqlalchemy",
                "asyncpg",
                "aiosqlite",
                "asyncmy",
                "pydantic",
            )
        },
        "sqlite_library": sqlite3.sqlite_version,
        "payload_bytes": round(
            statistics.mean(len(payload_of(state)) for state in make_states(STATE_VARIANTS))
        ),
        "gc": {"enabled": gc.isenabled(), "thresholds": list(gc.get_threshold())},
        "note": (
            "Timings come from one process on a shared machine: compare ratios from the "
            "same run rather than absolute numbers across runs."
        ),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:  # not available on this platform
        return None


async def run_benchmark(
    config: BenchConfig, progress: Callable[[str], None] | None = None
) -> BenchReport:
    """Run every workload on every side of every configured backend; return the medians.

    Creates (Postgres, MariaDB) or opens (SQLite) the database, migrates it
    with the library, seeds it in bulk, checks that every side reads what
    every other side writes, warms up, then times `config.rounds` interleaved
    rounds. Throwaway databases and temporary files are removed on return or
    failure. A MariaDB server that cannot be reached (or no asyncmy) is
    skipped: reported in `BenchReport.skipped` and to `progress`, and the other
    backends run.

    Args:
        config: what to run and how big.
        progress: called with one line before each phase (e.g. to print to
            stderr); None for silence.

    Raises:
        ConfigurationError: a bad URL, or the database already holds snapshots.
        RuntimeError: the sides disagree on what was stored or on durability
            settings, or the schema has a required column the raw baselines
            do not know: no fair comparison is possible.
        SnapshotRepoError: the library failed (e.g. `StorageError`).
        asyncpg.PostgresError, asyncmy.errors.Error, OSError, sqlite3.Error: a raw
            driver failed.
    """
    report_progress = progress or (lambda _line: None)
    environment = _environment()
    started = time.perf_counter()
    backends: dict[str, BackendReport] = {}
    skipped: dict[str, str] = {}
    # Every timed phase starts with a full collection (`timing`); objects made before the
    # run are moved out of the collector's sight first, so that collection scans only the
    # run's own objects: in a large process (a test session) each took 70 ms, 80% of a run.
    gc.freeze()
    try:
        for backend in config.backends:
            try:
                backends[backend] = await _run_backend(backend, config, report_progress)
            except BackendUnavailable as exc:
                skipped[backend] = str(exc)
                report_progress(f"[{backend}] skipped: {exc}")
    finally:
        gc.unfreeze()
    environment["loadavg_end"] = _loadavg()
    environment["seconds"] = round(time.perf_counter() - started, 1)
    return BenchReport(config=config, environment=environment, backends=backends, skipped=skipped)
