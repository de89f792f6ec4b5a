"""Developer tools of `snapshot_repo`, run from a checkout: not part of the wheel.

`python benchmarks/run.py` runs the benchmark harness (`benchmarks.harness`);
benchmarks/README.md explains what it measures and records the runs.
"""
