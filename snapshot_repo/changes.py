"""Change notifications: the durable feed's types and cursors, and live listeners.

Two ways to follow changes (seeds 003 and 004):

- `changes_since(cursor)` reads the durable feed: ordered, complete,
  resumable after a consumer was down. Use it for anything that must not
  miss a change.
- `subscribe(callback)` / `changes()` deliver live notifications after
  commit, never before and never for a rolled-back write: this process's
  changes always; on Postgres also those of other processes whose
  repositories set `notify=True` (LISTEN/NOTIFY). SQLite has no
  cross-process notification. Live delivery is best effort (a slow
  consumer's queue drops its oldest entries, a dropped LISTEN connection
  loses what was sent meanwhile): catch up with `changes_since`.

The durable feed keeps every entry unless the repository trims it
(`trim_changes`, or `feed_retention` with `prune_history`/`reap_expired`):
a consumer that must not lose entries says where it is with
`acknowledge_changes`, and a cursor before the trimmed horizon raises
`CursorExpiredError` rather than skip anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, JsonValue
from sqlalchemy.ext.asyncio import AsyncEngine

from .backends.statements import NOTIFY_CHANNEL
from .errors import SnapshotValidationError, redact

__all__ = [
    "NOTIFY_CHANNEL",
    "Change",
    "ChangeCallback",
    "ChangeHub",
    "ChangePage",
    "ChangeStream",
    "FeedConsumer",
    "Subscription",
    "decode_cursor",
    "encode_cursor",
    "hub_for",
]

_CLOSE_SECONDS = 3.0

logger = logging.getLogger("snapshot_repo")


class Change(BaseModel):
    """One committed write or erasure of a user's state. Never carries the state itself.

    Attributes:
        seq: the entry's position in the global feed sequence (None in live
            notifications: they are sent before the feed row has its number).
        tenant: the tenant ("" for none) and namespace the change happened in.
        namespace: see `tenant`.
        user_id: whose state changed. For an erasure, not the user id, which the
            erasure must not leave behind: the erasure receipt's subject (an
            HMAC-SHA256 of the id under the repository's `erasure_key`, see
            `SnapshotRepository.erasure_subject`), or "" without a key.
        version: the version written; for an erasure, the last version erased.
        kind: "write" or "erase".
        created_at: when (absent from notifications of other processes).
        actor: the write's actor, if any (feed reads only).
        reason: the write's reason, if any (feed reads only).
        metadata: the write's metadata, if any (feed reads only).
    """

    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    seq: int | None = None
    tenant: str
    namespace: str
    user_id: str
    version: int
    kind: Literal["write", "erase"]
    created_at: datetime | None = None
    actor: str | None = None
    reason: str | None = None
    metadata: dict[str, JsonValue] | None = None

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, redact(value) if name == "user_id" else value


class ChangePage(BaseModel):
    """A page of the durable feed and the cursor to pass next time.

    Attributes:
        changes: the entries, oldest first.
        cursor: opaque; pass it to `changes_since` to continue after this page
            (it equals the cursor passed in when the page is empty).
    """

    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    changes: list[Change]
    cursor: str


class FeedConsumer(BaseModel):
    """A registered consumer of a scope's change feed (see `acknowledge_changes`).

    Attributes:
        name: the name it registered under.
        cursor: the position it acknowledged; trimming keeps every entry after it.
        acknowledged_at: when it last moved forward (or registered).
    """

    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    name: str
    cursor: str
    acknowledged_at: datetime


_CURSOR_PREFIX = "v1"


def encode_cursor(txid: int, seq: int) -> str:
    """An opaque cursor after the feed entry (txid, seq); SQLite entries have txid 0."""
    return f"{_CURSOR_PREFIX}.{txid}.{seq}"


def decode_cursor(cursor: str | None) -> tuple[int, int]:
    """(txid, seq) from a cursor made by `encode_cursor`; (0, 0) for the feed's start.

    Raises:
        SnapshotValidationError: not a cursor this library made.
    """
    if cursor is None or cursor == "":
        return 0, 0
    if isinstance(cursor, str):
        parts = cursor.split(".")
        if len(parts) == 3 and parts[0] == _CURSOR_PREFIX and all(p.isdigit() for p in parts[1:]):
            return int(parts[1]), int(parts[2])
    raise SnapshotValidationError(f"not a change feed cursor: {cursor!r}")


ChangeCallback = Callable[[Change], Awaitable[None] | None]
"""A listener: a function or coroutine function taking a `Change`."""


@dataclass(eq=False)
class Subscription:
    """A live listener; `close()` (or leaving `with`) stops delivery to it."""

    hub: ChangeHub
    tenant: str
    namespace: str
    callback: ChangeCallback

    def close(self) -> None:
        self.hub.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class ChangeHub:
    """Fans committed changes out to the listeners of one engine (one database).

    On Postgres it holds one pooled connection in LISTEN while it has
    listeners, and re-listens after that connection is lost; on SQLite the
    repository publishes its own commits to it.
    """

    def __init__(self, engine: AsyncEngine, *, listens: bool) -> None:
        self._engine = engine
        self._listens = listens
        self._subscriptions: list[Subscription] = []
        self._listener: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def listens_to_database(self) -> bool:
        """Whether the hub also LISTENs for other processes' changes (the backend
        `notifies`: Postgres)."""
        return self._listens

    async def subscribe(
        self, tenant: str, namespace: str, callback: ChangeCallback
    ) -> Subscription:
        """Deliver the scope's changes to `callback` from now on (LISTEN is active on return)."""
        subscription = Subscription(self, tenant, namespace, callback)
        self._subscriptions.append(subscription)
        if self.listens_to_database:
            if self._listener is None:
                self._ready = asyncio.get_running_loop().create_future()
                self._listener = asyncio.create_task(self._listen(self._ready))
            try:
                # A later subscriber waits for the same LISTEN as the first one.
                assert self._ready is not None
                await asyncio.shield(self._ready)
            except BaseException:
                self.unsubscribe(subscription)
                raise
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(subscription)
        if not self._subscriptions and self._listener is not None:
            self._listener.cancel()
            self._listener = None

    def listens_to(self, tenant: str, namespace: str) -> bool:
        """Whether any listener of this process wants changes of the scope."""
        return any(
            (subscription.tenant, subscription.namespace) == (tenant, namespace)
            for subscription in self._subscriptions
        )

    def publish(self, change: Change) -> None:
        """Deliver `change` to the listeners of its scope (called after commit)."""
        for subscription in list(self._subscriptions):
            if (subscription.tenant, subscription.namespace) != (change.tenant, change.namespace):
                continue
            try:
                outcome = subscription.callback(change)
            except Exception:
                logger.exception("snapshot_repo change listener failed")
                continue
            if inspect.isawaitable(outcome):
                task = asyncio.ensure_future(self._await_listener(outcome))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop listening and drop every listener, within a few seconds whatever the server does."""
        self._subscriptions.clear()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(_CLOSE_SECONDS):
                    await self._listener
            self._listener = None

    @staticmethod
    async def _await_listener(outcome: Awaitable[None]) -> None:
        try:
            await outcome
        except Exception:
            logger.exception("snapshot_repo change listener failed")

    async def _listen(self, ready: asyncio.Future[None]) -> None:
        """Hold the database's LISTEN connection (`backends.postgres_listen`)."""
        from .backends.postgres_listen import listen

        await listen(self._engine, self._on_notify, ready)

    def _on_notify(self, payload: str) -> None:
        try:
            change = Change.model_validate(json.loads(payload))
        except ValueError:
            logger.warning("snapshot_repo ignored a malformed change notification")
            return
        self.publish(change)


