"""Faults across processes: a writer killed with SIGKILL, SQLite shared by processes,
and migrations racing from several processes.

The processes run `tests/support/worker.py`, which prints one line per
acknowledged write, so the parent knows exactly which writes must survive.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
from collections import Counter

import asyncpg
import pytest
from sqlalchemy.engine import make_url

import snapshot_repo as sr
from snapshot_repo.migrate import VERSION_TABLE, head_revision
from tests.support.databases import Backend, Cart, mariadb_fetch

from ..support.consistency import (
    assert_consistent,
    payload_items,
    read_tables,
    wait_for_other_sessions,
)
from ..support.processes import WorkerProcess, worker

pytestmark = pytest.mark.fault


def acknowledged(lines: list[str]) -> dict[str, list[int]]:
    """Versions per user from a worker's `ok USER VERSION ITEM` lines, in the order printed."""
    acked: dict[str, list[int]] = {}
    for user, version in acknowledged_items(lines):
        acked.setdefault(user, []).append(version)
    return acked


def acknowledged_items(lines: list[str]) -> dict[tuple[str, int], str]:
    """The item each acknowledged write stored, by (user, version)."""
    items: dict[tuple[str, int], str] = {}
    for line in lines:
        if line.startswith("ok "):
            _ok, user, version, item = line.split()
            assert (user, int(version)) not in items, f"{user} v{version} acknowledged twice"
            items[(user, int(version))] = item
    return items


def errors(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("err ")]


async def test_writer_killed_mid_stream_loses_no_acknowledged_write(backend: Backend):
    """A writer process (4 tasks, 3 users) is SIGKILLed after a random number of writes, twice.

    Every acknowledged write is stored; at most the writes in flight (4) are
    stored unacknowledged; versions stay gapless, latest equals the newest
    history row; and the next writer continues at N+1 without waiting.
    """
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    users = ["k0", "k1", "k2"]
    tasks = 4
    all_acked: dict[str, set[int]] = {user: set() for user in users}
    stored_before = dict.fromkeys(users, 0)
    for round_ in range(2):
        kill_after = rng.randint(20, 150)
        async with worker("write", backend.url, ",".join(users), str(tasks), "0") as process:
            await process.read_until(kill_after, "ok ")
            process.kill()
            await process.read_to_end()
            assert errors(process.lines) == [], (seed, round_)
            acked = acknowledged(process.lines)
        await wait_for_other_sessions(backend.url)  # the killed writer's last commit lands
        rows = await read_tables(backend.url)
        assert_consistent(rows)
        for (user, version), item in acknowledged_items(process.lines).items():
            assert payload_items(rows[user].history[version - 1]) == [item], (user, version)
        for user, versions in acked.items():
            assert len(set(versions)) == len(versions), f"{user} acknowledged twice: {versions}"
            all_acked[user].update(versions)
        unacknowledged = 0
        for user in users:
            stored = set(rows[user].versions) if user in rows else set()
            missing = all_acked[user] - stored
            assert not missing, f"round {round_} (seed {seed}): {user} lost acknowledged {missing}"
            unacknowledged += len(stored) - stored_before[user] - len(acked.get(user, []))
            stored_before[user] = len(stored)
        # Only the writes in flight at the kill (one per task) may be stored unacknowledged.
        assert 0 <= unacknowledged <= tasks, (seed, round_, unacknowledged)
        print(
            f"{backend.name} round {round_}: killed after {sum(map(len, acked.values()))} acks; "
            f"stored {[len(rows[u].history) for u in users]}, "
            f"acknowledged {[len(all_acked[u]) for u in users]}; "
            f"{unacknowledged} stored unacknowledged"
        )

    async with sr.SnapshotRepository.from_url(backend.url, Cart) as repo:
        loop = asyncio.get_running_loop()
        for user in users:
            started = loop.time()
            after = await repo.upsert_latest(sr.Snapshot(user_id=user, state=Cart(items=["next"])))
            assert loop.time() - started < 2.0, "a killed writer's lock outlived it"
            assert after.version == len(rows[user].history) + 1
    assert_consistent(await read_tables(backend.url))


