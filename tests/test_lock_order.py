"""Postgres: writers with a retention policy and `prune_history` lock rows in one order.

A batch write with a `RetentionPolicy` locks its users' latest rows, then
deletes their old history rows; `prune_history` over all users locks, page
by page, the same kinds of rows. Taken in different orders, the two
deadlocked (issue #20: `StorageError` from asyncpg's `DeadlockDetectedError`
within seconds). They must not; and a deadlock that does happen (a
transaction Postgres chose as the victim was rolled back whole) is retried
inside the library.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

import snapshot_repo as sr
from snapshot_repo.backends._retry import ROLLED_BACK_ATTEMPTS
from tests.support.databases import Cart

USERS = [f"u{n:02d}" for n in range(24)] + ["U-upper", "a.b", "Z_z", "é-accent"]
"""Ids whose code point order differs from most collations' order (case, punctuation)."""

WRITERS = 6
ROUNDS = 100_000
DEADLINE = 5.0
"""Seconds of writing: before the fix the first deadlock came after 1.2 to 3.9 s."""


def snap(user_id: str, token: str) -> sr.Snapshot[Cart]:
    return sr.Snapshot(user_id=user_id, state=Cart(items=[token]))


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def test_batches_with_retention_and_prune_history_do_not_deadlock(
    postgres_url: str, caplog: pytest.LogCaptureFixture
):
    """Six writers batch-write the same users in shuffled orders (some batches repeat a
    user), each with a retention policy, while `prune_history` sweeps every user: no
    call fails, none even needed a retry (the lock order alone prevents deadlocks),
    and every user's acknowledged versions are exactly 1..N."""
    caplog.set_level(logging.INFO, logger="snapshot_repo")
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    acknowledged: dict[str, list[int]] = defaultdict(list)
    policy = sr.RetentionPolicy(keep_last=2)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    done = asyncio.Event()
    async with (
        sr.SnapshotRepository.from_url(postgres_url, Cart, retention=policy) as writers,
        sr.SnapshotRepository.from_url(postgres_url, Cart) as pruner,
    ):

        async def writer(n: int) -> None:
            for round_ in range(ROUNDS):
                if loop.time() > deadline:
                    return
                users = rng.sample(USERS, rng.randint(len(USERS) // 2, len(USERS)))
                if round_ % 3 == 0:
                    users += rng.sample(users, 3)  # repeats: the statement sorts, not Python
                    rng.shuffle(users)
                stored = await writers.upsert_many([snap(u, f"w{n}-{round_}") for u in users])
                for snapshot in stored:
                    acknowledged[snapshot.user_id].append(snapshot.version)

        async def sweeper() -> int:
            sweeps = 0
            while not done.is_set():
                await pruner.prune_history(keep_last=1)
                sweeps += 1
            return sweeps

        started = loop.time()
        try:
            async with asyncio.TaskGroup() as tasks:  # the first failure cancels the rest
                sweeping = tasks.create_task(sweeper())
                writing = [tasks.create_task(writer(n)) for n in range(WRITERS)]
                await asyncio.gather(*writing)
                done.set()
        except* sr.StorageError as failed:
            cause = failed.exceptions[0].__cause__
            detail = getattr(cause, "detail", "")
            raise AssertionError(
                f"after {loop.time() - started:.1f} s (seed {seed}): {failed.exceptions[0]}\n"
                f"{detail}"
            ) from failed.exceptions[0]
        sweeps = sweeping.result()
        latest = await writers.get_latest_many(USERS)
    writes = sum(len(versions) for versions in acknowledged.values())
    print(f"seed {seed}: {writes} writes, {sweeps} prune sweeps")
    assert sweeps >= 3, f"prune_history ran {sweeps} times only (seed {seed})"
    retried = [r.getMessage() for r in caplog.records if "rolled back" in r.getMessage()]
    assert not retried, f"deadlocks happened and were retried (seed {seed}): {retried}"
    for user, versions in acknowledged.items():
        assert sorted(versions) == list(range(1, len(versions) + 1)), (user, seed)
        assert latest[user].version == len(versions), (user, seed)
    conn = await asyncpg.connect(_dsn(postgres_url))
    try:
        rows = await conn.fetch(
            "SELECT user_id, array_agg(version ORDER BY version) AS versions "
            "FROM snapshot_history GROUP BY user_id"
        )
    finally:
        await conn.close()
    for row in rows:  # what retention and pruning kept: the newest versions, no holes
        kept = list(row["versions"])
        last = len(acknowledged[row["user_id"]])
        assert kept == list(range(last - len(kept) + 1, last + 1)), (row["user_id"], seed)


# --- a rolled-back statement is retried ---------------------------------------------------


@asynccontextmanager
async def rolled_back(
    url: str, table: str, event: str, failures: int, sqlstate: str = "40P01"
) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """A trigger that aborts the first `failures` statements doing `event` on `table`.

    It raises SQLSTATE `sqlstate` on the server, as Postgres aborts a deadlock
    victim: the whole statement (and its transaction) is rolled back. The
    count lives in a sequence, which a rollback does not rewind. Yields a
    function returning how many statements the trigger saw.
    """
    conn = await asyncpg.connect(_dsn(url))
    try:
        await conn.execute(
            f"""
            CREATE SEQUENCE rolled_back_seen;
            CREATE FUNCTION rolled_back() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('rolled_back_seen') <= {failures} THEN
                    RAISE EXCEPTION 'injected rollback' USING ERRCODE = '{sqlstate}';
                END IF;
                RETURN NULL;
            END $$;
            CREATE TRIGGER rolled_back BEFORE {event} ON {table}
                FOR EACH STATEMENT EXECUTE FUNCTION rolled_back();
            """
        )

        async def seen() -> int:
            called, last = await conn.fetchrow("SELECT is_called, last_value FROM rolled_back_seen")
            return int(last) if called else 0

        yield seen
    finally:
        await conn.execute(
            f"""
            DROP TRIGGER IF EXISTS rolled_back ON {table};
            DROP FUNCTION IF EXISTS rolled_back();
            DROP SEQUENCE IF EXISTS rolled_back_seen;
            """
        )
        await conn.close()


async def _upsert_latest(repo: sr.SnapshotRepository[Cart]) -> Any:
    return await repo.upsert_latest(snap("a", "again"))


async def _upsert_many(repo: sr.SnapshotRepository[Cart]) -> Any:
    return await repo.upsert_many([snap("b", "again"), snap("a", "again")])


async def _delete(repo: sr.SnapshotRepository[Cart]) -> Any:
    return await repo.delete("a")


async def _prune_history(repo: sr.SnapshotRepository[Cart]) -> Any:
    return await repo.prune_history(keep_last=1)


OPERATIONS: dict[str, tuple[str, str, Callable[[sr.SnapshotRepository[Cart]], Awaitable[Any]]]] = {
    # backend call: (table, event the trigger aborts, a public call making it)
    "write": ("snapshot_history", "INSERT", _upsert_latest),
    "write_many": ("snapshot_history", "INSERT", _upsert_many),
    "delete": ("snapshot_latest", "DELETE", _delete),
    "execute_in_transaction": ("snapshot_history", "DELETE", _prune_history),
}


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
async def test_a_deadlock_victim_is_run_again(
    postgres_url: str, caplog: pytest.LogCaptureFixture, operation: str, encrypted: bool
):
    """Aborted twice with 40P01, the third attempt succeeds; each retry is logged at INFO."""
    table, event, call = OPERATIONS[operation]
    options: Any = {}
    if encrypted:  # the write runs as a transaction with its data key's check
        options["encryption"] = sr.LocalKeyProvider({"k1": b"k" * 32}, active="k1")
    async with sr.SnapshotRepository.from_url(postgres_url, Cart, **options) as repo:
        for n in range(3):
            await repo.upsert_latest(snap("a", f"a{n}"))
        before = await repo.get_history("a")
        caplog.set_level(logging.INFO, logger="snapshot_repo")
        failures = ROLLED_BACK_ATTEMPTS - 1
        async with rolled_back(postgres_url, table, event, failures) as seen:
            outcome = await call(repo)
            assert await seen() == ROLLED_BACK_ATTEMPTS
        after = await repo.get_history("a")
    retries = [r for r in caplog.records if "rolled back a statement" in r.getMessage()]
    assert [r.levelno for r in retries] == [logging.INFO] * failures
    assert "DeadlockDetectedError" in retries[0].getMessage()
    if operation == "delete":
        assert (outcome, after) == (3, [])
    elif operation == "execute_in_transaction":
        assert (outcome, [s.version for s in after]) == (2, [3])
    else:  # the retried write got the next version, once
        assert [s.version for s in after] == [4, *(s.version for s in before)]


async def test_a_serialization_failure_is_run_again(postgres_url: str):
    """40001 (possible where the server's default isolation is stricter) is retried too."""
    async with (
        sr.SnapshotRepository.from_url(postgres_url, Cart) as repo,
        rolled_back(postgres_url, "snapshot_history", "INSERT", 1, "40001") as seen,
    ):
        stored = await repo.upsert_latest(snap("a", "once"))
        assert await seen() == 2
    assert stored.version == 1


async def test_after_the_last_attempt_the_deadlock_propagates(postgres_url: str):
    """Aborted on every attempt: a StorageError chained to asyncpg's error, nothing written."""
    async with sr.SnapshotRepository.from_url(postgres_url, Cart) as repo:
        async with rolled_back(postgres_url, "snapshot_history", "INSERT", 99) as seen:
            with pytest.raises(sr.StorageError, match="DeadlockDetectedError") as raised:
                await repo.upsert_latest(snap("a", "never"))
            assert await seen() == ROLLED_BACK_ATTEMPTS
        assert isinstance(raised.value.__cause__, asyncpg.DeadlockDetectedError)
        assert await repo.get_latest("a") is None


async def test_other_errors_are_not_retried(postgres_url: str):
    """A rollback of another kind (here 40002, an integrity violation) fails at once."""
    async with (
        sr.SnapshotRepository.from_url(postgres_url, Cart) as repo,
        rolled_back(postgres_url, "snapshot_history", "INSERT", 99, "40002") as seen,
    ):
        with pytest.raises(sr.StorageError, match="injected rollback"):
            await repo.upsert_latest(snap("a", "never"))
        assert await seen() == 1
