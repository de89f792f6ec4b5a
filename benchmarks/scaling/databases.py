"""The scale benchmark's databases: a throwaway Postgres database or SQLite file per size.

Each opener yields a `ScaleDatabase` (its URL and a repository on it) and
removes what it created on exit, failure included, unless asked to keep it
(`keep=True`, for a later run with `existing=`, as the created_at index
experiment does). An `existing` database is used as it is and never dropped.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import asyncpg
from sqlalchemy.engine import URL

from snapshot_repo import ConfigurationError, EngineSettings, SnapshotRepository
from snapshot_repo.engine import normalize_url

from ..harness.state import BenchState

__all__ = ["SETTINGS", "ScaleBackend", "ScaleDatabase", "asyncpg_dsn", "open_scale_database"]

ScaleBackend = Literal["postgres", "sqlite"]

SETTINGS = EngineSettings(command_timeout=3600.0)
"""The library's defaults, except that one statement may run an hour: VACUUM ANALYZE of
ten million rows, or a count at a million users, is not a fault here."""


@dataclass
class ScaleDatabase:
    """One migrated database of the scale benchmark and a repository on it.

    Attributes:
        label: "big" or "small".
        backend: "postgres" or "sqlite".
        url: where it is (a database of the shared server, or a file).
        name: the Postgres database's name or the SQLite file's path.
        repo: the repository every timed call goes through.
        created: whether this run created it (then it is dropped at exit unless kept).
    """

    label: str
    backend: ScaleBackend
    url: URL
    name: str
    repo: SnapshotRepository[BenchState]
    created: bool


def asyncpg_dsn(url: URL) -> str:
    """`url` as a DSN asyncpg's own `connect` takes."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@asynccontextmanager
async def open_scale_database(
    label: str,
    backend: ScaleBackend,
    *,
    postgres_url: str,
    directory: Path | None,
    keep: bool,
    existing: str | None,
    settings: EngineSettings = SETTINGS,
) -> AsyncIterator[ScaleDatabase]:
    """A migrated database for one size: new and empty unless `existing` names one.

    Postgres: `snapshot_repo_scale_<label>_<random>` on the server of
    `postgres_url`, dropped (WITH FORCE) on exit unless `keep`. SQLite: a file
    in `directory` (a temporary directory if None), deleted on exit unless
    `keep`. `existing`: a Postgres database name or SQLite path to use as it is.
    `settings`: the repository's engine settings (the raw side reads them from it).

    Raises:
        ConfigurationError: `postgres_url` is not a Postgres URL.
    """
    async with AsyncExitStack() as stack:
        created = existing is None
        if backend == "postgres":
            server = normalize_url(postgres_url)
            if server.get_backend_name() != "postgresql":
                raise ConfigurationError("the scale benchmark needs a Postgres URL")
            name = existing or f"snapshot_repo_scale_{label}_{secrets.token_hex(4)}"
            if created:
                await _admin(server, f'CREATE DATABASE "{name}"')
                if not keep:
                    stack.push_async_callback(
                        _admin, server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
                    )
            url = server.set(database=name)
        else:
            if existing is not None:
                path = Path(existing)
            else:
                if directory is None:
                    directory = Path(tempfile.mkdtemp(prefix="snapshot_repo_scale_"))
                    if not keep:
                        stack.callback(shutil.rmtree, directory, True)
                path = directory / f"scale_{label}_{secrets.token_hex(4)}.db"
                if not keep:
                    stack.callback(_unlink_sqlite, path)
            name = str(path)
            url = normalize_url(f"sqlite:///{path}")
        repo = SnapshotRepository.from_url(url, BenchState, settings=settings)
        stack.push_async_callback(repo.close)
        await repo.migrate()
        yield ScaleDatabase(label, backend, url, name, repo, created)


async def _admin(server: URL, statement: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(server))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _unlink_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
