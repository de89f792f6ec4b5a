"""Flat cost at any depth: the databases' own plans for the statements the library runs."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import func, select

import snapshot_repo as sr
from snapshot_repo._queries import as_of_statement, count_users_statement, expired_users_statement
from snapshot_repo.backends._compiled import compile_statement as _compile
from snapshot_repo.backends.core_sql import latest_many
from snapshot_repo.backends.feed_sql import changes_since_statement
from snapshot_repo.backends.statements import (
    history_statement,
    idempotent_write_statement,
    latest_many_statement,
    latest_statement,
    sqlite_erasure_feed_statements,
)
from snapshot_repo.backup import dump, load
from snapshot_repo.tables import latest_table
from tests.support.databases import (
    Backend,
    Cart,
    PostgresServer,
    migrate_database,
    plain_dsn,
    sqlite_backend,
)

DEEP = 100_000
SCOPE = {"tenant": "", "namespace": "default"}


async def seed_deep_history(repo: sr.SnapshotRepository[Cart], backend: Backend) -> None:
    """One user with 100,000 versions and 20,000 shallow users, then fresh statistics."""
    now = datetime.now(UTC)
    async with repo.engine.begin() as conn:
        if backend.name == "postgres":
            await conn.exec_driver_sql(
                "INSERT INTO snapshot_history (user_id, version, schema_version, payload, "
                "created_at) SELECT 'wide' || u, 1, 1, '\\x7b7d'::bytea, now() "
                "FROM generate_series(1, 20000) AS u"
            )
            await conn.exec_driver_sql(
                "INSERT INTO snapshot_history (user_id, version, schema_version, payload, "
                "created_at) SELECT 'deep', v, 1, '\\x7b7d'::bytea, now() "
                f"FROM generate_series(1, {DEEP}) AS v"
            )
            await conn.exec_driver_sql(
                "INSERT INTO snapshot_history (user_id, version, schema_version, payload, "
                "created_at) SELECT 'u' || u, v, 1, '\\x7b7d'::bytea, now() "
                "FROM generate_series(1, 200) AS u, generate_series(1, 50) AS v"
            )
        elif backend.name == "mariadb":  # seq_1_to_N: MariaDB's sequence engine
            await conn.exec_driver_sql(
                "INSERT INTO snapshot_history (user_id, version, schema_version, payload, "
                f"created_at) SELECT CONCAT('wide', seq), 1, 1, X'7b7d', "
                f"'{now:%Y-%m-%d %H:%M:%S.%f}' FROM seq_1_to_20000"
            )
            await conn.exec_driver_sql(
                "INSERT INTO snapshot_history (user_id, version, schema_version, payload, "
                f"created_at) SELECT 'deep', seq, 1, X'7b7d', '{now:%Y-%m-%d %H:%M:%S.%f}' "
                f"FROM seq_1_to_{DEEP}"
            )
        else:
            await conn.exec_driver_sql(
                "WITH RECURSIVE n(v) AS (SELECT 1 UNION ALL SELECT v + 1 FROM n "
                f"WHERE v < {DEEP}) INSERT INTO snapshot_history (user_id, version, "
                "schema_version, payload, created_at) SELECT 'deep', v, 1, X'7b7d', "
                f"'{now:%Y-%m-%d %H:%M:%S.%f}' FROM n"
            )
            await conn.exec_driver_sql(
                "WITH RECURSIVE n(v) AS (SELECT 1 UNION ALL SELECT v + 1 FROM n "
                "WHERE v < 20000) INSERT INTO snapshot_history (user_id, version, "
                "schema_version, payload, created_at) SELECT 'wide' || v, 1, 1, X'7b7d', "
                f"'{now:%Y-%m-%d %H:%M:%S.%f}' FROM n"
            )
        await conn.exec_driver_sql(
            "INSERT INTO snapshot_latest (user_id, version, schema_version, payload, created_at) "
            "SELECT user_id, max(version), 1, "
            + (
                "'\\x7b7d'::bytea, now()"
                if backend.name == "postgres"
                else f"X'7b7d', '{now:%Y-%m-%d %H:%M:%S.%f}'"
            )
            + " FROM snapshot_history GROUP BY user_id"
        )
    async with repo.engine.connect() as conn:
        await conn.exec_driver_sql(
            "ANALYZE TABLE snapshot_history, snapshot_latest"
            if backend.name == "mariadb"
            else "ANALYZE"
        )
        await conn.commit()


def mariadb_plan(analyzed: dict[str, Any]) -> str:
    """A MariaDB `ANALYZE FORMAT=JSON` plan as one line per table read, then its sorts:

    `TABLE access_type=... key=... r_rows=...` (`key` is the index the plan chose,
    `r_rows` how many rows it read), and a `filesort` line for each sort.
    """
    lines: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                if name == "filesort":
                    lines.append("filesort")
                if name == "table" and isinstance(value, dict) and "table_name" in value:
                    facts = (
                        f"{fact}={value.get(fact)}" for fact in ("access_type", "key", "r_rows")
                    )
                    lines.append(f"{value['table_name']} {' '.join(facts)}")
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(analyzed)
    return "\n".join(lines)


async def explain(repo: sr.SnapshotRepository[Cart], backend: Backend, statement, params) -> str:
    if backend.name == "mariadb":
        # ANALYZE runs the statement and reports the rows each step read: MariaDB's
        # estimates alone (EXPLAIN's `rows`) do not tell a LIMIT's early stop.
        expanded = statement.compile(dialect=repo.engine.dialect).construct_expanded_state(params)
        values = tuple(  # DATETIME(6) holds naive UTC
            value.astimezone(UTC).replace(tzinfo=None) if isinstance(value, datetime) else value
            for value in expanded.positional_parameters
        )
        async with repo.engine.connect() as conn:
            analyzed = await conn.exec_driver_sql(
                "ANALYZE FORMAT=JSON " + expanded.statement, values
            )
            return mariadb_plan(json.loads(analyzed.scalar_one()))
    compiled = _compile(statement, repo.engine.dialect)
    args = compiled.args(params)
    async with repo.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        if backend.name == "postgres":
            rows = await driver.fetch("EXPLAIN " + compiled.sql, *args)
            return "\n".join(row[0] for row in rows)
        cursor = await driver.execute("EXPLAIN QUERY PLAN " + compiled.sql, args)
        return "\n".join(str(row[-1]) for row in await cursor.fetchall())


async def explain_feed_page(
    repo: sr.SnapshotRepository[Cart], backend: Backend, after_seq: int
) -> str:
    """The plan of `changes_since` for a page of 100 after `after_seq`."""
    dialect = "postgresql" if backend.name == "postgres" else "sqlite"
    params = {**SCOPE, "after_txid": 0, "after_seq": after_seq, "limit": 100}
    return await explain(repo, backend, changes_since_statement(dialect), params)


async def test_history_reads_are_an_index_range_scan_without_sort(
    repo: sr.SnapshotRepository[Cart], backend: Backend
):
    await seed_deep_history(repo, backend)
    plan = await explain(
        repo, backend, history_statement(), {**SCOPE, "user_id": "deep", "limit": 10}
    )
    if backend.name == "postgres":
        assert "Index Scan Backward using pk_snapshot_history" in plan, plan
        assert "Sort" not in plan, plan
        assert "Seq Scan" not in plan, plan
    elif backend.name == "mariadb":
        # The primary key's (tenant, namespace, user_id) prefix, read backward: 10 rows.
        assert plan == "snapshot_history access_type=ref key=PRIMARY r_rows=10", plan
    else:
        assert "SEARCH snapshot_history USING INDEX sqlite_autoindex_snapshot_history_1" in plan, (
            plan
        )
        assert "TEMP B-TREE" not in plan, plan
    history = await repo.get_history("deep", limit=10)
    assert [s.version for s in history] == list(range(DEEP, DEEP - 10, -1))


async def test_as_of_reads_walk_the_primary_key_down_from_the_newest_version(
    repo: sr.SnapshotRepository[Cart], backend: Backend
):
    """No created_at index (revision 0017): the newest version old enough is found by
    reading the user's versions backward, one row here, with no sort."""
    await seed_deep_history(repo, backend)
    newest = await repo.get_latest("deep")
    assert newest is not None
    assert newest.created_at is not None
    at = newest.created_at
    plan = await explain(repo, backend, as_of_statement(), {**SCOPE, "user_id": "deep", "at": at})
    if backend.name == "postgres":
        assert "Index Scan Backward using pk_snapshot_history" in plan, plan
        assert "Sort" not in plan, plan
    elif backend.name == "mariadb":
        assert plan == "snapshot_history access_type=ref key=PRIMARY r_rows=1", plan
    else:
        assert "SEARCH snapshot_history USING INDEX sqlite_autoindex_snapshot_history_1" in plan, (
            plan
        )
        assert "TEMP B-TREE" not in plan, plan
    found = await repo.get_as_of("deep", at)
    assert found is not None
    assert found.version == DEEP


