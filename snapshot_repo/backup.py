"""Whole-store backup and restore: every tenant, namespace, user and version as JSON Lines.

A dump is UTF-8 JSON Lines, one JSON object per line:

1. a header, ``{"format": "snapshot_repo.dump", "version": 1, "schema_revision": ...,
   "dialect": ..., "dumped_at": ...}``; `load` checks the format and its
   version, the rest is for people. The counts are not known when it is
   written, so they are in the end line;
2. one line per history row, in primary-key order (so each user's versions
   are consecutive and ascending): ``tenant``, ``namespace``, ``user_id``,
   ``version``, ``schema_version``, ``created_at`` (ISO 8601, microseconds,
   UTC offset), ``idempotency_key``, ``actor``, ``reason``, ``metadata`` (a
   JSON object or null), ``state`` (the stored state as JSON, readable, not
   base64) and ``expires_at`` (the snapshot's expiry; only ever set on a
   user's latest version);
3. one ``{"receipt": {...}}`` line per erasure receipt, oldest first;
4. an end line, ``{"end": true, "rows": N, "receipts": M}``, so that a dump
   cut short (a full disk, a killed process) is refused rather than restoring
   part of a store.

`snapshot_latest` is not dumped: every write path (`_dialects`, `backends`)
writes the latest row and appends the row it returned to history in the same
transaction, a batch write gives each user's last row the highest version,
retention never drops the newest version, and an erasure deletes both; so a
user's latest row is its highest history version, plus `expires_at`, which
only the latest table has and which the dump therefore carries on that
version's line. (One transient exception: `upgrade_payloads` rewrites history
and latest in separate passes, so if it is stopped between them a latest row
can still hold the older encoding of the same state. A load stores the
upgraded one for both.) The change feed is neither dumped nor filled: a
loaded store's feed starts at the load.

Strings round-trip exactly, ``\\x00`` and any Unicode included: JSON escapes
control characters, and U+0085, U+2028 and U+2029 are escaped too, so no
line-splitting convention can cut a line in two.
"""

from __future__ import annotations

import asyncio
import codecs
import re
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
)
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import IO, Any, Final, TypeVar

from pydantic_core import from_json, to_json
from sqlalchemy import Select, insert, literal, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import migrate
from ._checks import MAX_BATCH_SIZE, check_int, valid_actor, valid_identifier, valid_reason
from ._dialects import STORED_COLUMNS
from ._translate import storage_errors
from .codec import HARD_MAX_PAYLOAD_BYTES, encode_metadata
from .crypto import SEALED_PREFIX
from .engine import WRITE_TRANSACTION, EngineSettings, install_sqlite_settings
from .errors import ConfigurationError, SchemaNotReadyError, SnapshotValidationError
from .snapshot import MAX_IDEMPOTENCY_KEY_LENGTH, MAX_SCOPE_LENGTH, MAX_USER_ID_LENGTH
from .tables import changes_table, erasure_receipts_table, history_table, latest_table

__all__ = ["DEFAULT_BATCH_SIZE", "DUMP_FORMAT", "DUMP_FORMAT_VERSION", "Progress", "dump", "load"]

DUMP_FORMAT: Final = "snapshot_repo.dump"
"""The header's ``format``: what `load` looks for on the first line."""

DUMP_FORMAT_VERSION: Final = 1
"""The header's ``version``: the shape of the other lines, bumped when it changes."""

DEFAULT_BATCH_SIZE: Final = 1000
"""Rows per query (dump) or per insert (load): bounded memory, few round trips."""

Progress = Callable[[int], object]
"""Called with the number of history rows dumped or loaded so far, once per batch."""

_COLUMNS: Final = STORED_COLUMNS  # every column of a history row, in table order
_KEY: Final = ("tenant", "namespace", "user_id", "version")
_ROW_FIELDS: Final = frozenset(
    {*(name for name in _COLUMNS if name != "payload"), "state", "expires_at"}
)
_RECEIPT_COLUMNS: Final = (
    "subject",
    "tenant",
    "namespace",
    "erased_at",
    "versions_erased",
    "cause",
)
_END_FIELDS: Final = frozenset({"end", "rows", "receipts"})
_TABLES: Final = (latest_table, history_table, changes_table, erasure_receipts_table)
_MAX_BIGINT: Final = 2**63 - 1
_MAX_INTEGER: Final = 2**31 - 1

