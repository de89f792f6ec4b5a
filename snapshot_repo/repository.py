"""`SnapshotRepository`: typed, versioned per-user state over an async SQLAlchemy engine.

Each public method is one transaction (or one autocommitted statement) that
validates its input first, then does its I/O inside the error guard, so a
caller sees either a result or one of the errors in `snapshot_repo.errors`.
The core contract (writes, latest, history, delete) reads top to bottom
here: check arguments, one backend call, build the `Snapshot`. The other
capabilities are functions over the repository's `RepositoryContext`, one
module each: `_feed` (change feed and listeners), `_history_reads`
(versions, moments, diffs, listing), `_privacy` (erasure, receipts, export,
retention, expiry) and `_lifecycle` (restore, merge, purge, upgrades).

Concurrency: one repository may be shared by any number of tasks; every call
checks out its own pooled connection. On SQLite, writes from one repository
also queue on an `asyncio.Lock`, so concurrent tasks wait their turn in
order instead of polling SQLite's lock (writers in other processes are
handled by `BEGIN IMMEDIATE` and the busy timeout).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Generic, Literal, Self, Unpack, cast, overload

from pydantic import JsonValue
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from . import _feed, _feed_retention, _history_reads, _lifecycle, _privacy, _queries
from . import migrate as _migrate
from ._checks import (
    MAX_BATCH_SIZE,
    MAX_VERSION,
    check_batch_size,
    check_int,
    positive_seconds,
    valid_actor,
    valid_identifier,
    valid_reason,
    valid_ttl,
    valid_user_id,
)
from ._context import DEFAULT_NAMESPACE, RepositoryContext, RepositoryOptions, logger
from ._privacy import ErasureReceipt
from ._telemetry import traced
from ._translate import storage_errors
from .backends import KEPT_CONNECTIONS, PendingBatch, PendingWrite
from .backends.replicas import DEFAULT_MAX_REPLICA_LAG, route_reads
from .changes import (
    ChangeCallback,
    ChangePage,
    ChangeStream,
    FeedConsumer,
    Subscription,
    hub_for,
)
from .codec import JsonObject, encode_metadata
from .engine import EngineSettings, create_engine
from .errors import SnapshotRepoError, SnapshotValidationError, VersionConflictError
from .health import HealthReport, probe
from .patch import JsonPatchOperation
from .snapshot import MAX_IDEMPOTENCY_KEY_LENGTH, Snapshot, StateT

__all__ = [
    "DEFAULT_NAMESPACE",
    "MAX_BATCH_SIZE",
    "MAX_HISTORY_LIMIT",
    "RepositoryOptions",
    "SnapshotRepository",
]

MAX_HISTORY_LIMIT = 10_000
"""The most versions one `get_history` call returns; page or export for more."""

_CLOSE_TIMEOUT = 5.0


class SnapshotRepository(Generic[StateT]):
    """Latest state and full history of each user's snapshots, typed by one model.

    Args:
        engine: an async engine on SQLite (aiosqlite) or Postgres (asyncpg).
            The repository does not dispose an engine it was given; use
            `from_url` to let it own one.
        state_type: the pydantic model (or other pydantic-validatable type) of
            the states; None stores plain JSON objects (`dict`).
        **options: see `RepositoryOptions` (namespace, timeouts, limits,
            encryption, erasure receipts, retention, schema upgrades, notify).

    No I/O happens in the constructor.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        state_type: type[StateT] | None = None,
        **options: Unpack[RepositoryOptions],
    ) -> None:
        self._context: RepositoryContext[StateT] = RepositoryContext(engine, state_type, options)
        self._owns_engine = False

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
    ) -> SnapshotRepository[JsonObject]: ...

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
    ) -> SnapshotRepository[StateT]: ...

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
    ) -> SnapshotRepository[Any]:
        """A repository that owns an engine created from `url`; `close()` disposes it.

        `sqlite://` and `postgresql://` URLs are mapped to aiosqlite and asyncpg.
        `settings` are the connection settings (timeouts, pool, SQLite pragmas).

        `replicas`: URLs of Postgres streaming standbys of `url` (same settings).
        Reads then go to a replica, round robin, and everything else to the
        primary. A read of a user this repository (or a tenant view of it)
        wrote goes to the primary until the replica has replayed that write:
        read-your-writes at no cost to writes, checked against WAL positions
        sampled every `max_replica_lag / 10` seconds (0.05 to 1 s).
        A replica that is down, or more than `max_replica_lag` seconds behind
        the primary, is skipped (its reads go to another replica or the
        primary: none fails because a replica did), and `health()` reports
        each. Writes made elsewhere are read from replicas once replayed: read
        inside `primary_reads()` for a read that must see them at once. See
        `snapshot_repo.backends.replicas` for which calls count as reads.

        Raises:
            ConfigurationError: the URL is not SQLite, Postgres or MySQL/MariaDB,
                a setting is invalid, or a replica (or, with replicas, the
                primary) is not Postgres.
        """
        engine = create_engine(url, settings)
        try:
            repository = cls(engine, state_type, **options)
            if replicas:
                # A router over the backend the context just made: data keys and
                # telemetry, set up on that backend, stay on the primary.
                repository._context.backend = route_reads(
                    repository._context.backend,
                    engine,
                    replicas,
                    settings=settings,
                    kind=options.get("backend", "auto"),
                    max_lag=max_replica_lag,
                    plain_reads=_plain_reads(),
                )
        except BaseException:
            # Nothing has connected yet, so dropping the engine's (empty) pool is enough.
            engine.sync_engine.dispose(close=False)
            raise
        repository._owns_engine = True
        repository._backend.keep_connections(KEPT_CONNECTIONS)  # released by close()
        return repository

    # --- configuration ---------------------------------------------------------------

    @property
    def engine(self) -> AsyncEngine:
        """The engine this repository runs on."""
        return self._context.engine

    @property
    def state_type(self) -> Any:
        """The type states are validated against (`JsonObject` for a repository without one)."""
        return self._context.codec.state_type

    @property
    def namespace(self) -> str:
        """Which of a user's states this repository holds."""
        return self._context.scope.namespace

    @property
    def tenant(self) -> str | None:
        """The tenant this view is confined to; None for the repository itself."""
        return self._context.scope.tenant or None

    @property
    def purge_label(self) -> str:
        """What `purge_all(confirm=...)` expects: "namespace" or "tenant/namespace"."""
        return _lifecycle.purge_label(self._context)

    @property
    def _backend(self) -> Any:
        """The backend (tests look at its kept connections)."""
        return self._context.backend

    def for_tenant(self, tenant: str) -> Self:
        """A view of this repository confined to `tenant` (seed 004's scoped view).

        The tenant is part of every key and index: no call through the view
        can read, overwrite, list or delete another tenant's rows (or the
        untenanted rows of this repository), whatever user id it is given.
        The view shares this repository's engine and settings; closing the
        view leaves them open.

        Raises:
            ConfigurationError: `tenant` is not 1 to 255 characters without
                control characters.
        """
        view = copy.copy(self)
        view._context = self._context.for_tenant(tenant)
        view._owns_engine = False
        return view

    # --- the core contract -----------------------------------------------------------

    @traced
    async def upsert_latest(
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
        """Store `snapshot` as the user's next version, in `latest` and `history` at once.

        Args:
            snapshot: the user id, the state and its schema version; the
                snapshot's own `version` and `created_at` are ignored.
            expected_version: compare-and-set. None writes unconditionally;
                0 writes only if the user has no snapshot yet; N writes only if
                the latest version is N.
            idempotency_key: the caller's id for this write (1 to 255
                characters). If this user already has a version written with
                the same key, nothing is written and that version is returned,
                so a write whose outcome was unknown (a timeout, a connection
                lost during commit) can be retried safely.
            actor: who or what made the write (1 to 255 characters), kept
                with the version and returned with history.
            reason: why, free text up to 4096 characters.
            metadata: free JSON object describing the write (up to 64 KiB).
            ttl: the snapshot expires this long after the write (seed 004):
                from then on it reads as absent, and `reap_expired` erases the
                user. `timedelta(0)` expires at once; None (the default) never
                expires, and a write without `ttl` cancels an earlier expiry.

        Returns:
            The stored snapshot, with the `version` and `created_at` assigned
            (for a replayed key: the snapshot the first attempt stored).

        Raises:
            SnapshotValidationError: bad user id, state, expected_version or
                idempotency key, or a payload over the size limit. Nothing was written.
            VersionConflictError: `expected_version` did not match. Nothing was written.
            StorageError: the database failed or the operation timed out; the
                write was rolled back whole, or (after a timeout during commit)
                its outcome is unknown: retry with the same idempotency key.
        """
        context = self._context
        if not isinstance(snapshot, Snapshot):
            raise SnapshotValidationError(
                f"upsert_latest takes a Snapshot, not {type(snapshot).__name__}"
            )
        user_id = valid_user_id(snapshot.user_id)
        if expected_version is not None:
            check_int("expected_version", expected_version, minimum=0, maximum=MAX_VERSION)
        if idempotency_key is not None:
            valid_identifier("idempotency_key", idempotency_key, MAX_IDEMPOTENCY_KEY_LENGTH)
        state = context.codec.validate(snapshot.state, user_id)
        created_at = datetime.now(UTC)
        write = PendingWrite(
            scope=context.scope,
            user_id=user_id,
            schema_version=context.schema_version_of(snapshot),
            payload=context.codec.encode(state, user_id),
            created_at=created_at,
            expected_version=expected_version,
            idempotency_key=idempotency_key,
            actor=valid_actor(actor),
            reason=valid_reason(reason),
            metadata=encode_metadata(metadata),
            expires_at=None if ttl is None else created_at + valid_ttl(ttl),
            retention=context.retention_for(created_at),
            notify=context.notify,
        )
        async with context.guard("upsert_latest", user_id):
            outcome = await context.write(write)
            if outcome is None:
                actual = await context.backend.current_version(context.scope, user_id)
            elif isinstance(outcome, tuple):  # the earlier write with this idempotency key
                return context.to_snapshot((await context.open([outcome]))[0])
        if outcome is None:
            raise VersionConflictError(user_id, cast(int, expected_version), actual)
        stored = context.stored(write, state, outcome)
        context.announce("write", user_id, outcome, write.created_at, stored)
        return stored

    @traced
    async def upsert_many(
        self,
        snapshots: Sequence[Snapshot[StateT] | Snapshot[Any]],
        *,
        actor: str | None = None,
        reason: str | None = None,
        metadata: JsonObject | None = None,
    ) -> list[Snapshot[StateT]]:
        """Store a batch of snapshots in one transaction: all of them, or none.

        Each snapshot becomes its user's next version, as `upsert_latest`
        without `expected_version` would make it; a user appearing several
        times gets consecutive versions in batch order, and the last one is
        the latest. On Postgres the batch is one statement.

        Args:
            snapshots: 1 to 10,000 snapshots. (Idempotency keys and
                compare-and-set are per write: use `upsert_latest` for those.)
            actor: who or what made the writes, recorded on each version.
            reason: why, recorded on each version.
            metadata: free JSON object recorded on each version.

        Returns:
            The stored snapshots, in the order given.

        Raises:
            SnapshotValidationError: any snapshot is invalid, or the batch is
                empty or too large. Nothing was written.
            StorageError: the database failed; nothing was written.
        """
        context = self._context
        if isinstance(snapshots, Snapshot) or not isinstance(snapshots, Sequence):
            raise SnapshotValidationError("upsert_many takes a sequence of Snapshots")
        check_batch_size("snapshots", len(snapshots))
        created_at = datetime.now(UTC)
        actor, reason = valid_actor(actor), valid_reason(reason)
        encoded_metadata = encode_metadata(metadata)
        user_ids, schema_versions, payloads, states = [], [], [], []
        validate, encode = context.codec.validate, context.codec.encode
        schema_version_of = context.schema_version_of
        for snapshot in snapshots:
            if not isinstance(snapshot, Snapshot):
                raise SnapshotValidationError(
                    f"upsert_many takes Snapshots, not {type(snapshot).__name__}"
                )
            user_id = valid_user_id(snapshot.user_id)
            state = validate(snapshot.state, user_id)
            user_ids.append(user_id)
            schema_versions.append(schema_version_of(snapshot))
            payloads.append(encode(state, user_id))
            states.append(state)
        batch = PendingBatch(
            scope=context.scope,
            user_ids=user_ids,
            schema_versions=schema_versions,
            payloads=payloads,
            created_at=created_at,
            actor=actor,
            reason=reason,
            metadata=encoded_metadata,
            retention=context.retention_for(created_at),
            notify=context.notify,
        )
        async with context.guard("upsert_many", None):
            versions = await context.write_many(batch)
        stored = context.stored_batch(batch, states, versions)
        context.announce_writes(stored, created_at)
        return stored

    @traced
    async def get_latest(self, user_id: str) -> Snapshot[StateT] | None:
        """The user's newest snapshot, or None if the user has none.

        Raises:
            SnapshotValidationError: bad user id, or the stored state no
                longer validates against the model.
            StorageError: the database failed or the operation timed out.
        """
        context = self._context
        user_id = valid_user_id(user_id)
        async with context.guard("get_latest", user_id):
            row = await context.read(
                context.backend.latest, context.scope, user_id, datetime.now(UTC)
            )
            if row is not None and context.keys is not None:
                row = (await context.open([row]))[0]
        return None if row is None else context.to_snapshot(row)

    @traced
    async def get_latest_many(self, user_ids: Sequence[str]) -> dict[str, Snapshot[StateT]]:
        """The newest snapshot of each of `user_ids` that has one, in one query.

        Args:
            user_ids: 1 to 10,000 user ids; repeats are read once.

        Returns:
            A dict from user id to its latest snapshot; users without one are absent.

        Raises:
            SnapshotValidationError: a bad user id, or the batch is empty or too
                large, or a stored state no longer validates.
            StorageError: the database failed.
        """
        context = self._context
        if isinstance(user_ids, str) or not isinstance(user_ids, Sequence):
            raise SnapshotValidationError("get_latest_many takes a sequence of user ids")
        check_batch_size("user_ids", len(user_ids))
        wanted = list(dict.fromkeys(valid_user_id(user_id) for user_id in user_ids))
        async with context.guard("get_latest_many", None):
            rows = await context.read(
                context.backend.latest_many, context.scope, wanted, datetime.now(UTC)
            )
            rows = await context.open(rows)
        return {snapshot.user_id: snapshot for snapshot in map(context.to_snapshot, rows)}

    @traced
    async def get_history(
        self,
        user_id: str,
        limit: int = 100,
        *,
        before_version: int | None = None,
        skip_invalid: bool = False,
        max_bytes: int | None = None,
    ) -> list[Snapshot[StateT]]:
        """The user's newest `limit` versions, newest first (empty if none).

        Costs O(limit) whatever the length of the history: a backward scan of
        the history primary key. Memory: `limit` stored states at once, each
        up to the 1 MiB state limit, unless `max_bytes` bounds the page.

        Args:
            user_id: whose history.
            limit: how many versions at most, 1 to 10,000.
            before_version: keyset paging: only versions below this one (pass
                the last version of the previous page).
            skip_invalid: leave out (and log a warning for) stored states that
                no longer validate against the model, instead of raising.
            max_bytes: a byte budget for the page: it ends after the version
                whose stored states (as stored: encrypted, if encryption is on)
                add up to `max_bytes` or more; the newest is always returned.
                The database does the sums, and sends no version past the
                budget. Page on with `before_version`, or use `iter_history`.

        Raises:
            SnapshotValidationError: bad user id, `limit` outside 1 to 10,000,
                `max_bytes` below 1, or (unless `skip_invalid`) a stored state
                that no longer validates.
            StorageError: the database failed or the operation timed out.
        """
        context = self._context
        user_id = valid_user_id(user_id)
        check_int("limit", limit, minimum=1, maximum=MAX_HISTORY_LIMIT)
        if before_version is not None:
            check_int("before_version", before_version, minimum=1, maximum=MAX_VERSION)
        if max_bytes is not None:
            check_int("max_bytes", max_bytes, minimum=1)
        async with context.guard("get_history", user_id):
            if before_version is None and max_bytes is None:
                history = await context.read(context.backend.history, context.scope, user_id, limit)
                rows = await context.open(history)
            else:
                rows = await _history_reads.history_page(
                    context, user_id, limit, before_version, max_bytes
                )
        if not skip_invalid:
            return [context.to_snapshot(row) for row in rows]
        snapshots = []
        for row in rows:
            try:
                snapshots.append(context.to_snapshot(row))
            except SnapshotValidationError as exc:
                logger.warning("snapshot_repo skipped a stored state: %s", exc)
        return snapshots

    async def iter_history(
        self,
        user_id: str,
        *,
        page_size: int = 100,
        max_bytes: int | None = 16 * 1024 * 1024,
        skip_invalid: bool = False,
    ) -> AsyncIterator[Snapshot[StateT]]:
        """Every version of the user, newest first, read page by page as it is consumed.

        For callers that want a whole history of any length: each page is one
        keyset read as `get_history(before_version=...)` makes (O(page) each), so
        memory holds one page, at most `page_size` versions and about
        `max_bytes` of stored states (16 MiB by default; None: no byte bound).
        Versions written after the iteration began are not included; versions
        pruned or erased meanwhile may be missing.

        Raises:
            SnapshotValidationError: as `get_history`, when the first page is read.
            StorageError: the database failed, on the page being read.
        """
        context = self._context
        user_id = valid_user_id(user_id)
        check_int("page_size", page_size, minimum=1, maximum=MAX_HISTORY_LIMIT)
        if max_bytes is not None:
            check_int("max_bytes", max_bytes, minimum=1)
        before: int | None = None
        while True:
            async with context.guard("iter_history", user_id):
                rows = await _history_reads.history_page(
                    context, user_id, page_size, before, max_bytes
                )
            for row in rows:
                try:
                    snapshot = context.to_snapshot(row)
                except SnapshotValidationError as exc:
                    if not skip_invalid:
                        raise
                    logger.warning("snapshot_repo skipped a stored state: %s", exc)
                    continue
                yield snapshot
            # Page on from the last version read, valid or not: an invalid one skipped
            # must neither end the iteration nor be read again.
            if not rows or rows[-1].version <= 1:
                return
            before = rows[-1].version

    @traced
    async def delete(self, user_id: str) -> int:
        """Erase the user's latest row and every history row, in one transaction.

        Idempotent. A user written again afterwards starts at version 1.

        Returns:
            How many versions were erased (0 when the user had none).

        Raises:
            SnapshotValidationError: bad user id.
            StorageError: the database failed; nothing was erased.
        """
        return await self._context.erase(valid_user_id(user_id), "delete")

    # --- history queries (`_history_reads`) ------------------------------------------

    @traced
    async def get_version(self, user_id: str, version: int) -> Snapshot[StateT] | None:
        """Exactly version `version` of the user, or None if it does not exist.

        Raises:
            SnapshotValidationError: bad user id or version (not 1 to 2^63-1).
            StorageError: the database failed.
        """
        return await _history_reads.get_version(self._context, user_id, version)

    @traced
    async def get_as_of(self, user_id: str, at: datetime) -> Snapshot[StateT] | None:
        """The user's state as it was at `at`: the newest version stored at or before it.

        Returns None if the user had no version yet at that moment (or none
        that survives: erased users have no past).

        Raises:
            SnapshotValidationError: bad user id, or `at` is not a timezone-aware datetime.
            StorageError: the database failed.
        """
        return await _history_reads.get_as_of(self._context, user_id, at)

    @traced
    async def diff(
        self, user_id: str, from_version: int, to_version: int
    ) -> list[JsonPatchOperation]:
        """The JSON Patch (RFC 6902) that turns one version's state into another's.

        Raises:
            SnapshotValidationError: bad arguments, or either version does not exist.
            StorageError: the database failed.
        """
        return await _history_reads.diff(self._context, user_id, from_version, to_version)

    @traced
    async def exists(self, user_id: str) -> bool:
        """Whether the user has a snapshot here (in this namespace and tenant)."""
        return await _history_reads.exists(self._context, user_id)

    @traced
    async def list_users(self, after: str | None = None, limit: int = 100) -> list[str]:
        """User ids with a snapshot here, in id order, after `after` (keyset paging).

        Pass the last id of a page as `after` to get the next page; an empty
        list means the end. Costs O(limit) at any position (no OFFSET).

        Raises:
            SnapshotValidationError: bad `after` or `limit` (1 to 10,000).
            StorageError: the database failed.
        """
        return await _history_reads.list_users(self._context, after, limit)

    @traced
    async def count_users(self) -> int:
        """How many users have a snapshot here: exact, counted by a scan of the scope's
        primary-key range, so its cost grows with the users (about 250 ms at a million
        on Postgres); on SQLite it runs off the event loop's thread."""
        return await _history_reads.count_users(self._context)

    # --- change feed and listeners (`_feed`) -----------------------------------------

    @traced
    async def changes_since(self, cursor: str | None = None, limit: int = 100) -> ChangePage:
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
        return await _feed.changes_since(self._context, cursor, limit)

    @traced
    async def subscribe(self, callback: ChangeCallback) -> Subscription:
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
        return await _feed.subscribe(self._context, callback)

    def changes(self) -> ChangeStream:
        """Live changes of this scope: `async with repo.changes() as stream: async for ...`.

        Delivery is best effort (see `ChangeStream`); pair it with
        `changes_since` where nothing may be missed.
        """
        return _feed.changes(self._context)

    async def acknowledge_changes(self, consumer: str, cursor: str | None) -> None:
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
        await _feed_retention.acknowledge_changes(self._context, consumer, cursor)

    async def drop_feed_consumer(self, consumer: str) -> bool:
        """Forget a registered consumer, so trimming no longer waits for it.

        Returns:
            Whether it was registered.
        """
        return await _feed_retention.drop_feed_consumer(self._context, consumer)

    async def feed_consumers(self) -> list[FeedConsumer]:
        """This scope's registered consumers and the positions they acknowledged, by name."""
        return await _feed_retention.feed_consumers(self._context)

    async def trim_changes(
        self, *, older_than: timedelta | None = None, batch_size: int = 1_000
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
        return await _feed_retention.trim_changes(self._context, older_than, batch_size)

    # --- privacy and the data lifecycle (`_privacy`) ---------------------------------

    @traced
    async def erase(self, user_id: str, *, vacuum: bool | Literal["full"] = False) -> int:
        """Erase the user (as `delete`) and, with `vacuum`, the traces the database keeps.

        On SQLite every erasure already overwrites the freed bytes
        (`secure_delete`) and checkpoints the WAL, so no string of the state
        stays in the database files. On Postgres deleted rows stay on disk as
        dead tuples until vacuumed: `vacuum=True` runs VACUUM on the snapshot
        tables after the erasure commits (milliseconds to seconds, by table
        size), which frees the tuples but leaves their bytes in the freed page
        space until it is reused; `vacuum="full"` runs VACUUM FULL, which
        rewrites the tables and indexes into new files without them, and
        blocks every other call on those tables while it runs. On MariaDB/MySQL
        both run OPTIMIZE TABLE (an online rebuild). WAL, redo and undo logs,
        binary logs, backups and replicas keep their copies; see the README's
        erasure section.

        Raises:
            SnapshotValidationError: a bad user id, or `vacuum` not False, True or "full".

        Returns:
            How many versions were erased.
        """
        return await _privacy.erase(self._context, user_id, vacuum=vacuum)

    @traced
    async def erasure_receipt(self, user_id: str) -> ErasureReceipt | None:
        """The newest erasure receipt for `user_id` in this scope, found by its keyed hash.

        Answers "was this person erased, when, and how much" without the
        database ever holding the user id.

        Raises:
            ConfigurationError: the repository has no `erasure_key`.
        """
        return await _privacy.erasure_receipt(self._context, user_id)

    def erasure_subject(self, user_id: str) -> str:
        """What erasure receipts and the feed's `erase` entries call `user_id`.

        The HMAC-SHA256 of the id under `erasure_key`, in hex: a feed consumer
        holding the key matches an `erase` entry (`Change.user_id`) to the user
        it cached, while the database holds no id of an erased person.

        Raises:
            SnapshotValidationError: a bad user id.
            ConfigurationError: the repository has no `erasure_key`.
        """
        return _privacy.erasure_subject(self._context, user_id)

    @traced
    async def export_user(self, user_id: str) -> dict[str, JsonValue]:
        """Everything stored about the user in this scope, as one JSON-serialisable document.

        For GDPR articles 15 and 20: every version's state and metadata,
        newest first. History is read in pages of 500, so the database never
        returns an unbounded result; the document itself holds every version
        (use `export_user_lines` to stream it instead).
        """
        return await _privacy.export_user(self._context, user_id)

    def export_user_lines(self, user_id: str) -> AsyncIterator[str]:
        """The export as JSON Lines, streamed: a header line, then one line per version."""
        return _privacy.export_user_lines(self._context, user_id)

    @traced
    async def rotate_wrapping_key(self, progress: Callable[[int], None] | None = None) -> int:
        """Re-wrap every data key under the key provider's active key, without touching payloads.

        Run it after making a new key active; once it returns, the old
        key-encryption key can be retired, and with it every backup's copy
        of the data keys of users erased before the rotation.

        Returns:
            How many data keys were re-wrapped.

        Raises:
            ConfigurationError: the repository has no encryption.
            DecryptionError: a data key is wrapped under a key the provider lacks.
        """
        return await _privacy.rotate_wrapping_key(self._context, progress)

    @traced
    async def reap_expired(
        self, *, batch_size: int = 500, progress: Callable[[int], None] | None = None
    ) -> int:
        """Erase every user of this namespace whose snapshot expired (seed 004's reaping).

        Each user is erased as by `delete` (receipt, feed entry, listeners),
        unless a write cleared the expiry meanwhile. Covers every tenant of
        the namespace (one tenant through a tenant view). On SQLite each batch
        of `batch_size` users shares one WAL checkpoint (see `_erase_batch`).
        With `feed_retention`, the change feed is then trimmed (`trim_changes`).

        Returns:
            How many users were erased.
        """
        reaped = await _privacy.reap_expired(
            self._context, batch_size=batch_size, progress=progress
        )
        await _feed_retention.trim_configured(self._context)
        return reaped

    @traced
    async def prune_history(
        self,
        user_id: str | None = None,
        *,
        keep_last: int | None = None,
        older_than: timedelta | None = None,
        batch_size: int = 500,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Delete old history versions (never the latest) of one user or of all.

        A version is deleted when it is outside every bound given: not among
        the newest `keep_last` and (if given) older than `older_than`. With no
        `user_id`, every user of the namespace (every tenant; one tenant via
        a tenant view) is pruned, `batch_size` users per transaction. On
        Postgres each user is locked as a write locks it, so writers of a
        page's users wait for that page's transaction to commit.
        With `feed_retention`, the change feed is then trimmed (`trim_changes`).

        Returns:
            How many versions were deleted.

        Raises:
            SnapshotValidationError: no bound, or a bound out of range.
        """
        pruned = await _privacy.prune_history(
            self._context,
            user_id,
            keep_last=keep_last,
            older_than=older_than,
            batch_size=batch_size,
            progress=progress,
        )
        await _feed_retention.trim_configured(self._context)
        return pruned

    # --- versions derived from stored ones, bulk maintenance (`_lifecycle`) ----------

    @traced
    async def restore(
        self,
        user_id: str,
        version: int,
        *,
        actor: str | None = None,
        reason: str | None = None,
    ) -> Snapshot[StateT]:
        """Make an old version the latest again by appending it as a new version.

        History is never rewritten: the restored state becomes version
        latest + 1, with `metadata={"restored_from": version}`.

        Raises:
            SnapshotValidationError: bad arguments, the version does not exist,
                or its state no longer validates against the model.
            StorageError: the database failed.
        """
        return await _lifecycle.restore(
            self, self._context, user_id, version, actor=actor, reason=reason
        )

    @traced
    async def merge(
        self,
        user_id: str,
        partial: JsonObject,
        *,
        actor: str | None = None,
        reason: str | None = None,
        metadata: JsonObject | None = None,
    ) -> Snapshot[StateT]:
        """Apply an RFC 7386 JSON merge patch to the latest state and store the result.

        Atomic and free of lost updates: the merge is written with
        compare-and-set against the version it was computed from, and
        recomputed from the new latest state when another writer got there
        first (up to `MERGE_ATTEMPTS` times). Merging into a user without a
        snapshot creates one from the patch alone, if it validates; so does
        merging into an expired one, as the next version (as any write after
        expiry does: it continues the history and cancels the expiry).

        Raises:
            SnapshotValidationError: `partial` is not a JSON object, or the
                merged state does not validate against the model.
            VersionConflictError: other writers won `MERGE_ATTEMPTS` races in a row.
            StorageError: the database failed.
        """
        return await _lifecycle.merge(
            self, self._context, user_id, partial, actor=actor, reason=reason, metadata=metadata
        )

    @traced
    async def purge_all(self, *, confirm: str) -> int:
        """Erase every user of this namespace (and tenant, for a tenant view): seed 003's reset.

        Each user is erased as by `delete` (one transaction per user, each
        recorded in the change feed), so a failure part-way leaves whole
        users erased or kept, never half of one; on SQLite each page of 500
        users shares one WAL checkpoint (see `_erase_batch`). Users written
        while the purge runs may survive it.

        Args:
            confirm: must equal `purge_label`, e.g. "default" or "acme/cart",
                so that a purge of the wrong scope cannot happen by accident.

        Returns:
            How many users were erased.

        Raises:
            SnapshotValidationError: `confirm` does not name this scope.
            StorageError: the database failed; users erased before it stay erased.
        """
        return await _lifecycle.purge_all(self._context, confirm=confirm)

    @traced
    async def upgrade_payloads(
        self, *, batch_size: int = 500, progress: Callable[[int], None] | None = None
    ) -> int:
        """Rewrite rows stored under older schema versions with the upgraders, in batches.

        Covers history and latest rows of this namespace (every tenant; one
        tenant through a tenant view). Each batch is one transaction; a row
        changed meanwhile by another upgrade is skipped, so the job can be
        stopped and rerun. Versions and timestamps are kept: this changes how
        a state is stored, not which state it was.

        Returns:
            How many rows were rewritten.

        Raises:
            SchemaVersionError: a row cannot be upgraded (nothing of its batch
                was written).
            SnapshotValidationError: an upgraded state does not validate.
            StorageError: the database failed.
        """
        return await _lifecycle.upgrade_payloads(
            self._context, batch_size=batch_size, progress=progress
        )

    # --- schema, readiness, closing --------------------------------------------------

    @traced
    async def migrate(self) -> None:
        """Upgrade the schema to the newest revision this package ships.

        Idempotent, and safe to call from several processes at once (an
        advisory lock on Postgres, the write lock on SQLite, serialize them).

        Raises:
            StorageError: the database failed or refused a migration.
        """
        async with storage_errors("migrate"):  # no operation timeout: migrations may be slow
            await _migrate.upgrade(self._context.engine)

    @traced
    async def health(self) -> HealthReport:
        """A readiness report: reachable, round-trip latency, schema revision vs. head.

        Never raises, never waits longer than `health_timeout` seconds, and
        never creates anything (a missing SQLite file is reported, not created).
        """
        context = self._context
        report = await probe(context.engine, context.backend, context.health_timeout)
        if not report.healthy:
            logger.warning(
                "snapshot_repo is not ready: reachable=%s, schema %s of %s%s",
                report.reachable,
                report.database_revision,
                report.head_revision,
                f" ({report.error})" if report.error else "",
            )
        return report

    @traced
    async def health_check(self) -> bool:
        """True only when the database is reachable and migrated to this package's head.

        Never raises, never waits longer than `health_timeout` seconds, and
        never creates anything. See `health()` for the reasons.
        """
        return (await self.health()).healthy

    @traced
    async def finish_erasures(self, wait: float = 5.0) -> bool:
        """Wait up to `wait` seconds for readers, then remove what erasures left behind.

        On SQLite an erasure commits at once, but its bytes leave the WAL only
        when the WAL can be truncated, which has to wait for every reader of an
        older snapshot (a backup, a long report). Erasures never wait for
        them, so other users' writes never queue behind a reader: a truncation
        held up is retried by later writes (at most once a second), by this
        method, and by `close()`. On Postgres there is nothing pending (dead
        tuples are VACUUM's: `erase(vacuum=True)`).

        Returns:
            True when no erasure of this repository has bytes left in the WAL.

        Raises:
            StorageError: the database failed.
        """
        seconds = positive_seconds("wait", wait)
        async with storage_errors("finish_erasures", None, time_limit=seconds + 1):
            return await self._context.backend.finish_erasures(seconds)

    async def close(self) -> None:
        """Close the pooled connections of an engine this repository owns (from `from_url`).

        An engine passed to the constructor belongs to the caller and stays open.
        """
        if self._owns_engine:
            try:
                await self.finish_erasures(wait=_CLOSE_TIMEOUT / 2)
            except SnapshotRepoError as exc:  # closing goes on: the erasures committed
                logger.warning("snapshot_repo: finishing erasures on close failed: %s", exc)
            engine = self._context.engine
            await self._context.backend.release()  # views share it: only the owner releases
            hub = hub_for(engine, create=False)
            if hub is not None:
                await hub.close()
            await _dispose_within(engine, _CLOSE_TIMEOUT)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        context = self._context
        url = context.engine.url.render_as_string(hide_password=True)
        tenant = f", tenant={context.scope.tenant!r}" if context.scope.tenant else ""
        return (
            f"SnapshotRepository({url!r}, {context.codec.state_type!r}, "
            f"namespace={self.namespace!r}{tenant})"
        )


def _plain_reads() -> tuple[Any, ...]:
    """The statements `fetch` runs for reads only, which replicas may serve (see
    `backends.replicas`); any other statement runs on the primary."""
    return (
        _queries.version_row_statement(),
        _queries.versions_statement(),
        _queries.as_of_statement(),
        _queries.history_before_statement(),
        _queries.history_within_bytes_statement(),
        _queries.exists_statement(),
        _queries.list_users_statement(),
        _queries.count_users_statement(),
        _queries.receipts_statement(),
    )


async def _dispose_within(engine: AsyncEngine, seconds: float) -> None:
    """Close the engine's connections gracefully, or abandon them after `seconds`.

    A graceful close waits for the server to acknowledge; a frozen server never
    does. After the deadline the pool is dropped without waiting, so `close()`
    always returns.
    """
    try:
        async with asyncio.timeout(seconds):
            await engine.dispose()
    except TimeoutError:
        logger.warning("snapshot_repo: closing connections took over %g s; abandoned them", seconds)
        await engine.dispose(close=False)
