"""The databases tests run on: models, throwaway Postgres databases, migrated SQLite files.

Shared by the fixtures in `conftest.py` and by tests that need more than
one database or a fault of their own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from pydantic import BaseModel
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from snapshot_repo.engine import create_engine
from snapshot_repo.migrate import upgrade
from snapshot_repo.tables import metadata

DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
DEFAULT_MARIADB_URL = "mariadb+asyncmy://root@127.0.0.1:3306/test"
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
        name: "sqlite", "postgres" or "mariadb".
        url: a migrated, empty database for this test.
        fresh_url: makes another database that exists but was never migrated.
    """

    name: str
    url: str
    fresh_url: Callable[[], str]


def plain_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on its own loop in a worker thread.

    Setup helpers are called both from sync fixtures and from inside async
    tests, where `asyncio.run` on the test's own thread is not allowed.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(plain_dsn(url), timeout=5)
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
        run_blocking(admin(self.admin_url, f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        drops = [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in self.created]
        if drops:
            run_blocking(admin(self.admin_url, *drops))


async def mariadb_connect(url: str, *, autocommit: bool = True) -> Any:
    """A raw asyncmy connection to the MariaDB database of `url` (close it with `.close()`)."""
    import asyncmy  # only the MariaDB tests need it

    parsed = make_url(url)
    return await asyncmy.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 3306,
        user=parsed.username or "root",
        password=parsed.password or "",
        database=parsed.database or "",
        connect_timeout=5,
        autocommit=autocommit,
    )


async def mariadb_admin(url: str, *statements: str) -> None:
    """Run `statements` on the MariaDB server of `url` (autocommit), with the raw driver."""
    conn = await mariadb_connect(url)
    try:
        async with conn.cursor() as cursor:
            for statement in statements:
                await cursor.execute(statement)
    finally:
        conn.close()


async def mariadb_fetch(url: str, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    """The rows of one query (`%s` placeholders) on the MariaDB database of `url`, read raw."""
    conn = await mariadb_connect(url)
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(statement, args or None)
            return [tuple(row) for row in await cursor.fetchall()]
    finally:
        conn.close()


LOCK_WAIT_POLL = 0.15
"""Seconds between polls of InnoDB's lock waits (see `wait_for_mariadb_lock_waits`)."""


async def wait_for_mariadb_lock_waits(url: str, count: int, within: float = 10.0) -> None:
    """Poll until `count` sessions on the database of `url` wait for an InnoDB row lock.

    Fails after `within` seconds (a session starts waiting within milliseconds).
    The polls are `LOCK_WAIT_POLL` apart: InnoDB's information_schema tables are
    a cache that the server refreshes only when nobody read it for 100 ms, so
    a faster poll (by any client of the server) would keep reading a stale list.
    """
    database = make_url(url).database
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        ((waiting,),) = await mariadb_fetch(
            url,
            "SELECT count(*) FROM information_schema.innodb_trx t "
            "JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id "
            "WHERE t.trx_state = 'LOCK WAIT' AND p.db = %s",
            database,
        )
        if waiting >= count:
            return
        assert loop.time() < deadline, f"{waiting} of {count} sessions waited for a lock"
        await asyncio.sleep(LOCK_WAIT_POLL)


MARIADB_CLEAR_ALL = tuple(f"DELETE FROM {table.name}" for table in metadata.sorted_tables)
"""Empty the library's tables (DELETE: MariaDB's TRUNCATE recreates each table, 10x slower)."""


class MariadbServer:
    """Creates and drops throwaway databases on the shared MariaDB server."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.created: list[str] = []

    def create_database(self) -> str:
        name = f"snaprepo_test_{uuid.uuid4().hex[:12]}"
        statement = f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"
        run_blocking(mariadb_admin(self.admin_url, statement))
        self.created.append(name)
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        drops = [f"DROP DATABASE IF EXISTS `{name}`" for name in self.created]
        if drops:
            run_blocking(mariadb_admin(self.admin_url, *drops))


async def migrate_database(url: str) -> None:
    engine = create_engine(url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


def sqlite_backend(tmp_path: Path, template: Path) -> Backend:
    path = tmp_path / "snapshots.db"
    shutil.copyfile(template, path)  # WAL was checkpointed when the template's engine closed
    counter = iter(range(1_000_000))
    return Backend(
        name="sqlite",
        url=f"sqlite+aiosqlite:///{path}",
        fresh_url=lambda: f"sqlite+aiosqlite:///{tmp_path / f'fresh{next(counter)}.db'}",
    )


@asynccontextmanager
async def refusing_history_insert(
    engine: AsyncEngine, condition: str, message: str = "injected fault"
) -> AsyncIterator[None]:
    """A trigger that makes inserting a history row fail when `condition` (on NEW) holds.

    A real database fault between the two table writes of one transaction.
    The trigger is dropped again on exit, so tests sharing a database stay
    independent.
    """
    mariadb = engine.dialect.name in ("mariadb", "mysql")
    async with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            await conn.exec_driver_sql(
                "CREATE TRIGGER refuse_history BEFORE INSERT ON snapshot_history "
                f"WHEN {condition} BEGIN SELECT RAISE(ABORT, '{message}'); END"
            )
        elif mariadb:
            await conn.exec_driver_sql(
                "CREATE TRIGGER refuse_history BEFORE INSERT ON snapshot_history "
                f"FOR EACH ROW BEGIN IF {condition} THEN "
                f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{message}'; END IF; END"
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
            if engine.dialect.name == "sqlite" or mariadb:
                await conn.exec_driver_sql("DROP TRIGGER refuse_history")
            else:
                await conn.exec_driver_sql("DROP TRIGGER refuse_history ON snapshot_history")
                await conn.exec_driver_sql("DROP FUNCTION refuse_history()")
