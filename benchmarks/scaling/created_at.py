"""The created_at index experiment (issue #19, Scale point 4), on a loaded Postgres database.

`ix_snapshot_history_created_at`, dropped by revision 0017 on these numbers,
was (tenant, namespace, user_id, created_at): the primary key's three
leading columns again, so every write added an entry at a random place in a
second wide index. Only `get_as_of` read it (`_queries.as_of_statement`,
ordered by created_at before 0017, by version since); `prune_history`
prunes user by user (`statements.prune_statement`: the user's versions
below the newest, by version and created_at).

Each variant replaces the index in place (same name) on the big and the
small database, then measures: its size; writes (`upsert_latest` of existing
users, interleaved big/small); `get_as_of` and one user's `prune_history`
(with a cutoff older than every row, so nothing is deleted and every
variant sees the same rows) for ordinary users (M versions) and for a few
deep users (`DEEP_VERSIONS` versions, written in batches of
`_DEEP_BATCH` so they carry many distinct timestamps); and EXPLAIN
(ANALYZE, BUFFERS) of both statements for a deep user. Nothing is committed
by the EXPLAINs (each runs in a transaction rolled back).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from snapshot_repo import Snapshot
from snapshot_repo._queries import as_of_statement
from snapshot_repo.backends.statements import prune_statement

from ..harness.timing import percentile, time_sequential
from .databases import ScaleDatabase, asyncpg_dsn
from .load import scale_states, user_id
from .measure import CallRatio, Target, interleave

__all__ = [
    "DEEP_VERSIONS",
    "VARIANTS",
    "VariantResult",
    "add_deep_users",
    "render_experiment",
    "run_experiment",
    "run_variant",
]

_INDEX = "ix_snapshot_history_created_at"

VARIANTS: dict[str, str | None] = {
    "none (0017 on)": None,
    "before 0017: (tenant, namespace, user_id, created_at)": (
        f"CREATE INDEX {_INDEX} ON snapshot_history (tenant, namespace, user_id, created_at)"
    ),
    "brin (created_at)": f"CREATE INDEX {_INDEX} ON snapshot_history USING brin (created_at)",
    "(namespace, created_at)": (
        f"CREATE INDEX {_INDEX} ON snapshot_history (namespace, created_at)"
    ),
}
"""Each variant's index statement (None: no index at all)."""

DEEP_VERSIONS = 10_000
_DEEP_USERS = 5
_DEEP_BATCH = 10
_KEEP_EVERYTHING = timedelta(days=36_500)  # a prune cutoff older than every row


def deep_user(index: int) -> str:
    """The id of deep user `index` (outside the ordinary users' ids)."""
    return f"deep-{index:04d}"


async def add_deep_users(database: ScaleDatabase) -> tuple[datetime, datetime]:
    """Write `DEEP_VERSIONS` versions of each deep user; the first and last write's times."""
    states = scale_states()
    first = datetime.now(UTC)
    for index in range(_DEEP_USERS):
        uid = deep_user(index)
        for start in range(0, DEEP_VERSIONS, _DEEP_BATCH):
            await database.repo.upsert_many(
                [
                    Snapshot(user_id=uid, state=states[(start + k) % len(states)])
                    for k in range(_DEEP_BATCH)
                ]
            )
    return first, datetime.now(UTC)


@dataclass
class VariantResult:
    """One index variant's measurements (latencies in microseconds)."""

    variant: str
    build_seconds: float
    index_bytes: int
    index_bytes_per_row: float
    writes: CallRatio
    timings_us: dict[str, tuple[float, float]]  # name -> (p50, p99)
    plans: dict[str, str]


def _compiled(
    statement: ClauseElement, dialect: Dialect, params: dict[str, Any]
) -> tuple[str, list[Any]]:
    """`statement` as the library's asyncpg dialect sends it ($n), and its arguments."""
    compiled = statement.compile(dialect=dialect)
    assert isinstance(compiled, SQLCompiler)
    values = compiled.construct_params(params)  # with the statement's own (LIMIT 1)
    return compiled.string, [values[name] for name in compiled.positiontup or []]


async def _replace_index(conn: asyncpg.Connection, create: str | None) -> float:
    began = time.perf_counter()
    await conn.execute(f"DROP INDEX IF EXISTS {_INDEX}")
    if create is not None:
        await conn.execute("SET maintenance_work_mem = '1GB'")  # this session only
        await conn.execute(create)
    await conn.execute("ANALYZE snapshot_history")
    return time.perf_counter() - began


async def _explain(conn: asyncpg.Connection, sql: str, args: list[Any]) -> str:
    transaction = conn.transaction()
    await transaction.start()
    try:
        rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}", *args)
    finally:
        await transaction.rollback()
    return "\n".join(str(row[0]) for row in rows)


