"""Run the snapshot_repo benchmark from a checkout: `python benchmarks/run.py [flags]`.

A thin wrapper over `snapshot_repo.benchmark.main`, which holds the harness
(inside the package, so an installed `snapshot-repo bench` runs the same
code). The checkout's package is put first on the import path, so the code
benchmarked is the code next to this script. `--help` lists the flags;
benchmarks/README.md explains the workloads and the output.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Benchmark the checkout next to this script, not whatever version is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from snapshot_repo.benchmark import main

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/run.py"))
