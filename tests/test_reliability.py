"""Idempotent retries, readiness reports, invalid stored states, timeouts and dead connections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event

import snapshot_repo as sr
from snapshot_repo import migrate
from snapshot_repo.backends import KEPT_CONNECTIONS, _pool
from tests.support.databases import Backend, Cart, plain_dsn

from .support.pool import queue_pool
from .test_repository import snap, stored_rows

# --- idempotency keys ----------------------------------------------------------


async def test_same_key_twice_writes_once_and_returns_the_first_version(
    repo: sr.SnapshotRepository[Cart],
):
    first = await repo.upsert_latest(snap("u1", "a"), idempotency_key="order-17")
    again = await repo.upsert_latest(snap("u1", "a"), idempotency_key="order-17")
    assert first.version == again.version == 1
    assert again == first
    assert await stored_rows(repo, "u1") == (1, [1])


async def test_replay_returns_the_original_even_with_a_different_state(
    repo: sr.SnapshotRepository[Cart],
):
    first = await repo.upsert_latest(snap("u1", "original"), idempotency_key="k")
    await repo.upsert_latest(snap("u1", "later"))
    replay = await repo.upsert_latest(snap("u1", "changed"), idempotency_key="k")
    assert replay == first
    assert replay.state.items == ["original"]
    assert await stored_rows(repo, "u1") == (2, [1, 2])


async def test_different_keys_write_new_versions(repo: sr.SnapshotRepository[Cart]):
    versions = [
        (await repo.upsert_latest(snap("u1", str(n)), idempotency_key=f"k{n}")).version
        for n in range(3)
    ]
    assert versions == [1, 2, 3]


async def test_keys_are_per_user(repo: sr.SnapshotRepository[Cart]):
    a = await repo.upsert_latest(snap("alice", "x"), idempotency_key="same")
    b = await repo.upsert_latest(snap("bob", "y"), idempotency_key="same")
    assert (a.user_id, a.version, b.user_id, b.version) == ("alice", 1, "bob", 1)


async def test_history_and_latest_expose_the_key(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("u1", "a"), idempotency_key="first")
    await repo.upsert_latest(snap("u1", "b"))
    await repo.upsert_latest(snap("u1", "c"), idempotency_key="third")
    history = await repo.get_history("u1")
    assert [s.idempotency_key for s in history] == ["third", None, "first"]
    latest = await repo.get_latest("u1")
    assert latest == history[0]


async def test_concurrent_duplicates_with_one_key_write_once(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("u1", "base"))
    results = await asyncio.gather(
        *(repo.upsert_latest(snap("u1", f"try{n}"), idempotency_key="pay-1") for n in range(10))
    )
    assert {r.version for r in results} == {2}
    assert len({r.state.items[0] for r in results}) == 1  # all see the one stored state
    assert await stored_rows(repo, "u1") == (2, [1, 2])


async def test_replay_wins_over_a_stale_expected_version(repo: sr.SnapshotRepository[Cart]):
    """A retried compare-and-set whose first attempt succeeded is not a conflict."""
    await repo.upsert_latest(snap("u1", "a"))
    first = await repo.upsert_latest(snap("u1", "b"), expected_version=1, idempotency_key="cas")
    retry = await repo.upsert_latest(snap("u1", "b"), expected_version=1, idempotency_key="cas")
    assert retry == first
    with pytest.raises(sr.VersionConflictError):
        await repo.upsert_latest(snap("u1", "c"), expected_version=1, idempotency_key="other")
    assert await stored_rows(repo, "u1") == (2, [1, 2])


async def test_deleted_user_can_reuse_a_key(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("u1", "a"), idempotency_key="k")
    await repo.delete("u1")
    again = await repo.upsert_latest(snap("u1", "b"), idempotency_key="k")
    assert (again.version, again.state.items) == (1, ["b"])


@pytest.mark.parametrize("key", ["", "k" * 256, "tab\t", 7, b"k"])
async def test_bad_idempotency_keys_are_refused(repo: sr.SnapshotRepository[Cart], key):
    with pytest.raises(sr.SnapshotValidationError, match="idempotency_key"):
        await repo.upsert_latest(snap("u1", "a"), idempotency_key=key)
    assert await repo.get_latest("u1") is None


# --- readiness -----------------------------------------------------------------


async def test_health_report_of_a_ready_database(repo: sr.SnapshotRepository[Cart]):
    report = await repo.health()
    assert report.reachable is True
    assert report.healthy is True
    assert report.latency_ms is not None
    assert 0 < report.latency_ms < 3000
    assert report.database_revision == report.head_revision == migrate.head_revision()
    assert report.error is None
    assert '"healthy":true' in report.model_dump_json()


async def test_health_report_of_an_unmigrated_database(backend: Backend):
    url = backend.fresh_url()
    if backend.name == "sqlite":  # an existing SQLite file without our tables
        path = url.removeprefix("sqlite+aiosqlite:///")
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("CREATE TABLE unrelated (x INTEGER)")
    async with sr.SnapshotRepository.from_url(url) as repo:
        report = await repo.health()
        assert report.reachable is True
        assert report.database_revision is None
        assert report.healthy is False
        assert await repo.health_check() is False


async def test_health_report_of_a_missing_sqlite_file(tmp_path):
    path = tmp_path / "absent.db"
    async with sr.SnapshotRepository.from_url(f"sqlite:///{path}") as repo:
        report = await repo.health()
    assert (report.reachable, report.healthy) == (False, False)
    assert report.error is not None
    assert "does not exist" in report.error
    assert not path.exists()


async def test_health_report_of_an_older_schema(backend: Backend):
    engine = sr.create_engine(backend.fresh_url())
    try:
        await migrate.upgrade(engine, "0001")
        async with sr.SnapshotRepository(engine) as repo:
            report = await repo.health()
        assert report.reachable is True
        assert report.database_revision == "0001"
        assert report.healthy is False
    finally:
        await engine.dispose()


# --- stored states that no longer validate --------------------------------------


async def test_skip_invalid_leaves_out_bad_rows_and_logs_them(
    backend: Backend, caplog: pytest.LogCaptureFixture
):
    async with sr.SnapshotRepository.from_url(backend.url) as old_code:
        await old_code.upsert_latest(sr.Snapshot(user_id="u1", state={"items": "not a list"}))
        await old_code.upsert_latest(sr.Snapshot(user_id="u1", state={"items": ["fine"]}))
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as repo:
        with pytest.raises(sr.SnapshotValidationError, match="version 1"):
            await repo.get_history("u1")
        with caplog.at_level(logging.WARNING, logger="snapshot_repo"):
            history = await repo.get_history("u1", skip_invalid=True)
    assert [(s.version, s.state.items) for s in history] == [(2, ["fine"])]
    assert any("version 1" in r.getMessage() for r in caplog.records)
    assert not any("not a list" in r.getMessage() for r in caplog.records)


# --- timeouts and dead connections ---------------------------------------------


@contextlib.asynccontextmanager
async def stalled_server() -> AsyncIterator[str]:
    """A TCP server that accepts connections and never answers: a URL to it."""
    stalled: list[asyncio.StreamWriter] = []

    async def accept_and_stall(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        stalled.append(writer)

    server = await asyncio.start_server(accept_and_stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x"
    finally:
        for writer in stalled:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_operation_timeout_bounds_a_call_to_a_stalled_server():
    async with stalled_server() as url:
        repo = sr.SnapshotRepository.from_url(
            url, settings=sr.EngineSettings(connect_timeout=60), operation_timeout=0.5
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(
            sr.StorageError, match=r"get_latest for user \.\.\. timed out after 0.5 s"
        ):
            await repo.get_latest("u1")
        assert loop.time() - started < 1.5
        started = loop.time()
        await repo.close()
        assert loop.time() - started < 6


async def test_the_callers_own_timeout_and_cancellation_pass_through_unchanged():
    """Only the repository's deadline becomes a StorageError; a caller's stays the caller's."""
    async with (
        stalled_server() as url,
        sr.SnapshotRepository.from_url(
            url, settings=sr.EngineSettings(connect_timeout=60), operation_timeout=30
        ) as repo,
    ):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await repo.get_latest("u1")
        call = asyncio.create_task(repo.get_latest("u1"))
        await asyncio.sleep(0.1)  # mid-call (any moment must end in CancelledError)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert asyncio.current_task().cancelling() == 0  # nothing leaked into this task


