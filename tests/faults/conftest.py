"""Fixtures for the fault-injection suite: a throwaway Postgres cluster and fresh databases.

Tests that stop, freeze or kill a server use `cluster` (a server of their
own, never the shared one). Tests whose faults only touch their own
connections use the shared server through the contract suite's `backend`
and `postgres_url` fixtures.

Outside CI, a machine without PostgreSQL server binaries skips the cluster
tests with the reason; with CI=true it fails them.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

import snapshot_repo as sr
from tests.support.databases import migrate_database, run_blocking

from ..support.pg_cluster import PgCluster, create_or_skip


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fault: injects a real fault (killed process or server, network, disk)"
    )


migrate_url = migrate_database  # the shared suite's helper: upgrade `url` to head


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL cluster for this test run, destroyed at the end whatever happens."""
    cluster = create_or_skip("fault tests")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def cluster(pg_cluster: PgCluster) -> Iterator[PgCluster]:
    """The throwaway cluster, running and unfrozen at the start and at the end of the test."""
    if pg_cluster.paused:
        pg_cluster.resume()
    if not pg_cluster.running:
        pg_cluster.start()
    yield pg_cluster
    if pg_cluster.paused:
        pg_cluster.resume()
    if not pg_cluster.running:
        pg_cluster.start()


@pytest.fixture
def cluster_url(cluster: PgCluster) -> str:
    """A fresh, migrated database on the throwaway cluster."""
    name = f"fault_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(cluster.dsn(), timeout=10)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        await migrate_url(cluster.url(name))

    run_blocking(create())
    return cluster.url(name)


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    """A migrated SQLite file of this test's own (the contract suite's template, copied)."""
    path = tmp_path / "faults.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
def fault_settings() -> sr.EngineSettings:
    """Short timeouts, so that a fault shows as an error within about a second."""
    return sr.EngineSettings(connect_timeout=1.0, command_timeout=1.0, pool_timeout=2.0)


@pytest.fixture
def app_name() -> str:
    """A unique Postgres `application_name`, so a test can find its own backends only."""
    return f"snaprepo-fault-{os.getpid()}-{uuid.uuid4().hex[:8]}"
