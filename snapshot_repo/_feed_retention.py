"""Change-feed retention: trimming by age, bounded by the consumers that say where they are.

A scope's feed is trimmed from its start: the entries older than the age
bound, up to the lowest position any registered consumer acknowledged
(`acknowledge_changes`), in batches of one short transaction each. The
consumers win: an entry a registered consumer has not acknowledged is never
trimmed, however old; drop a consumer that is gone (`drop_feed_consumer`),
or its position holds the feed back for good. The scope's horizon
(`snapshot_feed_horizons`) records how far it was trimmed; a reader whose
cursor is before it gets `CursorExpiredError`, never a page that silently
skips what was trimmed (see `check_cursor`).

Ordering against acknowledgements: a trim batch locks the scope's horizon
row exclusively, then computes the new horizon from the consumers' positions
in a later statement; an acknowledgement share-locks the same row while it
stores its position. Whichever comes second sees the other: the trim the new
position (and stops before it), or the acknowledgement the new horizon (and
raises `CursorExpiredError` if its cursor is behind it). Only entries every
reader could already see are trimmed (on Postgres those of transactions older
than every running one, on MySQL read under the feed gate), so no entry can
commit behind the horizon later.

`acknowledge_changes`, `drop_feed_consumer`, `feed_consumers` and
`trim_changes` are methods of `SnapshotRepository` (its class assigns them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ._checks import check_int, valid_identifier
from ._context import RepositoryContext
from .backends import row_decoder
from .backends.feed_sql import (
    RetentionStatements,
    advance_consumer_statement,
    advance_horizon_statement,
    consumers_statement,
    drop_consumer_statement,
    floor_statement,
    horizon_statement,
    lock_horizon_statement,
    next_tenant_statement,
    retention_statements,
)
from .changes import FeedConsumer, decode_cursor, encode_cursor
from .errors import CursorExpiredError, SnapshotValidationError
from .snapshot import MAX_SCOPE_LENGTH
from .tables import changes_table, feed_consumers_table

if TYPE_CHECKING:
    from .repository import SnapshotRepository

__all__ = [
    "DEFAULT_TRIM_BATCH",
    "acknowledge_changes",
    "check_cursor",
    "drop_feed_consumer",
    "feed_consumers",
    "horizon",
    "trim_changes",
    "trim_configured",
]

DEFAULT_TRIM_BATCH = 1_000
"""Entries trimmed per transaction: each batch holds its locks (on MySQL, the feed gate
while its page is read) for one short transaction, however long the feed."""

Position = tuple[int, int]
"""A feed position as in a cursor: (txid, seq), txid 0 outside Postgres."""


def _statements(context: RepositoryContext[Any]) -> RetentionStatements:
    return retention_statements(context.engine.dialect.name)


def _scope(context: RepositoryContext[Any], tenant: str | None = None) -> dict[str, Any]:
    return {
        "tenant": context.scope.tenant if tenant is None else tenant,
        "namespace": context.scope.namespace,
    }


async def horizon(context: RepositoryContext[Any], scope: dict[str, Any]) -> Position | None:
    """The scope's trim horizon; None when it never had one (nothing was trimmed)."""
    rows = await context.read(context.backend.fetch, horizon_statement(), scope)
    return None if not rows else (int(rows[0][0]), int(rows[0][1]))


def check_cursor(cursor: str, after: Position, trimmed: Position | None) -> None:
    """Raise `CursorExpiredError` when `after` (read from `cursor`) is before the horizon."""
    if trimmed is not None and after < trimmed:
        raise CursorExpiredError(cursor, encode_cursor(*trimmed))


async def _claim_horizon(context: RepositoryContext[Any], scope: dict[str, Any]) -> Position:
    """The scope's horizon, made (at position 0) if the scope has none yet."""
    found = await horizon(context, scope)
    if found is not None:
        return found
    claim = _statements(context).claim_horizon
    await context.backend.execute_in_transaction([(claim, {**scope, "now": datetime.now(UTC)})])
    return (0, 0)


