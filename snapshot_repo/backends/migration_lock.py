"""The lock that lets replicas run `migrate()` at the same moment and apply each revision once.

Each database's own kind of lock, taken on the connection the migration
runs on, before Alembic reads the current revision:

- Postgres: a transaction-scoped advisory lock, released at COMMIT. Being
  tied to the transaction, not the session, it also works through a
  transaction pooler such as PgBouncer's `pool_mode = transaction`.
- MySQL/MariaDB: `GET_LOCK`, a named lock of the session. DDL commits
  implicitly there, so a lock tied to the transaction would end at the
  first `CREATE TABLE`; this one is held until `RELEASE_LOCK`, after the
  last revision.
- SQLite: nothing more, the migration's `BEGIN IMMEDIATE` holds the write lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, func, select

from .._mysql_ddl import MYSQL
from ..errors import ConfigurationError, StorageError

__all__ = ["migration_lock"]

_ADVISORY_LOCK_KEY = 0x736E6170_7265706F  # "snaprepo": one lock for every snapshot_repo migration
_NAMED_LOCK = "snapshot_repo_migrate"
_NAMED_LOCK_WAIT_SECONDS = 300
"""How long a replica waits for another's migration: long enough for a big table's ALTER."""


@contextmanager
def migration_lock(connection: Connection) -> Iterator[None]:
    """Hold the migration lock of `connection`'s database for the block.

    Raises:
        ConfigurationError: a `mysql://` URL reached a MariaDB server, whose tables
            would be made with MySQL's collation, which MariaDB lacks.
    """
    name = connection.dialect.name
    if name == "mysql" and getattr(connection.dialect, "is_mariadb", False):
        raise ConfigurationError(
            "this is a MariaDB server: migrate it through a mariadb:// URL (its tables "
            "take MariaDB's binary collation, utf8mb4_nopad_bin); nothing was changed"
        )
    if name == "postgresql":
        connection.execute(select(func.pg_advisory_xact_lock(_ADVISORY_LOCK_KEY)))
        yield
        return
    if name not in MYSQL:
        yield
        return
    got = connection.scalar(select(func.get_lock(_NAMED_LOCK, _NAMED_LOCK_WAIT_SECONDS)))
    if got != 1:
        raise StorageError(
            f"migrate: another migration held the {_NAMED_LOCK!r} lock for "
            f"{_NAMED_LOCK_WAIT_SECONDS} s; nothing was changed"
        )
    try:
        yield
    finally:
        connection.scalar(select(func.release_lock(_NAMED_LOCK)))
