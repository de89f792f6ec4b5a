"""Flat cost at any depth: the databases' own plans for the statements the library runs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

import snapshot_repo as sr
from snapshot_repo._dialects import (
    history_statement,
    idempotent_write_statement,
    latest_many_statement,
    latest_statement,
    sqlite_erasure_feed_statements,
)
from snapshot_repo._queries import changes_since_statement, expired_users_statement
from snapshot_repo.backends._compiled import compile_statement as _compile
from tests.support.databases import Backend, Cart, sqlite_backend

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
        await conn.exec_driver_sql("ANALYZE")
        await conn.commit()


async def explain(repo: sr.SnapshotRepository[Cart], backend: Backend, statement, params) -> str:
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
    else:
        assert "SEARCH snapshot_history USING INDEX sqlite_autoindex_snapshot_history_1" in plan, (
            plan
        )
        assert "TEMP B-TREE" not in plan, plan
    history = await repo.get_history("deep", limit=10)
    assert [s.version for s in history] == list(range(DEEP, DEEP - 10, -1))


@pytest.mark.parametrize("many", [False, True], ids=["get_latest", "get_latest_many"])
async def test_latest_reads_are_primary_key_lookups(
    repo: sr.SnapshotRepository[Cart], backend: Backend, many: bool
):
    await seed_deep_history(repo, backend)
    if many:
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
    else:
        assert "SEARCH snapshot_latest USING INDEX sqlite_autoindex_snapshot_latest_1" in plan, plan


async def index_definition(repo: sr.SnapshotRepository[Cart], backend: Backend, name: str) -> str:
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
    history rows carry a feed position only on Postgres, from 0010."""
    definition = await index_definition(repo, backend, index)
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
    assert "ux_snapshot_history_idempotency_key" in keyed, keyed
    expired = await explain(
        repo,
        backend,
        expired_users_statement(one_tenant=False),
        {"namespace": "default", "now": datetime.now(UTC), "limit": 100},
    )
    assert "ix_snapshot_latest_expires_at" in expired, expired
    assert "Seq Scan" not in expired, expired
    assert "SCAN snapshot_latest" not in expired, expired


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
