"""MariaDB by nature: what the MySQL backend does differently, on the shared MariaDB server.

The whole contract runs on MariaDB in the conformance suite and in every
test taking the `backend` fixture; these are the behaviours that exist only
because MySQL differs: the feed gate (no `pg_snapshot_xmin`), InnoDB's
deadlock victims, the binary NO PAD collation, LONGBLOB and DATETIME(6),
`GET_LOCK` around migrations, and lost connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.engine import make_url

import snapshot_repo as sr
from snapshot_repo import migrate
from snapshot_repo.backends import mysql_driver
from snapshot_repo.backends.mysql import MysqlBackend
from snapshot_repo.backends.mysql_driver import MysqlDriver
from snapshot_repo.backends.mysql_packets import chunks
from snapshot_repo.backends.mysql_session import autocommit
from snapshot_repo.engine import create_engine
from tests.support.databases import Cart, MariadbServer, mariadb_admin, mariadb_connect

LOCK_WAIT_DEADLINE = 10.0
"""Seconds a test waits for a session to be seen waiting on a lock (it takes milliseconds)."""


def snap(user_id: str, *items: str) -> sr.Snapshot[Cart]:
    return sr.Snapshot(user_id=user_id, state=Cart(items=list(items)))


@asynccontextmanager
async def raw_session(url: str) -> AsyncIterator[Any]:
    """A raw asyncmy connection to the test's database, outside the library (autocommit off)."""
    conn = await mariadb_connect(url, autocommit=False)
    try:
        async with conn.cursor() as cursor:  # as the library's sessions: no gap locks
            await cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        yield conn
    finally:
        conn.close()


async def _poll_count(url: str, query: str, pattern: str, interval: float, what: str) -> None:
    """Run `query` (a count, taking the test's database and `pattern`) every `interval`
    seconds until it counts a session, failing after `LOCK_WAIT_DEADLINE`."""
    database = make_url(url).database
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LOCK_WAIT_DEADLINE
    async with raw_session(url) as conn:
        while True:
            async with conn.cursor() as cursor:
                await cursor.execute(query, (database, pattern))
                (found,) = await cursor.fetchone()
            if found:
                return
            assert loop.time() < deadline, f"no session {what} {pattern!r}"
            await asyncio.sleep(interval)


async def wait_for_statement(url: str, pattern: str) -> None:
    """Poll until a session of the test's database is running a statement LIKE `pattern`,
    as text or prepared (one that waits for a row lock stays there until it is granted)."""
    await _poll_count(
        url,
        "SELECT count(*) FROM information_schema.processlist "
        "WHERE db = %s AND command IN ('Query', 'Execute') AND info LIKE %s",
        pattern,
        0.01,
        "ran",
    )


async def wait_for_lock_wait(url: str, pattern: str) -> None:
    """Poll until a session of the test's database running a statement LIKE `pattern` is
    waiting for a row lock: it has taken every lock before the one it waits for (a
    statement merely listed as running may not have locked anything yet). InnoDB
    answers `innodb_trx` from a cache it refreshes at most every 100 ms; polled every
    10 ms it was seen to answer stale rows for the whole 10 s, so this polls every 150 ms
    (and sees a wait a little late, never early)."""
    await _poll_count(
        url,
        "SELECT count(*) FROM information_schema.innodb_trx AS t "
        "JOIN information_schema.processlist AS p ON p.id = t.trx_mysql_thread_id "
        "WHERE p.db = %s AND t.trx_state = 'LOCK WAIT' AND p.info LIKE %s",
        pattern,
        0.15,
        "waited for a lock in",
    )


async def test_the_mariadb_backend_is_chosen_for_both_url_schemes(mariadb_url: str):
    for scheme in ("mariadb", "mysql"):
        url = make_url(mariadb_url).set(drivername=scheme).render_as_string(hide_password=False)
        async with sr.SnapshotRepository.from_url(url, Cart) as repo:
            assert isinstance(repo._backend, MysqlBackend)
            assert repo.engine.driver == "asyncmy"
            stored = await repo.upsert_latest(snap(f"via-{scheme}", "x"))
            assert stored.version == 1


