"""The peer: the same workloads in plain SQLAlchemy Core, as an application would write them
without this library.

The raw sides of the harness say how close the library comes to hand-written
SQL on the bare driver. This side answers the other question a user asks
before picking a library: is it faster than the obvious alternative,
SQLAlchemy Core used directly on the same async driver? It is that
alternative written well, not a strawman:

- statements are built once, from the library's own tables (same schema and
  column types), so SQLAlchemy's compiled cache serves every call;
- a Postgres write is one statement (the upsert as a data-modifying CTE, the
  history row inserted from its `RETURNING`), a SQLite write two statements
  in one transaction; on MariaDB, as its raw side, four in one transaction
  (the upsert, its version read back, the history row, the feed entry);
- a batch is one transaction of two `executemany` calls, the upserts with
  `RETURNING` (SQLAlchemy's "insertmanyvalues" turns each into a few
  multi-row statements); on MariaDB the upserts' `executemany`, then the
  batch's latest rows copied into the history and the feed (`INSERT ... SELECT`);
- the pool has the library's size and overflow, SQLite connections get the
  library's durability pragmas, MariaDB connections its READ COMMITTED.

What it keeps is what plain SQLAlchemy does by itself: a pool checkout and
return per call (with the pool's reset-on-return rollback), a transaction
begun around every statement, reads included (BEGIN and ROLLBACK round trips
on asyncpg), the `Result` machinery, the async adapter's greenlet switches,
and on SQLite the driver's own deferred transactions on a pool of connections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Delete,
    Select,
    bindparam,
    delete,
    event,
    insert,
    literal,
    literal_column,
    select,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.sql.dml import Insert, ReturningDelete

from snapshot_repo import EngineSettings
from snapshot_repo.tables import changes_table, history_table, latest_table

from .rows import BASELINE_COLUMNS, RawSnapshot, decode_row, require_distinct
from .sides import CHECKPOINT, Side
from .state import BenchState, payload_of

__all__ = ["PEER", "PeerSide", "PeerStatements", "peer_engine"]


PEER = "sqlalchemy"
"""The name of the peer's side in reports."""


def peer_engine(url: URL, settings: EngineSettings, sqlite_pragmas: Sequence[str]) -> AsyncEngine:
    """A plain SQLAlchemy async engine on `url`, with the library's pool sizes.

    On SQLite each new connection runs `sqlite_pragmas` (the library's
    durability settings) and nothing else: transactions stay the driver's.
    """
    pool = {
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_timeout": settings.pool_timeout,
    }
    if url.get_backend_name() == "postgresql":
        connect_args: dict[str, Any] = {
            "timeout": settings.connect_timeout,
            "command_timeout": settings.command_timeout,
        }
        return create_async_engine(url, connect_args=connect_args, **pool)
    if url.get_backend_name() in ("mariadb", "mysql"):
        # The library's connection settings: utf8mb4, READ COMMITTED set once per connection.
        connect_args = {"connect_timeout": settings.connect_timeout, "charset": "utf8mb4"}
        return create_async_engine(
            url, connect_args=connect_args, isolation_level="READ COMMITTED", **pool
        )
    engine = create_async_engine(url, connect_args={"timeout": settings.busy_timeout}, **pool)

    @event.listens_for(engine.sync_engine, "connect")
    def _set_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            for pragma in sqlite_pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    return engine


