"""The one place that knows how each database writes a snapshot.

A write bumps the user's row in `snapshot_latest` and appends the same row
to `snapshot_history`. Correctness under concurrency comes from the database,
not from a read-then-write in Python:

- Postgres: one statement, a data-modifying CTE whose first part is an
  `INSERT ... ON CONFLICT DO UPDATE SET version = version + 1` (or, for a
  compare-and-set, an `UPDATE ... WHERE version = :expected` or an
  `INSERT ... ON CONFLICT DO NOTHING`) and whose second part inserts its
  `RETURNING` row into the history. The row lock taken by the first part
  orders concurrent writers, so versions are gapless; one statement is one
  round trip and is atomic under autocommit.
- SQLite: the same first statement and then the history insert, inside a
  `BEGIN IMMEDIATE` transaction (SQLite cannot put DML in a CTE); the write
  lock orders writers.

The statements are SQLAlchemy Core, built once per shape; `_driver`
compiles each once per dialect and runs it on the driver's connection.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from sqlalchemy import (
    Delete,
    Insert,
    Select,
    Update,
    bindparam,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import ReturningDelete

from .tables import history_table, latest_table

__all__ = [
    "ROW_COLUMNS",
    "DialectName",
    "WriteMode",
    "delete_statements",
    "history_statement",
    "idempotent_write_statement",
    "latest_statement",
    "postgres_write_statement",
    "sqlite_write_statements",
    "version_statement",
    "write_mode",
]

DialectName = Literal["postgresql", "sqlite"]
ROW_COLUMNS = ("user_id", "version", "schema_version", "payload", "created_at", "idempotency_key")
"""The columns every row-returning statement here returns, in this order."""
_ROW = ROW_COLUMNS
WriteMode = Literal["upsert", "create", "replace"]


@cache
def _latest_write(dialect: DialectName, mode: WriteMode) -> Insert | Update:
    """The statement that writes `snapshot_latest` and returns the row it wrote."""
    returning = [latest_table.c[name] for name in _ROW]
    if mode == "replace":
        return (
            update(latest_table)
            .where(latest_table.c.user_id == bindparam("w_user_id"))
            .where(latest_table.c.version == bindparam("expected_version"))
            .values(
                version=latest_table.c.version + 1,
                schema_version=bindparam("w_schema_version"),
                payload=bindparam("w_payload"),
                created_at=bindparam("w_created_at"),
                idempotency_key=bindparam("w_idempotency_key"),
            )
            .returning(*returning)
        )
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert_fn(latest_table).values(
        user_id=bindparam("w_user_id"),
        version=1,
        schema_version=bindparam("w_schema_version"),
        payload=bindparam("w_payload"),
        created_at=bindparam("w_created_at"),
        idempotency_key=bindparam("w_idempotency_key"),
    )
    if mode == "create":
        return stmt.on_conflict_do_nothing(index_elements=[latest_table.c.user_id]).returning(
            *returning
        )
    return stmt.on_conflict_do_update(
        index_elements=[latest_table.c.user_id],
        set_={
            "version": latest_table.c.version + 1,
            "schema_version": stmt.excluded.schema_version,
            "payload": stmt.excluded.payload,
            "created_at": stmt.excluded.created_at,
            "idempotency_key": stmt.excluded.idempotency_key,
        },
    ).returning(*returning)


@cache
def _postgres_write(mode: WriteMode) -> Insert:
    """Latest write and history append in one statement (a data-modifying CTE)."""
    written = _latest_write("postgresql", mode).cte("written")
    return (
        insert(history_table)
        .from_select(list(_ROW), select(*(written.c[name] for name in _ROW)))
        .returning(history_table.c.version)
    )


@cache
def _history_append() -> Insert:
    return insert(history_table).values({name: bindparam(name) for name in _ROW})


def write_mode(expected_version: int | None) -> WriteMode:
    """Which statement a write needs: plain upsert, create-only, or replace-if-version."""
    if expected_version is None:
        return "upsert"
    return "create" if expected_version == 0 else "replace"


@cache
def postgres_write_statement(mode: WriteMode) -> Insert:
    """Postgres: latest write and history append in one statement, returning the new version."""
    return _postgres_write(mode)


@cache
def sqlite_write_statements(mode: WriteMode) -> tuple[Insert | Update, Insert]:
    """SQLite: the latest write (returning its row) and the history append, for one transaction."""
    return _latest_write("sqlite", mode), _history_append()


@cache
def latest_statement() -> Select[Any]:
    """The user's latest row: a primary-key lookup."""
    return select(*(latest_table.c[name] for name in _ROW)).where(
        latest_table.c.user_id == bindparam("user_id")
    )


@cache
def idempotent_write_statement() -> Select[Any]:
    """The history row a user's write with a given idempotency key produced, if any."""
    return select(*(history_table.c[name] for name in _ROW)).where(
        history_table.c.user_id == bindparam("user_id"),
        history_table.c.idempotency_key == bindparam("idempotency_key"),
    )


@cache
def version_statement() -> Select[Any]:
    """The user's current version alone (used to explain a lost compare-and-set)."""
    return select(latest_table.c.version).where(latest_table.c.user_id == bindparam("user_id"))


@cache
def history_statement() -> Select[Any]:
    """The newest `limit` versions: a backward scan of the (user_id, version) primary key."""
    return (
        select(*(history_table.c[name] for name in _ROW))
        .where(history_table.c.user_id == bindparam("user_id"))
        .order_by(history_table.c.version.desc())
        .limit(bindparam("limit"))
    )


@cache
def delete_statements() -> tuple[ReturningDelete[Any], Delete]:
    """Delete the latest row (returning its version), then history up to that version.

    Order matters on Postgres under READ COMMITTED. Deleting the latest row
    first waits for, and then excludes, every writer of the user: a writer
    updating the row holds its lock, and a writer re-creating it waits on the
    deleted row in the unique index until the erasure commits. The history
    delete is a second statement, so its snapshot includes every write that
    committed before the lock; bounding it by the deleted version keeps it
    from touching a newer user's rows. (One CTE would use one snapshot and
    could miss the history row of a writer it waited for.)
    """
    latest = (
        delete(latest_table)
        .where(latest_table.c.user_id == bindparam("user_id"))
        .returning(latest_table.c.version)
    )
    history = delete(history_table).where(
        history_table.c.user_id == bindparam("user_id"),
        history_table.c.version <= bindparam("version"),
    )
    return latest, history
