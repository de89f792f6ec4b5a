"""The scale benchmark (issue #19): what a million users cost each call, against a thousand.

`python benchmarks/scale.py --scale 1000000 --scale-versions 10` loads the
users through `upsert_many` into a throwaway big database and 1,000 into a
small one, then times `get_latest`, `get_latest_many(100)`,
`get_history(limit=10)`, `count_users` and `upsert_latest` on both,
interleaved, with the two reads also as hand-written SQL on the bare driver
(`raw`: the database's own growth, the floor of the library's), and reports
p50/p99 ratios big/small against the issue's targets and the bytes per row
of every table and index. `created_at` holds
the experiment on the history table's created_at index. See
benchmarks/README.md ("Scale").
"""

from __future__ import annotations

from .cli import main
from .report import TARGETS, ScaleReport, render
from .runner import ScaleOptions, run_scale

__all__ = ["TARGETS", "ScaleOptions", "ScaleReport", "main", "render", "run_scale"]
