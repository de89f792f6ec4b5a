"""The repository contract (seed 002), run on SQLite and on Postgres."""

from __future__ import annotations

import asyncio
import typing
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

import snapshot_repo as sr
from snapshot_repo.tables import history_table, latest_table
from tests.support.databases import Backend, Cart, refusing_history_insert


def snap(user_id: str, *items: str, schema_version: int = 1) -> sr.Snapshot[Cart]:
    return sr.Snapshot(
        user_id=user_id, state=Cart(items=list(items)), schema_version=schema_version
    )


async def stored_rows(repo: sr.SnapshotRepository[Cart], user_id: str) -> tuple[int, list[int]]:
    """(latest version or 0, history versions ascending), read with plain SQL."""
    async with repo.engine.connect() as conn:
        latest = (
            await conn.execute(
                select(latest_table.c.version).where(latest_table.c.user_id == user_id)
            )
        ).scalar()
        history = (
            await conn.execute(
                select(history_table.c.version)
                .where(history_table.c.user_id == user_id)
                .order_by(history_table.c.version)
            )
        ).scalars()
        return int(latest or 0), [int(v) for v in history]


async def test_first_write_is_version_1_with_utc_timestamp(repo: sr.SnapshotRepository[Cart]):
    before = datetime.now(UTC)
    stored = await repo.upsert_latest(snap("u1", "apple"))
    assert stored.version == 1
    assert stored.created_at is not None
    assert stored.created_at.tzinfo is not None
    assert stored.created_at.utcoffset() == timedelta(0)
    assert before <= stored.created_at <= datetime.now(UTC)
    assert stored.state == Cart(items=["apple"])


async def test_versions_increase_by_one_and_latest_equals_newest_history(
    repo: sr.SnapshotRepository[Cart],
):
    for n in range(1, 6):
        stored = await repo.upsert_latest(snap("u1", f"item{n}"))
        assert stored.version == n
    latest = await repo.get_latest("u1")
    history = await repo.get_history("u1", limit=10)
    assert latest is not None
    assert [s.version for s in history] == [5, 4, 3, 2, 1]
    assert history[0] == latest
    assert latest.state == Cart(items=["item5"])
    assert isinstance(latest.state, Cart)
    assert latest.schema_version == 1  # the repository's current schema version
    assert [s.state.items[0] for s in history] == ["item5", "item4", "item3", "item2", "item1"]


async def test_read_back_equals_what_the_write_returned(repo: sr.SnapshotRepository[Cart]):
    stored = await repo.upsert_latest(snap("u1", "a", "b"))
    assert await repo.get_latest("u1") == stored
    assert await repo.get_history("u1") == [stored]


async def test_get_latest_of_unknown_user_is_none(repo: sr.SnapshotRepository[Cart]):
    assert await repo.get_latest("nobody") is None
    assert await repo.get_history("nobody", limit=5) == []


async def test_history_limit_returns_newest_first(repo: sr.SnapshotRepository[Cart]):
    for n in range(12):
        await repo.upsert_latest(snap("u1", str(n)))
    history = await repo.get_history("u1", limit=3)
    assert [s.version for s in history] == [12, 11, 10]
    assert [s.version for s in await repo.get_history("u1", limit=1)] == [12]


async def test_users_are_independent(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("alice", "a"))
    await repo.upsert_latest(snap("alice", "b"))
    bob = await repo.upsert_latest(snap("bob", "x"))
    assert bob.version == 1
    assert await repo.delete("alice") == 2
    assert await repo.get_latest("bob") == bob


async def test_state_given_as_dict_is_validated_into_the_model(repo: sr.SnapshotRepository[Cart]):
    stored = await repo.upsert_latest(sr.Snapshot(user_id="u1", state={"items": ["a"]}))
    assert stored.state == Cart(items=["a"])
    latest = await repo.get_latest("u1")
    assert latest is not None
    assert isinstance(latest.state, Cart)


async def test_repository_without_model_stores_json_objects(
    json_repo: sr.SnapshotRepository[sr.JsonObject],
):
    state = {"nested": {"list": [1, 2.5, None, True, "x"]}, "big": 2**62, "neg": -1}
    stored = await json_repo.upsert_latest(sr.Snapshot(user_id="k", state=state))
    latest = await json_repo.get_latest("k")
    assert latest is not None
    assert latest.state == state == stored.state
    assert isinstance(latest.state, dict)


