"""The repository's shared machinery: configuration, scope, error guard, row conversion.

`SnapshotRepository` is assembled from this core and one mixin per
capability (`_history_reads`, `_feed`, ...), so each capability lives in a
module of its own while callers see one class.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Any, Generic, ParamSpec, Self, TypedDict, TypeVar, Unpack

from sqlalchemy.ext.asyncio import AsyncEngine

from . import migrate as _migrate
from ._checks import positive_seconds, valid_scope_name
from ._closing import AsyncClosing
from ._dialects import DialectName
from ._driver import (
    DataKeyChanged,
    PendingBatch,
    PendingWrite,
    Row,
    Scope,
    WriteOutcome,
    is_retryable,
    operations_for,
)
from ._encryption import DataKeys
from ._translate import describe, storage_errors
from .changes import hub_for
from .codec import DEFAULT_MAX_PAYLOAD_BYTES, StateCodec, decode_metadata
from .crypto import KeyProvider
from .engine import EngineSettings, install_sqlite_settings
from .errors import ConfigurationError, SnapshotRepoError, StorageError
from .health import HealthReport, probe
from .retention import RetentionPolicy
from .snapshot import Snapshot, StateT, stored_snapshot
from .upgrades import PayloadUpgrades, Upgrader

__all__ = ["DEFAULT_NAMESPACE", "RepositoryCore", "RepositoryOptions"]

DEFAULT_NAMESPACE = "default"
NO_TENANT = ""
DEFAULT_HEALTH_TIMEOUT = 3.0
DEFAULT_OPERATION_TIMEOUT = 30.0
_CLOSE_TIMEOUT = 5.0
_KEY_ATTEMPTS = 5
"""How often a write reseals under a new data key when erasures keep destroying it."""
_KEY_CHURN = (
    f"the user's data key was destroyed or replaced {_KEY_ATTEMPTS} times while writing "
    "(concurrent erasures); nothing was written"
)

logger = logging.getLogger("snapshot_repo")
_ResultT = TypeVar("_ResultT")
_P = ParamSpec("_P")


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
        notify: on Postgres, send a NOTIFY with every write and erasure, so
            listeners in other processes hear of it at once (default off).
            NOTIFY holds a cluster-wide lock until commit, so notifying writes
            cannot share WAL flushes: measured 4x fewer concurrent writes per
            second. Without it, listeners hear of this process's changes only,
            and other processes catch up through `changes_since`.
        encryption: a `KeyProvider` (e.g. `LocalKeyProvider`): payloads are
            then encrypted under a per-user data key that erasure destroys
            (crypto-shredding; needs the `snapshot-repo[crypto]` extra).
        erasure_key: the secret (at least 16 bytes) that keys the HMAC of
            user ids in erasure receipts. Without it no receipts are written.
            Keep it outside the database: with it, a receipt confirms a
            person was erased; without it, a receipt identifies no one.
        retention: a `RetentionPolicy`; each write then drops the user's
            history versions the policy no longer keeps, in the same transaction.
        schema_version: the schema version of today's model (default 1);
            writes are stored under it unless a snapshot names another.
        upgraders: `{n: fn}` upgrading a state document from schema version
            n to n + 1, applied when older rows are read (see `upgrades`).
    """

    namespace: str
    notify: bool
    encryption: KeyProvider
    erasure_key: bytes | str
    retention: RetentionPolicy
    schema_version: int
    upgraders: Mapping[int, Upgrader]
    max_payload_bytes: int
    health_timeout: float
    operation_timeout: float | None


