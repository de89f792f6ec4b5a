"""The built wheel carries its migrations: migrate works from an install outside the checkout.

And it carries nothing of the developer tools: the benchmark lives in
benchmarks/, outside the package, and the CLI does not import it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built as a wheel."""
    build_dir = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(build_dir),
            str(ROOT),
        ],
        check=True,
    )
    [built] = build_dir.glob("snapshot_repo-*.whl")
    return built


@pytest.fixture(scope="module")
def installed_wheel(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed into a bare directory."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    names = zipfile.ZipFile(wheel).namelist()
    assert all(n.startswith(("snapshot_repo/", "snapshot_repo-")) for n in names), names
    return target


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_wheel_contains_the_migrations(installed_wheel: Path):
    migrations = installed_wheel / "snapshot_repo" / "_migrations"
    assert (migrations / "env.py").is_file()
    assert list((migrations / "versions").glob("0001_*.py"))
    assert (installed_wheel / "snapshot_repo" / "py.typed").is_file()


def test_migrate_from_the_installed_wheel(installed_wheel: Path, tmp_path: Path):
    program = (
        "import asyncio, snapshot_repo as sr\n"
        "from snapshot_repo import migrate\n"
        "print(migrate.script_location())\n"
        "async def main():\n"
        "    async with sr.SnapshotRepository.from_url('sqlite:///w.db') as repo:\n"
        "        await repo.migrate()\n"
        "        s = await repo.upsert_latest(sr.Snapshot(user_id='u', state={'a': 1}))\n"
        "        print(s.version, await repo.health_check())\n"
        "asyncio.run(main())\n"
    )
    result = run_installed(installed_wheel, tmp_path, "-c", program)
    assert result.returncode == 0, result.stderr
    location, outcome = result.stdout.strip().splitlines()
    assert Path(location).is_relative_to(installed_wheel)
    assert outcome == "1 True"
    assert (tmp_path / "w.db").is_file()


def test_wheel_ships_no_benchmark(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if "bench" in n.lower()] == []


@pytest.mark.parametrize("where", ["checkout", "wheel"])
def test_the_cli_imports_nothing_of_the_benchmarks(
    where: str, installed_wheel: Path, tmp_path: Path
):
    """Not even from a checkout, where `benchmarks` is importable: the CLI is for operators.

    Nor asyncpg, which the benchmark imports and which is an optional extra: a
    SQLite operator's `snapshot-repo` must start without it.
    """
    program = (
        "import sys, snapshot_repo.cli\n"
        "print(snapshot_repo.cli.__file__)\n"
        "print(sorted(m for m in sys.modules if 'bench' in m or m.split('.')[0] == 'asyncpg'))\n"
    )
    if where == "checkout":
        result = subprocess.run(
            [sys.executable, "-c", program],
            cwd=ROOT,  # `python -c` puts the working directory first on the path
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (ROOT / "benchmarks" / "harness" / "__init__.py").is_file()
    else:
        result = run_installed(installed_wheel, tmp_path, "-c", program)
    assert result.returncode == 0, result.stderr
    location, modules = result.stdout.strip().splitlines()
    root = ROOT if where == "checkout" else installed_wheel
    assert Path(location).is_relative_to(root)
    assert modules == "[]"
