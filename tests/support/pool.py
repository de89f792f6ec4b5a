"""Typed access to the connection pool behind a repository's engine."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

__all__ = ["queue_pool"]


def queue_pool(engine: AsyncEngine) -> QueuePool:
    """The engine's pool, which this library always makes a `QueuePool` (file or server DBs).

    Its `checkedout()` counts connections lent out and not returned (leaks
    show here), `checkedin()` the idle connections kept for reuse.
    """
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool), f"expected a QueuePool, not {type(pool).__name__}"
    return pool
