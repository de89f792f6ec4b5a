"""Benchmark: `snapshot_repo` against hand-written SQL on the raw drivers, in one process.

The question it answers is what the abstraction costs: the same workload runs
through the public `SnapshotRepository` API and through a careful
hand-written implementation on the bare driver (asyncpg on Postgres;
aiosqlite, and stdlib `sqlite3` on one worker thread, on SQLite), against the
same tables and with the same semantics and durability, so that the ratio
library/raw isolates the library's own overhead. A fourth kind of side, the
peer (`sqlalchemy`, see `_bench_peer`), runs the same workloads in plain
SQLAlchemy Core on the same drivers: the alternative a user would otherwise
write, so library/peer says what choosing the library buys.

What keeps the comparison fair:

- Same schema: the database is created empty and migrated by the library
  (`repo.migrate()`); the raw baselines write the same rows into the same
  tables (payload = the model's JSON bytes, `created_at` in the library's
  storage format) and a start-up check reads what each side wrote through
  every other side.
- Same semantics: a write bumps `snapshot_latest` with `INSERT ... ON
  CONFLICT DO UPDATE SET version = snapshot_latest.version + 1` and appends
  the same row to `snapshot_history` atomically (Postgres: one CTE statement;
  SQLite: `BEGIN IMMEDIATE`, two statements, `COMMIT`); reads decode with
  `Model.model_validate_json`; a delete removes the latest row first, then
  the history up to its version, in one transaction.
- A good raw baseline, not a strawman: statements are prepared once and
  cached by the drivers, each operation makes as few round trips as the
  driver allows, and the asyncpg pool skips its per-release reset query
  (SQLAlchemy's pool does not send one either).
- Same durability: Postgres with its own `synchronous_commit`; SQLite in WAL
  mode with the `synchronous` level, busy timeout and `secure_delete` taken
  from the library's `EngineSettings`, checked on every connection before
  timing.
- Same conditions: every round runs every workload on every side in turn
  (the order rotates per round), in one process and one event loop, after an
  untimed warm-up; the garbage collector is run before each timed phase and
  left enabled for both sides; medians across rounds are reported.

Entry points: `run_benchmark(BenchConfig(...))` returns a `BenchReport`
(`to_dict()` for JSON, `format_table()` for people); `main(argv)` is the
command line (`python benchmarks/run.py`, `snapshot-repo bench`), and
`add_arguments` / `config_from_args` let another parser embed its flags.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import gc
import json
import os
import platform
import random
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, cast, get_args

import aiosqlite
import asyncpg
from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ._bench_peer import BASELINE_COLUMNS, PEER, PeerStatements, peer_engine
from .engine import EngineSettings, SqliteSynchronous, normalize_url
from .errors import ConfigurationError, SnapshotRepoError
from .repository import SnapshotRepository
from .snapshot import Snapshot
from .tables import history_table, latest_table

__all__ = [
    "DEFAULT_JSON_PATH",
    "DEFAULT_POSTGRES_URL",
    "LIBRARY",
    "POSTGRES_URL_ENV",
    "WORKLOADS",
    "BackendName",
    "BackendReport",
    "BenchConfig",
    "BenchReport",
    "BenchState",
    "RoundResult",
    "SideResult",
    "SynchronousCommit",
    "WorkloadResult",
    "add_arguments",
    "build_parser",
    "config_from_args",
    "main",
    "run_benchmark",
]

BackendName = Literal["sqlite", "postgres"]
SynchronousCommit = Literal["on", "off", "local", "remote_write", "remote_apply"]

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
"""The server the benchmark creates its throwaway database on, unless told otherwise."""

POSTGRES_URL_ENV = "SNAPSHOT_REPO_BENCH_POSTGRES_URL"
DEFAULT_JSON_PATH = "benchmark-results.json"

LIBRARY = "library"
"""The name of the library's side in reports; the raw sides are named after their driver,
the plain-SQLAlchemy peer `PEER` ("sqlalchemy")."""

WORKLOADS: tuple[str, ...] = (
    "write",
    "write_concurrent",
    "get_latest",
    "get_history_shallow",
    "get_history_deep",
    "delete",
    "delete_traceless",
    "delete_plain",
    "bulk_write",
    "bulk_write_single",
    "bulk_read",
    "bulk_read_single",
)
"""Every workload, in the order they run and are reported."""

_BULK_PAIRS = {
    "write": ("bulk_write", "bulk_write_single"),
    "read": ("bulk_read", "bulk_read_single"),
}
_STATE_VARIANTS = 64
_USERS_PER_WRITER = 8  # users each concurrent writer cycles over
_SEED_TIMEOUT = 600.0  # seconds: bulk seeding of a deep history is one long statement
_EXIT_OK, _EXIT_USAGE, _EXIT_STORAGE, _EXIT_INTERRUPTED = 0, 2, 3, 130
_ResultT = TypeVar("_ResultT")
_ArgT = TypeVar("_ArgT")


class BenchState(BaseModel):
    """The state every workload stores: a few scalar fields and a list of strings, ~1 KB as JSON.

    Representative of the per-user state the library is for (a cart, an
    agent's memory), and large enough that payload transfer and JSON decoding
    weigh in as they would in production.
    """

    model_config = ConfigDict(hide_input_in_errors=True)

    owner: str
    counter: int
    balance: float
    active: bool
    tags: list[str]


def _make_states(count: int) -> list[BenchState]:
    """`count` distinct states of about 1 KB each, built before timing starts."""
    return [
        BenchState(
            owner=f"owner-{i:04d}",
            counter=i,
            balance=round(1000.0 + i * 3.25, 2),
            active=i % 2 == 0,
            tags=[f"tag-{i:04d}-{j:02d}-abcdefghijklmnop" for j in range(30)],
        )
        for i in range(count)
    ]


def _payload(state: BenchState) -> bytes:
    """The raw baselines' payload: pydantic's JSON, as the library stores it."""
    return state.model_dump_json().encode()


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What to run and how big; the defaults take under 3 minutes for both backends on 2 cores.

    Attributes:
        backends: which databases to benchmark, in order.
        ops: timed operations per side, per round, for the write and delete workloads.
        read_ops: timed operations per side, per round, for the single-read workloads.
        rounds: how many times every workload runs on every side; medians are reported.
        warmup_ops: untimed operations per workload and side before the first round.
        concurrency: concurrent writers in `write_concurrent`.
        deep_versions: history depth of the one user of `get_history_deep`.
        history_versions: history depth of the users of `get_history_shallow`.
        history_users: how many users `get_history_shallow` picks from.
        history_limit: the `limit` of every `get_history` call.
        read_users: how many single-version users the reads pick from.
        write_users: how many users the sequential writes cycle through.
        delete_versions: versions of each user a delete erases.
        bulk_size: snapshots per bulk call (and single calls in the `*_single` workloads).
        bulk_batches: bulk calls per side, per round.
        postgres_url: with `postgres_create_database`, the server (and the
            maintenance database to connect to) on which a throwaway database is
            created and dropped afterwards; otherwise the database to run in.
        postgres_create_database: create a throwaway database (needs the
            CREATEDB right) rather than run in `postgres_url`'s database.
        postgres_synchronous_commit: None runs with the server's setting (on
            by default); a value is set on the throwaway database for every
            side (e.g. "off" to take fsync waits out of the comparison).
        sqlite_path: the SQLite file to run in; None: a file in a temporary
            directory removed afterwards. Put it on the disk you care about:
            on tmpfs an fsync costs nothing.
        settings: the library's engine settings; the raw baselines take their
            pool size, timeouts and SQLite pragmas from the same object.
        seed: seeds the random choice of users, so runs are repeatable.
        peer: also run the peer, plain SQLAlchemy Core (`_bench_peer`). Off by
            default: its calls are 2 to 10 times slower than the other sides',
            so it about doubles the run (both backends on 2 cores: 64 to 68 s
            without, 138 s with).
    """

    backends: tuple[BackendName, ...] = ("sqlite", "postgres")
    # Many short rounds rather than a few long ones: a median of nine pairings of the sides
    # rather than three, on a machine whose fsync switches between two speeds at second
    # scale or faster. Postgres sequential writes measured 0.69 to 1.31 of asyncpg over
    # four runs of 3 rounds of 200, and 0.79 to 1.17 over six runs of 9 rounds of 70.
    ops: int = 70
    read_ops: int = 700
    rounds: int = 9
    warmup_ops: int = 20
    concurrency: int = 16
    deep_versions: int = 100_000
    history_versions: int = 50
    history_users: int = 200
    history_limit: int = 10
    read_users: int = 1000
    write_users: int = 100
    delete_versions: int = 3
    bulk_size: int = 500
    bulk_batches: int = 2
    postgres_url: str = DEFAULT_POSTGRES_URL
    postgres_create_database: bool = True
    postgres_synchronous_commit: SynchronousCommit | None = None
    sqlite_path: Path | None = None
    settings: EngineSettings = field(default_factory=EngineSettings)
    seed: int = 1
    peer: bool = False

    def __post_init__(self) -> None:
        if not self.backends:
            raise ConfigurationError("choose at least one backend")
        for backend in self.backends:
            if backend not in get_args(BackendName):
                raise ConfigurationError(f"unknown backend {backend!r}: use sqlite or postgres")
        if len(set(self.backends)) != len(self.backends):
            raise ConfigurationError("a backend is listed twice")
        positive = (
            "ops read_ops rounds concurrency deep_versions history_versions history_users "
            "history_limit read_users write_users delete_versions bulk_size bulk_batches"
        )
        for name in positive.split():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a positive integer, not {value!r}")
        if self.postgres_synchronous_commit is not None:
            if self.postgres_synchronous_commit not in get_args(SynchronousCommit):
                raise ConfigurationError(
                    f"unknown synchronous_commit {self.postgres_synchronous_commit!r}"
                )
            if not self.postgres_create_database:
                # Changing a setting of a database we did not create would outlive the run.
                raise ConfigurationError(
                    "postgres_synchronous_commit needs a throwaway database "
                    "(not postgres_use_database)"
                )
        if self.warmup_ops < 0:
            raise ConfigurationError(f"warmup_ops must be >= 0, not {self.warmup_ops}")
        if self.read_users < self.bulk_size:
            # A bulk read asks for bulk_size distinct existing users.
            raise ConfigurationError(
                f"read_users ({self.read_users}) must be at least bulk_size ({self.bulk_size})"
            )
        if self.history_limit > self.history_versions:
            raise ConfigurationError(
                f"history_limit ({self.history_limit}) must not exceed "
                f"history_versions ({self.history_versions})"
            )

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready values (the URL without its password)."""
        values = asdict(self)
        values["backends"] = list(self.backends)
        values["sqlite_path"] = None if self.sqlite_path is None else str(self.sqlite_path)
        values["postgres_url"] = _hide_password(self.postgres_url)
        return values


@dataclass(frozen=True, slots=True)
class RoundResult:
    """One side's measurement of one workload in one round.

    Attributes:
        ops_per_s: items done per second of wall time (snapshots for bulk workloads).
        p50_us: median latency of one call, in microseconds.
        p99_us: 99th-percentile latency of one call, in microseconds.
        items: how many items (operations, or snapshots for bulk workloads) were timed.
    """

    ops_per_s: float
    p50_us: float
    p99_us: float
    items: int


@dataclass(frozen=True, slots=True)
class SideResult:
    """One side's result for one workload: medians across rounds, or why it did not run.

    Attributes:
        available: False when the side lacks the capability (e.g. no `upsert_many`).
        reason: why it is not available; None when it is.
        ops_per_s: median across rounds of `RoundResult.ops_per_s`.
        p50_us: median latency of one call, over every round's calls.
        p99_us: 99th-percentile latency of one call, over every round's calls (a
            round's own p99 of 70 calls is about its slowest call).
        rounds: every round's measurement, in order.
    """

    available: bool
    reason: str | None
    ops_per_s: float | None
    p50_us: float | None
    p99_us: float | None
    rounds: tuple[RoundResult, ...]


@dataclass(frozen=True, slots=True)
class WorkloadResult:
    """One workload on one backend, every side.

    Attributes:
        description: what one call does, with this run's sizes.
        latency_per: what one latency sample covers ("call" or "call of N snapshots").
        results: per side name ("library", then the raw drivers).
        ratio: per raw side, the median across rounds of library ops/s divided
            by that side's ops/s in the same round; None when the library side
            is not available. Above 1: the library is faster.
    """

    description: str
    latency_per: str
    results: dict[str, SideResult]
    ratio: dict[str, float | None]


@dataclass(frozen=True, slots=True)
class BackendReport:
    """Every workload on one database.

    Attributes:
        server: the database's name and version.
        sides: side names, the library first.
        durability: the durability settings every side was checked to run with.
        workloads: per workload name, in `WORKLOADS` order.
        depth_ratio: per side, p50 of `get_history` on the deep user / p50 on
            shallow users, the two kinds of call alternating in one timed
            phase per round (`_Workloads.depth`); median over rounds. About 1
            when reads are O(limit) at any depth.
        bulk_speedup: for "write" and "read", per side, bulk throughput divided
            by the throughput of the same snapshots done one call each, in the
            same round; median over rounds. None when the side has no bulk call.
        seconds: wall time for this backend, setup and seeding included.
    """

    server: str
    sides: tuple[str, ...]
    durability: dict[str, str]
    workloads: dict[str, WorkloadResult]
    depth_ratio: dict[str, float | None]
    bulk_speedup: dict[str, dict[str, float | None]]
    seconds: float


@dataclass(frozen=True, slots=True)
class BenchReport:
    """The whole run: configuration, environment, and one report per backend."""

    config: BenchConfig
    environment: dict[str, Any]
    backends: dict[str, BackendReport]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values (what `--json` writes)."""
        return {
            "config": self.config.to_dict(),
            "environment": self.environment,
            "backends": {name: asdict(report) for name, report in self.backends.items()},
        }

    def format_table(self) -> str:
        """A readable table per backend, as printed by `main`."""
        return _format_report(self)


# --- the sides: one interface, the library and one raw implementation per driver ---


class _SnapshotLike(Protocol):
    """What both `Snapshot` and the raw baselines' rows offer, for the parity check."""

    @property
    def user_id(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def schema_version(self) -> int | None: ...

    @property
    def state(self) -> BenchState: ...

    @property
    def created_at(self) -> datetime | None: ...


@dataclass(frozen=True, slots=True)
class _RawSnapshot:
    """A row decoded by a raw baseline: what hand-written code would hand its caller."""

    user_id: str
    version: int
    schema_version: int
    state: BenchState
    created_at: datetime


class _Side(abc.ABC):
    """One implementation of the operations every workload times."""

    name: str

    @abc.abstractmethod
    async def write(self, user_id: str, state: BenchState) -> int:
        """Store `state` as the user's next version; return that version."""

    @abc.abstractmethod
    async def get_latest(self, user_id: str) -> _SnapshotLike | None:
        """The user's newest version, decoded."""

    @abc.abstractmethod
    async def get_history(self, user_id: str, limit: int) -> Sequence[_SnapshotLike]:
        """The user's newest `limit` versions, newest first, decoded."""

    @abc.abstractmethod
    async def delete(self, user_id: str) -> int:
        """Erase the user; return how many versions were erased."""

    def traceless_delete_unavailable(self) -> str | None:
        """Why `traceless_delete` cannot run on this side, or None if it can."""
        return "only SQLite erasures checkpoint the WAL (Postgres: see `delete`)"

    async def traceless_delete(self, user_id: str) -> int:
        """`delete`, then leave no byte of the user in the files, as the library's
        SQLite erasure does: checkpoint the WAL into the database file and truncate it."""
        raise NotImplementedError(self.traceless_delete_unavailable())

    def plain_delete_unavailable(self) -> str | None:
        """Why `plain_delete` cannot run on this side, or None if it can."""
        return self.traceless_delete_unavailable()  # both exist to split SQLite's erasure cost

    async def plain_delete(self, user_id: str) -> int:
        """`delete` without the checkpoint that makes the library's SQLite erasure
        traceless: what `delete` is on every side but the library's."""
        return await self.delete(user_id)

    def bulk_write_unavailable(self) -> str | None:
        """Why `bulk_write` cannot run on this side, or None if it can."""
        return None

    def bulk_read_unavailable(self) -> str | None:
        """Why `bulk_read` cannot run on this side, or None if it can."""
        return None

    @abc.abstractmethod
    async def bulk_write(self, items: Sequence[tuple[str, BenchState]]) -> object:
        """Store one new version for each (distinct) user of `items`, atomically."""

    @abc.abstractmethod
    async def bulk_read(self, user_ids: Sequence[str]) -> object:
        """The newest version of each of `user_ids`, decoded."""


class _LibrarySide(_Side):
    """The public `SnapshotRepository` API, as an application would call it.

    Building the `Snapshot` argument is inside the timed call: the API
    requires it, so it is part of what using the library costs.
    """

    name = LIBRARY

    def __init__(
        self,
        repo: SnapshotRepository[BenchState],
        untraced: SnapshotRepository[BenchState] | None = None,
    ) -> None:
        """`untraced`: the same database opened with `sqlite_secure_delete=False` (SQLite)."""
        self._repo = repo
        self._untraced = untraced
        # The bulk calls may not exist yet: detected, never assumed.
        upsert_many = getattr(repo, "upsert_many", None)
        get_latest_many = getattr(repo, "get_latest_many", None)
        self._upsert_many: Callable[[list[Snapshot[BenchState]]], Awaitable[object]] | None = (
            upsert_many if callable(upsert_many) else None
        )
        self._get_latest_many: Callable[[list[str]], Awaitable[object]] | None = (
            get_latest_many if callable(get_latest_many) else None
        )

    async def write(self, user_id: str, state: BenchState) -> int:
        stored = await self._repo.upsert_latest(Snapshot(user_id=user_id, state=state))
        return stored.version

    async def get_latest(self, user_id: str) -> _SnapshotLike | None:
        return await self._repo.get_latest(user_id)

    async def get_history(self, user_id: str, limit: int) -> Sequence[_SnapshotLike]:
        return await self._repo.get_history(user_id, limit=limit)

    async def delete(self, user_id: str) -> int:
        return await self._repo.delete(user_id)

    def traceless_delete_unavailable(self) -> str | None:
        if self._repo.engine.dialect.name == "sqlite":
            return None
        return super().traceless_delete_unavailable()

    async def traceless_delete(self, user_id: str) -> int:
        return await self._repo.delete(user_id)  # its erasure checkpoints by itself

    def plain_delete_unavailable(self) -> str | None:
        if self._untraced is None:
            return super().plain_delete_unavailable() or "no repository with secure delete off"
        return None

    async def plain_delete(self, user_id: str) -> int:
        assert self._untraced is not None
        return await self._untraced.delete(user_id)  # the opt-out: no checkpoint

    def bulk_write_unavailable(self) -> str | None:
        return None if self._upsert_many else "SnapshotRepository has no upsert_many"

    def bulk_read_unavailable(self) -> str | None:
        return None if self._get_latest_many else "SnapshotRepository has no get_latest_many"

    async def bulk_write(self, items: Sequence[tuple[str, BenchState]]) -> object:
        assert self._upsert_many is not None
        return await self._upsert_many(
            [Snapshot(user_id=user_id, state=state) for user_id, state in items]
        )

    async def bulk_read(self, user_ids: Sequence[str]) -> object:
        assert self._get_latest_many is not None
        return await self._get_latest_many(list(user_ids))


_CHECKPOINT = "PRAGMA wal_checkpoint(TRUNCATE)"
"""What the library's SQLite erasure runs after its commit, so erased bytes leave the WAL."""


@dataclass(frozen=True, slots=True)
class _Sql:
    """The raw baselines' statements for one dialect and one scope.

    The library keys rows by its table's primary key, which may put scope
    columns (e.g. tenant, namespace) before `user_id`. The raw statements
    take those columns from the library's metadata and their values from a
    row the library wrote (`_scope_of`), so they address exactly the rows
    the library does, through the same index.
    """

    write: str
    upsert: str
    append: str
    bulk_write: str
    latest: str
    latest_many: str
    history: str
    delete_latest: str
    delete_history: str
    seed_history: str
    seed_latest: str


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _statements(backend: BackendName, scope: dict[str, str]) -> _Sql:
    """Build every raw statement for `backend`, with the scope columns inlined as constants."""
    columns = ", ".join([*(f'"{name}"' for name in scope), *BASELINE_COLUMNS])
    selected = ", ".join(BASELINE_COLUMNS)
    fixed = "".join(f"{_literal(value)}, " for value in scope.values())  # scope values first
    where = "".join(f'"{name}" = {_literal(value)} AND ' for name, value in scope.items())
    key = ", ".join([*(f'"{name}"' for name in scope), "user_id"])
    bump = f"""ON CONFLICT ({key}) DO UPDATE SET
        version = snapshot_latest.version + 1,
        schema_version = excluded.schema_version,
        payload = excluded.payload,
        created_at = excluded.created_at"""
    if backend == "postgres":
        # Every write is one statement, so one round trip under autocommit.
        return _Sql(
            write=f"""
WITH written AS (
    INSERT INTO snapshot_latest ({columns})
    VALUES ({fixed}$1::varchar, 1, $2::integer, $3::bytea, $4::timestamptz)
    {bump}
    RETURNING version
)
INSERT INTO snapshot_history ({columns})
SELECT {fixed}$1::varchar, version, $2::integer, $3::bytea, $4::timestamptz FROM written
RETURNING version""",
            upsert="",
            append="",
            # A batch is one statement too: the rows travel as arrays, unnested server-side.
            bulk_write=f"""
WITH batch AS (
    SELECT * FROM unnest($1::varchar[], $2::integer[], $3::bytea[])
        AS b(user_id, schema_version, payload)
), written AS (
    INSERT INTO snapshot_latest ({columns})
    SELECT {fixed}user_id, 1, schema_version, payload, $4::timestamptz FROM batch
    {bump}
    RETURNING {selected}
)
INSERT INTO snapshot_history ({columns})
SELECT {fixed}{selected} FROM written
RETURNING user_id, version""",
            latest=f"SELECT {selected} FROM snapshot_latest WHERE {where}user_id = $1",
            latest_many=(
                f"SELECT {selected} FROM snapshot_latest WHERE {where}user_id = ANY($1::varchar[])"
            ),
            history=(
                f"SELECT {selected} FROM snapshot_history WHERE {where}user_id = $1 "
                "ORDER BY version DESC LIMIT $2"
            ),
            # Deleting the latest row first takes its lock, so every write of the user
            # that committed before is visible to the history delete (a second
            # statement: a new READ COMMITTED snapshot); the version bound spares a
            # user written again meanwhile.
            delete_latest=(
                f"DELETE FROM snapshot_latest WHERE {where}user_id = $1 RETURNING version"
            ),
            delete_history=(
                f"DELETE FROM snapshot_history WHERE {where}user_id = $1 AND version <= $2"
            ),
            seed_history=f"""
INSERT INTO snapshot_history ({columns})
SELECT {fixed}$1::text || u, v, 1, $4::bytea, $5::timestamptz
FROM generate_series(0, $2::integer - 1) AS u, generate_series(1, $3::integer) AS v""",
            seed_latest=f"""
INSERT INTO snapshot_latest ({columns})
SELECT {fixed}$1::text || u, $3::integer, 1, $4::bytea, $5::timestamptz
FROM generate_series(0, $2::integer - 1) AS u""",
        )
    # SQLite cannot put DML in a CTE: two statements inside BEGIN IMMEDIATE.
    upsert = f"INSERT INTO snapshot_latest ({columns}) VALUES ({fixed}?, 1, ?, ?, ?)\n{bump}"
    users = "WITH RECURSIVE u(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM u WHERE i + 1 < :users)"
    return _Sql(
        write=upsert + "\nRETURNING version",
        upsert=upsert,
        append=f"INSERT INTO snapshot_history ({columns}) VALUES ({fixed}?, ?, ?, ?, ?)",
        # After an executemany of upserts, under the write lock, the batch's latest
        # rows are exactly the versions to append: one statement copies them.
        bulk_write=f"""
INSERT INTO snapshot_history ({columns})
SELECT {fixed}{selected} FROM snapshot_latest
WHERE {where}user_id IN (SELECT value FROM json_each(?))""",
        latest=f"SELECT {selected} FROM snapshot_latest WHERE {where}user_id = ?",
        latest_many=(
            f"SELECT {selected} FROM snapshot_latest "
            f"WHERE {where}user_id IN (SELECT value FROM json_each(?))"
        ),
        history=(
            f"SELECT {selected} FROM snapshot_history WHERE {where}user_id = ? "
            "ORDER BY version DESC LIMIT ?"
        ),
        delete_latest=f"DELETE FROM snapshot_latest WHERE {where}user_id = ? RETURNING version",
        delete_history=f"DELETE FROM snapshot_history WHERE {where}user_id = ? AND version <= ?",
        seed_history=f"""
INSERT INTO snapshot_history ({columns})
{users}, v(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM v WHERE n < :versions)
SELECT {fixed}:prefix || i, n, 1, :payload, :created_at FROM u, v""",
        seed_latest=f"""
INSERT INTO snapshot_latest ({columns})
{users} SELECT {fixed}:prefix || i, :versions, 1, :payload, :created_at FROM u""",
    )


def _scope_columns() -> list[str]:
    """The library's key columns before `user_id`; refuses a schema the baselines cannot fill.

    Raises:
        RuntimeError: the tables are no longer keyed by `user_id`, or have a
            required column the raw statements do not write: this module
            needs updating along with the schema.
    """
    key = [column.name for column in latest_table.primary_key.columns]
    if key[-1:] != ["user_id"] or [c.name for c in history_table.primary_key.columns] != [
        *key,
        "version",
    ]:
        raise RuntimeError(f"the raw baselines do not know this schema's keys: {key}")
    scope = key[:-1]
    for table in (latest_table, history_table):
        for column in table.columns:
            required = not column.nullable and column.server_default is None
            if required and column.name not in (*BASELINE_COLUMNS, *scope):
                raise RuntimeError(
                    f"{table.name}.{column.name} is required and the raw baselines do not "
                    "write it: update snapshot_repo/benchmark.py with the schema"
                )
    return scope


_SCOPE_PROBE = "benchmark-scope-probe"


async def _holds_snapshots(fetch_value: Callable[[str], Awaitable[Any]], table_exists: str) -> bool:
    """Whether either snapshot table exists and has a row; checked before anything changes.

    `table_exists` is a query template with a `{table}` field answering true or false.
    """
    for table in (latest_table.name, history_table.name):
        if await fetch_value(table_exists.format(table=_literal(table))) and await fetch_value(
            f"SELECT EXISTS (SELECT 1 FROM {table})"
        ):
            return True
    return False


async def _scope_of(
    repo: SnapshotRepository[BenchState], fetch: Callable[[str], Awaitable[Sequence[Any]]]
) -> dict[str, str]:
    """The scope values the library writes under, read from a row it wrote (then erased).

    `fetch` runs a query on the raw side and returns its first row.
    """
    columns = _scope_columns()
    if not columns:
        return {}
    await repo.upsert_latest(Snapshot(user_id=_SCOPE_PROBE, state=_make_states(1)[0]))
    quoted = ", ".join(f'"{name}"' for name in columns)
    row = await fetch(
        f"SELECT {quoted} FROM snapshot_latest WHERE user_id = {_literal(_SCOPE_PROBE)}"
    )
    await repo.delete(_SCOPE_PROBE)
    return {name: str(value) for name, value in zip(columns, row, strict=True)}


def _sqlite_time(moment: datetime) -> str:
    """`moment` as the library stores it on SQLite: naive UTC text with microseconds."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def _decode(row: Sequence[Any]) -> _RawSnapshot:
    """A raw row (asyncpg `Record` or sqlite3 tuple) as a decoded snapshot."""
    created_at = row[4]
    if isinstance(created_at, str):  # SQLite: naive UTC text
        created_at = datetime.fromisoformat(created_at).replace(tzinfo=UTC)
    return _RawSnapshot(
        user_id=row[0],
        version=row[1],
        schema_version=row[2],
        state=BenchState.model_validate_json(row[3]),
        created_at=created_at,
    )


def _distinct(user_ids: Sequence[str]) -> None:
    # One statement cannot bump a row twice (Postgres refuses; SQLite would leave a gap).
    if len(set(user_ids)) != len(user_ids):
        raise ValueError("a bulk write needs distinct user ids")


async def _keep_session(_connection: Any) -> None:
    """asyncpg pool reset that keeps the session as it is.

    The default reset sends `RESET ALL; UNLISTEN *; ...`, one extra round trip
    per release. These statements leave no session state behind, and
    SQLAlchemy's pool only rolls back (free outside a transaction), so the
    default would handicap the raw side. The pool still rolls back any open
    transaction before calling this.
    """


class _AsyncpgSide(_Side):
    """Hand-written SQL on an asyncpg pool: prepared statements, one round trip per call."""

    name = "asyncpg"

    def __init__(self, pool: Any, sql: _Sql) -> None:
        self._pool = pool
        self._sql = sql

    async def write(self, user_id: str, state: BenchState) -> int:
        payload = _payload(state)
        version: int = await self._pool.fetchval(
            self._sql.write, user_id, 1, payload, datetime.now(UTC)
        )
        return version

    async def get_latest(self, user_id: str) -> _RawSnapshot | None:
        row = await self._pool.fetchrow(self._sql.latest, user_id)
        return None if row is None else _decode(row)

    async def get_history(self, user_id: str, limit: int) -> list[_RawSnapshot]:
        return [_decode(row) for row in await self._pool.fetch(self._sql.history, user_id, limit)]

    async def delete(self, user_id: str) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            version = await conn.fetchval(self._sql.delete_latest, user_id)
            if version is None:
                return 0
            status: str = await conn.execute(self._sql.delete_history, user_id, version)
        return int(status.rsplit(" ", 1)[1])

    async def bulk_write(self, items: Sequence[tuple[str, BenchState]]) -> list[Any]:
        user_ids = [user_id for user_id, _ in items]
        _distinct(user_ids)
        payloads = [_payload(state) for _, state in items]
        rows: list[Any] = await self._pool.fetch(
            self._sql.bulk_write, user_ids, [1] * len(items), payloads, datetime.now(UTC)
        )
        return rows

    async def bulk_read(self, user_ids: Sequence[str]) -> list[_RawSnapshot]:
        rows = await self._pool.fetch(self._sql.latest_many, list(user_ids))
        return [_decode(row) for row in rows]


class _AiosqliteSide(_Side):
    """Hand-written SQL on one aiosqlite connection.

    One connection is shared by every task, so each call holds an
    `asyncio.Lock`: a read issued between another task's BEGIN and COMMIT
    would otherwise run inside that task's transaction. Each aiosqlite call
    is one hop to its thread; `execute_fetchall` runs and fetches in one hop.
    """

    name = "aiosqlite"

    def __init__(self, conn: aiosqlite.Connection, sql: _Sql) -> None:
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
        payload = _payload(state)
        created_at = _sqlite_time(datetime.now(UTC))
        async with self._transaction() as conn:
            rows = await conn.execute_fetchall(self._sql.write, (user_id, 1, payload, created_at))
            version = int(next(iter(rows))[0])
            await conn.execute(self._sql.append, (user_id, version, 1, payload, created_at))
        return version

    async def get_latest(self, user_id: str) -> _RawSnapshot | None:
        async with self._lock:
            rows = list(await self._conn.execute_fetchall(self._sql.latest, (user_id,)))
        return _decode(rows[0]) if rows else None

    async def get_history(self, user_id: str, limit: int) -> list[_RawSnapshot]:
        async with self._lock:
            rows = await self._conn.execute_fetchall(self._sql.history, (user_id, limit))
        return [_decode(row) for row in rows]

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
            await self._conn.execute(_CHECKPOINT)
        return erased

    async def bulk_write(self, items: Sequence[tuple[str, BenchState]]) -> int:
        user_ids = [user_id for user_id, _ in items]
        _distinct(user_ids)
        created_at = _sqlite_time(datetime.now(UTC))
        rows = [(user_id, 1, _payload(state), created_at) for user_id, state in items]
        async with self._transaction() as conn:
            await conn.executemany(self._sql.upsert, rows)
            cursor = await conn.execute(self._sql.bulk_write, (json.dumps(user_ids),))
        return cursor.rowcount

    async def bulk_read(self, user_ids: Sequence[str]) -> list[_RawSnapshot]:
        async with self._lock:
            rows = await self._conn.execute_fetchall(
                self._sql.latest_many, (json.dumps(list(user_ids)),)
            )
        return [_decode(row) for row in rows]


class _Sqlite3Thread:
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


class _Sqlite3Side(_Side):
    """Hand-written SQL on stdlib `sqlite3`, one connection owned by one worker thread.

    Each call is one hop to the thread, which runs the whole transaction, so
    calls are serialized by the thread itself and need no lock. Encoding and
    decoding stay on the event loop, as in the other sides.
    """

    name = "sqlite3"

    def __init__(self, thread: _Sqlite3Thread, sql: _Sql) -> None:
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

    def _bulk_write_sync(self, rows: list[tuple[str, int, bytes, str]], user_ids: str) -> int:
        def work(conn: sqlite3.Connection) -> int:
            conn.executemany(self._sql.upsert, rows)
            return conn.execute(self._sql.bulk_write, (user_ids,)).rowcount

        return self._thread.transaction(work)

    async def write(self, user_id: str, state: BenchState) -> int:
        payload = _payload(state)
        created_at = _sqlite_time(datetime.now(UTC))
        return await self._thread.call(self._write_sync, user_id, payload, created_at)

    async def get_latest(self, user_id: str) -> _RawSnapshot | None:
        rows = await self._thread.call(self._thread.fetch, self._sql.latest, (user_id,))
        return _decode(rows[0]) if rows else None

    async def get_history(self, user_id: str, limit: int) -> list[_RawSnapshot]:
        rows = await self._thread.call(self._thread.fetch, self._sql.history, (user_id, limit))
        return [_decode(row) for row in rows]

    async def delete(self, user_id: str) -> int:
        return await self._thread.call(self._delete_sync, user_id)

    def traceless_delete_unavailable(self) -> str | None:
        return None

    async def traceless_delete(self, user_id: str) -> int:
        def work() -> int:
            erased = self._delete_sync(user_id)
            self._thread.conn.execute(_CHECKPOINT)
            return erased

        return await self._thread.call(work)

    async def bulk_write(self, items: Sequence[tuple[str, BenchState]]) -> int:
        user_ids = [user_id for user_id, _ in items]
        _distinct(user_ids)
        created_at = _sqlite_time(datetime.now(UTC))
        rows = [(user_id, 1, _payload(state), created_at) for user_id, state in items]
        return await self._thread.call(self._bulk_write_sync, rows, json.dumps(user_ids))

    async def bulk_read(self, user_ids: Sequence[str]) -> list[_RawSnapshot]:
        rows = await self._thread.call(
            self._thread.fetch, self._sql.latest_many, (json.dumps(list(user_ids)),)
        )
        return [_decode(row) for row in rows]


class _PeerSide(_Side):
    """The peer: plain SQLAlchemy Core on its own async engine (see `_bench_peer`)."""

    name = PEER

    def __init__(self, engine: AsyncEngine, statements: PeerStatements) -> None:
        self._engine = engine
        self._sql = statements

    async def write(self, user_id: str, state: BenchState) -> int:
        params = {
            "user_id": user_id,
            "schema_version": 1,
            "payload": _payload(state),
            "created_at": datetime.now(UTC),
        }
        async with self._engine.begin() as conn:
            if self._sql.write is not None:  # Postgres: one statement
                return int((await conn.execute(self._sql.write, params)).scalar_one())
            _user_id, version = (await conn.execute(self._sql.upsert_returning, params)).one()
            await conn.execute(self._sql.append, {**params, "version": version})
        return int(version)

    async def get_latest(self, user_id: str) -> _RawSnapshot | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(self._sql.latest, {"user_id": user_id})).first()
        return None if row is None else _decode(row)

    async def get_history(self, user_id: str, limit: int) -> list[_RawSnapshot]:
        async with self._engine.connect() as conn:
            result = await conn.execute(self._sql.history, {"user_id": user_id, "limit": limit})
            rows = result.all()
        return [_decode(row) for row in rows]

    async def delete(self, user_id: str) -> int:
        async with self._engine.begin() as conn:
            version = (await conn.execute(self._sql.delete_latest, {"user_id": user_id})).scalar()
            if version is None:
                return 0
            params = {"user_id": user_id, "up_to": version}
            erased: int = (await conn.execute(self._sql.delete_history, params)).rowcount
        return erased

    def traceless_delete_unavailable(self) -> str | None:
        return (
            None
            if self._engine.dialect.name == "sqlite"
            else super().traceless_delete_unavailable()
        )

    async def traceless_delete(self, user_id: str) -> int:
        erased = await self.delete(user_id)
        async with self._engine.connect() as conn:
            await conn.exec_driver_sql(_CHECKPOINT)
        return erased

    async def bulk_write(self, items: Sequence[tuple[str, BenchState]]) -> int:
        user_ids = [user_id for user_id, _ in items]
        _distinct(user_ids)
        created_at = datetime.now(UTC)
        rows = [
            {
                "user_id": user_id,
                "schema_version": 1,
                "payload": _payload(state),
                "created_at": created_at,
            }
            for user_id, state in items
        ]
        async with self._engine.begin() as conn:
            written = (await conn.execute(self._sql.upsert_returning, rows)).all()
            for row, (_user_id, version) in zip(rows, written, strict=True):
                row["version"] = version
            await conn.execute(self._sql.append, rows)
        return len(written)

    async def bulk_read(self, user_ids: Sequence[str]) -> list[_RawSnapshot]:
        async with self._engine.connect() as conn:
            result = await conn.execute(self._sql.latest_many, {"user_ids": list(user_ids)})
            rows = result.all()
        return [_decode(row) for row in rows]


# --- seeding: untimed bulk SQL, so deep histories cost one statement, not 100k calls ---


class _Seeder(abc.ABC):
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


class _PostgresSeeder(_Seeder):
    def __init__(self, pool: Any, sql: _Sql) -> None:
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


class _SqliteSeeder(_Seeder):
    """Seeds through the `sqlite3` side's connection and thread."""

    def __init__(self, thread: _Sqlite3Thread, sql: _Sql) -> None:
        self._thread = thread
        self._sql = sql

    async def seed(self, prefix: str, users: int, versions: int, payload: bytes) -> None:
        params = {
            "prefix": prefix,
            "users": users,
            "versions": versions,
            "payload": payload,
            "created_at": _sqlite_time(datetime.now(UTC)),
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


# --- setting up a backend: database, migrations, connections, durability check ---


@dataclass
class _Setup:
    """One migrated, empty database with every side connected to it."""

    server: str
    sides: list[_Side]
    seeder: _Seeder
    durability: dict[str, str]


def _hide_password(url: str) -> str:
    try:
        return normalize_url(url).render_as_string(hide_password=True)
    except ConfigurationError:
        return "<not a database URL>"


def _asyncpg_dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _refuse_data(where: str) -> ConfigurationError:
    return ConfigurationError(
        f"{where} already holds snapshots: the benchmark runs only on an empty database"
    )


@asynccontextmanager
async def _postgres(config: BenchConfig) -> AsyncIterator[_Setup]:
    url = normalize_url(config.postgres_url)
    if url.get_backend_name() != "postgresql":
        raise ConfigurationError(f"not a Postgres URL: {_hide_password(config.postgres_url)}")
    settings = config.settings
    async with AsyncExitStack() as stack:
        if config.postgres_create_database:
            name = f"snapshot_repo_bench_{secrets.token_hex(4)}"
            admin = await asyncpg.connect(_asyncpg_dsn(url), timeout=settings.connect_timeout)
            try:
                await admin.execute(f'CREATE DATABASE "{name}"')
                if config.postgres_synchronous_commit is not None:
                    # A database default reaches every new session of both sides alike.
                    await admin.execute(
                        f'ALTER DATABASE "{name}" SET synchronous_commit = '
                        f"{config.postgres_synchronous_commit}"
                    )
            finally:
                await admin.close()
            stack.push_async_callback(_drop_database, url, name, settings.connect_timeout)
            url = url.set(database=name)
        pool = await asyncpg.create_pool(
            _asyncpg_dsn(url),
            min_size=settings.pool_size,
            max_size=settings.pool_size,
            timeout=settings.connect_timeout,
            command_timeout=settings.command_timeout,
            reset=_keep_session,
        )
        stack.push_async_callback(pool.close)
        if await _holds_snapshots(pool.fetchval, "SELECT to_regclass({table}) IS NOT NULL"):
            raise _refuse_data(_hide_password(config.postgres_url))
        repo = SnapshotRepository.from_url(url, BenchState, settings=settings)
        stack.push_async_callback(repo.close)
        await repo.migrate()
        scope = await _scope_of(repo, pool.fetchrow)
        sql = _statements("postgres", scope)
        sides: list[_Side] = [_LibrarySide(repo), _AsyncpgSide(pool, sql)]
        engines = {LIBRARY: repo.engine}
        if config.peer:
            peer = peer_engine(url, settings, ())
            stack.push_async_callback(peer.dispose)
            sides.append(_PeerSide(peer, PeerStatements("postgresql", scope)))
            engines[PEER] = peer
        commits = await _engine_answers(engines, ("SHOW synchronous_commit",))
        raw_commit = str(await pool.fetchval("SHOW synchronous_commit"))
        commits["asyncpg"] = [raw_commit]
        if any(values != [raw_commit] for values in commits.values()):
            raise RuntimeError(f"synchronous_commit differs between sides: {commits}")
        server = "PostgreSQL " + str(await pool.fetchval("SHOW server_version"))
        yield _Setup(
            server=server,
            sides=sides,
            seeder=_PostgresSeeder(pool, sql),
            durability={"synchronous_commit": raw_commit},
        )


async def _engine_answers(
    engines: Mapping[str, AsyncEngine], queries: Sequence[str]
) -> dict[str, list[str]]:
    """Each SQLAlchemy side's answers to `queries` (settings), read on one of its connections."""
    answers: dict[str, list[str]] = {}
    for name, engine in engines.items():
        async with engine.connect() as conn:
            answers[name] = [str((await conn.exec_driver_sql(query)).scalar()) for query in queries]
    return answers


async def _drop_database(url: URL, name: str, connect_timeout: float) -> None:
    admin = await asyncpg.connect(_asyncpg_dsn(url), timeout=connect_timeout)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _sqlite_pragmas(settings: EngineSettings) -> tuple[str, ...]:
    """The pragmas `snapshot_repo.engine` sets on its connections, from the same settings."""
    return (
        f"PRAGMA busy_timeout = {int(settings.busy_timeout * 1000)}",
        "PRAGMA journal_mode = WAL",
        f"PRAGMA synchronous = {settings.sqlite_synchronous}",
        f"PRAGMA secure_delete = {'ON' if settings.sqlite_secure_delete else 'OFF'}",
    )


_DURABILITY_QUERIES = (
    "PRAGMA journal_mode",
    "PRAGMA synchronous",
    "PRAGMA busy_timeout",
    "PRAGMA secure_delete",
)


def _open_sqlite3(path: Path, settings: EngineSettings) -> sqlite3.Connection:
    # isolation_level=None: the sqlite3 module must not begin transactions itself;
    # every write transaction is an explicit BEGIN IMMEDIATE, as in the library.
    conn = sqlite3.connect(path, timeout=settings.busy_timeout, isolation_level=None)
    for pragma in _sqlite_pragmas(settings):
        conn.execute(pragma)
    return conn


@asynccontextmanager
async def _sqlite(config: BenchConfig) -> AsyncIterator[_Setup]:
    settings = config.settings
    async with AsyncExitStack() as stack:
        if config.sqlite_path is None:
            directory = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="snapshot-repo-bench-")
            )
            path = Path(directory) / "bench.db"
        else:
            path = config.sqlite_path
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-sqlite3")
        stack.callback(executor.shutdown)
        loop = asyncio.get_running_loop()
        raw = await loop.run_in_executor(executor, _open_sqlite3, path, settings)
        stack.push_async_callback(loop.run_in_executor, executor, raw.close)
        thread = _Sqlite3Thread(executor, raw)

        async def value(query: str) -> Any:
            rows: list[Any] = await thread.call(thread.fetch, query)
            return rows[0][0]

        exists = (
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = {table})"
        )
        if await _holds_snapshots(value, exists):
            raise _refuse_data(str(path))
        url = URL.create("sqlite+aiosqlite", database=str(path))
        repo = SnapshotRepository.from_url(url, BenchState, settings=settings)
        stack.push_async_callback(repo.close)
        await repo.migrate()
        untraced_settings = replace(settings, sqlite_secure_delete=False)
        untraced = SnapshotRepository.from_url(url, BenchState, settings=untraced_settings)
        stack.push_async_callback(untraced.close)

        async def first_row(query: str) -> Sequence[Any]:
            rows: list[Any] = await thread.call(thread.fetch, query)
            return tuple(rows[0])

        scope = await _scope_of(repo, first_row)
        sql = _statements("sqlite", scope)
        aconn = await aiosqlite.connect(path, timeout=settings.busy_timeout, isolation_level=None)
        stack.push_async_callback(aconn.close)
        for pragma in _sqlite_pragmas(settings):
            await aconn.execute(pragma)

        sides: list[_Side] = [
            _LibrarySide(repo, untraced),
            _AiosqliteSide(aconn, sql),
            _Sqlite3Side(thread, sql),
        ]
        engines = {LIBRARY: repo.engine}
        if config.peer:
            peer = peer_engine(url, settings, _sqlite_pragmas(settings))
            stack.push_async_callback(peer.dispose)
            sides.append(_PeerSide(peer, PeerStatements("sqlite", scope)))
            engines[PEER] = peer
        observed = await _engine_answers(engines, _DURABILITY_QUERIES)
        observed["aiosqlite"] = []
        observed["sqlite3"] = []
        for query in _DURABILITY_QUERIES:
            observed["aiosqlite"].append(str(next(iter(await aconn.execute_fetchall(query)))[0]))
            observed["sqlite3"].append(str((await thread.call(thread.fetch, query))[0][0]))
        if any(values != observed[LIBRARY] for values in observed.values()):
            raise RuntimeError(f"SQLite connections differ in durability settings: {observed}")
        journal_mode, synchronous, busy_ms, secure_delete = observed[LIBRARY]
        yield _Setup(
            server=f"SQLite {sqlite3.sqlite_version}",
            sides=sides,
            seeder=_SqliteSeeder(thread, sql),
            durability={
                "journal_mode": journal_mode,
                "synchronous": f"{settings.sqlite_synchronous} ({synchronous})",
                "busy_timeout_ms": busy_ms,
                "secure_delete": secure_delete,
                "path": str(path),
            },
        )


