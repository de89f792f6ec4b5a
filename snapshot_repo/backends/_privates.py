"""Every private name of SQLAlchemy and aiosqlite the fast backends use, looked up here only.

The fast backends run calls on the driver connection that SQLAlchemy's pool
manages, which needs a few internals no public API offers:

- SQLAlchemy's `QueuePool._max_overflow` (the pool's capacity, for turns; its
  size and timeout have public accessors, used instead);
- a pooled connection's record start time against the pool's invalidation
  time (`_connection_record.starttime`, `_invalidate_time`), and
  `Pool._invalidate` to drop a whole pool generation after a lost connection,
  as SQLAlchemy itself does;
- aiosqlite's `Connection._execute` (run a function on the connection's
  thread: a whole write transaction in one hop) and `Connection._conn` (the
  `sqlite3.Connection`, for reads on the loop's thread).

`pyproject.toml` pins only lower bounds, so a release may rename any of
these. `missing_for(engine)` names the first one missing for an engine; the
backend picker then runs that engine on the `core` backend (SQLAlchemy's
public API only) and warns once, instead of failing on the first call. The
connection record's `starttime` exists only once a connection is open, so
it is not probed; a rename there fails the first call with an AttributeError.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool, QueuePool

__all__ = [
    "connection_is_current",
    "invalidate_generation",
    "missing_for",
    "pool_capacity",
    "run_on_thread",
    "sqlite_connection",
    "warn_fallback",
]

_POOL_NAMES = ("_invalidate_time", "_invalidate")
_AIOSQLITE_NAMES = ("_execute", "_conn")
_warned: set[str] = set()


def missing_for(engine: AsyncEngine) -> str | None:
    """The first private name the fast backend of `engine` needs and cannot find, or None."""
    pool = engine.sync_engine.pool
    for name in _POOL_NAMES:
        if not hasattr(pool, name):
            return f"sqlalchemy Pool.{name}"
    if isinstance(pool, QueuePool) and not hasattr(pool, "_max_overflow"):
        return "sqlalchemy QueuePool._max_overflow"
    if engine.dialect.name == "sqlite":
        try:
            import aiosqlite
        except ImportError:  # pragma: no cover - aiosqlite is a dependency
            return "aiosqlite"
        for name in _AIOSQLITE_NAMES:
            if not hasattr(aiosqlite.Connection, name):
                return f"aiosqlite Connection.{name}"
    return None


def warn_fallback(missing: str) -> None:
    """Warn, once per missing name and process, that an engine runs on the core backend."""
    if missing in _warned:
        return
    _warned.add(missing)
    warnings.warn(
        f"snapshot_repo: {missing} is missing in the installed version, so this engine "
        "runs on the slower core backend (SQLAlchemy's public API); please report it",
        RuntimeWarning,
        stacklevel=4,
    )


def pool_capacity(pool: Pool) -> tuple[int, int | None, float]:
    """(size, size + max overflow or None for no limit, timeout) of the engine's pool."""
    if not isinstance(pool, QueuePool):
        return 0, None, 30.0
    size = pool.size()
    overflow: int = pool._max_overflow
    return size, (size + overflow if overflow >= 0 else None), pool.timeout()


def connection_is_current(fairy: Any, pool: Pool) -> bool:
    """Whether a kept connection was opened after the pool last invalidated its connections."""
    record = fairy._connection_record
    return record is not None and record.starttime >= pool._invalidate_time


def invalidate_generation(pool: Pool, fairy: Any, exc: BaseException) -> None:
    """Invalidate `fairy` and every connection opened before it (SQLAlchemy's disconnect)."""
    pool._invalidate(fairy, exc)


def run_on_thread(aconn: Any, function: Callable[..., Any], *args: Any) -> Any:
    """aiosqlite: run `function(*args)` on the connection's thread (an awaitable)."""
    return aconn._execute(function, *args)


def sqlite_connection(aconn: Any) -> Any:
    """aiosqlite: the `sqlite3.Connection` behind an aiosqlite connection."""
    return aconn._conn