async def test_a_feed_page_never_skips_a_write_that_commits_late(mariadb_url: str):
    """A write takes its feed seq, then waits (on a lock held outside) before it commits;
    a second write commits meanwhile with a higher seq. A page read then must not return
    the second without the first: that would move the cursor past the first for good.

    The first write is held by its retention policy, which deletes the user's older
    history after the feed entry is written: an outside transaction holds that row.
    """
    keep_one = sr.RetentionPolicy(keep_last=1)
    async with (
        sr.SnapshotRepository.from_url(mariadb_url, Cart) as repo,
        sr.SnapshotRepository.from_url(mariadb_url, Cart, retention=keep_one) as pruning,
    ):
        await repo.upsert_latest(snap("slow", "v1"))
        start = (await repo.changes_since(None)).cursor
        async with raw_session(mariadb_url) as outside:
            async with outside.cursor() as cursor:
                await cursor.execute(
                    "SELECT version FROM snapshot_history WHERE user_id = 'slow' FOR UPDATE"
                )
            slow = asyncio.create_task(pruning.upsert_latest(snap("slow", "v2")))
            await wait_for_statement(mariadb_url, "DELETE FROM snapshot_history%")
            fast = await repo.upsert_latest(snap("fast", "v1"))
            assert fast.version == 1
            page_read = asyncio.create_task(repo.changes_since(start))
            # The reader waits for the gate, which the slow write holds.
            gate_wait = asyncio.create_task(
                wait_for_statement(mariadb_url, "%FROM snapshot_feed_gate%FOR UPDATE")
            )
            await asyncio.wait({page_read, gate_wait}, return_when=asyncio.FIRST_COMPLETED)
            assert not page_read.done(), f"read before the slow write committed: {page_read}"
            await gate_wait
            await outside.rollback()
        await slow
        page = await page_read
    assert [(c.user_id, c.version) for c in page.changes] == [("slow", 2), ("fast", 1)]


@pytest.mark.parametrize("call", ["write", "batch", "erase"])
async def test_writers_take_the_feed_gate_before_their_feed_entry_takes_a_seq(
    mariadb_url: str, call: str
):
    """A feed reader holds the gate's exclusive lock: a write, a batch and an erasure
    (each on the driver path, where the gate's lock shares a statement with other
    work) wait for it before any feed entry exists; once it commits, they finish."""
    async with sr.SnapshotRepository.from_url(mariadb_url, Cart) as repo:
        await repo.upsert_latest(snap("gone", "x"))
        start = (await repo.changes_since(None)).cursor
        async with raw_session(mariadb_url) as reader:
            async with reader.cursor() as cursor:
                await cursor.execute("SELECT id FROM snapshot_feed_gate WHERE id = 1 FOR UPDATE")
                await cursor.execute("SELECT COALESCE(MAX(seq), 0) FROM snapshot_changes")
                (last_seq,) = await cursor.fetchone()
            work = {
                "write": lambda: repo.upsert_latest(snap("w", "1")),
                "batch": lambda: repo.upsert_many([snap("b1", "1"), snap("b2", "1")]),
                "erase": lambda: repo.delete("gone"),
            }[call]
            task = asyncio.create_task(work())
            await wait_for_lock_wait(mariadb_url, "INSERT INTO snapshot_%")
            async with raw_session(mariadb_url) as probe, probe.cursor() as cursor:
                # Uncommitted rows too: an entry the waiting call inserted would count.
                await cursor.execute("SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED")
                await cursor.execute(
                    "SELECT COUNT(*) FROM snapshot_changes WHERE seq > %s", (last_seq,)
                )
                (entries,) = await cursor.fetchone()
            assert entries == 0
            assert not task.done()
            await reader.commit()
        await task
        page = await repo.changes_since(start)
    expected = {"write": [("w", 1)], "batch": [("b1", 1), ("b2", 1)], "erase": [("", 1)]}
    assert [(c.user_id, c.version) for c in page.changes] == expected[call]


@pytest.mark.parametrize("call", ["write", "batch", "erase"])
async def test_without_the_feed_gate_row_nothing_is_written(mariadb_url: str, call: str):
    """The driver path's gated statements join the gate row: without it they would copy
    nothing (a batch committed without history, an erasure without its feed entry).
    Each refuses with a `StorageError` naming the fix, and rolls back whole."""
    async with sr.SnapshotRepository.from_url(mariadb_url, Cart) as repo:
        await repo.upsert_latest(snap("gone", "x"))
        await mariadb_admin(mariadb_url, "DELETE FROM snapshot_feed_gate")
        try:
            work = {
                "write": lambda: repo.upsert_latest(snap("gone", "y")),
                "batch": lambda: repo.upsert_many([snap("b1", "1"), snap("b2", "1")]),
                "erase": lambda: repo.delete("gone"),
            }[call]
            with pytest.raises(sr.StorageError, match="feed gate row"):
                await work()
        finally:
            await mariadb_admin(mariadb_url, "INSERT INTO snapshot_feed_gate (id) VALUES (1)")
        assert [s.version for s in await repo.get_history("gone")] == [1]
        assert await repo.get_latest_many(["b1", "b2"]) == {}


