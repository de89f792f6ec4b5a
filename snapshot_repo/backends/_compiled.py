"""Statements compiled once per dialect by SQLAlchemy, run on the driver connection.

Why not SQLAlchemy's own execution: measured on a 2-core machine against
Postgres on loopback, `get_latest` through a Core `AsyncConnection` took
270-450 µs, the same statement on the asyncpg connection 100-150 µs: the
Connection object, its transaction bookkeeping and the result machinery cost
more than the round trip. Statements are the Core constructs of `statements`
and of each backend's statements module (`postgres_sql`, `sqlite_sql`),
compiled by SQLAlchemy's compiler, with parameters and results converted by
SQLAlchemy's own type processors; only the execution is the driver's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from operator import itemgetter
from typing import Any

from sqlalchemy import ClauseElement, ColumnElement, Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.compiler import SQLCompiler

from ..tables import latest_table
from ._pool import Connections
from .statements import (
    ROW_COLUMNS,
    DialectName,
    history_statement,
    idempotent_write_statement,
    latest_many_statement,
    latest_statement,
    version_statement,
)
from .values import Row, StoredRow

__all__ = [
    "Compiled",
    "SharedStatements",
    "compile_all",
    "compile_statement",
    "expired",
    "result_processor",
    "row_decoder",
]


@dataclass(frozen=True, slots=True)
class Compiled:
    """A Core statement compiled for one dialect, with its positional parameters."""

    sql: str
    names: tuple[str, ...]
    defaults: Mapping[str, Any]
    processors: Mapping[str, Callable[[Any], Any]]
    _pick: Callable[[Mapping[str, Any]], tuple[Any, ...]] = field(init=False, repr=False)
    _converting: tuple[tuple[int, Callable[[Any], Any]], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = self.names
        pick: Callable[[Mapping[str, Any]], tuple[Any, ...]]
        if len(names) > 1:
            pick = itemgetter(*names)
        else:  # itemgetter of one name returns the value itself, of none fails
            pick = lambda values: tuple(values[name] for name in names)  # noqa: E731
        converting = tuple(
            (position, self.processors[name])
            for position, name in enumerate(names)
            if name in self.processors
        )
        object.__setattr__(self, "_pick", pick)
        object.__setattr__(self, "_converting", converting)

    def stored_args(self, stored: Mapping[str, Any]) -> tuple[Any, ...]:
        """Positional values taken as they are: `stored` came from the database already."""
        return tuple(stored[n] if n in stored else self.defaults[n] for n in self.names)

    def args_many(
        self, shared: Mapping[str, Any], varying: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> list[tuple[Any, ...]]:
        """Positional values of one execution per row of `rows` (for `executemany`).

        The executions bind the same `shared` values except for the names in
        `varying`, which take each row's values, in that order. Converting the
        shared values once is what makes this cheaper than `args` per row.
        """
        template = list(self.args(shared))
        slots = [(self.names.index(name), self.processors.get(name)) for name in varying]
        executions = []
        for row in rows:
            for (position, process), value in zip(slots, row, strict=True):
                template[position] = value if process is None or value is None else process(value)
            executions.append(tuple(template))
        return executions

    def args(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        """Positional values for `params`, defaults filled in, converted for the driver.

        Picked by one `itemgetter` from the defaults overlaid with `params`, then
        only the few converting positions touched: a write binds 14 values, and
        a Python loop over them was a tenth of the library's CPU per write.
        """
        values = self._pick({**self.defaults, **params})
        if not self._converting:
            return values
        converted = list(values)
        for position, process in self._converting:
            if converted[position] is not None:
                converted[position] = process(converted[position])
        return tuple(converted)


def compile_statement(statement: ClauseElement, dialect: Dialect) -> Compiled:
    compiled = statement.compile(dialect=dialect)
    assert isinstance(compiled, SQLCompiler)
    processors = {}
    for name, bind in compiled.binds.items():
        processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            processors[name] = processor
    return Compiled(
        sql=compiled.string,
        names=tuple(compiled.positiontup or ()),
        defaults={name: bind.effective_value for name, bind in compiled.binds.items()},
        processors=processors,
    )


def row_decoder(
    dialect: Dialect, columns: Sequence[ColumnElement[Any]]
) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """Converts raw driver rows of `columns` with SQLAlchemy's result processors."""
    processors = [
        column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
    ]

    converting = [(index, process) for index, process in enumerate(processors) if process]

    def decode(raw: Sequence[Any]) -> tuple[Any, ...]:
        # Only the few columns with a processor are touched (per row, on the hot path).
        values = list(raw)
        for index, process in converting:
            if values[index] is not None:
                values[index] = process(values[index])
        return tuple(values)

    return decode


