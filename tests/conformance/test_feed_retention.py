"""Change-feed retention: trimming by age, consumers that say where they are, expired cursors."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

import snapshot_repo as sr
from snapshot_repo.changes import decode_cursor
from snapshot_repo.cli import main
from snapshot_repo.tables import (
    changes_table,
    feed_consumers_table,
    feed_horizons_table,
    history_table,
    latest_table,
)
from tests.support.conformance import Doc, MakeRepo, Target, described, read_feed, snap

DAY = timedelta(days=1)


async def age_everything(repo: sr.SnapshotRepository[Any], by: timedelta = 2 * DAY) -> None:
    """Backdate every feed entry written so far (both places one lives) by `by`."""
    old = datetime.now(UTC) - by
    async with repo.engine.begin() as conn:
        await conn.execute(update(changes_table).values(created_at=old))
        await conn.execute(update(history_table).values(created_at=old))


async def write(repo: sr.SnapshotRepository[Doc], *users: str) -> None:
    for user in users:
        await repo.upsert_latest(snap(user, "n"))


class TestTrimmingByAge:
    async def test_old_entries_go_young_ones_stay_and_an_old_cursor_expires(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        await write(repo, "a", "b")
        _, before_trim = await read_feed(repo, expect=2)
        await age_everything(repo)
        await write(repo, "c")
        await read_feed(repo, expect=3)  # on Postgres: every entry is visible (see read_feed)

        assert await repo.trim_changes(older_than=DAY) == 2
        assert await repo.trim_changes(older_than=DAY) == 0

        kept, _ = await read_feed(repo, expect=1)
        assert described(kept) == [("c", 1, "write")]
        with pytest.raises(sr.CursorExpiredError) as raised:
            await repo.changes_since("v1.0.0")
        assert isinstance(raised.value, LookupError)
        resumed = await repo.changes_since(raised.value.horizon)
        assert described(resumed.changes) == [("c", 1, "write")]
        # The cursor after the trimmed entries themselves is still good.
        assert described((await repo.changes_since(before_trim)).changes) == [("c", 1, "write")]

    async def test_a_trim_needs_a_bound(self, repo: sr.SnapshotRepository[Doc]):
        with pytest.raises(sr.SnapshotValidationError):
            await repo.trim_changes()
        with pytest.raises(sr.SnapshotValidationError):
            await repo.trim_changes(older_than=-DAY)
        with pytest.raises(sr.ConfigurationError):
            sr.SnapshotRepository(repo.engine, Doc, feed_retention=3600)  # type: ignore[typeddict-item]


class TestConsumers:
    async def test_a_consumer_keeps_its_unread_entries_past_the_age_bound_until_it_acks(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        await write(repo, "a", "b", "c")
        await read_feed(repo, expect=3)
        first = await repo.changes_since(None, limit=1)
        assert described(first.changes) == [("a", 1, "write")]
        await repo.acknowledge_changes("indexer", first.cursor)
        await age_everything(repo)

        assert await repo.trim_changes(older_than=timedelta(0)) == 1  # "a" only
        rest = await repo.changes_since(first.cursor)
        assert described(rest.changes) == [("b", 1, "write"), ("c", 1, "write")]

        await repo.acknowledge_changes("indexer", rest.cursor)
        assert await repo.trim_changes(older_than=timedelta(0)) == 2
        assert (await repo.changes_since(rest.cursor)).changes == []
        with pytest.raises(sr.CursorExpiredError):
            await repo.changes_since(first.cursor)
        [consumer] = await repo.feed_consumers()
        assert (consumer.name, consumer.cursor) == ("indexer", rest.cursor)
        # An acknowledgement never moves a consumer back; one before the horizon fails.
        with pytest.raises(sr.CursorExpiredError):
            await repo.acknowledge_changes("indexer", first.cursor)
        assert [c.cursor for c in await repo.feed_consumers()] == [rest.cursor]

    async def test_a_lagging_consumer_holds_the_feed_until_it_is_dropped(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        await repo.acknowledge_changes("stalled", None)
        await write(repo, "a", "b")
        await read_feed(repo, expect=2)
        await age_everything(repo)
        assert await repo.trim_changes(older_than=timedelta(0)) == 0
        assert len((await read_feed(repo, expect=2))[0]) == 2

        assert await repo.drop_feed_consumer("stalled") is True
        assert await repo.drop_feed_consumer("stalled") is False
        assert await repo.trim_changes(older_than=timedelta(0)) == 2
        assert (await repo.changes_since(None)).changes == []

    async def test_consumers_and_horizons_are_per_scope(self, make_repo: MakeRepo):
        repo = await make_repo()
        acme, other = repo.for_tenant("acme"), repo.for_tenant("other")
        await write(acme, "a")
        await write(other, "b")
        await read_feed(acme, expect=1)
        await read_feed(other, expect=1)
        await acme.acknowledge_changes("indexer", None)
        await age_everything(repo)
        # The repository trims every tenant of the namespace; acme's consumer holds acme's.
        assert await repo.trim_changes(older_than=timedelta(0)) == 1
        assert described((await acme.changes_since(None)).changes) == [("a", 1, "write")]
        assert (await other.changes_since(None)).changes == []
        assert await other.feed_consumers() == []


class TestTrimmingWithMaintenance:
    async def test_prune_history_and_reap_expired_trim_by_feed_retention(self, make_repo: MakeRepo):
        repo = await make_repo(feed_retention=DAY)
        await write(repo, "a", "a", "a", "b")
        await read_feed(repo, expect=4)
        await age_everything(repo)
        assert await repo.prune_history(keep_last=1) == 2
        assert (await repo.changes_since(None)).changes == []

        await write(repo, "c")
        await read_feed(repo, expect=1)
        await age_everything(repo)
        async with repo.engine.begin() as conn:
            await conn.execute(
                update(latest_table)
                .where(latest_table.c.user_id == "b")
                .values(expires_at=datetime.now(UTC) - DAY)
            )
        assert await repo.reap_expired() == 1
        # The erasure's entry is young; the aged write of "c" was trimmed.
        young, _ = await read_feed(repo, expect=1)
        assert [change.kind for change in young] == ["erase"]


class TestConcurrentTrimming:
    async def test_a_consumer_misses_nothing_while_writers_write_and_trims_run(
        self, make_repo: MakeRepo
    ):
        """Writers, a consumer that acknowledges each page, and a trimmer trimming everything
        acknowledged, on three repositories (three pools): the consumer sees every write
        exactly once, in order, and never an expired cursor."""
        writer, reader, trimmer = await make_repo(), await make_repo(), await make_repo()
        await reader.acknowledge_changes("consumer", None)
        users, versions = ("u0", "u1", "u2"), 8
        expected = {(user, version) for user in users for version in range(1, versions + 1)}
        seen: list[tuple[str, int]] = []
        trimmed = 0
        writing = asyncio.Event()
        done_writing = asyncio.Event()
        trimmed_some = asyncio.Event()

        async def write_user(user: str) -> None:
            for version in range(1, versions + 1):
                if user == users[-1] and version == versions // 2:
                    # The rest is written after a trim removed acknowledged entries.
                    await trimmed_some.wait()
                await writer.upsert_latest(snap(user, "n"))
                writing.set()

        async def consume() -> None:
            cursor: str | None = None
            deadline = asyncio.get_running_loop().time() + 15
            while len(seen) < len(expected):
                assert asyncio.get_running_loop().time() < deadline, "consumer fell behind"
                page = await reader.changes_since(cursor, limit=3)
                seen.extend((change.user_id, change.version) for change in page.changes)
                cursor = page.cursor
                await reader.acknowledge_changes("consumer", cursor)
                if not page.changes:
                    await asyncio.sleep(0.01)  # waiting for writes (or, on Postgres, xmin)

        async def trim() -> None:
            nonlocal trimmed
            await writing.wait()
            while not done_writing.is_set() or len(seen) < len(expected):
                count = await trimmer.trim_changes(older_than=timedelta(0))
                trimmed += count
                if count:
                    trimmed_some.set()
                await asyncio.sleep(0)

        async def writers() -> None:
            await asyncio.gather(*(write_user(user) for user in users))
            done_writing.set()

        await asyncio.wait_for(asyncio.gather(writers(), consume(), trim()), timeout=30)
        trimmed += await trimmer.trim_changes(older_than=timedelta(0))

        assert len(seen) == len(expected)
        assert set(seen) == expected
        for user in users:
            assert [v for u, v in seen if u == user] == list(range(1, versions + 1))
        # Everything was acknowledged, so everything is trimmed in the end.
        assert trimmed_some.is_set()
        assert trimmed == len(expected)
        assert (await reader.changes_since(None)).changes == []


def test_the_cli_trims_lists_and_drops_consumers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`trim-changes`, `feed-consumers` and `drop-consumer` on a SQLite file."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"

    def run(*argv: str) -> tuple[int, str]:
        status = main(["--url", url, *argv])
        return status, capsys.readouterr().out

    async def prepare() -> None:
        async with sr.SnapshotRepository.from_url(url, Doc) as repo:
            await repo.migrate()
            await write(repo, "a", "b")
            await repo.acknowledge_changes("indexer", (await repo.changes_since(None)).cursor)
            await write(repo, "c")

    asyncio.run(prepare())
    status, out = run("feed-consumers")
    assert status == 0
    assert [consumer["name"] for consumer in json.loads(out)] == ["indexer"]
    assert run("trim-changes", "--older-than", "0") == (0, "2\n")  # "c" is not acknowledged
    assert run("drop-consumer", "indexer") == (0, "")
    assert run("drop-consumer", "indexer")[0] == 1
    assert run("trim-changes", "--older-than", "0") == (0, "1\n")
    assert run("trim-changes", "--older-than", "-1")[0] == 2


async def wait_until_blocked(conn: AsyncConnection, database: str) -> None:
    """Wait (at most 10 s) until the trim waits for a lock (on Postgres: any session of the
    test's own database waiting for one)."""
    if database == "postgres":
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query NOT LIKE :observer"
        )
    else:
        # MariaDB waits for a row lock on a primary-key lookup while it plans the
        # statement, before `innodb_trx` lists the transaction: look at the statement.
        query = (
            "SELECT count(*) FROM information_schema.processlist WHERE db = DATABASE() "
            "AND info LIKE :pattern AND info NOT LIKE :observer"
        )
    deadline = asyncio.get_running_loop().time() + 10
    async with conn.engine.connect() as observer:  # the test's own engine, not the repository's
        # Patterns as parameters: asyncmy formats `%` in the SQL text itself.
        patterns = {"pattern": "%snapshot_feed_horizons%FOR UPDATE%", "observer": "%processlist%"}
        while not await observer.scalar(text(query), patterns):
            assert asyncio.get_running_loop().time() < deadline, "the trim never waited"
            await asyncio.sleep(0.01)


