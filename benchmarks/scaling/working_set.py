"""The working-set experiment: where `get_latest_many(100)`'s growth with the users comes from.

`get_latest_many(100)` grows about 2x from 1,000 to 1,000,000 users, on the
bare driver as much as through the library (benchmarks/README "Scale"). Two
things differ between those databases: the size of the table and its index
(one more B-tree level, a bigger buffer pool to look pages up in) and the
spread of the pages 100 random users touch (a few pages that stay in the
CPU's caches, against 100 leaf and 100 heap pages anywhere in a gigabyte).

This experiment keeps the table and varies only the spread: on the loaded
big database it reads 100 random users drawn from the first K users, for K
from the small database's size up to every user, interleaved with the same
call on the small database. If the growth were the table's size, every K
would cost what K = all costs; if it is the spread, K = 1,000 on the big
table costs what the small database costs, and the time climbs with K.
Both the library's call and the bare driver's (`raw`) are timed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from ..harness.timing import percentile
from .measure import Target, time_block

__all__ = ["WorkingSetRow", "render_working_set", "run_working_set", "spreads"]

_CALLS = ("get_latest_many(100)", "raw get_latest_many(100)")


@dataclass(frozen=True)
class WorkingSetRow:
    """One call on one database, its ids drawn from its first `drawn_from` users."""

    call: str
    database: str
    drawn_from: int
    p50_us: float
    p99_us: float
    p50_ratio: float  # against the small database's p50 of the same call
    p99_ratio: float


def spreads(big_users: int, small_users: int) -> list[int]:
    """The K values tried on the big database: the small size, then x10 steps, then all."""
    values = []
    k = small_users
    while k < big_users:
        values.append(k)
        k *= 10
    return [*values, big_users]


async def run_working_set(
    big: Target,
    small: Target,
    *,
    rounds: int,
    block: int,
    progress: Callable[[str], None] = lambda _: None,
    seed: int = 23,
) -> list[WorkingSetRow]:
    """Time both calls on the small database and on the big one for every spread.

    Each round runs `block` calls of one call on each (database, K) cell, the
    cells' order rotated every round, after one untimed warm-up round.
    """
    cells: list[tuple[str, Target]] = [("small", small)]
    cells += [("big", Target(big.database, k, big.raw)) for k in spreads(big.users, small.users)]
    rng = random.Random(seed)
    times: dict[tuple[str, int, str], list[int]] = {}
    for round_ in range(rounds + 1):
        progress(f"working set: round {round_} of {rounds}")
        shift = round_ % len(cells)
        for call in _CALLS:
            for label, target in cells[shift:] + cells[:shift]:
                sink = times.setdefault((label, target.users, call), [])
                await time_block(call, target, block, rng, [] if round_ == 0 else sink)
    rows = []
    for call in _CALLS:
        small_times = sorted(times[("small", small.users, call)])
        small_p50, small_p99 = percentile(small_times, 50), percentile(small_times, 99)
        for label, target in cells:
            ordered = sorted(times[(label, target.users, call)])
            p50, p99 = percentile(ordered, 50), percentile(ordered, 99)
            rows.append(
                WorkingSetRow(
                    call=call,
                    database=label,
                    drawn_from=target.users,
                    p50_us=p50 / 1000,
                    p99_us=p99 / 1000,
                    p50_ratio=p50 / small_p50,
                    p99_ratio=p99 / small_p99,
                )
            )
    return rows


def render_working_set(rows: list[WorkingSetRow]) -> str:
    """The experiment as a Markdown table."""
    lines = [
        "| call | database | ids drawn from | p50 ms | p99 ms | p50 x small | p99 x small |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| `{row.call}` | {row.database} | first {row.drawn_from:,} users "
            f"| {row.p50_us / 1000:.2f} | {row.p99_us / 1000:.2f} "
            f"| {row.p50_ratio:.2f} | {row.p99_ratio:.2f} |"
        )
    return "\n".join(lines)