def test_timeouts_must_be_positive():
    for bad in (0, -1, "1", True):
        with pytest.raises(sr.ConfigurationError):
            sr.SnapshotRepository.from_url("sqlite:///x.db", operation_timeout=bad)
        with pytest.raises(sr.ConfigurationError):
            sr.SnapshotRepository.from_url("sqlite:///x.db", health_timeout=bad)


async def kill_the_next_connection(repo: sr.SnapshotRepository[Cart], url: str) -> None:
    """Terminate, on the server, the pooled connection the repository's next call borrows."""
    # Hand the repository's kept connection back, so that the pool's only
    # connection, the one killed below, is the one its next call borrows.
    await repo._backend.release()
    async with repo.engine.connect() as conn:
        pid = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar()
    admin = await asyncpg.connect(plain_dsn(url))
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid) is True
    finally:
        await admin.close()


async def test_read_retries_once_on_a_connection_killed_under_the_pool(postgres_url: str):
    """Postgres by nature: a server process killed under a pooled connection."""
    async with sr.SnapshotRepository.from_url(postgres_url, Cart) as repo:
        await repo.upsert_latest(snap("u1", "a"))
        await kill_the_next_connection(repo, postgres_url)
        for _ in range(20):  # the dead connection is replaced, never handed out again
            latest = await repo.get_latest("u1")
            assert latest is not None
            assert latest.version == 1
        assert (await repo.upsert_latest(snap("u1", "b"))).version == 2


