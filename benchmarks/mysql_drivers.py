"""asyncmy against aiomysql: the MariaDB raw baseline's workloads on each driver.

Why the library runs MariaDB on asyncmy: the raw baseline of the main benchmark
(`harness.mariadb_side.MariadbSide`, the same hand-written SQL on either
driver, whose APIs both come from PyMySQL) times a write transaction (upsert,
version read back, history row, feed entry, in `BEGIN` ... `COMMIT`) and a
primary-key read of a ~1 KB state, on a pool of each driver, in interleaved
rounds (the order rotating), in one process; medians are reported. Three sides:

- `asyncmy`: as the library runs it, statements sent as text (values escaped in);
- `asyncmy-prepared`: asyncmy with its statement cache (`stmt_cache_size`), so
  each statement is prepared once per connection and runs in the binary
  protocol: the main benchmark's raw side;
- `aiomysql`: statements as text (it has no prepared statements).

aiomysql 0.3.2 cannot send a `bytes` parameter with PyMySQL 1.2.3 or later
(aio-libs/aiomysql#1080: it calls `pymysql.converters.escape_bytes_prefixed`,
which is now a placeholder string). This script patches in what the proposed
fix (aio-libs/aiomysql#1081) does: PyMySQL 1.2's `escape_bytes`, `_binary X'..'`.

Run from a checkout (a throwaway database is created on the server and dropped):

    python benchmarks/mysql_drivers.py [--ops 200] [--read-ops 1000] [--rounds 9]
        [--mariadb-url mariadb://root@127.0.0.1:3306/test]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# Benchmark the checkout next to this script, not whatever version is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiomysql
import aiomysql.connection
import asyncmy

from benchmarks.harness.config import DEFAULT_MARIADB_URL, MARIADB_URL_ENV
from benchmarks.harness.databases import (
    MARIADB_STATEMENT_CACHE,
    mariadb_admin,
    mariadb_connect_args,
    mariadb_value,
)
from benchmarks.harness.mariadb_side import READ_COMMITTED, MariadbSide
from benchmarks.harness.seeding import MariadbSeeder
from benchmarks.harness.sql import raw_statements, scope_of
from benchmarks.harness.state import STATE_VARIANTS, BenchState, make_states, payload_of
from benchmarks.harness.timing import Sample, percentile, time_sequential
from snapshot_repo import EngineSettings, SnapshotRepository
from snapshot_repo.engine import normalize_url


def _escape_bytes(value: bytes) -> str:
    """PyMySQL 1.2's `escape_bytes`, which aio-libs/aiomysql#1081 makes aiomysql call."""
    return f"_binary X'{value.hex()}'"


if not callable(aiomysql.connection.escape_bytes_prefixed):  # see aio-libs/aiomysql#1080
    aiomysql.connection.escape_bytes_prefixed = _escape_bytes

_WRITE_USERS = 100
_READ_USERS = 1000
_BASELINE = "asyncmy"


async def _pools(connect: dict[str, Any], database: str, size: int) -> dict[str, Any]:
    """One pool per side, of `size` connections each, in autocommit mode and READ COMMITTED."""
    common = {**connect, "autocommit": True, "init_command": READ_COMMITTED}
    return {
        "asyncmy": await asyncmy.create_pool(
            minsize=size, maxsize=size, database=database, **common
        ),
        "asyncmy-prepared": await asyncmy.create_pool(
            minsize=size,
            maxsize=size,
            database=database,
            stmt_cache_size=MARIADB_STATEMENT_CACHE,
            **common,
        ),
        "aiomysql": await aiomysql.create_pool(minsize=size, maxsize=size, db=database, **common),
    }


