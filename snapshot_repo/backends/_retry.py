"""Running again a statement or transaction the database rolled back to break a deadlock.

Postgres breaks a deadlock (SQLSTATE 40P01) by aborting one of the
transactions in the cycle, and under REPEATABLE READ or SERIALIZABLE (a
server or role default; the library itself runs READ COMMITTED) aborts a
transaction that cannot be serialized (40001). Either way the victim was
rolled back whole, so running the same statement or transaction again is
safe, and it usually succeeds: the other side has gone on. Writes and
pruning take their row locks in one order (see `statements.prune_statement`)
and do not deadlock each other; this covers the rest, such as the
application's own transactions on the same rows.

Callers keep the first attempt inline, as `try: ... except
TransactionRollbackError as exc: ... = await retry_rolled_back(exc, ...)`,
so an operation that does not fail pays for the `try` alone: no extra
await, no allocation.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from .._translate import describe

__all__ = [
    "RETRIED_SQLSTATES",
    "ROLLED_BACK_ATTEMPTS",
    "is_rolled_back",
    "register_rolled_back",
    "retry_rolled_back",
]

logger = logging.getLogger("snapshot_repo")

ROLLED_BACK_ATTEMPTS = 3
"""How many times in all an operation runs while the database keeps rolling it back."""

RETRIED_SQLSTATES = frozenset({"40P01", "40001"})
"""deadlock_detected and serialization_failure: the transaction was rolled back whole."""

_BACKOFF_SECONDS = (0.005, 0.025)
"""The range of the random pause before the second attempt (doubled before the third):
short, since the deadlock detector already made the victim wait `deadlock_timeout`,
and random, so that two victims do not collide again in step."""

_CHECKS: list[Callable[[BaseException], bool]] = [
    lambda exc: getattr(exc, "sqlstate", None) in RETRIED_SQLSTATES  # asyncpg's errors
]


def register_rolled_back(check: Callable[[BaseException], bool]) -> None:
    """Also retry the errors `check` accepts (a backend's driver's deadlock errors)."""
    _CHECKS.append(check)


def is_rolled_back(exc: BaseException) -> bool:
    """Whether the database rolled back the statement or transaction that raised `exc`."""
    return any(check(exc) for check in _CHECKS)


_P = ParamSpec("_P")
_T = TypeVar("_T")


async def retry_rolled_back(
    first: BaseException,
    operation: Callable[_P, Awaitable[_T]],
    *args: _P.args,
    **kwargs: _P.kwargs,
) -> _T:
    """Run `operation` again after its first attempt failed with `first`.

    Only a rollback (`is_rolled_back`: Postgres's `RETRIED_SQLSTATES`, and what
    backends registered) is retried, up to
    `ROLLED_BACK_ATTEMPTS` attempts in all, each logged at INFO after a short
    random pause. `operation` must be the whole statement or transaction the
    failed attempt ran, starting from nothing done.

    Returns:
        What `operation` returned.

    Raises:
        The first error that is not such a rollback (`first` itself if it is
        not), or the last rollback once the attempts are used up.
    """
    failure = first
    for attempt in range(2, ROLLED_BACK_ATTEMPTS + 1):
        if not is_rolled_back(failure):
            raise failure
        logger.info(
            "snapshot_repo: the database rolled back a statement (%s); attempt %d of %d",
            describe(failure),
            attempt,
            ROLLED_BACK_ATTEMPTS,
        )
        await asyncio.sleep(random.uniform(*_BACKOFF_SECONDS) * (attempt - 1))
        try:
            return await operation(*args, **kwargs)
        except Exception as exc:
            failure = exc
    raise failure
