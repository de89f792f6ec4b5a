"""The change feed of a repository's scope: durable catch-up reads and live listeners.

Methods of `SnapshotRepository` (its class assigns them), taking the repository as `self`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _feed_retention
from ._checks import check_int
from ._telemetry import traced
from .backends import row_decoder
from .backends.feed_sql import CHANGE_FEED_COLUMNS
from .changes import (
    ChangeCallback,
    ChangePage,
    ChangeStream,
    Subscription,
    decode_cursor,
    encode_cursor,
    hub_for,
)
from .codec import decode_metadata
from .tables import changes_table

if TYPE_CHECKING:
    from .repository import SnapshotRepository

__all__ = ["MAX_FEED_PAGE", "changes", "changes_since", "subscribe"]

MAX_FEED_PAGE = 10_000
_LIVE_QUEUE = 10_000
_START_ATTEMPTS = 3
"""Reads of a page from the feed's start while trims keep moving it, before giving up."""


@traced
async def changes_since(
    self: SnapshotRepository[Any], cursor: str | None = None, limit: int = 100
) -> ChangePage:
    """Committed changes after `cursor`, oldest first (seed 004's `transitions_since`).

    Start with `cursor=None`; pass each page's `cursor` to the next call.
    A consumer that was down resumes where it stopped and misses nothing
    that is still in the feed. Erased users' earlier writes leave the feed
    with their data; their erasure remains as one `erase` entry. Entries
    trimmed by retention (`trim_changes`) are gone: a cursor from before
    them raises `CursorExpiredError`, never a page that skips them, and
    `cursor=None` starts after them. Register with `acknowledge_changes`
    so that trimming waits for you.

    Raises:
        SnapshotValidationError: a cursor this library did not make, or
            `limit` outside 1 to 10,000.
        CursorExpiredError: the feed was trimmed past an entry after `cursor`.
        StorageError: the database failed.
    """
    # The page is checked against the scope's trim horizon, read after it: a trim
    # that committed before the page was read is seen there, so a cursor it passed
    # raises `CursorExpiredError` instead of returning a page with a gap. Without a
    # cursor the page starts at the horizon, read again after the page until no
    # trim moved it meanwhile.
    context = self._context
    after = decode_cursor(cursor)
    check_int("limit", limit, minimum=1, maximum=MAX_FEED_PAGE)
    scope = {"tenant": context.scope.tenant, "namespace": context.scope.namespace}
    start = after
    async with context.guard("changes_since", None):
        for attempt in range(_START_ATTEMPTS):
            if cursor is None or cursor == "":
                start = await _feed_retention.horizon(context, scope) or (0, 0)
            params = {**scope, "after_txid": start[0], "after_seq": start[1], "limit": limit}
            raw_rows = await context.read(context.backend.feed_page, params)
            trimmed = await _feed_retention.horizon(context, scope)
            if cursor or trimmed is None or trimmed <= start:
                break
            if attempt == _START_ATTEMPTS - 1:  # trims kept passing the start: report it
                _feed_retention.check_cursor(encode_cursor(*start), start, trimmed)
    if cursor:
        _feed_retention.check_cursor(cursor, after, trimmed)
    decode = row_decoder(
        context.engine.dialect, [changes_table.c[name] for name in CHANGE_FEED_COLUMNS]
    )
    page = []
    next_cursor = cursor or encode_cursor(*start)
    for raw in raw_rows:
        seq, txid, user_id, version, kind, created_at, actor, reason, metadata = decode(raw)
        page.append(
            context.scoped_change(
                seq=seq,
                user_id=user_id,
                version=version,
                kind=kind,
                created_at=created_at,
                actor=actor,
                reason=reason,
                metadata=decode_metadata(metadata),
            )
        )
        next_cursor = encode_cursor(txid or 0, seq)
    return ChangePage(changes=page, cursor=next_cursor)


@traced
async def subscribe(self: SnapshotRepository[Any], callback: ChangeCallback) -> Subscription:
    """Call `callback(change)` after each committed write or erasure in this scope.

    `callback` may be a function or a coroutine function; its errors are
    logged, never raised into writers. Changes made through repositories
    of this process arrive; on Postgres, so do those of other processes
    whose repositories have `notify=True` (LISTEN/NOTIFY; one pooled
    connection is held while anyone listens).
    Close the returned subscription to stop.

    Raises:
        ConfigurationError: the engine is behind a transaction pooler
            (`EngineSettings.transaction_pooler`), which cannot carry LISTEN;
            `changes()` raises it too, on entering.
    """
    context = self._context
    hub = hub_for(context.engine, listens=context.backend.notifies)
    assert hub is not None
    async with context.guard("subscribe", None):
        return await hub.subscribe(context.scope.tenant, context.scope.namespace, callback)


def changes(self: SnapshotRepository[Any]) -> ChangeStream:
    """Live changes of this scope: `async with repo.changes() as stream: async for ...`.

    Delivery is best effort (see `ChangeStream`); pair it with
    `changes_since` where nothing may be missed.
    """
    context = self._context
    hub = hub_for(context.engine, listens=context.backend.notifies)
    assert hub is not None
    return ChangeStream(hub, context.scope.tenant, context.scope.namespace, _LIVE_QUEUE)