class TestAcknowledgementRace:
    async def test_a_trim_waits_for_a_registration_in_flight_and_keeps_its_entries(
        self, repo: sr.SnapshotRepository[Doc], target: Target
    ):
        """A consumer registering while a trim starts: the trim waits for its transaction
        (the horizon row's lock) and then stops at its position."""
        await write(repo, "a", "b", "c")
        await read_feed(repo, expect=3)
        first = await repo.changes_since(None, limit=1)
        await repo.trim_changes(older_than=365 * DAY)  # makes the horizon row, trims nothing
        await age_everything(repo)
        txid, seq = decode_cursor(first.cursor)
        horizon = feed_horizons_table
        # A pool of its own, so the trim never waits for a connection this test holds.
        engine = sr.create_engine(repo.engine.url.render_as_string(hide_password=False))
        async with engine.connect() as conn:
            await conn.begin()
            # What `acknowledge_changes` does in its transaction, held open here.
            await conn.execute(
                select(horizon.c.seq)
                .where(horizon.c.tenant == "", horizon.c.namespace == repo.namespace)
                .with_for_update(read=True)
            )
            await conn.execute(
                insert(feed_consumers_table).values(
                    tenant="",
                    namespace=repo.namespace,
                    consumer="late",
                    acked_txid=txid,
                    acked_seq=seq,
                    updated_at=datetime.now(UTC),
                )
            )
            trim = asyncio.ensure_future(repo.trim_changes(older_than=timedelta(0)))
            if target.database == "sqlite" or target.pooler:
                # SQLite: the trim waits for the write lock either way. PgBouncer: its few
                # server connections may hold the trim in its own queue instead; the
                # "postgres" target shows the interleaving on the same server.
                await asyncio.sleep(0)
            else:
                await wait_until_blocked(conn, target.database)
            assert not trim.done()
            await conn.commit()
        await engine.dispose()
        assert await trim == 1  # "a" only: the consumer's "b" and "c" stay
        rest = await repo.changes_since(first.cursor)
        assert described(rest.changes) == [("b", 1, "write"), ("c", 1, "write")]
