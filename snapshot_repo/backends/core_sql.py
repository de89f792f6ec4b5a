"""The core backend's own statements, and how it runs a statement as driver SQL.

Each statement is one step of the core backend's write, pruning or erasure
transaction (see `core`), built from Core constructs that every dialect
renders, except where `core` says why not: Postgres's feed position,
transaction id and `pg_notify`. The latest-row upsert, the reads, the
erasure's deletes and the data-key statements it shares with the fast
backends are in `statements`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    ClauseElement,
    ColumnElement,
    Delete,
    Insert,
    Select,
    String,
    Text,
    bindparam,
    cast,
    delete,
    exists,
    func,
    insert,
    literal,
    select,
)
from sqlalchemy import Sequence as DbSequence
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.compiler import SQLCompiler

from ..tables import changes_table, data_keys_table, history_table, latest_table
from .statements import (
    CHANGE_COLUMNS,
    FEED_SEQUENCE,
    NOTIFY_CHANNEL,
    ROW_COLUMNS,
    STORED_COLUMNS,
    alive,
    in_scope,
    is_key,
    prune_condition,
)

__all__ = [
    "DriverSql",
    "feed_entry",
    "history_append",
    "latest_many",
    "notify_statement",
    "orphan_key_drop",
    "orphan_key_lock",
    "pruned_entries_move",
    "pruning",
]


class DriverSql:
    """A statement compiled by the engine's dialect, run as driver SQL by `fetch`.

    Bound values are converted by their types' bind processors, as SQLAlchemy
    would, and passed in the dialect's paramstyle (a tuple or a mapping).
    """

    def __init__(self, statement: ClauseElement, engine: AsyncEngine) -> None:
        dialect = engine.dialect
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        self._compiled = compiled
        self.text, self._positions = compiled.string, compiled.positiontup
        processors = {
            n: b.type.dialect_impl(dialect).bind_processor(dialect)
            for n, b in compiled.binds.items()
        }
        self._processors = {n: p for n, p in processors.items() if p is not None}

    def parameters(self, params: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        values = dict(self._compiled.construct_params(dict(params)))
        for name, process in self._processors.items():
            if values.get(name) is not None:
                values[name] = process(values[name])
        if self._positions is None:
            return values
        return tuple(values[name] for name in self._positions)


def _txid() -> ColumnElement[int]:
    """Postgres: the current transaction's 64-bit id, the feed's order (see `changes_since`)."""
    return cast(cast(func.pg_current_xact_id(), Text), BigInteger)


@cache
def history_append(feed_in_history: bool) -> Insert:
    """Append a stored row to history; on Postgres with its feed position (revision 0010)."""
    values: dict[str, Any] = {name: bindparam(name) for name in STORED_COLUMNS}
    if feed_in_history:
        values.update(feed_txid=_txid(), feed_seq=DbSequence(FEED_SEQUENCE).next_value())
    return insert(history_table).values(values)


@cache
def feed_entry(kind: str, with_txid: bool) -> Insert:
    """A `snapshot_changes` entry; on Postgres it carries the transaction id."""
    return insert(changes_table).values(
        kind=kind,
        txid=_txid() if with_txid else None,
        **{name: bindparam(name) for name in CHANGE_COLUMNS},
    )


@cache
def notify_statement() -> Select[Any]:
    """Postgres: NOTIFY listeners of a write or erasure, delivered at commit."""
    typed = {"tenant": String, "namespace": String, "user_id": String, "version": BigInteger}
    fields: list[tuple[str, Any]] = [
        (n, bindparam(n, type_=t)) for n, t in {**typed, "kind": String}.items()
    ]
    payload = func.json_build_object(*(part for field in fields for part in field))
    return select(func.pg_notify(NOTIFY_CHANNEL, cast(payload, Text)))


_NEWEST = bindparam("newest", type_=BigInteger)
"""The user's newest version, which the write pruning its history just wrote."""


@cache
def pruning() -> Delete:
    """Delete the user's history versions the retention policy drops below `newest`."""
    return delete(history_table).where(is_key(history_table), prune_condition(_NEWEST))


@cache
def pruned_entries_move() -> Insert:
    """Postgres: copy the feed entries of the versions `pruning` drops to `snapshot_changes`,
    keeping their txid and seq, so no cursor skips or repeats them."""
    history = history_table.c
    entries = select(
        *(history[name] for name in CHANGE_COLUMNS),
        literal("write"),
        history.feed_txid,
        history.feed_seq,
    ).where(is_key(history_table), prune_condition(_NEWEST), history.feed_seq.isnot(None))
    return insert(changes_table).from_select([*CHANGE_COLUMNS, "kind", "txid", "seq"], entries)


@cache
def orphan_key_lock() -> Select[Any]:
    """Lock the data key of a user without rows (Postgres; SQLite's write lock is held)."""
    return select(data_keys_table.c.user_id).where(is_key(data_keys_table)).with_for_update()


@cache
def orphan_key_drop() -> Delete:
    """Delete the user's data key unless a writer holding it has written a latest row."""
    has_latest = exists().where(is_key(latest_table))
    return delete(data_keys_table).where(is_key(data_keys_table), ~has_latest)


@cache
def latest_many() -> Select[Any]:
    """The live latest rows of a list of users: `user_id IN (...)`, expanded per call."""
    wanted = latest_table.c.user_id.in_(bindparam("user_ids", expanding=True))
    columns = [latest_table.c[name] for name in ROW_COLUMNS]
    return select(*columns).where(in_scope(latest_table), wanted, alive())