async def test_a_deadlock_victim_is_retried_inside_the_library(
    mariadb_url: str, caplog: pytest.LogCaptureFixture
):
    """A batch locks a, then waits for b, which an outside transaction holds; the
    outside one then asks for a. InnoDB rolls back the lighter transaction, the batch
    (the outside one has changed many rows first), and the library runs it again."""
    caplog.set_level(logging.INFO, logger="snapshot_repo")
    async with sr.SnapshotRepository.from_url(mariadb_url, Cart) as repo:
        await repo.upsert_many([snap("a", "0"), snap("b", "0")])
        await mariadb_admin(mariadb_url, "CREATE TABLE IF NOT EXISTS ballast (n INT)")
        try:
            async with raw_session(mariadb_url) as outside:
                async with outside.cursor() as cursor:
                    await cursor.execute(
                        # 500 changed rows: the heavier transaction, never the victim
                        "INSERT INTO ballast SELECT seq FROM seq_1_to_500"
                    )
                    await cursor.execute(
                        "SELECT version FROM snapshot_latest WHERE user_id = 'b' FOR UPDATE"
                    )
                batch = asyncio.create_task(repo.upsert_many([snap("a", "1"), snap("b", "1")]))
                # Not merely running: waiting for b, so it has locked a.
                await wait_for_lock_wait(mariadb_url, "INSERT INTO snapshot_latest%")
                async with outside.cursor() as cursor:
                    await cursor.execute(
                        "SELECT version FROM snapshot_latest WHERE user_id = 'a' FOR UPDATE"
                    )
                await outside.commit()
            written = await batch
        finally:
            await mariadb_admin(mariadb_url, "DROP TABLE IF EXISTS ballast")
        assert [s.version for s in written] == [2, 2]
        assert [s.version for s in await repo.get_history("a")] == [2, 1]
    retried = [r.getMessage() for r in caplog.records if "rolled back" in r.getMessage()]
    assert len(retried) == 1, retried
    assert "1213" in retried[0]


async def test_user_ids_compare_byte_for_byte(mariadb_url: str):
    """Case, accents and trailing spaces make different users, as on SQLite and Postgres
    (MariaDB's utf8mb4_bin would take "a" and "a " for one: the tables are NO PAD)."""
    ids = ["ann", "Ann", "a", "a ", "e", "é", "ß", "ss"]
    async with sr.SnapshotRepository.from_url(mariadb_url, Cart) as repo:
        for user_id in ids:
            await repo.upsert_latest(snap(user_id, user_id))
        for user_id in ids:
            latest = await repo.get_latest(user_id)
            assert latest is not None
            assert (latest.version, latest.state.items) == (1, [user_id])
        assert await repo.count_users() == len(ids)
        assert await repo.list_users() == sorted(ids)  # code point order, as Python's


async def test_a_large_state_and_microsecond_timestamps_are_kept(mariadb_url: str):
    """Payloads are LONGBLOB (BLOB stops at 64 KiB) and timestamps DATETIME(6)."""
    big = "x" * 900_000
    async with sr.SnapshotRepository.from_url(mariadb_url, Cart) as repo:
        stored = await repo.upsert_latest(snap("big", big), ttl=timedelta(hours=1))
        latest = await repo.get_latest("big")
        assert latest is not None
        assert latest.state.items == [big]
        assert latest.created_at == stored.created_at
        assert stored.created_at is not None
        assert stored.created_at.microsecond == latest.created_at.microsecond
        second = await repo.upsert_latest(snap("big", "small"))
        assert second.created_at is not None
        assert await repo.get_as_of("big", stored.created_at) == stored
        assert await repo.get_as_of("big", second.created_at) == second


BATCH_PATHS = pytest.mark.parametrize("path", ["bulk-execution", "multi-row"])
"""A batch's upserts: MariaDB's bulk execution, or the multi-row statements of MySQL and
of servers or proxies without bulk operations (run here on MariaDB, with the bulk
execution switched off: there is no MySQL server to test on)."""