# Line breaks to `str.splitlines` (and some editors) that JSON leaves raw inside
# strings; in UTF-8 these byte sequences can only be these characters.
_RAW_LINE_BREAKS: Final = (
    (b"\xc2\x85", b"\\u0085"),
    (b"\xe2\x80\xa8", b"\\u2028"),
    (b"\xe2\x80\xa9", b"\\u2029"),
)
_JSON_POSITION = re.compile(r"\bline 1 column\b")
_ResultT = TypeVar("_ResultT")


async def dump(
    engine: AsyncEngine,
    out: IO[bytes] | IO[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> int:
    """Write the whole store to `out` as JSON Lines (see the module doc for the format).

    History rows are read in primary-key order with keyset pagination,
    `batch_size` per query, then the erasure receipts the same way, all inside
    one read-only transaction: memory stays bounded, and the dump is one
    consistent snapshot even while others write (Postgres: REPEATABLE READ;
    SQLite: one read transaction, which never blocks writers under WAL but
    keeps the WAL from being checkpointed past it until the dump ends).

    `snapshot_latest` is not written: each user's latest row is their highest
    history version (an invariant of every write path; see the module doc),
    and its `expires_at` is carried on that version's line. The change feed
    is not part of a dump.

    Args:
        engine: the store, migrated to this package's head revision.
        out: a binary stream, or a text stream encoding UTF-8 (or none, such as
            `io.StringIO`). Written on the event loop's thread; not closed.
        batch_size: rows per query, 1 to 10,000.
        progress: called with the number of history rows written so far,
            after each batch.

    Returns:
        The number of history rows written.

    Raises:
        SnapshotValidationError: a bad `batch_size`, or a stored payload or
            metadata that is not JSON.
        ConfigurationError: `out` is a text stream in another encoding than
            UTF-8 (checked before anything is written).
        SchemaNotReadyError: the database is not at this package's head revision.
        StorageError: the database failed. What reached `out` has no end line,
            so `load` refuses it.
        OSError: writing to `out` failed; passed through as it is.
    """
    check_int("batch_size", batch_size, minimum=1, maximum=MAX_BATCH_SIZE)
    write = _writer(out)
    revision = await _require_head(engine, "dump")
    header = {
        "format": DUMP_FORMAT,
        "version": DUMP_FORMAT_VERSION,
        "schema_revision": revision,
        "dialect": engine.dialect.name,
        "dumped_at": _timestamp(datetime.now(UTC)),
    }
    write(to_json(header) + b"\n")
    rows = receipts = 0
    # The batches come from a generator so that only database failures turn
    # into StorageError; a failed write to `out` stays the OSError it is.
    async with aclosing(_batches(engine, batch_size)) as batches:
        async for kind, batch in batches:
            if kind == "rows":
                write(_escape_line_breaks(b"".join(map(_row_line, batch))))
                rows += len(batch)
                if progress is not None:
                    progress(rows)
            else:
                write(b"".join(map(_receipt_line, batch)))
                receipts += len(batch)
    write(to_json({"end": True, "rows": rows, "receipts": receipts}) + b"\n")
    return rows


async def load(
    engine: AsyncEngine,
    lines: Iterable[str | bytes] | AsyncIterable[str | bytes],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> int:
    """Restore a dump made by `dump` into an empty, migrated database of either backend.

    The whole load is one transaction. History rows are inserted `batch_size`
    at a time; as each user's last line goes by, that version is inserted into
    `snapshot_latest` too (the user's highest version, with the `expires_at`
    the dump carries), so the latest table is built while streaming, with
    bounded memory and no statement over the whole table. Erasure receipts
    are inserted in batches likewise, in their order; then the transaction
    commits. Any failure (a bad
    line, a missing end line, the database refusing a row) rolls everything
    back, so the database is either fully loaded or still empty, never
    half-written. The price is that one transaction holds the whole load,
    which SQLite and Postgres both handle for any store this library is meant
    for; readers see the store appear at the commit, and writers wait until
    then (Postgres: the tables are locked in EXCLUSIVE mode; SQLite: the load
    holds the write lock from its start).

    The change feed is not filled: its first entries are the writes after
    the load. Reads, version numbering (the next write is the latest version
    + 1), idempotency-key replays, expiry and erasure receipts continue as in
    the dumped store.

    Args:
        engine: the target, migrated to this package's head and with every
            snapshot table (latest, history, change feed, erasure receipts) empty.
        lines: the dump: a binary or UTF-8 text file, any iterable of `str` or
            `bytes` lines, or an async iterable of them. A file or other
            synchronous iterable is read on the event loop's thread. Each
            user's lines must be consecutive with ascending versions, as `dump`
            writes them.
        batch_size: rows per insert, 1 to 10,000.
        progress: called with the number of history rows loaded so far, after
            each batch.

    Returns:
        The number of history rows loaded.

    Raises:
        SnapshotValidationError: a bad `batch_size`; the first line is not the
            header of a dump of format version 1; a line is not JSON, misses a
            field, has an unknown one, holds a value of the wrong type or out of
            range, or breaks the order above (the message names the line); the
            end line is missing or does not match what was read. Nothing was
            loaded.
        ConfigurationError: the target database is not empty, or `lines` is a
            text file in another encoding than UTF-8. Nothing was loaded.
        SchemaNotReadyError: the target is not at this package's head revision.
        StorageError: the database failed or refused a row (a key that appears
            twice, say; the message names the lines of the batch). Nothing was
            loaded.
        OSError: reading `lines` failed; passed through as it is. Nothing was loaded.
    """
    check_int("batch_size", batch_size, minimum=1, maximum=MAX_BATCH_SIZE)
    if isinstance(lines, str | bytes):
        raise SnapshotValidationError("load takes a file or an iterable of lines, not one string")
    _check_utf8(lines, "load reads")
    await _require_head(engine, "load")
    async with aclosing(_numbered(lines)) as numbered:
        _check_header(await anext(numbered, None))
        async with _write_transaction(engine) as conn:
            await _require_empty(conn)
            loader = _Loader(conn, batch_size, progress)
            end: tuple[int, Mapping[str, Any]] | None = None
            async for number, line in numbered:
                value = _parse(number, line)
                if end is not None:
                    raise SnapshotValidationError(
                        f"line {number} of the dump follows its end line (line {end[0]})"
                    )
                if isinstance(value, dict) and "end" in value:
                    end = (number, value)
                elif isinstance(value, dict) and "receipt" in value:
                    await loader.add_receipt(number, value)
                else:
                    await loader.add_row(number, value)
            await loader.finish()
            _check_end(end, loader.rows, loader.receipts)
    return loader.rows


# --- dump ---------------------------------------------------------------------


def _writer(out: IO[bytes] | IO[str]) -> Callable[[bytes], object]:
    """A function writing UTF-8 bytes to `out`, binary or text."""
    if not _is_text(out):
        binary: IO[bytes] = out  # type: ignore[assignment]
        return binary.write
    _check_utf8(out, "dump writes")
    textual: IO[str] = out  # type: ignore[assignment]
    return lambda data: textual.write(data.decode("utf-8"))


def _is_text(stream: object) -> bool:
    # Text streams (files opened in text mode, sys.stdout, StringIO) have an
    # `encoding` attribute; binary ones (BytesIO, files opened with "b") do not.
    return hasattr(stream, "encoding")


def _check_utf8(stream: object, verb: str) -> None:
    """Refuse a text stream that would re-encode the dump's UTF-8 as something else."""
    encoding = getattr(stream, "encoding", None) if _is_text(stream) else None
    if isinstance(encoding, str) and codecs.lookup(encoding).name != "utf-8":
        raise ConfigurationError(
            f"{verb} UTF-8 JSON Lines: give it a binary stream or a text stream "
            f"encoding UTF-8, not {encoding}"
        )


async def _batches(
    engine: AsyncEngine, batch_size: int
) -> AsyncGenerator[tuple[str, list[Any]], None]:
    """("rows", batch) for all history, then ("receipts", batch): one snapshot, keyset pages."""
    _configure(engine)
    async with storage_errors("dump"), engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
        async with conn.begin():
            after: tuple[Any, ...] | None = None
            while rows := list((await conn.execute(_rows_page(after, batch_size))).all()):
                yield "rows", rows
                if len(rows) < batch_size:
                    break
                after = tuple(getattr(rows[-1], name) for name in _KEY)
            last_id: int | None = None
            while receipts := list((await conn.execute(_receipts_page(last_id, batch_size))).all()):
                yield "receipts", receipts
                if len(receipts) < batch_size:
                    break
                last_id = receipts[-1].id


def _rows_page(after: tuple[Any, ...] | None, limit: int) -> Select[Any]:
    """The next `limit` history rows after the key `after`, each with its latest row's expiry.

    Keyset pagination (a row-value comparison on the primary key, never
    OFFSET) costs O(limit) per page at any depth. The expiry is one primary-key
    probe of the latest table per row (a join would let the planner merge-scan
    the latest table from its start on every page); it matches only a user's
    latest version.
    """
    key = [history_table.c[name] for name in _KEY]
    expires_at = (
        select(latest_table.c.expires_at)
        .where(*(latest_table.c[name] == history_table.c[name] for name in _KEY))
        .scalar_subquery()
        .label("expires_at")
    )
    statement = (
        select(*(history_table.c[name] for name in _COLUMNS), expires_at)
        .order_by(*key)
        .limit(limit)
    )
    if after is None:
        return statement
    bound = [literal(value, column.type) for value, column in zip(after, key, strict=True)]
    return statement.where(tuple_(*key) > tuple_(*bound))


def _receipts_page(after_id: int | None, limit: int) -> Select[Any]:
    table = erasure_receipts_table
    statement = (
        select(*(table.c[name] for name in _RECEIPT_COLUMNS), table.c.id)
        .order_by(table.c.id)
        .limit(limit)
    )
    return statement if after_id is None else statement.where(table.c.id > after_id)


def _row_line(row: Any) -> bytes:
    values = row._mapping
    record = {name: values[name] for name in _COLUMNS if name not in ("payload", "metadata")}
    record["created_at"] = _timestamp(values["created_at"])
    record["metadata"] = _stored_json(values, "metadata")
    record["state"] = _stored_json(values, "payload")
    expires_at = values["expires_at"]
    record["expires_at"] = None if expires_at is None else _timestamp(expires_at)
    return to_json(record) + b"\n"


def _receipt_line(row: Any) -> bytes:
    values = row._mapping
    receipt = {name: values[name] for name in _RECEIPT_COLUMNS}
    receipt["erased_at"] = _timestamp(values["erased_at"])
    return to_json({"receipt": receipt}) + b"\n"


def _stored_json(values: Mapping[str, Any], column: str) -> Any:
    stored = values[column]
    if stored is None:
        return None
    if bytes(stored).startswith(SEALED_PREFIX):
        raise SnapshotValidationError(
            "dump found an encrypted (crypto-shredding) payload: dumps hold readable JSON "
            "and no data keys, so stores with encryption cannot be dumped"
        )
    try:
        return from_json(bytes(stored))
    except ValueError as exc:
        raise SnapshotValidationError(
            f"dump found a stored {column} that is not JSON ({_json_problem(exc)}) in "
            f"tenant {values['tenant']!r}, namespace {values['namespace']!r}, "
            f"version {values['version']} of a user"
        ) from None


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _escape_line_breaks(data: bytes) -> bytes:
    for raw, escaped in _RAW_LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return data


# --- load: reading and checking lines --------------------------------------------


async def _numbered(
    lines: Iterable[str | bytes] | AsyncIterable[str | bytes],
) -> AsyncGenerator[tuple[int, str | bytes], None]:
    """The non-blank lines with their 1-based line numbers (blank lines are counted)."""
    number = 0
    if isinstance(lines, AsyncIterable):
        async for line in lines:
            number += 1
            if _has_content(number, line):
                yield number, line
        return
    iterator = iter(lines)
    while True:
        try:
            line = next(iterator)
        except StopIteration:
            return
        except UnicodeDecodeError as exc:  # a text file that is not UTF-8
            raise SnapshotValidationError(
                f"line {number + 1} of the dump is not UTF-8: {exc.reason}"
            ) from None
        number += 1
        if _has_content(number, line):
            yield number, line


def _has_content(number: int, line: object) -> bool:
    if not isinstance(line, str | bytes):
        raise SnapshotValidationError(
            f"line {number} of the dump is a {type(line).__name__}, not str or bytes"
        )
    return bool(line.strip())


def _parse(number: int, line: str | bytes) -> Any:
    try:
        # No NaN or Infinity: JSON has neither, and the stores refuse them.
        return from_json(line, allow_inf_nan=False)
    except ValueError as exc:
        raise SnapshotValidationError(
            f"line {number} of the dump is not JSON: {_json_problem(exc)}"
        ) from None


def _json_problem(exc: ValueError) -> str:
    return _JSON_POSITION.sub("column", str(exc))


def _check_header(first: tuple[int, str | bytes] | None) -> None:
    if first is None:
        raise SnapshotValidationError("the dump is empty: it has no header line")
    number, line = first
    try:
        header = _parse(number, line)
    except SnapshotValidationError:
        header = None
    if not isinstance(header, dict) or header.get("format") != DUMP_FORMAT:
        raise SnapshotValidationError(
            f"line {number} is not the header of a snapshot_repo dump "
            f'(a JSON object with "format": "{DUMP_FORMAT}")'
        )
    version = header.get("version")
    if version != DUMP_FORMAT_VERSION or isinstance(version, bool):
        raise SnapshotValidationError(
            f"the dump is of format version {version!r}; this package reads "
            f"version {DUMP_FORMAT_VERSION}"
        )


def _check_end(end: tuple[int, Mapping[str, Any]] | None, rows: int, receipts: int) -> None:
    if end is None:
        raise SnapshotValidationError(
            f"the dump has no end line after its {rows} rows: it was cut short"
        )
    number, value = end
    if set(value) != _END_FIELDS or value["end"] is not True:
        raise SnapshotValidationError(
            f"line {number} of the dump is not a valid end line "
            '({"end": true, "rows": N, "receipts": M})'
        )
    for name, read in (("rows", rows), ("receipts", receipts)):
        counted = _checked(number, partial(check_int, name, value[name], minimum=0))
        if counted != read:
            raise SnapshotValidationError(
                f"the dump's end line (line {number}) counts {counted} {name}, but {read} were read"
            )


def _fields(number: int, value: Any, expected: frozenset[str], what: str) -> dict[str, Any]:
    """`value` if it is a JSON object with exactly the `expected` fields."""
    if not isinstance(value, dict):
        raise SnapshotValidationError(
            f"line {number} of the dump: {what} is a JSON {type(value).__name__}, not an object"
        )
    missing, unknown = expected - value.keys(), value.keys() - expected
    if missing or unknown:
        problems = []
        if missing:
            problems.append("missing " + ", ".join(sorted(missing)))
        if unknown:
            problems.append("unknown " + ", ".join(sorted(unknown)))
        raise SnapshotValidationError(f"line {number} of the dump: {'; '.join(problems)}")
    return value


def _history_row(value: dict[str, Any]) -> dict[str, Any]:
    """The history row a dump line describes, validated, ready to insert."""
    key = value["idempotency_key"]
    payload = _json_bytes("state", value["state"])
    if len(payload) > HARD_MAX_PAYLOAD_BYTES:
        raise SnapshotValidationError(
            f"state serializes to {len(payload)} bytes; the most any store holds is "
            f"{HARD_MAX_PAYLOAD_BYTES}"
        )
    return {
        "tenant": _tenant(value["tenant"]),
        "namespace": valid_identifier("namespace", value["namespace"], MAX_SCOPE_LENGTH),
        "user_id": valid_identifier("user_id", value["user_id"], MAX_USER_ID_LENGTH),
        "version": check_int("version", value["version"], minimum=1, maximum=_MAX_BIGINT),
        "schema_version": check_int(
            "schema_version", value["schema_version"], minimum=1, maximum=_MAX_INTEGER
        ),
        "payload": payload,
        "created_at": _moment("created_at", value["created_at"]),
        "idempotency_key": None
        if key is None
        else valid_identifier("idempotency_key", key, MAX_IDEMPOTENCY_KEY_LENGTH),
        "actor": valid_actor(value["actor"]),
        "reason": valid_reason(value["reason"]),
        "metadata": encode_metadata(value["metadata"]),
    }


def _receipt_row(value: dict[str, Any]) -> dict[str, Any]:
    columns = erasure_receipts_table.c
    return {
        "subject": valid_identifier("subject", value["subject"], _length(columns.subject)),
        "tenant": _tenant(value["tenant"]),
        "namespace": valid_identifier("namespace", value["namespace"], MAX_SCOPE_LENGTH),
        "erased_at": _moment("erased_at", value["erased_at"]),
        "versions_erased": check_int(
            "versions_erased", value["versions_erased"], minimum=0, maximum=_MAX_BIGINT
        ),
        "cause": valid_identifier("cause", value["cause"], _length(columns.cause)),
    }


def _length(column: Any) -> int:
    """The declared length of a VARCHAR column: the longest value it takes."""
    length = getattr(column.type, "length", None)
    assert isinstance(length, int), f"{column.name} has no declared length"
    return length


def _tenant(value: object) -> str:
    return "" if value == "" else valid_identifier("tenant", value, MAX_SCOPE_LENGTH)


def _json_bytes(name: str, value: Any) -> bytes:
    try:
        return to_json(value)
    except ValueError as exc:  # PydanticSerializationError is a ValueError
        raise SnapshotValidationError(f"{name} cannot be stored as JSON: {exc}") from None


def _moment(name: str, value: object) -> datetime:
    if not isinstance(value, str):
        raise SnapshotValidationError(
            f"{name} must be an ISO 8601 string, not {type(value).__name__}"
        )
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise SnapshotValidationError(f"{name} {value!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise SnapshotValidationError(f"{name} {value!r} has no UTC offset")
    return moment.astimezone(UTC)


def _checked(number: int, check: Callable[[], _ResultT]) -> _ResultT:
    """Run a validation, prefixing its error with the line number."""
    try:
        return check()
    except SnapshotValidationError as exc:
        raise SnapshotValidationError(f"line {number} of the dump: {exc}") from None


# --- load: writing ----------------------------------------------------------------


@dataclass
class _Pending:
    """The newest line read so far of the user being read: their latest row, if none follows."""

    number: int
    row: dict[str, Any]
    expires_at: datetime | None


@dataclass
class _Loader:
    """Validated rows in, batched inserts out, inside the load's one transaction."""

    conn: AsyncConnection
    batch_size: int
    progress: Progress | None
    rows: int = 0
    receipts: int = 0
    _history: list[dict[str, Any]] = field(default_factory=list)
    _latest: list[dict[str, Any]] = field(default_factory=list)
    _lines: list[int] = field(default_factory=list)
    _receipts: list[dict[str, Any]] = field(default_factory=list)
    _pending: _Pending | None = None

    async def add_row(self, number: int, value: Any) -> None:
        value = _fields(number, value, _ROW_FIELDS, "the line")
        row = _checked(number, lambda: _history_row(value))
        expires_at = _checked(number, lambda: _expiry(value["expires_at"]))
        pending = self._pending
        if pending is not None and all(pending.row[k] == row[k] for k in _KEY[:3]):
            if row["version"] <= pending.row["version"]:
                raise SnapshotValidationError(
                    f"line {number} of the dump: version {row['version']} follows version "
                    f"{pending.row['version']} of the same user (line {pending.number}); "
                    "a user's versions must be consecutive lines in ascending order"
                )
            if pending.expires_at is not None:
                raise SnapshotValidationError(
                    f"line {pending.number} of the dump: expires_at is set on a version "
                    f"that is not the user's latest (line {number} has a newer one)"
                )
        elif pending is not None:
            self._add_latest(pending)
        self._pending = _Pending(number, row, expires_at)
        self._history.append(row)
        self._lines.append(number)
        if len(self._history) >= self.batch_size:
            await self._flush_rows()

    async def add_receipt(self, number: int, value: dict[str, Any]) -> None:
        value = _fields(number, value, frozenset({"receipt"}), "the line")
        receipt = _fields(number, value["receipt"], frozenset(_RECEIPT_COLUMNS), "the receipt")
        self._receipts.append(_checked(number, lambda: _receipt_row(receipt)))
        if len(self._receipts) >= self.batch_size:
            await self._flush_receipts()

    async def finish(self) -> None:
        if self._pending is not None:
            self._add_latest(self._pending)
            self._pending = None
        await self._flush_rows()
        await self._flush_receipts()

    def _add_latest(self, pending: _Pending) -> None:
        self._latest.append({**pending.row, "expires_at": pending.expires_at})
        self._lines.append(pending.number)

    async def _flush_rows(self) -> None:
        """Insert the batch's history rows and the latest rows of the users it completed.

        At the end the batch may hold only a latest row: the last user's, whose
        last version went out with the previous (full) batch.
        """
        if not self._history and not self._latest:
            return
        first, last = min(self._lines), max(self._lines)
        async with storage_errors(f"load (the rows of lines {first} to {last})"):
            if self._history:
                await self.conn.execute(insert(history_table), self._history)
            if self._latest:
                await self.conn.execute(insert(latest_table), self._latest)
        if self._history:
            self.rows += len(self._history)
            if self.progress is not None:
                self.progress(self.rows)
        self._history, self._latest, self._lines = [], [], []

    async def _flush_receipts(self) -> None:
        if not self._receipts:
            return
        async with storage_errors("load (erasure receipts)"):
            await self.conn.execute(insert(erasure_receipts_table), self._receipts)
        self.receipts += len(self._receipts)
        self._receipts = []


def _expiry(value: object) -> datetime | None:
    return None if value is None else _moment("expires_at", value)


@asynccontextmanager
async def _write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One write transaction: committed if the block succeeds, rolled back otherwise.

    Only the database calls here are translated into `StorageError`: an
    error of the block (a bad line, a failed read of the input) passes
    through as it is, after the rollback.
    """
    _configure(engine)
    async with AsyncExitStack() as stack:
        async with storage_errors("load"):
            conn = await stack.enter_async_context(engine.connect())
            # SQLite: BEGIN IMMEDIATE, so that the emptiness check and the load
            # are one critical section against other writers.
            await conn.execution_options(**{WRITE_TRANSACTION: True})
            transaction = await conn.begin()
            if engine.dialect.name == "postgresql":
                # Writers wait for the load; readers see the empty tables until it commits.
                names = ", ".join(table.name for table in _TABLES)
                await conn.execute(text(f"LOCK TABLE {names} IN EXCLUSIVE MODE"))
        try:
            yield conn
        except BaseException:
            async with storage_errors("load (rollback)"):
                await transaction.rollback()
            raise
        async with storage_errors("load (commit)"):
            await transaction.commit()


async def _require_empty(conn: AsyncConnection) -> None:
    async with storage_errors("load"):
        for table in _TABLES:
            found = await conn.scalar(select(literal(1)).select_from(table).limit(1))
            if found is not None:
                raise ConfigurationError(
                    f"load needs an empty database, but {table.name} has rows: nothing was loaded"
                )


# --- both ---------------------------------------------------------------------


def _configure(engine: AsyncEngine) -> None:
    """SQLite: this library's transaction handling (an explicit BEGIN), as the repository sets it.

    Without it, sqlite3 would run the dump's SELECTs outside a transaction,
    each seeing a different state of the database.
    """
    if engine.dialect.name == "sqlite":
        install_sqlite_settings(engine, EngineSettings())


async def _require_head(engine: AsyncEngine, operation: str) -> str:
    """The database's schema revision if it is this package's head, else SchemaNotReadyError.

    A missing SQLite file is reported, not created.
    """
    head = migrate.head_revision()
    database = engine.url.database
    on_disk = engine.dialect.name == "sqlite" and database not in (None, "", ":memory:")
    if on_disk and not await asyncio.to_thread(Path(str(database)).exists):
        raise SchemaNotReadyError(f"{operation}: SQLite database file {database} does not exist")
    async with storage_errors(operation):
        revision = await migrate.current_revision(engine)
    if revision != head:
        raise SchemaNotReadyError(
            f"{operation} needs the database at schema revision {head}, but it is at "
            f"{revision or 'none (never migrated)'}: run `snapshot-repo migrate` first"
        )
    return head
