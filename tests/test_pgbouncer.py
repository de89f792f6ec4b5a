"""Through a real PgBouncer in transaction mode (pool of 3): migrate, a concurrent load, LISTEN.

The conformance suite also runs through PgBouncer (the `postgres-pgbouncer`
target of `tests.support.conformance`). Here: what only a pooler shows. A
load of 200 concurrent tasks makes PgBouncer hand each transaction whichever
of its three server connections is free, which breaks named prepared
statements (shown with the default settings) and must not break anything
with `transaction_pooler`; migrating at once from two engines; URL options
turned into settings; and LISTEN refused instead of silent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

import snapshot_repo as sr
from snapshot_repo import migrate
from snapshot_repo.engine import behind_transaction_pooler, create_engine
from tests.support.databases import Cart, PostgresServer, admin, migrate_database, plain_dsn
from tests.support.pgbouncer import PgBouncer, start_for_tests

POOL_SIZE = 3
TASKS = 200
CALLS_PER_TASK = 10
PREPARED_STATEMENT_ERRORS = (
    asyncpg.InvalidSQLStatementNameError,  # prepared statement "__asyncpg_stmt_N__" does not exist
    asyncpg.DuplicatePreparedStatementError,  # ... already exists
)


@pytest.fixture(scope="module")
def bouncer(postgres_server: PostgresServer) -> Iterator[PgBouncer]:
    """PgBouncer, pool_mode=transaction, default_pool_size=3, in front of the test server."""
    started = start_for_tests(postgres_server.admin_url, pool_size=POOL_SIZE)
    yield started
    started.stop()


def snap(user_id: str, note: str = "") -> sr.Snapshot[Cart]:
    return sr.Snapshot(user_id=user_id, state=Cart(note=note))


async def mixed_calls(repo: sr.SnapshotRepository[Cart], user: str) -> int:
    """Ten calls of one task: writes, compare-and-set, batches, reads, history, the feed and an
    erasure, each result checked (a wrong result raises AssertionError). Returns the count."""
    assert (await repo.upsert_latest(snap(user, "1"))).version == 1
    assert (await repo.upsert_latest(snap(user, "2"), expected_version=1)).version == 2
    latest = await repo.get_latest(user)
    assert latest is not None
    assert (latest.version, latest.state.note) == (2, "2")
    await repo.upsert_many([snap(f"{user}-a"), snap(f"{user}-b")])
    assert set(await repo.get_latest_many([user, f"{user}-a", f"{user}-b"])) == {
        user,
        f"{user}-a",
        f"{user}-b",
    }
    assert [s.version for s in await repo.get_history(user, limit=5)] == [2, 1]
    page = await repo.changes_since(None, limit=10)
    assert page.cursor
    with pytest.raises(sr.VersionConflictError):  # a stale compare-and-set is refused
        await repo.upsert_latest(snap(user, "stale"), expected_version=1)
    assert await repo.delete(f"{user}-a") == 1
    assert await repo.get_latest(f"{user}-a") is None
    return CALLS_PER_TASK


async def run_load(repos: list[sr.SnapshotRepository[Cart]], tasks: int) -> tuple[int, list[str]]:
    """`tasks` concurrent tasks of `mixed_calls`, spread over `repos`: (calls, errors)."""
    errors: list[str] = []

    async def task(n: int) -> int:
        try:
            return await mixed_calls(repos[n % len(repos)], f"user-{n}")
        except Exception as exc:
            cause = exc.__cause__
            errors.append(f"{type(exc).__name__} ({type(cause).__name__}): {exc}")
            return 0

    done = await asyncio.gather(*(task(n) for n in range(tasks)))
    return sum(done), errors


async def server_connections(database_url: str) -> int:
    """How many server connections are open to the database (the pooler's, seen by Postgres)."""
    conn = await asyncpg.connect(plain_dsn(database_url), timeout=5)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return int(count)


class TestLoad:
    async def test_200_concurrent_tasks_on_a_pool_of_3_make_no_error(
        self, bouncer: PgBouncer, postgres_server: PostgresServer
    ):
        """2,000 calls, three quarters on the fast backend (raw asyncpg), a quarter on the
        core one (SQLAlchemy, slower: it holds a server connection for BEGIN, each
        statement and COMMIT), 20 client connections on 3 server connections: no error,
        and every user's history is right when read directly.

        In a database of its own: the suite's other PgBouncer (the conformance target's)
        keeps server connections open to the shared test database, which would count."""
        postgres_url = postgres_server.create_database()
        await migrate_database(postgres_url)
        url = bouncer.url(postgres_url, transaction_pooler="true")
        async with (
            sr.SnapshotRepository.from_url(url, Cart) as fast,
            sr.SnapshotRepository.from_url(url, Cart, backend="core") as core,
        ):
            calls, errors = await run_load([fast, fast, fast, core], TASKS)
        assert errors == []
        assert calls == TASKS * CALLS_PER_TASK
        # The pooler, not a connection per client, carried the load.
        assert 1 <= await server_connections(postgres_url) <= POOL_SIZE
        async with sr.SnapshotRepository.from_url(postgres_url, Cart) as direct:
            for n in (0, 3, TASKS - 1):  # fast, core, fast
                history = await direct.get_history(f"user-{n}", limit=5)
                assert [s.version for s in history] == [2, 1]

    async def test_without_the_setting_named_prepared_statements_fail(
        self, bouncer: PgBouncer, postgres_url: str
    ):
        """Why the setting exists (issue #18): with the defaults, asyncpg names and caches
        each statement on the client connection, while PgBouncer runs it on any server
        connection, where that name is missing or another statement's."""
        async with sr.SnapshotRepository.from_url(bouncer.url(postgres_url), Cart) as repo:
            errors: list[BaseException] = []

            async def task(n: int) -> None:
                try:
                    await mixed_calls(repo, f"user-{n}")
                except Exception as exc:
                    errors.append(exc)

            await asyncio.gather(*(task(n) for n in range(50)))
        causes = [type(exc.__cause__) for exc in errors]
        assert any(issubclass(cause, PREPARED_STATEMENT_ERRORS) for cause in causes), causes


class TestMigrate:
    async def test_two_engines_migrate_a_new_database_at_once_through_the_pooler(
        self, bouncer: PgBouncer, postgres_server: PostgresServer
    ):
        """`statement_cache_size=0` in the URL (which raised a raw TypeError from migrate)
        and `transaction_pooler=true` both work; the transaction-scoped advisory lock
        holds through the pooler, so the revisions apply once."""
        database = postgres_server.create_database()
        urls = [
            bouncer.url(database, statement_cache_size="0"),
            bouncer.url(database, transaction_pooler="true"),
        ]
        repos = [sr.SnapshotRepository.from_url(url, Cart) for url in urls]
        try:
            assert all(behind_transaction_pooler(repo.engine) for repo in repos)
            await asyncio.gather(*(repo.migrate() for repo in repos))
            assert [await repo.health_check() for repo in repos] == [True, True]
            assert await migrate.current_revision(repos[0].engine) == migrate.head_revision()
            await migrate.check(repos[1].engine)  # no drift
            assert (await repos[0].upsert_latest(snap("u"))).version == 1
        finally:
            for repo in repos:
                await repo.close()


class TestListen:
    async def test_subscribe_and_changes_refuse_with_a_configuration_error(
        self, bouncer: PgBouncer, postgres_url: str
    ):
        """LISTEN through a transaction pooler hears nothing: before, `subscribe()`
        returned normally and never called back."""
        url = bouncer.url(postgres_url, transaction_pooler="true")
        async with sr.SnapshotRepository.from_url(url, Cart) as repo:
            with pytest.raises(sr.ConfigurationError, match="transaction pooler"):
                await repo.subscribe(lambda change: None)
            with pytest.raises(sr.ConfigurationError, match="transaction pooler"):
                async with repo.changes():
                    pass
            assert (await repo.upsert_latest(snap("u"))).version == 1  # the repository still works

    async def test_a_writer_behind_the_pooler_still_notifies_direct_listeners(
        self, bouncer: PgBouncer, postgres_url: str
    ):
        """NOTIFY is sent at commit by the transaction that wrote, so `notify=True` works
        through the pooler; listen on an engine connected to Postgres directly."""
        heard: asyncio.Queue[sr.Change] = asyncio.Queue()
        pooled_url = bouncer.url(postgres_url, transaction_pooler="true")
        async with (
            sr.SnapshotRepository.from_url(postgres_url, Cart) as listener,
            sr.SnapshotRepository.from_url(pooled_url, Cart, notify=True) as writer,
        ):
            with await listener.subscribe(heard.put_nowait):
                await writer.upsert_latest(snap("u"))
                change = await asyncio.wait_for(heard.get(), timeout=5)
        assert (change.user_id, change.version, change.kind) == ("u", 1, "write")


class TestUrlOptions:
    """Query options become typed connection arguments, or a `ConfigurationError` up front."""

    @pytest.mark.parametrize(
        "query",
        [
            "statement_cache_size=abc",
            "prepared_statement_cache_size=-1",
            "transaction_pooler=maybe",
            "transaction_pooler=true&statement_cache_size=100",
            "transaction_pooler=true&prepared_statement_cache_size=5",
            "statement_cache_size=0&prepared_statement_cache_size=5",
            "sslmode=require",  # libpq's spelling; asyncpg takes ssl=
        ],
    )
    def test_a_bad_or_contradictory_option_is_refused(self, query: str):
        with pytest.raises(sr.ConfigurationError):
            create_engine(f"postgresql://postgres@127.0.0.1/db?{query}")

    def test_the_setting_and_the_url_must_agree(self):
        settings = sr.EngineSettings(transaction_pooler=True)
        with pytest.raises(sr.ConfigurationError, match="contradicts"):
            create_engine("postgresql://postgres@127.0.0.1/db?transaction_pooler=false", settings)
        with pytest.raises(sr.ConfigurationError, match="transaction_pooler"):
            sr.EngineSettings(transaction_pooler="yes")  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("query", "settings", "pooled"),
        [
            ("", {}, False),
            ("", {"transaction_pooler": True}, True),
            ("?transaction_pooler=on", {}, True),
            ("?statement_cache_size=0", {}, True),  # asyncpg's documented PgBouncer setting
            ("?statement_cache_size=0&transaction_pooler=false", {}, False),
            ("?prepared_statement_cache_size=0", {}, False),  # SQLAlchemy's cache alone
        ],
    )
    async def test_which_urls_and_settings_mean_a_transaction_pooler(
        self, query: str, settings: dict[str, Any], pooled: bool
    ):
        engine = create_engine(
            f"postgresql://postgres@127.0.0.1/db{query}", sr.EngineSettings(**settings)
        )
        try:
            assert behind_transaction_pooler(engine) is pooled
            assert "transaction_pooler" not in engine.url.query  # ours, not asyncpg's
        finally:
            await engine.dispose()

    async def test_cache_sizes_in_the_url_work_on_a_direct_connection(self, postgres_url: str):
        """Before, they reached asyncpg as text: a raw TypeError from the first call."""
        url = (
            f"{postgres_url}?prepared_statement_cache_size=0&max_cacheable_statement_size=4096"
            "&statement_cache_size=0&transaction_pooler=false"
        )
        async with sr.SnapshotRepository.from_url(url, Cart) as repo:
            await repo.migrate()
            assert (await repo.upsert_latest(snap("u"))).version == 1
            latest = await repo.get_latest("u")
            assert latest is not None
            assert latest.version == 1

    def test_the_setting_is_ignored_off_postgres(self, tmp_path: Any):
        engine = create_engine(
            f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
            sr.EngineSettings(transaction_pooler=True),
        )
        assert not behind_transaction_pooler(engine)
        engine.sync_engine.dispose()


async def test_the_pooler_fixture_forwards_throwaway_databases(
    bouncer: PgBouncer, postgres_server: PostgresServer
):
    """The wildcard database entry: a database made after PgBouncer started is reachable."""
    database = postgres_server.create_database()
    await admin(database, "CREATE TABLE probe (n int)")
    conn = await asyncpg.connect(plain_dsn(bouncer.url(database)), statement_cache_size=0)
    try:
        assert await conn.fetchval("SELECT count(*) FROM probe") == 0
    finally:
        await conn.close()
