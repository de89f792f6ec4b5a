"""Encryption: sealed at rest, opened on every read, and a write racing an erasure."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import func, select

import snapshot_repo as sr
from snapshot_repo.crypto import SEALED_PREFIX
from snapshot_repo.tables import data_keys_table
from tests.support.conformance import MakeRepo, data_key_of, snap, stored_payloads, stored_versions


def key_provider() -> sr.LocalKeyProvider:
    return sr.LocalKeyProvider({"k1": b"1" * 32}, active="k1")


class TestEncryption:
    async def test_states_are_sealed_at_rest_and_open_on_every_read(self, make_repo: MakeRepo):
        repo = await make_repo(encryption=key_provider())
        marker = f"SECRET-{uuid.uuid4().hex}"
        written = await repo.upsert_latest(snap("u", marker))
        await repo.upsert_latest(snap("u", marker, "more"))
        payloads = await stored_payloads(repo.engine, "u")
        assert len(payloads) == 3  # latest and two history rows
        assert all(p.startswith(SEALED_PREFIX) for p in payloads)
        assert not any(marker.encode() in p for p in payloads)
        latest = await repo.get_latest("u")
        assert latest is not None
        assert latest.state.items == ["more"]
        assert [s.state.note for s in await repo.get_history("u")] == [marker, marker]
        assert await repo.get_version("u", 1) == written
        assert (await repo.get_latest_many(["u"]))["u"].version == 2

    async def test_encrypted_batches_round_trip(self, make_repo: MakeRepo):
        repo = await make_repo(encryption=key_provider())
        await repo.upsert_latest(snap("a", "before"))
        await repo.upsert_many([snap("a", "1"), snap("b", "1"), snap("a", "2")])
        found = await repo.get_latest_many(["a", "b"])
        assert {u: (s.version, s.state.note) for u, s in found.items()} == {
            "a": (3, "2"),
            "b": (1, "1"),
        }
        assert await data_key_of(repo.engine, "b") is not None

    async def test_concurrent_first_writes_share_one_data_key(self, make_repo: MakeRepo):
        repo = await make_repo(encryption=key_provider())
        await asyncio.gather(*(repo.upsert_latest(snap("u", str(n))) for n in range(8)))
        async with repo.engine.connect() as conn:
            keys = await conn.scalar(select(func.count()).select_from(data_keys_table))
        assert keys == 1
        history = await repo.get_history("u")  # every version opens with that key
        assert [s.version for s in history] == list(range(8, 0, -1))

    async def test_another_repository_reads_what_one_wrote(self, make_repo: MakeRepo):
        writer = await make_repo(encryption=key_provider())
        reader = await make_repo(encryption=key_provider())
        await writer.upsert_latest(snap("u", "shared"))
        latest = await reader.get_latest("u")
        assert latest is not None
        assert latest.state.note == "shared"
        await writer.delete("u")
        await writer.upsert_latest(snap("u", "reborn"))  # a new key the reader has not seen
        latest = await reader.get_latest("u")
        assert latest is not None
        assert latest.state.note == "reborn"

    async def test_without_the_key_a_state_cannot_be_read(self, make_repo: MakeRepo):
        writer = await make_repo(encryption=key_provider())
        stranger = await make_repo(encryption=sr.LocalKeyProvider({"k1": b"2" * 32}, "k1"))
        await writer.upsert_latest(snap("u", "secret"))
        with pytest.raises(sr.SnapshotRepoError):
            await stranger.get_latest("u")

    async def test_writes_racing_erasures_never_outlive_their_key(self, make_repo: MakeRepo):
        """Whatever interleaving: each write lands under the key that exists at its
        commit, so every row left opens, and versions stay gapless."""
        repo = await make_repo(encryption=key_provider())
        await repo.upsert_latest(snap("u", "start"))

        async def writes() -> None:
            for n in range(6):
                await repo.upsert_latest(snap("u", f"w{n}"))

        async def erasures() -> None:
            for _ in range(3):
                await repo.delete("u")
                await asyncio.sleep(0)

        await asyncio.gather(writes(), writes(), erasures())
        versions = await stored_versions(repo.engine, "u")
        assert versions == list(range(1, len(versions) + 1))
        history = await repo.get_history("u")  # raises if a row was sealed under a lost key
        assert [s.version for s in history] == list(reversed(versions))
        latest = await repo.get_latest("u")
        if versions:
            assert latest is not None
            assert latest.version == versions[-1]
            assert await data_key_of(repo.engine, "u") is not None
        else:
            assert latest is None
