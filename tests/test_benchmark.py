"""Smoke tests of the benchmark harness (benchmarks/harness/) on SQLite, Postgres and MariaDB.

Tiny sizes, so each run takes a few seconds. They check that the harness
runs every workload on every side (the library's core backend and the
plain-SQLAlchemy peer included) and reports ops/s, p50, p99 and the
library/side and core/side ratios in its JSON; they never assert speed,
which depends on the machine and on whatever else it is running. MariaDB
runs where the other tests find it (unreachable: skipped, or failed with
CI=true, by the `backend` fixture); the harness's own skip of a server it
cannot reach is tested on a port nothing listens on.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, cast

import asyncmy.cursors
import pytest
from sqlalchemy.engine import make_url

import snapshot_repo as sr
from benchmarks.harness import (
    CORE,
    WORKLOADS,
    BenchConfig,
    BenchState,
    RoundResult,
    SideResult,
    WorkloadResult,
    main,
    run_benchmark,
    timing,
)
from benchmarks.harness import workloads as workloads_module
from benchmarks.harness.databases import (
    open_mariadb,
    open_postgres,
    open_sqlite,
    sqlite_pragmas,
)
from benchmarks.harness.parity import check_parity
from benchmarks.harness.peer import PeerSide, PeerStatements, peer_engine
from benchmarks.harness.seeding import Seeder
from benchmarks.harness.sides import CoreSide, LibrarySide, Side
from benchmarks.harness.sql import raw_statements
from benchmarks.harness.state import make_states
from benchmarks.harness.stats import bulk_speedups, summarize
from benchmarks.harness.timing import Sample
from snapshot_repo.backends import backend_for
from snapshot_repo.backends.core import CoreBackend
from snapshot_repo.engine import normalize_url
from snapshot_repo.repository import DEFAULT_NAMESPACE
from tests.support.databases import Backend, Cart, run_blocking

ROUNDS = 2
TINY: dict[str, Any] = {
    "ops": 3,
    "read_ops": 4,
    "rounds": ROUNDS,
    "warmup_ops": 2,
    "concurrency": 3,
    "deep_versions": 150,
    "history_versions": 12,
    "history_users": 3,
    "read_users": 8,
    "write_users": 3,
    "delete_versions": 2,
    "bulk_size": 6,
    "bulk_batches": 2,
    # These tests check the harness, not durability: no fsync per SQLite commit (it was
    # most of their time, 10 to 30 s a run on this machine's disk).
    "settings": sr.EngineSettings(sqlite_synchronous="OFF"),
}
RAW_SIDES = {"sqlite": ["aiosqlite", "sqlite3"], "postgres": ["asyncpg"], "mariadb": ["asyncmy"]}
OPENERS = {"sqlite": open_sqlite, "postgres": open_postgres, "mariadb": open_mariadb}
NOBODY_LISTENS = "mariadb://root@127.0.0.1:1/test"  # port 1: refused at once
PEER = "sqlalchemy"  # plain SQLAlchemy Core, run with `peer=True` / `--peer`
BULK = {"bulk_write": "upsert_many", "bulk_read": "get_latest_many"}
TINY_FLAGS = [
    "--ops=3",
    "--read-ops=4",
    f"--rounds={ROUNDS}",
    "--warmup-ops=1",
    "--concurrency=3",
    "--deep-versions=150",
    "--history-versions=12",
    "--bulk-size=6",
    "--bulk-batches=1",
    "--sqlite-synchronous=OFF",  # as TINY's settings
    "--quiet",
]


def where(backend: Backend, url: str) -> dict[str, Any]:
    """BenchConfig fields that run the benchmark in the database at `url`."""
    if backend.name == "sqlite":
        return {"backends": ("sqlite",), "sqlite_path": Path(str(make_url(url).database))}
    if backend.name == "mariadb":
        return {"backends": ("mariadb",), "mariadb_url": url, "mariadb_create_database": False}
    return {"backends": ("postgres",), "postgres_url": url, "postgres_create_database": False}


def where_flags(backend: Backend, url: str) -> list[str]:
    if backend.name == "sqlite":
        return ["--backends=sqlite", f"--sqlite-path={make_url(url).database}"]
    if backend.name == "mariadb":
        return ["--backends=mariadb", f"--mariadb-url={url}", "--mariadb-use-database"]
    return ["--backends=postgres", f"--postgres-url={url}", "--postgres-use-database"]


def other_sides(backend: str, peer: bool, core: bool = False) -> list[str]:
    """Every side the library is compared with: the raw drivers, then the library on its
    core backend and the peer, each if asked for."""
    return [*RAW_SIDES[backend], *([CORE] if core else []), *([PEER] if peer else [])]


def paired(result: dict[str, Any], workload: str, top: str, bottom: str) -> float:
    """Median over rounds of `top`'s ops/s over `bottom`'s, recomputed from the JSON's rounds."""
    sides = result["workloads"][workload]["results"]
    pairs = zip(sides[top]["rounds"], sides[bottom]["rounds"], strict=True)
    return statistics.median(a["ops_per_s"] / b["ops_per_s"] for a, b in pairs)


