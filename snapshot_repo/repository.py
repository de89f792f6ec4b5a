"""`SnapshotRepository`: typed, versioned per-user state over an async SQLAlchemy engine.

Each public method is one transaction (or one autocommitted statement) that
validates its input first, then does its I/O inside `storage_errors`, so a
caller sees either a result or one of the errors in `snapshot_repo.errors`.

Concurrency: one repository may be shared by any number of tasks; every call
checks out its own pooled connection. On SQLite, writes from one repository
also queue on an `asyncio.Lock`, so concurrent tasks wait their turn in
order instead of polling SQLite's lock (writers in other processes are
handled by `BEGIN IMMEDIATE` and the busy timeout).

The class is assembled from one module per capability: `_core` (settings,
scope, error guard), `_feed` (change feed and listeners), `_contract` (seed
002: writes, latest, history, delete), `_history_reads` (versions, moments,
diffs, listing) and `_lifecycle` (restore, merge, purge, payload upgrades).
"""

from __future__ import annotations

from typing import Any, Unpack, overload

from sqlalchemy.engine import URL

from ._checks import MAX_BATCH_SIZE
from ._contract import MAX_HISTORY_LIMIT
from ._core import DEFAULT_NAMESPACE, RepositoryOptions
from ._driver import KEPT_CONNECTIONS
from ._lifecycle import Lifecycle
from .codec import JsonObject
from .engine import EngineSettings, create_engine
from .snapshot import StateT

__all__ = [
    "DEFAULT_NAMESPACE",
    "MAX_BATCH_SIZE",
    "MAX_HISTORY_LIMIT",
    "RepositoryOptions",
    "SnapshotRepository",
]


class SnapshotRepository(Lifecycle[StateT]):
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
        repository._ops.keep_connections(KEPT_CONNECTIONS)  # released by close()
        return repository