# --- compare-and-set -------------------------------------------------------


async def test_expected_version_zero_creates_only_once(repo: sr.SnapshotRepository[Cart]):
    first = await repo.upsert_latest(snap("u1", "a"), expected_version=0)
    assert first.version == 1
    with pytest.raises(sr.VersionConflictError) as caught:
        await repo.upsert_latest(snap("u1", "b"), expected_version=0)
    assert caught.value.expected_version == 0
    assert caught.value.actual_version == 1
    assert await repo.get_latest("u1") == first
    assert await stored_rows(repo, "u1") == (1, [1])


async def test_expected_version_matching_writes_next_version(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("u1", "a"))
    second = await repo.upsert_latest(snap("u1", "b"), expected_version=1)
    assert second.version == 2
    assert (await repo.get_latest("u1")) == second


async def test_expected_version_mismatch_writes_nothing(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("u1", "a"))
    await repo.upsert_latest(snap("u1", "b"))
    with pytest.raises(sr.VersionConflictError) as caught:
        await repo.upsert_latest(snap("u1", "stale"), expected_version=1)
    assert caught.value.actual_version == 2
    assert caught.value.user_id == "u1"
    assert "u1" not in str(caught.value).replace("u1...", "")  # only redacted
    latest = await repo.get_latest("u1")
    assert latest is not None
    assert latest.state.items == ["b"]
    assert await stored_rows(repo, "u1") == (2, [1, 2])


async def test_expected_version_on_missing_user_conflicts(repo: sr.SnapshotRepository[Cart]):
    with pytest.raises(sr.VersionConflictError) as caught:
        await repo.upsert_latest(snap("ghost", "a"), expected_version=3)
    assert caught.value.actual_version == 0
    assert await repo.get_latest("ghost") is None
    assert await stored_rows(repo, "ghost") == (0, [])


# --- concurrency -----------------------------------------------------------


