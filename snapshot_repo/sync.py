"""`SyncSnapshotRepository`: the repository for code that is not async (Flask, Django, scripts).

A sync repository runs one async `SnapshotRepository` on a background event
loop of its own: one daemon thread, started through anyio's blocking portal
(`anyio.from_thread.start_blocking_portal`). Each method hands its call to
that loop and blocks the calling thread until the call is done. Any number
of threads may share one sync repository: their calls run concurrently on
the loop, exactly as concurrent tasks on an async repository do (one pool,
one write queue on SQLite, the same timeouts and errors).

Where code runs:

- Repository calls run on the background loop while the calling thread
  waits, each in a copy of the calling thread's context variables, so an
  OpenTelemetry span or a request id current in the caller is current in
  the call. A wait interrupted in the calling thread (`KeyboardInterrupt`)
  cancels the call on the loop, which leaves its whole write or nothing, as
  a cancelled async call does.
- `subscribe` callbacks run in a worker thread (anyio's), one at a time per
  subscription, in the order the changes were published, so a callback may
  block and may call the repository. A coroutine function is awaited on the
  background loop instead.
- `progress` callbacks (`prune_history`, `reap_expired`, ...) run on the
  background loop's thread between batches: keep them quick (a counter, a
  log line). Calling the repository from there raises `RuntimeError`
  rather than deadlocking.

Calls after `close()` raise `RuntimeError`, and so do calls in a process forked
after the repository was made (its loop's thread is not in the child): make
one repository per process, after a pre-fork server (gunicorn, uWSGI) forked.
A repository a program never closed is closed when the interpreter exits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Generic, Literal, Self, Unpack, overload

from pydantic import JsonValue
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ._context import RepositoryOptions
from ._privacy import ErasureReceipt
from ._sync_changes import SyncChangeStream, SyncSubscription
from ._sync_loop import SyncLoop
from .backends.replicas import DEFAULT_MAX_REPLICA_LAG
from .changes import ChangeCallback, ChangePage, FeedConsumer
from .codec import JsonObject
from .engine import EngineSettings
from .health import HealthReport
from .patch import JsonPatchOperation
from .repository import SnapshotRepository
from .snapshot import Snapshot, StateT

__all__ = ["SyncChangeStream", "SyncSnapshotRepository", "SyncSubscription"]


class SyncSnapshotRepository(Generic[StateT]):
    """`SnapshotRepository` for code that is not async: the same methods, blocking.

    Every coroutine method of `SnapshotRepository` is a blocking method here,
    with the same parameters, results and errors (see its docstrings); its
    async iterators are plain iterators; `subscribe` returns a
    `SyncSubscription`, `changes` a `SyncChangeStream`. Calls run on one
    background event loop per repository (see the module docstring for
    where callbacks run), so the repository is thread-safe: share one per
    process, as you would an engine. Close it (`close()` or `with`), which
    closes the async repository and then stops the loop.

    Args:
        repository: the async repository to run, which this object then owns
            (`close()` closes it). It must not have been used on another event
            loop, since its pooled connections would belong to that loop: make
            it and hand it over unused. Usually `from_url` makes it instead.

    Raises:
        TypeError: `repository` is not a `SnapshotRepository`.
    """

    def __init__(self, repository: SnapshotRepository[StateT]) -> None:
        if not isinstance(repository, SnapshotRepository):
            raise TypeError(
                f"SyncSnapshotRepository runs a SnapshotRepository, not {type(repository).__name__}"
            )
        self._repository = repository
        self._loop = SyncLoop(repository.close)
        self._owns_loop = True

    @overload
    @classmethod
    def from_url(
        cls,
        url: str | URL,
        state_type: None = None,
        *,
        settings: EngineSettings | None = None,
        replicas: Sequence[str | URL] = (),
        max_replica_lag: float = DEFAULT_MAX_REPLICA_LAG,
        **options: Unpack[RepositoryOptions],
    ) -> SyncSnapshotRepository[JsonObject]: ...

    @overload
    @classmethod
    def from_url(
        cls,
        url: str | URL,
        state_type: type[StateT],
        *,
        settings: EngineSettings | None = None,
        replicas: Sequence[str | URL] = (),
        max_replica_lag: float = DEFAULT_MAX_REPLICA_LAG,
        **options: Unpack[RepositoryOptions],
    ) -> SyncSnapshotRepository[StateT]: ...

    @classmethod
    def from_url(
        cls,
        url: str | URL,
        state_type: type[Any] | None = None,
        *,
        settings: EngineSettings | None = None,
        replicas: Sequence[str | URL] = (),
        max_replica_lag: float = DEFAULT_MAX_REPLICA_LAG,
        **options: Unpack[RepositoryOptions],
    ) -> SyncSnapshotRepository[Any]:
        """A sync repository owning an engine made from `url` (as `SnapshotRepository.from_url`).

        Starts the background loop's thread; connects to nothing yet.

        Raises:
            ConfigurationError: the URL or a setting is invalid (no thread is left running).
        """
        repository: SnapshotRepository[Any] = SnapshotRepository.from_url(
            url,
            state_type,
            settings=settings,
            replicas=replicas,
            max_replica_lag=max_replica_lag,
            **options,
        )
        return cls(repository)

    # --- configuration ---------------------------------------------------------------

    @property
    def engine(self) -> AsyncEngine:
        """The async engine, which belongs to the background loop: do not use it elsewhere."""
        return self._repository.engine

    @property
    def state_type(self) -> Any:
        """The type states are validated against (`JsonObject` for a repository without one)."""
        return self._repository.state_type

    @property
    def namespace(self) -> str:
        """Which of a user's states this repository holds."""
        return self._repository.namespace

    @property
    def tenant(self) -> str | None:
        """The tenant this view is confined to; None for the repository itself."""
        return self._repository.tenant

    @property
    def purge_label(self) -> str:
        """What `purge_all(confirm=...)` expects: "namespace" or "tenant/namespace"."""
        return self._repository.purge_label

    def for_tenant(self, tenant: str) -> Self:
        """A view confined to `tenant` (see `SnapshotRepository.for_tenant`) on the same loop.

        Closing the view does nothing; closing this repository closes the view too.

        Raises:
            ConfigurationError: `tenant` is not 1 to 255 characters without
                control characters.
        """
        view = object.__new__(type(self))
        view._repository = self._repository.for_tenant(tenant)
        view._loop = self._loop
        view._owns_loop = False
        return view

    # --- the core contract -----------------------------------------------------------

    def upsert_latest(
        self,
        snapshot: Snapshot[StateT] | Snapshot[Any],
        *,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
        actor: str | None = None,
        reason: str | None = None,
        metadata: JsonObject | None = None,
        ttl: timedelta | None = None,
    ) -> Snapshot[StateT]:
        """Store `snapshot` as the user's next version (see `SnapshotRepository.upsert_latest`).

        Raises:
            SnapshotValidationError: bad input; nothing was written.
            VersionConflictError: `expected_version` did not match; nothing was written.
            StorageError: the database failed or the operation timed out.
        """
        return self._loop.call(
            lambda: self._repository.upsert_latest(
                snapshot,
                expected_version=expected_version,
                idempotency_key=idempotency_key,
                actor=actor,
                reason=reason,
                metadata=metadata,
                ttl=ttl,
            )
        )

    def upsert_many(
        self,
        snapshots: Sequence[Snapshot[StateT] | Snapshot[Any]],
        *,
        actor: str | None = None,
        reason: str | None = None,
        metadata: JsonObject | None = None,
    ) -> list[Snapshot[StateT]]:
        """Store a batch in one transaction, all or none (see `SnapshotRepository.upsert_many`)."""
        return self._loop.call(
            lambda: self._repository.upsert_many(
                snapshots, actor=actor, reason=reason, metadata=metadata
            )
        )

    def get_latest(self, user_id: str) -> Snapshot[StateT] | None:
        """The user's newest snapshot, or None (see `SnapshotRepository.get_latest`)."""
        return self._loop.call(lambda: self._repository.get_latest(user_id))

    def get_latest_many(self, user_ids: Sequence[str]) -> dict[str, Snapshot[StateT]]:
        """The newest snapshot of each user that has one (see `SnapshotRepository`'s)."""
        return self._loop.call(lambda: self._repository.get_latest_many(user_ids))

    def get_history(
        self,
        user_id: str,
        limit: int = 100,
        *,
        before_version: int | None = None,
        skip_invalid: bool = False,
        max_bytes: int | None = None,
    ) -> list[Snapshot[StateT]]:
        """The user's newest `limit` versions, newest first (see `SnapshotRepository`'s)."""
        return self._loop.call(
            lambda: self._repository.get_history(
                user_id,
                limit,
                before_version=before_version,
                skip_invalid=skip_invalid,
                max_bytes=max_bytes,
            )
        )

    def iter_history(
        self,
        user_id: str,
        *,
        page_size: int = 100,
        max_bytes: int | None = 16 * 1024 * 1024,
        skip_invalid: bool = False,
    ) -> Iterator[Snapshot[StateT]]:
        """Every version of the user, newest first, read page by page as it is consumed.

        A plain iterator over `SnapshotRepository.iter_history` (each page one
        call on the loop). Leaving it early releases it at once; one thread at
        a time may consume it.
        """
        return self._loop.iterate(
            self._repository.iter_history(
                user_id, page_size=page_size, max_bytes=max_bytes, skip_invalid=skip_invalid
            )
        )

    def delete(self, user_id: str) -> int:
        """Erase the user's latest row and every history row (see `SnapshotRepository.delete`).

        Returns:
            How many versions were erased (0 when the user had none).
        """
        return self._loop.call(lambda: self._repository.delete(user_id))

    # --- history queries -------------------------------------------------------------

    def get_version(self, user_id: str, version: int) -> Snapshot[StateT] | None:
        """Exactly version `version` of the user, or None if it does not exist."""
        return self._loop.call(lambda: self._repository.get_version(user_id, version))

    def get_as_of(self, user_id: str, at: datetime) -> Snapshot[StateT] | None:
        """The user's state as it was at `at` (see `SnapshotRepository.get_as_of`)."""
        return self._loop.call(lambda: self._repository.get_as_of(user_id, at))

    def diff(self, user_id: str, from_version: int, to_version: int) -> list[JsonPatchOperation]:
        """The JSON Patch (RFC 6902) that turns one version's state into another's."""
        return self._loop.call(lambda: self._repository.diff(user_id, from_version, to_version))

    def exists(self, user_id: str) -> bool:
        """Whether the user has a snapshot here (in this namespace and tenant)."""
        return self._loop.call(lambda: self._repository.exists(user_id))

    def list_users(self, after: str | None = None, limit: int = 100) -> list[str]:
        """User ids with a snapshot here, in id order, after `after` (keyset paging)."""
        return self._loop.call(lambda: self._repository.list_users(after, limit))

    def count_users(self) -> int:
        """How many users have a snapshot here."""
        return self._loop.call(self._repository.count_users)

    # --- change feed and listeners ---------------------------------------------------

    def changes_since(self, cursor: str | None = None, limit: int = 100) -> ChangePage:
        """Committed changes after `cursor`, oldest first (see `SnapshotRepository`'s)."""
        return self._loop.call(lambda: self._repository.changes_since(cursor, limit))

    def acknowledge_changes(self, consumer: str, cursor: str | None) -> None:
        """Record that `consumer` processed this scope's feed up to `cursor` (see the async one)."""
        self._loop.call(lambda: self._repository.acknowledge_changes(consumer, cursor))

    def drop_feed_consumer(self, consumer: str) -> bool:
        """Forget a registered consumer, so trimming no longer waits for it."""
        return self._loop.call(lambda: self._repository.drop_feed_consumer(consumer))

    def feed_consumers(self) -> list[FeedConsumer]:
        """This scope's registered consumers and the positions they acknowledged, by name."""
        return self._loop.call(self._repository.feed_consumers)

    def trim_changes(self, *, older_than: timedelta | None = None, batch_size: int = 1_000) -> int:
        """Delete change-feed entries older than `older_than` (see `SnapshotRepository`'s)."""
        return self._loop.call(
            lambda: self._repository.trim_changes(older_than=older_than, batch_size=batch_size)
        )

    def subscribe(self, callback: ChangeCallback) -> SyncSubscription:
        """Call `callback(change)` after each committed write or erasure in this scope.

        The callback runs in a worker thread, one change at a time in
        publication order (see `SyncSubscription`), so it may block and may
        call this repository; a coroutine function is awaited on the
        background loop. The changes heard are those of
        `SnapshotRepository.subscribe`. Close the subscription to stop;
        closing the repository stops it too.
        """
        subscription = SyncSubscription(self._loop, callback)
        subscription._subscription = self._loop.call(
            lambda: self._repository.subscribe(subscription._enqueue)
        )
        self._loop.track(subscription)
        try:
            self._loop.submit(subscription._deliver)
        except BaseException:
            subscription.close()
            raise
        return subscription

    def changes(self) -> SyncChangeStream:
        """Live changes of this scope: `with repo.changes() as stream: for change in stream:`.

        Delivery is best effort (see `ChangeStream`); pair it with
        `changes_since` where nothing may be missed.
        """
        stream = SyncChangeStream(self._loop, self._loop.call_sync(self._repository.changes))
        self._loop.track(stream)
        return stream

    # --- privacy and the data lifecycle ----------------------------------------------

    def erase(self, user_id: str, *, vacuum: bool | Literal["full"] = False) -> int:
        """Erase the user and, with `vacuum`, the database's traces (see `SnapshotRepository`'s)."""
        return self._loop.call(lambda: self._repository.erase(user_id, vacuum=vacuum))

    def erasure_receipt(self, user_id: str) -> ErasureReceipt | None:
        """The newest erasure receipt for `user_id` in this scope, or None."""
        return self._loop.call(lambda: self._repository.erasure_receipt(user_id))

    def erasure_subject(self, user_id: str) -> str:
        """What erasure receipts and the feed's `erase` entries call `user_id` (no I/O)."""
        return self._repository.erasure_subject(user_id)

    def export_user(self, user_id: str) -> dict[str, JsonValue]:
        """Everything stored about the user in this scope, as one JSON-serialisable document."""
        return self._loop.call(lambda: self._repository.export_user(user_id))

    def export_user_lines(self, user_id: str) -> Iterator[str]:
        """The export as JSON Lines, streamed: a header line, then one line per version."""
        return self._loop.iterate(self._repository.export_user_lines(user_id))

    def rotate_wrapping_key(self, progress: Callable[[int], None] | None = None) -> int:
        """Re-wrap every data key under the key provider's active key (progress: loop thread)."""
        return self._loop.call(lambda: self._repository.rotate_wrapping_key(progress))

    def reap_expired(
        self, *, batch_size: int = 500, progress: Callable[[int], None] | None = None
    ) -> int:
        """Erase every user of this namespace whose snapshot expired (progress: loop thread)."""
        return self._loop.call(
            lambda: self._repository.reap_expired(batch_size=batch_size, progress=progress)
        )

    def prune_history(
        self,
        user_id: str | None = None,
        *,
        keep_last: int | None = None,
        older_than: timedelta | None = None,
        batch_size: int = 500,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Delete old history versions, never the latest (progress: loop thread)."""
        return self._loop.call(
            lambda: self._repository.prune_history(
                user_id,
                keep_last=keep_last,
                older_than=older_than,
                batch_size=batch_size,
                progress=progress,
            )
        )

    # --- versions derived from stored ones, bulk maintenance -------------------------

    def restore(
        self,
        user_id: str,
        version: int,
        *,
        actor: str | None = None,
        reason: str | None = None,
    ) -> Snapshot[StateT]:
        """Make an old version the latest again by appending it as a new version."""
        return self._loop.call(
            lambda: self._repository.restore(user_id, version, actor=actor, reason=reason)
        )

    def merge(
        self,
        user_id: str,
        partial: JsonObject,
        *,
        actor: str | None = None,
        reason: str | None = None,
        metadata: JsonObject | None = None,
    ) -> Snapshot[StateT]:
        """Apply an RFC 7386 JSON merge patch to the latest state and store the result."""
        return self._loop.call(
            lambda: self._repository.merge(
                user_id, partial, actor=actor, reason=reason, metadata=metadata
            )
        )

    def purge_all(self, *, confirm: str) -> int:
        """Erase every user of this scope; `confirm` must equal `purge_label`."""
        return self._loop.call(lambda: self._repository.purge_all(confirm=confirm))

    def upgrade_payloads(
        self, *, batch_size: int = 500, progress: Callable[[int], None] | None = None
    ) -> int:
        """Rewrite rows of older schema versions with the upgraders (progress: loop thread)."""
        return self._loop.call(
            lambda: self._repository.upgrade_payloads(batch_size=batch_size, progress=progress)
        )

    # --- schema, readiness, closing --------------------------------------------------

    def migrate(self) -> None:
        """Upgrade the schema to the newest revision this package ships (idempotent)."""
        self._loop.call(self._repository.migrate)

    def health(self) -> HealthReport:
        """A readiness report; raises only after `close()`, waits at most `health_timeout`."""
        return self._loop.call(self._repository.health)

    def health_check(self) -> bool:
        """True only when the database is reachable and migrated to this package's head."""
        return self._loop.call(self._repository.health_check)

    def finish_erasures(self, wait: float = 5.0) -> bool:
        """Wait up to `wait` seconds for readers, then remove what erasures left behind."""
        return self._loop.call(lambda: self._repository.finish_erasures(wait))

    def close(self) -> None:
        """Close the async repository, then stop the background loop. Idempotent.

        New calls are refused at once (`RuntimeError`); calls already running
        in other threads finish first (each within its timeouts), live change
        streams end and subscriptions stop (a callback already running
        finishes). A tenant view's `close()` does nothing: close the
        repository it came from. Must not be called from a change callback.
        """
        if self._owns_loop:
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Sync{self._repository!r}"