@pytest.mark.parametrize("many", [False, True], ids=["get_latest", "get_latest_many"])
async def test_latest_reads_are_primary_key_lookups(
    repo: sr.SnapshotRepository[Cart], backend: Backend, many: bool
):
    await seed_deep_history(repo, backend)
    if many and backend.name == "mariadb":  # the core backend's expanding IN list
        statement = latest_many()
        params = {**SCOPE, "user_ids": ["deep", "u1"], "now": datetime.now(UTC)}
    elif many:
        statement = latest_many_statement("postgresql" if backend.name == "postgres" else "sqlite")
        params = (
            {**SCOPE, "user_ids": ["deep", "u1"]}
            if backend.name == "postgres"
            else {**SCOPE, "user_ids_json": '["deep", "u1"]'}
        )
    else:
        statement, params = latest_statement(), {**SCOPE, "user_id": "deep"}
    plan = await explain(repo, backend, statement, params)
    if backend.name == "postgres":
        assert "pk_snapshot_latest" in plan, plan
        assert "Seq Scan on snapshot_latest" not in plan, plan
    elif backend.name == "mariadb":
        # One user: a `const` primary-key lookup; a list: a range of primary-key lookups.
        access = "range" if many else "const"
        assert plan.startswith(f"snapshot_latest access_type={access} key=PRIMARY "), plan
        assert "filesort" not in plan, plan
    else:
        assert "SEARCH snapshot_latest USING INDEX sqlite_autoindex_snapshot_latest_1" in plan, plan


