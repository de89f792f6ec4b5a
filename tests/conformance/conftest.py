"""The factory every conformance test runs on: a repository on one target's database.

SQLite targets get a copy of the migrated template file under `tmp_path`;
Postgres and MariaDB targets get the session's migrated database, emptied
first (the `postgres_url` and `mariadb_url` fixtures), on the shared server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import snapshot_repo as sr
from snapshot_repo.backends.core import CoreBackend
from tests.support.conformance import TARGETS, Doc, MakeRepo, Target


@pytest.fixture(params=TARGETS, ids=[target.name for target in TARGETS])
def target(request: pytest.FixtureRequest) -> Target:
    target: Target = request.param
    return target


@pytest.fixture
def database_url(target: Target, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database of the target's kind."""
    if target.database in ("postgres", "mariadb"):
        url: str = request.getfixturevalue(f"{target.database}_url")
        return url
    template: Path = request.getfixturevalue("sqlite_template")
    path = tmp_path / "snapshots.db"
    path.write_bytes(template.read_bytes())  # the template's WAL was checkpointed on close
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
async def make_repo(target: Target, database_url: str) -> AsyncIterator[MakeRepo]:
    """Opens repositories on the target (closed after the test): `await make_repo(**options)`.

    `state_type` defaults to `Doc`; pass `state_type=None` for plain JSON states.
    Each repository is checked to run on the target's backend.
    """
    opened: list[sr.SnapshotRepository[Any]] = []

    async def make(state_type: Any = Doc, **options: Any) -> sr.SnapshotRepository[Any]:
        repo = sr.SnapshotRepository.from_url(database_url, state_type, **target.options, **options)
        opened.append(repo)
        assert (type(repo._backend) is CoreBackend) is target.core
        return repo

    yield make
    for repo in reversed(opened):
        await repo.close()


@pytest.fixture
async def repo(make_repo: MakeRepo) -> sr.SnapshotRepository[Doc]:
    """A repository of `Doc` states on the target, with default options."""
    return await make_repo()
