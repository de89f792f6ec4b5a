"""The durable change feed and live listeners."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

import snapshot_repo as sr
from snapshot_repo.backends.statements import prune_statement
from snapshot_repo.changes import Change
from tests.support.databases import (
    Backend,
    Cart,
    refusing_history_insert,
    wait_for_mariadb_lock_waits,
)

from .support.conformance import read_feed
from .support.feed import feed_entries
from .test_repository import snap


def read_all(
    repo: sr.SnapshotRepository[Cart], cursor: str | None = None, *, limit: int = 3, expect: int = 0
) -> Awaitable[tuple[list[Change], str]]:
    """The feed after `cursor` in pages of 3 (see `read_feed`), so every read pages."""
    return read_feed(repo, cursor, limit=limit, expect=expect)


async def test_feed_lists_committed_writes_in_order(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("a", "1"), actor="svc", reason="why", metadata={"k": 1})
    await repo.upsert_latest(snap("b", "1"))
    await repo.upsert_many([snap("a", "2"), snap("c", "1")])
    with pytest.raises(sr.VersionConflictError):
        await repo.upsert_latest(snap("a", "lost"), expected_version=1)
    changes, _ = await read_all(repo, expect=4)
    assert [(c.user_id, c.version, c.kind) for c in changes] == [
        ("a", 1, "write"),
        ("b", 1, "write"),
        ("a", 2, "write"),
        ("c", 1, "write"),
    ]
    first = changes[0]
    assert (first.actor, first.reason, first.metadata) == ("svc", "why", {"k": 1})
    assert first.created_at is not None
    assert all(c.seq is not None for c in changes)
    seqs = [c.seq for c in changes]
    assert seqs == sorted(seqs)


async def test_consumer_resumes_from_its_cursor(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("a", "1"))
    seen, cursor = await read_all(repo, expect=1)
    assert len(seen) == 1
    # the consumer is down; writes go on
    for n in range(5):
        await repo.upsert_latest(snap("b", str(n)))
    caught_up, cursor = await read_all(repo, cursor, limit=2, expect=5)
    assert [(c.user_id, c.version) for c in caught_up] == [("b", v) for v in range(1, 6)]
    page = await repo.changes_since(cursor)
    assert page.changes == []
    assert page.cursor == cursor


async def test_erasure_leaves_one_erase_entry_and_no_writes(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("gone", "secret"))
    await repo.upsert_latest(snap("gone", "secret2"))
    await repo.upsert_latest(snap("kept", "x"))
    assert await repo.delete("gone") == 2
    changes, _ = await read_all(repo, expect=2)
    assert [(c.user_id, c.version, c.kind) for c in changes] == [
        ("kept", 1, "write"),
        ("", 2, "erase"),  # an erase entry keeps no user id
    ]


async def test_feed_is_confined_to_the_scope(backend: Backend, repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("plain", "x"))
    await repo.for_tenant("acme").upsert_latest(snap("acme-user", "x"))
    async with sr.SnapshotRepository.from_url(backend.url, Cart, namespace="other") as other:
        await other.upsert_latest(snap("other-user", "x"))
        assert [c.user_id for c in (await read_all(other, expect=1))[0]] == ["other-user"]
    assert [c.user_id for c in (await read_all(repo, expect=1))[0]] == ["plain"]
    acme = repo.for_tenant("acme")
    assert [c.user_id for c in (await read_all(acme, expect=1))[0]] == ["acme-user"]


@pytest.mark.parametrize("cursor", ["garbage", "v1.x.1", "v2.1.1", "v1.1"])
async def test_foreign_cursors_are_refused(repo: sr.SnapshotRepository[Cart], cursor: str):
    with pytest.raises(sr.SnapshotValidationError, match="cursor"):
        await repo.changes_since(cursor)


async def test_a_late_committing_write_is_not_skipped(
    backend: Backend, repo: sr.SnapshotRepository[Cart]
):
    """A feed entry whose transaction commits after a later one must still reach a consumer."""
    if backend.name == "sqlite":
        # SQLite writers hold the database write lock until commit: no interleaving exists.
        await repo.upsert_latest(snap("a", "1"))
        assert len((await read_all(repo, expect=1))[0]) == 1
        return
    engine = repo.engine
    if backend.name == "mariadb":
        async with engine.connect() as slow:
            # An open transaction takes a feed entry (and its seq) first, as a writer
            # does: under the feed gate's share lock ...
            await slow.exec_driver_sql(
                "SELECT id FROM snapshot_feed_gate WHERE id = 1 LOCK IN SHARE MODE"
            )
            await slow.exec_driver_sql(
                "INSERT INTO snapshot_changes (txid, tenant, namespace, user_id, version, "
                "kind, created_at) VALUES (NULL, '', 'default', 'slow', 1, 'write', "
                "UTC_TIMESTAMP(6))"
            )
            # ... a later write commits first ...
            await repo.upsert_latest(snap("fast", "1"))
            # ... and a reader waits for the older transaction (the gate's exclusive lock)
            # rather than return the later entry alone.
            reading = asyncio.create_task(read_all(repo, expect=2))
            await wait_for_mariadb_lock_waits(backend.url, 1)
            assert not reading.done()
            await slow.commit()
        seen, _ = await reading
        assert [c.user_id for c in seen] == ["slow", "fast"]
        return
    async with engine.connect() as slow:
        # An open transaction takes a feed entry (and its seq) first ...
        await slow.exec_driver_sql(
            "INSERT INTO snapshot_changes (txid, tenant, namespace, user_id, version, kind, "
            "created_at) VALUES (CAST(CAST(pg_current_xact_id() AS TEXT) AS BIGINT), '', "
            "'default', 'slow', 1, 'write', now())"
        )
        # ... a later write commits first ...
        await repo.upsert_latest(snap("fast", "1"))
        seen, cursor = await read_all(repo)
        assert seen == []  # held back while an older transaction is still running
        await slow.commit()
    seen, cursor = await read_all(repo, cursor, expect=2)
    assert [c.user_id for c in seen] == ["slow", "fast"]


class Collector:
    """A listener that keeps every change and says when `count` of them arrived."""

    def __init__(self, count: int) -> None:
        self.received: list[Change] = []
        self.arrived = asyncio.Event()
        self._count = count

    async def __call__(self, change: Change) -> None:
        self.received.append(change)
        if len(self.received) == self._count:
            self.arrived.set()


async def test_listeners_get_committed_writes_and_erasures(repo: sr.SnapshotRepository[Cart]):
    collector = Collector(3)
    received, arrived = collector.received, collector.arrived
    subscription = await repo.subscribe(collector)
    try:
        await repo.upsert_latest(snap("u1", "a"))
        with pytest.raises(sr.VersionConflictError):
            await repo.upsert_latest(snap("u1", "rejected"), expected_version=7)
        await repo.upsert_latest(snap("u1", "b"))
        await repo.delete("u1")
        await asyncio.wait_for(arrived.wait(), timeout=5)
    finally:
        subscription.close()
    assert [(c.user_id, c.version, c.kind) for c in received] == [
        ("u1", 1, "write"),
        ("u1", 2, "write"),
        ("", 2, "erase"),
    ]


async def test_listeners_get_every_write_of_a_batch(repo: sr.SnapshotRepository[Cart]):
    """A batch announces each of its writes to local listeners, with the batch's metadata."""
    collector = Collector(5)
    received, arrived = collector.received, collector.arrived
    with await repo.subscribe(collector):
        await repo.upsert_many([snap("b", "1"), snap("a", "1")], actor="import", reason="r")
        await repo.upsert_many([snap("a", "2"), snap("c", "1"), snap("a", "3")])
        await asyncio.wait_for(arrived.wait(), timeout=5)
    assert sorted((c.user_id, c.version, c.actor) for c in received) == [
        ("a", 1, "import"),
        ("a", 2, None),
        ("a", 3, None),
        ("b", 1, "import"),
        ("c", 1, None),
    ]
    assert {c.reason for c in received[:2]} == {"r"}


