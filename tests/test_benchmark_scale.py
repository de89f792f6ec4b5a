"""The scale benchmark (benchmarks/scaling/, issue #19) at tiny scale, on SQLite and Postgres.

50 users x 2 versions against 10: the run must load exactly those rows
through `upsert_many`, time every call on both sizes into finite ratios,
measure bytes per row of every table and index, time `get_latest_many`
before ANALYZE, and drop what it created. Speed is never asserted (it
depends on the machine and on whatever else runs on it).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Literal

import asyncpg
import pytest

from benchmarks.scaling import TARGETS, ScaleOptions, main, run_scale
from benchmarks.scaling.databases import open_scale_database
from benchmarks.scaling.load import load
from benchmarks.scaling.measure import CALLS, LIBRARY_CALLS, Target
from benchmarks.scaling.raw import check_raw_reads, open_raw_side
from benchmarks.scaling.working_set import run_working_set, spreads
from tests.support.databases import PostgresServer

USERS, SMALL_USERS, VERSIONS = 50, 10, 2


def tiny(backend: Literal["postgres", "sqlite"], **where: Any) -> ScaleOptions:
    """Options for a run of a few seconds: 50 users x 2 versions against 10."""
    return ScaleOptions(
        backend,
        USERS,
        small_users=SMALL_USERS,
        versions=VERSIONS,
        batch=20,
        rounds=2,
        block=3,
        **where,
    )


async def _scale_databases(admin_url: str) -> set[str]:
    """The databases a full scale run makes (the working-set test's have other names)."""
    conn = await asyncpg.connect(admin_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'snapshot_repo_scale_big_%' "
            "OR datname LIKE 'snapshot_repo_scale_small_%'"
        )
    finally:
        await conn.close()
    return {row[0] for row in rows}


async def _check_run(options: ScaleOptions) -> None:
    report = await run_scale(options)
    assert (report.big_users, report.small_users) == (USERS, SMALL_USERS)
    assert set(report.load_seconds) == set(report.analyze_seconds) == {"big", "small"}
    for label in ("big", "small"):
        times = report.before_analyze_ms[label]
        assert len(times) == 3
        assert all(math.isfinite(t) and t > 0 for t in times)
    assert [ratio.call for ratio in report.ratios] == list(CALLS)
    for ratio in report.ratios:
        assert ratio.calls_each > 0
        for value in (ratio.p50_ratio, ratio.p99_ratio, ratio.big_p99_us, ratio.small_p50_us):
            assert math.isfinite(value), ratio
            assert value > 0, ratio
    for label, users in (("big", USERS), ("small", SMALL_USERS)):
        sizes = {size.relation: size for size in report.sizes[label]}
        # Measured before the timed writes: exactly what the load wrote.
        assert sizes["snapshot_latest"].rows == users
        assert sizes["snapshot_history"].rows == users * VERSIONS
        history_indexes = [
            name
            for name, size in sizes.items()
            if size.table == "snapshot_history" and name != "snapshot_history"
        ]
        assert history_indexes  # indexes are listed, not only tables
        assert "ix_snapshot_history_created_at" not in sizes  # dropped by revision 0017
        for name in ("snapshot_latest", "snapshot_history", *history_indexes):
            per_row = sizes[name].bytes_per_row
            assert per_row is not None
            assert per_row > 0


async def test_sqlite_scale_run_reports_every_call_and_cleans_up(tmp_path: Path) -> None:
    await _check_run(tiny("sqlite", directory=tmp_path))
    assert os.listdir(tmp_path) == []  # both files (and their WAL) removed


async def test_postgres_scale_run_reports_every_call_and_drops_its_databases(
    postgres_server: PostgresServer,
) -> None:
    before = await _scale_databases(postgres_server.admin_url)
    await _check_run(tiny("postgres", postgres_url=postgres_server.admin_url))
    assert await _scale_databases(postgres_server.admin_url) <= before


def test_cli_writes_the_json_report_with_every_target(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    work = tmp_path / "files"
    work.mkdir()
    flags = ["--backend", "sqlite", "--scale", str(USERS), "--small-users", str(SMALL_USERS)]
    flags += ["--scale-versions", "2", "--rounds", "1", "--block", "2", "--batch", "25"]
    assert main([*flags, "--sqlite-dir", str(work), "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert set(report["targets"]) == set(TARGETS) == set(LIBRARY_CALLS)
    assert all(isinstance(target["met"], bool) for target in report["targets"].values())
    assert {size["relation"] for size in report["sizes"]["big"]} >= {"snapshot_history"}


async def test_the_floor_refuses_a_raw_side_that_reads_other_rows(tmp_path: Path) -> None:
    """`check_raw_reads` passes the raw side of the same database and refuses one that
    reads other versions (here: another database's), before anything is timed."""
    async with AsyncExitStack() as stack:
        opened = {}
        for label, versions in (("one", 1), ("two", 2)):
            database = await stack.enter_async_context(
                open_scale_database(
                    label, "sqlite", postgres_url="", directory=tmp_path, keep=False, existing=None
                )
            )
            await load(database, SMALL_USERS, versions, batch=5, workers=1, progress=print)
            opened[label] = database
        one_raw = await stack.enter_async_context(open_raw_side(opened["one"]))
        two_raw = await stack.enter_async_context(open_raw_side(opened["two"]))
        await check_raw_reads(opened["one"], one_raw, SMALL_USERS)
        await check_raw_reads(opened["two"], two_raw, SMALL_USERS)
        with pytest.raises(RuntimeError, match="reads other rows than the library on one"):
            await check_raw_reads(opened["one"], two_raw, SMALL_USERS)


def test_working_set_spreads_step_by_ten_from_the_small_size_to_every_user() -> None:
    assert spreads(1_000_000, 1000) == [1000, 10_000, 100_000, 1_000_000]
    assert spreads(50, 10) == [10, 50]
    assert spreads(10, 10) == [10]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_working_set_times_every_spread_on_both_sides(
    backend: Literal["postgres", "sqlite"], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Every (call, database, spread) cell is timed, the small database is the unit, and
    the ids of a spread come from its first K users only."""
    postgres_url = ""
    if backend == "postgres":
        postgres_url = request.getfixturevalue("postgres_server").admin_url
    async with AsyncExitStack() as stack:
        targets = {}
        for label, users in (("big", USERS), ("small", SMALL_USERS)):
            database = await stack.enter_async_context(
                open_scale_database(
                    f"working_set_{label}",  # not a name the full run's test looks for
                    backend,
                    postgres_url=postgres_url,
                    directory=tmp_path,
                    keep=False,
                    existing=None,
                )
            )
            await load(database, users, 1, batch=25, workers=1, progress=print)
            raw = await stack.enter_async_context(open_raw_side(database))
            targets[label] = Target(database, users, raw)
        read: list[str] = []
        reading = targets["big"].database.repo.get_latest_many

        async def spy(user_ids: list[str]) -> object:
            read.extend(user_ids)
            return await reading(user_ids)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(targets["big"].database.repo, "get_latest_many", spy)
            rows = await run_working_set(targets["big"], targets["small"], rounds=2, block=2)
    cells = [(row.call, row.database, row.drawn_from) for row in rows]
    assert cells == [
        (call, database, k)
        for call in ("get_latest_many(100)", "raw get_latest_many(100)")
        for database, k in (("small", SMALL_USERS), ("big", SMALL_USERS), ("big", USERS))
    ]
    for row in rows:
        assert math.isfinite(row.p99_ratio), row
        assert row.p50_us > 0, row
        if row.database == "small":
            assert row.p50_ratio == row.p99_ratio == 1.0
    # 3 rounds (one untimed) x 2 spreads of the big database x 2 calls a block x 100 ids;
    # the calls of one spread draw only from its first 10 users.
    assert len(read) == 3 * 2 * 2 * 100
    assert {int(uid.removeprefix("user-")) for uid in read} == set(range(USERS))
    narrow = [read[i : i + 100] for i in range(0, len(read), 100)]
    assert sum(max(int(u.removeprefix("user-")) for u in ids) < SMALL_USERS for ids in narrow) == 6


def test_experiments_need_both_loaded_databases(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--scale", "1000", "--working-set", "--quiet"]) == 2
    assert capsys.readouterr().out == "--working-set needs --big-database and --small-database\n"
    loaded = ["--big-database", "big.db", "--small-database", "small.db"]
    assert main(["--scale", "1000", "--created-at", "--backend", "sqlite", *loaded]) == 2
    assert "--created-at needs --big-database and --small-database on Postgres" in (
        capsys.readouterr().out
    )