class RepositoryCore(AsyncClosing, Generic[StateT]):
    """What every capability of `SnapshotRepository` builds on (arguments documented there)."""

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
        self._dialect_name: DialectName = "postgresql" if dialect == "postgresql" else "sqlite"
        self._scope = Scope(
            tenant=NO_TENANT,
            namespace=valid_scope_name("namespace", options.get("namespace", DEFAULT_NAMESPACE)),
        )
        self._owns_engine = False
        self._codec: StateCodec[StateT] = StateCodec(
            state_type,
            options.get("max_payload_bytes", DEFAULT_MAX_PAYLOAD_BYTES),
            PayloadUpgrades(
                options.get("schema_version", 1),
                options.get("upgraders"),
                any_version=state_type is None,
            ),
        )
        self._snapshot_type: type[Snapshot[StateT]] = Snapshot[self._codec.state_type]  # type: ignore[name-defined]
        self._erasure_key = _erasure_key(options.get("erasure_key"))
        self._notify = bool(options.get("notify", False)) and engine.dialect.name == "postgresql"
        self._retention = options.get("retention")
        if self._retention is not None and not isinstance(self._retention, RetentionPolicy):
            raise ConfigurationError("retention must be a RetentionPolicy")
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
        provider = options.get("encryption")
        if provider is not None and not isinstance(provider, KeyProvider):
            raise ConfigurationError("encryption must be a KeyProvider, e.g. LocalKeyProvider")
        self._keys = (
            None if provider is None else DataKeys(provider, self._ops, engine.dialect.name)
        )

    @property
    def engine(self) -> AsyncEngine:
        """The engine this repository runs on."""
        return self._engine

    @property
    def state_type(self) -> Any:
        """The type states are validated against (`JsonObject` for a repository without one)."""
        return self._codec.state_type

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

    async def health(self) -> HealthReport:
        """A readiness report: reachable, round-trip latency, schema revision vs. head.

        Never raises, never waits longer than `health_timeout` seconds, and
        never creates anything (a missing SQLite file is reported, not created).
        """
        report = await probe(self._engine, self._ops, self._health_timeout)
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
            return await self._ops.finish_erasures(seconds)

    async def close(self) -> None:
        """Close the pooled connections of an engine this repository owns (from `from_url`).

        An engine passed to the constructor belongs to the caller and stays open.
        """
        if self._owns_engine:
            try:
                await self.finish_erasures(wait=_CLOSE_TIMEOUT / 2)
            except SnapshotRepoError as exc:  # closing goes on: the erasures committed
                logger.warning("snapshot_repo: finishing erasures on close failed: %s", exc)
            await self._ops.release()  # views share it with their repository: only the owner
            hub = hub_for(self._engine, create=False)
            if hub is not None:
                await hub.close()
            await _dispose_within(self._engine, _CLOSE_TIMEOUT)

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

    async def _read(
        self, fetch: Callable[_P, Awaitable[_ResultT]], *args: _P.args, **kwargs: _P.kwargs
    ) -> _ResultT:
        """Run a read; repeat it once if the connection turned out to be dead.

        A read is safe to repeat. This covers the first use of pooled
        connections after a database restart: the failed connection's whole
        pool generation is invalidated, so the repeat gets a fresh one.
        """
        try:
            return await fetch(*args, **kwargs)
        except Exception as exc:
            if not is_retryable(exc):
                raise
            logger.info("snapshot_repo repeating a read on a new connection: %s", describe(exc))
        return await fetch(*args, **kwargs)

    def _to_snapshot(self, row: Row) -> Snapshot[StateT]:
        (user_id, version, schema_version, payload, created_at, key, actor, reason, meta) = row
        return stored_snapshot(
            self._snapshot_type,
            {
                "user_id": user_id,
                "state": self._codec.decode(payload, user_id, version, schema_version),
                "version": version,
                "created_at": created_at,
                "schema_version": schema_version,
                "idempotency_key": key,
                "actor": actor,
                "reason": reason,
                "metadata": decode_metadata(meta),
            },
        )

    async def _write(self, write: PendingWrite) -> WriteOutcome:
        """Run one write; when encrypting, sealed under the user's data key as it is at commit.

        If an erasure destroys the key (or a racer stores another first)
        between reading it and the write's commit, the backend rolls the
        write back (`DataKeyChanged`) and it is sealed and written again: a
        write after an erasure gets a new key, never a destroyed one.
        """
        keys = self._keys
        if keys is None:
            return await self._ops.write(write)
        for _attempt in range(_KEY_ATTEMPTS):
            key, ref = await keys.for_write(self._scope, write.user_id, write.created_at)
            payload = keys.seal_with(key, self._scope, write.user_id, write.payload)
            try:
                outcome = await self._ops.write(replace(write, payload=payload, data_key=ref))
            except DataKeyChanged:
                continue
            keys.remember(self._scope, write.user_id, key)
            return outcome
        raise StorageError(_KEY_CHURN)

    async def _write_many(self, batch: PendingBatch) -> list[int]:
        """`write_many`, sealing as `_write` does: every user's key checked at commit."""
        keys = self._keys
        if keys is None:
            return await self._ops.write_many(batch)
        for _attempt in range(_KEY_ATTEMPTS):
            found = {}
            for user_id in dict.fromkeys(batch.user_ids):
                found[user_id] = await keys.for_write(self._scope, user_id, batch.created_at)
            payloads = [
                keys.seal_with(found[user_id][0], self._scope, user_id, payload)
                for user_id, payload in zip(batch.user_ids, batch.payloads, strict=True)
            ]
            refs = {user_id: ref for user_id, (_key, ref) in found.items()}
            try:
                versions = await self._ops.write_many(
                    replace(batch, payloads=payloads, data_keys=refs)
                )
            except DataKeyChanged:
                continue
            for user_id, (key, _ref) in found.items():
                keys.remember(self._scope, user_id, key)
            return versions
        raise StorageError(_KEY_CHURN)

    async def _seal(self, user_id: str, payload: bytes) -> bytes:
        """The payload as stored: encrypted under the user's data key when encryption is on."""
        if self._keys is None:
            return payload
        return await self._keys.seal(self._scope, user_id, payload)

    async def _snapshot_rows(self, statement: Any, params: dict[str, Any]) -> list[Row]:
        """`ROW_COLUMNS` rows of a read statement: fetched (retried once), decoded, decrypted."""
        raw = await self._read(self._ops.fetch, statement, params)
        return await self._open([self._ops.decode_snapshot_row(row) for row in raw])

    async def _open(self, rows: Sequence[Row]) -> list[Row]:
        """Rows with their payloads decrypted (unchanged when encryption is off)."""
        if self._keys is None:
            return list(rows)
        return await self._keys.open_rows(self._scope, rows)

    def _receipt_subject(self, user_id: str) -> str | None:
        """The keyed hash that stands for `user_id` in erasure receipts (None: no receipts)."""
        if self._erasure_key is None:
            return None
        return hmac.new(self._erasure_key, user_id.encode(), hashlib.sha256).hexdigest()

    def _schema_version_of(self, snapshot: Snapshot[Any]) -> int:
        """The schema version a write is stored under: the snapshot's, else today's model's."""
        if snapshot.schema_version is None:
            return self._codec.upgrades.current
        self._codec.upgrades.check_writable(snapshot.schema_version)
        return snapshot.schema_version

    def _stored_batch(
        self, batch: PendingBatch, states: Sequence[StateT], versions: Sequence[int]
    ) -> list[Snapshot[StateT]]:
        """The snapshots a batch stored, in batch order (as `_stored`, the shared values once)."""
        shared = {
            "created_at": batch.created_at,
            "idempotency_key": None,
            "actor": batch.actor,
            "reason": batch.reason,
        }
        metadata = batch.metadata  # decoded per snapshot: each gets a dict of its own
        snapshot_type = self._snapshot_type
        return [
            stored_snapshot(
                snapshot_type,
                {
                    "user_id": user_id,
                    "state": state,
                    "version": version,
                    "schema_version": schema_version,
                    "metadata": None if metadata is None else decode_metadata(metadata),
                    **shared,
                },
            )
            for user_id, state, version, schema_version in zip(
                batch.user_ids, states, versions, batch.schema_versions, strict=True
            )
        ]

    def _stored(self, write: PendingWrite, state: StateT, version: int) -> Snapshot[StateT]:
        """The snapshot a write stored, built from what was sent (no read back)."""
        return stored_snapshot(
            self._snapshot_type,
            {
                "user_id": write.user_id,
                "state": state,
                "version": version,
                "created_at": write.created_at,
                "schema_version": write.schema_version,
                "idempotency_key": write.idempotency_key,
                "actor": write.actor,
                "reason": write.reason,
                "metadata": decode_metadata(write.metadata),
            },
        )


def _erasure_key(key: object) -> bytes | None:
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes) or len(key) < 16:
        raise ConfigurationError("erasure_key must be bytes or str of at least 16 bytes")
    return key


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
