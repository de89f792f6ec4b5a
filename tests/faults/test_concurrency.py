"""Many writers at once, and writes cancelled at random points, on both backends.

Every check reads the tables through a separate plain connection
(`tests.support.consistency`), not through the library.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

import snapshot_repo as sr
from tests.support.databases import Backend, Cart

from ..support.consistency import assert_consistent, payload_items, read_tables
from ..support.pool import leaked_connections

pytestmark = pytest.mark.fault

WRITERS = 16
USERS = [f"user{n}" for n in range(4)]
DURATION = 2.5


def snap(user_id: str, items: list[str]) -> sr.Snapshot[Cart]:
    return sr.Snapshot(user_id=user_id, state=Cart(items=items))


@pytest.mark.parametrize("compare_and_set", [False, True], ids=["blind", "expected_version"])
async def test_sixteen_writers_lose_no_update(backend: Backend, compare_and_set: bool):
    """16 tasks write 4 users for 2.5 s; every acknowledged write is stored exactly once.

    Blind writes: each write's payload is in the history under the version it
    was told. Compare-and-set writes (read, append a token, write with
    `expected_version`, retry on conflict): additionally each version's items
    are the previous version's items plus one token, and the final state holds
    every acknowledged token, so no update was lost.
    """
    written: dict[tuple[str, int], list[str]] = {}
    conflicts = 0
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as repo:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DURATION

        async def write_once(user: str, token: str) -> sr.Snapshot[Cart]:
            nonlocal conflicts
            if not compare_and_set:
                return await repo.upsert_latest(snap(user, [token]))
            while True:
                current = await repo.get_latest(user)
                items = [*current.state.items, token] if current else [token]
                expected = current.version if current else 0
                try:
                    return await repo.upsert_latest(snap(user, items), expected_version=expected)
                except sr.VersionConflictError:
                    conflicts += 1

        async def writer(n: int) -> None:
            i = 0
            while loop.time() < deadline:
                user = USERS[(n + i) % len(USERS)]
                stored = await write_once(user, f"w{n}-{i}")
                key = (user, stored.version)
                assert key not in written, f"two writes were both told {key}"
                written[key] = list(stored.state.items)
                i += 1

        await asyncio.gather(*(writer(n) for n in range(WRITERS)))
        assert leaked_connections(repo) == 0

    acknowledged = Counter(user for user, _version in written)
    users = await read_tables(backend.url)
    assert_consistent(users, expected_counts=acknowledged)
    for (user, version), items in written.items():
        assert payload_items(users[user].history[version - 1]) == items, (user, version)
    if compare_and_set:
        for user, rows in users.items():
            for previous, row in zip(rows.history, rows.history[1:], strict=False):
                assert payload_items(row)[:-1] == payload_items(previous), (user, row.version)
            assert rows.latest is not None
            assert len(payload_items(rows.latest)) == acknowledged[user]
    print(
        f"{backend.name} {'cas' if compare_and_set else 'blind'}: "
        f"{sum(acknowledged.values())} writes {dict(acknowledged)}, {conflicts} conflicts"
    )
    assert min(acknowledged.values()) >= 10, "too few writes to prove anything"


async def test_cancelled_writes_leave_no_partial_write_and_no_leaked_connection(
    backend: Backend,
):
    """100 writes cancelled after 0-5 ms, or (every fourth) as soon as they have started:
    no partial write, no leaked connection, and the next 100 writes succeed promptly."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    users = ["c0", "c1"]
    completed: dict[tuple[str, int], list[str]] = {}
    outcomes: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as repo:
        for user in users:  # open the pool before cancelling anything
            stored = await repo.upsert_latest(snap(user, ["first"]))
            completed[(user, stored.version)] = ["first"]
        for i in range(100):
            user = users[i % 2]
            write = asyncio.ensure_future(repo.upsert_latest(snap(user, [f"cancel{i}"])))
            if i % 4:
                # After 0-5 ms: before, during or after the database's work.
                loop.call_later(rng.uniform(0, 0.005), write.cancel)
            else:
                # As soon as the write has sent its work off, so that some
                # cancellations hit a write in flight whatever the machine's speed.
                # (A timer of a few microseconds does not: the event loop's poll
                # counts in milliseconds, and wakes for the finished write first.)
                await asyncio.sleep(0)
                write.cancel()
            try:
                stored = await write
            except asyncio.CancelledError:
                outcomes["cancelled"] += 1
            else:
                outcomes["completed"] += 1
                completed[(user, stored.version)] = [f"cancel{i}"]
        leaked = leaked_connections(repo)
        assert leaked == 0, f"{leaked} connections leaked (seed {seed})"

        assert_consistent(await read_tables(backend.url))
        slowest = 0.0
        first_after: dict[str, int] = {}
        for i in range(100):
            user = users[i % 2]
            started = loop.time()
            stored = await repo.upsert_latest(snap(user, [f"after{i}"]))
            # A cancelled write that kept its lock would stall this one (SQLite: busy_timeout).
            slowest = max(slowest, loop.time() - started)
            first_after.setdefault(user, stored.version)
            completed[(user, stored.version)] = [f"after{i}"]
        assert leaked_connections(repo) == 0

    rows = await read_tables(backend.url)
    assert_consistent(rows)
    for (user, version), items in completed.items():
        assert payload_items(rows[user].history[version - 1]) == items
    # A cancelled write whose cancellation had returned must not land among later writes.
    late = [
        (user, row.version, payload_items(row))
        for user in users
        for row in rows[user].history[first_after[user] - 1 :]
        if (user, row.version) not in completed
    ]
    print(
        f"{backend.name} seed {seed}: {dict(outcomes)}, slowest write after: {slowest:.3f}s, "
        f"cancelled writes that landed later: {late}"
    )
    assert slowest < 2.0, f"a write after the cancellations took {slowest:.1f}s (seed {seed})"
    assert not late, f"cancelled writes landed after their cancellation returned (seed {seed})"
    for user in users:
        latest = rows[user].latest
        assert latest is not None
        assert payload_items(latest) == [f"after{98 + users.index(user)}"]
    assert outcomes["cancelled"] > 0, f"no write was cancelled (seed {seed})"
