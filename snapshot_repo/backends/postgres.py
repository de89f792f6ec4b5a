"""Postgres through asyncpg: each single-statement operation is one round trip, autocommitted.

asyncpg prepares each statement once per connection and reuses it; there is
no BEGIN/COMMIT around single statements. A write is one data-modifying CTE
(see `postgres_sql.postgres_write_statement`), an erasure one call of the
`snapshot_repo_erase` function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
from asyncpg.exceptions import InternalClientError
from sqlalchemy import ClauseElement
from sqlalchemy.ext.asyncio import AsyncEngine

from .._translate import register_driver_errors
from ._compiled import (
    SharedStatements,
    compile_shared,
    compile_statement,
    expired,
    snapshot_row_decoder,
)
from ._pool import Connections
from ._retry import retry_rolled_back
from .count_sql import fold_statements
from .feed_sql import changes_since_statement
from .postgres_sql import (
    postgres_bulk_write_statement,
    postgres_erase_statement,
    postgres_write_statement,
    sorted_batch,
)
from .statements import (
    claim_key_statement,
    hold_key_statement,
    prune_statement,
    write_mode,
)
from .values import (
    DataKeyChanged,
    DataKeyRef,
    Erasure,
    PendingBatch,
    PendingWrite,
    Row,
    Scope,
    WriteOutcome,
)

__all__ = ["PostgresBackend"]

_ERASED_TABLES = ("snapshot_latest", "snapshot_history", "snapshot_changes", "snapshot_data_keys")
"""The tables an erasure deletes from, whose indexes `vacuum` rebuilds."""

register_driver_errors(asyncpg.PostgresError, asyncpg.InterfaceError)


def _connection_lost(exc: BaseException) -> bool:
    """asyncpg's errors that leave its connection unusable."""
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.PostgresConnectionError):
        return True
    return isinstance(exc, InternalClientError)  # the protocol state is corrupt


