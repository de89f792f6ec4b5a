"""The scale benchmark's result: ratios against the issue's targets, bytes per row, the table.

`ScaleReport.as_json()` is what `--json` writes; `render` is the table on stdout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .measure import CallRatio
from .raw import RAW_CALLS
from .sizes import RelationSize

__all__ = ["TARGETS", "ScaleReport", "render", "verdict"]

TARGETS: dict[str, tuple[str, float]] = {
    "get_latest": ("p99", 1.2),
    "get_latest_many(100)": ("p99", 1.2),
    "get_history(10)": ("p99", 1.5),
    "count_users": ("p50", 2.0),
    "upsert_latest": ("p50", 1.5),
}
"""Issue #19's targets at 1M users x 10 versions against 1K: which ratio, and its bound."""


@dataclass
class ScaleReport:
    """Everything one scale run measured on one backend."""

    backend: str
    server: str
    big_users: int
    small_users: int
    versions: int
    load_seconds: dict[str, float]
    analyze_seconds: dict[str, float]
    before_analyze_ms: dict[str, list[float]]
    ratios: list[CallRatio]
    sizes: dict[str, list[RelationSize]]
    # The first `count_users` after a load, which folds the load's +1 rows into one.
    first_count_ms: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The report as JSON-ready data, with each call's target and verdict."""
        data = asdict(self)
        data["targets"] = {
            ratio.call: {
                "stat": TARGETS[ratio.call][0],
                "bound": TARGETS[ratio.call][1],
                "met": verdict(ratio),
            }
            for ratio in self.ratios
            if ratio.call in TARGETS
        }
        return data


def verdict(ratio: CallRatio) -> bool | None:
    """Whether `ratio` meets its target (None: the call has no target)."""
    if ratio.call not in TARGETS:
        return None
    stat, bound = TARGETS[ratio.call]
    return (ratio.p99_ratio if stat == "p99" else ratio.p50_ratio) <= bound


def _ms(microseconds: float) -> str:
    return f"{microseconds / 1000:.3f}"


def render(report: ScaleReport) -> str:
    """The report as a plain-text table."""
    lines = [
        f"{report.backend} ({report.server}): {report.big_users:,} users vs "
        f"{report.small_users:,}, {report.versions} versions each",
        "load (upsert_many): "
        + ", ".join(f"{k} {v:,.0f} s" for k, v in report.load_seconds.items())
        + "; analyze: "
        + ", ".join(f"{k} {v:,.1f} s" for k, v in report.analyze_seconds.items()),
    ]
    for label, times in report.before_analyze_ms.items():
        if times:
            shown = ", ".join(f"{t:,.1f}" for t in times)
            lines.append(f"get_latest_many(100) before ANALYZE, {label}: {shown} ms")
    if report.first_count_ms:
        shown = ", ".join(f"{k} {v:,.1f} ms" for k, v in report.first_count_ms.items())
        lines.append(f"count_users after the load (folding a +1 row per user): {shown}")
    lines.append("")
    header = (
        f"{'call':<26}{'big p50':>10}{'big p99':>10}{'small p50':>11}{'small p99':>11}"
        f"{'p50 x':>8}{'p99 x':>8}  target"
    )
    lines += [header + "   (ms)", "-" * len(header)]
    for ratio in report.ratios:
        target = ""
        if ratio.call in TARGETS:
            stat, bound = TARGETS[ratio.call]
            target = f"{stat} <= {bound}x: {'met' if verdict(ratio) else 'MISSED'}"
        lines.append(
            f"{ratio.call:<26}{_ms(ratio.big_p50_us):>10}{_ms(ratio.big_p99_us):>10}"
            f"{_ms(ratio.small_p50_us):>11}{_ms(ratio.small_p99_us):>11}"
            f"{ratio.p50_ratio:>8.2f}{ratio.p99_ratio:>8.2f}  {target}"
        )
    if any(ratio.call in RAW_CALLS for ratio in report.ratios):
        lines.append(
            "raw: the same read as hand-written SQL on the bare driver (the main benchmark's "
            "asyncpg or sqlite3 side): about the database's own growth, which a library "
            "call adds a constant to"
        )
    for label, sizes in report.sizes.items():
        lines += [
            "",
            f"bytes per row, {label}:",
            f"{'relation':<40}{'bytes':>16}{'rows':>14}{'B/row':>9}",
        ]
        for size in sizes:
            per_row = "-" if size.bytes_per_row is None else f"{size.bytes_per_row:.1f}"
            lines.append(f"{size.relation:<40}{size.bytes:>16,}{size.rows:>14,}{per_row:>9}")
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)
