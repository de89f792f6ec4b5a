"""Namespaces (several typed states per user), tenants (confined views) and write metadata."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

import snapshot_repo as sr
from snapshot_repo import migrate
from tests.support.databases import Backend, Cart

from .test_repository import snap


class Preferences(BaseModel):
    theme: str = "light"


async def test_one_user_holds_several_typed_states(backend: Backend):
    async with (
        sr.SnapshotRepository.from_url(backend.url, Cart, namespace="cart") as carts,
        sr.SnapshotRepository.from_url(backend.url, Preferences, namespace="prefs") as prefs,
    ):
        await carts.upsert_latest(snap("u1", "apple"))
        await carts.upsert_latest(snap("u1", "pear"))
        stored = await prefs.upsert_latest(
            sr.Snapshot(user_id="u1", state=Preferences(theme="dark"))
        )
        assert stored.version == 1  # versions are per namespace
        cart = await carts.get_latest("u1")
        pref = await prefs.get_latest("u1")
        assert cart is not None
        assert pref is not None
        assert isinstance(cart.state, Cart)
        assert isinstance(pref.state, Preferences)
        assert (cart.version, pref.state.theme) == (2, "dark")
        assert [s.version for s in await prefs.get_history("u1")] == [1]
        assert await prefs.delete("u1") == 1
        assert await carts.get_latest("u1") == cart  # the other namespace is untouched
        assert carts.namespace == "cart"


async def test_default_namespace_is_default(repo: sr.SnapshotRepository[Cart]):
    assert repo.namespace == "default"
    assert repo.tenant is None


@pytest.mark.parametrize("name", ["", "x" * 256, "bad\nname", 5])
def test_bad_namespace_or_tenant_is_a_configuration_error(name):
    with pytest.raises(sr.ConfigurationError, match="namespace"):
        sr.SnapshotRepository.from_url("sqlite:///unused.db", namespace=name)
    repo = sr.SnapshotRepository.from_url("sqlite:///unused.db")
    with pytest.raises(sr.ConfigurationError, match="tenant"):
        repo.for_tenant(name)


async def test_tenant_views_cannot_cross_tenants(repo: sr.SnapshotRepository[Cart]):
    """Every method through one tenant's view, aimed at another tenant's user ids."""
    acme, globex = repo.for_tenant("acme"), repo.for_tenant("globex")
    await acme.upsert_latest(snap("shared-id", "acme-secret"))
    await acme.upsert_latest(snap("shared-id", "acme-secret-2"))
    await acme.upsert_latest(snap("acme-only", "x"))

    # reads
    assert await globex.get_latest("shared-id") is None
    assert await globex.get_history("shared-id") == []
    assert await globex.get_latest_many(["shared-id", "acme-only"]) == {}
    assert await repo.get_latest("shared-id") is None  # untenanted rows are another scope
    # writes land in globex's own scope
    written = await globex.upsert_latest(snap("shared-id", "globex"))
    assert written.version == 1
    batch = await globex.upsert_many([snap("acme-only", "g")])
    assert batch[0].version == 1
    with pytest.raises(sr.VersionConflictError):
        await globex.upsert_latest(snap("shared-id", "x"), expected_version=2)
    # deletes only erase globex's rows
    assert await globex.delete("shared-id") == 1
    assert await globex.delete("acme-only") == 1

    history = await acme.get_history("shared-id")
    assert [(s.version, s.state.items) for s in history] == [
        (2, ["acme-secret-2"]),
        (1, ["acme-secret"]),
    ]
    latest = await acme.get_latest_many(["shared-id", "acme-only"])
    assert {u: s.version for u, s in latest.items()} == {"shared-id": 2, "acme-only": 1}


async def test_idempotency_keys_are_per_tenant(repo: sr.SnapshotRepository[Cart]):
    a = await repo.for_tenant("a").upsert_latest(snap("u", "1"), idempotency_key="k")
    b = await repo.for_tenant("b").upsert_latest(snap("u", "2"), idempotency_key="k")
    assert (a.state.items, b.state.items) == (["1"], ["2"])


async def test_closing_a_tenant_view_leaves_the_repository_open(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as repo:
        async with repo.for_tenant("t") as view:
            await view.upsert_latest(snap("u", "1"))
            assert view.tenant == "t"
            assert "tenant='t'" in repr(view)
        assert await repo.for_tenant("t").get_latest("u") is not None


async def test_write_metadata_is_kept_with_each_version(repo: sr.SnapshotRepository[Cart]):
    first = await repo.upsert_latest(
        snap("u1", "a"),
        actor="checkout-service",
        reason="customer added an item",
        metadata={"request_id": "r-1", "ip_country": "NL", "n": [1, 2]},
    )
    await repo.upsert_latest(snap("u1", "b"))
    assert (first.actor, first.reason, first.metadata) == (
        "checkout-service",
        "customer added an item",
        {"request_id": "r-1", "ip_country": "NL", "n": [1, 2]},
    )
    newest, oldest = await repo.get_history("u1")
    assert oldest == first
    assert (newest.actor, newest.reason, newest.metadata) == (None, None, None)
    batch = await repo.upsert_many([snap("u2", "x"), snap("u3", "y")], actor="import", reason="r")
    assert {(s.actor, s.reason) for s in batch} == {("import", "r")}
    latest = await repo.get_latest("u3")
    assert latest is not None
    assert latest.actor == "import"


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("actor", ""),
        ("actor", "a" * 256),
        ("actor", "tab\there"),
        ("reason", "x" * 4097),
        ("reason", "nul\x00"),
        ("reason", 5),
        ("metadata", {"a": float("nan")}),
        ("metadata", ["not", "an", "object"]),
        ("metadata", {"big": "x" * 70_000}),
        ("metadata", {"s": {1, 2}}),
    ],
)
async def test_bad_write_metadata_is_refused(repo: sr.SnapshotRepository[Cart], argument, value):
    with pytest.raises(sr.SnapshotValidationError, match=argument):
        await repo.upsert_latest(snap("u1", "a"), **{argument: value})
    assert await repo.get_latest("u1") is None


async def test_upgrade_from_0002_keeps_rows_in_the_default_scope(backend: Backend):
    engine = sr.create_engine(backend.fresh_url())
    try:
        await migrate.upgrade(engine, "0002")
        async with sr.SnapshotRepository(engine, Cart) as old:
            # The 0002 schema has no scope columns; write it with plain SQL.
            async with engine.begin() as conn:
                # `{}`, and now (MariaDB's DATETIME(6) holds naive UTC).
                blob, now = {
                    "sqlite": ("X'7b7d'", "CURRENT_TIMESTAMP"),
                    "postgres": ("'\\x7b7d'::bytea", "CURRENT_TIMESTAMP"),
                    "mariadb": ("X'7b7d'", "UTC_TIMESTAMP(6)"),
                }[backend.name]
                for version in (1, 2):
                    await conn.exec_driver_sql(
                        "INSERT INTO snapshot_history (user_id, version, schema_version, "
                        f"payload, created_at, idempotency_key) VALUES ('old', {version}, 1, "
                        f"{blob}, {now}, 'key{version}')"
                    )
                await conn.exec_driver_sql(
                    "INSERT INTO snapshot_latest SELECT * FROM snapshot_history WHERE version = 2"
                )
            await old.migrate()
            assert await migrate.current_revision(engine) == migrate.head_revision()
            history = await old.get_history("old")
            assert [(s.version, s.idempotency_key, s.actor) for s in history] == [
                (2, "key2", None),
                (1, "key1", None),
            ]
            replay = await old.upsert_latest(snap("old", "again"), idempotency_key="key2")
            assert replay.version == 2
            assert (await old.upsert_latest(snap("old", "next"))).version == 3
            assert await old.for_tenant("t").get_latest("old") is None
        await migrate.check(engine)
    finally:
        await engine.dispose()


async def test_downgrade_below_scopes_refuses_to_merge_tenants(backend: Backend):
    engine = sr.create_engine(backend.fresh_url())
    try:
        await migrate.upgrade(engine)
        async with sr.SnapshotRepository(engine, Cart) as repo:
            await repo.for_tenant("acme").upsert_latest(snap("u", "1"))
        with pytest.raises(RuntimeError, match="outside the default tenant"):
            await migrate.downgrade(engine, "0002")
        assert await migrate.current_revision(engine) == migrate.head_revision()
        async with sr.SnapshotRepository(engine, Cart) as repo:
            assert await repo.for_tenant("acme").get_latest("u") is not None
    finally:
        await engine.dispose()
