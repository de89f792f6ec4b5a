"""Quickstart, step 1: install into .venv and run the demo on the embedded SQLite default."""

from __future__ import annotations

import sys

from _venv import ROOT, ensure_installed, run, venv_bin

if __name__ == "__main__":
    ensure_installed()
    sys.exit(run(venv_bin("python"), ROOT / "examples" / "quickstart.py"))