class PeerStatements:
    """Every statement the peer runs, built once for one dialect and one scope.

    `scope` holds the values of the key columns before `user_id` (tenant,
    namespace), written as literals, as the raw sides do.
    """

    def __init__(self, dialect: str, scope: Mapping[str, str]) -> None:
        postgres = dialect == "postgresql"
        self.mariadb = dialect in ("mariadb", "mysql")
        latest, history = latest_table, history_table
        in_scope = [latest.c[name] == value for name, value in scope.items()]
        in_history_scope = [history.c[name] == value for name, value in scope.items()]
        fixed = {name: literal(value) for name, value in scope.items()}
        values = {
            **fixed,
            "user_id": bindparam("user_id"),
            "version": literal(1),
            "schema_version": bindparam("schema_version"),
            "payload": bindparam("payload"),
            "created_at": bindparam("created_at"),
        }
        user = latest.c.user_id == bindparam("user_id")
        self.upsert: Insert
        if self.mariadb:
            # No ON CONFLICT and no RETURNING for the upsert's UPDATE: the version is read back.
            upserting = mysql.insert(latest).values(values)
            self.upsert = upserting.on_duplicate_key_update(
                # Inline: the drivers' executemany rewrites the statement into one multi-row
                # INSERT, which takes parameters in its VALUES only.
                version=latest.c.version + literal_column("1"),
                schema_version=upserting.inserted.schema_version,
                payload=upserting.inserted.payload,
                created_at=upserting.inserted.created_at,
            )
        else:
            stmt = (postgresql.insert if postgres else sqlite.insert)(latest).values(values)
            self.upsert = stmt.on_conflict_do_update(
                index_elements=[*scope, "user_id"],
                set_={
                    "version": latest.c.version + 1,
                    "schema_version": stmt.excluded.schema_version,
                    "payload": stmt.excluded.payload,
                    "created_at": stmt.excluded.created_at,
                },
            )
        # MariaDB only: the version read back, the feed (`snapshot_changes`), whose entries
        # a delete erases, and the batch's history and feed copied from its latest rows.
        self.read_back: Select[Any] = select(latest.c.version).where(*in_scope, user)
        changes = changes_table
        self.feed: Insert = insert(changes).values(
            {
                **fixed,
                "user_id": bindparam("user_id"),
                "version": bindparam("version"),
                "kind": literal("write"),
                "created_at": bindparam("created_at"),
            }
        )
        self.forget_feed: Delete = delete(changes).where(
            *(changes.c[name] == value for name, value in scope.items()),
            changes.c.user_id == bindparam("user_id"),
        )
        batch = latest.c.user_id.in_(bindparam("user_ids", expanding=True))
        self.copy_history: Insert = insert(history).from_select(
            [*scope, *BASELINE_COLUMNS],
            select(
                *(literal(value) for value in scope.values()),
                *(latest.c[name] for name in BASELINE_COLUMNS),
            ).where(*in_scope, batch),
        )
        self.copy_feed: Insert = insert(changes).from_select(
            [*scope, "user_id", "version", "kind", "created_at"],
            select(
                *(literal(value) for value in scope.values()),
                latest.c.user_id,
                latest.c.version,
                literal("write"),
                latest.c.created_at,
            ).where(*in_scope, batch),
        )
        self.append: Insert = insert(history).values(
            {**fixed, **{name: bindparam(name) for name in BASELINE_COLUMNS}}
        )
        self.write: Insert | None = None
        if postgres:
            # One statement: the upsert runs as a CTE and history takes its RETURNING.
            written = self.upsert.returning(latest.c.version).cte("written")
            # Typed binds: Postgres cannot infer the type of a bare parameter in a select list.
            copied = select(
                *(literal(value) for value in scope.values()),
                *(
                    written.c.version
                    if name == "version"
                    else bindparam(name, type_=history.c[name].type)
                    for name in BASELINE_COLUMNS
                ),
            )
            self.write = (
                insert(history)
                .add_cte(written)
                .from_select([*scope, *BASELINE_COLUMNS], copied)
                .returning(history.c.version)
            )
        self.upsert_returning = self.upsert.returning(
            latest.c.user_id, latest.c.version, sort_by_parameter_order=True
        )
        row = [latest.c[name] for name in BASELINE_COLUMNS]
        self.latest: Select[Any] = select(*row).where(*in_scope, user)
        self.latest_many: Select[Any] = select(*row).where(
            *in_scope, latest.c.user_id.in_(bindparam("user_ids", expanding=True))
        )
        self.history: Select[Any] = (
            select(*(history.c[name] for name in BASELINE_COLUMNS))
            .where(*in_history_scope, history.c.user_id == bindparam("user_id"))
            .order_by(history.c.version.desc())
            .limit(bindparam("limit"))
        )
        self.delete_latest: ReturningDelete[Any] = (
            delete(latest).where(*in_scope, user).returning(latest.c.version)
        )
        self.delete_history: Delete = delete(history).where(
            *in_history_scope,
            history.c.user_id == bindparam("user_id"),
            history.c.version <= bindparam("up_to"),
        )