async def index_definition(repo: sr.SnapshotRepository[Cart], backend: Backend, name: str) -> str:
    if backend.name == "mariadb":  # `TABLE (COLUMN, ...) TYPE`, from the catalog
        async with repo.engine.connect() as conn:
            rows = await conn.exec_driver_sql(
                "SELECT table_name, column_name, index_type FROM information_schema.statistics "
                "WHERE table_schema = DATABASE() AND index_name = %s ORDER BY seq_in_index",
                (name,),
            )
            found = rows.all()
        if not found:
            return "None"
        columns = ", ".join(row[1] for row in found)
        return f"{found[0][0]} ({columns}) {found[0][2]}"
    query = (
        "SELECT indexdef FROM pg_indexes WHERE indexname = $1"
        if backend.name == "postgres"
        else "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?"
    )
    async with repo.engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        if backend.name == "postgres":
            return str(await driver.fetchval(query, name))
        cursor = await driver.execute(query, (name,))
        return str((await cursor.fetchone())[0])


@pytest.mark.parametrize(
    ("index", "column"),
    [
        ("ux_snapshot_history_idempotency_key", "idempotency_key"),
        ("ix_snapshot_latest_expires_at", "expires_at"),
        ("ix_snapshot_history_feed", "feed_seq"),
    ],
)
async def test_optional_columns_are_indexed_only_where_set(
    repo: sr.SnapshotRepository[Cart], backend: Backend, index: str, column: str
):
    """Writes without an idempotency key or expiry add no entry to these indexes (0008);
    history rows carry a feed position only on Postgres, from 0010.

    MariaDB has no partial indexes: there the index exists, on the column, and holds
    every row (the lookups that need it use it: see the plan tests)."""
    definition = await index_definition(repo, backend, index)
    if backend.name == "mariadb":
        table = "snapshot_latest" if index.startswith("ix_snapshot_latest") else "snapshot_history"
        assert definition.startswith(f"{table} ("), definition
        assert column in definition.split("(")[1].split(")")[0].split(", "), definition
        return
    assert f"WHERE ({column} IS NOT NULL)" in definition or (
        f"WHERE {column} IS NOT NULL" in definition
    ), definition


