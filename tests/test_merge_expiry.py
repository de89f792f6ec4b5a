"""Read-modify-write after expiry: an expired snapshot is absent, its versions go on.

An expired snapshot (written with `ttl=`) that is not reaped yet reads as
absent, but its row still holds the user's version: a write after expiry
continues the history (version N + 1), and compare-and-set compares against
that version. `merge` and `restore` must agree with both (issue #20: merge
raised `VersionConflictError: expected version 0, found 1` every time).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

import snapshot_repo as sr
from tests.support.databases import Backend, Cart

from .test_repository import snap, stored_rows


class Profile(BaseModel):
    name: str
    tags: list[str] = []
    settings: dict[str, Any] = {}


def profile(user_id: str, **fields: Any) -> sr.Snapshot[Profile]:
    return sr.Snapshot(user_id=user_id, state=Profile(**fields))


async def test_compare_and_set_sees_an_expired_snapshots_version(
    repo: sr.SnapshotRepository[Cart],
):
    """The rule merge follows: after expiry, 0 is not the version; the expired one is."""
    await repo.upsert_latest(snap("u", "a"))
    await repo.upsert_latest(snap("u", "b"), ttl=timedelta(0))
    assert await repo.get_latest("u") is None
    with pytest.raises(sr.VersionConflictError) as conflict:
        await repo.upsert_latest(snap("u", "c"), expected_version=0)
    assert (conflict.value.expected_version, conflict.value.actual_version) == (0, 2)
    stored = await repo.upsert_latest(snap("u", "c"), expected_version=2)
    assert stored.version == 3
    assert await repo.get_latest("u") == stored


async def test_merge_onto_an_expired_snapshot_starts_from_nothing(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Profile) as repo:
        await repo.upsert_latest(profile("u", name="Ann", settings={"a": 1}))
        await repo.upsert_latest(profile("u", name="Ann", tags=["old"]), ttl=timedelta(0))
        merged = await repo.merge("u", {"name": "Bo", "settings": {"b": 2}})
        # Onto an empty document, not onto the expired state; the next version.
        assert (merged.version, merged.state) == (3, Profile(name="Bo", settings={"b": 2}))
        assert await repo.get_latest("u") == merged  # a write without ttl: no longer expiring
        assert await repo.reap_expired() == 0
        assert [s.version for s in await repo.get_history("u")] == [3, 2, 1]


async def test_merge_onto_an_expired_snapshot_validates_the_patch_alone(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Profile) as repo:
        await repo.upsert_latest(profile("u", name="Ann"), ttl=timedelta(0))
        with pytest.raises(sr.SnapshotValidationError, match="name"):
            await repo.merge("u", {"tags": ["x"]})  # the expired name is not merged onto
        assert await repo.get_latest("u") is None
        assert await stored_rows(repo, "u") == (1, [1])


async def test_concurrent_merges_after_expiry_lose_no_update(
    json_repo: sr.SnapshotRepository[sr.JsonObject],
):
    await json_repo.upsert_latest(sr.Snapshot(user_id="u", state={"old": True}), ttl=timedelta(0))
    await asyncio.gather(*(json_repo.merge("u", {f"k{n}": n}) for n in range(8)))
    latest = await json_repo.get_latest("u")
    assert latest is not None
    # The first merge started from nothing; every later one from its predecessor.
    assert (latest.version, latest.state) == (9, {f"k{n}": n for n in range(8)})


async def test_restore_after_expiry_appends_the_old_state(repo: sr.SnapshotRepository[Cart]):
    """History is not filtered by expiry, so its versions can be restored, as a new one."""
    await repo.upsert_latest(snap("u", "good"))
    await repo.upsert_latest(snap("u", "bad"), ttl=timedelta(0))
    restored = await repo.restore("u", 1)
    assert (restored.version, restored.state.items) == (3, ["good"])
    assert await repo.get_latest("u") == restored
    assert await repo.reap_expired() == 0