class PeerSide(Side):
    """The peer: plain SQLAlchemy Core on its own async engine (see this module's docstring)."""

    name = PEER

    def __init__(self, engine: AsyncEngine, statements: PeerStatements) -> None:
        self._engine = engine
        self._sql = statements

    async def write(self, user_id: str, state: BenchState) -> int:
        params = {
            "user_id": user_id,
            "schema_version": 1,
            "payload": payload_of(state),
            "created_at": datetime.now(UTC),
        }
        async with self._engine.begin() as conn:
            if self._sql.write is not None:  # Postgres: one statement
                return int((await conn.execute(self._sql.write, params)).scalar_one())
            if self._sql.mariadb:
                await conn.execute(self._sql.upsert, params)
                version = (await conn.execute(self._sql.read_back, params)).scalar_one()
                params["version"] = version
                await conn.execute(self._sql.append, params)
                await conn.execute(self._sql.feed, params)
                return int(version)
            _user_id, version = (await conn.execute(self._sql.upsert_returning, params)).one()
            await conn.execute(self._sql.append, {**params, "version": version})
        return int(version)

    async def get_latest(self, user_id: str) -> RawSnapshot | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(self._sql.latest, {"user_id": user_id})).first()
        return None if row is None else decode_row(row)

    async def get_history(self, user_id: str, limit: int) -> list[RawSnapshot]:
        async with self._engine.connect() as conn:
            result = await conn.execute(self._sql.history, {"user_id": user_id, "limit": limit})
            rows = result.all()
        return [decode_row(row) for row in rows]

    async def delete(self, user_id: str) -> int:
        async with self._engine.begin() as conn:
            version = (await conn.execute(self._sql.delete_latest, {"user_id": user_id})).scalar()
            if version is None:
                return 0
            params = {"user_id": user_id, "up_to": version}
            erased: int = (await conn.execute(self._sql.delete_history, params)).rowcount
            if self._sql.mariadb:
                await conn.execute(self._sql.forget_feed, params)
        return erased

    def traceless_delete_unavailable(self) -> str | None:
        return (
            None
            if self._engine.dialect.name == "sqlite"
            else super().traceless_delete_unavailable()
        )

    async def traceless_delete(self, user_id: str) -> int:
        erased = await self.delete(user_id)
        async with self._engine.connect() as conn:
            await conn.exec_driver_sql(CHECKPOINT)
        return erased

    async def bulk_write(self, items: Sequence[tuple[str, BenchState]]) -> int:
        user_ids = [user_id for user_id, _ in items]
        require_distinct(user_ids)
        created_at = datetime.now(UTC)
        rows = [
            {
                "user_id": user_id,
                "schema_version": 1,
                "payload": payload_of(state),
                "created_at": created_at,
            }
            for user_id, state in items
        ]
        async with self._engine.begin() as conn:
            if self._sql.mariadb:
                await conn.execute(self._sql.upsert, rows)
                batch = {"user_ids": user_ids}
                copied: int = (await conn.execute(self._sql.copy_history, batch)).rowcount
                await conn.execute(self._sql.copy_feed, batch)
                return copied
            written = (await conn.execute(self._sql.upsert_returning, rows)).all()
            for row, (_user_id, version) in zip(rows, written, strict=True):
                row["version"] = version
            await conn.execute(self._sql.append, rows)
        return len(written)

    async def bulk_read(self, user_ids: Sequence[str]) -> list[RawSnapshot]:
        async with self._engine.connect() as conn:
            result = await conn.execute(self._sql.latest_many, {"user_ids": list(user_ids)})
            rows = result.all()
        return [decode_row(row) for row in rows]
