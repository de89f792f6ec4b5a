"""The change feed's statements: its page (read by `changes_since`) and its retention.

Postgres orders its feed by transaction id and stops at the oldest running
transaction; SQLite and MySQL read `snapshot_changes` in `seq` order (MySQL
under its feed gate, see `mysql_sql.gate_shared_statement`).

Retention (`_feed_retention`): a scope's feed position is (txid, seq) on
Postgres and seq alone elsewhere (txid NULL in the table, 0 in cursors).
`snapshot_feed_horizons` holds how far each scope was trimmed and
`snapshot_feed_consumers` where each registered consumer has read to; the
statements below claim, lock and advance them, and delete what the horizon
passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Delete,
    Insert,
    Integer,
    ScalarSelect,
    Select,
    Table,
    Text,
    Update,
    and_,
    bindparam,
    cast,
    delete,
    func,
    literal_column,
    select,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite

from .._mysql_ddl import MYSQL
from .._sql import indexed_by
from ..tables import (
    changes_table,
    feed_consumers_table,
    feed_horizons_table,
    history_table,
    latest_table,
)
from .statements import DialectName, in_scope

__all__ = [
    "CHANGE_FEED_COLUMNS",
    "RetentionStatements",
    "advance_consumer_statement",
    "advance_horizon_statement",
    "changes_since_statement",
    "claim_consumer_statement",
    "claim_horizon_statement",
    "consumers_statement",
    "drop_consumer_statement",
    "floor_statement",
    "horizon_statement",
    "lock_horizon_statement",
    "next_tenant_statement",
    "retention_statements",
    "trim_statement",
]


CHANGE_FEED_COLUMNS = (
    "seq",
    "txid",
    "user_id",
    "version",
    "kind",
    "created_at",
    "actor",
    "reason",
    "metadata",
)
"""What `changes_since_statement` returns, in this order."""


@cache
def changes_since_statement(dialect: DialectName) -> Select[Any]:
    """The scope's feed entries after a cursor, in feed order.

    Postgres orders by (txid, seq) and returns only entries of transactions
    older than every transaction still running (`pg_snapshot_xmin`): those
    can no longer change, and every later entry sorts after them, so a
    cursor never skips an entry that committed late. Its entries live in two
    tables (see `tables.changes_table`): both are read on their feed index
    in that order and merged, the limit applying to the merged stream.
    SQLite serializes writers, so `seq` is already commit order there.
    """
    if dialect != "postgresql":
        return _sqlite_changes_since_statement()
    columns = [changes_table.c[name] for name in CHANGE_FEED_COLUMNS]
    statement = select(*columns).where(in_scope(changes_table))
    horizon = cast(cast(func.pg_snapshot_xmin(func.pg_current_snapshot()), Text), BigInteger)
    after = tuple_(bindparam("after_txid"), bindparam("after_seq"))
    recorded = statement.where(
        tuple_(changes_table.c.txid, changes_table.c.seq) > after,
        changes_table.c.txid < horizon,
    )
    history = history_table.c
    carried = select(
        history.feed_seq.label("seq"),
        history.feed_txid.label("txid"),
        history.user_id,
        history.version,
        literal_column("'write'", changes_table.c.kind.type).label("kind"),
        history.created_at,
        history.actor,
        history.reason,
        history.metadata,
    ).where(
        in_scope(history_table),
        history.feed_seq.isnot(None),  # the partial index's predicate
        tuple_(history.feed_txid, history.feed_seq) > after,
        history.feed_txid < horizon,
    )
    merged = union_all(
        recorded.order_by(changes_table.c.txid, changes_table.c.seq).limit(bindparam("limit")),
        carried.order_by(history.feed_txid, history.feed_seq).limit(bindparam("limit")),
    ).subquery("feed")
    return (
        select(*(merged.c[name] for name in CHANGE_FEED_COLUMNS))
        .order_by(merged.c.txid, merged.c.seq)
        .limit(bindparam("limit"))
    )


def _sqlite_changes_since_statement() -> Select[Any]:
    """SQLite: the page after `after_seq`, a range of the feed index in `seq` order.

    Every SQLite entry has a NULL `txid`, so `txid IS NULL` lets the scope
    and `seq` both bound the range of `ix_snapshot_changes_feed` (tenant,
    namespace, txid, seq): a page costs its own rows, however long the feed.
    `INDEXED BY` (see `_sql.IndexedTable`) holds that plan whatever
    `sqlite_stat1` says. Without it, and without statistics, SQLite took the
    user index and sorted the scope's whole feed for every page; with
    statistics taken while the feed was small, it scanned the table from its
    first entry.
    """
    feed = indexed_by(changes_table, "ix_snapshot_changes_feed")
    return (
        select(*(feed.c[name] for name in CHANGE_FEED_COLUMNS))
        .where(
            in_scope(feed),
            feed.c.txid.is_(None),
            feed.c.seq > bindparam("after_seq", type_=BigInteger),
        )
        .order_by(feed.c.seq)
        .limit(bindparam("limit", type_=Integer))
    )


# --- retention ------------------------------------------------------------------------
#
# Each function takes the engine's dialect name where the SQL differs (the
# insert that keeps an existing row, the feed position) and is cached per name.


def _claim_row(dialect_name: str, table: Table, values: dict[str, Any]) -> Insert:
    """INSERT `values` unless the row's primary key exists: then the stored row stays.

    MySQL: `ON DUPLICATE KEY UPDATE` of a key column to itself, which unlike
    `INSERT IGNORE` turns no other error into a warning (as `claim_key_statement`).
    """
    if dialect_name in MYSQL:
        first_key = table.primary_key.columns.values()[0]
        mysql_insert = mysql.insert(table).values(values)
        return mysql_insert.on_duplicate_key_update({first_key.name: first_key})
    insert_fn = postgresql.insert if dialect_name == "postgresql" else sqlite.insert
    return insert_fn(table).values(values).on_conflict_do_nothing()


def _now(table: Table, name: str) -> Any:
    return bindparam("now", type_=table.c[name].type)


@cache
def claim_horizon_statement(dialect_name: str) -> Insert:
    """Make the scope's horizon row (nothing trimmed: position 0) unless it exists."""
    table = feed_horizons_table
    values = {
        "tenant": bindparam("tenant"),
        "namespace": bindparam("namespace"),
        "txid": 0,
        "seq": 0,
        "trimmed_at": _now(table, "trimmed_at"),
    }
    return _claim_row(dialect_name, table, values)


