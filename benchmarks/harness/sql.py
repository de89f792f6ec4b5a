"""The raw baselines' hand-written SQL, built from the library's own table definitions.

Also the checks made before anything is written: whether a database already
holds snapshots (the benchmark then refuses to run), and which scope values
(tenant, namespace) the library writes under, so that the raw statements
address exactly its rows.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from snapshot_repo import Snapshot, SnapshotRepository
from snapshot_repo.tables import history_table, latest_table

from .config import BackendName
from .rows import BASELINE_COLUMNS
from .state import BenchState, make_states

__all__ = ["RawSql", "holds_snapshots", "raw_statements", "scope_of", "sql_literal"]


@dataclass(frozen=True, slots=True)
class RawSql:
    """The raw baselines' statements for one dialect and one scope.

    The library keys rows by its table's primary key, which may put scope
    columns (e.g. tenant, namespace) before `user_id`. The raw statements
    take those columns from the library's metadata and their values from a
    row the library wrote (`scope_of`), so they address exactly the rows
    the library does, through the same index.
    """

    write: str
    upsert: str
    append: str
    bulk_write: str
    latest: str
    latest_many: str
    history: str
    delete_latest: str
    delete_history: str
    seed_history: str
    seed_latest: str


def sql_literal(value: str) -> str:
    """`value` as a quoted SQL string literal (scope values are inlined as constants)."""
    return "'" + value.replace("'", "''") + "'"


def raw_statements(backend: BackendName, scope: dict[str, str]) -> RawSql:
    """Build every raw statement for `backend`, with the scope columns inlined as constants."""
    columns = ", ".join([*(f'"{name}"' for name in scope), *BASELINE_COLUMNS])
    selected = ", ".join(BASELINE_COLUMNS)
    fixed = "".join(f"{sql_literal(value)}, " for value in scope.values())  # scope values first
    where = "".join(f'"{name}" = {sql_literal(value)} AND ' for name, value in scope.items())
    key = ", ".join([*(f'"{name}"' for name in scope), "user_id"])
    bump = f"""ON CONFLICT ({key}) DO UPDATE SET
        version = snapshot_latest.version + 1,
        schema_version = excluded.schema_version,
        payload = excluded.payload,
        created_at = excluded.created_at"""
    if backend == "postgres":
        # Every write is one statement, so one round trip under autocommit.
        return RawSql(
            write=f"""
WITH written AS (
    INSERT INTO snapshot_latest ({columns})
    VALUES ({fixed}$1::varchar, 1, $2::integer, $3::bytea, $4::timestamptz)
    {bump}
    RETURNING version
)
INSERT INTO snapshot_history ({columns})
SELECT {fixed}$1::varchar, version, $2::integer, $3::bytea, $4::timestamptz FROM written
RETURNING version""",
            upsert="",
            append="",
            # A batch is one statement too: the rows travel as arrays, unnested server-side.
            bulk_write=f"""
WITH batch AS (
    SELECT * FROM unnest($1::varchar[], $2::integer[], $3::bytea[])
        AS b(user_id, schema_version, payload)
), written AS (
    INSERT INTO snapshot_latest ({columns})
    SELECT {fixed}user_id, 1, schema_version, payload, $4::timestamptz FROM batch
    {bump}
    RETURNING {selected}
)
INSERT INTO snapshot_history ({columns})
SELECT {fixed}{selected} FROM written
RETURNING user_id, version""",
            latest=f"SELECT {selected} FROM snapshot_latest WHERE {where}user_id = $1",
            latest_many=(
                f"SELECT {selected} FROM snapshot_latest WHERE {where}user_id = ANY($1::varchar[])"
            ),
            history=(
                f"SELECT {selected} FROM snapshot_history WHERE {where}user_id = $1 "
                "ORDER BY version DESC LIMIT $2"
            ),
            # Deleting the latest row first takes its lock, so every write of the user
            # that committed before is visible to the history delete (a second
            # statement: a new READ COMMITTED snapshot); the version bound spares a
            # user written again meanwhile.
            delete_latest=(
                f"DELETE FROM snapshot_latest WHERE {where}user_id = $1 RETURNING version"
            ),
            delete_history=(
                f"DELETE FROM snapshot_history WHERE {where}user_id = $1 AND version <= $2"
            ),
            seed_history=f"""
INSERT INTO snapshot_history ({columns})
SELECT {fixed}$1::text || u, v, 1, $4::bytea, $5::timestamptz
FROM generate_series(0, $2::integer - 1) AS u, generate_series(1, $3::integer) AS v""",
            seed_latest=f"""
