"""The chart `--chart PATH` draws: the library's ratio to every other side, one panel per backend.

A picture of the table's last column, for the README: one horizontal bar per
workload and side, library ops/s over that side's ops/s (the median of the
per-round ratios), on a log scale so that 0.5 and 2 sit equally far from
parity. Workloads no side could compare (the SQLite-only deletes on
Postgres) are left out.

It draws from the JSON report (`BenchReport.to_dict()`, what `--json`
writes), so a saved report can be drawn again:
`write_chart(json.loads(Path("benchmark-results.json").read_text()), Path("chart.png"))`.
Needs matplotlib, which is in the dev extra and nowhere else: `cli` checks
for it before the run and imports this module only when asked for a chart.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

__all__ = ["write_chart"]

_COLORS = {
    "asyncpg": "#4C72B0",
    "aiosqlite": "#4C72B0",
    "sqlite3": "#8172B3",
    "sqlalchemy": "#DD8452",
}
_RAW_TARGET = 0.8  # the target for library/raw, drawn as a dashed line
_BAR_HEIGHT = 0.8
_TICKS = (0.25, 0.5, 0.8, 1, 2, 4, 8, 16, 32, 64)


def write_chart(report: Mapping[str, Any], path: Path) -> None:
    """Draw the library/side ratios of a JSON report as a PNG at `path`.

    Args:
        report: a report as `BenchReport.to_dict()` returns it (and `--json` writes it).
        path: where the PNG goes; an existing file is replaced.

    Raises:
        OSError: the file cannot be written.
    """
    panels = [(name, result) for name, result in report["backends"].items() if _compared(result)]
    bars = [len(_compared(result)) * max(1, len(result["sides"]) - 1) for _, result in panels]
    figure = Figure(figsize=(10, 1.4 + 0.17 * sum(bars) + 0.9 * len(panels)), dpi=110)
    grid = figure.add_gridspec(len(panels) or 1, 1, height_ratios=bars or [1])
    for index, (name, result) in enumerate(panels):
        _panel(figure.add_subplot(grid[index, 0]), name, result)
    env = report["environment"]
    figure.suptitle(
        "snapshot_repo: library ops/s ÷ other side's ops/s (above 1: the library is faster)\n"
        f"median of {report['config']['rounds']} paired rounds; Python {env['python']}, "
        f"{env['cpu_count']} CPUs; {env['started_at']}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, format="png")


def _compared(result: Mapping[str, Any]) -> list[str]:
    """The workloads of one backend with at least one ratio, in report order."""
    return [
        name
        for name, workload in result["workloads"].items()
        if any(ratio is not None for ratio in workload["ratio"].values())
    ]


def _panel(axes: Axes, backend: str, result: Mapping[str, Any]) -> None:
    others: list[str] = result["sides"][1:]
    names = _compared(result)
    ratios = {name: result["workloads"][name]["ratio"] for name in names}
    step = _BAR_HEIGHT / len(others)
    for offset, side in enumerate(others):
        drawn = [(row, ratios[name][side]) for row, name in enumerate(names)]
        drawn = [(row, ratio) for row, ratio in drawn if ratio is not None]
        bars = axes.barh(
            [row + (offset - (len(others) - 1) / 2) * step for row, _ in drawn],
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
    axes.axvline(_RAW_TARGET, color="grey", linewidth=0.8, linestyle="--")
    axes.set_yticks(range(len(names)), labels=names, fontsize=8)
    axes.invert_yaxis()  # the report's order, top to bottom
    axes.set_xlabel("library / side (log scale; dashed: 0.8, the target against raw drivers)")
    axes.set_title(f"{backend}: {result['server']}", fontsize=9, loc="left")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.grid(axis="x", alpha=0.3)
    every = [ratio for row in ratios.values() for ratio in row.values() if ratio is not None]
    axes.set_xlim(min(0.3, min(every) / 1.3), max(3.0, max(every) * 1.6))
