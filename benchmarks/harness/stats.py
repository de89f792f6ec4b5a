"""From samples to results: medians over rounds, and ratios paired round by round.

Every ratio is a median of per-round quotients, never a quotient of medians:
a round in which the machine was slow for both sides then counts as one
ordinary pairing instead of skewing one side's median.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import cast

from .results import SideResult, WorkloadResult
from .timing import Sample, percentile, round_result

__all__ = ["bulk_speedups", "median", "paired_ratio", "summarize"]

_BULK_PAIRS = {
    "write": ("bulk_write", "bulk_write_single"),
    "read": ("bulk_read", "bulk_read_single"),
}


def median(values: Sequence[float]) -> float:
    """The median, as a float whatever the input's type."""
    return float(statistics.median(values))


def summarize(samples: Sequence[Sample | str]) -> SideResult:
    """One side's rounds of one workload as a result; a string sample says why it did not run.

    Throughput is the median round; p50 and p99 pool every round's calls, since
    a round's own p99 of 70 calls is about its slowest call.
    """
    reasons = [sample for sample in samples if isinstance(sample, str)]
    if reasons:
        return SideResult(False, reasons[0], None, None, None, ())
    timed = [cast(Sample, sample) for sample in samples]
    every_call = sorted(latency for sample in timed for latency in sample.latencies_ns)
    rounds = tuple(map(round_result, timed))
    return SideResult(
        available=True,
        reason=None,
        ops_per_s=median([r.ops_per_s for r in rounds]),
        p50_us=percentile(every_call, 50) / 1000,
        p99_us=percentile(every_call, 99) / 1000,
        rounds=rounds,
    )


def paired_ratio(numerator: SideResult, denominator: SideResult) -> float | None:
    """Median over rounds of the two results' ops/s quotient, each measured in one round:
    library/raw for a workload, or one side's bulk/single throughput."""
    if not (numerator.available and denominator.available):
        return None
    pairs = zip(numerator.rounds, denominator.rounds, strict=True)
    return median([top.ops_per_s / bottom.ops_per_s for top, bottom in pairs])


def bulk_speedups(
    results: Mapping[str, WorkloadResult], sides: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """Per kind ("write", "read") and side: bulk over single-call throughput, round by round."""
    return {
        kind: {
            side: paired_ratio(results[bulk].results[side], results[single].results[side])
            for side in sides
        }
        for kind, (bulk, single) in _BULK_PAIRS.items()
    }
