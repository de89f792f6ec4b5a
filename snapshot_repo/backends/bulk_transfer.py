"""What `dump` and `load` need from each database beyond their statements.

`backup` reads and writes the tables with Core statements that every
dialect renders; how a transaction sees one consistent store, and how a load
keeps writers out until it commits, differ by database, and are here:

- Postgres: the dump reads in a REPEATABLE READ, READ ONLY transaction; the
  load locks the tables IN EXCLUSIVE MODE (writers wait, readers see the
  empty tables until it commits).
- MySQL/MariaDB: the dump reads in a REPEATABLE READ transaction (InnoDB's
  consistent snapshot); the load runs REPEATABLE READ and reads each empty
  table FOR UPDATE, which locks the gap a writer's INSERT needs.
- SQLite: the library's own transaction handling (an explicit BEGIN, see
  `engine.install_sqlite_settings`); the load's `BEGIN IMMEDIATE` holds the
  write lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table, literal, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._mysql_ddl import MYSQL
from ..engine import WRITE_TRANSACTION, EngineSettings, install_sqlite_settings

__all__ = [
    "analyze",
    "database_file",
    "dump_options",
    "exclude_writers",
    "load_options",
    "prepare",
]


def prepare(engine: AsyncEngine) -> None:
    """SQLite: this library's transaction handling, as the repository sets it.

    Without it, sqlite3 would run the dump's SELECTs outside a transaction,
    each seeing a different state of the database.
    """
    if engine.dialect.name == "sqlite":
        install_sqlite_settings(engine, EngineSettings())


def dump_options(engine: AsyncEngine) -> dict[str, Any]:
    """The execution options of the dump's one read transaction: a consistent snapshot."""
    name = engine.dialect.name
    if name == "postgresql":
        return {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
    if name in MYSQL:
        return {"isolation_level": "REPEATABLE READ"}
    return {}


def load_options(engine: AsyncEngine) -> dict[str, Any]:
    """The execution options of the load's one write transaction."""
    # SQLite: BEGIN IMMEDIATE, so the emptiness check and the load are one critical section.
    options: dict[str, Any] = {WRITE_TRANSACTION: True}
    if engine.dialect.name in MYSQL:
        options["isolation_level"] = "REPEATABLE READ"  # locking reads lock gaps too
    return options


async def exclude_writers(conn: AsyncConnection, tables: Sequence[Table]) -> None:
    """Keep other writers out of `tables` until the load's transaction ends."""
    name = conn.dialect.name
    if name == "postgresql":
        names = ", ".join(table.name for table in tables)
        await conn.execute(text(f"LOCK TABLE {names} IN EXCLUSIVE MODE"))
    elif name in MYSQL:
        for table in tables:  # empty, or the load refuses: this locks the whole key range
            await conn.execute(select(literal(1)).select_from(table).limit(1).with_for_update())


async def analyze(engine: AsyncEngine, tables: Sequence[Table]) -> None:
    """After a load commits: give the planner statistics for the tables at once.

    Postgres plans from statistics autovacuum takes later, if at all (it may be
    off, or behind): until then a fresh load of a million users looks empty and
    a read of many users can scan where it should probe (3.6 s instead of 5 ms
    for `get_latest_many(100)`, as issue #19 measured). MySQL/MariaDB: `ANALYZE TABLE`.
    SQLite: nothing (its statements pin their indexes, see `_sql.IndexedTable`).
    """
    name = engine.dialect.name
    if name not in ("postgresql", *MYSQL):
        return
    names = ", ".join(table.name for table in tables)
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.exec_driver_sql(
            f"ANALYZE {names}" if name == "postgresql" else f"ANALYZE TABLE {names}"
        )


def database_file(engine: AsyncEngine) -> str | None:
    """The SQLite database file, or None (another database, or SQLite in memory)."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or database in (None, "", ":memory:"):
        return None
    return str(database)
