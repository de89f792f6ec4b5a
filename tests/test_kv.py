"""The key/value contract (seeds 000/001), run on SQLite, on Postgres and in memory.

Every test taking `store` or `open_store` runs three times: on a
`KeyValueStore` over a migrated SQLite file, over a migrated Postgres
database, and on an `InMemoryStore`. `open_store()` opens another handle on
the same data: another `KeyValueStore` on the same URL, or a clone of the
same `InMemoryStore`. The tests at the end are about `KeyValueStore` itself
(ownership, namespaces, the tables it shares) and run on both databases.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

import snapshot_repo as sr
import snapshot_repo.kv as kv
from snapshot_repo.kv import DEFAULT_KV_NAMESPACE, InMemoryStore, KeyValue, KeyValueStore
from tests.support.databases import Backend, Cart, sqlite_backend

OpenStore = Callable[[], KeyValue]

EVERYTHING_JSON: sr.JsonObject = {
    "nested": {"list": [1, 2.5, None, True, False, "x", [], {}], "deep": {"a": {"b": [[[]]]}}},
    "unicode": "héllo ✓ 日本語 🎉 \u200b",
    "nul": "before\x00after",
    "\x00 in a key": "controls \t\n\r\x1f\x7f",
    "quotes": "\"\\/'",
    "empty": "",
    "big": 2**62,
    "huge": 10**30,
    "negative": -(2**63),
    "float": 0.1,
    "tiny": 5e-324,
    "negative zero": -0.0,
    "true": True,
    "one": 1,
    "one point zero": 1.0,
}

BAD_KEYS = [
    pytest.param("", id="empty"),
    pytest.param("k" * 256, id="256-chars"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("line\nbreak", id="newline"),
    pytest.param("\ud800", id="lone-surrogate"),
    pytest.param(7, id="int"),
    pytest.param(None, id="none"),
    pytest.param(b"bytes", id="bytes"),
]

BAD_VALUES = [
    pytest.param(["a", "list"], id="list"),
    pytest.param("text", id="str"),
    pytest.param(None, id="none"),
    pytest.param(42, id="int"),
    pytest.param({"a": float("nan")}, id="nan"),
    pytest.param({"a": [1.0, float("inf")]}, id="infinity"),
    pytest.param({"a": {1, 2}}, id="set"),
    pytest.param({"a": (1, 2)}, id="tuple"),
    pytest.param({"a": b"x"}, id="bytes"),
    pytest.param({1: "int key"}, id="int-key"),
    pytest.param({"a": "\ud800"}, id="lone-surrogate"),
    pytest.param({"a": "x" * (1024 * 1024)}, id="over-1-MiB"),
]


@pytest.fixture(params=["sqlite", "postgres", "mariadb", "memory"])
def kv_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """Where the stores of a test keep their data: a migrated, empty database, or memory (None)."""
    if request.param == "sqlite":
        return sqlite_backend(tmp_path, request.getfixturevalue("sqlite_template")).url
    if request.param in ("postgres", "mariadb"):
        url: str = request.getfixturevalue(f"{request.param}_url")
        return url
    return None


@pytest.fixture
async def open_store(kv_url: str | None) -> AsyncIterator[OpenStore]:
    """Opens handles on one set of data; every handle is closed after the test."""
    memory = InMemoryStore()
    opened: list[KeyValue] = []

    def open_handle() -> KeyValue:
        handle = memory.clone() if kv_url is None else KeyValueStore.from_url(kv_url)
        opened.append(handle)
        return handle

    yield open_handle
    for handle in opened:
        await handle.close()


@pytest.fixture
def store(open_store: OpenStore) -> KeyValue:
    """The store under test."""
    return open_store()


async def all_keys(store: KeyValue) -> list[str]:
    return [key async for key in store.iter_keys()]


async def refused(operation: Coroutine[Any, Any, Any]) -> None:
    with pytest.raises(sr.SnapshotValidationError):
        await operation


# --- the contract -----------------------------------------------------------


def test_store_satisfies_the_protocol(store: KeyValue):
    assert isinstance(store, KeyValue)


async def test_load_of_a_missing_key_is_none(store: KeyValue):
    assert await store.load("nobody") is None
    assert await store.history("nobody") == []
    assert await all_keys(store) == []


async def test_save_then_load_round_trips_exactly(store: KeyValue):
    await store.save("k", EVERYTHING_JSON)
    loaded = await store.load("k")
    assert type(loaded) is dict
    assert loaded == EVERYTHING_JSON
    # repr shows what == hides: 1 vs 1.0 vs True, -0.0 vs 0.0, and key order.
    assert repr(loaded) == repr(EVERYTHING_JSON)
    assert repr(await store.history("k")) == repr([EVERYTHING_JSON])


async def test_empty_object_round_trips(store: KeyValue):
    await store.save("k", {})
    assert await store.load("k") == {}


async def test_save_overwrites_and_keeps_history(store: KeyValue):
    await store.save("k", {"n": 1})
    await store.save("k", {"n": 2})
    assert await store.load("k") == {"n": 2}
    assert await store.history("k") == [{"n": 2}, {"n": 1}]
    assert await all_keys(store) == ["k"]


async def test_history_is_newest_first_and_limited(store: KeyValue):
    for n in range(1, 6):
        await store.save("k", {"n": n})
    assert await store.history("k", limit=3) == [{"n": 5}, {"n": 4}, {"n": 3}]
    assert await store.history("k", limit=1) == [{"n": 5}]
    assert await store.history("k", limit=10_000) == [{"n": n} for n in range(5, 0, -1)]
    await refused(store.history("k", limit=0))
    await refused(store.history("k", limit=10_001))


async def test_keys_are_independent(store: KeyValue):
    await store.save("alice", {"who": "alice"})
    await store.save("bob", {"who": "bob"})
    assert await store.load("alice") == {"who": "alice"}
    assert await store.load("bob") == {"who": "bob"}
    assert await store.history("bob") == [{"who": "bob"}]


async def test_values_are_copies_both_ways(store: KeyValue):
    value: sr.JsonObject = {"items": ["a"], "nested": {"n": 1}}
    await store.save("k", value)
    value["items"].append("changed after save")  # type: ignore[union-attr]
    value["new"] = True
    loaded = await store.load("k")
    assert loaded == {"items": ["a"], "nested": {"n": 1}}
    loaded["items"].append("changed after load")  # type: ignore[union-attr]
    loaded["nested"]["n"] = 2  # type: ignore[index, call-overload]
    [from_history] = await store.history("k")
    from_history["items"].append("changed in history")  # type: ignore[union-attr]
    assert await store.load("k") == {"items": ["a"], "nested": {"n": 1}}
    assert await store.history("k") == [{"items": ["a"], "nested": {"n": 1}}]
    assert await store.load("k") is not await store.load("k")


async def test_delete_erases_the_value_and_its_history(store: KeyValue):
    assert await store.delete("k") is False
    await store.save("k", {"n": 1})
    await store.save("k", {"n": 2})
    await store.save("other", {"n": 0})
    assert await store.delete("k") is True
    assert await store.load("k") is None
    assert await store.history("k") == []
    assert await all_keys(store) == ["other"]
    assert await store.delete("k") is False
    await store.save("k", {"n": 3})
    assert await store.history("k") == [{"n": 3}]
    assert await store.load("other") == {"n": 0}


async def test_keys_lists_every_key_once(store: KeyValue, monkeypatch: pytest.MonkeyPatch):
    # Small pages, so the database stores page through the listing (and end
    # on an exact multiple of the page size on the way).
    monkeypatch.setattr(kv, "_KEYS_PAGE_SIZE", 2)
    for key in ["delta", "alpha", "charlie", "bravo"]:
        await store.save(key, {"key": key})
    await store.save("alpha", {"key": "alpha again"})
    assert await all_keys(store) == ["alpha", "bravo", "charlie", "delta"]
    await store.save("echo", {})
    assert await all_keys(store) == ["alpha", "bravo", "charlie", "delta", "echo"]


async def test_longest_and_unicode_keys_are_accepted(store: KeyValue):
    longest, unicode = "k" * 255, "bot/ÉTHUSDT/日本 🎉"
    await store.save(longest, {"n": 1})
    await store.save(unicode, {"n": 2})
    assert await store.load(longest) == {"n": 1}
    assert await store.load(unicode) == {"n": 2}
    assert sorted(await all_keys(store)) == sorted([longest, unicode])


@pytest.mark.parametrize("bad_key", BAD_KEYS)
async def test_bad_keys_are_refused_and_change_nothing(store: KeyValue, bad_key: Any):
    await store.save("good", {"n": 1})
    await refused(store.save(bad_key, {"n": 2}))
    await refused(store.load(bad_key))
    await refused(store.delete(bad_key))
    await refused(store.history(bad_key))
    assert await all_keys(store) == ["good"]
    assert await store.history("good") == [{"n": 1}]


@pytest.mark.parametrize("bad_value", BAD_VALUES)
async def test_bad_values_are_refused_and_change_nothing(store: KeyValue, bad_value: Any):
    await store.save("k", {"n": 1})
    await refused(store.save("k", bad_value))
    await refused(store.save("new", bad_value))
    assert await store.load("k") == {"n": 1}
    assert await store.history("k") == [{"n": 1}]
    assert await all_keys(store) == ["k"]


async def test_concurrent_saves_to_one_key_all_land(store: KeyValue):
    await asyncio.gather(*(store.save("k", {"n": n}) for n in range(20)))
    history = await store.history("k", limit=100)
    assert sorted(value["n"] for value in history) == list(range(20))  # type: ignore[type-var]
    assert await store.load("k") == history[0]


async def test_handles_on_the_same_data_see_each_others_writes(open_store: OpenStore):
    first, second = open_store(), open_store()
    await first.save("k", {"from": "first"})
    assert await second.load("k") == {"from": "first"}
    await second.save("k", {"from": "second"})
    assert await first.load("k") == {"from": "second"}
    assert await second.delete("k") is True
    assert await first.load("k") is None


async def test_flush_with_nothing_in_flight_returns(store: KeyValue):
    await store.flush()
    await store.save("k", {"n": 1})
    await store.flush()
    assert await store.load("k") == {"n": 1}


async def test_flush_waits_for_saves_in_flight(store: KeyValue):
    saves = [asyncio.create_task(store.save(f"k{n}", {"n": n})) for n in range(5)]
    await asyncio.sleep(0)  # the saves begin: the database stores now wait on I/O
    await store.flush()
    assert all(save.done() for save in saves)
    await asyncio.gather(*saves)
    assert await store.load("k4") == {"n": 4}


async def test_close_flushes_first(open_store: OpenStore, monkeypatch: pytest.MonkeyPatch):
    store = open_store()
    flushes = []
    flush = store.flush

    async def counting_flush() -> None:
        flushes.append(True)
        await flush()

    monkeypatch.setattr(store, "flush", counting_flush)
    save = asyncio.create_task(store.save("k", {"n": 1}))
    await asyncio.sleep(0)  # the save begins
    await store.close()
    assert flushes == [True]
    assert save.done()
    await save
    assert await open_store().load("k") == {"n": 1}


async def test_async_with_closes_and_the_data_stays(open_store: OpenStore):
    async with open_store() as store:
        await store.save("k", {"n": 1})
    assert await open_store().load("k") == {"n": 1}


# --- InMemoryStore ----------------------------------------------------------


async def test_in_memory_clones_share_state_and_new_stores_do_not():
    store = InMemoryStore()
    clone = store.clone()
    await store.save("k", {"n": 1})
    assert await clone.load("k") == {"n": 1}
    await clone.close()
    assert await store.load("k") == {"n": 1}  # closing a clone keeps the data
    assert await clone.clone().load("k") == {"n": 1}
    assert await InMemoryStore().load("k") is None
    assert repr(store) == "InMemoryStore(keys=1)"


async def test_in_memory_payload_limit_matches_the_option():
    store = InMemoryStore(max_payload_bytes=16)
    await store.save("k", {"a": "x"})
    await refused(store.save("k", {"a": "x" * 16}))
    with pytest.raises(sr.ConfigurationError):
        InMemoryStore(max_payload_bytes=0)


# --- KeyValueStore over the snapshot tables ---------------------------------


async def test_data_lives_in_the_snapshot_tables_under_namespace_kv(backend: Backend):
    async with (
        KeyValueStore.from_url(backend.url) as store,
        sr.SnapshotRepository.from_url(backend.url, namespace="kv") as repo,
        sr.SnapshotRepository.from_url(backend.url) as default_namespace,
    ):
        assert store.namespace == DEFAULT_KV_NAMESPACE == "kv"
        await store.save("bot/BTCUSDT", {"realised": 12.5, "halted": True})
        await store.save("bot/BTCUSDT", {"realised": 13.0, "halted": False})
        latest = await repo.get_latest("bot/BTCUSDT")
        assert latest is not None
        assert latest.version == 2
        assert latest.state == {"realised": 13.0, "halted": False}
        await repo.upsert_latest(sr.Snapshot(user_id="written/by/repo", state={"n": 1}))
        assert await store.load("written/by/repo") == {"n": 1}
        assert await default_namespace.get_latest("bot/BTCUSDT") is None
        assert await default_namespace.list_users() == []


async def test_stores_on_different_namespaces_do_not_see_each_other(backend: Backend):
    async with (
        KeyValueStore.from_url(backend.url, namespace="one") as one,
        KeyValueStore.from_url(backend.url, namespace="two") as two,
        KeyValueStore.from_url(backend.url) as default,
    ):
        await one.save("k", {"in": "one"})
        await two.save("k", {"in": "two"})
        assert await one.load("k") == {"in": "one"}
        assert await two.load("k") == {"in": "two"}
        assert await default.load("k") is None
        assert await one.delete("k") is True
        assert await two.load("k") == {"in": "two"}
        assert [key async for key in default.iter_keys()] == []


async def test_store_over_a_callers_repository_leaves_it_open(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
):
    async with sr.SnapshotRepository.from_url(backend.url, namespace="mine") as repo:
        closes = []

        async def counting_close() -> None:
            closes.append(True)

        monkeypatch.setattr(repo, "close", counting_close)
        async with KeyValueStore(repo) as store:
            assert store.repository is repo
            assert store.namespace == "mine"
            await store.save("k", {"n": 1})
        assert closes == []
        monkeypatch.undo()
        latest = await repo.get_latest("k")
        assert latest is not None
        assert latest.state == {"n": 1}


async def test_store_from_url_closes_its_repository(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
):
    store = KeyValueStore.from_url(backend.url)
    close = store.repository.close
    closes = []

    async def counting_close() -> None:
        closes.append(True)
        await close()

    monkeypatch.setattr(store.repository, "close", counting_close)
    await store.close()
    assert closes == [True]


async def test_store_over_a_tenant_view_is_confined_to_it(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, namespace="kv") as repo:
        acme, other = KeyValueStore(repo.for_tenant("acme")), KeyValueStore(repo)
        await acme.save("k", {"tenant": "acme"})
        assert await other.load("k") is None
        assert await acme.load("k") == {"tenant": "acme"}


async def test_repository_with_a_model_is_refused(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as carts:
        with pytest.raises(sr.ConfigurationError, match="without a model"):
            KeyValueStore(carts)  # type: ignore[arg-type]
    with pytest.raises(sr.ConfigurationError):
        KeyValueStore(backend.url)  # type: ignore[arg-type]


async def test_from_url_passes_repository_options(backend: Backend):
    async with KeyValueStore.from_url(backend.url, max_payload_bytes=16) as store:
        await store.save("k", {"a": "x"})
        await refused(store.save("k", {"a": "x" * 16}))
    with pytest.raises(sr.ConfigurationError):
        KeyValueStore.from_url(backend.url, namespace="")
    with pytest.raises(sr.ConfigurationError):
        KeyValueStore.from_url("oracle://localhost/db")  # an unsupported database


async def test_migrate_creates_the_tables(backend: Backend):
    async with KeyValueStore.from_url(backend.fresh_url()) as store:
        with pytest.raises(sr.SchemaNotReadyError):
            await store.save("k", {"n": 1})
        await store.migrate()
        await store.migrate()  # idempotent
        await store.save("k", {"n": 1})
        assert await store.load("k") == {"n": 1}


class Held:
    """Holds calls of one repository method, per user id, until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, repo: Any, method: str) -> None:
        self.entered: dict[str, asyncio.Event] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.errors: dict[str, Exception] = {}
        real = getattr(repo, method)

        async def held(first: Any, *args: Any, **kwargs: Any) -> Any:
            user_id = first if isinstance(first, str) else first.user_id
            self.entered.setdefault(user_id, asyncio.Event()).set()
            await self.gates.setdefault(user_id, asyncio.Event()).wait()
            if user_id in self.errors:
                raise self.errors[user_id]
            return await real(first, *args, **kwargs)

        monkeypatch.setattr(repo, method, held)

    async def started(self, user_id: str) -> None:
        await self.entered.setdefault(user_id, asyncio.Event()).wait()

    def release(self, user_id: str, error: Exception | None = None) -> None:
        """Let the held call go on, or make it raise `error`."""
        if error is not None:
            self.errors[user_id] = error
        self.gates.setdefault(user_id, asyncio.Event()).set()