# --- timing ---


@dataclass(frozen=True, slots=True)
class _Sample:
    items: int
    wall_ns: int
    latencies_ns: list[int]


async def _time_sequential(
    op: Callable[[_ArgT], Awaitable[object]], args: Sequence[_ArgT], items_per_call: int = 1
) -> _Sample:
    """Run `op` on each arg in turn, timing each call and the whole."""
    latencies: list[int] = []
    clock = time.perf_counter_ns
    gc.collect()  # both sides start every timed phase with the same (empty) garbage
    start = clock()
    for arg in args:
        began = clock()
        await op(arg)
        latencies.append(clock() - began)
    wall = clock() - start
    return _Sample(len(args) * items_per_call, wall, latencies)


async def _time_concurrent(
    op: Callable[[_ArgT], Awaitable[object]], args: Sequence[_ArgT], workers: int
) -> _Sample:
    """`workers` tasks, task k running args k, k+workers, ... in turn; latency includes queueing."""
    latencies: list[int] = []
    clock = time.perf_counter_ns

    async def worker(share: Sequence[_ArgT]) -> None:
        for arg in share:
            began = clock()
            await op(arg)
            latencies.append(clock() - began)

    gc.collect()
    start = clock()
    async with asyncio.TaskGroup() as group:
        for k in range(workers):
            group.create_task(worker(args[k::workers]))
    wall = clock() - start
    return _Sample(len(args), wall, latencies)