INSERT INTO snapshot_latest ({columns})
SELECT {fixed}$1::text || u, $3::integer, 1, $4::bytea, $5::timestamptz
FROM generate_series(0, $2::integer - 1) AS u""",
        )
    # SQLite cannot put DML in a CTE: two statements inside BEGIN IMMEDIATE.
    upsert = f"INSERT INTO snapshot_latest ({columns}) VALUES ({fixed}?, 1, ?, ?, ?)\n{bump}"
    users = "WITH RECURSIVE u(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM u WHERE i + 1 < :users)"
    return RawSql(
        write=upsert + "\nRETURNING version",
        upsert=upsert,
        append=f"INSERT INTO snapshot_history ({columns}) VALUES ({fixed}?, ?, ?, ?, ?)",
        # After an executemany of upserts, under the write lock, the batch's latest
        # rows are exactly the versions to append: one statement copies them.
        bulk_write=f"""
INSERT INTO snapshot_history ({columns})
SELECT {fixed}{selected} FROM snapshot_latest
WHERE {where}user_id IN (SELECT value FROM json_each(?))""",
        latest=f"SELECT {selected} FROM snapshot_latest WHERE {where}user_id = ?",
        latest_many=(
            f"SELECT {selected} FROM snapshot_latest "
            f"WHERE {where}user_id IN (SELECT value FROM json_each(?))"
        ),
        history=(
            f"SELECT {selected} FROM snapshot_history WHERE {where}user_id = ? "
            "ORDER BY version DESC LIMIT ?"
        ),
        delete_latest=f"DELETE FROM snapshot_latest WHERE {where}user_id = ? RETURNING version",
        delete_history=f"DELETE FROM snapshot_history WHERE {where}user_id = ? AND version <= ?",
        seed_history=f"""
INSERT INTO snapshot_history ({columns})
{users}, v(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM v WHERE n < :versions)
SELECT {fixed}:prefix || i, n, 1, :payload, :created_at FROM u, v""",
        seed_latest=f"""
INSERT INTO snapshot_latest ({columns})
{users} SELECT {fixed}:prefix || i, :versions, 1, :payload, :created_at FROM u""",
    )


def _scope_columns() -> list[str]:
    """The library's key columns before `user_id`; refuses a schema the baselines cannot fill.

    Raises:
        RuntimeError: the tables are no longer keyed by `user_id`, or have a
            required column the raw statements do not write: this module
            needs updating along with the schema.
    """
    key = [column.name for column in latest_table.primary_key.columns]
    if key[-1:] != ["user_id"] or [c.name for c in history_table.primary_key.columns] != [
        *key,
        "version",
    ]:
        raise RuntimeError(f"the raw baselines do not know this schema's keys: {key}")
    scope = key[:-1]
    for table in (latest_table, history_table):
        for column in table.columns:
            required = not column.nullable and column.server_default is None
            if required and column.name not in (*BASELINE_COLUMNS, *scope):
                raise RuntimeError(
                    f"{table.name}.{column.name} is required and the raw baselines do not "
                    "write it: update benchmarks/harness/ with the schema"
                )
    return scope


_SCOPE_PROBE = "benchmark-scope-probe"


async def holds_snapshots(fetch_value: Callable[[str], Awaitable[Any]], table_exists: str) -> bool:
    """Whether either snapshot table exists and has a row; checked before anything changes.

    `table_exists` is a query template with a `{table}` field answering true or false.
    """
    for table in (latest_table.name, history_table.name):
        if await fetch_value(table_exists.format(table=sql_literal(table))) and await fetch_value(
            f"SELECT EXISTS (SELECT 1 FROM {table})"
        ):
            return True
    return False


async def scope_of(
    repo: SnapshotRepository[BenchState], fetch: Callable[[str], Awaitable[Sequence[Any]]]
) -> dict[str, str]:
    """The scope values the library writes under, read from a row it wrote (then erased).

    `fetch` runs a query on the raw side and returns its first row.
    """
    columns = _scope_columns()
    if not columns:
        return {}
    await repo.upsert_latest(Snapshot(user_id=_SCOPE_PROBE, state=make_states(1)[0]))
    quoted = ", ".join(f'"{name}"' for name in columns)
    row = await fetch(
        f"SELECT {quoted} FROM snapshot_latest WHERE user_id = {sql_literal(_SCOPE_PROBE)}"
    )
    await repo.delete(_SCOPE_PROBE)
    return {name: str(value) for name, value in zip(columns, row, strict=True)}
