"""SQLite storage faults: a full disk and a read-only database.

A full disk is simulated with `PRAGMA max_page_count`, which makes SQLite
fail with SQLITE_FULL ("database or disk is full") exactly as a full
filesystem does, without filling one. The pragma is per connection, so the
test sets it on every checkout from the repository's pool.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import make_url

import snapshot_repo as sr
from tests.support.databases import Cart

from ..support.consistency import assert_consistent, payload_items, read_tables

pytestmark = pytest.mark.fault

SQLITE_MAX_PAGES = 1073741823  # SQLite's default (and largest) max_page_count


def snap(user_id: str, *items: str) -> sr.Snapshot[Cart]:
    return sr.Snapshot(user_id=user_id, state=Cart(items=list(items)))


class DiskLimit:
    """Caps every pooled connection of an engine at its current size while `full` is True."""

    def __init__(self) -> None:
        self.full = False
        self.applied: list[int] = []

    def on_checkout(self, dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            if self.full:
                cursor.execute("PRAGMA page_count")
                pages = int(cursor.fetchone()[0])
            else:
                pages = SQLITE_MAX_PAGES
            cursor.execute(f"PRAGMA max_page_count = {pages}")
            self.applied.append(pages)
        finally:
            cursor.close()


async def test_full_disk_fails_the_write_keeps_the_previous_state_and_recovers(sqlite_url: str):
    """SQLITE_FULL: StorageError, the previous versions intact, the next write after space
    returns gets the next version, all on the same repository."""
    limit = DiskLimit()
    big = [f"{n:06d}-" + "x" * 90 for n in range(2000)]  # ~200 KB: needs new pages
    # On a borrowed engine the repository keeps no connection between calls, so every
    # call checks one out and meets the listener.
    engine = sr.create_engine(sqlite_url)
    async with sr.SnapshotRepository(engine, Cart) as repo:
        event.listen(repo.engine.sync_engine, "checkout", limit.on_checkout)
        await repo.upsert_latest(snap("disk", "one"))
        await repo.upsert_latest(snap("disk", "two"))
        before = await read_tables(sqlite_url)

        limit.full = True
        with pytest.raises(sr.StorageError, match="full") as caught:
            await repo.upsert_latest(snap("disk", *big))
        assert caught.value.__cause__ is not None
        assert limit.applied, "the checkout listener never ran"
        assert limit.applied[-1] < SQLITE_MAX_PAGES, "the cap was not applied"
        assert await read_tables(sqlite_url) == before
        latest = await repo.get_latest("disk")
        assert latest is not None
        assert (latest.version, latest.state.items) == (2, ["two"])

        limit.full = False
        stored = await repo.upsert_latest(snap("disk", *big))
        assert stored.version == 3
    await engine.dispose()
    rows = await read_tables(sqlite_url)
    assert_consistent(rows, expected_counts={"disk": 3})
    assert payload_items(rows["disk"].history[2]) == big


async def test_read_only_database_refuses_writes_and_changes_nothing(sqlite_url: str):
    """A repository on a read-only connection (`mode=ro`): reads work, every write
    raises StorageError, and the file is unchanged."""
    async with sr.SnapshotRepository.from_url(sqlite_url, Cart) as writer:
        await writer.upsert_latest(snap("ro", "kept"))
    path = make_url(sqlite_url).database
    before = await read_tables(sqlite_url)
    read_only_url = f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true"
    async with sr.SnapshotRepository.from_url(read_only_url, Cart) as repo:
        latest = await repo.get_latest("ro")
        assert latest is not None
        assert latest.state.items == ["kept"]
        with pytest.raises(sr.StorageError, match=r"readonly|read-only|read only") as caught:
            await repo.upsert_latest(snap("ro", "lost"))
        assert caught.value.__cause__ is not None
        with pytest.raises(sr.StorageError):
            await repo.upsert_latest(snap("new", "lost"), expected_version=0)
        with pytest.raises(sr.StorageError):
            await repo.delete("ro")
        assert await repo.get_latest("new") is None
    assert await read_tables(sqlite_url) == before
