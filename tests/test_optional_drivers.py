"""The Postgres and MySQL drivers are optional extras: SQLite needs nothing but the package."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

BLOCK_ASYNCPG = textwrap.dedent(
    """
    import sys

    class NoAsyncpg:
        def find_spec(self, name, path=None, target=None):
            if name == "asyncpg" or name.startswith("asyncpg."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoAsyncpg())
    """
)


def run_without_asyncpg(body: str) -> subprocess.CompletedProcess[str]:
    script = BLOCK_ASYNCPG + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )


def test_sqlite_works_without_the_postgres_driver(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'alone.db'}"
    result = run_without_asyncpg(
        f"""
        import asyncio
        import snapshot_repo as sr

        async def main():
            async with sr.SnapshotRepository.from_url({url!r}) as repo:
                await repo.migrate()
                await repo.upsert_latest(sr.Snapshot(user_id="u1", state={{"n": 1}}))
                print((await repo.get_latest("u1")).state)
                print(await repo.health_check())
            assert "asyncpg" not in sys.modules

        asyncio.run(main())
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["{'n':", "1}", "True"]


def test_a_postgres_url_without_the_driver_names_the_extra():
    result = run_without_asyncpg(
        """
        import snapshot_repo as sr

        try:
            sr.SnapshotRepository.from_url("postgresql://postgres@127.0.0.1/test")
        except sr.ConfigurationError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'snapshot-repo[postgres]'" in result.stdout
    assert "asyncpg" in result.stdout


def test_a_mariadb_url_without_the_driver_names_the_extra():
    script = BLOCK_ASYNCPG.replace('"asyncpg"', '"asyncmy"').replace('"asyncpg.', '"asyncmy.')
    body = textwrap.dedent(
        """
        import snapshot_repo as sr

        for url in ("mariadb://root@127.0.0.1/test", "mysql://root@127.0.0.1/test"):
            try:
                sr.SnapshotRepository.from_url(url)
            except sr.ConfigurationError as exc:
                print(exc)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script + body],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("pip install 'snapshot-repo[mysql]'") == 2
    assert "asyncmy" in result.stdout
