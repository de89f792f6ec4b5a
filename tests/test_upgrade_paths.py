"""Each revision upgrades a populated database from the previous head, keeping its rows."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

import snapshot_repo as sr
from snapshot_repo import migrate
from snapshot_repo.changes import Change
from tests.support.conformance import read_feed
from tests.support.databases import Backend, Cart, PostgresServer

from .test_changes import read_all

KEY = b"an application secret of 32 bytes"


def blob(backend: Backend, hex_text: str) -> str:
    return f"'\\x{hex_text}'::bytea" if backend.name == "postgres" else f"X'{hex_text}'"


def moment(backend: Backend, at: datetime) -> str:
    """A timestamp literal: SQLite and MariaDB (DATETIME(6)) hold naive UTC."""
    text = at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return f"'{text}+00'::timestamptz" if backend.name == "postgres" else f"'{text}'"


@pytest.mark.parametrize(
    "previous", ["0003", "0004", "0005", "0006", "0007", "0008", "0009", "0010"]
)
async def test_upgrade_from_each_previous_head_keeps_rows(backend: Backend, previous: str):
    """Rows written at `previous` (scoped keys exist from 0003 on) read the same at head."""
    engine = sr.create_engine(backend.fresh_url())
    cart = blob(backend, b'{"items":["kept"],"note":""}'.hex())
    now = datetime.now(UTC)
    try:
        await migrate.upgrade(engine, previous)
        async with engine.begin() as conn:
            extra_columns, extra_values = "", ""
            if previous >= "0004":
                extra_columns, extra_values = ", actor, reason", ", 'svc', 'why'"
            for version in (1, 2):
                await conn.exec_driver_sql(
                    "INSERT INTO snapshot_history (tenant, namespace, user_id, version, "
                    f"schema_version, payload, created_at, idempotency_key{extra_columns}) "
                    f"VALUES ('acme', 'cart', 'u1', {version}, 1, {cart}, {moment(backend, now)}, "
                    f"'key{version}'{extra_values})"
                )
            await conn.exec_driver_sql(
                "INSERT INTO snapshot_latest SELECT * FROM snapshot_history WHERE version = 2"
                if previous < "0006"
                else "INSERT INTO snapshot_latest (tenant, namespace, user_id, version, "
                "schema_version, payload, created_at, idempotency_key, actor, reason) "
                "SELECT tenant, namespace, user_id, version, schema_version, payload, "
                "created_at, idempotency_key, actor, reason FROM snapshot_history "
                "WHERE version = 2"
            )
            if previous >= "0005":
                await conn.exec_driver_sql(
                    "INSERT INTO snapshot_changes (tenant, namespace, user_id, version, kind, "
                    f"created_at) VALUES ('acme', 'cart', 'u1', 2, 'write', {moment(backend, now)})"
                )
            if previous >= "0006":
                await conn.exec_driver_sql(
                    "INSERT INTO snapshot_erasure_receipts (subject, tenant, namespace, "
                    f"erased_at, versions_erased, cause) VALUES ('{'0' * 64}', 'acme', 'cart', "
                    f"{moment(backend, now)}, 3, 'delete')"
                )
        await migrate.upgrade(engine)
        await migrate.check(engine)
        async with sr.SnapshotRepository(engine, Cart, namespace="cart") as repo:
            tenant = repo.for_tenant("acme")
            history = await tenant.get_history("u1")
            assert [(s.version, s.state.items, s.idempotency_key) for s in history] == [
                (2, ["kept"], "key2"),
                (1, ["kept"], "key1"),
            ]
            if previous >= "0004":
                assert {(s.actor, s.reason) for s in history} == {("svc", "why")}
            assert await tenant.get_latest("u1") == history[0]
            # Revision 0018 counted the users already there.
            assert (await tenant.count_users(), await repo.count_users()) == (1, 0)
            replay = await tenant.upsert_latest(
                sr.Snapshot(user_id="u1", state=Cart()), idempotency_key="key2"
            )
            assert replay.version == 2
            written = await tenant.upsert_latest(
                sr.Snapshot(user_id="u1", state=Cart(items=["new"])), ttl=timedelta(hours=1)
            )
            assert written.version == 3
            assert (await newest_feed_entry(tenant, version=3)).version == 3
            assert await tenant.delete("u1") == 3
            assert await tenant.count_users() == 0
    finally:
        await engine.dispose()


async def newest_feed_entry(repo: sr.SnapshotRepository[Cart], *, version: int) -> Change:
    """The feed's newest entry, once it is `version`'s, or whatever it is after 10 seconds.

    On Postgres the feed shows an entry once every transaction of the cluster
    that began before it has ended, and other work on the shared server may
    hold one open for a moment (see `read_feed`).
    """
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        changes, _cursor = await read_feed(repo, expect=1)
        if changes[-1].version == version or asyncio.get_running_loop().time() > deadline:
            return changes[-1]
        await asyncio.sleep(0.05)


async def test_a_populated_database_goes_down_to_0005_and_back(backend: Backend):
    url = backend.fresh_url()
    async with sr.SnapshotRepository.from_url(url, Cart, erasure_key=KEY) as repo:
        await repo.migrate()
        await repo.upsert_latest(sr.Snapshot(user_id="u1", state=Cart(items=["a"])))
        await repo.upsert_latest(sr.Snapshot(user_id="u1", state=Cart(items=["b"])))
        await migrate.downgrade(repo.engine, "0005")
        assert await migrate.current_revision(repo.engine) == "0005"
        await repo.migrate()
        assert [s.version for s in await repo.get_history("u1")] == [2, 1]
        assert await repo.health_check() is True


async def test_the_feed_reads_the_same_across_0010_both_ways(backend: Backend):
    """0010 moves write entries onto history rows (Postgres): entries from before it,
    and entries carried by history, read as one feed, and a downgrade keeps them all."""
    engine = sr.create_engine(backend.fresh_url())
    txid = "CAST(CAST(pg_current_xact_id() AS TEXT) AS BIGINT)"
    try:
        await migrate.upgrade(engine, "0009")
        async with engine.begin() as conn:
            await conn.exec_driver_sql(
                "INSERT INTO snapshot_changes (txid, tenant, namespace, user_id, version, kind, "
                f"created_at) VALUES ({txid if backend.name == 'postgres' else 'NULL'}, '', "
                f"'default', 'old', 1, 'write', {moment(backend, datetime.now(UTC))})"
            )
        await migrate.upgrade(engine)
        async with sr.SnapshotRepository(engine, Cart) as repo:
            for items in (["a"], ["b"], ["c"]):
                await repo.upsert_latest(sr.Snapshot(user_id="new", state=Cart(items=items)))
            assert await repo.prune_history("new", keep_last=1) == 2
            before, _ = await read_all(repo, expect=4)
        assert [(c.user_id, c.version) for c in before] == [("old", 1)] + [
            ("new", v) for v in (1, 2, 3)
        ]
        await migrate.downgrade(engine, "0009")
        async with engine.connect() as conn:
            stored = await conn.exec_driver_sql(
                "SELECT seq, user_id, version FROM snapshot_changes ORDER BY seq"
            )
            assert [tuple(row) for row in stored] == [(c.seq, c.user_id, c.version) for c in before]
        await migrate.upgrade(engine)
        async with sr.SnapshotRepository(engine, Cart) as repo:
            after, _ = await read_all(repo, expect=4)
        assert after == before
    finally:
        await engine.dispose()


async def test_a_postgres_erasure_before_0011_is_refused_and_erases_nothing(
    postgres_server: PostgresServer,
):
    """0011 brings the function a Postgres erasure calls: a database migrated by an
    older release gets `SchemaNotReadyError` naming `migrate`, and keeps every row."""
    url = postgres_server.create_database()
    async with sr.SnapshotRepository.from_url(url, Cart, erasure_key=KEY) as repo:
        await migrate.upgrade(repo.engine, "0010")
        await repo.upsert_latest(sr.Snapshot(user_id="u1", state=Cart(items=["a"])))
        with pytest.raises(sr.SchemaNotReadyError, match="migrate"):
            await repo.delete("u1")
        assert [s.version for s in await repo.get_history("u1")] == [1]
        assert await repo.erasure_receipt("u1") is None
        await repo.migrate()
        assert await repo.delete("u1") == 1
        assert await repo.get_latest("u1") is None
        receipt = await repo.erasure_receipt("u1")
        assert receipt is not None
        assert receipt.versions_erased == 1
        await migrate.downgrade(repo.engine, "0010")  # drops the function again
        await repo.upsert_latest(sr.Snapshot(user_id="u2", state=Cart()))
        with pytest.raises(sr.SchemaNotReadyError):
            await repo.delete("u2")