async def test_sqlite_four_processes_write_one_file_without_locked_errors(sqlite_url: str):
    """4 processes x 200 writes (2 tasks each) to 3 shared users on one SQLite file."""
    users = ["s0", "s1", "s2"]
    async with asyncio.TaskGroup() as group:
        runs = [
            group.create_task(_run_to_end("write", sqlite_url, ",".join(users), "2", "100"))
            for _ in range(4)
        ]
    acked: dict[str, list[int]] = {user: [] for user in users}
    items: dict[tuple[str, int], str] = {}
    for run in runs:
        process, stderr = run.result()
        assert errors(process.lines) == [], errors(process.lines)[:5]
        assert "locked" not in stderr, stderr
        assert process.process.returncode == 0, stderr
        assert process.lines[-1] == "done"
        for user, versions in acknowledged(process.lines).items():
            acked[user].extend(versions)
        items.update(acknowledged_items(process.lines))
    assert sum(len(versions) for versions in acked.values()) == 800
    for user, versions in acked.items():
        assert sorted(versions) == list(range(1, len(versions) + 1)), user
    rows = await read_tables(sqlite_url)
    assert_consistent(rows, expected_counts={u: len(v) for u, v in acked.items()})
    for (user, version), item in items.items():
        assert payload_items(rows[user].history[version - 1]) == [item], (user, version)


async def _run_to_end(*args: str) -> tuple[WorkerProcess, str]:
    async with worker(*args) as process:
        await process.read_to_end()
        stderr = await process.stderr()
        await process.process.wait()
    return process, stderr


async def test_five_processes_migrate_a_fresh_database_at_once(backend: Backend):
    """5 processes call `migrate()` on a never-migrated database together: all succeed, once."""
    url = backend.fresh_url()
    async with contextlib.AsyncExitStack() as stack:
        handles = [await stack.enter_async_context(worker("migrate", url)) for _ in range(5)]
        await asyncio.gather(*(_expect_ready(handle) for handle in handles))
        for handle in handles:  # everything is imported: release them together
            handle.send_line("go")
        await asyncio.gather(*(handle.read_to_end() for handle in handles))
        outcomes = [(await h.process.wait(), h.lines, await h.stderr()) for h in handles]
    for code, lines, stderr in outcomes:
        assert code == 0, f"a concurrent migrate failed: {lines} {stderr}"
        assert lines[-1] == "migrated", lines

    revisions, tables = await _schema_facts(url)
    assert revisions == [head_revision()]
    assert tables == Counter({"snapshot_latest": 1, "snapshot_history": 1, VERSION_TABLE: 1})
    async with sr.SnapshotRepository.from_url(url, Cart) as repo:
        assert await repo.health_check() is True
        stored = await repo.upsert_latest(sr.Snapshot(user_id="m", state=Cart(items=["x"])))
        assert stored.version == 1
    rows = await read_tables(url)
    assert_consistent(rows, expected_counts={"m": 1})
    assert payload_items(rows["m"].history[0]) == ["x"]


async def _expect_ready(handle: WorkerProcess) -> None:
    line = await handle.read_line()
    assert line == "ready", f"{line!r} {await handle.stderr()}"


async def _schema_facts(url: str) -> tuple[list[str], Counter[str]]:
    """(revisions in the version table, how many tables of each snapshot name), read raw."""
    names = ("snapshot_latest", "snapshot_history", VERSION_TABLE)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        assert parsed.database
        conn = sqlite3.connect(parsed.database)
        try:
            revisions = [r[0] for r in conn.execute(f"SELECT version_num FROM {VERSION_TABLE}")]
            tables = Counter(
                r[0]
                for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                if r[0] in names
            )
        finally:
            conn.close()
        return revisions, tables
    if parsed.get_backend_name() in ("mariadb", "mysql"):
        revisions = [
            r[0] for r in await mariadb_fetch(url, f"SELECT version_num FROM {VERSION_TABLE}")
        ]
        tables = Counter(
            r[0]
            for r in await mariadb_fetch(
                url,
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = DATABASE() AND table_name IN (%s, %s, %s)",
                *names,
            )
        )
        return revisions, tables
    dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        revisions = [r[0] for r in await conn.fetch(f"SELECT version_num FROM {VERSION_TABLE}")]
        tables = Counter(
            r[0]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_name = ANY($1)",
                list(names),
            )
        )
    finally:
        await conn.close()
    return revisions, tables