async def acknowledge_changes(
    self: SnapshotRepository[Any], consumer: str, cursor: str | None
) -> None:
    """Record that `consumer` has processed this scope's feed up to `cursor`.

    Registers the consumer on first call. From then on trimming (see
    `trim_changes`) never removes an entry after its position, however
    old: a registered consumer never loses an entry, and one that stops
    acknowledging holds the feed back until `drop_feed_consumer`. The
    position only moves forward: an older cursor leaves it (drop, then
    acknowledge, to rewind). Pass a `ChangePage.cursor` once its changes are
    processed; `None` registers at the feed's start.

    Raises:
        SnapshotValidationError: a bad consumer name (1 to 255 characters)
            or a cursor this library did not make.
        CursorExpiredError: `cursor` is before the trimmed horizon (entries
            after it are gone); the consumer is registered at it all the same.
        StorageError: the database failed.
    """
    context = self._context
    consumer = valid_identifier("consumer", consumer, MAX_SCOPE_LENGTH)
    txid, seq = decode_cursor(cursor)
    shown = cursor or encode_cursor(0, 0)
    scope = _scope(context)
    params = {**scope, "consumer": consumer, "new_txid": txid, "new_seq": seq}
    async with context.guard("acknowledge_changes", None):
        check_cursor(shown, (txid, seq), await _claim_horizon(context, scope))
        params["now"] = datetime.now(UTC)
        await context.backend.execute_in_transaction(
            [
                (lock_horizon_statement(exclusive=False), scope),
                (_statements(context).claim_consumer, params),
                (advance_consumer_statement(), params),
            ]
        )
        # A trim that locked the horizon first committed before this statement: see it.
        trimmed = await horizon(context, scope)
    check_cursor(shown, (txid, seq), trimmed)


async def drop_feed_consumer(self: SnapshotRepository[Any], consumer: str) -> bool:
    """Forget a registered consumer, so trimming no longer waits for it.

    Returns:
        Whether it was registered.
    """
    context = self._context
    consumer = valid_identifier("consumer", consumer, MAX_SCOPE_LENGTH)
    params = {**_scope(context), "consumer": consumer}
    async with context.guard("drop_feed_consumer", None):
        counts = await context.backend.execute_in_transaction([(drop_consumer_statement(), params)])
    return sum(counts) > 0


async def feed_consumers(self: SnapshotRepository[Any]) -> list[FeedConsumer]:
    """This scope's registered consumers and the positions they acknowledged, by name."""
    context = self._context
    async with context.guard("feed_consumers", None):
        rows = await context.read(context.backend.fetch, consumers_statement(), _scope(context))
    decode = row_decoder(
        context.engine.dialect,
        [
            feed_consumers_table.c[name]
            for name in ("consumer", "acked_txid", "acked_seq", "updated_at")
        ],
    )
    consumers = []
    for raw in rows:
        name, txid, seq, updated_at = decode(raw)
        consumers.append(
            FeedConsumer(
                name=name, cursor=encode_cursor(int(txid), int(seq)), acknowledged_at=updated_at
            )
        )
    return consumers


async def trim_configured(context: RepositoryContext[Any]) -> int:
    """Trim by the repository's `feed_retention`, if it has one (after `prune_history` and
    `reap_expired`); 0 otherwise."""
    if context.feed_retention is None:
        return 0
    return await _trim(context, context.feed_retention, DEFAULT_TRIM_BATCH)


async def _trim(
    context: RepositoryContext[Any], older_than: timedelta | None, batch_size: int
) -> int:
    """`trim_changes` on the repository's context."""
    if older_than is None:
        older_than = context.feed_retention
    if older_than is None:
        raise SnapshotValidationError(
            "trim_changes needs older_than, or a repository with feed_retention"
        )
    if not isinstance(older_than, timedelta) or older_than < timedelta(0):
        raise SnapshotValidationError("older_than must be a non-negative timedelta")
    check_int("batch_size", batch_size, minimum=1, maximum=10_000)
    cutoff = datetime.now(UTC) - older_than
    trimmed = 0
    async for tenant in _tenants(context):
        trimmed += await _trim_scope(context, _scope(context, tenant), cutoff, batch_size)
    return trimmed