def assert_complete(data: dict[str, Any], backend: str) -> None:
    """Every workload has ops/s, p50, p99 per side, a library ratio per other side and,
    with the core side, a core ratio per side but the library's."""
    result = data["backends"][backend]
    core = data["config"]["core"]
    others = other_sides(backend, data["config"]["peer"], core)
    under_core = [side for side in others if side != CORE] if core else []
    assert result["sides"] == ["library", *others]
    assert list(result["workloads"]) == list(WORKLOADS)
    for name, workload in result["workloads"].items():
        assert workload["description"]
        assert set(workload["results"]) == set(result["sides"])
        for side, outcome in workload["results"].items():
            if not outcome["available"] and name in ("delete_traceless", "delete_plain"):
                # Only SQLite erasures checkpoint the WAL; elsewhere no side runs these.
                assert backend != "sqlite", (name, side)
                assert outcome["reason"]
                continue
            if not outcome["available"]:
                # Only the library's bulk calls may be missing (on either of its backends),
                # and only while they don't exist.
                assert side in ("library", CORE), (name, side)
                assert name in BULK
                assert not hasattr(sr.SnapshotRepository, BULK[name])
                assert outcome["reason"]
                assert outcome["ops_per_s"] is None
                continue
            assert outcome["ops_per_s"] > 0, (name, side)
            assert 0 < outcome["p50_us"] <= outcome["p99_us"], (name, side)
            assert len(outcome["rounds"]) == ROUNDS
        library_available = workload["results"]["library"]["available"]
        assert set(workload["ratio"]) == set(others)
        for side, ratio in workload["ratio"].items():
            assert (ratio is not None and ratio > 0) if library_available else ratio is None
            if ratio is not None and workload["results"][side]["available"]:
                # library ops/s over the side's, never the other way round
                assert ratio == pytest.approx(paired(result, name, "library", side))
        assert list(workload["core_ratio"]) == under_core
        for side, ratio in workload["core_ratio"].items():
            if workload["results"][CORE]["available"] and workload["results"][side]["available"]:
                assert ratio == pytest.approx(paired(result, name, CORE, side))
            else:
                assert ratio is None
    for side in result["sides"]:
        assert result["depth_ratio"][side] > 0
    for kind in ("write", "read"):
        speedups = result["bulk_speedup"][kind]
        for other in others:
            assert speedups[other] > 0
        library_has_bulk = result["workloads"][f"bulk_{kind}"]["results"]["library"]["available"]
        assert (speedups["library"] is not None) == library_has_bulk


async def test_report_has_every_workload_on_every_side(backend: Backend) -> None:
    config = BenchConfig(**TINY, **where(backend, backend.fresh_url()), peer=True, core=True)
    report = await run_benchmark(config)
    data = json.loads(json.dumps(report.to_dict()))  # the JSON round trip is part of the contract
    assert list(data["backends"]) == [backend.name]
    assert_complete(data, backend.name)
    assert data["backends"][backend.name]["sides"][-2:] == [CORE, PEER]
    table = report.format_table()
    for name in WORKLOADS:
        assert name in table
    assert "core/side" in table
    # The write row of every side but the library's: its lib/side ratio, then (all but the
    # core's own row) its core/side ratio.
    rows = table.splitlines()
    write = rows.index(next(row for row in rows if row.startswith("write ")))
    others = other_sides(backend.name, peer=True, core=True)
    ratios = {row.split()[0]: row.split()[4:] for row in rows[write + 1 : write + 1 + len(others)]}
    assert {side: len(values) for side, values in ratios.items()} == {
        side: 1 if side == CORE else 2 for side in others
    }
    result = report.backends[backend.name].workloads["write"]
    assert ratios[CORE] == [f"{result.ratio[CORE]:.2f}"]


