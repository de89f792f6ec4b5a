"""Batches: upsert_many is all-or-nothing and gapless; get_latest_many reads many users at once."""

from __future__ import annotations

import asyncio

import pytest

import snapshot_repo as sr
from tests.support.databases import Cart, refusing_history_insert

from .test_repository import snap, stored_rows


async def test_upsert_many_returns_versions_in_input_order(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("b", "existing"))
    stored = await repo.upsert_many(
        [snap("a", "a1"), snap("b", "b2"), snap("a", "a2"), snap("c", "c1"), snap("a", "a3")]
    )
    assert [(s.user_id, s.version, s.state.items[0]) for s in stored] == [
        ("a", 1, "a1"),
        ("b", 2, "b2"),
        ("a", 2, "a2"),
        ("c", 1, "c1"),
        ("a", 3, "a3"),
    ]
    assert len({s.created_at for s in stored}) == 1  # one transaction, one timestamp
    for user, last in (("a", 3), ("b", 2), ("c", 1)):
        assert await stored_rows(repo, user) == (last, list(range(1, last + 1)))
    history = await repo.get_history("a")
    assert [s.state.items[0] for s in history] == ["a3", "a2", "a1"]
    latest = await repo.get_latest("a")
    assert latest == history[0]
    assert latest == stored[-1]


async def test_upsert_many_with_one_bad_snapshot_writes_nothing(
    repo: sr.SnapshotRepository[Cart],
):
    bad = sr.Snapshot.model_construct(user_id="", state=Cart(), schema_version=1)
    with pytest.raises(sr.SnapshotValidationError, match="user_id"):
        await repo.upsert_many([snap("a", "1"), bad])
    with pytest.raises(sr.SnapshotValidationError, match="does not validate"):
        await repo.upsert_many([snap("a", "1"), sr.Snapshot(user_id="b", state={"items": 5})])
    assert await repo.get_latest_many(["a", "b"]) == {}


async def test_upsert_many_fault_mid_batch_rolls_back_everything(repo):
    """A database error on one row undoes the rows before it."""
    await repo.upsert_latest(snap("x", "before"))
    async with refusing_history_insert(repo.engine, "NEW.user_id = 'poison'", "injected"):
        with pytest.raises(sr.StorageError, match=r"upsert_many failed.*injected"):
            await repo.upsert_many([snap("x", "1"), snap("y", "1"), snap("poison", "1")])
    assert await stored_rows(repo, "x") == (1, [1])
    assert await stored_rows(repo, "y") == (0, [])


@pytest.mark.parametrize("size", [0, sr.MAX_BATCH_SIZE + 1])
async def test_batch_size_limits(repo: sr.SnapshotRepository[Cart], size: int):
    with pytest.raises(sr.SnapshotValidationError, match="1 to 10000"):
        await repo.upsert_many([snap(f"u{n}", "x") for n in range(size)])
    with pytest.raises(sr.SnapshotValidationError, match="1 to 10000"):
        await repo.get_latest_many([f"u{n}" for n in range(size)])


async def test_batch_arguments_must_be_sequences(repo: sr.SnapshotRepository[Cart]):
    with pytest.raises(sr.SnapshotValidationError):
        await repo.upsert_many(snap("a", "1"))  # type: ignore[arg-type]
    with pytest.raises(sr.SnapshotValidationError):
        await repo.get_latest_many("abc")
    with pytest.raises(sr.SnapshotValidationError, match="takes Snapshots"):
        await repo.upsert_many([{"user_id": "a"}])  # type: ignore[list-item]


async def test_large_batch_is_one_transaction(repo: sr.SnapshotRepository[Cart]):
    snapshots = [snap(f"user{n % 50}", str(n)) for n in range(2000)]
    stored = await repo.upsert_many(snapshots)
    assert [s.version for s in stored[:50]] == [1] * 50
    assert [s.version for s in stored[-50:]] == [40] * 50
    latest = await repo.get_latest_many([f"user{n}" for n in range(50)])
    assert {s.version for s in latest.values()} == {40}
    assert latest["user7"].state.items == ["1957"]


async def test_concurrent_batches_and_single_writes_stay_gapless(
    repo: sr.SnapshotRepository[Cart],
):
    users = [f"u{n}" for n in range(5)]

    async def batches() -> None:
        for round_ in range(10):
            await repo.upsert_many([snap(u, f"b{round_}") for u in reversed(users)] * 2)

    async def singles() -> None:
        for round_ in range(10):
            for user in users:
                await repo.upsert_latest(snap(user, f"s{round_}"))

    await asyncio.gather(batches(), batches(), singles())
    for user in users:
        assert await stored_rows(repo, user) == (50, list(range(1, 51)))


async def test_concurrent_batches_of_the_same_users_in_any_order_never_deadlock(
    repo: sr.SnapshotRepository[Cart],
):
    """Batches lock users' rows in one order (code point order of the ids), whatever the
    order they were given in and whether users repeat, so overlapping batches queue
    instead of deadlocking (Postgres aborts one of two batches locking in opposite orders)."""
    users = [f"u{n:03d}" for n in range(150)] + ["B", "a", "_", "\u00e9", "Z9", "z"]

    async def batches(order: list[str], repeat: int) -> None:
        for round_ in range(6):
            await repo.upsert_many([snap(u, f"r{round_}") for u in order] * repeat)

    await asyncio.gather(
        batches(users, 1), batches(users[::-1], 1), batches(users[::-1], 2), batches(users, 1)
    )
    for user in (users[0], "\u00e9", users[-1]):
        assert await stored_rows(repo, user) == (30, list(range(1, 31)))


async def test_get_latest_many_returns_only_existing_users(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("a", "1"))
    await repo.upsert_latest(snap("a", "2"))
    await repo.upsert_latest(snap("quote'\"", "q"))
    found = await repo.get_latest_many(["a", "missing", "a", "quote'\""])
    assert set(found) == {"a", "quote'\""}
    assert found["a"] == await repo.get_latest("a")
    assert found["a"].version == 2
    assert isinstance(found["a"].state, Cart)


async def test_get_latest_many_refuses_bad_ids(repo: sr.SnapshotRepository[Cart]):
    with pytest.raises(sr.SnapshotValidationError, match="user_id"):
        await repo.get_latest_many(["ok", "bad\x00"])
