"""`SnapshotRepository`: typed, versioned per-user state over an async SQLAlchemy engine.

Each public method is one transaction (or one autocommitted statement) that
validates its input first, then does its I/O inside the error guard, so a
caller sees either a result or one of the errors in `snapshot_repo.errors`.
The core contract (writes, latest, history, delete) reads top to bottom
here: check arguments (a write's in `_requests`), one backend call, build
the `Snapshot`. Every other
method is listed here too, by name, and defined in the module of its
capability as a function taking the repository: `_history_reads` (versions,
moments, diffs, listing), `_feed` and `_feed_retention` (change feed,
listeners, trimming), `_privacy` (erasure, receipts, export, retention,
expiry), `_lifecycle` (restore, merge, purge, upgrades) and `_operations`
(schema, readiness, closing). No mixins: the class's MRO is itself and
`Generic`.

Concurrency: one repository may be shared by any number of tasks; every call
checks out its own pooled connection. On SQLite, writes from one repository
also queue on an `asyncio.Lock`, so concurrent tasks wait their turn in
order instead of polling SQLite's lock (writers in other processes are
handled by `BEGIN IMMEDIATE` and the busy timeout).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Generic, Self, Unpack, cast, overload

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from . import _feed, _feed_retention, _history_reads, _lifecycle, _operations, _privacy, _queries
from ._checks import (
    MAX_BATCH_SIZE,
    MAX_VERSION,
    check_batch_size,
    check_int,
    valid_user_id,
)
from ._context import DEFAULT_NAMESPACE, RepositoryContext, RepositoryOptions
from ._history_reads import MAX_HISTORY_LIMIT
from ._requests import batch_request, write_request
from ._telemetry import traced
from .backends import KEPT_CONNECTIONS
from .backends.replicas import DEFAULT_MAX_REPLICA_LAG, route_reads
from .codec import JsonObject
from .compression import is_compressed
from .engine import EngineSettings, create_engine
from .errors import SnapshotValidationError, VersionConflictError
from .snapshot import Snapshot, StateT

__all__ = [
    "DEFAULT_NAMESPACE",
    "MAX_BATCH_SIZE",
    "MAX_HISTORY_LIMIT",
    "RepositoryOptions",
    "SnapshotRepository",
]


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
        Reads then go to a replica, and everything else to the primary, with
        read-your-writes for this repository's own writes; a replica down or
        more than `max_replica_lag` seconds behind is skipped, and `health()`
        reports each. Read inside `primary_reads()` to see writes made
        elsewhere at once. How reads are routed: `snapshot_repo.backends.replicas`.

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
                    plain_reads=_queries.plain_read_statements(),
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
        write, state = write_request(
            context,
            snapshot,
            expected_version=expected_version,
            idempotency_key=idempotency_key,
            actor=actor,
            reason=reason,
            metadata=metadata,
            ttl=ttl,
        )
        user_id = write.user_id
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
        batch, states = batch_request(
            context, snapshots, actor=actor, reason=reason, metadata=metadata
        )
        async with context.guard("upsert_many", None):
            versions = await context.write_many(batch)
        stored = context.stored_batch(batch, states, versions)
        context.announce_writes(stored, batch.created_at)
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
            if row is not None and (context.keys is not None or is_compressed(row.payload)):
                row = (await context.open([row]))[0]  # decrypted, decompressed
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
        return _history_reads.snapshots_of(context, rows, skip_invalid=skip_invalid)

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

    iter_history = _history_reads.iter_history
    get_version = _history_reads.get_version
    get_as_of = _history_reads.get_as_of
    diff = _history_reads.diff
    exists = _history_reads.exists
    list_users = _history_reads.list_users
    count_users = _history_reads.count_users

    # --- change feed and listeners (`_feed`, `_feed_retention`) ----------------------

    changes_since = _feed.changes_since
    subscribe = _feed.subscribe
    changes = _feed.changes
    acknowledge_changes = _feed_retention.acknowledge_changes
    drop_feed_consumer = _feed_retention.drop_feed_consumer
    feed_consumers = _feed_retention.feed_consumers
    trim_changes = _feed_retention.trim_changes

    # --- privacy and the data lifecycle (`_privacy`) ---------------------------------

    erase = _privacy.erase
    erasure_receipt = _privacy.erasure_receipt
    erasure_subject = _privacy.erasure_subject
    export_user = _privacy.export_user
    export_user_lines = _privacy.export_user_lines
    rotate_wrapping_key = _privacy.rotate_wrapping_key
    reap_expired = _privacy.reap_expired
    prune_history = _privacy.prune_history

    # --- versions derived from stored ones, bulk maintenance (`_lifecycle`) ----------

    restore = _lifecycle.restore
    merge = _lifecycle.merge
    purge_all = _lifecycle.purge_all
    upgrade_payloads = _lifecycle.upgrade_payloads

    # --- schema, readiness, closing (`_operations`) ----------------------------------

    migrate = _operations.migrate
    health = _operations.health
    health_check = _operations.health_check
    finish_erasures = _operations.finish_erasures
    close = _operations.close

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


# The capability modules name `SnapshotRepository` in their methods' annotations but
# import it for type checkers only (it imports them). Bound there now, so that
# `typing.get_type_hints` (pydantic's validate_call, Sphinx, DI frameworks) resolves
# those methods' hints as it does the ones defined above.
for _module in (_feed, _feed_retention, _history_reads, _lifecycle, _operations, _privacy):
    setattr(_module, "SnapshotRepository", SnapshotRepository)  # noqa: B010