async def test_idempotency_and_expiry_lookups_use_the_partial_indexes(
    repo: sr.SnapshotRepository[Cart], backend: Backend
):
    await seed_deep_history(repo, backend)
    keyed = await explain(
        repo,
        backend,
        idempotent_write_statement(),
        {**SCOPE, "user_id": "deep", "idempotency_key": "k"},
    )
    # A user with 100,000 versions: only the key's index finds the row without a scan.
    if backend.name == "mariadb":
        # No key "k": an index on the key reads no row; any other reads all 100,000.
        assert keyed.startswith("snapshot_history "), keyed
        assert keyed.endswith(" r_rows=0"), f"the lookup read the user's history: {keyed}"
    else:
        assert "ux_snapshot_history_idempotency_key" in keyed, keyed
    expired = await explain(
        repo,
        backend,
        expired_users_statement(one_tenant=False),
        {"namespace": "default", "now": datetime.now(UTC), "limit": 100},
    )
    assert "ix_snapshot_latest_expires_at" in expired, expired
    if backend.name == "mariadb":
        assert expired.startswith("snapshot_latest access_type=range "), expired
        assert " key=ix_snapshot_latest_expires_at " in expired, expired
    assert "Seq Scan" not in expired, expired
    assert "SCAN snapshot_latest" not in expired, expired


async def test_count_users_reads_the_kept_count_not_the_users(
    repo: sr.SnapshotRepository[Cart], backend: Backend
):
    """20,000 users and more: the count reads its row, and of `snapshot_latest` only the
    expired users (none here), through the expiry index."""
    await seed_deep_history(repo, backend)
    async with repo.engine.connect() as conn:
        users = await conn.scalar(select(func.count()).select_from(latest_table))
    assert await repo.count_users() == users  # folds the seed's 20,000 +1 rows into one
    async with repo.engine.connect() as conn:  # statistics as autovacuum would leave them
        await conn.exec_driver_sql(
            "ANALYZE TABLE snapshot_user_counts" if backend.name == "mariadb" else "ANALYZE"
        )
        await conn.commit()
    plan = await explain(
        repo, backend, count_users_statement(), {**SCOPE, "now": datetime.now(UTC)}
    )
    # The count's own table is one row here: any plan reads it cheaply.
    assert "ix_snapshot_latest_expires_at" in plan, plan
    assert "Seq Scan on snapshot_latest" not in plan, plan
    if backend.name == "sqlite":  # pinned, whatever `sqlite_stat1` says
        assert "SEARCH snapshot_user_counts USING INDEX ix_snapshot_user_counts_scope" in plan
        assert "SEARCH snapshot_latest USING INDEX ix_snapshot_latest_expires_at" in plan
    if backend.name == "mariadb":
        assert (
            "snapshot_latest access_type=range key=ix_snapshot_latest_expires_at r_rows=0" in plan
        )
        assert (
            "snapshot_user_counts access_type=ref key=ix_snapshot_user_counts_scope r_rows=1"
            in plan
        )


