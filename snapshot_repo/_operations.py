"""Operating a repository: its schema, its readiness, its erasures' last traces, closing.

Methods of `SnapshotRepository` (its class assigns them), taking the
repository as `self`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine

from . import migrate as _migrate
from ._checks import positive_seconds
from ._context import logger
from ._telemetry import traced
from ._translate import storage_errors
from .changes import hub_for
from .errors import SnapshotRepoError
from .health import HealthReport, probe

if TYPE_CHECKING:
    from .repository import SnapshotRepository

__all__ = ["close", "dispose_within", "finish_erasures", "health", "health_check", "migrate"]

_CLOSE_TIMEOUT = 5.0


@traced
async def migrate(self: SnapshotRepository[Any]) -> None:
    """Upgrade the schema to the newest revision this package ships.

    Idempotent, and safe to call from several processes at once (an
    advisory lock on Postgres, the write lock on SQLite, serialize them).

    Raises:
        StorageError: the database failed or refused a migration.
    """
    async with storage_errors("migrate"):  # no operation timeout: migrations may be slow
        await _migrate.upgrade(self._context.engine)


@traced
async def health(self: SnapshotRepository[Any]) -> HealthReport:
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
async def health_check(self: SnapshotRepository[Any]) -> bool:
    """True only when the database is reachable and migrated to this package's head.

    Never raises, never waits longer than `health_timeout` seconds, and
    never creates anything. See `health()` for the reasons.
    """
    return (await self.health()).healthy


@traced
async def finish_erasures(self: SnapshotRepository[Any], wait: float = 5.0) -> bool:
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


async def close(self: SnapshotRepository[Any]) -> None:
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
        await dispose_within(engine, _CLOSE_TIMEOUT)


async def dispose_within(engine: AsyncEngine, seconds: float) -> None:
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