async def test_listeners_never_see_a_rolled_back_write(repo: sr.SnapshotRepository[Cart]):
    received: list[Change] = []
    done = asyncio.Event()

    def on_change(change: Change) -> None:
        received.append(change)
        if change.user_id == "marker":
            done.set()

    async with refusing_history_insert(repo.engine, "NEW.user_id = 'doomed'"):
        with await repo.subscribe(on_change):
            with pytest.raises(sr.StorageError):
                await repo.upsert_latest(snap("doomed", "x"))
            await repo.upsert_latest(snap("marker", "x"))
            await asyncio.wait_for(done.wait(), timeout=5)
    assert [c.user_id for c in received] == ["marker"]
    assert [c.user_id for c in (await read_all(repo, expect=1))[0]] == ["marker"]


async def test_changes_stream_yields_live_changes(repo: sr.SnapshotRepository[Cart]):
    async with repo.changes() as stream:
        await repo.upsert_latest(snap("live", "1"))
        await repo.delete("live")
        first = await asyncio.wait_for(anext(stream), timeout=5)
        second = await asyncio.wait_for(anext(stream), timeout=5)
    assert [(c.user_id, c.version, c.kind) for c in (first, second)] == [
        ("live", 1, "write"),
        ("", 1, "erase"),
    ]


