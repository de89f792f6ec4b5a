"""When a private name the fast backends need is missing, the core backend takes over.

`pyproject.toml` pins only lower bounds, so a future SQLAlchemy or aiosqlite
may rename an internal the fast backends use (`backends/_privates`). The
engine then runs on the core backend (SQLAlchemy's public API), with one
warning, rather than failing on its first call.
"""

from __future__ import annotations

import pytest

import snapshot_repo as sr
from snapshot_repo.backends import _privates
from snapshot_repo.backends.core import CoreBackend
from snapshot_repo.backends.mysql import MysqlBackend
from snapshot_repo.backends.sqlite import SqliteBackend
from tests.support.databases import Backend, Cart


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_privates, "_warned", set())


async def round_trip(repo: sr.SnapshotRepository[Cart]) -> None:
    first = await repo.upsert_latest(sr.Snapshot(user_id="user-1", state=Cart(note="a")))
    second = await repo.upsert_latest(sr.Snapshot(user_id="user-1", state=Cart(note="b")))
    assert (first.version, second.version) == (1, 2)
    latest = await repo.get_latest("user-1")
    assert latest is not None
    assert latest.state.note == "b"
    assert [s.version for s in await repo.get_history("user-1")] == [2, 1]
    assert await repo.delete("user-1") == 2


async def test_sqlite_without_aiosqlites_private_entry_point_runs_on_core(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
):
    """As if aiosqlite renamed `_execute` (aiosqlite's own methods use it, so it stays)."""
    monkeypatch.setattr(_privates, "_AIOSQLITE_NAMES", ("_execute_renamed",))
    if backend.name == "postgres":  # aiosqlite is not involved: the fast backend stays
        async with sr.SnapshotRepository.from_url(backend.url, Cart) as repo:
            assert not isinstance(repo._backend, CoreBackend)
            await round_trip(repo)
        return
    if backend.name == "mariadb":  # nor here: MariaDB's backend (core, in MySQL's SQL) stays
        async with sr.SnapshotRepository.from_url(backend.url, Cart) as repo:
            assert type(repo._backend) is MysqlBackend
            await round_trip(repo)
        return
    with pytest.warns(RuntimeWarning, match=r"aiosqlite Connection\._execute_renamed is missing"):
        repo = sr.SnapshotRepository.from_url(backend.url, Cart)
    async with repo:
        assert isinstance(repo._backend, CoreBackend)
        await round_trip(repo)


async def test_a_missing_pool_internal_moves_every_engine_to_core_with_one_warning(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(_privates, "_POOL_NAMES", ("_renamed_in_a_later_release",))
    with pytest.warns(RuntimeWarning, match="_renamed_in_a_later_release") as warned:
        first = sr.SnapshotRepository.from_url(backend.url, Cart)
    second = sr.SnapshotRepository.from_url(backend.url, Cart, namespace="other")  # no warning
    assert len(warned) == 1  # once per missing name, not once per engine
    async with first, second:
        assert isinstance(first._backend, CoreBackend)
        assert isinstance(second._backend, CoreBackend)
        await round_trip(first)
        await round_trip(second)


async def test_with_every_private_name_present_the_fast_backend_runs(tmp_path, sqlite_template):
    path = tmp_path / "fast.db"
    path.write_bytes(sqlite_template.read_bytes())
    async with sr.SnapshotRepository.from_url(f"sqlite:///{path}", Cart) as repo:
        assert isinstance(repo._backend, SqliteBackend)
        await round_trip(repo)
