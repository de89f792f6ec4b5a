"""Turning driver and SQLAlchemy failures into `StorageError`s that say what failed.

Every public repository method runs its I/O inside `storage_errors(...)`, so
no driver exception reaches callers unchained, and messages carry the
operation, a redacted user id and the driver's own one-line reason, never
SQL parameters (which would hold payloads).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from .errors import (
    ConnectionLostError,
    SchemaNotReadyError,
    SnapshotRepoError,
    StorageError,
    redact,
)

__all__ = ["describe", "storage_errors"]

_DRIVER_ERRORS = (
    SQLAlchemyError,
    OSError,
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
_UNDEFINED_TABLE = "42P01"


def describe(exc: BaseException) -> str:
    """One line naming the driver's exception class and message, without SQL or parameters."""
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    # SQLAlchemy's asyncpg adapter wraps asyncpg's exception: name the original.
    cause = orig.__cause__
    if isinstance(cause, Exception) and type(orig).__module__.startswith("sqlalchemy"):
        orig = cause
    lines = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {lines[0]}" if lines else type(orig).__name__


def _is_missing_table(exc: BaseException) -> bool:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code == _UNDEFINED_TABLE or "no such table" in str(orig)


@asynccontextmanager
async def storage_errors(
    operation: str, user_id: str | None = None, *, time_limit: float | None = None
) -> AsyncIterator[None]:
    """Re-raise database failures inside the block as `StorageError` chained to the cause.

    With `time_limit`, the block is cancelled after that many seconds and a
    `StorageError` saying so is raised. Errors of this library pass through
    unchanged.
    """
    subject = f" for user {redact(user_id)}" if user_id is not None else ""
    deadline = asyncio.timeout(time_limit)
    try:
        async with deadline:
            yield
    except ConnectionLostError as exc:
        raise ConnectionLostError(f"{operation}{subject} failed: {exc}") from exc.__cause__
    except SnapshotRepoError:
        raise
    except TimeoutError as exc:
        if deadline.expired():
            raise StorageError(f"{operation}{subject} timed out after {time_limit:g} s") from exc
        raise StorageError(f"{operation}{subject} failed: {describe(exc)}") from exc
    except _DRIVER_ERRORS as exc:
        if _is_missing_table(exc):
            raise SchemaNotReadyError(
                f"{operation}{subject} failed: the snapshot tables do not exist; run "
                f"`await repo.migrate()` or `snapshot-repo migrate` ({describe(exc)})"
            ) from exc
        raise StorageError(f"{operation}{subject} failed: {describe(exc)}") from exc
