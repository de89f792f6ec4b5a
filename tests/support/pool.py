"""Typed access to the connection pool behind a repository's engine."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from snapshot_repo import SnapshotRepository

__all__ = ["leaked_connections", "queue_pool"]


def queue_pool(engine: AsyncEngine) -> QueuePool:
    """The engine's pool, which this library always makes a `QueuePool` (file or server DBs).

    Its `checkedout()` counts connections lent out and not returned (leaks
    show here), `checkedin()` the idle connections kept for reuse.
    """
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool), f"expected a QueuePool, not {type(pool).__name__}"
    return pool


def leaked_connections(repo: SnapshotRepository[Any]) -> int:
    """Connections lent out by the pool and not returned, beyond those the repository keeps.

    A repository keeps up to two idle connections checked out between its
    operations (to skip the pool's greenlet round trip); those are not leaks.
    """
    return queue_pool(repo.engine).checkedout() - repo._backend.kept_connections
