"""`count_users`: the count the database keeps (revision 0018), exact on every path."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text

import snapshot_repo as sr
from snapshot_repo import _user_counts
from snapshot_repo._user_counts import FOLD_AFTER, fold_chunk
from snapshot_repo.tables import user_counts_table
from tests.support.conformance import Doc, MakeRepo, snap


async def listed(repo: sr.SnapshotRepository[Any]) -> int:
    """The scope's live users, counted the slow way: by listing them."""
    return len(await repo.list_users(limit=10_000))


async def fold(repo: sr.SnapshotRepository[Any]) -> None:
    """Fold the repository's scope to one row, chunk by chunk, as `count_users` does."""
    after: int | None = 0
    while after is not None:
        after = await fold_chunk(repo._context.backend, repo._context.scope, after)


async def count_rows(repo: sr.SnapshotRepository[Any]) -> int:
    """How many rows of `snapshot_user_counts` the repository's scope has."""
    counts = user_counts_table
    scope = (counts.c.tenant == (repo.tenant or "")) & (counts.c.namespace == repo.namespace)
    async with repo.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).where(scope)) or 0)


class TestUserCounts:
    async def test_every_path_that_adds_or_removes_a_user_moves_the_count(
        self, repo: sr.SnapshotRepository[Doc], make_repo: MakeRepo
    ):
        other_namespace = await make_repo(namespace="other")
        tenant = repo.for_tenant("acme")

        async def counts() -> tuple[int, int, int]:
            for one in (repo, other_namespace, tenant):
                assert await one.count_users() == await listed(one)
            return (
                await repo.count_users(),
                await other_namespace.count_users(),
                await tenant.count_users(),
            )

        assert await counts() == (0, 0, 0)
        await repo.upsert_latest(snap("a", "1"))
        await repo.upsert_latest(snap("a", "2"))  # an update of a user: no new user
        await repo.upsert_latest(snap("b", "1"), expected_version=0)
        await repo.upsert_latest(snap("c", "1"), idempotency_key="k")
        await repo.upsert_latest(snap("c", "1"), idempotency_key="k")  # a replay
        await repo.merge("a", {"note": "merged"})
        await repo.restore("a", 1)
        assert await counts() == (3, 0, 0)
        await repo.upsert_many([snap(user, "batch") for user in ("a", "d", "e", "f")])
        await other_namespace.upsert_latest(snap("a", "elsewhere"))
        await tenant.upsert_many([snap("a", "t"), snap("z", "t")])
        assert await counts() == (6, 1, 2)
        assert await repo.delete("b") == 1
        assert await repo.delete("nobody") == 0
        assert await repo.erase("c") == 1  # the replay wrote no version
        assert await counts() == (4, 1, 2)
        await repo.upsert_latest(snap("gone", "1"), ttl=timedelta(0))
        assert await counts() == (4, 1, 2)  # expired: absent, though not reaped yet
        assert await repo.reap_expired() == 1
        assert await counts() == (4, 1, 2)
        assert await repo.purge_all(confirm=repo.purge_label) == 4
        assert await counts() == (0, 1, 2)

    async def test_a_long_count_is_folded_into_one_row_and_stays_exact(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        users = FOLD_AFTER + 5
        await repo.upsert_many([snap(f"u{n:05}") for n in range(users)])
        await repo.delete("u00000")
        assert await count_rows(repo) == users + 1  # a +1 per user, a -1 for the delete
        assert await repo.count_users() == users - 1  # read, then folded
        assert await count_rows(repo) == 1
        assert await repo.count_users() == users - 1
        await repo.upsert_latest(snap("new"))
        assert (await repo.count_users(), await count_rows(repo)) == (users, 2)

    async def test_reaping_folds_the_rows_it_left(self, repo: sr.SnapshotRepository[Doc]):
        await repo.upsert_many([snap(f"u{n}") for n in range(5)])
        for n in range(3):
            await repo.upsert_latest(snap(f"expired{n}"), ttl=timedelta(0))
        assert await repo.reap_expired() == 3
        assert await count_rows(repo) == 1
        assert await repo.count_users() == 5

    async def test_folds_racing_writers_and_each_other_lose_nothing(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        """Writers add users while folds run at once: every +1 is counted exactly once."""
        writers, per_writer = 6, 25
        done = asyncio.Event()

        async def write(writer: int) -> None:
            for n in range(per_writer):
                await repo.upsert_latest(snap(f"w{writer}-{n}"))

        async def keep_folding() -> int:
            folds = 0
            while not done.is_set():
                await fold(repo)
                folds += 1
            return folds

        folders = [asyncio.create_task(keep_folding()) for _ in range(3)]
        try:
            await asyncio.gather(*(write(writer) for writer in range(writers)))
        finally:
            done.set()
            fold_counts = await asyncio.gather(*folders)
        assert min(fold_counts) >= 1
        await fold(repo)
        assert await count_rows(repo) == 1
        assert await repo.count_users() == writers * per_writer == await listed(repo)

    async def test_a_fold_takes_the_oldest_rows_a_chunk_at_a_time(
        self, repo: sr.SnapshotRepository[Doc], monkeypatch: pytest.MonkeyPatch
    ):
        """More rows than a chunk are folded in several transactions, walking up the ids
        (a chunk's sum row is the newest, for the last chunk), exact after each."""
        monkeypatch.setattr(_user_counts, "FOLD_CHUNK", 7)
        await repo.upsert_many([snap(f"u{n:02}") for n in range(20)])
        backend, scope = repo._context.backend, repo._context.scope
        left = []
        after: int | None = 0
        while after is not None:
            after = await _user_counts.fold_chunk(backend, scope, after)
            left.append((after is None, await count_rows(repo), await repo.count_users()))
        # Ids 1-20: 1-7 -> sum 21; 8-14 -> sum 22; 15-21 -> sum 23; 22 and 23 -> one.
        assert left == [(False, 14, 20), (False, 8, 20), (False, 2, 20), (True, 1, 20)]

    async def test_a_fold_that_fails_is_logged_and_the_count_stands(
        self,
        repo: sr.SnapshotRepository[Doc],
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ):
        """The count is read before the fold: a database refusing the fold (here a
        statement naming a column that does not exist) costs the fold, not the count."""
        await repo.upsert_many([snap(f"u{n}") for n in range(5)])
        monkeypatch.setattr(_user_counts, "FOLD_AFTER", 2)
        broken = (text("UPDATE snapshot_user_counts SET no_such_column = 1"),)
        monkeypatch.setattr(repo._context.backend, "fold_statements", broken)
        with caplog.at_level(logging.WARNING, logger="snapshot_repo"):
            assert await repo.count_users() == 5
        assert "could not fold the user count" in caplog.text
        assert await count_rows(repo) == 5  # rolled back whole: nothing folded
