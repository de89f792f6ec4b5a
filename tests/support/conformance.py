"""What the conformance suite (`tests/conformance`) shares: its targets, model and table reads.

A target is one backend on one database. The suite runs every test on each,
so a behaviour of the contract is written once and checked on all of them:
the fast backends (`sqlite`, `postgres`), the core backend on each of their
databases (`sqlite-core`, `postgres-core`), the reference they are tested
against, and the MySQL/MariaDB backend (`mariadb`), itself a core backend.
`postgres-pgbouncer` is the fast Postgres backend through a real PgBouncer in
transaction mode (`tests.support.pgbouncer`), with `transaction_pooler=true`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

import snapshot_repo as sr
from snapshot_repo.changes import Change
from snapshot_repo.tables import (
    changes_table,
    data_keys_table,
    history_table,
    latest_table,
    metadata,
)

__all__ = [
    "TARGETS",
    "Doc",
    "MakeRepo",
    "Target",
    "autovacuum_held_off",
    "count_rows",
    "data_key_of",
    "described",
    "every_row_holding",
    "files_hold",
    "postgres_files_holding",
    "read_feed",
    "snap",
    "snapshot_holders",
    "stored_payloads",
    "stored_versions",
]


@dataclass(frozen=True)
class Target:
    """One backend on one database.

    Attributes:
        name: the test id: "sqlite", "postgres", "sqlite-core", "postgres-core",
            "mariadb" or "postgres-pgbouncer".
        database: "sqlite", "postgres" or "mariadb".
        core: whether the repository runs on the core backend (`backend="core"`).
        pooler: whether the database is reached through PgBouncer in transaction
            mode, its URL saying `transaction_pooler=true`.
    """

    name: str
    database: str
    core: bool
    pooler: bool = False

    @property
    def options(self) -> dict[str, Any]:
        """The repository options that select this target's backend."""
        return {"backend": "core"} if self.core else {}


TARGETS = (
    Target("sqlite", "sqlite", core=False),
    Target("postgres", "postgres", core=False),
    Target("sqlite-core", "sqlite", core=True),
    Target("postgres-core", "postgres", core=True),
    Target("mariadb", "mariadb", core=False),
    Target("postgres-pgbouncer", "postgres", core=False, pooler=True),
)


MakeRepo = Callable[..., Awaitable[sr.SnapshotRepository[Any]]]
"""The suite's factory fixture: `await make_repo(**options)` opens a repository on the target."""


class Doc(BaseModel):
    """The state model of the suite."""

    items: list[str] = []
    note: str = ""


def snap(user_id: str, note: str = "", *items: str) -> sr.Snapshot[Doc]:
    return sr.Snapshot(user_id=user_id, state=Doc(note=note, items=list(items)))


async def stored_versions(engine: AsyncEngine, user_id: str) -> list[int]:
    """The user's history versions as stored (every scope), ascending, read without the library."""
    statement = (
        select(history_table.c.version)
        .where(history_table.c.user_id == user_id)
        .order_by(history_table.c.version)
    )
    async with engine.connect() as conn:
        return list((await conn.execute(statement)).scalars())


async def stored_payloads(engine: AsyncEngine, user_id: str) -> list[bytes]:
    """Every payload stored for the user, latest and history, as the bytes on disk."""
    async with engine.connect() as conn:
        payloads = []
        for table in (latest_table, history_table):
            rows = await conn.execute(select(table.c.payload).where(table.c.user_id == user_id))
            payloads.extend(bytes(payload) for payload in rows.scalars())
        return payloads


async def count_rows(engine: AsyncEngine, user_id: str) -> dict[str, int]:
    """How many rows each table holds for the user (every scope)."""
    counts = {}
    async with engine.connect() as conn:
        for table in (latest_table, history_table, changes_table, data_keys_table):
            statement = select(func.count()).where(table.c.user_id == user_id)
            counts[table.name] = int(await conn.scalar(statement) or 0)
    return counts


async def data_key_of(engine: AsyncEngine, user_id: str) -> bytes | None:
    """The user's wrapped data key as stored, or None."""
    statement = select(data_keys_table.c.wrapped_key).where(data_keys_table.c.user_id == user_id)
    async with engine.connect() as conn:
        wrapped = await conn.scalar(statement)
    return None if wrapped is None else bytes(wrapped)


