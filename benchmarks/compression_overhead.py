"""What zstd compression costs and saves: writes and reads with and without it, on SQLite.

Interleaved in one process, several rounds, medians. The states look like a
real cart or agent memory (repeated records, not random bytes), of 1, 10,
100 and 680 KB of JSON. Run from a checkout:

    python benchmarks/compression_overhead.py [--ops 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy import select

import snapshot_repo as sr
from snapshot_repo.compression import Compression
from snapshot_repo.tables import latest_table


class Memory(BaseModel):
    """An agent memory: many short records that repeat their shape and much of their text."""

    items: list[str]


def state_of(kilobytes: int) -> Memory:
    count = kilobytes * 1000 // 35
    return Memory(items=[f"sku-{n % 97:03d}: qty {n % 7}, note 'gift wrap'" for n in range(count)])


async def one_round(
    repo: sr.SnapshotRepository[Memory], state: Memory, ops: int
) -> tuple[float, float]:
    """Seconds per write and per get_latest, over `ops` of each."""
    started = time.perf_counter()
    for n in range(ops):
        await repo.upsert_latest(sr.Snapshot(user_id=f"u{n % 20}", state=state))
    written = time.perf_counter()
    for n in range(ops):
        await repo.get_latest(f"u{n % 20}")
    read = time.perf_counter()
    return (written - started) / ops, (read - written) / ops


async def stored_size(repo: sr.SnapshotRepository[Memory]) -> int:
    """The bytes stored for user u0's latest state."""
    statement = select(latest_table.c.payload).where(latest_table.c.user_id == "u0")
    async with repo.engine.connect() as conn:
        payload = await conn.scalar(statement)
    assert isinstance(payload, bytes)
    return len(payload)


async def main(ops: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        repos: dict[str, sr.SnapshotRepository[Memory]] = {}
        choices: tuple[tuple[str, Compression | None], ...] = (("plain", None), ("zstd", "zstd"))
        for name, compression in choices:
            url = f"sqlite+aiosqlite:///{Path(directory) / name}.db"
            repos[name] = sr.SnapshotRepository.from_url(url, Memory, compression=compression)
            await repos[name].migrate()
        print("size    stored bytes (zstd / plain)   write zstd/plain   read zstd/plain")
        for kilobytes in (1, 10, 100, 680):
            state = state_of(kilobytes)
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in repos}
            for _ in range(rounds):
                for name, repo in repos.items():  # interleaved
                    times[name].append(await one_round(repo, state, ops))
            sizes = {name: await stored_size(repo) for name, repo in repos.items()}
            write = {n: statistics.median(t[0] for t in times[n]) for n in repos}
            read = {n: statistics.median(t[1] for t in times[n]) for n in repos}
            print(
                f"{kilobytes:>4} KB  {sizes['zstd']:>9,} / {sizes['plain']:>9,} "
                f"({sizes['zstd'] / sizes['plain']:6.1%})   "
                f"{write['zstd'] / write['plain']:5.2f}x ({write['zstd'] * 1e3:.2f} ms)   "
                f"{read['zstd'] / read['plain']:5.2f}x ({read['zstd'] * 1e3:.2f} ms)"
            )
        for repo in repos.values():
            await repo.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.ops, arguments.rounds))