async def test_sqlite_phases_start_from_an_empty_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite by nature: every timed phase of every side starts with the WAL checkpointed
    and emptied, so no side's commit pays to checkpoint another side's writes."""
    path = tmp_path / "bench.db"
    wal = Path(f"{path}-wal")
    sizes: list[int] = []

    def wal_size() -> int:  # a stat of a local file, between timed phases
        return wal.stat().st_size if wal.exists() else 0

    def observing(timed: Any) -> Any:
        async def observed(*args: Any, **kwargs: Any) -> Any:
            sizes.append(wal_size())
            return await timed(*args, **kwargs)

        return observed

    for name in ("time_sequential", "time_concurrent"):
        monkeypatch.setattr(workloads_module, name, observing(getattr(workloads_module, name)))
    # With the core side and the peer: their pooled connections must not hold the WAL
    # either. One round and no warm-up: every phase is observed all the same, in half the time.
    config = {**TINY, "rounds": 1, "warmup_ops": 0}
    await run_benchmark(
        BenchConfig(**config, backends=("sqlite",), sqlite_path=path, peer=True, core=True)
    )
    sides = 1 + len(other_sides("sqlite", peer=True, core=True))
    assert len(sizes) >= len(WORKLOADS) * sides  # and one depth phase per side
    assert sizes == [0] * len(sizes)


async def test_sqlite_delete_workloads_differ_only_in_the_erasure_checkpoint(
    tmp_path: Path,
) -> None:
    """SQLite by nature: `delete` and `delete_traceless` leave the WAL empty on the library
    side (either backend), `delete_plain` (the library opened with secure delete off)
    leaves it holding the erasure; the raw sides checkpoint only in `delete_traceless`.
    So the three rows split the erasure's cost from the library's own."""
    path = tmp_path / "bench.db"
    wal = Path(f"{path}-wal")
    config = BenchConfig(**TINY, backends=("sqlite",), sqlite_path=path, peer=True, core=True)
    state = make_states(1)[0]

    def wal_is_empty() -> bool:  # a stat of a local file, after the side's call returned
        return wal.stat().st_size == 0

    async with open_sqlite(config) as setup:
        checkpointed: dict[tuple[str, str], bool] = {}
        for side in setup.sides:
            for kind in ("delete", "traceless_delete", "plain_delete"):
                user = f"{kind}-{side.name}"
                assert await side.write(user, state) == 1
                assert await side.write(user, state) == 2
                assert await getattr(side, kind)(user) == 2
                assert await side.get_latest(user) is None
                checkpointed[side.name, kind] = wal_is_empty()
    library_checkpoints = {"delete": True, "traceless_delete": True, "plain_delete": False}
    raw_checkpoints = {"delete": False, "traceless_delete": True, "plain_delete": False}
    libraries = ("library", CORE)
    assert {side.name for side in setup.sides} >= set(libraries)
    assert checkpointed == {
        (side.name, kind): (library_checkpoints if side.name in libraries else raw_checkpoints)[
            kind
        ]
        for side in setup.sides
        for kind in library_checkpoints
    }


# The command line's own work (flags, table, JSON, chart) is the same on every database,
# and `test_report_has_every_workload_on_every_side` runs every side on each: the two
# `--core` settings on two databases here (each run costs about 10 s of the suite).
@pytest.mark.parametrize(
    ("backend", "core"),
    [("sqlite", True), ("postgres", False)],
    ids=["sqlite-core", "postgres-no-core"],
    indirect=["backend"],
)
def test_main_prints_the_table_and_writes_json(
    backend: Backend, core: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "results.json"
    chart = tmp_path / "chart.png"
    flags = [*TINY_FLAGS, *where_flags(backend, backend.fresh_url()), f"--json={out}"]
    status = main([*flags, "--core" if core else "--no-core", f"--chart={chart}"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "lib/side" in printed
    assert PEER not in printed  # only with --peer
    assert ("core/side" in printed) is core
    assert "depth ratio" in printed
    data = json.loads(out.read_text())
    assert data["config"]["core"] is core
    assert (CORE in data["backends"][backend.name]["sides"]) is core
    assert_complete(data, backend.name)
    assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_chart_has_a_core_panel_per_backend_when_the_core_side_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Harness logic, no database: the library's panel gains a core bar, and a second panel
    per backend shows the core backend's own ratios (drawn from a saved JSON report)."""
    from benchmarks.harness import chart

    def workload(ratio: dict[str, float | None], core_ratio: dict[str, float | None]) -> Any:
        return {"ratio": ratio, "core_ratio": core_ratio}

    result = {
        "server": "SQLite 3",
        "sides": ["library", "aiosqlite", CORE],
        "workloads": {
            "write": workload({"aiosqlite": 0.9, CORE: 1.5}, {"aiosqlite": 0.6}),
            "delete_plain": workload({"aiosqlite": None, CORE: None}, {"aiosqlite": None}),
        },
    }
    report = {
        "config": {"rounds": 1},
        "environment": {"python": "3", "cpu_count": 2, "started_at": "now"},
        "backends": {"sqlite": result},
    }
    drawn: list[tuple[str, list[str], dict[str, dict[str, float]]]] = []
    monkeypatch.setattr(
        chart,
        "_draw",
        lambda _axes, panel: drawn.append((panel.numerator, panel.sides, panel.ratios)),
    )
    chart.write_chart(report, tmp_path / "chart.png")
    assert drawn == [
        ("library", ["aiosqlite", CORE], {"write": {"aiosqlite": 0.9, CORE: 1.5}}),
        (CORE, ["aiosqlite"], {"write": {"aiosqlite": 0.6}}),
    ]