def _p50_p99(latencies_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(latencies_ns)
    return percentile(ordered, 50) / 1000, percentile(ordered, 99) / 1000


async def run_variant(
    name: str,
    big: Target,
    small: Target,
    span: tuple[datetime, datetime],
    *,
    rounds: int,
    block: int,
    samples: int = 300,
    progress: Callable[[str], None] = lambda _: None,
) -> VariantResult:
    """Put variant `name` in place on both databases and measure it.

    `span`: when the big database's ordinary users were written (as-of
    moments are drawn from it; deep users' moments from their own writes).
    """
    create = VARIANTS[name]
    conns = {
        label: await asyncpg.connect(asyncpg_dsn(t.database.url))
        for label, t in (("big", big), ("small", small))
    }
    try:
        build = await _replace_index(conns["big"], create)
        await _replace_index(conns["small"], create)
        progress(f"{name}: built in {build:,.0f} s")
        size = int(
            await conns["big"].fetchval(
                f"SELECT coalesce(pg_relation_size(to_regclass('{_INDEX}')), 0)"
            )
        )
        rows = int(await conns["big"].fetchval("SELECT count(*) FROM snapshot_history"))
        (writes,) = await interleave(
            big, small, rounds=rounds, block=block, calls=("upsert_latest",)
        )
        repo = big.database.repo
        rng = random.Random(7)
        first, last = span
        seconds = (last - first).total_seconds()
        deep_first = await _deep_first(conns["big"])
        deep_seconds = (datetime.now(UTC) - deep_first).total_seconds()
        timings: dict[str, tuple[float, float]] = {}

        def moment(start: datetime, width: float) -> datetime:
            return start + timedelta(seconds=rng.uniform(0, width))

        cases: dict[str, tuple[Callable[[Any], Any], list[Any]]] = {
            "get_as_of, ordinary user": (
                lambda a: repo.get_as_of(a[0], a[1]),
                [
                    (user_id(rng.randrange(big.users)), moment(first, seconds))
                    for _ in range(samples)
                ],
            ),
            "get_as_of, deep user": (
                lambda a: repo.get_as_of(a[0], a[1]),
                [
                    (deep_user(rng.randrange(_DEEP_USERS)), moment(deep_first, deep_seconds))
                    for _ in range(samples)
                ],
            ),
            "prune_history(user, older_than), ordinary user": (
                lambda uid: repo.prune_history(uid, older_than=_KEEP_EVERYTHING),
                [user_id(rng.randrange(big.users)) for _ in range(samples)],
            ),
            "prune_history(user, older_than), deep user": (
                lambda uid: repo.prune_history(uid, older_than=_KEEP_EVERYTHING),
                [deep_user(rng.randrange(_DEEP_USERS)) for _ in range(samples // 10)],
            ),
        }
        for case, (op, args) in cases.items():
            timings[case] = _p50_p99((await time_sequential(op, args)).latencies_ns)
        plans = await _plans(conns["big"], big, deep_first, deep_seconds)
    finally:
        for conn in conns.values():
            await conn.close()
    return VariantResult(name, build, size, size / rows, writes, timings, plans)


async def _deep_first(conn: asyncpg.Connection) -> datetime:
    value = await conn.fetchval(
        "SELECT min(created_at) FROM snapshot_history WHERE user_id = $1", deep_user(0)
    )
    assert isinstance(value, datetime), "add_deep_users first"
    return value


async def _plans(
    conn: asyncpg.Connection, big: Target, deep_first: datetime, deep_seconds: float
) -> dict[str, str]:
    scope = {"tenant": "", "namespace": big.database.repo.namespace}
    at = deep_first + timedelta(seconds=deep_seconds / 2)
    dialect = big.database.repo.engine.dialect
    as_of = _compiled(as_of_statement(), dialect, {**scope, "user_id": deep_user(1), "at": at})
    cutoff = datetime.now(UTC) - _KEEP_EVERYTHING
    prune = _compiled(
        prune_statement("postgresql"),
        dialect,
        {**scope, "user_id": deep_user(1), "keep_last": None, "cutoff": cutoff},
    )
    return {
        "get_as_of, deep user": await _explain(conn, *as_of),
        "prune, deep user": await _explain(conn, *prune),
    }


async def run_experiment(
    big: Target,
    small: Target,
    *,
    order: tuple[str, ...],
    rounds: int,
    block: int,
    progress: Callable[[str], None] = lambda _: None,
) -> list[VariantResult]:
    """Every variant of `order` in turn, after adding the deep users if they are missing."""
    first, last = await _span(big.database)
    conn = await asyncpg.connect(asyncpg_dsn(big.database.url))
    try:
        has_deep = await conn.fetchval(
            "SELECT count(*) FROM snapshot_latest WHERE user_id = $1", deep_user(0)
        )
    finally:
        await conn.close()
    if not has_deep:
        progress("adding deep users")
        await add_deep_users(big.database)
    return [
        await run_variant(
            name, big, small, (first, last), rounds=rounds, block=block, progress=progress
        )
        for name in order
    ]


async def _span(database: ScaleDatabase) -> tuple[datetime, datetime]:
    conn = await asyncpg.connect(asyncpg_dsn(database.url))
    try:
        row = await conn.fetchrow(
            "SELECT min(created_at), max(created_at) FROM snapshot_history"
            " WHERE user_id NOT LIKE 'deep-%'"
        )
    finally:
        await conn.close()
    assert row is not None
    return row[0], row[1]


def render_experiment(results: list[VariantResult]) -> str:
    """The variants side by side, then each variant's plans."""
    lines = [
        f"{'variant':<50}{'build s':>8}{'B/row':>7}{'write p50':>10}{'p99':>8}"
        f"{'x p50':>7}{'x p99':>7}",
    ]
    for result in results:
        w = result.writes
        lines.append(
            f"{result.variant:<50}{result.build_seconds:>8.0f}{result.index_bytes_per_row:>7.1f}"
            f"{w.big_p50_us / 1000:>10.3f}{w.big_p99_us / 1000:>8.3f}"
            f"{w.p50_ratio:>7.2f}{w.p99_ratio:>7.2f}"
        )
    lines += ["", "(ms, big database)".rjust(60)]
    cases = list(results[0].timings_us) if results else []
    for case in cases:
        lines.append(case)
        for result in results:
            p50, p99 = result.timings_us[case]
            lines.append(f"  {result.variant:<50} p50 {p50 / 1000:>8.3f}  p99 {p99 / 1000:>8.3f}")
    for result in results:
        for case, plan in result.plans.items():
            lines += ["", f"EXPLAIN {case}, {result.variant}:", plan]
    return "\n".join(lines)
