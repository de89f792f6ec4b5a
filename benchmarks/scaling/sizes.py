"""Bytes per row of every table and index: what one more user or version costs on disk.

Postgres: `pg_relation_size` of each table (its main fork) and of each of
its indexes, divided by the table's exact row count. SQLite: the `dbstat`
virtual table's page bytes per table and index when the build has it
(Python's usually does), else only the whole file.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import asyncpg

from .databases import ScaleDatabase, asyncpg_dsn

__all__ = ["RelationSize", "relation_sizes"]

_TABLES = ("snapshot_latest", "snapshot_history", "snapshot_changes")

_POSTGRES_SIZES = """
SELECT c.relname AS relation, t.relname AS table_name, pg_relation_size(c.oid) AS bytes
FROM pg_class t
JOIN pg_class c ON c.oid = t.oid
   OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = t.oid)
WHERE t.relname = ANY($1::text[]) AND t.relnamespace = 'public'::regnamespace
ORDER BY t.relname, c.relkind DESC, c.relname
"""


@dataclass(frozen=True)
class RelationSize:
    """One table or index: its bytes, its table's rows, and bytes per row (None: no rows)."""

    relation: str
    table: str
    bytes: int
    rows: int
    bytes_per_row: float | None


def _sized(relation: str, table: str, size: int, rows: int) -> RelationSize:
    return RelationSize(relation, table, size, rows, size / rows if rows else None)


async def relation_sizes(database: ScaleDatabase) -> list[RelationSize]:
    """Every table and index of the library's three main tables, tables first."""
    if database.backend == "postgres":
        return await _postgres_sizes(database)
    return await _sqlite_sizes(database)


async def _postgres_sizes(database: ScaleDatabase) -> list[RelationSize]:
    conn = await asyncpg.connect(asyncpg_dsn(database.url))
    try:
        rows = {
            table: int(await conn.fetchval(f"SELECT count(*) FROM {table}")) for table in _TABLES
        }
        found = await conn.fetch(_POSTGRES_SIZES, list(_TABLES))
    finally:
        await conn.close()
    return [
        _sized(row["relation"], row["table_name"], int(row["bytes"]), rows[row["table_name"]])
        for row in found
    ]


async def _sqlite_sizes(database: ScaleDatabase) -> list[RelationSize]:
    async with database.repo.engine.connect() as conn:
        rows = {
            table: int((await conn.exec_driver_sql(f"SELECT count(*) FROM {table}")).scalar_one())
            for table in _TABLES
        }
        found: list[tuple[Any, ...]]
        try:
            result = (
                await conn.exec_driver_sql(
                    "SELECT d.name, coalesce(m.tbl_name, d.name), sum(d.pgsize)"
                    " FROM dbstat AS d LEFT JOIN sqlite_master AS m ON m.name = d.name"
                    " GROUP BY d.name ORDER BY 2, m.type DESC, 1"
                )
            ).all()
            found = [tuple(row) for row in result]
        except Exception:  # no dbstat in this SQLite build: the whole file, per all rows
            found = []
    if not found:
        size = await asyncio.to_thread(os.path.getsize, database.name)
        return [_sized("(whole file)", "(all)", size, sum(rows.values()))]
    return [
        _sized(str(name), str(table), int(pages), rows[str(table)])
        for name, table, pages in found
        if str(table) in rows
    ]
