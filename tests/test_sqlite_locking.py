"""SQLite: calls bounded by their own deadline while another connection holds the file.

Another process's connection is stood in for by a plain `sqlite3` connection
on the same file: SQLite's locks are per connection, so it blocks the
library exactly as another process would.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

import snapshot_repo as sr
from snapshot_repo.backends import sqlite_commit
from tests.support.conformance import files_hold
from tests.support.databases import Cart


def database(tmp_path: Path, sqlite_template: Path) -> Path:
    path = tmp_path / "locked.db"
    path.write_bytes(sqlite_template.read_bytes())
    return path


def url_of(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@contextmanager
def other_connection(path: Path, begin: str) -> Iterator[sqlite3.Connection]:
    """Another connection on the file with a transaction open (`begin`) until the block ends."""
    with closing(sqlite3.connect(path, isolation_level=None, timeout=0)) as conn:
        conn.execute(begin)
        conn.execute("SELECT count(*) FROM snapshot_history").fetchone()  # take a read mark
        try:
            yield conn
        finally:
            conn.execute("ROLLBACK")


def snap(user_id: str, note: str) -> sr.Snapshot[Cart]:
    return sr.Snapshot(user_id=user_id, state=Cart(note=note))


async def stored_notes(path: Path, user_id: str) -> list[str]:
    """Every stored version of the user, read by a repository of its own."""
    async with sr.SnapshotRepository.from_url(url_of(path), Cart) as repo:
        return [s.state.note for s in await repo.get_history(user_id)]


# --- writes ---------------------------------------------------------------------------


async def test_a_write_waiting_for_another_writer_fails_in_its_deadline_and_never_commits(
    tmp_path, sqlite_template
):
    """The busy wait is cut to the call's time left; the write does not commit afterwards.

    Before, the write waited the whole busy timeout (10 s) past its 1 s deadline,
    and committed as soon as the other writer let go.
    """
    path = database(tmp_path, sqlite_template)
    repo = sr.SnapshotRepository.from_url(url_of(path), Cart, operation_timeout=1)
    loop = asyncio.get_running_loop()
    with other_connection(path, "BEGIN IMMEDIATE"):
        started = loop.time()
        with pytest.raises(sr.StorageError):
            await repo.upsert_latest(snap("u1", "late"))
        waited = loop.time() - started
    await repo.close()  # waits for every connection, so for anything still running on one
    assert waited < 3  # its 1 s deadline, the watchdog's eighth, and slack; not 10 s
    assert await stored_notes(path, "u1") == []


async def test_a_write_whose_deadline_passes_before_commit_rolls_back(tmp_path, sqlite_template):
    """Cancelled while its statements still run on the connection's thread: never committed.

    A trigger makes the history insert take seconds of CPU, so the 0.3 s
    deadline always passes before the write reaches COMMIT.
    """
    path = database(tmp_path, sqlite_template)
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("CREATE TABLE slow (n INTEGER)")
        conn.execute(
            "INSERT INTO slow WITH RECURSIVE c(n) AS "
            "(SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 4000) SELECT n FROM c"
        )
        conn.execute(
            "CREATE TRIGGER slow_history AFTER INSERT ON snapshot_history "
            "BEGIN SELECT count(*) FROM slow a, slow b WHERE a.n + b.n = -1; END"
        )
    repo = sr.SnapshotRepository.from_url(url_of(path), Cart, operation_timeout=0.3)
    with pytest.raises(sr.StorageError, match=r"timed out after 0\.3 s"):
        await repo.upsert_latest(snap("u1", "cancelled"))
    await repo.close()  # the statements run on; close waits for them and the rollback
    assert await stored_notes(path, "u1") == []


# --- erasure while another connection reads -------------------------------------------


async def test_an_erasure_never_waits_for_a_reader_and_reports_the_truncation_pending(
    tmp_path, sqlite_template
):
    """A reader holding an old snapshot delays only the WAL truncation, never a write.

    Before, the erasure's checkpoint waited on the reader (three busy timeouts),
    holding the write lock, so the erasure and every other user's write timed out.
    """
    path = database(tmp_path, sqlite_template)
    marker = f"MARKER-{uuid.uuid4().hex}"
    settings = sr.EngineSettings(busy_timeout=3)
    url = url_of(path)
    async with sr.SnapshotRepository.from_url(
        url, Cart, settings=settings, operation_timeout=2
    ) as repo:
        await repo.upsert_latest(snap("victim", marker))
        await repo.upsert_latest(snap("bystander", "before"))
        with other_connection(path, "BEGIN"):
            erased, written = await asyncio.gather(
                repo.delete("victim"), repo.upsert_latest(snap("bystander", "during"))
            )
            assert (erased, written.version) == (1, 2)
            assert await repo.get_latest("victim") is None
            assert files_hold(path, marker)  # the reader still may see it: truncation pending
            assert await repo.finish_erasures(wait=0.2) is False
            assert await repo.upsert_latest(snap("bystander", "after")) is not None
        assert await repo.finish_erasures() is True
        assert not files_hold(path, marker)
        assert await repo.finish_erasures(wait=0.1) is True  # nothing left to do


async def test_close_completes_a_truncation_a_reader_held_up(tmp_path, sqlite_template):
    path = database(tmp_path, sqlite_template)
    marker = f"MARKER-{uuid.uuid4().hex}"
    repo = sr.SnapshotRepository.from_url(url_of(path), Cart)
    await repo.upsert_latest(snap("victim", marker))
    with other_connection(path, "BEGIN"):
        assert await repo.delete("victim") == 1
        assert files_hold(path, marker)
    # Keep a connection open elsewhere, so SQLite's own checkpoint on the last close
    # cannot be what removes the bytes.
    with closing(sqlite3.connect(path, isolation_level=None)) as keeper:
        keeper.execute("SELECT 1 FROM snapshot_latest").fetchall()
        await repo.close()
        assert not files_hold(path, marker)


async def test_a_later_erasure_completes_an_earlier_pending_truncation(tmp_path, sqlite_template):
    path = database(tmp_path, sqlite_template)
    marker = f"MARKER-{uuid.uuid4().hex}"
    async with sr.SnapshotRepository.from_url(url_of(path), Cart) as repo:
        await repo.upsert_latest(snap("first", marker))
        await repo.upsert_latest(snap("second", "x"))
        with other_connection(path, "BEGIN"):
            assert await repo.delete("first") == 1
        assert files_hold(path, marker)
        assert await repo.delete("nobody") == 0  # erases nothing, still truncates
        assert not files_hold(path, marker)
        assert await repo.finish_erasures(wait=0.1) is True


async def test_finish_erasures_has_nothing_to_do_on_postgres(postgres_url):
    async with sr.SnapshotRepository.from_url(postgres_url, Cart) as repo:
        await repo.upsert_latest(snap("u1", "x"))
        assert await repo.delete("u1") == 1
        assert await repo.finish_erasures(wait=0.1) is True


async def test_finish_erasures_refuses_a_bad_timeout(tmp_path, sqlite_template):
    async with sr.SnapshotRepository.from_url(
        url_of(database(tmp_path, sqlite_template)), Cart
    ) as repo:
        for bad in (0, -1, float("nan"), "1"):
            with pytest.raises(sr.ConfigurationError, match="wait"):
                await repo.finish_erasures(wait=bad)  # type: ignore[arg-type]


# --- reads and health while another process holds the file ----------------------------


async def test_reads_and_health_return_within_their_timeout_while_the_file_is_held(
    tmp_path, sqlite_template
):
    """A process holding the file exclusively (crash recovery, locking_mode=EXCLUSIVE).

    Opening a connection then waits on SQLite's busy handler, on the connection's
    thread, where the loop cannot cancel it: before, a read and the health probe
    both waited the whole busy timeout (5 s here) past their own deadline.
    """
    path = database(tmp_path, sqlite_template)
    async with sr.SnapshotRepository.from_url(url_of(path), Cart) as writer:
        await writer.upsert_latest(snap("u1", "stored"))
    settings = sr.EngineSettings(busy_timeout=5)
    loop = asyncio.get_running_loop()
    async with sr.SnapshotRepository.from_url(
        url_of(path), Cart, settings=settings, operation_timeout=0.5, health_timeout=0.5
    ) as repo:
        with closing(sqlite3.connect(path, isolation_level=None, timeout=5)) as holder:
            holder.execute("PRAGMA locking_mode = EXCLUSIVE")
            holder.execute("BEGIN EXCLUSIVE")
            started = loop.time()
            with pytest.raises(sr.StorageError):
                await repo.get_latest("u1")
            read_took = loop.time() - started
            started = loop.time()
            report = await repo.health()
            health_took = loop.time() - started
        assert not report.healthy
        assert read_took < 2.5  # 0.5 s and slack, not 5 s
        assert health_took < 2.5
        latest = await repo.get_latest("u1")  # the holder is gone: reads work again
        assert latest is not None
        assert latest.state.note == "stored"


async def test_a_truncation_erase_user_left_pending_is_finished_by_the_engines_repository(
    tmp_path, sqlite_template
):
    """erase_user's per-namespace backends are gone when it returns; the engine remembers."""
    path = database(tmp_path, sqlite_template)
    marker = f"MARKER-{uuid.uuid4().hex}"
    async with sr.SnapshotRepository.from_url(url_of(path), Cart) as repo:
        async with sr.SnapshotRepository.from_url(url_of(path), Cart, namespace="other") as other:
            await other.upsert_latest(snap("victim", marker))
        await repo.upsert_latest(snap("victim", marker + "-2"))
        with other_connection(path, "BEGIN"):
            assert await sr.erase_user(repo.engine, "victim") == 2
        assert files_hold(path, marker)
        assert await repo.finish_erasures(wait=1) is True
        assert not files_hold(path, marker)


