"""Run the scale benchmark from a checkout: `python benchmarks/scale.py --scale USERS [flags]`.

A thin wrapper over `benchmarks.scaling.main` (the same as
`python benchmarks/run.py --scale USERS`); the checkout is put first on the
import path, so the code measured is the package next to this script.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Measure the checkout next to this script, not whatever version is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.scaling import main

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/scale.py"))
