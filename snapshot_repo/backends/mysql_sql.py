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

from functools import cache, lru_cache
from typing import Any

from sqlalchemy import (
    Column,
    ColumnElement,
    Delete,
    Insert,
    Integer,
    MetaData,
    Select,
    Table,
    Update,
    bindparam,
    delete,
    insert,
    literal,
    literal_column,
    select,
)
from sqlalchemy.dialects import mysql

from ..tables import changes_table, data_keys_table, history_table, latest_table
from .statements import (
    CHANGE_COLUMNS,
    KEY_COLUMNS,
    ROW_COLUMNS,
    STORED_COLUMNS,
    WRITE_COLUMNS,
    WriteMode,
    alive,
    in_scope,
    is_key,
    plain_latest_write,
)

__all__ = [
    "FEED_GATE",
    "batch_feed_copy_statement",
    "batch_history_copy_returning_statement",
    "batch_history_copy_statement",
    "batch_versions_statement",
    "claim_key_statement",
    "delete_latest_statement",
    "erase_entry_under_gate_statement",
    "feed_copy_statement",
    "feed_gate_table",
    "gate_exclusive_statement",
    "gate_shared_statement",
    "history_copy_returning_statement",
    "history_copy_statement",
    "latest_for_erasure_statement",
    "latest_many_statement",
    "latest_write_statement",
    "max_packet_statement",
    "stored_latest_statement",
    "version_under_gate_statement",
]

_SIZES = 64
"""Statements kept per batch size (an IN list of one placeholder per user)."""

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
    # `+ 1` as a literal, not a bound value: a batch repeats the VALUES row (multi-row)
    # or binds it once per row (bulk execution), so every placeholder must be inside it
    # (`mysql_driver._ONE_ROW`).
    increment = table.c.version + literal_column("1")
    return insert.on_duplicate_key_update(
        [("version", increment), *((name, insert.inserted[name]) for name in copied)]
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
def erase_entry_under_gate_statement() -> Insert:
    """An erasure's feed entry, inserted from a locking read of the feed gate.

    `gate_shared_statement` and the entry in one round trip: the SELECT takes
    the gate's share lock before the INSERT takes the entry's seq, as the gate
    requires. The values are the erase entry's (`core_sql.feed_entry`), bound.
    """
    values = [
        bindparam(name, type_=changes_table.c[name].type).label(name) for name in CHANGE_COLUMNS
    ]
    source = (
        select(literal("erase").label("kind"), *values)
        .select_from(feed_gate_table)
        .where(feed_gate_table.c.id == FEED_GATE)
        .with_for_update(read=True)
    )
    return insert(changes_table).from_select(["kind", *CHANGE_COLUMNS], source)


@cache
def gate_exclusive_statement() -> Select[Any]:
    """A feed reader's exclusive lock on the feed gate (see `gate_shared_statement`)."""
    return select(feed_gate_table.c.id).where(feed_gate_table.c.id == FEED_GATE).with_for_update()


@cache
def version_under_gate_statement() -> Select[Any]:
    """The version a write just gave the user's latest row, and the feed gate's share lock.

    One round trip for two needs of a write: MySQL returns nothing from the
    upsert, so the version is read back (the write holds the row's X lock, so
    this is its own row), and the write must hold the gate's share lock before
    its feed entry takes a seq (see `gate_shared_statement`). A locking read of
    the two rows: the latest row's share lock is the write's own X lock already.
    """
    return (
        select(latest_table.c.version)
        .where(is_key(latest_table), feed_gate_table.c.id == FEED_GATE)
        .with_for_update(read=True)
    )


@cache
def history_copy_statement() -> Insert:
    """Append the user's latest row, as this transaction wrote it, to history.

    `INSERT ... SELECT` from the row (here and for the feed entry): the
    payload and metadata are not sent to the server again.
    """
    return _history_copy(is_key(latest_table))


@cache
def feed_copy_statement() -> Insert:
    """Record the write feed entry of the user's latest row, as this transaction wrote it."""
    return _feed_copy(is_key(latest_table))


def _batch_users(count: int) -> tuple[ColumnElement[bool], ...]:
    """`user_id IN (:u0, ..., :u<count-1>)` in the bound scope: one statement per size."""
    ids: list[Any] = [bindparam(f"u{index}") for index in range(count)]
    return (in_scope(latest_table), latest_table.c.user_id.in_(ids))


@lru_cache(maxsize=_SIZES)
def batch_history_copy_statement(count: int) -> Insert:
    """Append the latest rows of a batch's `count` users (bound `u0`...) to history."""
    return _history_copy(*_batch_users(count))


@lru_cache(maxsize=_SIZES)
def batch_feed_copy_statement(count: int) -> Insert:
    """Record a write feed entry for each of a batch's `count` users, from its latest row,
    in primary-key order (the order the batch wrote them in)."""
    return _feed_copy(*_batch_users(count))


@cache
def history_copy_returning_statement() -> Insert:
    """MariaDB: `version_under_gate_statement` and `history_copy_statement` in one round trip.

    The copy's SELECT joins the feed gate as a locking read (`LOCK IN SHARE
    MODE`), so the write holds the gate's share lock before its feed entry
    takes a seq, and `RETURNING` (MariaDB 10.5+, not MySQL) gives the version
    the upsert assigned. Used where the dialect says `insert_returning`.
    """
    return _history_copy(is_key(latest_table), under_gate=True).returning(history_table.c.version)


@lru_cache(maxsize=_SIZES)
def batch_history_copy_returning_statement(count: int) -> Insert:
    """MariaDB: a batch's gate share lock, history copy and versions read back, in one
    statement (see `history_copy_returning_statement`): rows of (user_id, version)."""
    return _history_copy(*_batch_users(count), under_gate=True).returning(
        history_table.c.user_id, history_table.c.version
    )


def _history_copy(*where: ColumnElement[bool], under_gate: bool = False) -> Insert:
    source = select(*(latest_table.c[name] for name in STORED_COLUMNS)).where(*where)
    if under_gate:
        source = source.where(feed_gate_table.c.id == FEED_GATE).with_for_update(read=True)
    return insert(history_table).from_select(list(STORED_COLUMNS), source)


def _feed_copy(*where: ColumnElement[bool]) -> Insert:
    columns = [latest_table.c[name] for name in CHANGE_COLUMNS]
    source = select(literal("write"), *columns).where(*where).order_by(latest_table.c.user_id)
    return insert(changes_table).from_select(["kind", *CHANGE_COLUMNS], source)


@lru_cache(maxsize=_SIZES)
def batch_versions_statement(count: int) -> Select[Any]:
    """The versions a batch just gave its `count` users (it holds their rows' locks)."""
    return select(latest_table.c.user_id, latest_table.c.version).where(*_batch_users(count))


@lru_cache(maxsize=_SIZES)
def latest_many_statement(count: int) -> Select[Any]:
    """The live latest rows of `count` users (bound `u0`...): primary-key probes."""
    return select(*(latest_table.c[name] for name in ROW_COLUMNS)).where(
        *_batch_users(count), alive()
    )