async def _tenants(context: RepositoryContext[Any]) -> AsyncIterator[str]:
    """The scopes to trim: the view's tenant, or every tenant of the namespace with feed
    entries (in `snapshot_changes`, or carried by history rows of users it holds)."""
    if context.scope.tenant:
        yield context.scope.tenant
        return
    yield ""  # the repository's own, untenanted scope
    after = ""
    while True:
        found: list[str] = []
        for table in ("snapshot_changes", "snapshot_latest"):
            params = {"namespace": context.scope.namespace, "after_tenant": after}
            async with context.guard("trim_changes", None):
                rows = await context.read(
                    context.backend.fetch, next_tenant_statement(table), params
                )
            found.extend(row[0] for row in rows)
        if not found:
            return
        after = min(found)
        yield after


_PAGE_COLUMNS = ("seq", "txid", "created_at")


async def _trim_scope(
    context: RepositoryContext[Any], scope: dict[str, Any], cutoff: datetime, batch_size: int
) -> int:
    """Trim one scope's feed in batches; how many entries its horizon passed."""
    decode = row_decoder(context.engine.dialect, [changes_table.c[name] for name in _PAGE_COLUMNS])
    trim_work = [(_statements(context).trim, scope)]
    async with context.guard("trim_changes", None):
        current = await _claim_horizon(context, scope)
        # Entries below the horizon that came back since (Postgres: a pruned version's
        # entry moved from its history row) go first.
        await context.backend.execute_in_transaction(trim_work)
    trimmed = 0
    while True:
        params = {**scope, "after_txid": current[0], "after_seq": current[1], "limit": batch_size}
        async with context.guard("trim_changes", None):
            floor_rows = await context.read(context.backend.fetch, floor_statement(), scope)
            # What a reader sees after the horizon: on Postgres only entries of finished
            # transactions, on MySQL under the feed gate.
            page = await context.read(context.backend.feed_page, params)
        floor = None if not floor_rows else (int(floor_rows[0][0]), int(floor_rows[0][1]))
        passed: list[Position] = []
        for raw in page:
            # `feed_page` rows are `CHANGE_FEED_COLUMNS`: seq, txid, ..., created_at (6th).
            seq, txid, created_at = decode((raw[0], raw[1], raw[5]))
            position = (int(txid or 0), int(seq))
            if created_at >= cutoff or (floor is not None and position > floor):
                break
            passed.append(position)
        if not passed:
            return trimmed
        last = passed[-1]
        work = [
            (lock_horizon_statement(exclusive=True), scope),
            (
                advance_horizon_statement(),
                {**scope, "last_txid": last[0], "last_seq": last[1], "now": datetime.now(UTC)},
            ),
            *trim_work,
        ]
        async with context.guard("trim_changes", None):
            await context.backend.execute_in_transaction(work)
            # A consumer registered meanwhile may have held the horizon back.
            current = await horizon(context, scope) or current
        trimmed += sum(1 for position in passed if position <= current)
        if current < last or len(passed) < len(page) or len(page) < batch_size:
            return trimmed


async def trim_changes(
    self: SnapshotRepository[Any], *, older_than: timedelta | None = None, batch_size: int = 1_000
) -> int:
    """Delete change-feed entries older than `older_than` (default: `feed_retention`).

    Trims from the start of each scope's feed (every tenant of the
    namespace; one tenant via a tenant view) up to the first entry that
    is too young or that a registered consumer has not acknowledged
    (consumers win over the age bound), `batch_size` entries per
    transaction. A later `changes_since` from a cursor before what was
    trimmed raises `CursorExpiredError`; without a cursor it starts after
    it. `prune_history` and `reap_expired` run this too when the
    repository has `feed_retention`.

    Returns:
        How many feed entries were trimmed.

    Raises:
        SnapshotValidationError: no `older_than` and no `feed_retention`, a
            negative one, or `batch_size` outside 1 to 10,000.
        StorageError: the database failed.
    """
    return await _trim(self._context, older_than, batch_size)
