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

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

import snapshot_repo as sr
from tests.support.databases import (
    DEFAULT_MARIADB_URL,
    DEFAULT_POSTGRES_URL,
    IN_CI,
    MARIADB_CLEAR_ALL,
    TRUNCATE_ALL,
    Backend,
    Cart,
    MariadbServer,
    PostgresServer,
    admin,
    mariadb_admin,
    migrate_database,
    run_blocking,
    sqlite_backend,
)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    url = os.environ.get("SNAPSHOT_REPO_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    try:
        run_blocking(admin(url, "SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        reason = f"Postgres at {make_url(url).render_as_string()} is unreachable: {exc!r}"
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: Postgres tests must run)")
        pytest.skip(reason)
    server = PostgresServer(url)
    yield server
    server.drop_all()


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariadbServer]:
    """The MariaDB server of SNAPSHOT_REPO_TEST_MARIADB_URL (default: the local one).

    Unreachable: the MariaDB cases skip, or fail with CI=true.
    """
    url = os.environ.get("SNAPSHOT_REPO_TEST_MARIADB_URL", DEFAULT_MARIADB_URL)
    try:
        run_blocking(mariadb_admin(url, "SELECT 1"))
    except Exception as exc:  # the driver's OperationalError or an OSError: reported below
        reason = f"MariaDB at {make_url(url).render_as_string()} is unreachable: {exc!r}"
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: MariaDB tests must run)")
        pytest.skip(reason)
    server = MariadbServer(url)
    yield server
    server.drop_all()


@pytest.fixture(scope="session")
def migrated_mariadb_url(mariadb_server: MariadbServer) -> str:
    url = mariadb_server.create_database()
    run_blocking(migrate_database(url))
    return url


@pytest.fixture
def mariadb_url(migrated_mariadb_url: str) -> str:
    """A migrated, empty MariaDB database, for tests about MariaDB by nature."""
    run_blocking(mariadb_admin(migrated_mariadb_url, *MARIADB_CLEAR_ALL))
    return migrated_mariadb_url


@pytest.fixture(scope="session")
def migrated_postgres_url(postgres_server: PostgresServer) -> str:
    url = postgres_server.create_database()
    run_blocking(migrate_database(url))
    return url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    run_blocking(migrate_database(f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture(params=["sqlite", "postgres", "mariadb"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A migrated, empty database of each kind; tests taking it run on all three."""
    if request.param == "sqlite":
        return sqlite_backend(tmp_path, request.getfixturevalue("sqlite_template"))
    if request.param == "mariadb":
        mariadb: MariadbServer = request.getfixturevalue("mariadb_server")
        url = request.getfixturevalue("mariadb_url")
        return Backend(name="mariadb", url=url, fresh_url=mariadb.create_database)
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url: str = request.getfixturevalue("migrated_postgres_url")
    run_blocking(admin(url, TRUNCATE_ALL))
    return Backend(name="postgres", url=url, fresh_url=server.create_database)


@pytest.fixture(params=["sqlite", "postgres"])
def sqlite_or_postgres_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database: a SQLite file under tmp_path, or the test Postgres (for
    tests of a layer above the backends, which need not run on every database)."""
    if request.param == "sqlite":
        return sqlite_backend(tmp_path, request.getfixturevalue("sqlite_template")).url
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def postgres_url(migrated_postgres_url: str) -> str:
    """A migrated, empty Postgres database, for tests about Postgres by nature."""
    run_blocking(admin(migrated_postgres_url, TRUNCATE_ALL))
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