class PostgresBackend(SharedStatements):
    """asyncpg: each single-statement operation is one round trip, autocommitted."""

    def __init__(self, engine: AsyncEngine) -> None:
        dialect = engine.dialect
        self._engine = engine
        self._connections = Connections(engine, _connection_lost)
        self._decode = snapshot_row_decoder(dialect)
        self._writes = {
            mode: compile_statement(postgres_write_statement(mode), dialect)
            for mode in ("upsert", "create", "replace")
        }
        self._write_many = compile_statement(
            postgres_bulk_write_statement(distinct_users=True), dialect
        )
        self._erase = compile_statement(postgres_erase_statement(), dialect)
        self.notifies = True
        self.prune_statement = prune_statement("postgresql")
        self.fold_statements = fold_statements("postgresql")
        self.changes_since_statement = changes_since_statement("postgresql")
        self.claim_key_statement = claim_key_statement("postgresql")
        self._claim_key = compile_statement(self.claim_key_statement, dialect)
        self._prune = compile_statement(self.prune_statement, dialect)
        self._hold_key = compile_statement(hold_key_statement(), dialect)
        compile_shared(self, dialect)

    async def write_many(self, batch: PendingBatch) -> list[int]:
        distinct_users = batch.distinct_users()
        user_ids, schema_versions, payloads = (
            sorted_batch(batch.user_ids, batch.schema_versions, batch.payloads)
            if distinct_users  # the statement upserts in array order: the lock order
            else (batch.user_ids, batch.schema_versions, batch.payloads)
        )
        params = {
            "user_ids": user_ids,
            "schema_versions": schema_versions,
            "payloads": payloads,
            "created_at": batch.created_at,
            "tenant": batch.scope.tenant,
            "namespace": batch.scope.namespace,
            "actor": batch.actor,
            "reason": batch.reason,
            "metadata": batch.metadata,
        }
        if batch.retention is not None:
            params.update(batch.retention.params())
        statement = (
            self._write_many
            if distinct_users and not batch.notify and batch.retention is None
            else self._compiled(
                postgres_bulk_write_statement(
                    notifying=batch.notify,
                    prune=batch.retention is not None,
                    distinct_users=distinct_users,
                )
            )
        )
        args = statement.args(params)
        async with self._connections.checkout() as conn:
            try:
                if batch.data_keys is None and (distinct_users or batch.retention is None):
                    rows = await conn.fetch(statement.sql, *args)
                else:
                    rows = await self._write_batch(conn, statement.sql, args, batch)
            except asyncpg.TransactionRollbackError as exc:  # a deadlock victim: see `_retry`
                rows = await retry_rolled_back(
                    exc, self._write_batch, conn, statement.sql, args, batch
                )
        return _versions_in_input_order(batch.user_ids, rows, distinct_users)

    async def _write_batch(
        self, conn: Any, sql: str, args: Sequence[Any], batch: PendingBatch
    ) -> list[Any]:
        """The batch statement; when sealed, in one transaction with its data keys' checks.

        A batch that repeats a user under a retention policy also prunes each
        such user again after the statement: the statement's own pruning sees
        history as it was before the statement, so it cannot drop the
        versions the same batch wrote before the user's last one.
        """
        rows: list[Any]
        prune_again = batch.retention is not None and not batch.distinct_users()
        if batch.data_keys is None and not prune_again:
            rows = await conn.fetch(sql, *args)
            return rows
        async with conn.transaction():
            rows = await conn.fetch(sql, *args)
            if prune_again:
                assert batch.retention is not None
                for user_id in sorted(set(batch.user_ids)):  # the order the batch locked in
                    params = {**batch.scope.key(user_id), **batch.retention.params()}
                    await conn.execute(self._prune.sql, *self._prune.args(params))
            keys = batch.data_keys or {}
            for user_id in sorted(keys):
                await self._keep_key(conn, batch.scope, user_id, keys[user_id])
        return rows

    async def _keep_key(self, conn: Any, scope: Scope, user_id: str, key: DataKeyRef) -> None:
        """Store or share-lock the write's data key after its write (see `DataKeyRef`).

        Inside the write's transaction, after the write statement locked the
        latest row: an erasure locks the latest row, then deletes the key, so
        the two never wait for each other in opposite orders.
        """
        statement = self._claim_key if key.new else self._hold_key
        if await conn.fetchval(statement.sql, *statement.args(key.params(scope, user_id))) is None:
            raise DataKeyChanged

    async def latest_many(self, scope: Scope, user_ids: Sequence[str], now: Any) -> list[Row]:
        params = {
            "tenant": scope.tenant,
            "namespace": scope.namespace,
            "user_ids": list(user_ids),
            "now": now,
        }
        args = self._latest_many.args(params)
        async with self._connections.checkout() as conn:
            rows = await conn.fetch(self._latest_many.sql, *args)
        return [self._decode(raw) for raw in rows]

    async def write(self, write: PendingWrite) -> WriteOutcome:
        mode = write_mode(write.expected_version)
        statement = (
            self._writes[mode]
            if write.retention is None and not write.notify
            else self._compiled(
                postgres_write_statement(
                    mode, prune=write.retention is not None, notifying=write.notify
                )
            )
        )
        args = statement.args(write.params())
        async with self._connections.checkout() as conn:
            try:
                try:
                    if write.data_key is None:
                        version = await conn.fetchval(statement.sql, *args)
                    else:
                        version = await self._write_one(conn, statement.sql, args, write)
                except asyncpg.TransactionRollbackError as exc:  # a deadlock victim: see `_retry`
                    version = await retry_rolled_back(
                        exc, self._write_one, conn, statement.sql, args, write
                    )
            except asyncpg.UniqueViolationError:
                # The unique (user_id, idempotency_key) index refused a replay and the
                # statement wrote nothing; any other unique violation is a real error.
                if write.idempotency_key is None:
                    raise
                version = None
            if version is not None or write.idempotency_key is None:
                return int(version) if version is not None else None
            earlier = await conn.fetchrow(self._keyed.sql, *self._keyed.args(write.keyed_params()))
        return None if earlier is None else self._decode(earlier)

    async def _write_one(
        self, conn: Any, sql: str, args: Sequence[Any], write: PendingWrite
    ) -> Any:
        """The write statement; when sealed, in one transaction with its data key's check."""
        if write.data_key is None:
            return await conn.fetchval(sql, *args)
        async with conn.transaction():
            version = await conn.fetchval(sql, *args)
            if version is not None:
                await self._keep_key(conn, write.scope, write.user_id, write.data_key)
        return version

    async def feed_page(self, params: Mapping[str, Any]) -> list[Any]:
        """One page of the feed: `changes_since_statement`, read as any other statement."""
        return await self.fetch(self.changes_since_statement, params)

    async def fetch(self, statement: ClauseElement, params: Mapping[str, Any]) -> list[Any]:
        compiled = self._compiled(statement)
        async with self._connections.checkout() as conn:
            return list(await conn.fetch(compiled.sql, *compiled.args(params)))

    async def execute_in_transaction(
        self, work: Sequence[tuple[ClauseElement, Mapping[str, Any]]]
    ) -> list[int]:
        async with self._connections.checkout() as conn:
            try:
                return await self._in_transaction(conn, work)
            except asyncpg.TransactionRollbackError as exc:  # a deadlock victim: see `_retry`
                return await retry_rolled_back(exc, self._in_transaction, conn, work)

    async def _in_transaction(
        self, conn: Any, work: Sequence[tuple[ClauseElement, Mapping[str, Any]]]
    ) -> list[int]:
        """Run the statements in one transaction; their row counts."""
        counts = []
        async with conn.transaction():
            for statement, params in work:
                compiled = self._compiled(statement)
                status: str = await conn.execute(compiled.sql, *compiled.args(params))
                last = status.rsplit(" ", 1)[-1]
                counts.append(int(last) if last.isdigit() else 0)
        return counts

    async def latest(self, scope: Scope, user_id: str, now: Any) -> Row | None:
        async with self._connections.checkout() as conn:
            raw = await conn.fetchrow(self._latest.sql, scope.tenant, scope.namespace, user_id)
        if raw is None or expired(raw[-1], now):
            return None
        return self._decode(raw[:-1])

    async def history(self, scope: Scope, user_id: str, limit: int) -> list[Row]:
        async with self._connections.checkout() as conn:
            rows = await conn.fetch(
                self._history.sql,
                scope.tenant,
                scope.namespace,
                user_id,
                limit,
                *self._history_tail,
            )
        return [self._decode(raw) for raw in rows]

    async def current_version(self, scope: Scope, user_id: str) -> int:
        async with self._connections.checkout() as conn:
            version = await conn.fetchval(
                self._version.sql, *self._version.args(scope.key(user_id))
            )
        return int(version or 0)

    async def delete(self, erasure: Erasure) -> tuple[int, int]:
        params = {
            **erasure.key(),
            "at": erasure.at,
            "only_expired": erasure.only_expired,
            "subject": erasure.receipt_subject,
            "cause": erasure.cause,
            "drop_data_key": erasure.drop_data_key,
            "notify": erasure.notify,
        }
        args = self._erase.args(params)
        async with self._connections.checkout() as conn:
            # One statement under autocommit: the function's work commits or rolls back whole.
            try:
                erased, version = await conn.fetchrow(self._erase.sql, *args)
            except asyncpg.TransactionRollbackError as exc:  # a deadlock victim: see `_retry`
                erased, version = await retry_rolled_back(
                    exc, conn.fetchrow, self._erase.sql, *args
                )
        return (int(erased), int(version)) if version else (0, 0)

    async def vacuum(self, full: bool = False) -> None:
        async with self._connections.checkout() as conn:
            # Outside a transaction (asyncpg autocommits). See `Backend.vacuum`.
            command = "VACUUM FULL" if full else "VACUUM"
            await conn.execute(f"{command} {', '.join(_ERASED_TABLES)}")

    async def checkpoint_erasures(self) -> None:
        """Nothing: Postgres erasures leave dead tuples to VACUUM (`erase(vacuum=True)`)."""

    async def missing_database(self) -> str | None:
        """None: a missing Postgres database fails the connection, which the probe reports."""
        return None

    async def finish_erasures(self, wait: float) -> bool:
        """Nothing pending: an erasure is complete when it commits (see `Backend`)."""
        return True


def _versions_in_input_order(
    user_ids: Sequence[str], rows: Sequence[Any], distinct_users: bool
) -> list[int]:
    """Give each write its version: a user's versions, ascending, in the order of its writes."""
    if distinct_users:
        by_id = dict(rows)  # one version per user
        return [int(by_id[user_id]) for user_id in user_ids]
    by_user: dict[str, list[int]] = {}
    for user_id, version in rows:
        by_user.setdefault(user_id, []).append(int(version))
    for versions in by_user.values():
        versions.sort(reverse=True)
    return [by_user[user_id].pop() for user_id in user_ids]
