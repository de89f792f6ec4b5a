"""Turning driver and SQLAlchemy failures into `StorageError`s that say what failed.

Every public repository method runs its I/O inside `storage_errors(...)`, so
no driver exception reaches callers unchained, and messages carry the
operation, a redacted user id and the driver's own one-line reason, never
SQL parameters (which would hold payloads).
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from . import _deadlines
from ._deadlines import Deadline
from .errors import (
    ConnectionLostError,
    SchemaNotReadyError,
    SnapshotRepoError,
    StorageError,
    redact,
)

__all__ = [
    "describe",
    "is_missing_schema",
    "register_driver_errors",
    "register_missing_schema",
    "storage_errors",
]

_DRIVER_ERRORS: tuple[type[BaseException], ...] = (SQLAlchemyError, OSError)
"""Exceptions that mean "the database failed"; each backend adds its driver's own."""
_UNDEFINED_TABLE = "42P01"
_UNDEFINED_FUNCTION = "42883"


def describe(exc: BaseException) -> str:
    """One line naming the driver's exception class and message, without SQL or parameters."""
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    # SQLAlchemy's asyncpg adapter wraps asyncpg's exception: name the original.
    cause = orig.__cause__
    if isinstance(cause, Exception) and type(orig).__module__.startswith("sqlalchemy"):
        orig = cause
    lines = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {lines[0]}" if lines else type(orig).__name__


def register_driver_errors(*classes: type[BaseException]) -> None:
    """Translate these exceptions (a backend's driver errors) into `StorageError`s too.

    Called by each backend module when it is imported, so the driver's
    exception classes are known to the backend that uses the driver, and
    nothing else imports a driver.
    """
    global _DRIVER_ERRORS
    _DRIVER_ERRORS = (*_DRIVER_ERRORS, *(c for c in classes if c not in _DRIVER_ERRORS))


_MISSING_SCHEMA_CHECKS: list[Callable[[BaseException], bool]] = []


def register_missing_schema(check: Callable[[BaseException], bool]) -> None:
    """Also read the errors `check` accepts as a missing table (a backend's driver's)."""
    _MISSING_SCHEMA_CHECKS.append(check)


def is_missing_schema(exc: BaseException) -> bool:
    """Whether `exc` says a table or function of this library's schema does not exist."""
    if any(check(exc) for check in _MISSING_SCHEMA_CHECKS):
        return True
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code == _UNDEFINED_FUNCTION:  # ours (0011 on): a database migrated by an older release
        return "snapshot_repo_" in str(orig)
    return code == _UNDEFINED_TABLE or "no such table" in str(orig)


class storage_errors:  # lower case, like `contextlib.suppress`: used as `async with`
    """Re-raise database failures inside the block as `StorageError` chained to the cause.

    With `time_limit`, the block is cancelled after that many seconds and a
    `StorageError` saying so is raised. Errors of this library pass through
    unchanged.

    It wraps every public call, so it is a class rather than an
    `asynccontextmanager`, and its deadline is registered with `_deadlines`
    rather than a timer of its own: together several microseconds a call.
    """

    __slots__ = ("_deadline", "_operation", "_time_limit", "_user_id")

    def __init__(
        self, operation: str, user_id: str | None = None, *, time_limit: float | None = None
    ) -> None:
        self._operation = operation
        self._user_id = user_id
        self._time_limit = time_limit
        self._deadline: Deadline | None = None

    async def __aenter__(self) -> None:
        if self._time_limit is not None:
            self._deadline = _deadlines.start(self._time_limit)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        deadline = self._deadline
        if deadline is not None:
            _deadlines.stop(deadline)
            if deadline.expired_for(exc_type):
                raise StorageError(
                    f"{self._operation}{self._subject()} timed out after {self._time_limit:g} s"
                ) from TimeoutError(f"operation_timeout of {self._time_limit:g} s")
        if exc is not None:
            self._translate(exc)  # returns when `exc` is to propagate as it is

    def _subject(self) -> str:
        return f" for user {redact(self._user_id)}" if self._user_id is not None else ""

    def _translate(self, exc: BaseException) -> None:
        """Raise the library error that stands for `exc`; return if `exc` passes unchanged
        (this library's own errors, cancellation, programming errors)."""
        operation, subject = self._operation, self._subject()
        if isinstance(exc, ConnectionLostError):
            raise ConnectionLostError(f"{operation}{subject} failed: {exc}") from exc.__cause__
        if isinstance(exc, SnapshotRepoError):
            return
        if isinstance(exc, TimeoutError):  # a driver's own timeout (e.g. command_timeout)
            raise StorageError(f"{operation}{subject} failed: {describe(exc)}") from exc
        if isinstance(exc, _DRIVER_ERRORS):
            if is_missing_schema(exc):
                raise SchemaNotReadyError(
                    f"{operation}{subject} failed: the snapshot schema is missing or older "
                    "than this package; run `await repo.migrate()` or `snapshot-repo "
                    f"migrate` ({describe(exc)})"
                ) from exc
            raise StorageError(f"{operation}{subject} failed: {describe(exc)}") from exc