def snapshot_row_decoder(dialect: Dialect) -> Callable[[Sequence[Any]], StoredRow]:
    """Converts raw driver rows of `ROW_COLUMNS` into `StoredRow`s, read by name from then on.

    `row_decoder`'s work, building the `StoredRow` straight from the converted
    values (no intermediate tuple, one call a row: this runs for every row read).
    """
    columns = [latest_table.c[name] for name in ROW_COLUMNS]
    converting = [
        (index, process)
        for index, column in enumerate(columns)
        if (process := column.type.dialect_impl(dialect).result_processor(dialect, None))
    ]
    make = tuple.__new__  # a NamedTuple built as fast as a tuple (no keyword handling)
    only_timestamp = [index for index, _ in converting] == [ROW_COLUMNS.index("created_at")]
    if only_timestamp and StoredRow._fields == ROW_COLUMNS:
        # Every backend's case: only the timestamp converts. Unpacked into a new tuple,
        # 0.08 µs a row less than converting a list (`tuple.__new__` copies a list).
        convert = converting[0][1]

        def decode_timestamped(raw: Sequence[Any]) -> StoredRow:
            user_id, version, schema_version, payload, created_at, key, actor, reason, meta = raw
            if created_at is not None:
                created_at = convert(created_at)
            return make(
                StoredRow,
                (user_id, version, schema_version, payload, created_at, key, actor, reason, meta),
            )

        return decode_timestamped

    def decode_row(raw: Sequence[Any]) -> StoredRow:
        values = list(raw)
        for index, process in converting:
            value = values[index]
            if value is not None:
                values[index] = process(value)
        return make(StoredRow, values)

    return decode_row


class SharedStatements:
    """The statements both backends compile alike (set by `compile_shared`)."""

    _engine: AsyncEngine
    _connections: Connections

    @property
    def kept_connections(self) -> int:
        """Idle connections held for reuse between operations (see `Connections`)."""
        return self._connections.kept

    @property
    def waiting_calls(self) -> int:
        """Calls waiting for a connection now (see `Connections.waiting`)."""
        return self._connections.waiting

    async def release(self) -> None:
        """Return the kept connections to the pool (before the engine is disposed)."""
        await self._connections.release()

    def keep_connections(self, count: int) -> None:
        """Keep up to `count` idle connections between operations (see `Connections`)."""
        self._connections.keep_up_to(count)

    _decode: Callable[[Sequence[Any]], Row]
    _prepared: dict[int, tuple[ClauseElement, Compiled]]

    def decode_snapshot_row(self, raw: Sequence[Any]) -> Row:
        """Convert a raw row of `ROW_COLUMNS` (from `fetch`) like the built-in reads do."""
        return self._decode(raw)

    def _compiled(self, statement: ClauseElement) -> Compiled:
        """`statement` compiled once per backend (statements are module-level singletons)."""
        hit = self._prepared.get(id(statement))
        if hit is None or hit[0] is not statement:
            hit = (statement, compile_statement(statement, self._engine.dialect))
            self._prepared[id(statement)] = hit
        return hit[1]

    _keyed: Compiled
    _latest: Compiled
    _expiry: Callable[[Any], Any]
    _history_tail: tuple[Any, ...]
    _history: Compiled
    _version: Compiled
    _latest_many: Compiled


def compile_shared(target: SharedStatements, dialect: Dialect) -> None:
    name: DialectName = "postgresql" if dialect.name == "postgresql" else "sqlite"
    target._prepared = {}
    target._keyed = compile_statement(idempotent_write_statement(), dialect)
    target._latest = compile_statement(latest_statement(), dialect)
    target._history = compile_statement(history_statement(), dialect)
    # The two hottest reads bind their values positionally, without a dict (see
    # `latest`); what a dialect adds after them (SQLite: OFFSET 0) is constant.
    history_names = target._history.names
    if target._latest.names != _KEY_ARGS or history_names[:4] != (*_KEY_ARGS, "limit"):
        raise AssertionError("latest/history statements bind other parameters than expected")
    target._history_tail = tuple(target._history.defaults[n] for n in history_names[4:])
    target._expiry = result_processor(latest_table.c.expires_at, dialect)
    target._version = compile_statement(version_statement(), dialect)
    target._latest_many = compile_statement(latest_many_statement(name), dialect)


_KEY_ARGS = ("tenant", "namespace", "user_id")


def result_processor(column: ColumnElement[Any], dialect: Dialect) -> Callable[[Any], Any]:
    """How `dialect` turns a raw value of `column` into its Python value."""
    process = column.type.dialect_impl(dialect).result_processor(dialect, None)
    return process if process is not None else (lambda value: value)


def expired(expires_at: Any, now: datetime) -> bool:
    """Whether a latest row with this (decoded) expiry reads as absent at `now`."""
    return expires_at is not None and expires_at <= now


def compile_all(statements: Sequence[ClauseElement], dialect: Dialect) -> tuple[Compiled, ...]:
    return tuple(compile_statement(statement, dialect) for statement in statements)
