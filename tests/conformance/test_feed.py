"""The change feed (`changes_since`): commit order, cursors, pages, scopes, metadata."""

from __future__ import annotations

import asyncio

import pytest

import snapshot_repo as sr
from tests.support.conformance import Doc, MakeRepo, described, read_feed, snap


class TestChangeFeed:
    async def test_writes_are_listed_in_commit_order_with_their_metadata(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        first = await repo.upsert_latest(
            snap("a", "1"), actor="svc", reason="why", metadata={"k": 1}
        )
        await repo.upsert_latest(snap("b", "1"))
        await repo.upsert_latest(snap("a", "2"))
        changes, _ = await read_feed(repo, expect=3)
        assert described(changes) == [("a", 1, "write"), ("b", 1, "write"), ("a", 2, "write")]
        entry = changes[0]
        assert (entry.actor, entry.reason, entry.metadata) == ("svc", "why", {"k": 1})
        assert entry.created_at == first.created_at
        assert (entry.tenant, entry.namespace) == ("", "default")
        seqs = [change.seq for change in changes]
        assert None not in seqs
        assert len(set(seqs)) == 3

    async def test_a_cursor_resumes_after_the_last_change_read(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        await repo.upsert_latest(snap("a", "1"))
        seen, cursor = await read_feed(repo, expect=1)
        assert described(seen) == [("a", 1, "write")]
        await repo.upsert_latest(snap("b", "1"))
        await repo.upsert_latest(snap("a", "2"))
        later, cursor = await read_feed(repo, cursor, expect=2)
        assert described(later) == [("b", 1, "write"), ("a", 2, "write")]
        nothing = await repo.changes_since(cursor)
        assert (nothing.changes, nothing.cursor) == ([], cursor)

    async def test_small_pages_list_every_change_exactly_once(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        for n in range(7):
            await repo.upsert_latest(snap(f"u{n % 3}", str(n)))
        changes, _ = await read_feed(repo, limit=2, expect=7)
        assert len(changes) == 7
        assert [c.version for c in changes if c.user_id == "u0"] == [1, 2, 3]
        assert len({c.seq for c in changes}) == 7

    async def test_failed_compare_and_sets_leave_no_entry(self, repo: sr.SnapshotRepository[Doc]):
        await repo.upsert_latest(snap("a", "1"))
        with pytest.raises(sr.VersionConflictError):
            await repo.upsert_latest(snap("a", "lost"), expected_version=0)
        await repo.upsert_latest(snap("a", "x"), idempotency_key="k")
        await repo.upsert_latest(snap("a", "replay"), idempotency_key="k")
        changes, _ = await read_feed(repo, expect=2)
        assert described(changes) == [("a", 1, "write"), ("a", 2, "write")]

    async def test_retention_keeps_pruned_versions_in_the_feed_in_order(self, make_repo: MakeRepo):
        repo = await make_repo(retention=sr.RetentionPolicy(keep_last=1))
        for n in range(4):
            await repo.upsert_latest(snap("u", str(n)))
        await repo.upsert_latest(snap("v", "1"))
        changes, _ = await read_feed(repo, expect=5)
        assert described(changes) == [
            *(("u", version, "write") for version in range(1, 5)),
            ("v", 1, "write"),
        ]

    async def test_each_scope_has_its_own_feed(self, make_repo: MakeRepo):
        carts = await make_repo(namespace="carts")
        prefs = await make_repo(namespace="prefs")
        acme = carts.for_tenant("acme")
        await carts.upsert_latest(snap("u", "1"))
        await prefs.upsert_latest(snap("u", "1"))
        await acme.upsert_latest(snap("w", "1"))
        await carts.upsert_latest(snap("u", "2"))
        cart_changes, _ = await read_feed(carts, expect=2)
        assert described(cart_changes) == [("u", 1, "write"), ("u", 2, "write")]
        acme_changes, _ = await read_feed(acme, expect=1)
        assert described(acme_changes) == [("w", 1, "write")]
        assert acme_changes[0].tenant == "acme"
        pref_changes, _ = await read_feed(prefs, expect=1)
        assert [c.namespace for c in pref_changes] == ["prefs"]

    async def test_listeners_hear_each_write_and_erasure_once(self, make_repo: MakeRepo):
        """With `notify` (Postgres: NOTIFY from the writing transaction; SQLite: ignored,
        the process's own commits are published to its listeners)."""
        repo = await make_repo(notify=True)
        async with repo.changes() as stream:
            await repo.upsert_latest(snap("a", "1"))
            await repo.upsert_many([snap("b", "1"), snap("a", "2")])
            await repo.delete("a")
            heard = [await asyncio.wait_for(anext(stream), timeout=5) for _ in range(4)]
        assert sorted(described(heard)) == [
            ("", 2, "erase"),  # an erasure names no one without an erasure key
            ("a", 1, "write"),
            ("a", 2, "write"),
            ("b", 1, "write"),
        ]