def batch_path(monkeypatch: pytest.MonkeyPatch, path: str) -> Counter[str]:
    """Take the batch `path`; returns how many upsert statements each path
    (`bulk-execution`, `multi-row`) has sent, counted as the batches run."""
    if path == "multi-row":
        monkeypatch.setattr(MysqlDriver, "_bulk_upserts", lambda _self, _conn: False)
    sent: Counter[str] = Counter()
    bulk_upsert, upsert_rows = MysqlDriver._bulk_upsert, MysqlDriver._upsert_rows

    def bulk_statement(self: MysqlDriver, row: str) -> str:
        sent["bulk-execution"] += 1
        return bulk_upsert(self, row)

    def multi_row_statement(self: MysqlDriver, row: str, rows: int) -> str:
        sent["multi-row"] += 1
        return upsert_rows(self, row, rows)

    monkeypatch.setattr(MysqlDriver, "_bulk_upsert", bulk_statement)
    monkeypatch.setattr(MysqlDriver, "_upsert_rows", multi_row_statement)
    return sent


def chunk_rows(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The rows of each statement of each batch, as `mysql_driver` cuts them."""
    cut: list[list[int]] = []

    def recording(*args: Any) -> list[list[Any]]:
        made = chunks(*args)
        cut.append([len(chunk) for chunk in made])
        return made

    monkeypatch.setattr(mysql_driver, "chunks", recording)
    return cut


@BATCH_PATHS
async def test_batches_past_one_statements_limits_are_stored_whole(
    mariadb_url: str, monkeypatch: pytest.MonkeyPatch, path: str
):
    """A batch's upserts run as statements of at most 65,535 values and about 4 MiB
    each: a batch of 10,000 users (70,000 values) and one of 8 states of 700 KB each
    take two each, in one transaction, and every write is stored with its version and
    the batch's actor, reason and metadata (or none: a later batch without them)."""
    sent = batch_path(monkeypatch, path)
    cut = chunk_rows(monkeypatch)
    big = "x" * 700_000
    async with sr.SnapshotRepository.from_url(mariadb_url, Cart) as repo:
        many = [snap(f"many-{n:05d}", str(n)) for n in range(10_000)]
        assert {s.version for s in await repo.upsert_many(many)} == {1}
        described = await repo.upsert_many(
            many[:100], actor="importer", reason="nightly", metadata={"run": 7}
        )
        assert {(s.version, s.actor) for s in described} == {(2, "importer")}
        await repo.upsert_many(many[50:100])  # no actor, reason or metadata: none stored
        heavy = [sr.Snapshot(user_id=f"heavy-{n}", state=Cart(note=big)) for n in range(8)]
        await repo.upsert_many(heavy)
        stored = await repo.upsert_many(heavy)
        assert [s.version for s in stored] == [2] * 8
        assert await repo.count_users() == 10_008
        found = await repo.get_latest_many([f"many-{n:05d}" for n in (0, 99, 5_000, 9_999)])
        assert [found[u].state.items for u in sorted(found)] == [["0"], ["99"], ["5000"], ["9999"]]
        assert [found[u].version for u in sorted(found)] == [2, 3, 1, 1]
        assert (found["many-00000"].actor, found["many-00000"].reason) == ("importer", "nightly")
        assert found["many-00000"].metadata == {"run": 7}
        assert (found["many-00099"].actor, found["many-00099"].metadata) == (None, None)
        assert found["many-05000"].actor is None
        latest = await repo.get_latest("heavy-7")
        assert latest is not None
        assert latest.state.note == big
        assert [s.version for s in await repo.get_history("heavy-7")] == [2, 1]
    # 65,535 // 7 values a row = 9,362 rows; 8 x 700 KB over two statements of <= 4 MiB.
    assert cut[0] == [9_362, 638]
    assert cut[-1] == cut[-2] == [5, 3]
    statements = sum(len(rows) for rows in cut)
    other = "multi-row" if path == "bulk-execution" else "bulk-execution"
    assert (sent[path], sent[other]) == (statements, 0)


async def _statement_counters(connections: Any, *, bulk: bool = True) -> tuple[int, dict[str, int]]:
    """The connection id and statement counters of the connection the driver would use
    next; with `bulk=False` that connection behaves as one to a server without bulk
    operations (asyncmy's flag, as a proxy that does not offer them leaves it)."""
    async with connections.checkout() as conn:
        if not bulk:
            conn._bulk_supported = False
        await autocommit(conn)
        async with conn.cursor() as cursor:
            await cursor.execute("SELECT CONNECTION_ID()")
            (connection_id,) = await cursor.fetchone()
            await cursor.execute(
                "SHOW SESSION STATUS WHERE Variable_name IN "
                "('Com_stmt_execute', 'Com_insert', 'Com_insert_select')"
            )
            counters = {name: int(value) for name, value in await cursor.fetchall()}
    return int(connection_id), counters


@pytest.mark.parametrize("path", ["bulk-execution", "multi-row", "server-without-bulk"])
async def test_a_batch_binds_its_values_in_three_prepared_statements(
    mariadb_url: str, monkeypatch: pytest.MonkeyPatch, path: str
):
    """A batch of 500 runs the upsert, the history copy and the feed copy as prepared
    statements, with and without shared actor and metadata, on the path its connection
    can take: never as text, which escapes every payload on the client, nor once per
    row (asyncmy falls back to either silently, for example when a bulk execution has a
    column of NULLs or the server offers no bulk operations)."""
    sent = batch_path(monkeypatch, "multi-row" if path == "multi-row" else "bulk-execution")
    async with sr.SnapshotRepository.from_url(mariadb_url, Cart) as repo:
        connections = repo._backend._driver.connections  # type: ignore[attr-defined]
        batch = [snap(f"u{n:03d}", "x" * 30) for n in range(500)]
        await repo.upsert_many(batch)  # the first reads max_allowed_packet
        sent.clear()
        for described in ({}, {"actor": "importer", "metadata": {"run": 1}}):
            bulk = path != "server-without-bulk"
            connection, before = await _statement_counters(connections, bulk=bulk)
            stored = await repo.upsert_many(batch, **described)
            assert len(stored) == 500
            same_connection, after = await _statement_counters(connections)
            assert same_connection == connection
            counted = {name: after[name] - before[name] for name in before}
            assert counted == {"Com_stmt_execute": 3, "Com_insert": 1, "Com_insert_select": 2}
            taken = "multi-row" if path == "server-without-bulk" else path
            other = "multi-row" if taken == "bulk-execution" else "bulk-execution"
            assert (sent[taken], sent[other]) == (1, 0)
            sent.clear()


async def test_a_lost_connection_gives_a_typed_error_and_the_next_call_works(
    mariadb_url: str,
):
    """The server drops the pool's connections (KILL): a write's outcome is then
    unknown (ConnectionLostError, retry with an idempotency key); reads repeat once."""
    database = make_url(mariadb_url).database
    async with sr.SnapshotRepository.from_url(mariadb_url, Cart) as repo:
        await repo.upsert_latest(snap("u", "1"))
        async with raw_session(mariadb_url) as admin, admin.cursor() as cursor:
            await cursor.execute(
                "SELECT id FROM information_schema.processlist "
                "WHERE db = %s AND id <> CONNECTION_ID()",
                (database,),
            )
            ids = [row[0] for row in await cursor.fetchall()]
            assert ids, "the repository kept no pooled connection"
            for connection_id in ids:
                await cursor.execute(f"KILL CONNECTION {int(connection_id)}")
        with pytest.raises(sr.ConnectionLostError, match="retry it with the same idempotency"):
            await repo.upsert_latest(snap("u", "2"), idempotency_key="k2")
        replay = await repo.upsert_latest(snap("u", "2"), idempotency_key="k2")
        assert replay.version == 2
        latest = await repo.get_latest("u")
        assert latest is not None
        assert latest.version == 2


async def test_a_mysql_url_on_mariadb_is_refused_before_it_migrates(
    mariadb_server: MariadbServer,
):
    """MySQL's binary NO PAD collation (utf8mb4_0900_bin) does not exist on MariaDB 10.11,
    and the `mysql` dialect would ask for it: the migration says so and changes nothing."""
    url = make_url(mariadb_server.create_database()).set(drivername="mysql+asyncmy")
    engine = create_engine(url)
    try:
        with pytest.raises(sr.ConfigurationError, match="mariadb://"):
            await migrate.upgrade(engine)
        assert await migrate.current_revision(engine) is None
    finally:
        await engine.dispose()


async def test_concurrent_migrations_take_turns_on_get_lock(mariadb_server: MariadbServer):
    """Five engines migrate one fresh database at once: GET_LOCK lets one at a time in
    (MySQL commits each DDL statement, so a transaction could not), each revision once."""
    url = mariadb_server.create_database()
    engines = [create_engine(url) for _ in range(5)]
    try:
        await asyncio.gather(*(migrate.upgrade(engine) for engine in engines))
        assert await migrate.current_revision(engines[0]) == migrate.head_revision()
        await migrate.check(engines[0])
    finally:
        for engine in engines:
            await engine.dispose()
