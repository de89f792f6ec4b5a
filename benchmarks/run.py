"""Run the snapshot_repo benchmark from a checkout: `python benchmarks/run.py [flags]`.

A thin wrapper over `benchmarks.harness.main`. The harness is a developer
tool: it lives here, next to this script, and is not in the wheel, so the
installed `snapshot-repo` command has no `bench`. The checkout is put first
on the import path, so the code benchmarked is the package next to this
script, not whatever version is installed. `--help` lists the flags;
benchmarks/README.md explains the workloads and the output. With
`--scale USERS` it runs the scale benchmark instead (`benchmarks/scale.py`).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Benchmark the checkout next to this script, not whatever version is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import main
from benchmarks.scaling import main as scale_main


def _wants_scale(argv: list[str]) -> bool:
    """`--scale USERS` selects the scale benchmark (benchmarks/scaling/), with its own flags."""
    return any(arg == "--scale" or arg.startswith("--scale=") for arg in argv)


if __name__ == "__main__":
    if _wants_scale(sys.argv[1:]):
        sys.exit(scale_main(prog="python benchmarks/run.py"))
    sys.exit(main(prog="python benchmarks/run.py"))
