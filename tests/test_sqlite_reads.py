"""SQLite reads run on the event loop's thread; writes hop to the connection's thread.

About SQLite by nature: Postgres has no thread hop to skip. Each test records
which thread ran each statement, with a trace callback that SQLite calls on
the thread executing it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import await_only

import snapshot_repo as sr
from tests.support.databases import Cart, sqlite_backend

Trace = list[tuple[int, str]]


def trace_statements(engine: AsyncEngine) -> Trace:
    """(thread id, statement) for every statement the engine's new connections run."""
    trace: Trace = []

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        aconn = dbapi_connection._connection  # SQLAlchemy's adapter wraps aiosqlite's

        def install() -> None:
            aconn._conn.set_trace_callback(
                lambda sql: trace.append((threading.get_ident(), " ".join(sql.split())))
            )

        # On the connection's own thread: a connection bound to its thread allows no other.
        await_only(aconn._execute(install))

    return trace


def threads_of(trace: Trace, matches: Callable[[str], bool]) -> set[int]:
    found = {thread for thread, sql in trace if matches(sql)}
    assert found, f"no such statement ran: {[sql for _, sql in trace]}"
    return found


def is_read(sql: str) -> bool:
    return sql.startswith("SELECT") and "snapshot_" in sql


def is_write(sql: str) -> bool:
    return sql.startswith(("INSERT", "UPDATE", "DELETE"))


async def read_everything(repo: sr.SnapshotRepository[Cart]) -> None:
    """Every kind of read, each checked against what was written."""
    assert (await repo.get_latest("ada")).state == Cart(items=["tea", "milk"])
    assert [s.version for s in await repo.get_history("ada")] == [2, 1]
    many = await repo.get_latest_many(["ada", "bob", "nobody"])
    assert sorted(many) == ["ada", "bob"]
    page = await repo.changes_since()
    assert [(c.user_id, c.version) for c in page.changes] == [("ada", 1), ("ada", 2), ("bob", 1)]
    assert await repo.get_latest("nobody") is None


async def write_some(repo: sr.SnapshotRepository[Cart]) -> None:
    await repo.upsert_latest(sr.Snapshot(user_id="ada", state=Cart(items=["tea"])))
    await repo.upsert_latest(sr.Snapshot(user_id="ada", state=Cart(items=["tea", "milk"])))
    await repo.upsert_many([sr.Snapshot(user_id="bob", state=Cart())])


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "hop"])
async def test_reads_run_on_the_loop_thread_unless_turned_off(
    tmp_path: Path, sqlite_template: Path, inline: bool
):
    backend = sqlite_backend(tmp_path, sqlite_template)
    settings = sr.EngineSettings(sqlite_inline_reads=inline)
    async with sr.SnapshotRepository.from_url(backend.url, Cart, settings=settings) as repo:
        trace = trace_statements(repo.engine)
        await write_some(repo)
        await read_everything(repo)
    loop_thread = threading.get_ident()
    assert loop_thread not in threads_of(trace, is_write)  # a commit waits for the disk
    read_threads = threads_of(trace, is_read)
    if inline:
        assert read_threads == {loop_thread}
    else:
        assert loop_thread not in read_threads


async def test_reads_hop_on_connections_bound_to_their_thread(
    tmp_path: Path, sqlite_template: Path
):
    """An application's engine may open connections with `check_same_thread=True`:
    reading them from the loop's thread raises, and the reads hop instead."""
    backend = sqlite_backend(tmp_path, sqlite_template)
    engine = create_async_engine(backend.url, connect_args={"check_same_thread": True})
    trace = trace_statements(engine)
    try:
        async with sr.SnapshotRepository(engine, Cart) as repo:
            await write_some(repo)
            await read_everything(repo)
            await read_everything(repo)  # after falling back, straight to the hop
    finally:
        await engine.dispose()
    assert threading.get_ident() not in threads_of(trace, is_read)


async def test_inline_reads_see_what_another_engine_committed(
    tmp_path: Path, sqlite_template: Path
):
    """Each inline read is its own read transaction: it sees every commit made before it."""
    backend = sqlite_backend(tmp_path, sqlite_template)
    async with (
        sr.SnapshotRepository.from_url(backend.url, Cart) as reader,
        sr.SnapshotRepository.from_url(backend.url, Cart) as writer,
    ):
        for version in range(1, 4):
            await writer.upsert_latest(sr.Snapshot(user_id="ada", state=Cart(note=str(version))))
            latest = await reader.get_latest("ada")
            assert latest is not None
            assert (latest.version, latest.state.note) == (version, str(version))
            assert len(await reader.get_history("ada")) == version


async def test_count_users_runs_off_the_loop_thread(tmp_path: Path, sqlite_template: Path):
    """`count_users` reads the kept count but also counts the expired users not yet
    reaped, a backlog with no bound until `reap_expired` runs: inline it could freeze
    every other task of the loop for that long, so it hops even with inline reads on."""
    backend = sqlite_backend(tmp_path, sqlite_template)
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as repo:
        trace = trace_statements(repo.engine)
        await write_some(repo)
        assert await repo.count_users() == 2
        await read_everything(repo)
    loop_thread = threading.get_ident()
    counted = threads_of(trace, lambda sql: "snapshot_user_counts" in sql)
    assert counted
    assert loop_thread not in counted
    others = threads_of(trace, lambda sql: is_read(sql) and "snapshot_user_counts" not in sql)
    assert others == {loop_thread}