async def test_changes_stream_in_a_plain_for_loop(repo: sr.SnapshotRepository[Cart]):
    stream = repo.changes()
    await stream.open()  # registers, so the write below cannot be missed
    await repo.upsert_latest(snap("loop", "1"))
    async for change in stream:
        assert change.user_id == "loop"
        break
    await stream.aclose()


async def test_postgres_listeners_hear_other_processes(postgres_url: str):
    """Postgres by nature: LISTEN/NOTIFY carries the commit of a notifying writer elsewhere."""
    async with sr.SnapshotRepository.from_url(postgres_url, Cart) as repo:
        heard = asyncio.Event()
        received: list[Change] = []

        def on_change(change: Change) -> None:
            received.append(change)
            heard.set()

        with await repo.subscribe(on_change):
            program = textwrap.dedent(
                f"""
                import asyncio, snapshot_repo as sr
                async def main():
                    url = {postgres_url!r}
                    async with sr.SnapshotRepository.from_url(url, notify=True) as repo:
                        await repo.upsert_latest(sr.Snapshot(user_id="remote", state={{}}))
                asyncio.run(main())
                """
            )
            process = await asyncio.create_subprocess_exec(sys.executable, "-c", program)
            assert await asyncio.wait_for(process.wait(), timeout=60) == 0
            await asyncio.wait_for(heard.wait(), timeout=10)
        assert [(c.user_id, c.version, c.kind) for c in received] == [("remote", 1, "write")]
        assert received[0].created_at is None  # live notifications carry the key only


async def test_a_notifying_writer_is_heard_once_in_its_own_process(postgres_url: str):
    """With notify=True the local copy is not published: LISTEN delivers it, exactly once."""
    async with (
        sr.SnapshotRepository.from_url(postgres_url, Cart, notify=True) as repo,
        repo.changes() as stream,
    ):
        await repo.upsert_latest(snap("n1", "a"))
        await repo.delete("n1")
        await repo.upsert_latest(snap("n2", "b"))
        got = [await asyncio.wait_for(anext(stream), timeout=10) for _ in range(3)]
        assert [(c.user_id, c.version, c.kind) for c in got] == [
            ("n1", 1, "write"),
            ("", 1, "erase"),
            ("n2", 1, "write"),
        ]
        await repo.upsert_latest(snap("n3", "c"))
        fourth = await asyncio.wait_for(anext(stream), timeout=10)
        assert fourth.user_id == "n3"  # not a duplicate of an earlier change