async def test_a_raw_batch_returns_each_users_new_version(backend: Backend) -> None:
    """Every raw baseline's batch tells the caller the version each user got, as the
    library's `upsert_many` does (Postgres's raw batch always did; the comparison is
    of the same job)."""
    config = BenchConfig(**TINY, **where(backend, backend.fresh_url()))
    states = make_states(2)
    async with OPENERS[backend.name](config) as setup:
        raws = [side for side in setup.sides if not isinstance(side, LibrarySide)]
        assert raws
        for side in raws:
            batch = [(f"{side.name}-x", states[0]), (f"{side.name}-y", states[1])]
            for version in (1, 2):
                returned = await side.bulk_write(batch)
                assert isinstance(returned, list)
                assert sorted((str(user), int(v)) for user, v in returned) == [
                    (f"{side.name}-x", version),
                    (f"{side.name}-y", version),
                ]


@pytest.mark.parametrize("core", [False, True], ids=["fast", "core"])
async def test_each_library_side_runs_on_its_own_backend(backend: Backend, core: bool) -> None:
    """The library side runs on the database's fast backend, the core side (only with
    `core`) on the core backend, on its own repositories and engine."""
    config = BenchConfig(**TINY, **where(backend, backend.fresh_url()), core=core)
    async with OPENERS[backend.name](config) as setup:
        libraries = [side for side in setup.sides if isinstance(side, LibrarySide)]
        assert [side.name for side in libraries] == ["library", *([CORE] if core else [])]
        library = libraries[0].repository
        assert type(library._backend) is type(backend_for(library.engine))
        if backend.name != "mariadb":  # MariaDB's backend is the core one, in MySQL's SQL
            assert not isinstance(library._backend, CoreBackend)
        if core:
            assert isinstance(libraries[1], CoreSide)
            core_repo = libraries[1].repository
            assert isinstance(core_repo._backend, CoreBackend)
            assert type(core_repo._backend) is type(backend_for(core_repo.engine, "core"))
            assert core_repo.engine is not library.engine
            # On SQLite it has an opt-out repository of its own for `delete_plain`.
            expected = None if backend.name == "sqlite" else "only SQLite erasures"
            reason = libraries[1].plain_delete_unavailable()
            assert reason is None if expected is None else (reason or "").startswith(expected)


async def test_the_parity_check_holds_the_core_side_to_the_same_rows(tmp_path: Path) -> None:
    """The core side passes the check every side passes before timing, and a core side
    storing something else would abort the run."""

    class WrongCore(CoreSide):
        async def write(self, user_id: str, state: BenchState) -> int:
            return await super().write(user_id, make_states(3)[2])

    config = BenchConfig(**TINY, backends=("sqlite",), sqlite_path=tmp_path / "b.db", core=True)
    async with open_sqlite(config) as setup:
        await check_parity(setup.sides)
        core = next(side for side in setup.sides if isinstance(side, CoreSide))
        wrong = WrongCore(core.repository)
        with pytest.raises(RuntimeError, match="unexpected rows after core's writes"):
            await check_parity([*setup.sides[:-1], wrong])


async def _write_then_history(url: str, user_id: str, write: bool) -> list[int]:
    async with sr.SnapshotRepository.from_url(url, Cart) as repo:
        if write:
            await repo.upsert_latest(sr.Snapshot(user_id=user_id, state=Cart(items=["a"])))
        return [s.version for s in await repo.get_history(user_id)]