@cache
def horizon_statement() -> Select[Any]:
    """The scope's horizon (`txid`, `seq`): every entry at or before it was trimmed.
    No row: nothing was ever trimmed."""
    table = feed_horizons_table
    return select(table.c.txid, table.c.seq).where(in_scope(table))


@cache
def lock_horizon_statement(exclusive: bool) -> Select[Any]:
    """Lock the scope's horizon row until commit: shared by an acknowledgement, exclusive
    for a trim, so that a trim sees every acknowledgement committed before it began to
    move the horizon, and an acknowledgement sees every horizon a trim committed before
    it (see `_feed_retention`). SQLite serializes writers and renders no lock."""
    table = feed_horizons_table
    return select(table.c.seq).where(in_scope(table)).with_for_update(read=not exclusive)


def _bound_column(bound: Any, name: str) -> ScalarSelect[Any]:
    """The `name` column of the lowest (txid, seq) in `bound`."""
    return select(bound.c[name]).order_by(bound.c.txid, bound.c.seq).limit(1).scalar_subquery()


@cache
def advance_horizon_statement() -> Update:
    """Move the scope's horizon forward to the trim's last entry, capped by the consumers.

    The new horizon is the lowest of (`last_txid`, `last_seq`) and every
    registered consumer's acknowledged position, read by this statement itself,
    after the horizon row was locked (`lock_horizon_statement`). It never moves
    back: a consumer behind the horizon leaves it where it is.
    """
    horizons, consumers = feed_horizons_table, feed_consumers_table
    bound = union_all(
        select(
            cast(bindparam("last_txid"), BigInteger).label("txid"),
            cast(bindparam("last_seq"), BigInteger).label("seq"),
        ),
        select(consumers.c.acked_txid.label("txid"), consumers.c.acked_seq.label("seq")).where(
            in_scope(consumers)
        ),
    ).subquery("bound")
    new_txid, new_seq = _bound_column(bound, "txid"), _bound_column(bound, "seq")
    return (
        update(horizons)
        .where(
            in_scope(horizons), tuple_(horizons.c.txid, horizons.c.seq) < tuple_(new_txid, new_seq)
        )
        .values(txid=new_txid, seq=new_seq, trimmed_at=_now(horizons, "trimmed_at"))
    )


