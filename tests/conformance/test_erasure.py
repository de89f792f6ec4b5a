"""Erasure: delete and erase, receipts, data keys, the feed entry, reaping, pruning."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert

import snapshot_repo as sr
from snapshot_repo.tables import data_keys_table
from tests.support.conformance import (
    Doc,
    MakeRepo,
    Target,
    autovacuum_held_off,
    count_rows,
    data_key_of,
    described,
    every_row_holding,
    files_hold,
    postgres_files_holding,
    read_feed,
    snap,
    snapshot_holders,
    stored_versions,
)

ERASURE_KEY = b"conformance-erasure-key"


def key_provider() -> sr.LocalKeyProvider:
    return sr.LocalKeyProvider({"k1": b"k" * 32}, active="k1")


class TestDelete:
    async def test_delete_removes_every_version_and_the_user_starts_again_at_one(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        for n in range(3):
            await repo.upsert_latest(snap("u", str(n)))
        await repo.upsert_latest(snap("bystander"))
        assert await repo.delete("u") == 3
        assert await repo.get_latest("u") is None
        assert await repo.get_history("u") == []
        assert (await count_rows(repo.engine, "u"))["snapshot_history"] == 0
        assert (await repo.upsert_latest(snap("u", "again"))).version == 1
        assert await stored_versions(repo.engine, "bystander") == [1]

    async def test_deleting_an_unknown_user_erases_nothing(self, repo: sr.SnapshotRepository[Doc]):
        assert await repo.delete("nobody") == 0
        assert await repo.delete("nobody") == 0

    async def test_an_expired_user_is_still_deleted(self, repo: sr.SnapshotRepository[Doc]):
        await repo.upsert_latest(snap("u", "1"))
        await repo.upsert_latest(snap("u", "2"), ttl=timedelta(0))
        assert await repo.delete("u") == 2

    async def test_the_feed_keeps_one_erase_entry_instead_of_the_users_writes(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        for n in range(3):
            await repo.upsert_latest(snap("u", str(n)))
        await repo.upsert_latest(snap("other"))
        await repo.delete("u")
        changes, _ = await read_feed(repo, expect=2)
        # The erase entry must not keep the id it erased: without an erasure key it names no one.
        assert described(changes) == [("other", 1, "write"), ("", 3, "erase")]
        erase = changes[-1]
        assert erase.created_at is not None
        assert erase.created_at <= datetime.now(UTC)

    async def test_with_an_erasure_key_the_erase_entry_names_the_receipt_subject(
        self, make_repo: MakeRepo
    ):
        repo = await make_repo(erasure_key=ERASURE_KEY)
        heard: list[sr.Change] = []
        await repo.subscribe(heard.append)
        await repo.upsert_latest(snap("u", "1"))
        await repo.delete("u")
        changes, _ = await read_feed(repo, expect=1)
        subject = repo.erasure_subject("u")
        assert len(subject) == 64  # hex HMAC-SHA256
        assert described(changes) == [(subject, 1, "erase")]
        assert [(c.user_id, c.kind) for c in heard][-1] == (subject, "erase")


class TestReceiptsAndKeys:
    async def test_an_erasure_leaves_a_receipt_when_the_repository_has_an_erasure_key(
        self, make_repo: MakeRepo
    ):
        repo = await make_repo(erasure_key=ERASURE_KEY)
        assert await repo.erasure_receipt("u") is None
        await repo.upsert_latest(snap("u", "1"))
        await repo.upsert_latest(snap("u", "2"))
        before = datetime.now(UTC)
        assert await repo.erase("u") == 2
        receipt = await repo.erasure_receipt("u")
        assert receipt is not None
        assert (receipt.versions_erased, receipt.cause) == (2, "erase")
        assert before - timedelta(seconds=1) <= receipt.erased_at <= datetime.now(UTC)
        assert "u" not in receipt.subject
        assert await repo.erase("absent") == 0
        assert await repo.erasure_receipt("absent") is None

    async def test_an_erasure_destroys_the_users_data_key(self, make_repo: MakeRepo):
        repo = await make_repo(encryption=key_provider())
        await repo.upsert_latest(snap("u", "secret"))
        await repo.upsert_latest(snap("keep", "kept"))
        old_key = await data_key_of(repo.engine, "u")
        assert old_key is not None
        assert await repo.delete("u") == 1
        assert await data_key_of(repo.engine, "u") is None
        assert await data_key_of(repo.engine, "keep") is not None
        await repo.upsert_latest(snap("u", "new life"))
        new_key = await data_key_of(repo.engine, "u")
        assert new_key is not None
        assert new_key != old_key
        latest = await repo.get_latest("u")
        assert latest is not None
        assert latest.state.note == "new life"

    async def test_a_data_key_without_rows_is_destroyed_too(self, make_repo: MakeRepo):
        repo = await make_repo(encryption=key_provider())
        orphan = {
            "tenant": "",
            "namespace": "default",
            "user_id": "orphan",
            "key_id": "k1",
            "wrapped_key": b"left by a failed write",
            "created_at": datetime.now(UTC),
        }
        async with repo.engine.begin() as conn:
            await conn.execute(insert(data_keys_table).values(orphan))
        assert await repo.delete("orphan") == 0
        assert await data_key_of(repo.engine, "orphan") is None

    async def test_erase_user_erases_every_namespace_of_the_person(
        self, make_repo: MakeRepo, target: Target, database_url: str
    ):
        carts = await make_repo(namespace="carts")
        prefs = await make_repo(namespace="prefs")
        await carts.upsert_latest(snap("p", "1"))
        await carts.upsert_latest(snap("p", "2"))
        await prefs.upsert_latest(snap("p", "x"))
        await prefs.upsert_latest(snap("q", "x"))
        assert await sr.erase_user(database_url, "p", **target.options) == 3
        assert await carts.get_latest("p") is None
        assert await prefs.get_latest("p") is None
        assert await prefs.get_latest("q") is not None


class TestReapingAndPruning:
    async def test_reaping_erases_expired_users_only(self, repo: sr.SnapshotRepository[Doc]):
        await repo.upsert_latest(snap("dead", "1"))
        await repo.upsert_latest(snap("dead", "2"), ttl=timedelta(0))
        await repo.upsert_latest(snap("revived"), ttl=timedelta(0))
        await repo.upsert_latest(snap("revived", "written again"))  # clears the expiry
        await repo.upsert_latest(snap("alive"), ttl=timedelta(hours=1))
        assert await repo.reap_expired() == 1
        assert await stored_versions(repo.engine, "dead") == []
        assert await stored_versions(repo.engine, "revived") == [1, 2]
        assert await repo.get_latest("alive") is not None

    async def test_pruning_drops_old_versions_and_keeps_their_feed_entries(
        self, repo: sr.SnapshotRepository[Doc]
    ):
        for n in range(5):
            await repo.upsert_latest(snap("u", str(n)))
        assert await repo.prune_history("u", keep_last=2) == 3
        assert await stored_versions(repo.engine, "u") == [4, 5]
        changes, _ = await read_feed(repo, expect=5)
        assert described(changes) == [("u", v, "write") for v in range(1, 6)]


class TestNoTrace:
    async def test_no_row_of_any_table_keeps_the_erased_users_id_or_data(
        self, make_repo: MakeRepo, target: Target
    ):
        """After an erasure, the user id, its states, actor, reason, metadata and
        idempotency keys are in no row of any table: not in the feed's erase entry
        (which holds the receipt's HMAC), not in a receipt, not in a data key. On SQLite
        the file (every table and index, the WAL truncated) holds none of them either; on
        Postgres, after `vacuum="full"`, no file of a table, index or TOAST relation does."""
        marker = uuid.uuid4().hex
        repo = await make_repo(erasure_key=ERASURE_KEY)
        postgres = target.database == "postgres"
        async with autovacuum_held_off(repo.engine) if postgres else nullcontext():
            await self._erase_and_scan(repo, target, marker)

    async def _erase_and_scan(
        self, repo: sr.SnapshotRepository[Doc], target: Target, marker: str
    ) -> None:
        victim = f"victim-{marker}"
        for n in range(3):
            await repo.upsert_latest(
                snap(victim, f"state-{marker}"),
                idempotency_key=f"key-{marker}-{n}",
                actor=f"actor-{marker}",
                reason=f"reason-{marker}",
                metadata={"note": f"meta-{marker}"},
            )
        await repo.upsert_latest(snap("bystander", "stays"))
        assert await repo.erase(victim, vacuum="full") == 3
        assert await every_row_holding(repo.engine, marker) == []
        if target.database == "sqlite":
            database = repo.engine.url.database
            assert database is not None
            assert not files_hold(Path(database), marker)
        if target.database == "postgres":  # VACUUM FULL wrote every table and index anew
            # VACUUM FULL keeps the row versions a snapshot older than the erasure may
            # still see (Postgres's rule, not the library's), and a snapshot's horizon is
            # the oldest transaction still open anywhere on the server: seen here, other
            # tests' databases, where a transaction held open on purpose (and the
            # TRUNCATEs queued behind it) kept the erased rows in this database's new
            # files. Those transactions end; the erased rows must then go with the next
            # VACUUM FULL (an erasure of nobody with `vacuum="full"`), polled for up to
            # 10 s. Rows still live never would.
            holding = await postgres_files_holding(repo.engine, marker)
            seen: list[list[str]] = []
            deadline = asyncio.get_running_loop().time() + 10
            while holding and asyncio.get_running_loop().time() < deadline:
                seen.append(await snapshot_holders(repo.engine))
                await asyncio.sleep(0.1)
                assert await repo.erase(victim, vacuum="full") == 0
                holding = await postgres_files_holding(repo.engine, marker)
            if holding:  # in full: pytest would shorten an assertion's message
                pytest.fail(f"still in {holding}; open transactions and snapshots: {seen}")

    @pytest.mark.parametrize("vacuum", [False, True], ids=["delete", "erase-vacuum"])
    async def test_an_erased_state_leaves_no_trace(
        self, repo: sr.SnapshotRepository[Doc], target: Target, vacuum: bool
    ):
        marker = f"MARKER-{uuid.uuid4().hex}"
        await repo.upsert_latest(snap("victim", marker))
        await repo.upsert_latest(snap("bystander", "stays"))
        erased = await (repo.erase("victim", vacuum=True) if vacuum else repo.delete("victim"))
        assert erased == 1
        assert (await count_rows(repo.engine, "victim"))["snapshot_latest"] == 0
        if target.database == "sqlite":  # Postgres: VACUUM ran; its files are the server's
            database = repo.engine.url.database
            assert database is not None
            assert not files_hold(Path(database), marker)
        assert await repo.finish_erasures(wait=0.1) is True

    async def test_a_batch_of_erasures_leaves_no_trace(self, repo: sr.SnapshotRepository[Doc]):
        marker = f"MARKER-{uuid.uuid4().hex}"
        for user in ("a", "b"):
            await repo.upsert_latest(snap(user, marker), ttl=timedelta(0))
        assert await repo.reap_expired() == 2  # one checkpoint for the batch
        database = repo.engine.url.database
        if repo.engine.dialect.name == "sqlite":
            assert database is not None
            assert not files_hold(Path(database), marker)
        assert await repo.finish_erasures(wait=0.1) is True

    @pytest.mark.parametrize("vacuum", [1, "FULL", None, "yes"])
    async def test_a_bad_vacuum_is_refused_before_anything_is_erased(
        self, repo: sr.SnapshotRepository[Doc], vacuum: object
    ):
        await repo.upsert_latest(snap("u", "kept"))
        with pytest.raises(sr.SnapshotValidationError, match="vacuum must be"):
            await repo.erase("u", vacuum=vacuum)  # type: ignore[arg-type]
        assert await repo.get_latest("u") is not None

    async def test_a_bad_user_id_is_refused(self, repo: sr.SnapshotRepository[Doc]):
        with pytest.raises(sr.SnapshotValidationError):
            await repo.delete("")
