"""The MySQL/MariaDB backend's own statements: the latest-row write without RETURNING,
the erasure's locking read, the data-key claim, and the feed gate.

MySQL has no RETURNING (MariaDB has it for INSERT and DELETE only, not for
the upsert's UPDATE), and no ON CONFLICT: the latest-row upsert is
`INSERT ... ON DUPLICATE KEY UPDATE`, whose X lock on the user's primary-key
record orders the user's writers, and the row as stored is read back in
the same transaction, under that lock (`stored_latest_statement`).

Everything else a write or an erasure runs is the core backend's (see
`core_sql` and `statements`), rendered by SQLAlchemy's MySQL dialect.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import (
    Column,
    Delete,
    Insert,
    Integer,
    MetaData,
    Select,
    Table,
    Update,
    bindparam,
    delete,
    literal_column,
    select,
)
from sqlalchemy.dialects import mysql

from ..tables import data_keys_table, latest_table
from .statements import (
    KEY_COLUMNS,
    STORED_COLUMNS,
    WRITE_COLUMNS,
    WriteMode,
    is_key,
    plain_latest_write,
)

__all__ = [
    "FEED_GATE",
    "claim_key_statement",
    "delete_latest_statement",
    "feed_gate_table",
    "gate_exclusive_statement",
    "gate_shared_statement",
    "latest_for_erasure_statement",
    "latest_write_statement",
    "max_packet_statement",
    "stored_latest_statement",
]

FEED_GATE = 1
"""The id of the one row of `snapshot_feed_gate` (revision 0013)."""

feed_gate_table = Table(
    "snapshot_feed_gate",
    MetaData(),
    # MySQL/MariaDB only (revision 0013), so not in `tables.metadata`: one row whose
    # lock orders feed entries against feed readers (see `gate_shared_statement`).
    Column("id", Integer, primary_key=True, autoincrement=False),
)


@cache
def latest_write_statement(mode: WriteMode) -> Insert | Update:
    """Write `snapshot_latest`: upsert, create-only (a plain INSERT) or replace-if-version.

    The upsert's UPDATE part sets `version = version + 1` first, from the row it
    locked, then the written columns (`VALUES(...)`, the row it would have inserted).
    A create that finds the row fails with a duplicate key, which the backend reads
    as a lost compare-and-set; a replace that matches no row changes none.
    """
    if mode == "replace":
        statement = plain_latest_write("sqlite", mode)  # a plain UPDATE: any dialect renders it
        assert isinstance(statement, Update)
        return statement
    table = latest_table
    insert = mysql.insert(table).values(
        version=1,
        expires_at=bindparam("w_expires_at", type_=table.c.expires_at.type),
        **{name: bindparam(f"w_{name}") for name in WRITE_COLUMNS},
    )
    if mode == "create":
        return insert
    copied = [name for name in (*WRITE_COLUMNS, "expires_at") if name not in KEY_COLUMNS]
    return insert.on_duplicate_key_update(
        [("version", table.c.version + 1), *((name, insert.inserted[name]) for name in copied)]
    )


@cache
def max_packet_statement() -> Select[Any]:
    """The server's `max_allowed_packet`: the longest statement it accepts."""
    return select(literal_column("@@max_allowed_packet"))


@cache
def stored_latest_statement() -> Select[Any]:
    """The user's latest row as this transaction wrote it (it holds the row's lock)."""
    return select(*(latest_table.c[name] for name in STORED_COLUMNS)).where(is_key(latest_table))


@cache
def latest_for_erasure_statement(only_expired: bool) -> Select[Any]:
    """Lock the user's latest row for its erasure (FOR UPDATE) and read its version.

    What `DELETE ... RETURNING` does on the other databases: the lock waits out
    and then excludes every writer of the user, and the version bounds the
    history the erasure deletes. With `only_expired`, only an expired row.
    """
    statement = select(latest_table.c.version).where(is_key(latest_table))
    if only_expired:
        statement = statement.where(latest_table.c.expires_at <= bindparam("now"))
    return statement.with_for_update()


@cache
def delete_latest_statement() -> Delete:
    """Delete the user's latest row, which `latest_for_erasure_statement` locked."""
    return delete(latest_table).where(is_key(latest_table))


@cache
def claim_key_statement() -> Insert:
    """Store a data key unless the user has one: on a duplicate, the stored key stays.

    `ON DUPLICATE KEY UPDATE` of the key column to itself changes nothing, and
    unlike `INSERT IGNORE` it turns no other error (a value too long) into a warning.
    """
    names = (*KEY_COLUMNS, "key_id", "wrapped_key")
    values: dict[str, Any] = {name: bindparam(name) for name in names}
    values["created_at"] = bindparam("created_at", type_=data_keys_table.c.created_at.type)
    insert = mysql.insert(data_keys_table).values(values)
    return insert.on_duplicate_key_update(user_id=data_keys_table.c.user_id)


@cache
def gate_shared_statement() -> Select[Any]:
    """A writer's share lock on the feed gate, taken before it appends a feed entry.

    MySQL has no `pg_snapshot_xmin`: an AUTO_INCREMENT `seq` is handed out when
    the entry is inserted, not when it commits, so without this a reader could
    see seq 11 committed while seq 10 is still to commit, and move its cursor
    past 10 for good. Every writer holds this share lock from before it takes a
    seq until it commits; share locks do not block one another. A feed reader
    takes the exclusive lock (`gate_exclusive_statement`), which waits until no
    writer holds an uncommitted seq, and reads its page under it: every entry
    it can see then is committed, and every later entry gets a higher seq.
    """
    return (
        select(feed_gate_table.c.id)
        .where(feed_gate_table.c.id == FEED_GATE)
        .with_for_update(read=True)
    )


@cache
def gate_exclusive_statement() -> Select[Any]:
    """A feed reader's exclusive lock on the feed gate (see `gate_shared_statement`)."""
    return select(feed_gate_table.c.id).where(feed_gate_table.c.id == FEED_GATE).with_for_update()