async def settle() -> None:
    """Let every runnable task run until it waits (a few loop turns, no timing)."""
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.mark.parametrize("method", ["upsert_latest", "delete"])
async def test_flush_waits_until_a_held_write_finishes(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, method: str
):
    async with KeyValueStore.from_url(backend.url) as store:
        held = Held(monkeypatch, store.repository, method)
        write = asyncio.create_task(
            store.save("k", {"n": 1}) if method == "upsert_latest" else store.delete("k")
        )
        await held.started("k")
        flush = asyncio.create_task(store.flush())
        await settle()
        assert not flush.done()
        held.release("k")
        await flush
        assert write.done()
        await write


async def test_flush_does_not_wait_for_saves_begun_after_it(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
):
    async with KeyValueStore.from_url(backend.url) as store:
        held = Held(monkeypatch, store.repository, "upsert_latest")
        early = asyncio.create_task(store.save("early", {"n": 1}))
        await held.started("early")
        flush = asyncio.create_task(store.flush())
        await settle()
        late = asyncio.create_task(store.save("late", {"n": 2}))
        await held.started("late")
        held.release("early")
        await flush
        assert early.done()
        assert not late.done()
        held.release("late")
        await asyncio.gather(early, late)
        assert await store.load("late") == {"n": 2}


async def test_flush_returns_when_a_write_in_flight_fails(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
):
    async with KeyValueStore.from_url(backend.url) as store:
        held = Held(monkeypatch, store.repository, "upsert_latest")
        save = asyncio.create_task(store.save("k", {"n": 1}))
        await held.started("k")
        flush = asyncio.create_task(store.flush())
        await settle()
        held.release("k", error=sr.StorageError("injected"))
        await flush  # no error here: the save's own caller gets it
        with pytest.raises(sr.StorageError, match="injected"):
            await save
        assert await store.load("k") is None
        await store.flush()  # the failed save is no longer in flight