async def test_an_unreachable_mariadb_is_skipped_with_the_reason(tmp_path: Path) -> None:
    """Harness logic, no MariaDB: a server that cannot be reached skips that backend (in the
    report, its JSON and its table, with why), before anything is created; the others run."""
    config = BenchConfig(
        **{**TINY, "rounds": 1, "warmup_ops": 0},
        backends=("mariadb", "sqlite"),
        mariadb_url=NOBODY_LISTENS,
        sqlite_path=tmp_path / "bench.db",
    )
    progress: list[str] = []
    report = await run_benchmark(config, progress.append)
    assert list(report.backends) == ["sqlite"]
    assert list(report.skipped) == ["mariadb"]
    assert "127.0.0.1:1" in report.skipped["mariadb"]
    assert "unreachable" in report.skipped["mariadb"]
    assert f"[mariadb] skipped: {report.skipped['mariadb']}" in progress
    assert json.loads(json.dumps(report.to_dict()))["skipped"] == report.skipped
    assert f"== mariadb: skipped: {report.skipped['mariadb']} ==" in report.format_table()


def test_main_fails_when_every_backend_was_skipped(tmp_path: Path, capsys):
    out = tmp_path / "results.json"
    flags = [*TINY_FLAGS, "--backends=mariadb", f"--mariadb-url={NOBODY_LISTENS}"]
    status = main([*flags, f"--json={out}"])
    assert status == 3
    err = capsys.readouterr().err
    assert (
        "mariadb skipped: MariaDB at mariadb+asyncmy://root@127.0.0.1:1/test is unreachable" in err
    )
    assert "no backend ran" in err
    assert not out.exists()


def test_output_paths_are_checked_before_the_run(tmp_path: Path, capsys):
    for flag in ("--json", "--chart"):
        status = main([*TINY_FLAGS, "--backends=sqlite", f"{flag}={tmp_path / 'no' / 'x'}"])
        assert status == 2
        assert "no directory for the" in capsys.readouterr().err


def test_refuses_a_database_that_holds_snapshots(backend: Backend, tmp_path: Path, capsys):
    assert run_blocking(_write_then_history(backend.url, "keep-me", write=True)) == [1]
    out = tmp_path / "results.json"
    status = main([*TINY_FLAGS, *where_flags(backend, backend.url), f"--json={out}"])
    assert status == 2
    assert "already holds snapshots" in capsys.readouterr().err
    assert not out.exists()
    assert run_blocking(_write_then_history(backend.url, "keep-me", write=False)) == [1]


@pytest.mark.parametrize(
    "fields",
    [
        {"backends": ()},
        {"backends": ("mysql",)},
        {"ops": 0},
        {"read_users": 10, "bulk_size": 20},
        {"history_limit": 60, "history_versions": 50},
        {"postgres_synchronous_commit": "off", "postgres_create_database": False},
    ],
)
def test_inconsistent_configurations_are_refused_before_any_io(fields: dict[str, Any]):
    with pytest.raises(sr.ConfigurationError):
        BenchConfig(**fields)


async def test_the_peer_stores_what_the_library_reads_back(backend: Backend) -> None:
    """The plain-SQLAlchemy peer's writes, single and batched, are the library's rows:
    versions in order, history appended, its delete erasing every version."""
    settings = sr.EngineSettings()
    url = normalize_url(backend.url)
    pragmas = sqlite_pragmas(settings) if backend.name == "sqlite" else ()
    engine = peer_engine(url, settings, pragmas)
    scope = {"tenant": "", "namespace": DEFAULT_NAMESPACE}  # a repository's default scope
    peer = PeerSide(engine, PeerStatements(engine.dialect.name, scope))
    states = make_states(3)
    try:
        async with sr.SnapshotRepository.from_url(url, BenchState) as repo:
            assert await peer.write("solo", states[0]) == 1
            assert await peer.write("solo", states[1]) == 2
            await repo.upsert_latest(sr.Snapshot(user_id="b", state=states[2]))
            for batch in (
                [("a", states[0]), ("b", states[1])],
                [("b", states[2]), ("a", states[1])],
            ):
                assert await peer.bulk_write(batch) == 2
            history = {user: await repo.get_history(user) for user in ("solo", "a", "b")}
            assert [(s.version, s.state) for s in history["solo"]] == [
                (2, states[1]),
                (1, states[0]),
            ]
            assert [(s.version, s.state) for s in history["a"]] == [(2, states[1]), (1, states[0])]
            assert [(s.version, s.state) for s in history["b"]] == [
                (3, states[2]),
                (2, states[1]),
                (1, states[2]),
            ]
            latest = {s.user_id: s.version for s in await peer.bulk_read(["a", "b", "none"])}
            assert latest == {"a": 2, "b": 3}
            assert await peer.delete("b") == 3
            assert await repo.get_history("b") == []
            assert await peer.get_latest("b") is None
    finally:
        await engine.dispose()