async def read_feed(
    repo: sr.SnapshotRepository[Any],
    cursor: str | None = None,
    *,
    limit: int = 100,
    expect: int = 0,
) -> tuple[list[Change], str]:
    """Every change after `cursor`, `limit` a page, and the cursor after the last.

    On Postgres an entry shows once every transaction of the cluster that
    began before it has ended (see `changes_since`); other work on the shared
    server may hold one open for a moment, so reading goes on until `expect`
    changes arrived, for at most 10 seconds.
    """
    changes: list[Change] = []
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        page = await repo.changes_since(cursor, limit=limit)
        changes.extend(page.changes)
        cursor = page.cursor
        if page.changes:
            continue
        if len(changes) >= expect or asyncio.get_running_loop().time() > deadline:
            return changes, cursor
        await asyncio.sleep(0.05)


def described(changes: Sequence[Change]) -> list[tuple[str, int, str]]:
    """(user_id, version, kind) of each change."""
    return [(change.user_id, change.version, change.kind) for change in changes]


async def every_row_holding(engine: AsyncEngine, marker: str) -> list[str]:
    """`table.column` of every stored value, in every table of the library, holding `marker`
    (text, or bytes such as payloads and metadata), read without the library."""
    found = []
    async with engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in (await conn.execute(select(table))).mappings():
                for column, value in row.items():
                    raw = value if isinstance(value, bytes) else str(value).encode()
                    if marker.encode() in raw:
                        found.append(f"{table.name}.{column}")
    return found


async def postgres_files_holding(engine: AsyncEngine, marker: str) -> list[str]:
    """The library's relations (tables, their indexes and TOAST) whose files on the
    Postgres server hold `marker`, after a CHECKPOINT wrote every page out.

    Reads the server's data directory, so the server must run on this machine and its
    files be readable (the tests run as root beside it).
    """
    names = [table.name for table in metadata.sorted_tables]
    relations = text(
        "SELECT c.relname, pg_relation_filepath(c.oid) FROM pg_class c "
        "WHERE c.oid IN ("
        "  SELECT oid FROM pg_class WHERE relname = ANY(:names)"
        "  UNION SELECT indexrelid FROM pg_index WHERE indrelid IN "
        "    (SELECT oid FROM pg_class WHERE relname = ANY(:names))"
        "  UNION SELECT reltoastrelid FROM pg_class WHERE relname = ANY(:names)"
        "  UNION SELECT i.indexrelid FROM pg_index i JOIN pg_class t "
        "    ON i.indrelid = t.reltoastrelid WHERE t.relname = ANY(:names))"
    )
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.exec_driver_sql("CHECKPOINT")
        data_directory = Path(str(await conn.scalar(text("SHOW data_directory"))))
        found = (await conn.execute(relations, {"names": names})).all()
    assert len(found) > len(names), found  # tables, indexes and TOAST were all listed
    return await asyncio.to_thread(_segments_holding, data_directory, found, marker)


@asynccontextmanager
async def autovacuum_held_off(engine: AsyncEngine) -> AsyncIterator[None]:
    """Turn autovacuum off for the library's tables in the test's own database, and
    back to the server's default afterwards (later tests read the tables' options).

    An autovacuum or autoanalyze worker holds a snapshot while it runs, and
    `VACUUM FULL` keeps every row version that snapshot may still see: an erased
    row then moves into the rewritten files. The library cannot prevent that (it
    is how Postgres defines "dead"); the tests of what VACUUM FULL removes need no
    such reader, so the database's own workers are kept away from these tables.
    """
    options = "autovacuum_enabled, toast.autovacuum_enabled"
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        for table in metadata.sorted_tables:
            await conn.exec_driver_sql(
                f"ALTER TABLE {table.name} SET "
                "(autovacuum_enabled = off, toast.autovacuum_enabled = off)"
            )
    try:
        yield
    finally:
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            for table in metadata.sorted_tables:
                await conn.exec_driver_sql(f"ALTER TABLE {table.name} RESET ({options})")


async def snapshot_holders(engine: AsyncEngine) -> list[str]:
    """Other sessions of the server holding a snapshot or a transaction id now, each with
    whether it is in this database, its xmin and its xid: any of them older than an
    erasure keeps the erased rows (a snapshot's xmin is the oldest transaction open
    anywhere on the server)."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT pid, datname = current_database(), backend_type, state, backend_xmin, "
                "backend_xid, left(query, 60) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() "
                "AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)"
            )
        )
        return [str(tuple(row)) for row in rows]


def _segments_holding(data_directory: Path, relations: Sequence[Any], marker: str) -> list[str]:
    holding = []
    for relname, relative in relations:
        for segment in sorted(data_directory.glob(f"{relative}*")):
            if marker.encode() in segment.read_bytes():
                holding.append(f"{relname} ({segment.name})")
    return holding


def files_hold(path: Path, marker: str) -> bool:
    """Whether the SQLite database file or its WAL holds `marker`'s bytes anywhere."""
    needle = marker.encode()
    return any(
        file.exists() and needle in file.read_bytes()
        for file in (path, path.with_name(path.name + "-wal"))
    )