# --- retention keeps the feed whole -------------------------------------------------------


async def test_pruned_versions_keep_their_feed_entries(repo: sr.SnapshotRepository[Cart]):
    """Pruning history takes no write out of the feed, nor moves one in it."""
    for n in range(5):
        await repo.upsert_latest(snap("a", str(n)), actor="svc")
        await repo.upsert_latest(snap("b", str(n)))
    before, _ = await read_all(repo, limit=4, expect=10)
    assert await repo.prune_history("a", keep_last=2) == 3
    assert await repo.prune_history(keep_last=1) == 1 + 4
    after, cursor = await read_all(repo, limit=4, expect=10)
    assert after == before  # every field, the seq included
    assert [c.actor for c in after if c.user_id == "a"] == ["svc"] * 5
    await repo.upsert_latest(snap("a", "later"))
    later, _ = await read_all(repo, cursor, expect=1)
    assert [(c.user_id, c.version) for c in later] == [("a", 6)]


async def test_writes_that_prune_keep_every_feed_entry(backend: Backend):
    """A retention policy prunes in the write's own statement; the feed keeps every write."""
    policy = sr.RetentionPolicy(keep_last=1)
    async with sr.SnapshotRepository.from_url(backend.url, Cart, retention=policy) as repo:
        await repo.upsert_latest(snap("a", "1"))
        await repo.upsert_latest(snap("a", "2"))
        await repo.upsert_many([snap("a", "3"), snap("b", "1")])
        await repo.upsert_many([snap("b", "2"), snap("a", "4"), snap("b", "3")])
        assert [s.version for s in await repo.get_history("a")] == [4]
        changes, _ = await read_all(repo, limit=2, expect=7)
    # Within one transaction the order of different users' entries is the backend's.
    by_user = {user: [c.version for c in changes if c.user_id == user] for user in "ab"}
    assert by_user == {"a": [1, 2, 3, 4], "b": [1, 2, 3]}
    assert len(changes) == 7
    seqs = [c.seq for c in changes]
    assert seqs == sorted(seqs)


async def test_erasure_forgets_the_entries_of_pruned_versions(repo: sr.SnapshotRepository[Cart]):
    for n in range(4):
        await repo.upsert_latest(snap("gone", str(n)))
    await repo.prune_history("gone", keep_last=1)
    await repo.upsert_latest(snap("kept", "x"))
    assert await repo.delete("gone") == 1
    changes, _ = await read_all(repo, expect=2)
    assert [(c.user_id, c.version, c.kind) for c in changes] == [
        ("kept", 1, "write"),
        ("", 4, "erase"),
    ]


@contextlib.asynccontextmanager
async def a_prune_in_progress(
    repo: sr.SnapshotRepository[Cart], user_id: str
) -> AsyncIterator[tuple[AsyncConnection, AsyncConnection]]:
    """Three versions of `user_id`, two of them pruned (entries moved) by a transaction
    left open; yields it and a second connection to watch and read with."""
    for n in range(3):
        await repo.upsert_latest(snap(user_id, str(n)))
    async with repo.engine.connect() as pruning, repo.engine.connect() as observer:
        params = {"tenant": "", "namespace": "default", "user_id": user_id}
        pruned = await pruning.execute(
            prune_statement("postgresql"), {**params, "keep_last": 1, "cutoff": None}
        )
        assert pruned.rowcount == 2  # deleted and moved, not yet committed
        yield pruning, observer


async def test_an_erasure_during_a_prune_forgets_what_the_prune_moved(postgres_url: str):
    """Postgres by nature: a prune moving feed entries and an erasure of the same user
    serialize, so the erasure cannot miss an entry the prune moved while it ran."""
    async with (
        sr.SnapshotRepository.from_url(postgres_url, Cart) as repo,
        a_prune_in_progress(repo, "gone") as (pruning, observer),
    ):
        erasing = asyncio.create_task(repo.delete("gone"))
        await until_a_backend_waits_on_a_lock(observer)
        await pruning.commit()
        assert await erasing == 1
        assert await feed_entries(observer) == [("", 3, "erase")]