class _ClockedHistory:
    """Answers get_history instantly, advancing a fake clock: 3 µs for the deep user, 1 µs
    for any other, and records who was asked."""

    def __init__(self) -> None:
        self.now = 0
        self.asked: list[str] = []

    async def get_history(self, user_id: str, limit: int) -> list[object]:
        self.asked.append(user_id)
        self.now += 3000 if user_id == "deep-0" else 1000
        return []

    async def level(self) -> None:
        """The seeder's pre-phase leveling: nothing to level here."""


async def test_depth_ratio_comes_from_alternating_deep_and_shallow_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Harness logic, no database: one phase alternates the deep user with shallow ones,
    and the ratio is p50 of the deep calls over p50 of the shallow calls."""
    clocked = _ClockedHistory()
    monkeypatch.setattr(timing.time, "perf_counter_ns", lambda: clocked.now)
    config = BenchConfig(**{**TINY, "read_ops": 10})
    workloads = workloads_module.Workloads(config, cast(Seeder, clocked))
    ratio = await workloads.depth(cast(Side, clocked), "r0")
    assert ratio == 3.0
    assert clocked.asked[0::2] == ["deep-0"] * 5
    assert all(user.startswith("h-") for user in clocked.asked[1::2])
    assert len(clocked.asked) == 10


def test_percentiles_pool_every_round_and_throughput_is_the_median_round() -> None:
    """Rounds are short (70 calls by default), so a round's own p99 is about its slowest
    call: the reported p50 and p99 are over every round's calls, ops/s the median round."""
    rounds = [
        Sample(items=100, wall_ns=100 * latency, latencies_ns=[latency] * 100)
        for latency in (1_000, 2_000, 3_000)
    ]
    result = summarize(rounds)
    assert result.ops_per_s == pytest.approx(500_000)  # the middle round: 100 calls in 200 µs
    assert result.p50_us == pytest.approx(2.0)
    assert result.p99_us == pytest.approx(3.0)  # the median of the rounds' p99s would be 2.0
    assert [r.p99_us for r in result.rounds] == pytest.approx([1.0, 2.0, 3.0])


def test_bulk_speedup_pairs_the_bulk_and_single_phases_of_each_round() -> None:
    """The speedup is a median of per-round quotients, as every library/raw ratio is,
    so a round where the machine was slow for both phases does not skew it."""

    def side(ops_per_s: list[float]) -> SideResult:
        rounds = tuple(RoundResult(ops, 1.0, 1.0, 1) for ops in ops_per_s)
        return SideResult(True, None, float(sorted(ops_per_s)[1]), 1.0, 1.0, rounds)

    def workload(result: SideResult) -> WorkloadResult:
        return WorkloadResult("", "call", {"library": result}, {})

    results = {
        "bulk_write": workload(side([10.0, 100.0, 30.0])),
        "bulk_write_single": workload(side([1.0, 20.0, 2.0])),
        "bulk_read": workload(side([8.0, 40.0, 6.0])),
        "bulk_read_single": workload(side([2.0, 4.0, 1.0])),
    }
    speedups = bulk_speedups(results, ["library"])
    # Per round 10, 5 and 15: median 10 (the quotient of the medians would be 30 / 2 = 15).
    assert speedups["write"]["library"] == pytest.approx(10.0)
    # Per round 4, 10 and 6: median 6 (the quotient of the medians would be 8 / 2 = 4).
    assert speedups["read"]["library"] == pytest.approx(6.0)


def test_the_mariadb_baseline_batch_is_one_multi_row_upsert() -> None:
    """asyncmy's `executemany` sends one multi-row INSERT only when the VALUES holds
    placeholders alone; with the scope inline, the baseline's "one statement" batch was
    500 single-row statements, 500 round trips."""
    sql = raw_statements("mariadb", {"tenant": "", "namespace": DEFAULT_NAMESPACE})
    assert asyncmy.cursors.RE_INSERT_VALUES.match(sql.upsert)
    assert len(sql.upsert_row("u", b"{}", None)) == sql.upsert.count("%s")