async def test_postgres_writes_update_the_latest_row_in_place(postgres_url: str):
    """Revision 0009's free space per page makes a write a HOT update on its row's page.

    With full pages (fillfactor 100) the new row version must move to another
    page and add an entry to every index of the table; with room left it stays
    on its page, which for an update of unindexed columns is a HOT update.
    """
    async with sr.SnapshotRepository.from_url(postgres_url, Cart) as repo:
        async with repo.engine.connect() as conn:
            options = await conn.exec_driver_sql(
                "SELECT reloptions FROM pg_class WHERE relname = 'snapshot_latest'"
            )
            assert options.scalar_one() == ["fillfactor=50"]
        note = "n" * 600  # a few rows fill a page
        await repo.upsert_many(
            [sr.Snapshot(user_id=f"u{i:03}", state=Cart(note=note)) for i in range(100)]
        )

        async def pages() -> dict[str, int]:
            async with repo.engine.connect() as conn:
                rows = await conn.exec_driver_sql(
                    "SELECT user_id, (ctid::text::point)[0]::int FROM snapshot_latest"
                )
                return dict(rows.all())

        before = await pages()
        assert max(before.values()) > 0, "the rows fit on one page: nothing is tested"
        first_page = sorted(user for user, page in before.items() if page == 0)
        for user_id in first_page:
            await repo.upsert_latest(sr.Snapshot(user_id=user_id, state=Cart(note=note + "!")))
        after = await pages()
        assert {user: after[user] for user in first_page} == dict.fromkeys(first_page, 0)


async def test_postgres_feed_reads_merge_two_index_scans_without_sort(postgres_url: str):
    """The feed's two homes (0010) are each read in feed order on their index and merged:
    a page costs its size, whatever the length of the feed or of the history."""
    async with sr.SnapshotRepository.from_url(postgres_url, Cart) as repo:
        async with repo.engine.begin() as conn:
            txid = "CAST(CAST(pg_current_xact_id() AS TEXT) AS BIGINT)"
            await conn.exec_driver_sql(
                "INSERT INTO snapshot_history (user_id, version, schema_version, payload, "
                f"created_at, feed_txid, feed_seq) SELECT 'u' || u, 1, 1, '\\x7b7d'::bytea, "
                f"now(), {txid}, nextval('snapshot_changes_seq_seq') "
                "FROM generate_series(1, 50000) AS u"
            )
            await conn.exec_driver_sql(
                "INSERT INTO snapshot_changes (txid, tenant, namespace, user_id, version, kind, "
                f"created_at) SELECT {txid}, '', 'default', 'e' || u, 1, 'erase', now() "
                "FROM generate_series(1, 50000) AS u"
            )
        async with repo.engine.connect() as conn:
            await conn.exec_driver_sql("ANALYZE")
            await conn.commit()
        backend = Backend(name="postgres", url=postgres_url, fresh_url=lambda: postgres_url)
        plan = await explain_feed_page(repo, backend, after_seq=0)
        assert "Merge Append" in plan, plan
        assert "ix_snapshot_changes_feed" in plan, plan
        assert "ix_snapshot_history_feed" in plan, plan
        assert "Sort  (" not in plan, plan  # a Sort node (Merge Append names its keys only)
        assert "Seq Scan" not in plan, plan


@pytest.mark.parametrize("statistics", ["none", "stale"])
async def test_sqlite_feed_statements_keep_their_index_whatever_the_statistics(
    tmp_path: Path, sqlite_template: Path, statistics: str
):
    """SQLite plans from `sqlite_stat1` as last written, or from guesses without it.

    Without statistics it read a feed page by sorting the scope's whole feed;
    with statistics taken while the feed held one entry, it scanned the whole
    table for every page and every erasure. Both statements now name their index.
    """
    backend = sqlite_backend(tmp_path, sqlite_template)
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as repo:
        await repo.upsert_latest(sr.Snapshot(user_id="first", state=Cart()))
        if statistics == "stale":
            async with repo.engine.connect() as conn:
                await conn.exec_driver_sql("ANALYZE")
                await conn.commit()
        for _round in range(2):
            await repo.upsert_many(
                [sr.Snapshot(user_id=f"u{i}", state=Cart()) for i in range(2000)]
            )
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as repo:  # plans anew
        forget = await explain(
            repo, backend, sqlite_erasure_feed_statements()[0], {**SCOPE, "user_id": "u7"}
        )
        assert "SEARCH snapshot_changes USING INDEX ix_snapshot_changes_user" in forget, forget
        page = await explain_feed_page(repo, backend, after_seq=3990)
        assert "SEARCH snapshot_changes USING INDEX ix_snapshot_changes_feed" in page, page
        assert "seq>?" in page, page
        assert "TEMP B-TREE" not in page, page
        changes = await repo.changes_since(limit=10_000)
        assert [c.seq for c in changes.changes] == list(range(1, 4002))
        await repo.delete("u7")
        tail = await repo.changes_since(changes.cursor)
        assert [(c.user_id, c.kind) for c in tail.changes] == [("", "erase")]
        everything = await repo.changes_since(limit=10_000)
        assert [c.user_id for c in everything.changes].count("u7") == 0  # forgotten


