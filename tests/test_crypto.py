"""Crypto-shredding: per-user data keys, erasure destroys them, rotation re-wraps them."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from sqlalchemy import select

import snapshot_repo as sr
from snapshot_repo.crypto import SEALED_PREFIX, open_payload
from snapshot_repo.tables import data_keys_table, history_table
from tests.support.databases import Backend, Cart

from .test_repository import snap, stored_rows

OLD, NEW = os.urandom(32), os.urandom(32)


def provider(active: str = "k1", **keys: bytes) -> sr.LocalKeyProvider:
    return sr.LocalKeyProvider(keys or {"k1": OLD}, active=active)


async def raw_payloads(repo: sr.SnapshotRepository[Cart], user_id: str) -> list[bytes]:
    """The payload bytes as stored, read with plain SQL (what a stolen copy would hold)."""
    async with repo.engine.connect() as conn:
        rows = await conn.execute(
            select(history_table.c.payload).where(history_table.c.user_id == user_id)
        )
        return [bytes(payload) for (payload,) in rows]


async def test_encrypted_states_round_trip_and_are_unreadable_at_rest(backend: Backend):
    marker = f"SECRET-{uuid.uuid4().hex}"
    async with sr.SnapshotRepository.from_url(backend.url, Cart, encryption=provider()) as repo:
        stored = await repo.upsert_latest(snap("u1", marker))
        await repo.upsert_latest(snap("u1", marker, "2"))
        assert await repo.get_latest("u1") is not None
        history = await repo.get_history("u1")
        assert [s.state.items for s in history] == [[marker, "2"], [marker]]
        assert await repo.get_version("u1", 1) == stored
        assert (await repo.get_latest_many(["u1"]))["u1"].version == 2
        assert await repo.diff("u1", 1, 2) == [{"op": "add", "path": "/items/-", "value": "2"}]
        export = await repo.export_user("u1")
        assert len(export["versions"]) == 2  # type: ignore[arg-type]
        payloads = await raw_payloads(repo, "u1")
        assert all(p.startswith(SEALED_PREFIX) for p in payloads)
        assert not any(marker.encode() in p for p in payloads)


async def test_erasure_destroys_the_key_so_copies_stay_unreadable(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Cart, encryption=provider()) as repo:
        await repo.upsert_latest(snap("victim", "secret"))
        await repo.upsert_latest(snap("other", "kept"))
        stolen = await raw_payloads(repo, "victim")  # e.g. a replica or an old backup
        async with repo.engine.connect() as conn:
            keys_before = (await conn.execute(select(data_keys_table.c.user_id))).scalars().all()
        assert sorted(keys_before) == ["other", "victim"]
        assert await repo.delete("victim") == 1
        async with repo.engine.connect() as conn:
            keys_after = (await conn.execute(select(data_keys_table.c.user_id))).scalars().all()
        assert keys_after == ["other"]
        # With direct SQL access and the key-encryption key, no key for the old bytes exists.
        with pytest.raises(sr.DecryptionError, match="no longer exists"):
            open_payload(None, stolen[0], b"\x00default\x00victim", "the stolen copy")
        assert (await repo.get_latest("other")) is not None
        # the user can start again with a fresh key
        again = await repo.upsert_latest(snap("victim", "new"))
        assert again.version == 1


async def test_reading_with_a_wrong_or_missing_key_is_a_typed_error(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Cart, encryption=provider()) as repo:
        await repo.upsert_latest(snap("u1", "x"))
    wrong = sr.LocalKeyProvider({"k1": NEW}, active="k1")  # same id, other key
    async with sr.SnapshotRepository.from_url(backend.url, Cart, encryption=wrong) as repo:
        with pytest.raises(sr.DecryptionError, match="does not open"):
            await repo.get_latest("u1")
    missing = sr.LocalKeyProvider({"other": NEW}, active="other")
    async with sr.SnapshotRepository.from_url(backend.url, Cart, encryption=missing) as repo:
        with pytest.raises(sr.DecryptionError, match="not available"):
            await repo.get_history("u1")
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as plain:
        with pytest.raises(sr.SnapshotValidationError):
            await plain.get_latest("u1")  # ciphertext is not a state


async def test_a_tampered_or_moved_ciphertext_does_not_open(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Cart, encryption=provider()) as repo:
        await repo.upsert_latest(snap("alice", "a"))
        await repo.upsert_latest(snap("bob", "b"))
        alice = (await raw_payloads(repo, "alice"))[0]
        async with repo.engine.begin() as conn:  # put alice's ciphertext into bob's row
            await conn.execute(
                history_table.update().where(history_table.c.user_id == "bob").values(payload=alice)
            )
        with pytest.raises(sr.DecryptionError):
            await repo.get_history("bob")


async def test_rotation_rewraps_keys_without_touching_payloads(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Cart, encryption=provider()) as repo:
        for user in ("a", "b", "c"):
            await repo.upsert_latest(snap(user, user))
        before = {u: await raw_payloads(repo, u) for u in ("a", "b", "c")}
    both = sr.LocalKeyProvider({"k1": OLD, "k2": NEW}, active="k2")
    async with sr.SnapshotRepository.from_url(backend.url, Cart, encryption=both) as repo:
        seen: list[int] = []
        assert await repo.rotate_wrapping_key(progress=seen.append) == 3
        assert seen == [3]
        assert await repo.rotate_wrapping_key() == 0
        assert {u: await raw_payloads(repo, u) for u in ("a", "b", "c")} == before
    only_new = sr.LocalKeyProvider({"k2": NEW}, active="k2")  # the old key retired
    async with sr.SnapshotRepository.from_url(backend.url, Cart, encryption=only_new) as repo:
        latest = await repo.get_latest("b")
        assert latest is not None
        assert latest.state.items == ["b"]


async def test_concurrent_first_writes_agree_on_one_key(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Cart, encryption=provider()) as repo:
        await asyncio.gather(*(repo.upsert_latest(snap("racy", str(n))) for n in range(8)))
        assert await stored_rows(repo, "racy") == (8, list(range(1, 9)))
        assert len(await repo.get_history("racy")) == 8  # every version opens


async def test_encryption_configuration_is_checked():
    with pytest.raises(sr.ConfigurationError):
        sr.LocalKeyProvider({"k": b"short"}, active="k")
    with pytest.raises(sr.ConfigurationError):
        sr.LocalKeyProvider({"k": OLD}, active="missing")
    with pytest.raises(sr.ConfigurationError, match="KeyProvider"):
        sr.SnapshotRepository.from_url("sqlite:///unused.db", encryption="not a provider")
    async with sr.SnapshotRepository.from_url("sqlite:///unused.db") as plain:
        with pytest.raises(sr.ConfigurationError, match="encryption"):
            await plain.rotate_wrapping_key()
