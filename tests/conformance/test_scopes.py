"""Tenants and namespaces: every key starts with the scope, so scopes never meet."""

from __future__ import annotations

import asyncio

import snapshot_repo as sr
from tests.support.conformance import MakeRepo, snap, stored_versions


class TestScopes:
    async def test_namespaces_keep_their_own_state_and_versions(self, make_repo: MakeRepo):
        carts = await make_repo(namespace="carts")
        prefs = await make_repo(namespace="prefs")
        await carts.upsert_latest(snap("u", "cart 1"))
        await carts.upsert_latest(snap("u", "cart 2"))
        await prefs.upsert_latest(snap("u", "pref 1"))
        cart, pref = await carts.get_latest("u"), await prefs.get_latest("u")
        assert cart is not None
        assert pref is not None
        assert (cart.version, cart.state.note, pref.version, pref.state.note) == (
            2,
            "cart 2",
            1,
            "pref 1",
        )
        assert [s.version for s in await prefs.get_history("u")] == [1]

    async def test_tenants_see_only_their_own_users(self, make_repo: MakeRepo):
        repo = await make_repo()
        acme, umbrella = repo.for_tenant("acme"), repo.for_tenant("umbrella")
        await acme.upsert_latest(snap("u", "acme"))
        await acme.upsert_latest(snap("v", "acme"))
        await umbrella.upsert_latest(snap("u", "umbrella"))
        assert await acme.list_users() == ["u", "v"]
        assert await umbrella.list_users() == ["u"]
        assert await repo.list_users() == []  # the untenanted scope is a scope of its own
        assert await acme.count_users() == 2
        assert set(await umbrella.get_latest_many(["u", "v"])) == {"u"}
        latest = await umbrella.get_latest("u")
        assert latest is not None
        assert latest.state.note == "umbrella"

    async def test_erasing_in_one_scope_leaves_the_others(self, make_repo: MakeRepo):
        repo = await make_repo()
        other_namespace = await make_repo(namespace="other")
        acme = repo.for_tenant("acme")
        for scoped in (repo, other_namespace, acme):
            await scoped.upsert_latest(snap("u", "x"))
            await scoped.upsert_latest(snap("u", "y"))
        assert await acme.delete("u") == 2
        assert await acme.get_latest("u") is None
        assert [s.version for s in await repo.get_history("u")] == [2, 1]
        assert [s.version for s in await other_namespace.get_history("u")] == [2, 1]
        assert await stored_versions(repo.engine, "u") == [1, 1, 2, 2]

    async def test_concurrent_writers_in_different_scopes_number_alone(self, make_repo: MakeRepo):
        repo = await make_repo()
        scopes = [repo, repo.for_tenant("t1"), (await make_repo(namespace="n2"))]
        await asyncio.gather(*(s.upsert_latest(snap("u", "w")) for s in scopes for _ in range(5)))
        for scoped in scopes:
            assert [s.version for s in await scoped.get_history("u")] == [5, 4, 3, 2, 1]

    async def test_an_idempotency_key_is_per_scope(self, make_repo: MakeRepo):
        repo = await make_repo()
        acme = repo.for_tenant("acme")
        first = await repo.upsert_latest(snap("u", "plain"), idempotency_key="k")
        other = await acme.upsert_latest(snap("u", "acme"), idempotency_key="k")
        assert (first.state.note, other.state.note) == ("plain", "acme")
        again = await acme.upsert_latest(snap("u", "retry"), idempotency_key="k")
        assert again == other

    async def test_batches_write_into_their_scope(self, make_repo: MakeRepo):
        repo = await make_repo()
        acme = repo.for_tenant("acme")
        await repo.upsert_latest(snap("u", "plain"))
        stored = await acme.upsert_many([snap("u", "a"), snap("v", "a")])
        assert [s.version for s in stored] == [1, 1]
        assert set(await acme.get_latest_many(["u", "v"])) == {"u", "v"}
        assert set(await repo.get_latest_many(["u", "v"])) == {"u"}


class TestSubjectAccess:
    async def test_everything_held_about_a_person_in_every_namespace_and_tenant(
        self, make_repo: MakeRepo
    ):
        """The counterpart of `erase_user`: one document (or its JSON Lines) with every
        scope holding the person, each with all its versions, newest first; others'
        data is in none of it; `tenant` narrows it to one tenant."""
        carts = await make_repo(namespace="carts")
        prefs = await make_repo(namespace="prefs")
        for repo in (carts, carts.for_tenant("acme"), prefs):
            await repo.upsert_latest(snap("ann", "first"))
            await repo.upsert_latest(snap("ann", "second"), actor="svc")
            await repo.upsert_latest(snap("bob", "not ann's"))
        document = await sr.export_subject(carts.engine, "ann")
        assert document["format"] == sr.subject_access.SUBJECT_EXPORT_FORMAT
        assert document["user_id"] == "ann"
        scopes = document["scopes"]
        assert isinstance(scopes, list)
        assert [(s["tenant"], s["namespace"]) for s in scopes] == [  # type: ignore[index]
            (None, "carts"),
            (None, "prefs"),
            ("acme", "carts"),
        ]
        for scope in scopes:
            versions = scope["versions"]  # type: ignore[index]
            assert [v["version"] for v in versions] == [2, 1]
            assert [v["state"]["note"] for v in versions] == ["second", "first"]
            assert versions[0]["actor"] == "svc"
        assert "not ann's" not in str(document)

        lines = [line async for line in sr.export_subject_lines(carts.engine, "ann")]
        assert all(line.endswith("\n") for line in lines)
        assert len(lines) == 1 + 3 * (1 + 2)  # header, then per scope its line and versions
        only_acme = await sr.export_subject(carts.engine, "ann", tenant="acme")
        assert [s["namespace"] for s in only_acme["scopes"]] == ["carts"]  # type: ignore[index,union-attr]
        nobody = await sr.export_subject(carts.engine, "nobody")
        assert nobody["scopes"] == []
