"""What keeping the user count costs writes: revision 0018's triggers on and off.

The same repository writes with the database at head (the triggers append a
+1/-1 row per user added or removed) and downgraded to 0017 (no triggers),
alternating, several rounds, medians. Per round and state: single writes of
new users, batches of new users, updates of existing users (single and a
batch), deletes. Run from a checkout, against a database of its own (it is
migrated, and written to):

    python benchmarks/user_count_triggers.py URL [--rounds 8] [--ops 100] [--batch 500]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import snapshot_repo as sr
from snapshot_repo import migrate

Repo = sr.SnapshotRepository[sr.JsonObject]
CALLS = ("new user", "batch of new users", "update", "batch of updates", "delete")


async def timed(work: Callable[[], Awaitable[object]], calls: int) -> float:
    """Milliseconds per call of `calls` calls made by `work`."""
    started = time.perf_counter()
    await work()
    return (time.perf_counter() - started) / calls * 1e3


async def one_round(repo: Repo, ops: int, batch: int) -> dict[str, float]:
    """Each call's milliseconds, on users no earlier round wrote."""
    prefix = uuid.uuid4().hex[:8]
    singles = [f"{prefix}-s{n}" for n in range(ops)]
    batched = [f"{prefix}-b{n}" for n in range(batch)]

    async def write_each() -> None:
        for user_id in singles:
            await repo.upsert_latest(sr.Snapshot(user_id=user_id, state={"n": 1}))

    async def write_batch() -> None:
        await repo.upsert_many([sr.Snapshot(user_id=u, state={"n": 1}) for u in batched])

    async def delete_each() -> None:
        for user_id in singles:
            await repo.delete(user_id)

    return {
        "new user": await timed(write_each, ops),
        "batch of new users": await timed(write_batch, 1),
        "update": await timed(write_each, ops),
        "batch of updates": await timed(write_batch, 1),
        "delete": await timed(delete_each, ops),
    }


async def run(url: str, rounds: int, ops: int, batch: int) -> None:
    async with sr.SnapshotRepository.from_url(url) as repo:
        await repo.migrate()
        results: dict[bool, dict[str, list[float]]] = {
            counted: {call: [] for call in CALLS} for counted in (True, False)
        }
        at_head = True
        for number in range(rounds):
            for counted in (True, False) if number % 2 == 0 else (False, True):
                if counted != at_head:
                    if counted:
                        await migrate.upgrade(repo.engine)
                    else:
                        await migrate.downgrade(repo.engine, "0017")
                    at_head = counted
                for call, milliseconds in (await one_round(repo, ops, batch)).items():
                    results[counted][call].append(milliseconds)
        if not at_head:
            await migrate.upgrade(repo.engine)
        print(f"{repo.engine.dialect.name}: {rounds} rounds, medians, ms per call")
        for call in CALLS:
            with_count = statistics.median(results[True][call])
            without = statistics.median(results[False][call])
            print(
                f"  {call:20s} counted {with_count:8.3f}  not counted {without:8.3f}"
                f"  ratio {with_count / without:5.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="a database of its own: it is migrated and written")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--ops", type=int, default=100, help="single calls per round")
    parser.add_argument("--batch", type=int, default=500, help="snapshots per batch")
    args = parser.parse_args()
    asyncio.run(run(args.url, args.rounds, args.ops, args.batch))


if __name__ == "__main__":
    main()
