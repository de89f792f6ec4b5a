"""A MySQL/MariaDB connection as `mysql_driver` runs it: autocommit, explicit transactions.

Autocommit: a connection `mysql_driver` uses runs with autocommit on, so a read is one
round trip and leaves no transaction, and no metadata lock, open on a kept
connection (which would hold up `OPTIMIZE TABLE` and migrations); a write
begins with `BEGIN`. Every connection SQLAlchemy's pool hands out is switched
back to autocommit off (`transactional_on_checkout`), so the engine's other
users (the core path, migrations, the application) keep their transactions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

import asyncmy.errors
from sqlalchemy.exc import DisconnectionError

from ._compiled import Compiled

__all__ = [
    "autocommit",
    "bulk_executes",
    "error_code",
    "execute",
    "in_transaction",
    "transactional_on_checkout",
]

_T = TypeVar("_T")


def error_code(exc: BaseException) -> int | None:
    """The MySQL error number of a driver error (wrapped by SQLAlchemy or not), or None."""
    orig = getattr(exc, "orig", None) or exc
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def transactional_on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Hand out every pooled connection with autocommit off, as SQLAlchemy expects.

    A connection `mysql_driver` used (autocommit on) may be back in the pool.
    Runs inside SQLAlchemy's greenlet, so the adapter's blocking call is the
    driver's round trip; one that fails is a dead connection, which the pool
    replaces (`DisconnectionError`).
    """
    if dbapi_connection.get_autocommit():
        try:
            dbapi_connection.autocommit(False)
        except asyncmy.errors.Error as exc:
            raise DisconnectionError(f"resetting autocommit failed: {exc}") from exc


def bulk_executes(conn: Any) -> bool:
    """Whether asyncmy sends `executemany` on `conn` as one `COM_STMT_BULK_EXECUTE`: with
    its statement cache on, to a server offering bulk operations (MariaDB 10.2 and later;
    MySQL does not, nor does every proxy). Otherwise a statement with a `NULL` in its
    VALUES row would run once per row. asyncmy has no public API that says: its
    connection's attributes are read, and anything else counts as no."""
    supported = getattr(conn, "_bulk_supported", False) is True
    cache = getattr(conn, "_stmt_cache_size", 0)
    return supported and isinstance(cache, int) and cache > 0


async def execute(cursor: Any, statement: Compiled, params: Mapping[str, Any]) -> int:
    """Run a compiled statement on an asyncmy cursor; its affected (matched) row count."""
    count: int = await cursor.execute(statement.sql, statement.args(params))
    return count


async def autocommit(conn: Any) -> None:
    """Switch a connection `mysql_driver` uses to autocommit: a round trip per checkout from
    SQLAlchemy's pool, which has just switched it off (`transactional_on_checkout`
    cannot tell its checkouts from others'), so two per borrow; connections
    kept between calls stay switched (a repository on a borrowed engine keeps none)."""
    if not conn.get_autocommit():
        await conn.autocommit(True)


async def in_transaction(conn: Any, work: Coroutine[Any, Any, _T]) -> _T:
    """Await `work` (a coroutine of statements) between `BEGIN` and `COMMIT`.

    On an error the transaction rolls back, unless the error was a cancellation
    or timeout (the connection is mid-protocol and is dropped, see `_pool`). A
    failed ROLLBACK means the connection is gone: that error is raised, from
    the first, so the pool discards the connection.
    """
    try:
        await conn.begin()
        result = await work
    except BaseException as failed:
        work.close()  # a no-op unless BEGIN failed and it never ran
        if not isinstance(failed, asyncio.CancelledError | TimeoutError):
            try:
                await conn.rollback()
            except BaseException as rollback_failed:
                raise rollback_failed from failed
        raise
    await conn.commit()
    return result
