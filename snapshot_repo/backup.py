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

`snapshot_latest` is not dumped: every write path (`backends.statements`, `backends`)
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
import logging
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Mapping
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

from pydantic_core import to_json
from sqlalchemy import Select, literal, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import migrate
from ._checks import MAX_BATCH_SIZE, check_int
from ._dump_format import (
    COLUMNS,
    DUMP_FORMAT,
    DUMP_FORMAT_VERSION,
    KEY,
    RECEIPT_COLUMNS,
    Progress,
    check_utf8,
)
from ._dump_lines import escape_line_breaks, receipt_line, row_line, timestamp, writer
from ._load_lines import check_end, check_header, numbered, parse
from ._loader import Loader
from ._translate import storage_errors
from .backends import bulk_transfer
from .errors import (
    ConfigurationError,
    SchemaNotReadyError,
    SnapshotValidationError,
    StorageError,
)
from .tables import changes_table, erasure_receipts_table, history_table, latest_table

logger = logging.getLogger("snapshot_repo")

__all__ = ["DEFAULT_BATCH_SIZE", "DUMP_FORMAT", "DUMP_FORMAT_VERSION", "Progress", "dump", "load"]

DEFAULT_BATCH_SIZE: Final = 1000
"""Rows per query (dump) or per insert (load): bounded memory, few round trips."""

_TABLES: Final = (latest_table, history_table, changes_table, erasure_receipts_table)


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
    write = writer(out)
    revision = await _require_head(engine, "dump")
    header = {
        "format": DUMP_FORMAT,
        "version": DUMP_FORMAT_VERSION,
        "schema_revision": revision,
        "dialect": engine.dialect.name,
        "dumped_at": timestamp(datetime.now(UTC)),
    }
    write(to_json(header) + b"\n")
    rows = receipts = 0
    # The batches come from a generator so that only database failures turn
    # into StorageError; a failed write to `out` stays the OSError it is.
    async with aclosing(_batches(engine, batch_size)) as batches:
        async for kind, batch in batches:
            if kind == "rows":
                write(escape_line_breaks(b"".join(map(row_line, batch))))
                rows += len(batch)
                if progress is not None:
                    progress(rows)
            else:
                write(b"".join(map(receipt_line, batch)))
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
    check_utf8(lines, "load reads")
    await _require_head(engine, "load")
    async with aclosing(numbered(lines)) as numbered_lines:
        check_header(await anext(numbered_lines, None))
        async with _write_transaction(engine) as conn:
            await _require_empty(conn)
            loader = Loader(conn, batch_size, progress)
            end: tuple[int, Mapping[str, Any]] | None = None
            async for number, line in numbered_lines:
                value = parse(number, line)
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
            check_end(end, loader.rows, loader.receipts)
    try:  # the load has committed: a failure here must not report it as failed
        async with storage_errors("load (analyze)"):
            await bulk_transfer.analyze(engine, _TABLES)
    except StorageError as exc:
        logger.warning("snapshot_repo: ANALYZE after a load failed (the load stands): %s", exc)
    return loader.rows


# --- dump: reading the store --------------------------------------------------


async def _batches(
    engine: AsyncEngine, batch_size: int
) -> AsyncGenerator[tuple[str, list[Any]], None]:
    """("rows", batch) for all history, then ("receipts", batch): one snapshot, keyset pages."""
    bulk_transfer.prepare(engine)
    async with storage_errors("dump"), engine.connect() as conn:
        await conn.execution_options(**bulk_transfer.dump_options(engine))
        async with conn.begin():
            after: tuple[Any, ...] | None = None
            while rows := list((await conn.execute(_rows_page(after, batch_size))).all()):
                yield "rows", rows
                if len(rows) < batch_size:
                    break
                after = tuple(getattr(rows[-1], name) for name in KEY)
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
    key = [history_table.c[name] for name in KEY]
    expires_at = (
        select(latest_table.c.expires_at)
        .where(*(latest_table.c[name] == history_table.c[name] for name in KEY))
        .scalar_subquery()
        .label("expires_at")
    )
    statement = (
        select(*(history_table.c[name] for name in COLUMNS), expires_at).order_by(*key).limit(limit)
    )
    if after is None:
        return statement
    bound = [literal(value, column.type) for value, column in zip(after, key, strict=True)]
    return statement.where(tuple_(*key) > tuple_(*bound))


def _receipts_page(after_id: int | None, limit: int) -> Select[Any]:
    table = erasure_receipts_table
    statement = (
        select(*(table.c[name] for name in RECEIPT_COLUMNS), table.c.id)
        .order_by(table.c.id)
        .limit(limit)
    )
    return statement if after_id is None else statement.where(table.c.id > after_id)


# --- load: the transaction ----------------------------------------------------


@asynccontextmanager
async def _write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One write transaction: committed if the block succeeds, rolled back otherwise.

    Only the database calls here are translated into `StorageError`: an
    error of the block (a bad line, a failed read of the input) passes
    through as it is, after the rollback.
    """
    bulk_transfer.prepare(engine)
    async with AsyncExitStack() as stack:
        async with storage_errors("load"):
            conn = await stack.enter_async_context(engine.connect())
            await conn.execution_options(**bulk_transfer.load_options(engine))
            transaction = await conn.begin()
            # Writers wait for the load; readers see the empty tables until it commits.
            await bulk_transfer.exclude_writers(conn, _TABLES)
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


async def _require_head(engine: AsyncEngine, operation: str) -> str:
    """The database's schema revision if it is this package's head, else SchemaNotReadyError.

    A missing SQLite file is reported, not created.
    """
    head = migrate.head_revision()
    database = bulk_transfer.database_file(engine)
    if database is not None and not await asyncio.to_thread(Path(database).exists):
        raise SchemaNotReadyError(f"{operation}: SQLite database file {database} does not exist")
    async with storage_errors(operation):
        revision = await migrate.current_revision(engine)
    if revision != head:
        raise SchemaNotReadyError(
            f"{operation} needs the database at schema revision {head}, but it is at "
            f"{revision or 'none (never migrated)'}: run `snapshot-repo migrate` first"
        )
    return head
