"""The readable table `main` prints: one block per backend, one row per workload and side.

The last columns are ratios of ops/s measured in the same rounds: the library's
(its fast backend) to each other side, and, when the core side ran, the core
backend's to each raw driver and the peer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import CORE, LIBRARY

if TYPE_CHECKING:
    from .results import BenchReport

__all__ = ["format_report"]


def _fmt_number(value: float | None, unit: str = "", digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_report(report: BenchReport) -> str:
    """The whole report as aligned text, the library's ratio to each other side per row."""
    lines: list[str] = []
    config = report.config
    header = (
        f"{'workload':<21} {'side':<10} {'ops/s':>11} {'p50 ms':>9} {'p99 ms':>9}  {'lib/side':>8}"
        + (f"  {'core/side':>9}" if config.core else "")
    )
    env = report.environment
    against = [
        "raw drivers",
        *(["its core backend"] if config.core else []),
        *(["plain SQLAlchemy"] if config.peer else []),
    ]
    lines.append(
        f"snapshot_repo {env['packages']['snapshot-repo']} vs "
        f"{_listed(against)}; "
        f"Python {env['python']}; states of {env['payload_bytes']} bytes of JSON"
    )
    lines.append("")
    for backend, result in report.backends.items():
        settings = ", ".join(f"{k}={v}" for k, v in result.durability.items() if k != "path")
        lines.append(
            f"== {backend}: {result.server}; {settings}; {config.rounds} round(s), "
            f"medians; {result.seconds:.0f} s =="
        )
        lines.append(header)
        lines.append("-" * len(header))
        for name, workload in result.workloads.items():
            label = name
            for side in result.sides:
                outcome = workload.results[side]
                if not outcome.available:
                    row = f"{label:<21} {side:<10} not available: {outcome.reason}"
                else:
                    row = (
                        f"{label:<21} {side:<10} {_fmt_number(outcome.ops_per_s, digits=1):>11} "
                        f"{_fmt_number(_ms(outcome.p50_us), digits=3):>9} "
                        f"{_fmt_number(_ms(outcome.p99_us), digits=3):>9}"
                    )
                    if side != LIBRARY:
                        row += f"  {_fmt_ratio(workload.ratio[side]):>8}"
                    if side in workload.core_ratio:
                        row += f"  {_fmt_ratio(workload.core_ratio[side]):>9}"
                lines.append(row)
                label = ""
        lines.append("")
        lines.append(
            f"depth ratio, p50 get_history(limit={config.history_limit}), alternating calls, at "
            f"{config.deep_versions:,} / at {config.history_versions} versions: "
            + ", ".join(f"{side} {_fmt_ratio(v)}" for side, v in result.depth_ratio.items())
        )
        for kind, speedups in result.bulk_speedup.items():
            lines.append(
                f"bulk {kind} speedup, {config.bulk_size} per call vs one per call: "
                + ", ".join(
                    f"{side} {'n/a' if v is None else f'{v:.1f}x'}" for side, v in speedups.items()
                )
            )
        lines.append("")
    for backend, reason in report.skipped.items():
        lines.append(f"== {backend}: skipped: {reason} ==")
        lines.append("")
    lines.append(
        "ops/s counts snapshots for bulk_* workloads; p50/p99 are per call. lib/side = library "
        "ops/s / that side's ops/s (a raw driver, the core side or the plain-SQLAlchemy peer), "
        "median of per-round ratios (above 1: the library is faster)."
        + (
            f' {CORE}/side = the same for the library on its core backend (backend="core"); '
            f"{LIBRARY} runs on the default, fast backend."
            if config.core
            else ""
        )
    )
    load = report.environment.get("loadavg_start"), report.environment.get("loadavg_end")
    lines.append(
        f"load average at start/end: {load[0]} / {load[1]} on {report.environment['cpu_count']} "
        "CPUs; other processes on the machine add noise."
    )
    return "\n".join(lines)


def _listed(words: list[str]) -> str:
    """The words as prose: "a", "a and b", "a, b and c"."""
    return " and ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)


def _ms(microseconds: float | None) -> float | None:
    return None if microseconds is None else microseconds / 1000
