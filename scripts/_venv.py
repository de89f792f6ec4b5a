"""Shared by demo.py and test.py: a project virtualenv with the package installed.

Only the Python standard library is used, so a fresh clone with nothing but
Python can run either script.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"


def venv_bin(name: str) -> Path:
    """Path of an executable inside the project virtualenv, on any OS."""
    folder = "Scripts" if os.name == "nt" else "bin"
    suffix = ".exe" if os.name == "nt" else ""
    return VENV / folder / f"{name}{suffix}"


def ensure_installed(extras: str = "") -> None:
    """Create .venv if missing and install the package (editable) with `extras`."""
    if not venv_bin("python").exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
        subprocess.run(
            [venv_bin("python"), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True
        )
    target = f"{ROOT}[{extras}]" if extras else str(ROOT)
    print(f"installing {target} into {VENV}", flush=True)
    subprocess.run([venv_bin("python"), "-m", "pip", "install", "-q", "-e", target], check=True)


def run(*args: str | Path) -> int:
    """Run a command, echoing it first; return its exit code."""
    print("+ " + " ".join(str(a) for a in args), flush=True)
    return subprocess.run([str(a) for a in args], cwd=ROOT, check=False).returncode


if __name__ == "__main__":
    sys.exit("import this module from scripts/demo.py or scripts/test.py")
