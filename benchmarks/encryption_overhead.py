"""What crypto-shredding costs: the same workload through a repository with and without it.

Interleaved in one process, several rounds, medians; writes and get_latest of
1 KB states on SQLite and Postgres. Run from a checkout:

    python benchmarks/encryption_overhead.py [--ops 500] [--rounds 3]
        [--postgres-url postgresql+asyncpg://postgres@127.0.0.1:5432/postgres]

Postgres: a throwaway database is created next to the given one and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import asyncpg
from pydantic import BaseModel
from sqlalchemy.engine import make_url

import snapshot_repo as sr


class State(BaseModel):
    """A state of about 1 KB of JSON, as in the main benchmark."""

    name: str
    tags: list[str]


STATE = State(name="x" * 100, tags=["t" * 20] * 40)  # about 1 KB of JSON


async def _timed(ops: int, call: Callable[[int], Awaitable[object]]) -> float:
    started = time.perf_counter()
    for n in range(ops):
        await call(n)
    return ops / (time.perf_counter() - started)


async def _write(repo: sr.SnapshotRepository[State], n: int) -> object:
    return await repo.upsert_latest(sr.Snapshot(user_id=f"u{n % 50}", state=STATE))


async def _read(repo: sr.SnapshotRepository[State], n: int) -> object:
    return await repo.get_latest(f"u{n % 50}")


_OPERATIONS = (("write", _write), ("get_latest", _read))


async def _measure(url: str, ops: int, rounds: int) -> dict[str, float]:
    key = sr.LocalKeyProvider({"k1": os.urandom(32)}, active="k1")
    plain = sr.SnapshotRepository.from_url(url, State, namespace="plain")
    sealed = sr.SnapshotRepository.from_url(url, State, namespace="sealed", encryption=key)
    await plain.migrate()
    ratios: dict[str, list[float]] = {"write": [], "get_latest": []}
    try:
        for _ in range(rounds):
            for name, operation in _OPERATIONS:
                base = await _timed(ops, partial(operation, plain))
                enc = await _timed(ops, partial(operation, sealed))
                ratios[name].append(enc / base)
    finally:
        await sealed.close()
        await plain.close()
    return {name: statistics.median(values) for name, values in ratios.items()}


async def main() -> None:
    """Parse the flags, measure SQLite then Postgres, print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--postgres-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        sqlite = await _measure(
            f"sqlite+aiosqlite:///{Path(folder) / 'b.db'}", args.ops, args.rounds
        )
    server = make_url(args.postgres_url)
    name = f"snaprepo_crypto_{uuid.uuid4().hex[:8]}"
    dsn = server.set(drivername="postgresql").render_as_string(hide_password=False)
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = server.set(database=name).render_as_string(hide_password=False)
        postgres = await _measure(url, args.ops, args.rounds)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print("encrypted / plain throughput (medians of per-round ratios; 1.0 = no overhead)")
    for backend, ratios in (("sqlite", sqlite), ("postgres", postgres)):
        for workload, ratio in ratios.items():
            print(f"  {backend:9} {workload:11} {ratio:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