async def test_postgres_latest_many_probes_the_key_on_a_table_without_statistics(
    postgres_server: PostgresServer,
):
    """A freshly loaded table that autovacuum has not analysed yet: the generic plan of
    `get_latest_many` must still be one primary-key probe per id (a nested loop over
    `unnest`), never a scan of the scope. `user_id = ANY(...)` left the planner free to
    scan: 3.6 s for 100 ids at 1M users. Then `load` itself leaves statistics behind."""
    url = postgres_server.create_database()
    await migrate_database(url)
    dsn = plain_dsn(url)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ALTER TABLE snapshot_latest SET (autovacuum_enabled = false)")
        await conn.execute(
            "INSERT INTO snapshot_latest (tenant, namespace, user_id, version, schema_version,"
            " payload, created_at) SELECT '', 'default', 'u' || n, 1, 1, '\\x7b7d'::bytea, now()"
            " FROM generate_series(1, 20000) AS n"
        )
        assert await conn.fetchval(
            "SELECT last_analyze IS NULL AND last_autoanalyze IS NULL "
            "FROM pg_stat_user_tables WHERE relname = 'snapshot_latest'"
        )
        engine = sr.create_engine(url)
        statement = _compile(latest_many_statement("postgresql"), engine.dialect)
        await engine.dispose()
        args = statement.args(
            {
                "tenant": "",
                "namespace": "default",
                "user_ids": [f"u{n}" for n in range(1, 101)],
                "now": datetime.now(UTC),
            }
        )
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute(f"PREPARE many AS {statement.sql}")
        literals = ", ".join(_literal(value) for value in args)  # EXPLAIN takes no $n
        explained = await conn.fetch(f"EXPLAIN EXECUTE many({literals})")
        plan = "\n".join(row[0] for row in explained)
    finally:
        await conn.close()
    assert "Nested Loop" in plan, plan
    assert "Function Scan on unnest" in plan, plan
    assert "Index Scan using pk_snapshot_latest" in plan, plan
    assert "Seq Scan" not in plan, plan


def _literal(value: object) -> str:
    """A Postgres literal for one of the test's own parameter values (no untrusted input)."""
    if isinstance(value, list):
        return "ARRAY[" + ", ".join(_literal(item) for item in value) + "]::varchar[]"
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'::timestamptz"
    if isinstance(value, int):
        return str(value)
    assert isinstance(value, str)
    return "'" + value.replace("'", "''") + "'"


async def test_postgres_load_leaves_statistics_for_the_planner(postgres_server: PostgresServer):
    """`load` runs ANALYZE once it committed: the planner need not wait for autovacuum."""
    source, target = postgres_server.create_database(), postgres_server.create_database()
    for url in (source, target):
        await migrate_database(url)
    async with sr.SnapshotRepository.from_url(source, Cart) as repo:
        await repo.upsert_many([sr.Snapshot(user_id=f"u{n}", state=Cart()) for n in range(50)])
    source_engine, target_engine = sr.create_engine(source), sr.create_engine(target)
    try:
        dumped = io.BytesIO()
        await dump(source_engine, dumped)
        dumped.seek(0)
        assert await load(target_engine, dumped) == 50
    finally:
        await source_engine.dispose()
        await target_engine.dispose()
    conn = await asyncpg.connect(plain_dsn(target))
    try:
        analysed = await conn.fetch(
            "SELECT relname FROM pg_stat_user_tables WHERE last_analyze IS NOT NULL"
        )
    finally:
        await conn.close()
    assert {"snapshot_latest", "snapshot_history"} <= {row["relname"] for row in analysed}