async def test_upgrade_from_the_first_revision_keeps_rows(backend: Backend):
    engine = sr.create_engine(backend.fresh_url())
    try:
        await migrate.upgrade(engine, "0001")
        async with engine.begin() as conn:
            # `{"items":[]}`, and now (MariaDB's DATETIME(6) holds naive UTC).
            payload, now = {
                "sqlite": ("X'7b226974656d73223a5b5d7d'", "CURRENT_TIMESTAMP"),
                "postgres": ("'\\x7b226974656d73223a5b5d7d'::bytea", "CURRENT_TIMESTAMP"),
                "mariadb": ("X'7b226974656d73223a5b5d7d'", "UTC_TIMESTAMP(6)"),
            }[backend.name]
            for version in (1, 2):
                await conn.exec_driver_sql(
                    "INSERT INTO snapshot_history (user_id, version, schema_version, payload, "
                    f"created_at) VALUES ('old', {version}, 1, {payload}, {now})"
                )
            await conn.exec_driver_sql(
                "INSERT INTO snapshot_latest SELECT * FROM snapshot_history WHERE version = 2"
            )
        async with sr.SnapshotRepository(engine, Cart) as repo:
            await repo.migrate()
            assert await repo.health_check() is True
            history = await repo.get_history("old")
            assert [(s.version, s.state, s.idempotency_key) for s in history] == [
                (2, Cart(), None),
                (1, Cart(), None),
            ]
            assert (await repo.upsert_latest(snap("old", "new"), idempotency_key="k")).version == 3
    finally:
        await engine.dispose()


async def test_a_write_on_a_killed_connection_is_connection_lost_then_recovers(
    postgres_url: str,
):
    """Postgres by nature. Writes are not repeated on their own: the caller decides."""
    async with sr.SnapshotRepository.from_url(postgres_url, Cart) as repo:
        await repo.upsert_latest(snap("u1", "a"))
        await kill_the_next_connection(repo, postgres_url)
        with pytest.raises(sr.ConnectionLostError, match="idempotency key") as caught:
            await repo.upsert_latest(snap("u1", "b"), idempotency_key="retry-me")
        assert isinstance(caught.value, sr.StorageError)
        retried = await repo.upsert_latest(snap("u1", "b"), idempotency_key="retry-me")
        assert retried.version == 2
        assert (await repo.upsert_latest(snap("u1", "b"), idempotency_key="retry-me")) == retried


# The turns are the fast backends' own (`backends._pool`); the MySQL backend borrows from
# SQLAlchemy's pool, which promises no order among waiters (see the README, Configuration).
@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_calls_take_connections_in_turn_when_more_run_than_the_pool_holds(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
):
    """First come, first served: no call is given a third turn before every call had a first.

    With no patience (strict turns); the default lets a caller go ahead of
    waiters for up to 2 ms, which `tests/test_turns.py` checks on its own.
    The order checked is the order connections are *handed* to the readers,
    not the order calls finish: a call whose answer the server delays (a busy
    machine deschedules its backend process) lets the others finish turn after
    turn on the other connection, fairly.
    """
    monkeypatch.setattr(_pool, "_TURN_PATIENCE", 0.0)
    admitted: list[int] = []
    enter = _pool._Checkout.__aenter__

    async def recording_enter(checkout: Any) -> Any:
        connection = await enter(checkout)
        task = asyncio.current_task()
        if task is not None and task.get_name().startswith("reader-"):
            admitted.append(int(task.get_name().removeprefix("reader-")))
        return connection

    monkeypatch.setattr(_pool._Checkout, "__aenter__", recording_enter)
    # SQLite reads hop, to hold their connection across a suspension (see the next test).
    settings = sr.EngineSettings(pool_size=2, max_overflow=0, sqlite_inline_reads=False)
    async with sr.SnapshotRepository.from_url(backend.url, Cart, settings=settings) as repo:
        for user in range(5):
            await repo.upsert_latest(snap(f"u{user}", "a"))
        # Open both connections first: a connection being opened is slow, not unfair.
        await asyncio.gather(repo.get_latest("u0"), repo.get_latest("u1"))

        async def reader(user: int) -> None:
            for _turn in range(6):
                await repo.get_latest(f"u{user}")

        await asyncio.gather(
            *(asyncio.create_task(reader(user), name=f"reader-{user}") for user in range(5))
        )
        assert sorted(admitted) == sorted(list(range(5)) * 6)
        turns: list[tuple[int, int]] = []
        for user in admitted:
            turns.append((user, sum(1 for u, _ in turns if u == user)))
        first_of_each = max(turns.index((user, 0)) for user in range(5))
        third_of_any = min(turns.index((user, 2)) for user in range(5))
        assert first_of_each < third_of_any, turns