async def test_concurrent_prunes_of_one_user_move_each_entry_once(postgres_url: str):
    """Postgres by nature: the second prune waits for the first's doomed versions and
    finds them gone, rather than moving their entries a second time."""
    async with (
        sr.SnapshotRepository.from_url(postgres_url, Cart) as repo,
        a_prune_in_progress(repo, "u") as (pruning, observer),
    ):
        second = asyncio.create_task(repo.prune_history("u", keep_last=1))
        await until_a_backend_waits_on_a_lock(observer)
        await pruning.commit()
        assert await second == 0
        assert await feed_entries(observer) == [("u", v, "write") for v in (1, 2, 3)]


@pytest.mark.parametrize("retention", [None, sr.RetentionPolicy(keep_last=1)])
async def test_notifying_writes_are_heard_once_each(
    postgres_url: str, retention: sr.RetentionPolicy | None
):
    """Postgres by nature: with notify=True each write sends one NOTIFY, in bulk (distinct
    and repeated users) and alone, with or without a retention policy."""
    async with (
        sr.SnapshotRepository.from_url(
            postgres_url, Cart, notify=True, retention=retention
        ) as repo,
        repo.changes() as stream,
    ):
        await repo.upsert_many([snap("a", "1"), snap("b", "1")])
        await repo.upsert_many([snap("a", "2"), snap("b", "2"), snap("a", "3")])
        await repo.upsert_latest(snap("b", "3"))
        got = [await asyncio.wait_for(anext(stream), timeout=10) for _ in range(6)]
        assert sorted((c.user_id, c.version, c.kind) for c in got) == [
            ("a", 1, "write"),
            ("a", 2, "write"),
            ("a", 3, "write"),
            ("b", 1, "write"),
            ("b", 2, "write"),
            ("b", 3, "write"),
        ]
        changes, _ = await read_all(repo, expect=6)
        assert len(changes) == 6


async def test_postgres_writes_carry_their_feed_entry_on_the_history_row(postgres_url: str):
    """Postgres by nature (0010): a write adds no row to snapshot_changes; its history
    row holds the entry's transaction id and seq, which the feed returns."""
    async with sr.SnapshotRepository.from_url(postgres_url, Cart) as repo:
        await repo.upsert_latest(snap("a", "1"))
        await repo.upsert_many([snap("b", "1"), snap("a", "2")])
        async with repo.engine.connect() as conn:
            recorded = await conn.exec_driver_sql("SELECT count(*) FROM snapshot_changes")
            assert recorded.scalar_one() == 0
            carried = await conn.exec_driver_sql(
                "SELECT user_id, version, feed_txid, feed_seq FROM snapshot_history "
                "ORDER BY feed_seq"
            )
            rows = carried.all()
        written = [(user, version) for user, version, _txid, _seq in rows]
        assert written[0] == ("a", 1)
        assert set(written[1:]) == {("b", 1), ("a", 2)}  # one batch, in the order it drew
        assert rows[1][2] == rows[2][2] != rows[0][2]  # the batch is one transaction
        changes, _ = await read_all(repo, expect=3)
        assert [(c.user_id, c.version, c.seq) for c in changes] == [
            (user, version, seq) for user, version, _txid, seq in rows
        ]


async def until_a_backend_waits_on_a_lock(conn: AsyncConnection) -> None:
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    deadline = asyncio.get_running_loop().time() + 10
    while not (await conn.execute(waiting)).scalar():
        await conn.rollback()  # a fresh snapshot of pg_stat_activity next time
        assert asyncio.get_running_loop().time() < deadline, "nothing ever waited"
        await asyncio.sleep(0.01)
    await conn.rollback()
