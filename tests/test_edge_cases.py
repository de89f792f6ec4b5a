"""Edge cases a review of the whole library found: each failed before its fix."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import func, select

import snapshot_repo as sr
from snapshot_repo.tables import data_keys_table, erasure_receipts_table
from tests.support.databases import Backend, Cart

from .test_repository import snap, stored_rows

KEY = b"an application secret of 32 bytes"


async def test_a_write_after_another_repository_erased_the_user_stays_readable(backend: Backend):
    provider = sr.LocalKeyProvider({"k1": os.urandom(32)}, active="k1")
    async with (
        sr.SnapshotRepository.from_url(backend.url, Cart, encryption=provider) as one,
        sr.SnapshotRepository.from_url(backend.url, Cart, encryption=provider) as two,
    ):
        await one.upsert_latest(snap("alice", "a"))  # `one` has alice's key cached now
        await two.delete("alice")  # destroys that key
        await one.upsert_latest(snap("alice", "b"))  # must not seal under the destroyed key
        latest = await two.get_latest("alice")
        assert latest is not None
        assert latest.state.items == ["b"]


async def test_erase_user_writes_receipts_and_destroys_data_keys(backend: Backend):
    provider = sr.LocalKeyProvider({"k1": os.urandom(32)}, active="k1")
    options: dict[str, Any] = {"encryption": provider, "erasure_key": KEY}
    async with sr.SnapshotRepository.from_url(backend.url, Cart, namespace="a", **options) as a:
        await a.upsert_latest(snap("person", "x"))
        await a.upsert_latest(snap("person", "y"))
        assert await sr.erase_user(backend.url, "person", erasure_key=KEY) == 2
        async with a.engine.connect() as conn:
            keys = (await conn.execute(select(func.count()).select_from(data_keys_table))).scalar()
            receipts = (await conn.execute(select(erasure_receipts_table.c.cause))).scalars().all()
        assert keys == 0
        assert receipts == ["erase"]
        receipt = await a.erasure_receipt("person")
        assert receipt is not None
        assert receipt.versions_erased == 2


async def test_purge_all_erases_expired_users_too(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("expired", "x"), ttl=timedelta(0))
    await repo.upsert_latest(snap("alive", "x"))
    assert await repo.purge_all(confirm="default") == 2
    assert await stored_rows(repo, "expired") == (0, [])


async def test_upsert_many_honours_the_retention_policy(backend: Backend):
    policy = sr.RetentionPolicy(keep_last=2)
    async with sr.SnapshotRepository.from_url(backend.url, Cart, retention=policy) as repo:
        for n in range(4):
            await repo.upsert_many([snap("u", str(n)), snap("v", str(n))])
        assert await stored_rows(repo, "u") == (4, [3, 4])
        assert await stored_rows(repo, "v") == (4, [3, 4])
        await repo.upsert_many([snap("u", "a"), snap("u", "b"), snap("u", "c")])
        latest, history = await stored_rows(repo, "u")
        # Older versions go; a batch may keep its own extra versions until the next
        # write on Postgres, whose one statement cannot see the rows it appends.
        assert (latest, history[-2:]) == (7, [6, 7])
        assert min(history) >= 5


async def test_subscribing_to_an_unreachable_database_is_a_storage_error():
    async with sr.SnapshotRepository.from_url(
        "postgresql+asyncpg://postgres@127.0.0.1:1/x",
        settings=sr.EngineSettings(connect_timeout=1),
    ) as repo:
        with pytest.raises(sr.StorageError, match="subscribe"):
            await repo.subscribe(lambda change: None)


class Profile(BaseModel):
    emails: dict[str, int]


async def test_validation_errors_do_not_echo_keys_from_the_state(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Profile) as repo:
        bad = sr.Snapshot.model_construct(
            user_id="u", state={"emails": {"jane.doe@example.com": "not a number"}}
        )
        with pytest.raises(sr.SnapshotValidationError) as caught:
            await repo.upsert_latest(bad)
    message = str(caught.value)
    assert "jane.doe" not in message
    assert "emails" in message  # the model's own field names still say where


async def test_no_change_hub_is_made_when_nobody_listens(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as repo:
        await repo.upsert_latest(snap("u", "x"))
        await repo.delete("u")
        assert not hasattr(repo.engine.sync_engine, "_snapshot_repo_change_hub")
        async with repo.changes():
            assert hasattr(repo.engine.sync_engine, "_snapshot_repo_change_hub")
