"""The factory every conformance test runs on: a repository on one target's database.

SQLite targets get a copy of the migrated template file under `tmp_path`;
Postgres and MariaDB targets get the session's migrated database, emptied
first (the `postgres_url` and `mariadb_url` fixtures), on the shared server;
the `postgres-pgbouncer` target reaches that database through a PgBouncer in
transaction mode started for the session (`pgbouncer`). Tests that LISTEN
(`_LISTENING`) are not collected for it: a transaction pooler cannot carry
LISTEN, and `tests/test_pgbouncer.py` checks that subscribing refuses there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import snapshot_repo as sr
from snapshot_repo.backends.core import CoreBackend
from tests.support.conformance import TARGETS, Doc, MakeRepo, Target
from tests.support.databases import PostgresServer
from tests.support.pgbouncer import PgBouncer, start_for_tests

_LISTENING = frozenset(
    {
        "test_with_an_erasure_key_the_erase_entry_names_the_receipt_subject",
        "test_listeners_hear_each_write_and_erasure_once",
    }
)
"""The suite's tests that subscribe (LISTEN), which no transaction pooler can carry."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the `_LISTENING` tests on a target behind a transaction pooler."""
    kept, left_out = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        target = callspec.params.get("target") if callspec is not None else None
        pooled = isinstance(target, Target) and target.pooler
        name = getattr(item, "originalname", item.name)
        (left_out if pooled and name in _LISTENING else kept).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


@pytest.fixture(scope="session")
def pgbouncer(postgres_server: PostgresServer) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode, pool of 3, in front of the test server.

    Not installed: the pooler's cases skip, or fail with CI=true.
    """
    bouncer = start_for_tests(postgres_server.admin_url, pool_size=3)
    yield bouncer
    bouncer.stop()


@pytest.fixture(params=TARGETS, ids=[target.name for target in TARGETS])
def target(request: pytest.FixtureRequest) -> Target:
    target: Target = request.param
    return target


@pytest.fixture
def database_url(target: Target, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database of the target's kind."""
    if target.pooler:
        bouncer: PgBouncer = request.getfixturevalue("pgbouncer")
        return bouncer.url(request.getfixturevalue("postgres_url"), transaction_pooler="true")
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
