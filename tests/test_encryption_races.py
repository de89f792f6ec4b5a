"""Crypto-shredding under concurrency: an acknowledged write is always readable.

A write seals its payload under the user's data key; an erasure destroys
that key. Whatever order they run in, a write that returned a version must
read back, and a write that failed must leave no key behind.
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime

import sqlalchemy as sa

import snapshot_repo as sr
from snapshot_repo.tables import data_keys_table
from tests.support.databases import Backend, Cart

KEK = os.urandom(32)


def encrypting(url: str) -> sr.SnapshotRepository[Cart]:
    return sr.SnapshotRepository.from_url(
        url, Cart, encryption=sr.LocalKeyProvider({"k1": KEK}, active="k1")
    )


def snap(user_id: str, note: str) -> sr.Snapshot[Cart]:
    return sr.Snapshot(user_id=user_id, state=Cart(note=note))


async def data_keys_of(repo: sr.SnapshotRepository[Cart], user_id: str) -> int:
    async with repo.engine.connect() as conn:
        found = await conn.execute(
            sa.select(sa.func.count()).where(data_keys_table.c.user_id == user_id)
        )
        return int(found.scalar_one())


async def test_a_write_racing_an_erasure_is_never_acknowledged_unreadable(backend: Backend):
    """Two repositories (two engines, as two processes): one writes, one erases, at once.

    Before, most acknowledged writes committed under the key the erasure had
    just destroyed, and every later read raised `DecryptionError`.
    """
    async with encrypting(backend.url) as writer, encrypting(backend.url) as eraser:
        for round_ in range(40):
            user = f"racer-{round_:03d}"
            await writer.upsert_latest(snap(user, "before"))
            written, _erased = await asyncio.gather(
                writer.upsert_latest(snap(user, "during")), eraser.delete(user)
            )
            for reader in (writer, eraser):
                latest = await reader.get_latest(user)  # never DecryptionError
                history = await reader.get_history(user)
                if latest is not None:  # the write came after the erasure
                    assert latest.version == written.version
                    assert latest.state.note == "during"
                    assert [s.state.note for s in history] == ["during"]
                else:  # the erasure came after the write and erased it too
                    assert history == []
            # Written again afterwards, the user reads back through both repositories.
            again = await eraser.upsert_latest(snap(user, "after"))
            for reader in (writer, eraser):
                latest = await reader.get_latest(user)
                assert latest is not None
                assert (latest.version, latest.state.note) == (again.version, "after")


async def test_batches_racing_erasures_are_never_acknowledged_unreadable(backend: Backend):
    async with encrypting(backend.url) as writer, encrypting(backend.url) as eraser:
        users = [f"batch-{n}" for n in range(6)]
        for _round in range(15):
            await writer.upsert_many([snap(user, "before") for user in users])
            await asyncio.gather(
                writer.upsert_many([snap(user, "during") for user in users]),
                *(eraser.delete(user) for user in users[::2]),
            )
            found = await eraser.get_latest_many(users)  # never DecryptionError
            assert {s.state.note for s in found.values()} <= {"during"}
            assert set(users[1::2]) <= set(found)
            for user in users:
                await writer.get_history(user)


async def test_a_failed_encrypted_write_leaves_no_data_key(backend: Backend):
    """A compare-and-set conflict used to leave the new user's key (and id) behind."""
    async with encrypting(backend.url) as repo:
        try:
            await repo.upsert_latest(snap("never-written", "x"), expected_version=3)
        except sr.VersionConflictError:
            pass
        else:
            raise AssertionError("the compare-and-set should have failed")
        assert await data_keys_of(repo, "never-written") == 0
        assert await repo.upsert_latest(snap("never-written", "x"), expected_version=0)
        assert await data_keys_of(repo, "never-written") == 1


async def test_erasure_removes_a_data_key_left_without_rows(backend: Backend):
    """Keys an older release's failed writes left behind are erased with the person."""
    async with encrypting(backend.url) as repo:
        for user in ("orphan-delete", "orphan-erase-user"):
            async with repo.engine.begin() as conn:
                await conn.execute(
                    sa.insert(data_keys_table).values(
                        tenant="",
                        namespace="default",
                        user_id=user,
                        key_id="k1",
                        wrapped_key=os.urandom(60),
                        created_at=datetime.now(UTC),
                    )
                )
        assert await repo.delete("orphan-delete") == 0
        assert await data_keys_of(repo, "orphan-delete") == 0
        await sr.erase_user(backend.url, "orphan-erase-user")
        assert await data_keys_of(repo, "orphan-erase-user") == 0


async def test_reaping_keeps_the_key_of_a_user_it_does_not_erase(backend: Backend):
    """Only an erasure of the whole user drops a key without rows; reaping never does."""
    async with encrypting(backend.url) as repo:
        await repo.upsert_latest(snap("alive", "x"))
        assert await repo.reap_expired() == 0
        assert await data_keys_of(repo, "alive") == 1
        latest = await repo.get_latest("alive")
        assert latest is not None
        assert latest.state.note == "x"
