"""`SnapshotRepository`: typed, versioned per-user state over an async SQLAlchemy engine.

Each public method is one transaction (or one autocommitted statement) that
validates its input first, then does its I/O inside `storage_errors`, so a
caller sees either a result or one of the errors in `snapshot_repo.errors`.

Concurrency: one repository may be shared by any number of tasks; every call
checks out its own pooled connection. On SQLite, writes from one repository
also queue on an `asyncio.Lock`, so concurrent tasks wait their turn in
order instead of polling SQLite's lock (writers in other processes are
handled by `BEGIN IMMEDIATE` and the busy timeout).
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Generic, Self, TypedDict, TypeVar, Unpack, cast, overload

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from . import migrate as _migrate
from ._checks import (
    MAX_BATCH_SIZE,
    check_batch_size,
    check_int,
    positive_seconds,
    valid_actor,
    valid_identifier,
    valid_reason,
    valid_scope_name,
    valid_user_id,
)
from ._driver import PendingWrite, Row, Scope, is_retryable, operations_for
from ._translate import describe, storage_errors
from .codec import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    JsonObject,
    StateCodec,
    decode_metadata,
    encode_metadata,
)
from .engine import EngineSettings, create_engine, install_sqlite_settings
from .errors import ConfigurationError, SnapshotValidationError, VersionConflictError
from .health import HealthReport, probe
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

DEFAULT_NAMESPACE = "default"
NO_TENANT = ""
DEFAULT_HEALTH_TIMEOUT = 3.0
DEFAULT_OPERATION_TIMEOUT = 30.0
_CLOSE_TIMEOUT = 5.0
_MAX_VERSION = 2**63 - 1  # the BIGINT version column

logger = logging.getLogger("snapshot_repo")
_ResultT = TypeVar("_ResultT")


class RepositoryOptions(TypedDict, total=False):
    """Keyword options of `SnapshotRepository` and `SnapshotRepository.from_url`.

    Attributes:
        max_payload_bytes: largest serialized state accepted (default 1 MiB,
            at most 16 MiB).
        health_timeout: seconds `health()`/`health_check()` wait at most (default 3).
        operation_timeout: seconds any other call may take, pool wait
            included, before it fails with `StorageError` (default 30; None: no limit).
        namespace: which of a user's states this repository holds (default
            "default"): repositories of different models share the tables
            under different namespaces, so one user can have a cart, preferences
            and an agent memory, each typed by its own model.
    """

    namespace: str
    max_payload_bytes: int
    health_timeout: float
    operation_timeout: float | None


class SnapshotRepository(Generic[StateT]):
    """Latest state and full history of each user's snapshots, typed by one model.

    Args:
        engine: an async engine on SQLite (aiosqlite) or Postgres (asyncpg).
            The repository does not dispose an engine it was given; use
            `from_url` to let it own one.
        state_type: the pydantic model (or other pydantic-validatable type) of
            the states; None stores plain JSON objects (`dict`).
        **options: see `RepositoryOptions`: `namespace`, `max_payload_bytes`,
            `health_timeout`, `operation_timeout`.

    No I/O happens in the constructor.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        state_type: type[StateT] | None = None,
        **options: Unpack[RepositoryOptions],
    ) -> None:
        dialect = engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise ConfigurationError(f"unsupported database {dialect!r}: use SQLite or Postgres")
        self._engine = engine
        self._scope = Scope(
            tenant=NO_TENANT,
            namespace=valid_scope_name("namespace", options.get("namespace", DEFAULT_NAMESPACE)),
        )
        self._owns_engine = False
        self._codec: StateCodec[StateT] = StateCodec(
            state_type, options.get("max_payload_bytes", DEFAULT_MAX_PAYLOAD_BYTES)
        )
        self._snapshot_type: type[Snapshot[StateT]] = Snapshot[self._codec.state_type]  # type: ignore[name-defined]
        self._health_timeout = positive_seconds(
            "health_timeout", options.get("health_timeout", DEFAULT_HEALTH_TIMEOUT)
        )
        operation_timeout = options.get("operation_timeout", DEFAULT_OPERATION_TIMEOUT)
        self._operation_timeout = (
            None
            if operation_timeout is None
            else positive_seconds("operation_timeout", operation_timeout)
        )
        if dialect == "sqlite":
            install_sqlite_settings(engine, EngineSettings())
        self._ops = operations_for(engine)

    @overload
    @classmethod
    def from_url(
        cls,
        url: str | URL,
        state_type: None = None,
        *,
        settings: EngineSettings | None = None,
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
        **options: Unpack[RepositoryOptions],
    ) -> SnapshotRepository[StateT]: ...

    @classmethod
    def from_url(
        cls,
        url: str | URL,
        state_type: type[Any] | None = None,
        *,
        settings: EngineSettings | None = None,
        **options: Unpack[RepositoryOptions],
    ) -> SnapshotRepository[Any]:
        """A repository that owns an engine created from `url`; `close()` disposes it.

        `sqlite://` and `postgresql://` URLs are mapped to aiosqlite and asyncpg.
        `settings` are the connection settings (timeouts, pool, SQLite pragmas).

        Raises:
            ConfigurationError: the URL is not SQLite or Postgres, or a setting is invalid.
        """
        engine = create_engine(url, settings)
        try:
            repository = cls(engine, state_type, **options)
        except BaseException:
            # Nothing has connected yet, so dropping the engine's (empty) pool is enough.
            engine.sync_engine.dispose(close=False)
            raise
        repository._owns_engine = True
        return repository

    @property
    def engine(self) -> AsyncEngine:
        """The engine this repository runs on."""
        return self._engine

    @property
    def namespace(self) -> str:
        """Which of a user's states this repository holds."""
        return self._scope.namespace

    @property
    def tenant(self) -> str | None:
        """The tenant this view is confined to; None for the repository itself."""
        return self._scope.tenant or None

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
        view._scope = Scope(tenant=valid_scope_name("tenant", tenant), namespace=self.namespace)
        view._owns_engine = False
        return view

    async def migrate(self) -> None:
        """Upgrade the schema to the newest revision this package ships.

        Idempotent, and safe to call from several processes at once (an
        advisory lock on Postgres, the write lock on SQLite, serialize them).

        Raises:
            StorageError: the database failed or refused a migration.
        """
        async with storage_errors("migrate"):  # no operation timeout: migrations may be slow
            await _migrate.upgrade(self._engine)

    async def upsert_latest(
        self,
        snapshot: Snapshot[StateT] | Snapshot[Any],
        *,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
        actor: str | None = None,
        reason: str | None = None,
        metadata: JsonObject | None = None,
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
        if not isinstance(snapshot, Snapshot):
            raise SnapshotValidationError(
                f"upsert_latest takes a Snapshot, not {type(snapshot).__name__}"
            )
        user_id = valid_user_id(snapshot.user_id)
        if expected_version is not None:
            check_int("expected_version", expected_version, minimum=0, maximum=_MAX_VERSION)
        if idempotency_key is not None:
            valid_identifier("idempotency_key", idempotency_key, MAX_IDEMPOTENCY_KEY_LENGTH)
        state = self._codec.validate(snapshot.state, user_id)
        write = PendingWrite(
            scope=self._scope,
            user_id=user_id,
            schema_version=snapshot.schema_version,
            payload=self._codec.encode(state, user_id),
            created_at=datetime.now(UTC),
            expected_version=expected_version,
            idempotency_key=idempotency_key,
            actor=valid_actor(actor),
            reason=valid_reason(reason),
            metadata=encode_metadata(metadata),
        )
        async with self._guard("upsert_latest", user_id):
            outcome = await self._ops.write(write)
            if outcome is None:
                actual = await self._ops.current_version(self._scope, user_id)
        if outcome is None:
            raise VersionConflictError(user_id, cast(int, expected_version), actual)
        if isinstance(outcome, tuple):
            return self._to_snapshot(outcome)  # the earlier write with this idempotency key
        return self._stored(write, state, outcome)

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
        if isinstance(snapshots, Snapshot) or not isinstance(snapshots, Sequence):
            raise SnapshotValidationError("upsert_many takes a sequence of Snapshots")
        check_batch_size("snapshots", len(snapshots))
        created_at = datetime.now(UTC)
        actor, reason = valid_actor(actor), valid_reason(reason)
        encoded_metadata = encode_metadata(metadata)
        writes, states = [], []
        for snapshot in snapshots:
            if not isinstance(snapshot, Snapshot):
                raise SnapshotValidationError(
                    f"upsert_many takes Snapshots, not {type(snapshot).__name__}"
                )
            user_id = valid_user_id(snapshot.user_id)
            state = self._codec.validate(snapshot.state, user_id)
            states.append(state)
            writes.append(
                PendingWrite(
                    scope=self._scope,
                    user_id=user_id,
                    schema_version=snapshot.schema_version,
                    payload=self._codec.encode(state, user_id),
                    created_at=created_at,
                    actor=actor,
                    reason=reason,
                    metadata=encoded_metadata,
                )
            )
        async with self._guard("upsert_many", None):
            versions = await self._ops.write_many(writes)
        return [
            self._stored(write, state, version)
            for write, state, version in zip(writes, states, versions, strict=True)
        ]

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
        if isinstance(user_ids, str) or not isinstance(user_ids, Sequence):
            raise SnapshotValidationError("get_latest_many takes a sequence of user ids")
        check_batch_size("user_ids", len(user_ids))
        wanted = list(dict.fromkeys(valid_user_id(user_id) for user_id in user_ids))
        async with self._guard("get_latest_many", None):
            rows = await self._read(self._ops.latest_many, self._scope, wanted)
        return {snapshot.user_id: snapshot for snapshot in map(self._to_snapshot, rows)}

    async def get_latest(self, user_id: str) -> Snapshot[StateT] | None:
        """The user's newest snapshot, or None if the user has none.

        Raises:
            SnapshotValidationError: bad user id, or the stored state no
                longer validates against the model.
            StorageError: the database failed or the operation timed out.
        """
        user_id = valid_user_id(user_id)
        async with self._guard("get_latest", user_id):
            row = await self._read(self._ops.latest, self._scope, user_id)
        return None if row is None else self._to_snapshot(row)

    async def get_history(
        self, user_id: str, limit: int = 100, *, skip_invalid: bool = False
    ) -> list[Snapshot[StateT]]:
        """The user's newest `limit` versions, newest first (empty if none).

        Costs O(limit) whatever the length of the history: a backward scan of
        the `(user_id, version)` primary key.

        Args:
            user_id: whose history.
            limit: how many versions at most, 1 to 10,000.
            skip_invalid: leave out (and log a warning for) stored states that
                no longer validate against the model, instead of raising.

        Raises:
            SnapshotValidationError: bad user id, `limit` outside 1 to 10,000,
                or (unless `skip_invalid`) a stored state that no longer validates.
            StorageError: the database failed or the operation timed out.
        """
        user_id = valid_user_id(user_id)
        check_int("limit", limit, minimum=1, maximum=MAX_HISTORY_LIMIT)
        async with self._guard("get_history", user_id):
            rows = await self._read(self._ops.history, self._scope, user_id, limit)
        if not skip_invalid:
            return [self._to_snapshot(row) for row in rows]
        snapshots = []
        for row in rows:
            try:
                snapshots.append(self._to_snapshot(row))
            except SnapshotValidationError as exc:
                logger.warning("snapshot_repo skipped a stored state: %s", exc)
        return snapshots

    async def delete(self, user_id: str) -> int:
        """Erase the user's latest row and every history row, in one transaction.

        Idempotent. A user written again afterwards starts at version 1.

        Returns:
            How many versions were erased (0 when the user had none).

        Raises:
            SnapshotValidationError: bad user id.
            StorageError: the database failed; nothing was erased.
        """
        user_id = valid_user_id(user_id)
        async with self._guard("delete", user_id):
            return await self._ops.delete(self._scope, user_id, datetime.now(UTC))

    async def health(self) -> HealthReport:
        """A readiness report: reachable, round-trip latency, schema revision vs. head.

        Never raises, never waits longer than `health_timeout` seconds, and
        never creates anything (a missing SQLite file is reported, not created).
        """
        report = await probe(self._engine, self._health_timeout)
        if not report.healthy:
            logger.warning(
                "snapshot_repo is not ready: reachable=%s, schema %s of %s%s",
                report.reachable,
                report.database_revision,
                report.head_revision,
                f" ({report.error})" if report.error else "",
            )
        return report

    async def health_check(self) -> bool:
        """True only when the database is reachable and migrated to this package's head.

        Never raises, never waits longer than `health_timeout` seconds, and
        never creates anything. See `health()` for the reasons.
        """
        return (await self.health()).healthy

    async def close(self) -> None:
        """Close the pooled connections of an engine this repository owns (from `from_url`).

        An engine passed to the constructor belongs to the caller and stays open.
        """
        if self._owns_engine:
            await _dispose_within(self._engine, _CLOSE_TIMEOUT)

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
        url = self._engine.url.render_as_string(hide_password=True)
        tenant = f", tenant={self._scope.tenant!r}" if self._scope.tenant else ""
        return (
            f"SnapshotRepository({url!r}, {self._codec.state_type!r}, "
            f"namespace={self.namespace!r}{tenant})"
        )

    def _guard(self, operation: str, user_id: str | None) -> AbstractAsyncContextManager[None]:
        """Error translation plus the per-operation timeout, around one public call."""
        return storage_errors(operation, user_id, time_limit=self._operation_timeout)

    async def _read(self, fetch: Callable[..., Awaitable[_ResultT]], *args: Any) -> _ResultT:
        """Run a read; repeat it once if the connection turned out to be dead.

        A read is safe to repeat. This covers the first use of pooled
        connections after a database restart: the failed connection's whole
        pool generation is invalidated, so the repeat gets a fresh one.
        """
        try:
            return await fetch(*args)
        except Exception as exc:
            if not is_retryable(exc):
                raise
            logger.info("snapshot_repo repeating a read on a new connection: %s", describe(exc))
        return await fetch(*args)

    def _to_snapshot(self, row: Row) -> Snapshot[StateT]:
        (user_id, version, schema_version, payload, created_at, key, actor, reason, meta) = row
        return self._snapshot_type.model_construct(
            user_id=user_id,
            state=self._codec.decode(payload, user_id, version),
            version=version,
            created_at=created_at,
            schema_version=schema_version,
            idempotency_key=key,
            actor=actor,
            reason=reason,
            metadata=decode_metadata(meta),
        )

    def _stored(self, write: PendingWrite, state: StateT, version: int) -> Snapshot[StateT]:
        """The snapshot a write stored, built from what was sent (no read back)."""
        return self._snapshot_type.model_construct(
            user_id=write.user_id,
            state=state,
            version=version,
            created_at=write.created_at,
            schema_version=write.schema_version,
            idempotency_key=write.idempotency_key,
            actor=write.actor,
            reason=write.reason,
            metadata=decode_metadata(write.metadata),
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
