"""Timing one phase: every call's latency and the whole phase's wall time.

`time.perf_counter_ns` around each call and around the phase; the garbage
collector runs before every phase, so each side starts with the same
(empty) garbage, and stays enabled during it, since the garbage a side makes
is part of its cost.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .results import RoundResult

__all__ = ["Sample", "percentile", "round_result", "time_concurrent", "time_sequential"]

_ArgT = TypeVar("_ArgT")


@dataclass(frozen=True, slots=True)
class Sample:
    """One side's timed phase: items done, the phase's wall time, and every call's latency."""

    items: int
    wall_ns: int
    latencies_ns: list[int]


async def time_sequential(
    op: Callable[[_ArgT], Awaitable[object]], args: Sequence[_ArgT], items_per_call: int = 1
) -> Sample:
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
    return Sample(len(args) * items_per_call, wall, latencies)


async def time_concurrent(
    op: Callable[[_ArgT], Awaitable[object]], args: Sequence[_ArgT], workers: int
) -> Sample:
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
    return Sample(len(args), wall, latencies)


def percentile(sorted_values: Sequence[int], q: float) -> float:
    """Linear-interpolated percentile (as numpy's default) of pre-sorted values."""
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def round_result(sample: Sample) -> RoundResult:
    """One phase's throughput and latency percentiles, as reported per round."""
    ordered = sorted(sample.latencies_ns)
    return RoundResult(
        ops_per_s=sample.items / (sample.wall_ns / 1e9),
        p50_us=percentile(ordered, 50) / 1000,
        p99_us=percentile(ordered, 99) / 1000,
        items=sample.items,
    )