def _at_or_before_horizon(dialect: DialectName, table: Any) -> ColumnElement[bool]:
    """`snapshot_changes` entries of the scope at or before its horizon (feed index range)."""
    horizons = feed_horizons_table
    horizon_seq = select(horizons.c.seq).where(in_scope(horizons)).scalar_subquery()
    if dialect != "postgresql":
        # NULL `txid` everywhere but Postgres: it and the scope bound the index range.
        return and_(in_scope(table), table.c.txid.is_(None), table.c.seq <= horizon_seq)
    horizon_txid = select(horizons.c.txid).where(in_scope(horizons)).scalar_subquery()
    return and_(
        in_scope(table),
        tuple_(table.c.txid, table.c.seq) <= tuple_(horizon_txid, horizon_seq),
    )


@cache
def trim_statement(dialect: DialectName) -> Delete:
    """Delete the scope's `snapshot_changes` entries at or before its horizon.

    On Postgres, the entries history rows carry (see `changes_since_statement`)
    stay in their rows, hidden from every reader by the horizon, and leave with
    their version (moved here by `prune_history`, then deleted by the next
    trim, or erased): clearing them would write a new version of every history row.
    """
    return delete(changes_table).where(_at_or_before_horizon(dialect, changes_table))


@cache
def claim_consumer_statement(dialect_name: str) -> Insert:
    """Register a consumer at (`new_txid`, `new_seq`) unless it is registered."""
    table = feed_consumers_table
    values = {
        "tenant": bindparam("tenant"),
        "namespace": bindparam("namespace"),
        "consumer": bindparam("consumer"),
        "acked_txid": bindparam("new_txid", type_=BigInteger),
        "acked_seq": bindparam("new_seq", type_=BigInteger),
        "updated_at": _now(table, "updated_at"),
    }
    return _claim_row(dialect_name, table, values)


def _is_consumer(table: Table) -> ColumnElement[bool]:
    return and_(in_scope(table), table.c.consumer == bindparam("consumer"))


@cache
def advance_consumer_statement() -> Update:
    """Move a registered consumer forward to (`new_txid`, `new_seq`); never back."""
    table = feed_consumers_table
    new = tuple_(bindparam("new_txid", type_=BigInteger), bindparam("new_seq", type_=BigInteger))
    return (
        update(table)
        .where(_is_consumer(table), tuple_(table.c.acked_txid, table.c.acked_seq) < new)
        .values(
            acked_txid=bindparam("new_txid", type_=BigInteger),
            acked_seq=bindparam("new_seq", type_=BigInteger),
            updated_at=_now(table, "updated_at"),
        )
    )


@cache
def drop_consumer_statement() -> Delete:
    """Forget a registered consumer: trimming no longer waits for it."""
    return delete(feed_consumers_table).where(_is_consumer(feed_consumers_table))


@cache
def consumers_statement() -> Select[Any]:
    """The scope's registered consumers and their positions, by name."""
    table = feed_consumers_table
    return (
        select(table.c.consumer, table.c.acked_txid, table.c.acked_seq, table.c.updated_at)
        .where(in_scope(table))
        .order_by(table.c.consumer)
    )


@cache
def floor_statement() -> Select[Any]:
    """The lowest acknowledged position of the scope's consumers (no row: none registered)."""
    table = feed_consumers_table
    return (
        select(table.c.acked_txid, table.c.acked_seq)
        .where(in_scope(table))
        .order_by(table.c.acked_txid, table.c.acked_seq)
        .limit(1)
    )


@cache
def next_tenant_statement(table_name: str) -> Select[Any]:
    """The namespace's next tenant after `after_tenant` with rows in the table
    (`snapshot_changes` or `snapshot_latest`): a forward scan of an index that leads
    with the tenant, which stops at the first row of the namespace, rather than a
    DISTINCT over every feed entry."""
    table = {"snapshot_changes": changes_table, "snapshot_latest": latest_table}[table_name]
    return (
        select(table.c.tenant)
        .where(
            table.c.namespace == bindparam("namespace"),
            table.c.tenant > bindparam("after_tenant"),
        )
        .order_by(table.c.tenant)
        .limit(1)
    )


@dataclass(frozen=True)
class RetentionStatements:
    """Feed retention's statements that differ between databases (see `retention_statements`)."""

    claim_horizon: Insert
    claim_consumer: Insert
    trim: Delete


@cache
def retention_statements(dialect_name: str) -> RetentionStatements:
    """The feed retention statements for a dialect: the claims' insert-unless-present form,
    and the trim (Postgres's feed also lives in history rows)."""
    family: DialectName = "postgresql" if dialect_name == "postgresql" else "sqlite"
    return RetentionStatements(
        claim_horizon=claim_horizon_statement(dialect_name),
        claim_consumer=claim_consumer_statement(dialect_name),
        trim=trim_statement(family),
    )
