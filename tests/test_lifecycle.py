"""Restore, merge, purge, payload schema upgrades and erasing a person everywhere."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel

import snapshot_repo as sr
from tests.support.databases import Backend, Cart

from .test_repository import snap, stored_rows

# --- restore -----------------------------------------------------------------


async def test_restore_appends_the_old_state_as_a_new_version(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("u1", "good"))
    await repo.upsert_latest(snap("u1", "bad"))
    restored = await repo.restore("u1", 1, actor="support")
    assert (restored.version, restored.state.items) == (3, ["good"])
    assert restored.metadata == {"restored_from": 1}
    assert (restored.actor, restored.reason) == ("support", "restore of version 1")
    history = await repo.get_history("u1")
    assert [(s.version, s.state.items) for s in history] == [
        (3, ["good"]),
        (2, ["bad"]),
        (1, ["good"]),
    ]


async def test_restore_of_a_missing_version_is_refused(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("u1", "a"))
    with pytest.raises(sr.SnapshotValidationError, match="version 5"):
        await repo.restore("u1", 5)
    assert await stored_rows(repo, "u1") == (1, [1])


# --- merge -------------------------------------------------------------------


class Profile(BaseModel):
    name: str
    tags: list[str] = []
    settings: dict[str, Any] = {}


async def test_merge_applies_an_rfc7386_patch(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Profile) as repo:
        await repo.upsert_latest(
            sr.Snapshot(user_id="u1", state=Profile(name="Ann", settings={"a": 1, "b": 2}))
        )
        merged = await repo.merge("u1", {"tags": ["vip"], "settings": {"b": None, "c": 3}})
        assert merged.version == 2
        assert merged.state == Profile(name="Ann", tags=["vip"], settings={"a": 1, "c": 3})
        latest = await repo.get_latest("u1")
        assert latest == merged


async def test_merge_into_a_missing_user_creates_it_only_if_valid(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Profile) as repo:
        with pytest.raises(sr.SnapshotValidationError, match="name"):
            await repo.merge("new", {"tags": ["x"]})  # Profile needs a name
        assert await repo.get_latest("new") is None
        created = await repo.merge("new", {"name": "Bo"})
        assert (created.version, created.state.name) == (1, "Bo")


async def test_merge_that_breaks_the_model_writes_nothing(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Profile) as repo:
        await repo.upsert_latest(sr.Snapshot(user_id="u1", state=Profile(name="Ann")))
        with pytest.raises(sr.SnapshotValidationError):
            await repo.merge("u1", {"name": None})  # removes a required field
        with pytest.raises(sr.SnapshotValidationError, match="JSON object"):
            await repo.merge("u1", ["not", "a", "dict"])  # type: ignore[arg-type]
        latest = await repo.get_latest("u1")
        assert latest is not None
        assert latest.version == 1


async def test_concurrent_merges_lose_no_update(json_repo: sr.SnapshotRepository[sr.JsonObject]):
    await json_repo.upsert_latest(sr.Snapshot(user_id="u1", state={}))
    await asyncio.gather(*(json_repo.merge("u1", {f"k{n}": n}) for n in range(12)))
    latest = await json_repo.get_latest("u1")
    assert latest is not None
    assert latest.state == {f"k{n}": n for n in range(12)}
    assert latest.version == 13


# --- purge -------------------------------------------------------------------


async def test_purge_all_needs_the_scope_named(repo: sr.SnapshotRepository[Cart]):
    for user in ("a", "b", "c"):
        await repo.upsert_latest(snap(user, "x"))
    tenant = repo.for_tenant("acme")
    await tenant.upsert_latest(snap("a", "kept"))
    with pytest.raises(sr.SnapshotValidationError, match="confirm='default'"):
        await repo.purge_all(confirm="yes")
    assert await repo.count_users() == 3
    assert await repo.purge_all(confirm="default") == 3
    assert await repo.count_users() == 0
    assert await tenant.count_users() == 1
    assert tenant.purge_label == "acme/default"
    assert await tenant.purge_all(confirm="acme/default") == 1


# --- payload schema upgrades ------------------------------------------------------


class CartV3(BaseModel):
    lines: list[dict[str, Any]]
    currency: str


def v1_to_v2(doc: dict[str, Any]) -> dict[str, Any]:
    return {"lines": [{"sku": sku} for sku in doc.get("items", [])]}


def v2_to_v3(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "currency": "EUR"}


async def test_old_rows_are_upgraded_when_read(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as v1:
        await v1.upsert_latest(snap("u1", "apple", "pear"))
    upgrades = {1: v1_to_v2, 2: v2_to_v3}
    async with sr.SnapshotRepository.from_url(
        backend.url, CartV3, schema_version=3, upgraders=upgrades
    ) as v3:
        latest = await v3.get_latest("u1")
        assert latest is not None
        assert latest.state == CartV3(lines=[{"sku": "apple"}, {"sku": "pear"}], currency="EUR")
        assert latest.schema_version == 1  # as stored; upgraded in memory
        written = await v3.upsert_latest(
            sr.Snapshot(user_id="u1", state=CartV3(lines=[], currency="USD"))
        )
        assert written.schema_version == 3
        assert [s.schema_version for s in await v3.get_history("u1")] == [3, 1]


async def test_upgrade_payloads_rewrites_old_rows_in_batches(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as v1:
        for n in range(7):
            await v1.upsert_latest(snap(f"u{n % 3}", str(n)))
        await v1.for_tenant("t").upsert_latest(snap("tenant-user", "x"))
    seen: list[int] = []
    async with sr.SnapshotRepository.from_url(
        backend.url, CartV3, schema_version=3, upgraders={1: v1_to_v2, 2: v2_to_v3}
    ) as v3:
        rewritten = await v3.upgrade_payloads(batch_size=3, progress=seen.append)
        # 8 history rows + 4 latest rows, every tenant of the namespace
        assert rewritten == 12
        assert seen == sorted(seen)
        assert seen[-1] == 12
        assert await v3.upgrade_payloads() == 0  # nothing left: the job can be rerun
        history = await v3.get_history("u0")
        assert {s.schema_version for s in history} == {3}
        assert [s.version for s in history] == [3, 2, 1]  # versions kept
        tenant_latest = await v3.for_tenant("t").get_latest("tenant-user")
        assert tenant_latest is not None
        assert tenant_latest.schema_version == 3
    async with sr.SnapshotRepository.from_url(backend.url, schema_version=3) as raw:
        stored = await raw.get_latest("u0")
        assert stored is not None
        assert stored.state == {"lines": [{"sku": "6"}], "currency": "EUR"}


async def test_rows_newer_than_the_code_are_a_typed_error(backend: Backend):
    async with sr.SnapshotRepository.from_url(
        backend.url, CartV3, schema_version=3, upgraders={1: v1_to_v2, 2: v2_to_v3}
    ) as new_code:
        await new_code.upsert_latest(
            sr.Snapshot(user_id="u1", state=CartV3(lines=[], currency="X"))
        )
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as old_code:
        with pytest.raises(sr.SchemaVersionError, match="newer than this code"):
            await old_code.get_latest("u1")
        with pytest.raises(sr.SchemaVersionError, match="newer than this repository"):
            await old_code.upsert_latest(snap("u2", "x", schema_version=2))
        assert await old_code.get_latest("u2") is None


async def test_a_failing_upgrader_is_a_typed_error(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as v1:
        await v1.upsert_latest(snap("u1", "x"))

    def broken(_doc: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("oops")

    async with sr.SnapshotRepository.from_url(
        backend.url, Cart, schema_version=2, upgraders={1: broken}
    ) as v2:
        with pytest.raises(sr.SchemaVersionError, match="upgrader 1 -> 2 failed"):
            await v2.get_latest("u1")


@pytest.mark.parametrize(
    ("schema_version", "upgraders"),
    [(0, {}), (3, {1: v1_to_v2}), (2, {2: v1_to_v2}), (2, {1: "not callable"}), (True, {})],
)
def test_inconsistent_upgrade_configuration_is_refused(schema_version, upgraders):
    with pytest.raises(sr.ConfigurationError):
        sr.SnapshotRepository.from_url(
            "sqlite:///unused.db", schema_version=schema_version, upgraders=upgraders
        )


# --- erasing a person everywhere -----------------------------------------------------


async def test_erase_user_erases_every_namespace_and_tenant(backend: Backend):
    async with (
        sr.SnapshotRepository.from_url(backend.url, namespace="cart") as carts,
        sr.SnapshotRepository.from_url(backend.url, namespace="prefs") as prefs,
    ):
        await carts.upsert_latest(sr.Snapshot(user_id="person", state={"a": 1}))
        await carts.upsert_latest(sr.Snapshot(user_id="person", state={"a": 2}))
        await prefs.upsert_latest(sr.Snapshot(user_id="person", state={"b": 1}))
        await prefs.for_tenant("acme").upsert_latest(sr.Snapshot(user_id="person", state={}))
        await carts.upsert_latest(sr.Snapshot(user_id="someone-else", state={}))

        assert await sr.erase_user(backend.url, "person", tenant="acme") == 1
        assert await prefs.get_latest("person") is not None
        assert await sr.erase_user(carts.engine, "person") == 3
        for repo in (carts, prefs, prefs.for_tenant("acme")):
            assert await repo.get_latest("person") is None
            assert await repo.get_history("person") == []
        assert await carts.get_latest("someone-else") is not None
        assert await sr.erase_user(backend.url, "person") == 0
        assert await carts.count_users() == 1  # the caller's engine is still open


async def test_erase_user_refuses_bad_input():
    with pytest.raises(sr.SnapshotValidationError):
        await sr.erase_user("sqlite:///unused.db", "")
    with pytest.raises(sr.ConfigurationError):
        await sr.erase_user("sqlite:///unused.db", "u", tenant="")
