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

    MariaDB's (`%s` placeholders) differ in shape: no one-statement `write`
    (a write is `upsert`, `read_back`, `append` and `feed` in one transaction),
    `bulk_write` copies the batch's history and `bulk_feed` its feed entries,
    the statements over a list of users take it where `IDS` stands
    (`with_ids`), and the seeding statements name their sizes as
    `{last_user}` and `{versions}` (sequence engine tables).
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
    # MariaDB only: no RETURNING on its upsert, and a feed of its own (`snapshot_changes`).
    read_back: str = ""
    feed: str = ""
    forget_feed: str = ""
    erase_entry: str = ""
    bulk_feed: str = ""
    # MariaDB's `upsert` takes the scope's values as parameters too (`upsert_row`).
    scope_values: tuple[str, ...] = ()

    def upsert_row(self, user_id: str, payload: bytes, created_at: Any) -> tuple[Any, ...]:
        """MariaDB: the parameters of `upsert` for one row (version 1, schema version 1)."""
        return (*self.scope_values, user_id, 1, 1, payload, created_at)


IDS = "{ids}"
"""Where a MariaDB statement takes its list of user ids: one `%s` per id (see `with_ids`)."""


def with_ids(statement: str, count: int) -> str:
    """A MariaDB statement with `IDS` replaced by `count` placeholders."""
    return statement.replace(IDS, ", ".join(["%s"] * count))


def sql_literal(value: str, backend: BackendName = "postgres") -> str:
    """`value` as a quoted SQL string literal (scope values are inlined as constants).

    MariaDB also treats a backslash as an escape character in a literal (unless
    `NO_BACKSLASH_ESCAPES`, which this benchmark does not set).
    """
    if backend == "mariadb":
        value = value.replace("\\", "\\\\")
    return "'" + value.replace("'", "''") + "'"


def raw_statements(backend: BackendName, scope: dict[str, str]) -> RawSql:
    """Build every raw statement for `backend`, with the scope columns inlined as constants."""
    if backend == "mariadb":
        return _mariadb_statements(scope)
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
        # rows are exactly the versions to append: one statement copies them and
        # returns each user's new version (the library's `upsert_many` returns them too).
        bulk_write=f"""
INSERT INTO snapshot_history ({columns})
SELECT {fixed}{selected} FROM snapshot_latest
WHERE {where}user_id IN (SELECT value FROM json_each(?))
RETURNING user_id, version""",
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


def _mariadb_statements(scope: dict[str, str]) -> RawSql:
    """MariaDB's statements: `%s` placeholders (asyncmy, aiomysql), identifiers in backticks.

    A write is the library's write transaction written by hand: the upsert
    (`ON DUPLICATE KEY UPDATE`, no RETURNING for its UPDATE), the version read
    back under the row lock the upsert took, the history row, the feed entry.
    """
    columns = ", ".join([*(f"`{name}`" for name in scope), *BASELINE_COLUMNS])
    selected = ", ".join(BASELINE_COLUMNS)
    fixed = "".join(f"{sql_literal(value, 'mariadb')}, " for value in scope.values())
    where = "".join(
        f"`{name}` = {sql_literal(value, 'mariadb')} AND " for name, value in scope.items()
    )
    feed_columns = ", ".join(
        [*(f"`{name}`" for name in scope), "user_id, version, kind, created_at"]
    )
    # Every value a placeholder, literals included: the drivers' `executemany` turns an
    # INSERT into one multi-row statement only when its VALUES holds nothing else
    # (PyMySQL's `RE_INSERT_VALUES`); with the scope inline it ran a statement per row.
    placeholders = ", ".join(["%s"] * (len(scope) + len(BASELINE_COLUMNS)))
    upsert = f"""INSERT INTO snapshot_latest ({columns}) VALUES ({placeholders})
ON DUPLICATE KEY UPDATE
    version = version + 1,
    schema_version = VALUES(schema_version),
    payload = VALUES(payload),
    created_at = VALUES(created_at)"""
    # The sequence engine's tables (seq_0_to_N) stand in for generate_series.
    users = "seq_0_to_{last_user} AS u"
    return RawSql(
        scope_values=tuple(scope.values()),
        write="",
        upsert=upsert,
        append=f"INSERT INTO snapshot_history ({columns}) VALUES ({fixed}%s, %s, %s, %s, %s)",
        # After the batch's upserts, under their row locks, the batch's latest rows are
        # exactly the versions to append: one statement copies them (returning each
        # user's new version, as the library's `upsert_many` does), another their feed.
        bulk_write=f"""
INSERT INTO snapshot_history ({columns})
SELECT {fixed}{selected} FROM snapshot_latest WHERE {where}user_id IN ({IDS})
RETURNING user_id, version""",
        latest=f"SELECT {selected} FROM snapshot_latest WHERE {where}user_id = %s",
        latest_many=f"SELECT {selected} FROM snapshot_latest WHERE {where}user_id IN ({IDS})",
        history=(
            f"SELECT {selected} FROM snapshot_history WHERE {where}user_id = %s "
            "ORDER BY version DESC LIMIT %s"
        ),
        # MariaDB has DELETE ... RETURNING (10.0.5+): the latest row's lock and its version
        # in one statement, as on Postgres.
        delete_latest=f"DELETE FROM snapshot_latest WHERE {where}user_id = %s RETURNING version",
        delete_history=(
            f"DELETE FROM snapshot_history WHERE {where}user_id = %s AND version <= %s"
        ),
        seed_history=f"""
INSERT INTO snapshot_history ({columns})
SELECT {fixed}CONCAT(%s, u.seq), v.seq, 1, %s, %s FROM {users}, seq_1_to_{{versions}} AS v""",
        seed_latest=f"""
INSERT INTO snapshot_latest ({columns})
SELECT {fixed}CONCAT(%s, u.seq), {{versions}}, 1, %s, %s FROM {users}""",
        read_back=f"SELECT version FROM snapshot_latest WHERE {where}user_id = %s",
        feed=f"INSERT INTO snapshot_changes ({feed_columns}) VALUES ({fixed}%s, %s, 'write', %s)",
        forget_feed=f"DELETE FROM snapshot_changes WHERE {where}user_id = %s",
        # The erasure's own feed entry, which tells consumers to drop the user: its
        # subject is the receipts' HMAC, or "" with no erasure key (as here).
        erase_entry=(
            f"INSERT INTO snapshot_changes ({feed_columns}) VALUES ({fixed}'', %s, 'erase', %s)"
        ),
        bulk_feed=f"""
INSERT INTO snapshot_changes ({feed_columns})
SELECT {fixed}user_id, version, 'write', created_at
FROM snapshot_latest WHERE {where}user_id IN ({IDS})""",
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
    repo: SnapshotRepository[BenchState],
    fetch: Callable[[str], Awaitable[Sequence[Any]]],
    quote: str = '"',
) -> dict[str, str]:
    """The scope values the library writes under, read from a row it wrote (then erased).

    `fetch` runs a query on the raw side and returns its first row; `quote`
    quotes its identifiers (a backtick on MariaDB, where `"tenant"` is a string).
    """
    columns = _scope_columns()
    if not columns:
        return {}
    await repo.upsert_latest(Snapshot(user_id=_SCOPE_PROBE, state=make_states(1)[0]))
    quoted = ", ".join(f"{quote}{name}{quote}" for name in columns)
    row = await fetch(
        f"SELECT {quoted} FROM snapshot_latest WHERE user_id = {sql_literal(_SCOPE_PROBE)}"
    )
    await repo.delete(_SCOPE_PROBE)
    return {name: str(value) for name, value in zip(columns, row, strict=True)}
