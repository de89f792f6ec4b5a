"""Reads: latest, many at once, history and its pages, single versions, listing, expiry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

import snapshot_repo as sr
from tests.support.conformance import Doc, MakeRepo, snap


class TestReads:
    async def test_an_unknown_user_has_no_latest_and_no_history(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        assert await repo.get_latest("nobody") is None
        assert await repo.get_history("nobody") == []
        assert await repo.get_version("nobody", 1) is None
        assert not await repo.exists("nobody")

    async def test_latest_many_returns_the_live_users_it_was_asked_for(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        await repo.upsert_latest(snap("a", "1"))
        await repo.upsert_latest(snap("a", "2"))
        await repo.upsert_latest(snap("b", "1"))
        await repo.upsert_latest(snap("expired", "1"), ttl=timedelta(0))
        await repo.upsert_latest(snap("not-asked", "1"))
        found = await repo.get_latest_many(["a", "b", "a", "expired", "missing"])
        assert {u: (s.version, s.state.note) for u, s in found.items()} == {
            "a": (2, "2"),
            "b": (1, "1"),
        }

    async def test_history_is_newest_first_limited_and_paged(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        for n in range(1, 8):
            await repo.upsert_latest(snap("u", f"n{n}"))
        assert [s.version for s in await repo.get_history("u", limit=3)] == [7, 6, 5]
        page = await repo.get_history("u", limit=3, before_version=5)
        assert [(s.version, s.state.note) for s in page] == [(4, "n4"), (3, "n3"), (2, "n2")]
        assert [s.version for s in await repo.get_history("u", before_version=2)] == [1]

    async def test_every_read_path_returns_the_same_stored_snapshot(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        written = await repo.upsert_latest(
            snap("u", "note", "x", "y"), actor="me", reason="why", metadata={"k": [1, 2]}
        )
        assert await repo.get_latest("u") == written
        assert (await repo.get_latest_many(["u"]))["u"] == written
        assert await repo.get_history("u") == [written]
        assert await repo.get_version("u", 1) == written  # through the backend's `fetch`
        assert await repo.get_as_of("u", datetime.now(UTC)) == written
        assert written.created_at.utcoffset() == timedelta(0)

    async def test_a_version_as_of_a_moment(self, repo: sr.SnapshotRepository[Doc]):
        first = await repo.upsert_latest(snap("u", "1"))
        second = await repo.upsert_latest(snap("u", "2"))
        assert await repo.get_as_of("u", first.created_at) == first
        assert await repo.get_as_of("u", second.created_at + timedelta(seconds=1)) == second
        assert await repo.get_as_of("u", first.created_at - timedelta(seconds=1)) is None

    async def test_listing_and_counting_skip_expired_users(self, repo: sr.SnapshotRepository[Doc]):
        for user in ("c", "a", "b"):
            await repo.upsert_latest(snap(user))
        await repo.upsert_latest(snap("d"), ttl=timedelta(0))
        assert await repo.list_users() == ["a", "b", "c"]
        assert await repo.list_users(after="a", limit=1) == ["b"]
        assert await repo.count_users() == 3
        assert await repo.exists("a")
        assert not await repo.exists("d")

    async def test_an_expired_snapshot_keeps_its_history(self, repo: sr.SnapshotRepository[Doc]):
        await repo.upsert_latest(snap("u", "1"))
        await repo.upsert_latest(snap("u", "2"), ttl=timedelta(0))
        assert await repo.get_latest("u") is None
        assert [s.version for s in await repo.get_history("u")] == [2, 1]

    async def test_plain_json_states_round_trip(self, make_repo: MakeRepo):
        repo = await make_repo(state_type=None)
        state = {"nested": {"list": [1, 2.5, "three", None, True]}, "unicode": "żółw ✓"}
        await repo.upsert_latest(sr.Snapshot(user_id="u", state=state))
        latest = await repo.get_latest("u")
        assert latest is not None
        assert latest.state == state

    async def test_a_state_merged_onto_the_latest(self, make_repo: MakeRepo):
        repo = await make_repo(state_type=None)
        await repo.upsert_latest(sr.Snapshot(user_id="u", state={"a": 1, "b": 2}))
        merged = await repo.merge("u", {"b": 3, "c": 4})
        assert (merged.version, merged.state) == (2, {"a": 1, "b": 3, "c": 4})

    async def test_a_bad_limit_is_refused_before_any_read(self, repo: sr.SnapshotRepository[Doc]):
        with pytest.raises(sr.SnapshotValidationError):
            await repo.get_history("u", limit=0)


class TestHistoryMemoryBounds:
    async def test_a_byte_budget_ends_the_page_in_the_database(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        """Versions of 1, 2, ... 10 KB: with `max_bytes`, the page ends after the version
        that reaches the budget (sizes as stored), and the newest is always returned."""
        for n in range(1, 11):
            await repo.upsert_latest(snap("u", "x" * (1000 * n)))
        sizes = {  # stored size of each version, newest first
            s.version: len(s.state.model_dump_json()) for s in await repo.get_history("u")
        }
        budget = sizes[10] + sizes[9] + 1  # reached by version 8
        page = await repo.get_history("u", max_bytes=budget)
        assert [s.version for s in page] == [10, 9, 8]
        assert [s.version for s in await repo.get_history("u", max_bytes=1)] == [10]
        tail = await repo.get_history("u", before_version=8, max_bytes=sizes[7])
        assert [s.version for s in tail] == [7]
        assert [s.version for s in await repo.get_history("u", limit=2, max_bytes=10**9)] == [
            10,
            9,
        ]

    async def test_iter_history_streams_every_version_page_by_page(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        for n in range(1, 26):
            await repo.upsert_latest(snap("u", str(n) * 200))
        streamed = [s async for s in repo.iter_history("u", page_size=7, max_bytes=1000)]
        assert [s.version for s in streamed] == list(range(25, 0, -1))
        assert streamed == await repo.get_history("u", limit=100)
        assert [s async for s in repo.iter_history("nobody")] == []

    @pytest.mark.parametrize("max_bytes", [0, -1, 1.5, True])
    async def test_a_bad_byte_budget_is_refused(
        self, repo: sr.SnapshotRepository[Doc], max_bytes: object
    ):
        with pytest.raises(sr.SnapshotValidationError, match="max_bytes"):
            await repo.get_history("u", max_bytes=max_bytes)  # type: ignore[arg-type]


class TestHistoryIteration:
    async def test_iter_history_skips_invalid_versions_without_stopping(self, make_repo: MakeRepo):
        """Pages of one version, some of which no longer validate: the iteration goes on
        past them (it pages by the versions read, not by the ones returned)."""
        plain = await make_repo(state_type=None)
        for n in range(1, 7):
            state = {"items": ["ok"], "note": str(n)} if n % 3 else {"items": "not a list"}
            await plain.upsert_latest(sr.Snapshot(user_id="u", state=state))
        typed = await make_repo()
        kept = [s.version async for s in typed.iter_history("u", page_size=1, skip_invalid=True)]
        assert kept == [5, 4, 2, 1]
        with pytest.raises(sr.SnapshotValidationError):
            [s async for s in typed.iter_history("u", page_size=1)]