async def test_concurrent_writers_lose_nothing_and_leave_no_gaps(
    repo: sr.SnapshotRepository[Cart],
):
    writers, writes_each = 8, 15

    async def writer(n: int) -> list[int]:
        versions = []
        for i in range(writes_each):
            user = "shared" if i % 2 == 0 else f"own{n}"
            stored = await repo.upsert_latest(snap(user, f"{n}-{i}"))
            versions.append(stored.version)
        return versions

    await asyncio.gather(*(writer(n) for n in range(writers)))
    shared_writes = writers * ((writes_each + 1) // 2)
    latest, history = await stored_rows(repo, "shared")
    assert history == list(range(1, shared_writes + 1))
    assert latest == shared_writes
    newest = (await repo.get_history("shared", limit=1))[0]
    assert await repo.get_latest("shared") == newest
    for n in range(writers):
        assert await stored_rows(repo, f"own{n}") == (
            writes_each // 2,
            list(range(1, writes_each // 2 + 1)),
        )


async def test_concurrent_compare_and_set_has_exactly_one_winner(
    repo: sr.SnapshotRepository[Cart],
):
    await repo.upsert_latest(snap("u1", "base"))
    contenders = 10

    async def attempt(n: int) -> int | None:
        try:
            return (await repo.upsert_latest(snap("u1", f"c{n}"), expected_version=1)).version
        except sr.VersionConflictError:
            return None

    outcomes = await asyncio.gather(*(attempt(n) for n in range(contenders)))
    assert sorted(o for o in outcomes if o is not None) == [2]
    assert outcomes.count(None) == contenders - 1
    assert await stored_rows(repo, "u1") == (2, [1, 2])


async def test_concurrent_creates_have_exactly_one_winner(repo: sr.SnapshotRepository[Cart]):
    async def attempt(n: int) -> bool:
        try:
            await repo.upsert_latest(snap("new", f"c{n}"), expected_version=0)
        except sr.VersionConflictError:
            return False
        return True

    outcomes = await asyncio.gather(*(attempt(n) for n in range(8)))
    assert outcomes.count(True) == 1
    assert await stored_rows(repo, "new") == (1, [1])


async def test_two_repositories_on_one_database_share_versions(backend: Backend):
    async with (
        sr.SnapshotRepository.from_url(backend.url, Cart) as one,
        sr.SnapshotRepository.from_url(backend.url, Cart) as two,
    ):

        async def write(repo: sr.SnapshotRepository[Cart], n: int) -> None:
            for i in range(10):
                await repo.upsert_latest(snap("u", f"{n}-{i}"))

        await asyncio.gather(write(one, 1), write(two, 2), write(one, 3), write(two, 4))
        assert await stored_rows(one, "u") == (40, list(range(1, 41)))


# --- delete ----------------------------------------------------------------


async def test_delete_erases_every_version_and_is_idempotent(repo: sr.SnapshotRepository[Cart]):
    for n in range(3):
        await repo.upsert_latest(snap("u1", str(n)))
    assert await repo.delete("u1") == 3
    assert await repo.get_latest("u1") is None
    assert await repo.get_history("u1") == []
    assert await stored_rows(repo, "u1") == (0, [])
    assert await repo.delete("u1") == 0
    assert await repo.delete("never-existed") == 0


async def test_deleted_user_starts_again_at_version_1(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("u1", "a"))
    await repo.upsert_latest(snap("u1", "b"))
    await repo.delete("u1")
    again = await repo.upsert_latest(snap("u1", "c"))
    assert again.version == 1
    assert await stored_rows(repo, "u1") == (1, [1])


async def test_delete_racing_writers_leaves_consistent_rows(repo: sr.SnapshotRepository[Cart]):
    """Whatever interleaving, the user's history afterwards is 1..latest with no orphans."""

    async def writer() -> None:
        for i in range(40):
            await repo.upsert_latest(snap("u1", str(i)))

    async def deleter() -> None:
        for _ in range(30):
            await repo.delete("u1")

    await asyncio.gather(writer(), writer(), writer(), deleter(), deleter())
    latest, history = await stored_rows(repo, "u1")
    assert history == list(range(1, latest + 1))
    after = await repo.upsert_latest(snap("u1", "after"))
    assert after.version == latest + 1


# --- atomicity under a failing statement -------------------------------------


async def test_failed_history_insert_rolls_back_the_latest_row(
    repo: sr.SnapshotRepository[Cart],
):
    """A fault between the two table writes must leave neither written."""
    await repo.upsert_latest(snap("u1", "kept"))
    async with refusing_history_insert(repo.engine, "NEW.version = 2"):
        failed = r"upsert_latest for user \.\.\. failed"
        with pytest.raises(sr.StorageError, match=failed) as caught:
            await repo.upsert_latest(snap("u1", "lost"))
        assert "injected fault" in str(caught.value)
        assert caught.value.__cause__ is not None
        latest = await repo.get_latest("u1")
        assert latest is not None
        assert latest.version == 1
        assert latest.state.items == ["kept"]
        assert await stored_rows(repo, "u1") == (1, [1])
    assert (await repo.upsert_latest(snap("u1", "next"))).version == 2


# --- health --------------------------------------------------------------------


async def test_health_check_is_true_on_a_migrated_database(repo: sr.SnapshotRepository[Cart]):
    assert await repo.health_check() is True


async def test_health_check_is_false_before_migration_and_true_after(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.fresh_url(), Cart) as repo:
        assert await repo.health_check() is False
        await repo.migrate()
        assert await repo.health_check() is True


async def test_health_check_never_creates_a_sqlite_file(tmp_path):
    path = tmp_path / "missing.db"
    async with sr.SnapshotRepository.from_url(f"sqlite+aiosqlite:///{path}") as repo:
        assert await repo.health_check() is False
    assert not path.exists()


async def test_health_check_on_unreachable_postgres_is_false_and_bounded():
    repo = sr.SnapshotRepository.from_url(
        "postgresql+asyncpg://postgres@127.0.0.1:1/nothing", health_timeout=2
    )
    async with repo:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await repo.health_check() is False
        assert loop.time() - started < 2.5


async def test_health_check_times_out_instead_of_hanging(tmp_path):
    """A server that accepts connections and never answers must not hang the probe."""
    stalled: list[asyncio.StreamWriter] = []

    async def accept_and_stall(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        stalled.append(writer)

    server = await asyncio.start_server(accept_and_stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        repo = sr.SnapshotRepository.from_url(
            f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x", health_timeout=0.5
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await repo.health_check() is False
        assert loop.time() - started < 1.5
        await repo.close()
    finally:
        for writer in stalled:
            writer.close()
        server.close()
        await server.wait_closed()


# --- schema and storage errors ---------------------------------------------------


async def test_unmigrated_database_gives_schema_not_ready(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.fresh_url(), Cart) as repo:
        with pytest.raises(sr.SchemaNotReadyError, match="migrate"):
            await repo.get_latest("u1")
        with pytest.raises(sr.SchemaNotReadyError):
            await repo.upsert_latest(snap("u1", "a"))


async def test_unreachable_database_gives_storage_error_with_cause():
    async with sr.SnapshotRepository.from_url(
        "postgresql+asyncpg://postgres@127.0.0.1:1/nothing",
        settings=sr.EngineSettings(connect_timeout=2),
    ) as repo:
        failed = r"get_latest for user ab\.\.\. failed"
        with pytest.raises(sr.StorageError, match=failed) as caught:
            await repo.get_latest("abcdefgh")
        assert caught.value.__cause__ is not None
        assert "abcdefgh" not in str(caught.value)


def test_unsupported_urls_are_configuration_errors():
    for url in ("mssql://sa@localhost/test", "not a url", "mongodb://x/y"):
        with pytest.raises(sr.ConfigurationError):
            sr.SnapshotRepository.from_url(url)


async def test_plain_scheme_urls_map_to_async_drivers(backend: Backend):
    plain = backend.url.replace("+aiosqlite", "").replace("+asyncpg", "").replace("+asyncmy", "")
    assert "+" not in plain.partition("://")[0], plain
    driver = {
        "sqlite": "sqlite+aiosqlite",
        "postgres": "postgresql+asyncpg",
        "mariadb": "mariadb+asyncmy",
    }[backend.name]
    async with sr.SnapshotRepository.from_url(plain, Cart) as repo:
        assert repo.engine.url.drivername == driver
        assert (await repo.upsert_latest(snap("u1", "a"))).version == 1


async def test_repository_leaves_a_borrowed_engine_open(backend: Backend):
    engine = sr.create_engine(backend.url)
    try:
        async with sr.SnapshotRepository(engine, Cart) as repo:
            await repo.upsert_latest(snap("u1", "a"))
        # still usable after the repository closed
        async with sr.SnapshotRepository(engine, Cart) as again:
            latest = await again.get_latest("u1")
            assert latest is not None
            assert latest.version == 1
    finally:
        await engine.dispose()


async def test_repr_shows_no_password(backend: Backend):
    async with sr.SnapshotRepository.from_url(
        backend.url.replace("postgres@", "postgres:secret@"), Cart
    ) as repo:
        assert "secret" not in repr(repo)
        assert "Cart" in repr(repo)


async def test_history_index_serves_newest_first_at_depth(repo: sr.SnapshotRepository[Cart]):
    """Rows written in bulk straight to the tables: history stays ordered by version."""
    now = datetime.now(UTC)
    rows = [
        {
            "user_id": "deep",
            "version": v,
            "schema_version": 1,
            "payload": b'{"items":[]}',
            "created_at": now,
        }
        for v in range(1, 2001)
    ]
    async with repo.engine.begin() as conn:
        await conn.execute(history_table.insert(), rows)
        await conn.execute(latest_table.insert(), [rows[-1]])
        count = (await conn.execute(select(func.count()).select_from(history_table))).scalar()
    assert count == 2000
    history = await repo.get_history("deep", limit=5)
    assert [s.version for s in history] == [2000, 1999, 1998, 1997, 1996]
    assert (await repo.upsert_latest(snap("deep", "next"))).version == 2001


def test_every_public_method_has_type_hints_that_resolve():
    """The capability methods are defined in other modules, which import the class for
    type checkers only: `typing.get_type_hints` (pydantic, Sphinx, DI frameworks) must
    still resolve every public method's hints, `self`'s included."""
    names = [
        name
        for name, member in vars(sr.SnapshotRepository).items()
        if not name.startswith("_") and callable(member)
    ]
    assert len(names) > 35  # the class lists them all, not only the core contract
    for name in names:
        hints = typing.get_type_hints(getattr(sr.SnapshotRepository, name))
        assert "return" in hints, name
