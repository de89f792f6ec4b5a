"""The sides: one interface for every implementation timed, and the library's own sides.

A side is one way of doing the operations every workload times (the
library on its fast backend, the library on its `core` backend, a raw
driver, the plain-SQLAlchemy peer). The raw sides live in `asyncpg_side`
and `sqlite_sides`, the peer in `peer`.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Protocol

from snapshot_repo import Snapshot, SnapshotRepository

from .config import CORE, LIBRARY
from .state import BenchState

__all__ = ["CHECKPOINT", "CoreSide", "LibrarySide", "Side", "SnapshotLike"]

CHECKPOINT = "PRAGMA wal_checkpoint(TRUNCATE)"
"""What the library's SQLite erasure runs after its commit, so erased bytes leave the WAL."""


class SnapshotLike(Protocol):
    """What both `Snapshot` and the raw baselines' rows offer, for the parity check."""

    @property
    def user_id(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def schema_version(self) -> int | None: ...

    @property
    def state(self) -> BenchState: ...

    @property
    def created_at(self) -> datetime | None: ...


class Side(abc.ABC):
    """One implementation of the operations every workload times."""

    name: str

    @abc.abstractmethod
    async def write(self, user_id: str, state: BenchState) -> int:
        """Store `state` as the user's next version; return that version."""

    @abc.abstractmethod
    async def get_latest(self, user_id: str) -> SnapshotLike | None:
        """The user's newest version, decoded."""

    @abc.abstractmethod
    async def get_history(self, user_id: str, limit: int) -> Sequence[SnapshotLike]:
        """The user's newest `limit` versions, newest first, decoded."""

    @abc.abstractmethod
    async def delete(self, user_id: str) -> int:
        """Erase the user; return how many versions were erased."""

    def traceless_delete_unavailable(self) -> str | None:
        """Why `traceless_delete` cannot run on this side, or None if it can."""
        return "only SQLite erasures checkpoint the WAL (elsewhere: see `delete`)"

    async def traceless_delete(self, user_id: str) -> int:
        """`delete`, then leave no byte of the user in the files, as the library's
        SQLite erasure does: checkpoint the WAL into the database file and truncate it."""
        raise NotImplementedError(self.traceless_delete_unavailable())

    def plain_delete_unavailable(self) -> str | None:
        """Why `plain_delete` cannot run on this side, or None if it can."""
        return self.traceless_delete_unavailable()  # both exist to split SQLite's erasure cost

    async def plain_delete(self, user_id: str) -> int:
        """`delete` without the checkpoint that makes the library's SQLite erasure
        traceless: what `delete` is on every side but the library's."""
        return await self.delete(user_id)

    def bulk_write_unavailable(self) -> str | None:
        """Why `bulk_write` cannot run on this side, or None if it can."""
        return None

    def bulk_read_unavailable(self) -> str | None:
        """Why `bulk_read` cannot run on this side, or None if it can."""
        return None

    @abc.abstractmethod
    async def bulk_write(self, items: Sequence[tuple[str, BenchState]]) -> object:
        """Store one new version for each (distinct) user of `items`, atomically."""

    @abc.abstractmethod
    async def bulk_read(self, user_ids: Sequence[str]) -> object:
        """The newest version of each of `user_ids`, decoded."""


class LibrarySide(Side):
    """The public `SnapshotRepository` API, as an application would call it.

    Building the `Snapshot` argument is inside the timed call: the API
    requires it, so it is part of what using the library costs. The
    repositories given decide the backend: the default (`backend="auto"`),
    the fast backend of the database, for this side.
    """

    name = LIBRARY

    def __init__(
        self,
        repo: SnapshotRepository[BenchState],
        untraced: SnapshotRepository[BenchState] | None = None,
    ) -> None:
        """`untraced`: the same database opened with `sqlite_secure_delete=False` (SQLite)."""
        self._repo = repo
        self._untraced = untraced
        # The bulk calls may not exist yet: detected, never assumed.
        upsert_many = getattr(repo, "upsert_many", None)
        get_latest_many = getattr(repo, "get_latest_many", None)
        self._upsert_many: Callable[[list[Snapshot[BenchState]]], Awaitable[object]] | None = (
            upsert_many if callable(upsert_many) else None
        )
        self._get_latest_many: Callable[[list[str]], Awaitable[object]] | None = (
            get_latest_many if callable(get_latest_many) else None
        )

    @property
    def repository(self) -> SnapshotRepository[BenchState]:
        """The repository this side calls (the tests check which backend it runs on)."""
        return self._repo

    async def write(self, user_id: str, state: BenchState) -> int:
        stored = await self._repo.upsert_latest(Snapshot(user_id=user_id, state=state))
        return stored.version

    async def get_latest(self, user_id: str) -> SnapshotLike | None:
        return await self._repo.get_latest(user_id)

    async def get_history(self, user_id: str, limit: int) -> Sequence[SnapshotLike]:
        return await self._repo.get_history(user_id, limit=limit)

    async def delete(self, user_id: str) -> int:
        return await self._repo.delete(user_id)

    def traceless_delete_unavailable(self) -> str | None:
        if self._repo.engine.dialect.name == "sqlite":
            return None
        return super().traceless_delete_unavailable()

    async def traceless_delete(self, user_id: str) -> int:
        return await self._repo.delete(user_id)  # its erasure checkpoints by itself

    def plain_delete_unavailable(self) -> str | None:
        if self._untraced is None:
            return super().plain_delete_unavailable() or "no repository with secure delete off"
        return None

    async def plain_delete(self, user_id: str) -> int:
        assert self._untraced is not None
        return await self._untraced.delete(user_id)  # the opt-out: no checkpoint

    def bulk_write_unavailable(self) -> str | None:
        return None if self._upsert_many else "SnapshotRepository has no upsert_many"

    def bulk_read_unavailable(self) -> str | None:
        return None if self._get_latest_many else "SnapshotRepository has no get_latest_many"

    async def bulk_write(self, items: Sequence[tuple[str, BenchState]]) -> object:
        assert self._upsert_many is not None
        return await self._upsert_many(
            [Snapshot(user_id=user_id, state=state) for user_id, state in items]
        )

    async def bulk_read(self, user_ids: Sequence[str]) -> object:
        assert self._get_latest_many is not None
        return await self._get_latest_many(list(user_ids))


class CoreSide(LibrarySide):
    """The same public API on repositories opened with `backend="core"`.

    Every call then runs through SQLAlchemy's public Core API (`AsyncConnection`)
    instead of the fast backend's compiled statements on the driver connection.
    Its erasures on SQLite checkpoint the WAL as the fast backend's do, so it runs
    every workload the library side runs, the same way.
    """

    name = CORE
