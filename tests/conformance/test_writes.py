"""Writes and versions: numbering, concurrency, compare-and-set, idempotency, expiry, retention."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

import snapshot_repo as sr
from tests.support.conformance import Doc, MakeRepo, snap, stored_versions


class TestVersions:
    async def test_each_write_is_the_next_version_in_latest_and_history(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        before = datetime.now(UTC)
        written = [await repo.upsert_latest(snap("u1", f"n{n}")) for n in range(3)]
        assert [s.version for s in written] == [1, 2, 3]
        latest = await repo.get_latest("u1")
        assert latest is not None
        assert (latest.version, latest.state.note) == (3, "n2")
        assert latest.created_at == written[-1].created_at
        assert latest.created_at.tzinfo is not None
        assert before <= latest.created_at <= datetime.now(UTC)
        history = await repo.get_history("u1")
        assert [(s.version, s.state.note) for s in history] == [(3, "n2"), (2, "n1"), (1, "n0")]
        assert [s.created_at for s in history] == [s.created_at for s in reversed(written)]

    async def test_write_metadata_and_schema_version_are_stored_with_the_version(
        self, make_repo: MakeRepo
    ):
        repo = await make_repo(schema_version=2, upgraders={1: lambda doc: doc})
        snapshot = sr.Snapshot(user_id="u1", state=Doc(note="old"), schema_version=1)
        await repo.upsert_latest(snapshot, actor="svc", reason="import", metadata={"run": 7})
        await repo.upsert_latest(snap("u1", "new"))
        old, new = reversed(await repo.get_history("u1"))
        assert (old.actor, old.reason, old.metadata, old.schema_version) == (
            "svc",
            "import",
            {"run": 7},
            1,
        )
        assert (new.actor, new.reason, new.metadata, new.schema_version) == (None, None, None, 2)

    async def test_concurrent_writers_of_one_user_get_gapless_versions(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        writes = 24
        results = await asyncio.gather(
            *(repo.upsert_latest(snap("hot", f"w{n}")) for n in range(writes))
        )
        assert sorted(s.version for s in results) == list(range(1, writes + 1))
        assert await stored_versions(repo.engine, "hot") == list(range(1, writes + 1))
        latest = await repo.get_latest("hot")
        assert latest is not None
        assert latest.version == writes
        winner = next(s for s in results if s.version == writes)
        assert latest.state == winner.state  # latest holds the last write, not another

    async def test_concurrent_writers_of_many_users_number_each_user_alone(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        users = [f"u{n}" for n in range(6)]
        await asyncio.gather(
            *(repo.upsert_latest(snap(u, str(k))) for k in range(4) for u in users)
        )
        for user in users:
            assert await stored_versions(repo.engine, user) == [1, 2, 3, 4]


class TestCompareAndSet:
    async def test_expected_version_zero_creates_only_a_new_user(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        created = await repo.upsert_latest(snap("u1", "first"), expected_version=0)
        assert created.version == 1
        with pytest.raises(sr.VersionConflictError) as conflict:
            await repo.upsert_latest(snap("u1", "second"), expected_version=0)
        assert (conflict.value.expected_version, conflict.value.actual_version) == (0, 1)
        latest = await repo.get_latest("u1")
        assert latest is not None
        assert latest.state.note == "first"

    async def test_expected_version_replaces_only_that_version(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        await repo.upsert_latest(snap("u1", "a"))
        await repo.upsert_latest(snap("u1", "b"))
        with pytest.raises(sr.VersionConflictError) as conflict:
            await repo.upsert_latest(snap("u1", "stale"), expected_version=1)
        assert conflict.value.actual_version == 2
        assert await stored_versions(repo.engine, "u1") == [1, 2]
        replaced = await repo.upsert_latest(snap("u1", "c"), expected_version=2)
        assert replaced.version == 3
        with pytest.raises(sr.VersionConflictError):
            await repo.upsert_latest(snap("nobody", "x"), expected_version=4)
        assert await stored_versions(repo.engine, "nobody") == []

    async def test_of_racing_compare_and_sets_exactly_one_wins(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        await repo.upsert_latest(snap("u1", "base"))

        async def attempt(n: int) -> int:
            try:
                return (await repo.upsert_latest(snap("u1", f"r{n}"), expected_version=1)).version
            except sr.VersionConflictError as exc:
                return -exc.actual_version

        outcomes = await asyncio.gather(*(attempt(n) for n in range(10)))
        assert sorted(outcomes) == [-2] * 9 + [2]
        assert await stored_versions(repo.engine, "u1") == [1, 2]

    async def test_of_racing_first_writes_exactly_one_creates(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        async def attempt(n: int) -> bool:
            try:
                await repo.upsert_latest(snap("new", f"c{n}"), expected_version=0)
            except sr.VersionConflictError:
                return False
            return True

        assert sum(await asyncio.gather(*(attempt(n) for n in range(10)))) == 1
        assert await stored_versions(repo.engine, "new") == [1]


class TestIdempotency:
    async def test_a_replayed_key_returns_the_first_write_and_writes_nothing(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        first = await repo.upsert_latest(snap("u1", "once"), idempotency_key="k1", actor="a")
        await repo.upsert_latest(snap("u1", "later"))
        replay = await repo.upsert_latest(snap("u1", "retry"), idempotency_key="k1")
        assert replay == first
        assert (replay.version, replay.state.note, replay.idempotency_key) == (1, "once", "k1")
        assert await stored_versions(repo.engine, "u1") == [1, 2]

    async def test_a_replay_wins_over_a_compare_and_set(self, repo: sr.SnapshotRepository[Doc]):
        first = await repo.upsert_latest(snap("u1", "once"), idempotency_key="k1")
        await repo.upsert_latest(snap("u1", "later"))
        replay = await repo.upsert_latest(snap("u1", "x"), idempotency_key="k1", expected_version=1)
        assert replay == first

    async def test_keys_are_per_user(self, repo: sr.SnapshotRepository[Doc]):
        a = await repo.upsert_latest(snap("a", "1"), idempotency_key="same")
        b = await repo.upsert_latest(snap("b", "1"), idempotency_key="same")
        assert (a.user_id, a.version, b.user_id, b.version) == ("a", 1, "b", 1)

    async def test_concurrent_first_uses_of_a_key_write_once(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        results = await asyncio.gather(
            *(repo.upsert_latest(snap("u1", f"t{n}"), idempotency_key="once") for n in range(8))
        )
        assert {s.version for s in results} == {1}
        assert len({s.state.note for s in results}) == 1
        assert await stored_versions(repo.engine, "u1") == [1]


class TestExpiryAndRetention:
    async def test_an_expired_snapshot_reads_as_absent_and_the_next_write_follows_it(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        await repo.upsert_latest(snap("u1", "gone"), ttl=timedelta(0))
        await repo.upsert_latest(snap("u2", "alive"), ttl=timedelta(hours=1))
        assert await repo.get_latest("u1") is None
        assert not await repo.exists("u1")
        assert (await repo.get_latest("u2")) is not None
        again = await repo.upsert_latest(snap("u1", "back"))
        assert again.version == 2  # the expired row still holds the user's version
        latest = await repo.get_latest("u1")
        assert latest is not None
        assert (latest.version, latest.state.note) == (2, "back")

    async def test_a_write_without_ttl_clears_the_expiry(self, repo: sr.SnapshotRepository[Doc]):
        await repo.upsert_latest(snap("u1", "short"), ttl=timedelta(milliseconds=1))
        await repo.upsert_latest(snap("u1", "forever"))
        await asyncio.sleep(0.01)
        latest = await repo.get_latest("u1")
        assert latest is not None
        assert latest.state.note == "forever"

    async def test_retention_prunes_history_in_the_write(self, make_repo: MakeRepo):
        repo = await make_repo(retention=sr.RetentionPolicy(keep_last=2))
        for n in range(5):
            await repo.upsert_latest(snap("u1", str(n)))
        await repo.upsert_latest(snap("u2", "only"))
        assert await stored_versions(repo.engine, "u1") == [4, 5]
        assert [s.version for s in await repo.get_history("u1")] == [5, 4]
        assert await stored_versions(repo.engine, "u2") == [1]
