"""`EngineSettings.sqlite_mmap_size`: SQLite reads through memory-mapped I/O, opt-in.

SQLite by nature. The setting reaches every connection; reads, writes and
erasures behave as they do without it (erasure stays traceless: writes never
go through the mapping); and after another connection's VACUUM has shrunk the
file under the mapped connections, they read the right rows (SQLite sizes the
mapping again at the next read transaction). Nothing in the library itself
shrinks the database file: its checkpoints truncate the WAL only.
"""

from __future__ import annotations

import sqlite3
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

import snapshot_repo as sr
from tests.support.databases import Cart

from .test_repository import snap

MAPPED_BYTES = 64 * 1024 * 1024
MAPPED = sr.EngineSettings(sqlite_mmap_size=MAPPED_BYTES, pool_size=3)


def url_of(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def vacuum_elsewhere(path: Path) -> tuple[int, int]:
    """VACUUM the file from a connection of its own; its size before and after, in bytes."""
    before = path.stat().st_size
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("PRAGMA busy_timeout = 10000")
        other.execute("VACUUM")
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        other.close()
    return before, path.stat().st_size


def file_bytes(path: Path) -> bytes:
    """The database file and its WAL, as they are on disk."""
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


@pytest.fixture
def path(tmp_path: Path, sqlite_template: Path) -> Path:
    """A migrated SQLite file of the test's own."""
    copy = tmp_path / "mapped.db"
    copy.write_bytes(sqlite_template.read_bytes())
    return copy


async def mmap_sizes(repo: sr.SnapshotRepository[Cart], connections: int) -> list[int]:
    """`PRAGMA mmap_size` on `connections` pooled connections held at once."""
    async with AsyncExitStack() as stack:
        held = [await stack.enter_async_context(repo.engine.connect()) for _ in range(connections)]
        return [(await conn.exec_driver_sql("PRAGMA mmap_size")).scalar_one() for conn in held]


async def test_every_connection_maps_the_file_as_asked(path: Path):
    async with sr.SnapshotRepository.from_url(url_of(path), Cart, settings=MAPPED) as repo:
        assert await mmap_sizes(repo, 3) == [MAPPED_BYTES] * 3
    async with sr.SnapshotRepository.from_url(url_of(path), Cart) as repo:
        assert await mmap_sizes(repo, 2) == [0, 0]  # the default: off


async def test_mapped_reads_see_every_write_and_erasure_stays_traceless(path: Path):
    marker = f"MARKER-{uuid.uuid4().hex}"
    async with sr.SnapshotRepository.from_url(url_of(path), Cart, settings=MAPPED) as repo:
        for n in range(20):
            await repo.upsert_latest(snap("victim", f"{marker}-{n}", "x" * 500))
        await repo.upsert_many([snap(f"u{n}", str(n)) for n in range(50)])
        latest = await repo.get_latest("victim")
        assert latest is not None
        assert latest.state.items[0] == f"{marker}-19"
        many = await repo.get_latest_many([f"u{n}" for n in range(50)])
        assert {uid: s.state.items for uid, s in many.items()} == {
            f"u{n}": [str(n)] for n in range(50)
        }
        assert marker.encode() in file_bytes(path)  # the search finds it while it is there
        assert await repo.delete("victim") == 20
        assert await repo.get_history("victim") == []
        assert marker.encode() not in file_bytes(path)


async def test_a_file_shrunk_by_another_connection_is_read_correctly(path: Path):
    users = [f"u{n:03d}" for n in range(300)]
    async with sr.SnapshotRepository.from_url(url_of(path), Cart, settings=MAPPED) as repo:
        await repo.upsert_many([snap(uid, uid, "y" * 2000) for uid in users])
        assert len(await repo.get_latest_many(users)) == 300  # pages now read through the map
        assert await mmap_sizes(repo, 2) == [MAPPED_BYTES] * 2  # two more connections mapped
        for uid in users[10:]:
            await repo.delete(uid)
        before, after = vacuum_elsewhere(path)
        assert after < before // 4  # the mapped file shrank under the pool
        for _ in range(5):  # on the pool's connections, all mapped before the VACUUM
            found = await repo.get_latest_many(users)
            assert sorted(found) == users[:10]
            assert all(s.state.items == [s.user_id, "y" * 2000] for s in found.values())
        await repo.upsert_latest(snap("u000", "after"))
        latest = await repo.get_latest("u000")
        assert latest is not None
        assert latest.state.items == ["after"]
