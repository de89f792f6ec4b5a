"""The change feed's page: one statement per database family, read by `changes_since`.

Postgres orders its feed by transaction id and stops at the oldest running
transaction; SQLite and MySQL read `snapshot_changes` in `seq` order (MySQL
under its feed gate, see `mysql_sql.gate_shared_statement`).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    Select,
    Text,
    bindparam,
    cast,
    func,
    literal_column,
    select,
    tuple_,
    union_all,
)

from .._sql import indexed_by
from ..tables import changes_table, history_table
from .statements import DialectName, in_scope

__all__ = ["CHANGE_FEED_COLUMNS", "changes_since_statement"]


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