def _percentile(sorted_values: Sequence[int], q: float) -> float:
    """Linear-interpolated percentile (as numpy's default) of pre-sorted values."""
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def _round_result(sample: _Sample) -> RoundResult:
    ordered = sorted(sample.latencies_ns)
    return RoundResult(
        ops_per_s=sample.items / (sample.wall_ns / 1e9),
        p50_us=_percentile(ordered, 50) / 1000,
        p99_us=_percentile(ordered, 99) / 1000,
        items=sample.items,
    )


# --- the workloads ---


class _Workloads:
    """Builds each workload's arguments (identical for every side) and times one side on it.

    User ids carry the side's name wherever a side writes, so sides never
    touch each other's rows; reads pick, per round, the same random users
    for every side.
    """

    def __init__(self, config: BenchConfig, seeder: _Seeder) -> None:
        self._config = config
        self._seeder = seeder
        self._states = _make_states(_STATE_VARIANTS)
        self.seed_payload = _payload(self._states[0])

    def describe(self, name: str) -> tuple[str, str]:
        """(description, what one latency sample covers) for the report."""
        c = self._config
        bulk = f"call of {c.bulk_size} snapshots"
        descriptions = {
            "write": (f"sequential upsert_latest, cycling over {c.write_users} users", "call"),
            "write_concurrent": (
                f"{c.concurrency} concurrent writers, each on its own users "
                f"(library pool_size {c.settings.pool_size} + max_overflow "
                f"{c.settings.max_overflow}{', as the sqlalchemy peer' if c.peer else ''}; "
                f"asyncpg pool {c.settings.pool_size}; SQLite raw: one connection)",
                "call, queueing included",
            ),
            "get_latest": (f"get_latest of random users among {c.read_users}", "call"),
            "get_history_shallow": (
                f"get_history(limit={c.history_limit}) of random users with "
                f"{c.history_versions} versions",
                "call",
            ),
            "get_history_deep": (
                f"get_history(limit={c.history_limit}) of one user with "
                f"{c.deep_versions:,} versions",
                "call",
            ),
            "delete": (f"delete of users with {c.delete_versions} versions each", "call"),
            "delete_traceless": (
                "the same delete, the raw sides then checkpointing and truncating the WAL "
                "as the library's erasure does, so no erased byte stays in the files "
                "(SQLite only)",
                "call",
            ),
            "delete_plain": (
                "the same delete, the library opened with "
                "EngineSettings(sqlite_secure_delete=False), so no side checkpoints "
                "(SQLite only)",
                "call",
            ),
            "bulk_write": (
                f"{c.bulk_size} snapshots of distinct users in one call "
                "(library: upsert_many; raw: one statement / one transaction"
                f"{'; sqlalchemy: two executemany calls in one transaction' if c.peer else ''})",
                bulk,
            ),
            "bulk_write_single": (
                f"the same {c.bulk_size} snapshots, one upsert_latest each",
                "call",
            ),
            "bulk_read": (
                f"latest of {c.bulk_size} users in one call (library: get_latest_many)",
                bulk,
            ),
            "bulk_read_single": (f"the same {c.bulk_size} users, one get_latest each", "call"),
        }
        return descriptions[name]

    async def seed_shared(self, sides: Sequence[_Side]) -> None:
        """Seed what the reads read and the users the writes update, for every side.

        Seeding every written user up front makes every timed write an update
        (the common case) on every side, in every round.
        """
        c = self._config
        payload = self.seed_payload
        await self._seeder.seed("r-", c.read_users, 1, payload)
        await self._seeder.seed("h-", c.history_users, c.history_versions, payload)
        await self._seeder.seed("deep-", 1, c.deep_versions, payload)
        for side in sides:
            await self._seeder.seed(f"w-{side.name}-", c.write_users, 1, payload)
            await self._seeder.seed(
                f"c-{side.name}-", c.concurrency * _USERS_PER_WRITER, 1, payload
            )
            await self._seeder.seed(f"b-{side.name}-", c.bulk_size, 1, payload)
        await self._seeder.settle()

    def _state(self, index: int) -> BenchState:
        return self._states[index % len(self._states)]

    async def _sequential(
        self,
        op: Callable[[_ArgT], Awaitable[object]],
        args: Sequence[_ArgT],
        items_per_call: int = 1,
    ) -> _Sample:
        """`_time_sequential`, after leveling (see `_Seeder.level`)."""
        await self._seeder.level()
        return await _time_sequential(op, args, items_per_call)

    async def _concurrent(
        self, op: Callable[[_ArgT], Awaitable[object]], args: Sequence[_ArgT], workers: int
    ) -> _Sample:
        """`_time_concurrent`, after leveling (see `_Seeder.level`)."""
        await self._seeder.level()
        return await _time_concurrent(op, args, workers)

    async def depth(self, side: _Side, tag: str) -> float:
        """p50 of `get_history` on the deep user / p50 on shallow users, calls alternating.

        One timed phase of `read_ops` calls, deep and shallow in turn, so both
        halves run under the same conditions. Timed as separate workloads,
        seconds apart, they did not: on this project's 2-vCPU machine the same
        read took either about 130 or about 250 µs depending on the moment,
        and the quotient of the two workloads' p50s swung from 0.49 to 1.65
        between runs of one build (SQLite, library side).
        """
        c = self._config
        rng = random.Random(f"{c.seed}-depth-{tag}")
        users: list[str] = []
        for _ in range(max(1, c.read_ops // 2)):
            users += ["deep-0", f"h-{rng.randrange(c.history_users)}"]
        sample = await self._sequential(lambda user: side.get_history(user, c.history_limit), users)
        deep, shallow = sorted(sample.latencies_ns[0::2]), sorted(sample.latencies_ns[1::2])
        return _percentile(deep, 50) / _percentile(shallow, 50)

    async def run(self, name: str, side: _Side, tag: str, warmup: bool) -> _Sample | str:
        """Time `side` on workload `name`; return the sample, or why the side cannot run it.

        `tag` names the round ("warmup", "r0", ...): it seeds the random
        choices (the same for every side) and keeps each round's deleted users
        apart. A warm-up runs at most `warmup_ops` calls (one bulk call).
        """
        c = self._config
        ops = min(c.ops, c.warmup_ops) if warmup else c.ops
        read_ops = min(c.read_ops, c.warmup_ops) if warmup else c.read_ops
        singles = min(c.bulk_size, c.warmup_ops) if warmup else c.bulk_size
        batches = 1 if warmup else c.bulk_batches
        s = side.name
        rng = random.Random(f"{c.seed}-{name}-{tag}")
        offset = rng.randrange(len(self._states))

        if name == "write":
            items = [(f"w-{s}-{i % c.write_users}", self._state(offset + i)) for i in range(ops)]
            return await self._sequential(lambda item: side.write(*item), items)
        if name == "write_concurrent":
            # Item i goes to worker i % concurrency, which cycles over users of its own.
            workers, own = c.concurrency, _USERS_PER_WRITER
            items = [
                (f"c-{s}-{(i % workers) * own + (i // workers) % own}", self._state(offset + i))
                for i in range(ops)
            ]
            return await self._concurrent(lambda item: side.write(*item), items, c.concurrency)
        if name == "get_latest":
            users = [f"r-{rng.randrange(c.read_users)}" for _ in range(read_ops)]
            return await self._sequential(side.get_latest, users)
        if name == "get_history_shallow":
            users = [f"h-{rng.randrange(c.history_users)}" for _ in range(read_ops)]
            return await self._sequential(
                lambda user: side.get_history(user, c.history_limit), users
            )
        if name == "get_history_deep":
            return await self._sequential(
                lambda user: side.get_history(user, c.history_limit), ["deep-0"] * read_ops
            )
        erasures: dict[str, tuple[str, str | None, Callable[[str], Awaitable[int]]]] = {
            # name: (user prefix, why the side cannot run it, the call)
            "delete": ("d", None, side.delete),
            "delete_traceless": ("t", side.traceless_delete_unavailable(), side.traceless_delete),
            "delete_plain": ("p", side.plain_delete_unavailable(), side.plain_delete),
        }
        if name in erasures:
            letter, unavailable, erase = erasures[name]
            if unavailable is not None:
                return unavailable
            prefix = f"{letter}-{tag}-{s}-"
            await self._seeder.seed(prefix, ops, c.delete_versions, self.seed_payload)
            return await self._sequential(erase, [f"{prefix}{i}" for i in range(ops)])

        batch = [(f"b-{s}-{k}", self._state(offset + k)) for k in range(c.bulk_size)]
        readers = [f"r-{i}" for i in rng.sample(range(c.read_users), c.bulk_size)]
        if name == "bulk_write":
            reason = side.bulk_write_unavailable()
            if reason is not None:
                return reason
            return await self._sequential(side.bulk_write, [batch] * batches, c.bulk_size)
        if name == "bulk_write_single":
            return await self._sequential(lambda item: side.write(*item), batch[:singles])
        if name == "bulk_read":
            reason = side.bulk_read_unavailable()
            if reason is not None:
                return reason
            return await self._sequential(side.bulk_read, [readers] * batches, c.bulk_size)
        if name == "bulk_read_single":
            return await self._sequential(side.get_latest, readers[:singles])
        raise AssertionError(f"unknown workload {name}")


async def _check_parity(sides: Sequence[_Side]) -> None:
    """Every side reads back what every other side wrote, identically.

    Guards the claim that the raw baselines store the same rows as the
    library (payload bytes, timestamp format, versions, delete counts): a
    mismatch here would make the comparison meaningless, so it aborts.
    """
    state = _make_states(2)
    for writer in sides:
        user = f"parity-{writer.name}"
        assert await writer.write(user, state[0]) == 1
        assert await writer.write(user, state[1]) == 2
        seen = []
        for reader in sides:
            latest = await reader.get_latest(user)
            history = await reader.get_history(user, 10)
            assert latest is not None, f"{reader.name} does not see {writer.name}'s write"
            seen.append(
                [
                    (s.user_id, s.version, s.schema_version, s.state, s.created_at)
                    for s in [latest, *history]
                ]
            )
        if any(view != seen[0] for view in seen):
            raise RuntimeError(f"sides disagree on what {writer.name} wrote: {seen}")
        if seen[0][0][1:4] != (2, 1, state[1]) or [row[1] for row in seen[0][1:]] != [2, 1]:
            raise RuntimeError(f"unexpected rows after {writer.name}'s writes: {seen[0]}")
    for deleter, writer in zip(sides, [*sides[1:], sides[0]], strict=True):
        erased = await deleter.delete(f"parity-{writer.name}")
        if erased != 2:
            raise RuntimeError(f"{deleter.name} erased {erased} versions, expected 2")
        for reader in sides:
            if await reader.get_latest(f"parity-{writer.name}") is not None:
                raise RuntimeError(f"{deleter.name}'s delete left a row {reader.name} sees")


# --- running and summarizing ---


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _summarize(samples: Sequence[_Sample | str]) -> SideResult:
    reasons = [sample for sample in samples if isinstance(sample, str)]
    if reasons:
        return SideResult(False, reasons[0], None, None, None, ())
    timed = [cast(_Sample, sample) for sample in samples]
    every_call = sorted(latency for sample in timed for latency in sample.latencies_ns)
    rounds = tuple(map(_round_result, timed))
    return SideResult(
        available=True,
        reason=None,
        ops_per_s=_median([r.ops_per_s for r in rounds]),
        p50_us=_percentile(every_call, 50) / 1000,
        p99_us=_percentile(every_call, 99) / 1000,
        rounds=rounds,
    )


def _paired_ratio(numerator: SideResult, denominator: SideResult) -> float | None:
    """Median over rounds of the two results' ops/s quotient, each measured in one round:
    library/raw for a workload, or one side's bulk/single throughput."""
    if not (numerator.available and denominator.available):
        return None
    pairs = zip(numerator.rounds, denominator.rounds, strict=True)
    return _median([top.ops_per_s / bottom.ops_per_s for top, bottom in pairs])


def _bulk_speedups(
    results: Mapping[str, WorkloadResult], sides: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """Per kind ("write", "read") and side: bulk over single-call throughput, round by round."""
    return {
        kind: {
            side: _paired_ratio(results[bulk].results[side], results[single].results[side])
            for side in sides
        }
        for kind, (bulk, single) in _BULK_PAIRS.items()
    }


async def _run_backend(
    backend: BackendName, config: BenchConfig, progress: Callable[[str], None]
) -> BackendReport:
    started = time.perf_counter()
    opener = _postgres if backend == "postgres" else _sqlite
    async with opener(config) as setup:
        sides = setup.sides
        names = tuple(side.name for side in sides)
        workloads = _Workloads(config, setup.seeder)
        progress(f"[{backend}] {setup.server}; seeding ({config.deep_versions:,}-version history)")
        await workloads.seed_shared(sides)
        await _check_parity(sides)
        if config.warmup_ops:
            progress(f"[{backend}] warming up")
            for name in WORKLOADS:
                for side in sides:
                    await workloads.run(name, side, "warmup", warmup=True)
        samples: dict[str, dict[str, list[_Sample | str]]] = {
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
        for name in WORKLOADS:
            per_side = {side: _summarize(samples[name][side]) for side in names}
            description, latency_per = workloads.describe(name)
            results[name] = WorkloadResult(
                description=description,
                latency_per=latency_per,
                results=per_side,
                ratio={raw: _paired_ratio(per_side[LIBRARY], per_side[raw]) for raw in names[1:]},
            )
        durability = setup.durability
        server = setup.server
    return BackendReport(
        server=server,
        sides=names,
        durability=durability,
        workloads=results,
        depth_ratio={side: _median(ratios) for side, ratios in depth.items()},
        bulk_speedup=_bulk_speedups(results, names),
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
            for name in ("snapshot-repo", "sqlalchemy", "asyncpg", "aiosqlite", "pydantic")
        },
        "sqlite_library": sqlite3.sqlite_version,
        "payload_bytes": round(
            statistics.mean(len(_payload(state)) for state in _make_states(_STATE_VARIANTS))
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

    Creates (Postgres) or opens (SQLite) the database, migrates it with the
    library, seeds it in bulk, checks that every side reads what every other
    side writes, warms up, then times `config.rounds` interleaved rounds.
    Throwaway databases and temporary files are removed on return or failure.

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
        asyncpg.PostgresError, OSError, sqlite3.Error: a raw driver failed.
    """
    report_progress = progress or (lambda _line: None)
    environment = _environment()
    started = time.perf_counter()
    backends: dict[str, BackendReport] = {
        backend: await _run_backend(backend, config, report_progress) for backend in config.backends
    }
    environment["loadavg_end"] = _loadavg()
    environment["seconds"] = round(time.perf_counter() - started, 1)
    return BenchReport(config=config, environment=environment, backends=backends)


# --- the readable table ---


def _fmt_number(value: float | None, unit: str = "", digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _format_report(report: BenchReport) -> str:
    lines: list[str] = []
    config = report.config
    header = (
        f"{'workload':<21} {'side':<10} {'ops/s':>11} {'p50 ms':>9} {'p99 ms':>9}  {'lib/side':>8}"
    )
    env = report.environment
    lines.append(
        f"snapshot_repo {env['packages']['snapshot-repo']} vs raw drivers"
        f"{' and plain SQLAlchemy' if config.peer else ''}; Python {env['python']}; "
        f"states of {env['payload_bytes']} bytes of JSON"
    )
    lines.append("")
    for backend, result in report.backends.items():
        settings = ", ".join(f"{k}={v}" for k, v in result.durability.items() if k != "path")
        lines.append(
            f"== {backend}: {result.server}; {settings}; {config.rounds} round(s), "
            f"medians; {result.seconds:.0f} s =="
        )
        lines.append(header)
        lines.append("-" * len(header))
        for name, workload in result.workloads.items():
            label = name
            for side in result.sides:
                outcome = workload.results[side]
                if not outcome.available:
                    row = f"{label:<21} {side:<10} not available: {outcome.reason}"
                else:
                    row = (
                        f"{label:<21} {side:<10} {_fmt_number(outcome.ops_per_s, digits=1):>11} "
                        f"{_fmt_number(_ms(outcome.p50_us), digits=3):>9} "
                        f"{_fmt_number(_ms(outcome.p99_us), digits=3):>9}"
                    )
                    if side != LIBRARY:
                        row += f"  {_fmt_ratio(workload.ratio[side]):>8}"
                lines.append(row)
                label = ""
        lines.append("")
        lines.append(
            f"depth ratio, p50 get_history(limit={config.history_limit}), alternating calls, at "
            f"{config.deep_versions:,} / at {config.history_versions} versions: "
            + ", ".join(f"{side} {_fmt_ratio(v)}" for side, v in result.depth_ratio.items())
        )
        for kind, speedups in result.bulk_speedup.items():
            lines.append(
                f"bulk {kind} speedup, {config.bulk_size} per call vs one per call: "
                + ", ".join(
                    f"{side} {'n/a' if v is None else f'{v:.1f}x'}" for side, v in speedups.items()
                )
            )
        lines.append("")
    lines.append(
        "ops/s counts snapshots for bulk_* workloads; p50/p99 are per call. lib/side = library "
        "ops/s / that side's ops/s (a raw driver, or the plain-SQLAlchemy peer), median of "
        "per-round ratios (above 1: the library is faster)."
    )
    load = report.environment.get("loadavg_start"), report.environment.get("loadavg_end")
    lines.append(
        f"load average at start/end: {load[0]} / {load[1]} on {report.environment['cpu_count']} "
        "CPUs; other processes on the machine add noise."
    )
    return "\n".join(lines)


def _ms(microseconds: float | None) -> float | None:
    return None if microseconds is None else microseconds / 1000


# --- command line ---


def _positive_int(text_value: str) -> int:
    try:
        value = int(text_value.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text_value!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _backends(text_value: str) -> tuple[BackendName, ...]:
    names = tuple(part.strip() for part in text_value.split(",") if part.strip())
    for name in names:
        if name not in get_args(BackendName):
            raise argparse.ArgumentTypeError(
                f"unknown backend {name!r}: use sqlite and/or postgres"
            )
    return cast(tuple[BackendName, ...], names)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's flags to `parser` (e.g. a `bench` subcommand's parser)."""
    defaults = BenchConfig()
    sizes = parser.add_argument_group("sizes")
    sizes.add_argument(
        "--ops",
        type=_positive_int,
        default=defaults.ops,
        help="timed writes/deletes per side and round (default %(default)s)",
    )
    sizes.add_argument(
        "--read-ops",
        type=_positive_int,
        default=defaults.read_ops,
        help="timed single reads per side and round (default %(default)s)",
    )
    sizes.add_argument(
        "--rounds",
        type=_positive_int,
        default=defaults.rounds,
        help="interleaved rounds; medians are reported (default %(default)s)",
    )
    sizes.add_argument(
        "--deep-versions",
        type=_positive_int,
        default=defaults.deep_versions,
        help="versions of the deep-history user (default %(default)s)",
    )
    sizes.add_argument(
        "--history-versions",
        type=_positive_int,
        default=defaults.history_versions,
        help="versions of the shallow-history users (default %(default)s)",
    )
    sizes.add_argument(
        "--concurrency",
        type=_positive_int,
        default=defaults.concurrency,
        help="concurrent writers (default %(default)s)",
    )
    sizes.add_argument(
        "--bulk-size",
        type=_positive_int,
        default=defaults.bulk_size,
        help="snapshots per bulk call (default %(default)s)",
    )
    sizes.add_argument(
        "--bulk-batches",
        type=_positive_int,
        default=defaults.bulk_batches,
        help="bulk calls per side and round (default %(default)s)",
    )
    sizes.add_argument(
        "--warmup-ops",
        type=int,
        default=defaults.warmup_ops,
        help="untimed operations per workload before round 1 (default %(default)s)",
    )
    sizes.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the random user choice (default %(default)s)",
    )
    sides = parser.add_argument_group("sides")
    sides.add_argument(
        "--peer",
        action="store_true",
        help="also run the same workloads in plain SQLAlchemy Core, the alternative to "
        "this library (about doubles the run time)",
    )
    where = parser.add_argument_group("databases")
    where.add_argument(
        "--backends",
        type=_backends,
        default=defaults.backends,
        help="comma-separated: sqlite,postgres (default: both)",
    )
    where.add_argument(
        "--postgres-url",
        default=os.environ.get(POSTGRES_URL_ENV, defaults.postgres_url),
        help=f"Postgres server to create a throwaway database on (default "
        f"${POSTGRES_URL_ENV}, else {DEFAULT_POSTGRES_URL})",
    )
    where.add_argument(
        "--postgres-use-database",
        action="store_true",
        help="run in --postgres-url's own database (it must hold no snapshots; "
        "the benchmark's rows stay there) instead of a throwaway one",
    )
    where.add_argument(
        "--postgres-synchronous-commit",
        choices=get_args(SynchronousCommit),
        default=None,
        help="synchronous_commit for every side, set on the throwaway database "
        "(default: the server's, normally on)",
    )
    where.add_argument(
        "--sqlite-path",
        type=Path,
        default=None,
        help="SQLite file to run in (it must hold no snapshots; default: a "
        "temporary file, removed afterwards)",
    )
    where.add_argument(
        "--sqlite-synchronous",
        choices=get_args(SqliteSynchronous),
        default=defaults.settings.sqlite_synchronous,
        help="SQLite synchronous level for every side (default: the library's, %(default)s)",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--json",
        type=Path,
        default=Path(DEFAULT_JSON_PATH),
        metavar="PATH",
        help="where to write the JSON report (default %(default)s)",
    )
    output.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The `BenchConfig` described by flags parsed with `add_arguments`.

    Raises:
        ConfigurationError: the sizes are inconsistent.
    """
    return BenchConfig(
        backends=args.backends,
        ops=args.ops,
        read_ops=args.read_ops,
        rounds=args.rounds,
        warmup_ops=args.warmup_ops,
        concurrency=args.concurrency,
        deep_versions=args.deep_versions,
        history_versions=args.history_versions,
        bulk_size=args.bulk_size,
        bulk_batches=args.bulk_batches,
        postgres_url=args.postgres_url,
        postgres_create_database=not args.postgres_use_database,
        postgres_synchronous_commit=args.postgres_synchronous_commit,
        sqlite_path=args.sqlite_path,
        settings=replace(EngineSettings(), sqlite_synchronous=args.sqlite_synchronous),
        seed=args.seed,
        peer=args.peer,
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The benchmark's own argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Compare snapshot_repo with hand-written SQL on the raw drivers "
        "(asyncpg; aiosqlite and sqlite3) and, with --peer, with plain SQLAlchemy Core, and "
        "print ops/s, p50, p99 and the library's ratio to each.",
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Parse `argv`, run the benchmark, print the table, write the JSON; return the exit status.

    Exit status: 0 done; 2 bad flags or configuration (including a database
    that already holds snapshots); 3 a database failed; 130 interrupted.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    name = parser.prog

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    if not args.json.parent.is_dir():  # fail now, not after minutes of benchmarking
        print(f"{name}: error: no directory for the JSON report: {args.json}", file=sys.stderr)
        return _EXIT_USAGE
    try:
        config = config_from_args(args)
        report = asyncio.run(run_benchmark(config, progress))
    except ConfigurationError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return _EXIT_USAGE
    except (
        RuntimeError,  # the sides disagree, or the schema is one the raw baselines do not know
        SnapshotRepoError,
        OSError,
        sqlite3.Error,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    ) as exc:
        print(f"{name}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return _EXIT_STORAGE
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED
    print(report.format_table())
    try:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        print(f"{name}: error: cannot write the JSON report: {exc}", file=sys.stderr)
        return _EXIT_USAGE
    print(f"\nJSON report written to {args.json}")
    return _EXIT_OK
