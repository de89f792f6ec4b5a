"""Turning driver and SQLAlchemy failures into `StorageError`s that say what failed.

Every public repository method runs its I/O inside `storage_errors(...)`, so
no driver exception reaches callers unchained, and messages carry the
operation, a redacted user id and the driver's own one-line reason, never
SQL parameters (which would hold payloads).
"""

from __future__ import annotations

import asyncio
import sqlite3
from types import TracebackType

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


class storage_errors:  # lower case, like `contextlib.suppress`: used as `async with`
    """Re-raise database failures inside the block as `StorageError` chained to the cause.

    With `time_limit`, the block is cancelled after that many seconds and a
    `StorageError` saying so is raised. Errors of this library pass through
    unchanged.

    A class rather than an `asynccontextmanager`: it wraps every public call,
    and a generator-based manager costs a few microseconds more per call,
    which shows on SQLite reads of about 100 us.
    """

    __slots__ = ("_deadline", "_operation", "_time_limit", "_user_id")

    def __init__(
        self, operation: str, user_id: str | None = None, *, time_limit: float | None = None
    ) -> None:
        self._operation = operation
        self._user_id = user_id
        self._time_limit = time_limit
        self._deadline = asyncio.timeout(time_limit)

    async def __aenter__(self) -> None:
        await self._deadline.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            await self._deadline.__aexit__(exc_type, exc, traceback)
        except TimeoutError as timeout:  # the deadline turned our cancellation into this
            exc = timeout
        if exc is not None:
            self._translate(exc)  # returns when `exc` is to propagate as it is

    def _translate(self, exc: BaseException) -> None:
        """Raise the library error that stands for `exc`; return if `exc` passes unchanged
        (this library's own errors, cancellation, programming errors)."""
        operation = self._operation
        subject = f" for user {redact(self._user_id)}" if self._user_id is not None else ""
        if isinstance(exc, ConnectionLostError):
            raise ConnectionLostError(f"{operation}{subject} failed: {exc}") from exc.__cause__
        if isinstance(exc, SnapshotRepoError):
            return
        if isinstance(exc, TimeoutError):
            if self._deadline.expired():
                raise StorageError(
                    f"{operation}{subject} timed out after {self._time_limit:g} s"
                ) from exc
            raise StorageError(f"{operation}{subject} failed: {describe(exc)}") from exc
        if isinstance(exc, _DRIVER_ERRORS):
            if _is_missing_table(exc):
                raise SchemaNotReadyError(
                    f"{operation}{subject} failed: the snapshot tables do not exist; run "
                    f"`await repo.migrate()` or `snapshot-repo migrate` ({describe(exc)})"
                ) from exc
            raise StorageError(f"{operation}{subject} failed: {describe(exc)}") from exc
