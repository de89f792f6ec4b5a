"""Batches (`upsert_many`): one transaction, each write its user's next version."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import snapshot_repo as sr
from tests.support.conformance import (
    Doc,
    MakeRepo,
    described,
    read_feed,
    snap,
    stored_versions,
)


class TestBatches:
    async def test_a_batch_of_users_returns_their_versions_in_input_order(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        await repo.upsert_latest(snap("m", "before"))
        stored = await repo.upsert_many([snap("z", "1"), snap("m", "2"), snap("a", "3")])
        assert [(s.user_id, s.version) for s in stored] == [("z", 1), ("m", 2), ("a", 1)]
        latest = await repo.get_latest_many(["a", "m", "z"])
        assert {u: (s.version, s.state.note) for u, s in latest.items()} == {
            "a": (1, "3"),
            "m": (2, "2"),
            "z": (1, "1"),
        }

    async def test_a_repeated_user_gets_consecutive_versions_in_batch_order(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        await repo.upsert_latest(snap("u", "0"))
        stored = await repo.upsert_many([snap("u", "1"), snap("v", "x"), snap("u", "2")])
        assert [(s.user_id, s.version) for s in stored] == [("u", 2), ("v", 1), ("u", 3)]
        history = await repo.get_history("u")
        assert [(s.version, s.state.note) for s in history] == [(3, "2"), (2, "1"), (1, "0")]

    async def test_the_batch_metadata_is_recorded_on_every_version(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        stored = await repo.upsert_many(
            [snap("a", "1"), snap("b", "1")], actor="job", reason="nightly", metadata={"n": 2}
        )
        for snapshot in stored:
            (read,) = await repo.get_history(snapshot.user_id)
            assert (read.actor, read.reason, read.metadata) == ("job", "nightly", {"n": 2})
            assert read.created_at == snapshot.created_at
            assert read.idempotency_key is None

    async def test_a_batch_clears_an_expiry(self, repo: sr.SnapshotRepository[Doc]):
        await repo.upsert_latest(snap("u", "short"), ttl=timedelta(0))
        assert await repo.get_latest("u") is None
        await repo.upsert_many([snap("u", "kept")])
        latest = await repo.get_latest("u")
        assert latest is not None
        assert (latest.version, latest.state.note) == (2, "kept")

    async def test_concurrent_batches_sharing_users_stay_gapless(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        users = [f"user-{n}" for n in range(8)]
        batches = [users if k % 2 else list(reversed(users)) for k in range(6)]
        await asyncio.gather(*(repo.upsert_many([snap(u, "x") for u in b]) for b in batches))
        for user in users:
            assert await stored_versions(repo.engine, user) == [1, 2, 3, 4, 5, 6]

    async def test_batches_racing_single_writes_stay_gapless(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        batch = [snap("shared", "b"), snap("other", "b")]
        await asyncio.gather(
            *(repo.upsert_many(batch) for _ in range(4)),
            *(repo.upsert_latest(snap("shared", "s")) for _ in range(4)),
        )
        assert await stored_versions(repo.engine, "shared") == list(range(1, 9))
        assert await stored_versions(repo.engine, "other") == [1, 2, 3, 4]

    async def test_retention_applies_to_batches(self, make_repo: MakeRepo):
        repo = await make_repo(retention=sr.RetentionPolicy(keep_last=2))
        for n in range(3):
            await repo.upsert_many([snap("a", str(n)), snap("b", str(n))])
        assert await stored_versions(repo.engine, "a") == [2, 3]
        assert await stored_versions(repo.engine, "b") == [2, 3]

    async def test_retention_prunes_a_users_earlier_versions_of_the_same_batch(
        self, make_repo: MakeRepo
    ):
        repo = await make_repo(retention=sr.RetentionPolicy(keep_last=1))
        await repo.upsert_many([snap("u", "1"), snap("u", "2"), snap("u", "3")])
        assert await stored_versions(repo.engine, "u") == [3]

    async def test_every_write_of_a_batch_enters_the_feed(self, repo: sr.SnapshotRepository[Doc]):
        await repo.upsert_many([snap("a", "1"), snap("b", "1"), snap("a", "2")])
        changes, _ = await read_feed(repo, expect=3)
        assert sorted(described(changes)) == [
            ("a", 1, "write"),
            ("a", 2, "write"),
            ("b", 1, "write"),
        ]
        a_entries = [c.version for c in changes if c.user_id == "a"]
        assert a_entries == [1, 2]  # a user's versions in order
