"""The timed part: the same calls on the big and the small database, interleaved.

Block by block in one process: `block` calls of one kind on one database,
then the same on the other, the order swapped every round, for `rounds`
rounds. Whatever the machine does meanwhile (another process, a checkpoint,
the clock) then falls on both sizes alike, and the ratio big/small is what
the size alone costs. Users are drawn uniformly from each database's whole
range, so the big one's reads miss the cache as a live service's would.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from snapshot_repo import Snapshot

from ..harness.sides import Side
from ..harness.timing import percentile, time_sequential
from .databases import ScaleDatabase
from .load import scale_states, user_id
from .raw import RAW_CALLS

__all__ = [
    "CALLS",
    "LIBRARY_CALLS",
    "CallRatio",
    "Target",
    "interleave",
    "time_before_analyze",
    "time_block",
]

LIBRARY_CALLS = (
    "get_latest",
    "get_latest_many(100)",
    "get_history(10)",
    "count_users",
    "upsert_latest",
)
"""The library's calls timed: reads, the count, and writes of existing users."""

CALLS = (*LIBRARY_CALLS, *RAW_CALLS)
"""Every call timed, as reported: the library's, then the floor's (`raw`)."""

_MANY = 100
_COUNT_SHARE = 10  # count_users runs block/10 times a block (it was an O(users) scan)


@dataclass(frozen=True)
class Target:
    """A database, how many users it holds (ids 0 .. users-1), and its raw side (`raw`)."""

    database: ScaleDatabase
    users: int
    raw: Side | None = None


@dataclass(frozen=True)
class CallRatio:
    """One call's latencies on both sizes (microseconds) and their ratios big/small."""

    call: str
    calls_each: int
    big_p50_us: float
    big_p99_us: float
    small_p50_us: float
    small_p99_us: float
    p50_ratio: float
    p99_ratio: float


_Op = Callable[[object], Awaitable[object]]


def _plan(call: str, target: Target, count: int, rng: random.Random) -> tuple[_Op, list[object]]:
    """The operation for `call` on `target` and its `count` arguments, drawn before timing."""
    repo = target.database.repo
    users = target.users

    def some_user() -> str:
        return user_id(rng.randrange(users))

    if call in RAW_CALLS:
        if target.raw is None:
            raise ValueError(f"{call!r} needs the target's raw side")
        if call == "raw get_latest":
            return _typed(target.raw.get_latest), [some_user() for _ in range(count)]
        return _typed(target.raw.bulk_read), [
            [some_user() for _ in range(_MANY)] for _ in range(count)
        ]
    if call == "get_latest":
        return _typed(repo.get_latest), [some_user() for _ in range(count)]
    if call == "get_latest_many(100)":
        return _typed(repo.get_latest_many), [
            [some_user() for _ in range(_MANY)] for _ in range(count)
        ]
    if call == "get_history(10)":

        async def history(uid: object) -> object:
            return await repo.get_history(str(uid), limit=10)

        return history, [some_user() for _ in range(count)]
    if call == "count_users":

        async def count_users(_: object) -> object:
            return await repo.count_users()

        return count_users, [None] * count
    if call == "upsert_latest":
        states = scale_states()
        snapshots: list[object] = [
            Snapshot(user_id=some_user(), state=rng.choice(states)) for _ in range(count)
        ]
        return _typed(repo.upsert_latest), snapshots
    raise ValueError(f"unknown call {call!r}")


def _typed(method: Callable[[Any], Awaitable[object]]) -> _Op:
    """`method` as an operation on an untyped argument (the arguments are drawn per call)."""

    async def op(arg: object) -> object:
        return await method(arg)

    return op


async def time_block(
    call: str, target: Target, count: int, rng: random.Random, into: list[int]
) -> None:
    """Time `count` calls of `call` on `target`, one after another; their nanoseconds go `into`."""
    op, args = _plan(call, target, count, rng)
    sample = await time_sequential(op, args)
    into.extend(sample.latencies_ns)


async def interleave(
    big: Target,
    small: Target,
    *,
    rounds: int,
    block: int,
    calls: Sequence[str] = CALLS,
    seed: int = 19,
) -> list[CallRatio]:
    """Time every call on both sizes, interleaved, after one untimed warm-up round.

    Returns one `CallRatio` per call, in `calls` order: p50 and p99 pool every
    round's calls of that size.
    """
    rng = random.Random(seed)
    times: dict[tuple[str, str], list[int]] = {(c, t): [] for c in calls for t in ("big", "small")}
    for round_ in range(rounds + 1):
        order = (("big", big), ("small", small)) if round_ % 2 else (("small", small), ("big", big))
        for call in calls:
            count = max(1, block // _COUNT_SHARE) if call == "count_users" else block
            for label, target in order:
                sink: list[int] = [] if round_ == 0 else times[(call, label)]
                await time_block(call, target, count, rng, sink)
    results = []
    for call in calls:
        big_times = sorted(times[(call, "big")])
        small_times = sorted(times[(call, "small")])
        big_p50, big_p99 = percentile(big_times, 50) / 1000, percentile(big_times, 99) / 1000
        small_p50 = percentile(small_times, 50) / 1000
        small_p99 = percentile(small_times, 99) / 1000
        results.append(
            CallRatio(
                call=call,
                calls_each=len(big_times),
                big_p50_us=big_p50,
                big_p99_us=big_p99,
                small_p50_us=small_p50,
                small_p99_us=small_p99,
                p50_ratio=big_p50 / small_p50,
                p99_ratio=big_p99 / small_p99,
            )
        )
    return results


async def time_before_analyze(target: Target, calls: int, seed: int = 3) -> list[float]:
    """`get_latest_many(100)` on tables without statistics: each call's milliseconds."""
    rng = random.Random(seed)
    op, args = _plan("get_latest_many(100)", target, calls, rng)
    sample = await time_sequential(op, args)
    return [latency / 1e6 for latency in sample.latencies_ns]
