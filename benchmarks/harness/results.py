"""What a run measured: per round, per side, per workload, per backend, and the whole run.

Plain frozen dataclasses, so `BenchReport.to_dict()` is `dataclasses.asdict`
and the JSON report has exactly these fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .config import BenchConfig
from .table import format_report

__all__ = ["BackendReport", "BenchReport", "RoundResult", "SideResult", "WorkloadResult"]


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
        results: per side name ("library", then the raw drivers, "core", the peer).
        ratio: per other side, the median across rounds of library ops/s divided
            by that side's ops/s in the same round; None when the library side
            is not available. Above 1: the library is faster.
        core_ratio: the same for the `core` side against every side but the
            library's (the raw drivers and the peer); empty when the core side
            was not run. Above 1: the core backend is faster.
    """

    description: str
    latency_per: str
    results: dict[str, SideResult]
    ratio: dict[str, float | None]
    core_ratio: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BackendReport:
    """Every workload on one database.

    Attributes:
        server: the database's name and version.
        sides: side names: the library first, then the raw drivers, then (when
            run) the core side and the peer.
        durability: the durability settings every side was checked to run with.
        workloads: per workload name, in `WORKLOADS` order.
        depth_ratio: per side, p50 of `get_history` on the deep user / p50 on
            shallow users, the two kinds of call alternating in one timed
            phase per round (`Workloads.depth`); median over rounds. About 1
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
    """The whole run: configuration, environment, and one report per backend.

    Attributes:
        skipped: per backend that did not run, why (a MariaDB server that
            cannot be reached, or no asyncmy installed).
    """

    config: BenchConfig
    environment: dict[str, Any]
    backends: dict[str, BackendReport]
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values (what `--json` writes)."""
        return {
            "config": self.config.to_dict(),
            "environment": self.environment,
            "backends": {name: asdict(report) for name, report in self.backends.items()},
            "skipped": dict(self.skipped),
        }

    def format_table(self) -> str:
        """A readable table per backend, as printed by `main`."""
        return format_report(self)