async def test_a_write_whose_deadline_passes_during_commit_is_reported_as_written(
    tmp_path, sqlite_template, monkeypatch
):
    """Too late to roll back: the call waits for the COMMIT and returns what it stored.

    A slow COMMIT (an fsync on a busy disk) is stood in for by a pause right
    after the write is marked as committing. Before, the caller got "timed
    out" for a write that was stored, and a retry without an idempotency key
    wrote it twice.
    """
    real_begin = sqlite_commit.Commit.begin

    def slow_begin(self: sqlite_commit.Commit) -> None:
        real_begin(self)
        time.sleep(0.6)  # on the connection's thread, after the point of no return

    path = database(tmp_path, sqlite_template)
    async with sr.SnapshotRepository.from_url(url_of(path), Cart, operation_timeout=0.2) as repo:
        monkeypatch.setattr(sqlite_commit.Commit, "begin", slow_begin)
        stored = await repo.upsert_latest(snap("u1", "committed"))
        monkeypatch.setattr(sqlite_commit.Commit, "begin", real_begin)
        assert stored.version == 1
    assert await stored_notes(path, "u1") == ["committed"]


async def test_erasing_a_key_left_without_rows_leaves_no_trace_in_the_files(
    tmp_path, sqlite_template
):
    path = database(tmp_path, sqlite_template)
    user = f"orphan-{uuid.uuid4().hex}"
    provider = sr.LocalKeyProvider({"k1": bytes(32)}, active="k1")
    async with sr.SnapshotRepository.from_url(url_of(path), Cart, encryption=provider) as repo:
        with closing(sqlite3.connect(path, isolation_level=None)) as conn:
            conn.execute(
                "INSERT INTO snapshot_data_keys (tenant, namespace, user_id, key_id, "
                "wrapped_key, created_at) VALUES ('', 'default', ?, 'k1', ?, '2026-01-01')",
                (user, b"wrapped-key-bytes"),
            )
        assert files_hold(path, user)
        assert await repo.delete(user) == 0
        assert not files_hold(path, user)
        assert await repo.finish_erasures(wait=0.1) is True


def test_an_older_truncations_success_does_not_clear_a_newer_failure():
    """Truncations run on several connections' threads and may finish out of order."""
    truncation = sqlite_commit.PendingTruncation()
    older, newer = truncation.begin(), truncation.begin()
    truncation.note(False, newer)  # a reader arrived before the newer one ran
    truncation.note(True, older)  # the older one, begun before that reader, finishes last
    assert truncation.pending
    truncation.note(True, truncation.begin())
    assert not truncation.pending
