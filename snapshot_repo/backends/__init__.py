"""Backends: the only code that knows a database.

`Backend` is what the repository needs from one; `backend_for` picks the
backend of an engine's dialect. One module per database owns its driver,
its statements' execution, its driver errors, its erasure and its feed:
`postgres` (asyncpg) and `sqlite` (aiosqlite) run the hot path on the driver
connection SQLAlchemy's pool manages, for speed (see their docstrings);
`mysql` (asyncmy, MySQL and MariaDB) is the `core` backend in MySQL's SQL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

from sqlalchemy import ClauseElement
from sqlalchemy.ext.asyncio import AsyncEngine

from ..errors import ConfigurationError
from ._compiled import row_decoder
from ._pool import KEPT_CONNECTIONS
from ._privates import missing_for, warn_fallback
from .values import (
    DataKeyChanged,
    DataKeyRef,
    Erasure,
    PendingBatch,
    PendingWrite,
    Retention,
    Row,
    Scope,
    StoredRow,
    WriteOutcome,
    is_retryable,
)

__all__ = [
    "KEPT_CONNECTIONS",
    "Backend",
    "BackendKind",
    "DataKeyChanged",
    "DataKeyRef",
    "Erasure",
    "PendingBatch",
    "PendingWrite",
    "Retention",
    "Row",
    "Scope",
    "StoredRow",
    "WriteOutcome",
    "backend_for",
    "is_retryable",
    "row_decoder",
]


class Backend(Protocol):
    """What the repository needs from a backend; each call is one transaction or statement."""

    @property
    def notifies(self) -> bool:
        """Whether writes can NOTIFY listeners in other processes (Postgres's LISTEN/NOTIFY)."""
        ...

    @property
    def prune_statement(self) -> ClauseElement:
        """Drops one user's history versions beyond a retention policy (`prune_history`)."""
        ...

    @property
    def claim_key_statement(self) -> ClauseElement:
        """Stores a data key unless the user has one (`upgrade_payloads`' sealing)."""
        ...

    @property
    def fold_statements(self) -> tuple[ClauseElement, ...]:
        """Folds a chunk of a scope's user count rows into one, run in one transaction
        (`_user_counts`; the statements: `count_sql.fold_statements`)."""
        ...

    async def write(self, write: PendingWrite) -> WriteOutcome: ...
    async def latest(self, scope: Scope, user_id: str, now: Any) -> Row | None: ...
    async def history(self, scope: Scope, user_id: str, limit: int) -> list[Row]: ...
    async def current_version(self, scope: Scope, user_id: str) -> int: ...
    async def delete(self, erasure: Erasure) -> tuple[int, int]:
        """Erase the user; (versions erased, the last version) or (0, 0) if absent."""
        ...

    async def write_many(self, batch: PendingBatch) -> list[int]:
        """Store the batch in one transaction; the version of each write, in batch order."""
        ...

    async def latest_many(self, scope: Scope, user_ids: Sequence[str], now: Any) -> list[Row]: ...
    async def vacuum(self, full: bool = False) -> None:
        """Reclaim dead rows of the snapshot tables now, after an erasure.

        Postgres: VACUUM, or with `full` VACUUM FULL, which rewrites the tables
        and their indexes into new files (plain VACUUM leaves deleted bytes in
        the pages it frees). SQLite: a WAL checkpoint. MySQL: OPTIMIZE TABLE.
        """
        ...

    async def checkpoint_erasures(self) -> None:
        """Leave no trace of erasures committed with `checkpoint=False`.

        SQLite (with `secure_delete`): the WAL checkpoint each erasure would have
        run; a failure is logged, since the erasures stand. Postgres: nothing.
        """
        ...

    async def finish_erasures(self, wait: float) -> bool:
        """Complete what committed erasures left to do, waiting up to `wait` s for readers.

        SQLite: the WAL truncation that readers held up (see
        `sqlite_commit.truncate_wal`); True when none is pending. Postgres:
        nothing to do (dead tuples are VACUUM's, see `erase(vacuum=True)`), so True.
        """
        ...

    async def feed_page(self, params: Mapping[str, Any]) -> list[Any]:
        """One page of a scope's change feed after a cursor, as raw rows (`changes_since`):
        `tenant`, `namespace`, `after_txid`, `after_seq` and `limit` bound."""
        ...

    async def fetch(self, statement: ClauseElement, params: Mapping[str, Any]) -> list[Any]: ...
    async def execute_in_transaction(
        self, work: Sequence[tuple[ClauseElement, Mapping[str, Any]]]
    ) -> list[int]:
        """Run the statements in order in one write transaction; their row counts."""
        ...

    async def missing_database(self) -> str | None:
        """Why the database cannot exist yet (a SQLite file not there), or None.

        Asked by the health probe before connecting, because connecting would
        create the SQLite file.
        """
        ...

    def decode_snapshot_row(self, raw: Sequence[Any]) -> Row: ...
    async def release(self) -> None: ...
    def keep_connections(self, count: int) -> None: ...


BackendKind = Literal["auto", "core"]
"""Which backend a repository runs on: "auto", the fast backend of the engine's database
(falling back to "core" when it cannot run), or "core", SQLAlchemy's public API only."""


def backend_for(engine: AsyncEngine, kind: BackendKind = "auto") -> Backend:
    """The backend for `engine`: its database's fast backend, or the core one.

    Each backend module is imported here, when first needed, so a service on
    SQLite never imports asyncpg (and needs no Postgres driver installed).
    The fast backends need a few private names of SQLAlchemy and aiosqlite
    (see `_privates`); if the installed versions lack one, the engine runs on
    the core backend, with one warning.
    """
    if kind == "auto":
        missing = missing_for(engine)
        if missing is not None:
            warn_fallback(missing)
            kind = "core"
    name = engine.dialect.name
    if kind == "auto" and name not in ("sqlite", "postgresql", "mysql", "mariadb"):
        raise ConfigurationError(
            f"unsupported database {name!r}: use SQLite, Postgres or MySQL/MariaDB, "
            "or backend='core'"
        )
    if name in ("mysql", "mariadb"):  # the core backend in MySQL's SQL, plus its driver path
        from .mysql import MysqlBackend

        return MysqlBackend(engine, driver=kind == "auto")
    if kind == "core":
        from .core import CoreBackend

        return CoreBackend(engine)
    if engine.dialect.name == "postgresql":
        from .postgres import PostgresBackend

        return PostgresBackend(engine)
    from .sqlite import SqliteBackend

    return SqliteBackend(engine)