async def _measure(args: argparse.Namespace, url: str, database: str) -> None:
    settings = EngineSettings()
    repo = SnapshotRepository.from_url(url, BenchState, settings=settings)
    await repo.migrate()
    pools = await _pools(
        mariadb_connect_args(normalize_url(url), settings), database, settings.pool_size
    )
    try:
        baseline_pool = pools[_BASELINE]

        async def first_row(query: str) -> Any:
            async with baseline_pool.acquire() as conn, conn.cursor() as cursor:
                await cursor.execute(query)
                return tuple(await cursor.fetchone())

        sql = raw_statements("mariadb", await scope_of(repo, first_row, quote="`"))
        sides = [MariadbSide(pool, sql, name) for name, pool in pools.items()]
        states = make_states(STATE_VARIANTS)
        seeder = MariadbSeeder(baseline_pool, sql)
        payload = payload_of(states[0])
        await seeder.seed("r-", _READ_USERS, 1, payload)
        for side in sides:
            await seeder.seed(f"w-{side.name}-", _WRITE_USERS, 1, payload)
        await seeder.settle()

        def write(side: MariadbSide) -> tuple[Callable[[int], Awaitable[object]], list[int]]:
            return (
                lambda i: side.write(f"w-{side.name}-{i % _WRITE_USERS}", states[i % len(states)]),
                list(range(args.ops)),
            )

        def read(side: MariadbSide, rng: random.Random) -> tuple[Any, list[str]]:
            return side.get_latest, [
                f"r-{rng.randrange(_READ_USERS)}" for _ in range(args.read_ops)
            ]

        samples: dict[str, dict[str, list[Sample]]] = {
            workload: {side.name: [] for side in sides} for workload in ("write", "get_latest")
        }
        for side in sides:  # warm-up: connections, statement caches, the server's buffers
            op, items = write(side)
            await time_sequential(op, items[:50])
            reader, users = read(side, random.Random(0))
            await time_sequential(reader, users[:200])
        for round_index in range(args.rounds):
            order = sides[round_index % len(sides) :] + sides[: round_index % len(sides)]
            print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)
            for side in order:
                op, items = write(side)
                samples["write"][side.name].append(await time_sequential(op, items))
            for side in order:
                reader, users = read(side, random.Random(f"{args.seed}-{round_index}"))
                samples["get_latest"][side.name].append(await time_sequential(reader, users))
        _print(samples, args)
    finally:
        for pool in pools.values():
            pool.close()
            await pool.wait_closed()
        await repo.close()


def _print(samples: dict[str, dict[str, list[Sample]]], args: argparse.Namespace) -> None:
    print(
        f"MariaDB raw baseline, {args.rounds} interleaved rounds of {args.ops} writes and "
        f"{args.read_ops} reads per side; ops/s: median round; p50: over every round's calls; "
        f"ratio: median of per-round ops/s over {_BASELINE}'s (above 1: faster)"
    )
    print(f"{'workload':<11} {'driver':<17} {'ops/s':>9} {'p50 µs':>8} {'/ ' + _BASELINE:>10}")
    for workload, per_side in samples.items():
        base = per_side[_BASELINE]
        for name, rounds in per_side.items():
            rates = [sample.items / (sample.wall_ns / 1e9) for sample in rounds]
            base_rates = [sample.items / (sample.wall_ns / 1e9) for sample in base]
            ratio = statistics.median(a / b for a, b in zip(rates, base_rates, strict=True))
            calls = sorted(latency for sample in rounds for latency in sample.latencies_ns)
            print(
                f"{workload:<11} {name:<17} {statistics.median(rates):>9,.0f} "
                f"{percentile(calls, 50) / 1000:>8.0f} {ratio:>10.2f}"
            )


async def main() -> None:
    """Parse the flags, create the throwaway database, measure, drop it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=200, help="writes per side and round")
    parser.add_argument("--read-ops", type=int, default=1000, help="reads per side and round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--mariadb-url", default=os.environ.get(MARIADB_URL_ENV, DEFAULT_MARIADB_URL)
    )
    args = parser.parse_args()
    server = normalize_url(args.mariadb_url)
    settings = EngineSettings()
    connect = mariadb_connect_args(server, settings)
    name = f"bench_drivers_{secrets.token_hex(4)}"
    admin = await mariadb_admin(connect, settings.connect_timeout)
    try:
        await mariadb_value(
            admin, f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        )
        url = server.set(database=name).render_as_string(hide_password=False)
        await _measure(args, url, name)
    finally:
        await mariadb_value(admin, f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


if __name__ == "__main__":
    asyncio.run(main())
