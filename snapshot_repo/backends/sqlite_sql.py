"""The SQLite backend's own statements: a write and a batch as a few statements each.

SQLite cannot put DML in a CTE, so a write is the latest-row write
(`statements.latest_write_statement`, returning the row it wrote), then the
history append and the feed entry, inside one `BEGIN IMMEDIATE` transaction
whose write lock orders writers. A batch of distinct users is three
statements whatever its size. What SQLite shares with the other backends
(reads, erasure, pruning, data keys) is in `statements`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Insert,
    Select,
    String,
    Update,
    and_,
    bindparam,
    func,
    insert,
    literal,
    select,
)
from sqlalchemy.sql.dml import ReturningInsert

from ..tables import changes_table, history_table, latest_table
from .statements import (
    CHANGE_COLUMNS,
    STORED_COLUMNS,
    WriteMode,
    feed_entry_statement,
    in_scope,
    latest_write_statement,
    plain_latest_write,
)

__all__ = ["sqlite_bulk_write_statements", "sqlite_write_statements"]


@cache
def sqlite_write_statements(mode: WriteMode) -> tuple[Insert | Update, Insert, Insert]:
    """SQLite: the latest write (returning its row), the history append and the feed entry."""
    append = insert(history_table).values({name: bindparam(name) for name in STORED_COLUMNS})
    return latest_write_statement("sqlite", mode), append, feed_entry_statement("write")


@cache
def sqlite_bulk_write_statements() -> tuple[Insert | Update, ReturningInsert[Any], Insert]:
    """SQLite: a batch of writes of distinct users in three statements, whatever its size.

    The upsert (returning nothing) runs once per snapshot through
    `executemany`, a loop in C. Then, under the same write lock, each batch
    user's latest row is exactly the version just written: one statement
    copies them all to history, returning user ids and versions, and one
    records them in the feed. The user ids are bound
    as one JSON array (`user_ids_json`). A user repeated in the batch would
    be copied once: callers take this path only for distinct users.
    """
    batch = func.json_each(bindparam("user_ids_json", type_=String)).table_valued("value")
    written = and_(in_scope(latest_table), latest_table.c.user_id.in_(select(batch.c.value)))

    def copy_of(columns: Sequence[str], *extra: ColumnElement[Any]) -> Select[Any]:
        # `IN (SELECT value FROM json_each(...))`: each user is found by key. (A join
        # ordered by the array index sorted whole rows in a temporary b-tree, and
        # without the ORDER BY the planner scanned the scope instead.)
        return select(*(latest_table.c[name] for name in columns), *extra).where(written)

    history = (
        insert(history_table)
        .from_select(list(STORED_COLUMNS), copy_of(STORED_COLUMNS))
        .returning(history_table.c.user_id, history_table.c.version)
    )
    feed = insert(changes_table).from_select(
        [*CHANGE_COLUMNS, "kind"], copy_of(CHANGE_COLUMNS, literal("write"))
    )
    return plain_latest_write("sqlite", "upsert"), history, feed
