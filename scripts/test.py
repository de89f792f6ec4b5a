"""Quickstart, step 2: install into .venv with the dev tools, lint, type-check and test.

Runs ruff, mypy --strict and the whole pytest suite (SQLite and Postgres).
Extra arguments go to pytest. Exits non-zero if any step fails, and pytest
itself fails when no test ran.
"""

from __future__ import annotations

import sys

from _venv import ensure_installed, run, venv_bin

if __name__ == "__main__":
    ensure_installed("dev")
    for step in (
        (venv_bin("ruff"), "check", "."),
        (venv_bin("ruff"), "format", "--check", "."),
        (venv_bin("mypy"),),
        (venv_bin("pytest"), *sys.argv[1:]),
    ):
        code = run(*step)
        if code != 0:
            sys.exit(code)
