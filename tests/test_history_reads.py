"""One version, as of a moment, keyset paging, diffs, existence and listing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import jsonpatch
import pytest
from sqlalchemy import update

import snapshot_repo as sr
from snapshot_repo.tables import history_table
from tests.support.databases import Cart

from .test_repository import snap


async def test_get_version_returns_exactly_that_version(repo: sr.SnapshotRepository[Cart]):
    stored = [await repo.upsert_latest(snap("u1", str(n))) for n in range(5)]
    assert await repo.get_version("u1", 3) == stored[2]
    assert await repo.get_version("u1", 6) is None
    assert await repo.get_version("nobody", 1) is None
    with pytest.raises(sr.SnapshotValidationError, match="version"):
        await repo.get_version("u1", 0)


async def test_get_as_of_returns_the_state_at_a_moment(repo: sr.SnapshotRepository[Cart]):
    first = await repo.upsert_latest(snap("u1", "a"))
    second = await repo.upsert_latest(snap("u1", "b"))
    assert first.created_at is not None
    assert second.created_at is not None
    assert first.created_at < second.created_at  # a round trip apart, microsecond timestamps
    assert await repo.get_as_of("u1", first.created_at - timedelta(microseconds=1)) is None
    assert await repo.get_as_of("u1", first.created_at) == first  # exactly at the moment
    between = first.created_at + (second.created_at - first.created_at) / 2
    assert await repo.get_as_of("u1", between) == first
    assert await repo.get_as_of("u1", second.created_at) == second
    assert await repo.get_as_of("u1", datetime.now(UTC) + timedelta(days=1)) == second
    # another zone, same instant
    other_zone = second.created_at.astimezone(timezone(timedelta(hours=-5)))
    assert await repo.get_as_of("u1", other_zone) == second


async def test_get_as_of_after_both_of_two_racing_writes_is_the_latest(
    repo: sr.SnapshotRepository[Cart],
):
    """A write takes its timestamp before it waits for the user's row, so of two racing
    writes the one committed later (version 2) can carry the earlier time. Once both
    are in, the state is version 2, and the state as of any later moment must be it."""
    first = await repo.upsert_latest(snap("u1", "a"))
    second = await repo.upsert_latest(snap("u1", "b"))
    assert first.created_at is not None
    earlier = first.created_at - timedelta(milliseconds=1)
    async with repo.engine.begin() as conn:
        await conn.execute(
            update(history_table)
            .where(history_table.c.user_id == "u1", history_table.c.version == 2)
            .values(created_at=earlier)
        )
    now = datetime.now(UTC)
    found = await repo.get_as_of("u1", now)
    assert found is not None
    assert (found.version, found.state) == (second.version, second.state)
    assert found == await repo.get_version("u1", 2)


async def test_get_as_of_refuses_naive_datetimes(repo: sr.SnapshotRepository[Cart]):
    with pytest.raises(sr.SnapshotValidationError, match="timezone-aware"):
        await repo.get_as_of("u1", datetime(2026, 1, 1))


async def test_batch_versions_share_a_moment_and_the_highest_wins(
    repo: sr.SnapshotRepository[Cart],
):
    stored = await repo.upsert_many([snap("u1", "1"), snap("u1", "2"), snap("u1", "3")])
    at = stored[0].created_at
    assert at is not None
    found = await repo.get_as_of("u1", at)
    assert found is not None
    assert found.version == 3


async def test_keyset_pages_walk_the_whole_history(repo: sr.SnapshotRepository[Cart]):
    for n in range(23):
        await repo.upsert_latest(snap("u1", str(n)))
    seen: list[int] = []
    page = await repo.get_history("u1", limit=10)
    while page:
        seen.extend(s.version for s in page)
        page = await repo.get_history("u1", limit=10, before_version=page[-1].version)
    assert seen == list(range(23, 0, -1))
    with pytest.raises(sr.SnapshotValidationError, match="before_version"):
        await repo.get_history("u1", before_version=0)


async def test_diff_is_a_json_patch_between_two_versions(
    json_repo: sr.SnapshotRepository[sr.JsonObject],
):
    v1 = {"items": ["a", "b", "c"], "meta": {"x": 1, "gone": True}, "n": 1}
    v2 = {"items": ["a", "z"], "meta": {"x": 2, "new": [1]}, "n": 1.0, "added": None}
    await json_repo.upsert_latest(sr.Snapshot(user_id="u1", state=v1))
    await json_repo.upsert_latest(sr.Snapshot(user_id="u1", state=v2))
    forward = await json_repo.diff("u1", 1, 2)
    backward = await json_repo.diff("u1", 2, 1)
    assert jsonpatch.apply_patch(v1, forward) == v2
    assert jsonpatch.apply_patch(v2, backward) == v1
    assert {"op": "replace", "path": "/n", "value": 1.0} in forward
    assert await json_repo.diff("u1", 2, 2) == []
    with pytest.raises(sr.SnapshotValidationError, match="version 3"):
        await json_repo.diff("u1", 1, 3)


async def test_exists_list_and_count_users(repo: sr.SnapshotRepository[Cart]):
    assert await repo.count_users() == 0
    assert not await repo.exists("u1")
    for user in ("carol", "alice", "bob", "dave", "erin"):
        await repo.upsert_latest(snap(user, "x"))
    await repo.upsert_latest(snap("alice", "y"))
    assert await repo.exists("alice")
    assert not await repo.exists("zed")
    assert await repo.count_users() == 5
    assert await repo.list_users(limit=2) == ["alice", "bob"]
    assert await repo.list_users(after="bob", limit=2) == ["carol", "dave"]
    assert await repo.list_users(after="dave") == ["erin"]
    assert await repo.list_users(after="erin") == []
    await repo.delete("bob")
    assert await repo.count_users() == 4
    assert not await repo.exists("bob")


async def test_listing_is_confined_to_namespace_and_tenant(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("plain", "x"))
    tenant = repo.for_tenant("acme")
    await tenant.upsert_latest(snap("acme-user", "x"))
    assert await repo.list_users() == ["plain"]
    assert await tenant.list_users() == ["acme-user"]
    assert (await repo.count_users(), await tenant.count_users()) == (1, 1)
    assert not await tenant.exists("plain")
    assert await tenant.get_version("plain", 1) is None
    assert await tenant.get_as_of("plain", datetime.now(UTC)) is None
    with pytest.raises(sr.SnapshotValidationError):
        await tenant.diff("plain", 1, 1)


@pytest.mark.parametrize("limit", [0, 10_001, "5"])
async def test_list_users_limits(repo: sr.SnapshotRepository[Cart], limit):
    with pytest.raises(sr.SnapshotValidationError, match="limit"):
        await repo.list_users(limit=limit)
