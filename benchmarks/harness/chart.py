"""The chart `--chart PATH` draws: the library's ratio to every other side, one panel per backend.

A picture of the table's ratio columns, for the README: one horizontal bar per
workload and side, library ops/s over that side's ops/s (the median of the
per-round ratios), on a log scale so that 0.5 and 2 sit equally far from
parity. When the core side ran, its bars are in the library's panel
(library/core), and a second panel per backend shows the core backend's own
ratios to the raw drivers and the peer. Workloads no side could compare (the
SQLite-only deletes on Postgres) are left out.

It draws from the JSON report (`BenchReport.to_dict()`, what `--json`
writes), so a saved report can be drawn again:
`write_chart(json.loads(Path("benchmark-results.json").read_text()), Path("chart.png"))`.
Needs matplotlib, which is in the dev extra and nowhere else: `cli` checks
for it before the run and imports this module only when asked for a chart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from .config import CORE, LIBRARY

__all__ = ["write_chart"]

_COLORS = {
    "asyncpg": "#4C72B0",
    "aiosqlite": "#4C72B0",
    "asyncmy": "#4C72B0",
    "sqlite3": "#8172B3",
    "sqlalchemy": "#DD8452",
    CORE: "#55A868",
}
_RAW_TARGET = 0.8  # the target for library/raw, drawn as a dashed line
_BAR_HEIGHT = 0.8
_TICKS = (0.05, 0.1, 0.25, 0.5, 0.8, 1, 2, 4, 8, 16, 32, 64)


def write_chart(report: Mapping[str, Any], path: Path) -> None:
    """Draw the library/side (and core/side) ratios of a JSON report as a PNG at `path`.

    One panel per backend with the library's ratio to every other side, the
    core side included; when the core side ran, a second panel per backend
    with the core backend's ratio to the raw drivers and the peer.

    Args:
        report: a report as `BenchReport.to_dict()` returns it (and `--json` writes it).
        path: where the PNG goes; an existing file is replaced.

    Raises:
        OSError: the file cannot be written.
    """
    panels = [
        panel
        for name, result in report["backends"].items()
        for panel in (_library_panel(name, result), _core_panel(name, result))
        if panel is not None
    ]
    bars = [len(panel.ratios) * max(1, len(panel.sides)) for panel in panels]
    height = 1.4 + 0.17 * sum(bars) + 0.9 * len(panels)
    figure = Figure(figsize=(10, height), dpi=110, layout="constrained")  # room for the title
    grid = figure.add_gridspec(len(panels) or 1, 1, height_ratios=bars or [1])
    for index, panel in enumerate(panels):
        _draw(figure.add_subplot(grid[index, 0]), panel)
    env = report["environment"]
    with_core = any(panel.numerator == CORE for panel in panels)
    figure.suptitle(
        "snapshot_repo: library ops/s ÷ other side's ops/s (above 1: the library is faster)"
        f"{'; in the core panels, its core backend' if with_core else ''}\n"
        f"median of {report['config']['rounds']} paired rounds; Python {env['python']}, "
        f"{env['cpu_count']} CPUs; {env['started_at']}",
        fontsize=10,
    )
    figure.savefig(path, format="png")


@dataclass(frozen=True, slots=True)
class _Panel:
    """One panel: per workload (top to bottom) and side, the ratio of `numerator` to that side."""

    title: str
    numerator: str
    sides: list[str]
    ratios: dict[str, dict[str, float]]


def _library_panel(backend: str, result: Mapping[str, Any]) -> _Panel | None:
    return _panel_of(
        f"{backend}: {result['server']}",
        LIBRARY,
        result["sides"][1:],
        {name: workload["ratio"] for name, workload in result["workloads"].items()},
    )


def _core_panel(backend: str, result: Mapping[str, Any]) -> _Panel | None:
    if CORE not in result["sides"]:
        return None
    return _panel_of(
        f"{backend}: {result['server']}; the library on its core backend",
        CORE,
        [side for side in result["sides"][1:] if side != CORE],
        {name: workload.get("core_ratio", {}) for name, workload in result["workloads"].items()},
    )


def _panel_of(
    title: str,
    numerator: str,
    sides: list[str],
    ratios: Mapping[str, Mapping[str, float | None]],
) -> _Panel | None:
    """The panel, keeping the workloads with at least one ratio (none: no panel)."""
    kept = {
        name: {side: ratio for side, ratio in row.items() if ratio is not None}
        for name, row in ratios.items()
    }
    kept = {name: row for name, row in kept.items() if row}
    return _Panel(title, numerator, sides, kept) if kept else None


def _draw(axes: Axes, panel: _Panel) -> None:
    names = list(panel.ratios)
    step = _BAR_HEIGHT / len(panel.sides)
    for offset, side in enumerate(panel.sides):
        drawn = [
            (row, panel.ratios[name][side])
            for row, name in enumerate(names)
            if side in panel.ratios[name]
        ]
        bars = axes.barh(
            [row + (offset - (len(panel.sides) - 1) / 2) * step for row, _ in drawn],
            [ratio for _, ratio in drawn],
            height=step,
            color=_COLORS.get(side),
            label=side,
        )
        axes.bar_label(bars, labels=[f"{ratio:.2f}" for _, ratio in drawn], padding=2, fontsize=7)
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(FixedLocator(_TICKS))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}"))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.axvline(1.0, color="black", linewidth=0.8)
    if panel.numerator == LIBRARY:  # the target is the fast backend's, not the core's
        axes.axvline(_RAW_TARGET, color="grey", linewidth=0.8, linestyle="--")
    axes.set_yticks(range(len(names)), labels=names, fontsize=8)
    axes.invert_yaxis()  # the report's order, top to bottom
    axes.set_xlabel(
        f"{panel.numerator} / side (log scale"
        + ("; dashed: 0.8, the target against raw drivers)" if panel.numerator == LIBRARY else ")")
    )
    axes.set_title(panel.title, fontsize=9, loc="left")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.grid(axis="x", alpha=0.3)
    every = [ratio for row in panel.ratios.values() for ratio in row.values()]
    axes.set_xlim(min(0.3, min(every) / 1.3), max(3.0, max(every) * 1.6))