async def test_a_call_waiting_for_this_repositorys_connections_times_out_naming_the_limit(
    backend: Backend,
):
    settings = sr.EngineSettings(pool_size=1, max_overflow=0, pool_timeout=0.3)
    async with sr.SnapshotRepository.from_url(backend.url, Cart, settings=settings) as repo:
        await repo.upsert_latest(snap("u1", "a"))
        loop = asyncio.get_running_loop()
        backend_ = repo._backend
        connections = (
            backend_._driver.connections if backend.name == "mariadb" else backend_._connections
        )
        async with connections.checkout():
            started = loop.time()
            with pytest.raises(sr.StorageError, match=r"limit of size 1 overflow 0"):
                await repo.get_latest("u1")
            assert 0.25 < loop.time() - started < 1.0
        assert await repo.get_latest("u1") is not None  # the turn passed on; calls work again


async def test_an_exhausted_pool_fails_after_its_timeout_naming_the_limit(backend: Backend):
    settings = sr.EngineSettings(pool_size=1, max_overflow=0, pool_timeout=0.5)
    async with sr.SnapshotRepository.from_url(backend.url, Cart, settings=settings) as repo:
        await repo.upsert_latest(snap("u1", "a"))
        await repo._backend.release()  # the pool's only connection goes back, then is held below
        async with repo.engine.connect() as held:
            await held.exec_driver_sql("SELECT 1")
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(sr.StorageError, match=r"limit of size 1 overflow 0"):
                await repo.get_latest("u1")
            assert 0.4 < loop.time() - started < 2.0
        latest = await repo.get_latest("u1")  # the connection is back: calls succeed again
        assert latest is not None


@pytest.mark.parametrize("pool_size", [1, 2])
async def test_connections_kept_between_calls_leave_the_engine_one(
    backend: Backend, pool_size: int
):
    """An idle repository never holds a small pool's last connection (migrate needs one)."""
    settings = sr.EngineSettings(pool_size=pool_size, max_overflow=0, pool_timeout=0.5)
    async with sr.SnapshotRepository.from_url(backend.url, Cart, settings=settings) as repo:
        await repo.upsert_latest(snap("u1", "a"))
        await asyncio.gather(*(repo.get_latest("u1") for _ in range(4)))  # all connections open
        kept = pool_size - 1
        assert repo._backend.kept_connections == kept
        assert queue_pool(repo.engine).checkedout() == kept
        await repo.migrate()  # at head already: only needs a connection
        async with repo.engine.connect() as conn:
            assert (await conn.exec_driver_sql("SELECT 1")).scalar_one() == 1


async def test_concurrent_calls_pass_connections_on_and_return_the_extra_ones_after(
    backend: Backend,
):
    """Under concurrency calls reuse the repository's connections instead of going
    through SQLAlchemy's pool each time; once the burst ends only two stay kept.

    SQLite reads hop here (`sqlite_inline_reads=False`): inline ones never hold a
    connection across a suspension, and SQLite writes queue before they take one,
    so only hopping reads make SQLite calls overlap on connections.
    """
    settings = sr.EngineSettings(pool_size=10, max_overflow=0, sqlite_inline_reads=False)
    async with sr.SnapshotRepository.from_url(backend.url, Cart, settings=settings) as repo:
        checkouts = 0

        def count_checkout(*_args: object) -> None:
            nonlocal checkouts
            checkouts += 1

        event.listen(repo.engine.sync_engine.pool, "checkout", count_checkout)

        async def worker(number: int) -> None:
            for n in range(10):
                await repo.upsert_latest(snap(f"w{number}", str(n)))
                assert await repo.get_latest(f"w{number}") is not None

        await asyncio.gather(*(worker(number) for number in range(16)))
        assert checkouts <= 20, f"{checkouts} pool checkouts for 320 calls"  # was 52
        assert repo._backend.kept_connections == KEPT_CONNECTIONS
        assert queue_pool(repo.engine).checkedout() == KEPT_CONNECTIONS
        assert [s.version for s in await repo.get_history("w3", limit=10)] == list(range(10, 0, -1))