_HUB_ATTRIBUTE = "_snapshot_repo_change_hub"


def hub_for(engine: AsyncEngine, *, create: bool = True, listens: bool = False) -> ChangeHub | None:
    """The one hub of `engine`'s database, shared by every repository and view on it.

    Stored on the engine itself, so it lives and dies with it. With
    `create=False`, None when no hub was made yet. A new hub LISTENs to the
    database when `listens` (its backend `notifies`).
    """
    hub: ChangeHub | None = getattr(engine.sync_engine, _HUB_ATTRIBUTE, None)
    if hub is None and create:
        hub = ChangeHub(engine, listens=listens)
        setattr(engine.sync_engine, _HUB_ATTRIBUTE, hub)
    return hub


class ChangeStream:
    """Live changes of one scope, as an async iterator.

    `async with repo.changes() as stream:` registers the listener on entry
    (on Postgres, once LISTEN is active), so nothing committed after the
    `with` line is missed; `async for change in repo.changes():` also works
    and registers at the first iteration. A consumer that falls more than
    `max_queued` changes behind loses the oldest (live delivery is best
    effort; catch up with `changes_since`).
    """

    def __init__(self, hub: ChangeHub, tenant: str, namespace: str, max_queued: int) -> None:
        self._hub = hub
        self._tenant = tenant
        self._namespace = namespace
        self._queue: asyncio.Queue[Change] = asyncio.Queue(maxsize=max_queued)
        self._subscription: Subscription | None = None

    async def open(self) -> None:
        """Start listening (idempotent)."""
        if self._subscription is None:
            self._subscription = await self._hub.subscribe(
                self._tenant, self._namespace, self._enqueue
            )

    async def aclose(self) -> None:
        """Stop listening."""
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    async def __aenter__(self) -> ChangeStream:
        await self.open()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> ChangeStream:
        return self

    async def __anext__(self) -> Change:
        await self.open()
        return await self._queue.get()

    def _enqueue(self, change: Change) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            logger.warning("snapshot_repo change queue full; dropped the oldest change")
        self._queue.put_nowait(change)
