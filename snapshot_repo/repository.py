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
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Generic, Self, cast, overload

from sqlalchemy import Row
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import migrate as _migrate
from ._dialects import (
    DialectName,
    delete_statements,
    history_statement,
    latest_statement,
    version_statement,
    write_snapshot,
)
from ._translate import describe, storage_errors
from .codec import DEFAULT_MAX_PAYLOAD_BYTES, JsonObject, StateCodec
from .engine import (
    READ_ONLY,
    WRITE_TRANSACTION,
    EngineSettings,
    create_engine,
    install_sqlite_settings,
)
from .errors import ConfigurationError, SnapshotValidationError, VersionConflictError
from .snapshot import Snapshot, StateT, check_user_id

__all__ = ["MAX_HISTORY_LIMIT", "SnapshotRepository"]

MAX_HISTORY_LIMIT = 10_000
"""The most versions one `get_history` call returns; page or export for more."""

DEFAULT_HEALTH_TIMEOUT = 3.0
_MAX_VERSION = 2**63 - 1  # the BIGINT version column

logger = logging.getLogger("snapshot_repo")


class SnapshotRepository(Generic[StateT]):
    """Latest state and full history of each user's snapshots, typed by one model.

    Args:
        engine: an async engine on SQLite (aiosqlite) or Postgres (asyncpg).
            The repository does not dispose an engine it was given; use
            `from_url` to let it own one.
        state_type: the pydantic model (or other pydantic-validatable type) of
            the states; None stores plain JSON objects (`dict`).
        max_payload_bytes: largest serialized state accepted (default 1 MiB,
            at most 16 MiB).
        health_timeout: seconds `health_check` waits before answering False.

    No I/O happens in the constructor.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        state_type: type[StateT] | None = None,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        health_timeout: float = DEFAULT_HEALTH_TIMEOUT,
        _owns_engine: bool = False,
    ) -> None:
        dialect = engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise ConfigurationError(f"unsupported database {dialect!r}: use SQLite or Postgres")
        if health_timeout <= 0:
            raise ConfigurationError(f"health_timeout must be positive, not {health_timeout}")
        self._dialect = cast(DialectName, dialect)
        self._engine = engine
        self._owns_engine = _owns_engine
        self._codec: StateCodec[StateT] = StateCodec(state_type, max_payload_bytes)
        self._snapshot_type: type[Snapshot[StateT]] = Snapshot[self._codec.state_type]  # type: ignore[name-defined]
        self._health_timeout = health_timeout
        self._sqlite_write_lock = asyncio.Lock()
        if self._dialect == "sqlite":
            install_sqlite_settings(engine, EngineSettings())
            self._reads = engine.execution_options(**{READ_ONLY: True})
            self._writes = engine.execution_options(**{WRITE_TRANSACTION: True})
        else:
            # Single statements need no BEGIN/COMMIT round trips around them.
            self._reads = engine.execution_options(isolation_level="AUTOCOMMIT")
            self._writes = engine

    @overload
    @classmethod
    def from_url(
        cls,
        url: str | URL,
        state_type: None = None,
        *,
        settings: EngineSettings | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        health_timeout: float = DEFAULT_HEALTH_TIMEOUT,
    ) -> SnapshotRepository[JsonObject]: ...

    @overload
    @classmethod
    def from_url(
        cls,
        url: str | URL,
        state_type: type[StateT],
        *,
        settings: EngineSettings | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        health_timeout: float = DEFAULT_HEALTH_TIMEOUT,
    ) -> SnapshotRepository[StateT]: ...

    @classmethod
    def from_url(
        cls,
        url: str | URL,
        state_type: type[Any] | None = None,
        *,
        settings: EngineSettings | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        health_timeout: float = DEFAULT_HEALTH_TIMEOUT,
    ) -> SnapshotRepository[Any]:
        """A repository that owns an engine created from `url`; `close()` disposes it.

        `sqlite://` and `postgresql://` URLs are mapped to aiosqlite and asyncpg.

        Raises:
            ConfigurationError: the URL is not SQLite or Postgres, or a setting is invalid.
        """
        engine = create_engine(url, settings)
        try:
            return cls(
                engine,
                state_type,
                max_payload_bytes=max_payload_bytes,
                health_timeout=health_timeout,
                _owns_engine=True,
            )
        except BaseException:
            # Nothing has connected yet, so dropping the engine's (empty) pool is enough.
            engine.sync_engine.dispose(close=False)
            raise

    @property
    def engine(self) -> AsyncEngine:
        """The engine this repository runs on."""
        return self._engine

    async def migrate(self) -> None:
        """Upgrade the schema to the newest revision this package ships.

        Idempotent, and safe to call from several processes at once (an
        advisory lock on Postgres, the write lock on SQLite, serialize them).

        Raises:
            StorageError: the database failed or refused a migration.
        """
        async with storage_errors("migrate"):
            await _migrate.upgrade(self._engine)

    async def upsert_latest(
        self,
        snapshot: Snapshot[StateT] | Snapshot[Any],
        *,
        expected_version: int | None = None,
    ) -> Snapshot[StateT]:
        """Store `snapshot` as the user's next version, in `latest` and `history` at once.

        Args:
            snapshot: the user id, the state and its schema version; the
                snapshot's own `version` and `created_at` are ignored.
            expected_version: compare-and-set. None writes unconditionally;
                0 writes only if the user has no snapshot yet; N writes only if
                the latest version is N.

        Returns:
            The stored snapshot, with the `version` and `created_at` assigned.

        Raises:
            SnapshotValidationError: bad user id, state or expected_version,
                or a payload over the size limit. Nothing was written.
            VersionConflictError: `expected_version` did not match. Nothing was written.
            StorageError: the database failed; the write was rolled back whole.
        """
        if not isinstance(snapshot, Snapshot):
            raise SnapshotValidationError(
                f"upsert_latest takes a Snapshot, not {type(snapshot).__name__}"
            )
        user_id = _valid_user_id(snapshot.user_id)
        if expected_version is not None:
            _check_int("expected_version", expected_version, minimum=0, maximum=_MAX_VERSION)
        state = self._codec.validate(snapshot.state, user_id)
        payload = self._codec.encode(state, user_id)
        created_at = datetime.now(UTC)
        async with storage_errors("upsert_latest", user_id):
            version = await self._write(
                user_id=user_id,
                schema_version=snapshot.schema_version,
                payload=payload,
                created_at=created_at,
                expected_version=expected_version,
            )
            if version is None:
                actual = await self._current_version(user_id)
        if version is None:
            raise VersionConflictError(user_id, cast(int, expected_version), actual)
        return self._snapshot_type.model_construct(
            user_id=user_id,
            state=state,
            version=version,
            created_at=created_at,
            schema_version=snapshot.schema_version,
        )

    async def get_latest(self, user_id: str) -> Snapshot[StateT] | None:
        """The user's newest snapshot, or None if the user has none.

        Raises:
            SnapshotValidationError: bad user id, or the stored state no
                longer validates against the model.
            StorageError: the database failed.
        """
        user_id = _valid_user_id(user_id)
        async with storage_errors("get_latest", user_id), self._reads.connect() as conn:
            row = (await conn.execute(latest_statement(), {"user_id": user_id})).one_or_none()
        return None if row is None else self._to_snapshot(row)

    async def get_history(self, user_id: str, limit: int = 100) -> list[Snapshot[StateT]]:
        """The user's newest `limit` versions, newest first (empty if none).

        Costs O(limit) whatever the length of the history: a backward scan of
        the `(user_id, version)` primary key.

        Raises:
            SnapshotValidationError: bad user id, `limit` outside 1 to 10,000,
                or a stored state that no longer validates.
            StorageError: the database failed.
        """
        user_id = _valid_user_id(user_id)
        _check_int("limit", limit, minimum=1, maximum=MAX_HISTORY_LIMIT)
        params = {"user_id": user_id, "limit": limit}
        async with storage_errors("get_history", user_id), self._reads.connect() as conn:
            rows = (await conn.execute(history_statement(), params)).all()
        return [self._to_snapshot(row) for row in rows]

    async def delete(self, user_id: str) -> int:
        """Erase the user's latest row and every history row, in one transaction.

        Idempotent. A user written again afterwards starts at version 1.

        Returns:
            How many versions were erased (0 when the user had none).

        Raises:
            SnapshotValidationError: bad user id.
            StorageError: the database failed; nothing was erased.
        """
        user_id = _valid_user_id(user_id)
        lock, delete_history, delete_latest = delete_statements()
        params = {"user_id": user_id}
        async with storage_errors("delete", user_id), self._write_transaction() as conn:
            await conn.execute(lock, params)
            erased = (await conn.execute(delete_history, params)).rowcount
            await conn.execute(delete_latest, params)
        return int(erased)

    async def health_check(self) -> bool:
        """True when the database answers a query and its schema is at this package's head.

        Never raises and never waits longer than the repository's
        `health_timeout` (seconds). Never creates anything: a missing SQLite
        file is unhealthy, not created.
        """
        try:
            async with asyncio.timeout(self._health_timeout):
                return await self._schema_is_current()
        except Exception as exc:
            logger.warning("snapshot_repo health check failed: %s", describe(exc))
            return False

    async def close(self) -> None:
        """Close the pooled connections of an engine this repository owns (from `from_url`).

        An engine passed to the constructor belongs to the caller and stays open.
        """
        if self._owns_engine:
            await self._engine.dispose()

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
        return f"SnapshotRepository({url!r}, {self._codec.state_type!r})"

    async def _write(self, **values: Any) -> int | None:
        if self._dialect == "postgresql":
            # One autocommitted statement: the CTE writes latest and history atomically.
            async with self._reads.connect() as conn:
                return await write_snapshot(conn, self._dialect, **values)
        async with self._write_transaction() as conn:
            return await write_snapshot(conn, self._dialect, **values)

    @asynccontextmanager
    async def _write_transaction(self) -> AsyncIterator[AsyncConnection]:
        lock = self._sqlite_write_lock if self._dialect == "sqlite" else nullcontext()
        async with lock, self._writes.begin() as conn:
            yield conn

    async def _current_version(self, user_id: str) -> int:
        async with self._reads.connect() as conn:
            version = (await conn.execute(version_statement(), {"user_id": user_id})).scalar()
        return int(version or 0)

    async def _schema_is_current(self) -> bool:
        database = self._engine.url.database
        on_disk = self._dialect == "sqlite" and database not in (None, "", ":memory:")
        if on_disk and not await asyncio.to_thread(os.path.exists, str(database)):
            logger.warning("snapshot_repo health check: SQLite file %s is missing", database)
            return False
        revision = await _migrate.current_revision(self._reads)
        head = _migrate.head_revision()
        if revision != head:
            logger.warning(
                "snapshot_repo health check: schema at %s, this package needs %s", revision, head
            )
            return False
        return True

    def _to_snapshot(self, row: Row[Any]) -> Snapshot[StateT]:
        values = row._mapping
        state = self._codec.decode(values["payload"], values["user_id"], values["version"])
        return self._snapshot_type.model_construct(
            user_id=values["user_id"],
            state=state,
            version=values["version"],
            created_at=values["created_at"],
            schema_version=values["schema_version"],
        )


def _valid_user_id(user_id: object) -> str:
    if not isinstance(user_id, str):
        raise SnapshotValidationError(f"user_id must be a string, not {type(user_id).__name__}")
    try:
        return check_user_id(user_id)
    except ValueError as exc:
        raise SnapshotValidationError(str(exc)) from None


def _check_int(name: str, value: object, *, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SnapshotValidationError(f"{name} must be an integer, not {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise SnapshotValidationError(f"{name} must be {bound}, not {value}")
