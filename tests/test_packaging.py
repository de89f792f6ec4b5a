"""The built wheel carries its migrations: migrate works from an install outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built as a wheel and installed into a bare directory."""
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
    [wheel] = build_dir.glob("snapshot_repo-*.whl")
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
