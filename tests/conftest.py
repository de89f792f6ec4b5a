"""Fixtures: every contract test runs once on a SQLite file and once on Postgres.

Postgres comes from SNAPSHOT_REPO_TEST_POSTGRES_URL (default: the local
server's `test` database). The tests never touch tables in that database:
each run creates its own databases next to it and drops them afterwards.
Outside CI an unreachable server skips the Postgres cases with the reason;
with CI=true it fails them.

The schema always comes from the real migrations: SQLite from a template
file migrated once per run and copied per test, Postgres from a database
migrated once per run and truncated before each test.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from pydantic import BaseModel
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

import snapshot_repo as sr
from snapshot_repo.engine import create_engine
from snapshot_repo.migrate import upgrade
from snapshot_repo.tables import metadata

DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
T = TypeVar("T")
TRUNCATE_ALL = "TRUNCATE {} RESTART IDENTITY".format(
    ", ".join(table.name for table in metadata.sorted_tables)
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


class Cart(BaseModel):
    """The state model most tests store."""

    items: list[str] = []
    note: str = ""


@dataclass
class Backend:
    """One database under test.

    Attributes:
        name: "sqlite" or "postgres".
        url: a migrated, empty database for this test.
        fresh_url: makes another database that exists but was never migrated.
    """

    name: str
    url: str
    fresh_url: Callable[[], str]


def _plain_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on its own loop in a worker thread.

    Setup helpers are called both from sync fixtures and from inside async
    tests, where `asyncio.run` on the test's own thread is not allowed.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(_plain_dsn(url), timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


class PostgresServer:
    """Creates and drops throwaway databases on the test server."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.created: list[str] = []

    def create_database(self) -> str:
        name = f"snaprepo_test_{uuid.uuid4().hex[:12]}"
        run_blocking(_admin(self.admin_url, f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        drops = [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in self.created]
        if drops:
            run_blocking(_admin(self.admin_url, *drops))


async def _migrate(url: str) -> None:
    engine = create_engine(url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    url = os.environ.get("SNAPSHOT_REPO_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    try:
        run_blocking(_admin(url, "SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        reason = f"Postgres at {make_url(url).render_as_string()} is unreachable: {exc!r}"
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: Postgres tests must run)")
        pytest.skip(reason)
    server = PostgresServer(url)
    yield server
    server.drop_all()


@pytest.fixture(scope="session")
def migrated_postgres_url(postgres_server: PostgresServer) -> str:
    url = postgres_server.create_database()
    run_blocking(_migrate(url))
    return url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    run_blocking(_migrate(f"sqlite+aiosqlite:///{path}"))
    return path


def _sqlite_backend(tmp_path: Path, template: Path) -> Backend:
    path = tmp_path / "snapshots.db"
    shutil.copyfile(template, path)  # WAL was checkpointed when the template's engine closed
    counter = iter(range(1_000_000))
    return Backend(
        name="sqlite",
        url=f"sqlite+aiosqlite:///{path}",
        fresh_url=lambda: f"sqlite+aiosqlite:///{tmp_path / f'fresh{next(counter)}.db'}",
    )


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A migrated, empty database of each kind; tests taking it run on both."""
    if request.param == "sqlite":
        return _sqlite_backend(tmp_path, request.getfixturevalue("sqlite_template"))
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url: str = request.getfixturevalue("migrated_postgres_url")
    run_blocking(_admin(url, TRUNCATE_ALL))
    return Backend(name="postgres", url=url, fresh_url=server.create_database)


@pytest.fixture
def postgres_url(migrated_postgres_url: str) -> str:
    """A migrated, empty Postgres database, for tests about Postgres by nature."""
    run_blocking(_admin(migrated_postgres_url, TRUNCATE_ALL))
    return migrated_postgres_url


@pytest.fixture
async def repo(backend: Backend) -> AsyncIterator[sr.SnapshotRepository[Cart]]:
    """A repository of `Cart` states on the test's database."""
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as repository:
        yield repository


@pytest.fixture
async def json_repo(backend: Backend) -> AsyncIterator[sr.SnapshotRepository[sr.JsonObject]]:
    """A repository without a model: states are plain JSON objects."""
    async with sr.SnapshotRepository.from_url(backend.url) as repository:
        yield repository


@asynccontextmanager
async def refusing_history_insert(
    engine: AsyncEngine, condition: str, message: str = "injected fault"
) -> AsyncIterator[None]:
    """A trigger that makes inserting a history row fail when `condition` (on NEW) holds.

    A real database fault between the two table writes of one transaction.
    The trigger is dropped again on exit, so tests sharing a database stay
    independent.
    """
    async with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            await conn.exec_driver_sql(
                "CREATE TRIGGER refuse_history BEFORE INSERT ON snapshot_history "
                f"WHEN {condition} BEGIN SELECT RAISE(ABORT, '{message}'); END"
            )
        else:
            await conn.exec_driver_sql(
                "CREATE FUNCTION refuse_history() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN IF {condition} THEN RAISE EXCEPTION '{message}'; END IF; "
                "RETURN NEW; END $$"
            )
            await conn.exec_driver_sql(
                "CREATE TRIGGER refuse_history BEFORE INSERT ON snapshot_history "
                "FOR EACH ROW EXECUTE FUNCTION refuse_history()"
            )
    try:
        yield
    finally:
        async with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                await conn.exec_driver_sql("DROP TRIGGER refuse_history")
            else:
                await conn.exec_driver_sql("DROP TRIGGER refuse_history ON snapshot_history")
                await conn.exec_driver_sql("DROP FUNCTION refuse_history()")
