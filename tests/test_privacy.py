"""GDPR and the data lifecycle: erasure without trace, receipts, export, retention, expiry."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import snapshot_repo as sr
from snapshot_repo.backends import sqlite_commit
from snapshot_repo.retention import RetentionPolicy
from tests.support.databases import Backend, Cart

from .test_repository import snap, stored_rows

KEY = b"an application secret of 32 bytes"


def sqlite_files(url: str) -> list[Path]:
    path = Path(url.removeprefix("sqlite+aiosqlite:///"))
    return [p for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]


def wal_size(database: Path) -> int:
    return Path(f"{database}-wal").stat().st_size


# --- erasure leaves no trace ---------------------------------------------------------


async def test_erased_state_cannot_be_found_in_the_sqlite_files(tmp_path, sqlite_template):
    """Write states holding a unique marker, erase, then search the raw files: nothing."""
    path = tmp_path / "erase.db"
    path.write_bytes(sqlite_template.read_bytes())
    url = f"sqlite+aiosqlite:///{path}"
    marker = f"MARKER-{uuid.uuid4().hex}"
    async with sr.SnapshotRepository.from_url(url, Cart) as repo:
        for n in range(30):
            await repo.upsert_latest(snap("victim", f"{marker}-{n}", "x" * 200))
        await repo.upsert_latest(snap("bystander", "kept"))
        found = b"".join(p.read_bytes() for p in sqlite_files(url))
        assert marker.encode() in found  # the search can find it while it is there
        assert await repo.delete("victim") == 30
        assert await repo.get_latest("bystander") is not None
        after = b"".join(p.read_bytes() for p in sqlite_files(url))
        assert marker.encode() not in after
    after_close = b"".join(p.read_bytes() for p in sqlite_files(url))
    assert marker.encode() not in after_close


def copy_of_template(tmp_path: Path, sqlite_template: Path) -> str:
    path = tmp_path / "batch.db"
    path.write_bytes(sqlite_template.read_bytes())
    return f"sqlite+aiosqlite:///{path}"


def counting_checkpoints(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """Spy on the library's WAL checkpoint (it still runs): one entry per checkpoint."""
    calls: list[None] = []
    real = sqlite_commit.truncate_wal

    def spy(conn: sqlite3.Connection, wait_ms: int, busy_ms: int) -> bool:
        calls.append(None)
        return real(conn, wait_ms, busy_ms)

    monkeypatch.setattr(sqlite_commit, "truncate_wal", spy)
    return calls


async def erase_as_batch(how: str, url: str, repo: sr.SnapshotRepository[Cart]) -> int:
    if how == "reap":
        return await repo.reap_expired(batch_size=100)
    if how == "purge":
        return await repo.purge_all(confirm="default")
    return await sr.erase_user(url, "victim")  # the same person in every namespace


@pytest.mark.parametrize("how", ["reap", "purge", "erase_user"])
async def test_batch_erasures_leave_no_trace_after_one_checkpoint(
    tmp_path, sqlite_template, monkeypatch, how
):
    """Reaping, purging and erasing a person everywhere share one checkpoint per batch."""
    url = copy_of_template(tmp_path, sqlite_template)
    marker = f"MARKER-{uuid.uuid4().hex}"
    async with sr.SnapshotRepository.from_url(url, Cart) as repo:
        for n in range(6):
            if how == "erase_user":
                namespace = sr.SnapshotRepository.from_url(url, Cart, namespace=f"ns{n}")
                async with namespace:
                    await namespace.upsert_latest(snap("victim", f"{marker}-{n}", "x" * 200))
            else:
                await repo.upsert_latest(
                    snap(f"victim{n}", f"{marker}-{n}", "x" * 200), ttl=timedelta(0)
                )
        assert marker.encode() in b"".join(p.read_bytes() for p in sqlite_files(url))
        checkpoints = counting_checkpoints(monkeypatch)
        assert await erase_as_batch(how, url, repo) == 6
        assert len(checkpoints) == 1  # not one per erasure
        assert marker.encode() not in b"".join(p.read_bytes() for p in sqlite_files(url))


async def test_a_batch_failing_part_way_leaves_no_trace_of_what_it_erased(
    tmp_path, sqlite_template
):
    """The checkpoint also runs when an erasure fails: the erasures before it leave no trace."""
    url = copy_of_template(tmp_path, sqlite_template)
    marker = f"MARKER-{uuid.uuid4().hex}"
    async with sr.SnapshotRepository.from_url(url, Cart) as repo:
        for n in range(4):
            await repo.upsert_latest(snap(f"u{n}", f"{marker}-{n}-", "x" * 200))
        async with repo.engine.begin() as conn:
            await conn.exec_driver_sql(
                "CREATE TRIGGER refuse_erasure BEFORE DELETE ON snapshot_history "
                "WHEN OLD.user_id = 'u2' BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
            )
        with pytest.raises(sr.StorageError):
            await repo.purge_all(confirm="default")
        files = b"".join(p.read_bytes() for p in sqlite_files(url))
        for n in (0, 1):  # erased before the failure
            assert await repo.get_latest(f"u{n}") is None
            assert f"{marker}-{n}-".encode() not in files
        for n in (2, 3):  # the failed erasure rolled back; the rest never ran
            assert await repo.get_latest(f"u{n}") is not None


async def test_without_secure_delete_erasure_is_faster_and_leaves_bytes(tmp_path, sqlite_template):
    """The documented trade-off of `sqlite_secure_delete=False`: no zeroing, no checkpoint."""
    path = tmp_path / "plain.db"
    path.write_bytes(sqlite_template.read_bytes())
    url = f"sqlite+aiosqlite:///{path}"
    marker = f"MARKER-{uuid.uuid4().hex}"
    settings = sr.EngineSettings(sqlite_secure_delete=False)
    async with sr.SnapshotRepository.from_url(url, Cart, settings=settings) as repo:
        for n in range(5):
            await repo.upsert_latest(snap("victim", f"{marker}-{n}"))
        assert await repo.delete("victim") == 5
        assert await repo.get_history("victim") == []
        assert wal_size(path) > 0  # not checkpointed and truncated
        leftover = b"".join(p.read_bytes() for p in sqlite_files(url))
        assert marker.encode() in leftover
        await repo.erase("victim", vacuum=True)  # the explicit checkpoint still works
        assert wal_size(path) == 0


async def test_erase_with_vacuum_on_postgres(postgres_url: str):
    """Postgres by nature: VACUUM after the erasure; the rows are gone for every reader."""
    async with sr.SnapshotRepository.from_url(postgres_url, Cart) as repo:
        for n in range(5):
            await repo.upsert_latest(snap("victim", str(n)))
        assert await repo.erase("victim", vacuum=True) == 5
        assert await repo.get_history("victim") == []
        assert await stored_rows(repo, "victim") == (0, [])


# --- receipts ----------------------------------------------------------------------------


async def test_every_erasure_writes_a_receipt_found_by_keyed_hash(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Cart, erasure_key=KEY) as repo:
        assert await repo.erasure_receipt("alice@example.com") is None
        for n in range(3):
            await repo.upsert_latest(snap("alice@example.com", str(n)))
        before = datetime.now(UTC)
        await repo.delete("alice@example.com")
        receipt = await repo.erasure_receipt("alice@example.com")
        assert receipt is not None
        assert (receipt.versions_erased, receipt.cause) == (3, "delete")
        assert before <= receipt.erased_at <= datetime.now(UTC)
        assert "alice" not in receipt.subject
        assert len(receipt.subject) == 64
        assert await repo.delete("alice@example.com") == 0  # nothing erased: no new receipt
        again = await repo.erasure_receipt("alice@example.com")
        assert again == receipt
        async with repo.engine.connect() as conn:
            rows = (await conn.exec_driver_sql("SELECT * FROM snapshot_erasure_receipts")).all()
        assert len(rows) == 1
        assert "alice" not in repr(rows)  # the id never appears in clear


async def test_receipts_need_the_key_and_the_right_key(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Cart, erasure_key=KEY) as repo:
        await repo.upsert_latest(snap("bob", "x"))
        await repo.erase("bob")
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as keyless:
        with pytest.raises(sr.ConfigurationError, match="erasure_key"):
            await keyless.erasure_receipt("bob")
    other_key = b"another secret of enough length!"
    async with sr.SnapshotRepository.from_url(backend.url, Cart, erasure_key=other_key) as wrong:
        assert await wrong.erasure_receipt("bob") is None
    with pytest.raises(sr.ConfigurationError, match="erasure_key"):
        sr.SnapshotRepository.from_url(backend.url, erasure_key=b"short")


# --- subject-access export ------------------------------------------------------------------


async def test_export_equals_what_get_history_returns(repo: sr.SnapshotRepository[Cart]):
    for n in range(7):
        await repo.upsert_latest(snap("person", str(n)), actor="app", metadata={"n": n})
    document = await repo.export_user("person")
    json.dumps(document)  # JSON-serialisable as it is
    history = await repo.get_history("person", limit=100)
    assert document["user_id"] == "person"
    versions = document["versions"]
    assert isinstance(versions, list)
    assert [v["version"] for v in versions] == [s.version for s in history]  # type: ignore[index]
    for exported, snapshot in zip(versions, history, strict=True):
        assert exported["state"] == snapshot.state.model_dump()  # type: ignore[index]
        assert exported["metadata"] == snapshot.metadata  # type: ignore[index]
        assert exported["actor"] == "app"  # type: ignore[index]
        created = datetime.fromisoformat(exported["created_at"])  # type: ignore[index,arg-type]
        assert created == snapshot.created_at


async def test_export_streams_in_pages(repo: sr.SnapshotRepository[Cart], monkeypatch):
    import snapshot_repo._privacy as privacy

    monkeypatch.setattr(privacy, "_EXPORT_PAGE", 2)
    for n in range(5):
        await repo.upsert_latest(snap("p", str(n)))
    lines = [line async for line in repo.export_user_lines("p")]
    assert len(lines) == 6
    assert [json.loads(line)["version"] for line in lines[1:]] == [5, 4, 3, 2, 1]
    assert (await repo.export_user("nobody"))["versions"] == []


# --- retention ------------------------------------------------------------------------------


async def test_prune_history_keeps_the_latest_and_the_newest_n(repo: sr.SnapshotRepository[Cart]):
    for n in range(10):
        await repo.upsert_latest(snap("a", str(n)))
    for n in range(3):
        await repo.upsert_latest(snap("b", str(n)))
    assert await repo.prune_history("a", keep_last=4) == 6
    assert await stored_rows(repo, "a") == (10, [7, 8, 9, 10])
    assert await repo.prune_history(keep_last=1) == 5  # all users: a 3 older, b 2 older
    assert await stored_rows(repo, "a") == (10, [10])
    assert await stored_rows(repo, "b") == (3, [3])
    assert await repo.prune_history(keep_last=1) == 0


async def test_prune_by_age_never_drops_the_latest(repo: sr.SnapshotRepository[Cart]):
    for n in range(3):
        await repo.upsert_latest(snap("a", str(n)))
    assert await repo.prune_history("a", older_than=timedelta(days=1)) == 0
    assert await repo.prune_history("a", older_than=timedelta(0)) == 2
    assert await stored_rows(repo, "a") == (3, [3])
    latest = await repo.get_latest("a")
    assert latest is not None
    assert latest.version == 3


async def test_prune_in_batches_reports_progress(repo: sr.SnapshotRepository[Cart]):
    for user in range(5):
        for n in range(3):
            await repo.upsert_latest(snap(f"u{user}", str(n)))
    seen: list[int] = []
    assert await repo.prune_history(keep_last=1, batch_size=2, progress=seen.append) == 10
    assert seen == [4, 8, 10]


async def test_a_retention_policy_prunes_on_every_write(backend: Backend):
    policy = RetentionPolicy(keep_last=3)
    async with sr.SnapshotRepository.from_url(backend.url, Cart, retention=policy) as repo:
        for n in range(6):
            await repo.upsert_latest(snap("u", str(n)))
        assert await stored_rows(repo, "u") == (6, [4, 5, 6])
        assert (await repo.upsert_latest(snap("u", "7"))).version == 7
        assert await stored_rows(repo, "u") == (7, [5, 6, 7])


@pytest.mark.parametrize(
    "arguments",
    [{}, {"keep_last": 0}, {"keep_last": "2"}, {"older_than": timedelta(seconds=-1)}],
)
async def test_prune_needs_sensible_bounds(repo: sr.SnapshotRepository[Cart], arguments):
    with pytest.raises(sr.SnapshotValidationError):
        await repo.prune_history(**arguments)


# --- expiry -----------------------------------------------------------------------------------


async def test_expired_snapshots_read_as_absent(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("gone", "x"), ttl=timedelta(0))  # expired at once
    await repo.upsert_latest(snap("later", "x"), ttl=timedelta(hours=1))
    await repo.upsert_latest(snap("forever", "x"))
    assert await repo.get_latest("gone") is None
    assert not await repo.exists("gone")
    assert await repo.get_latest("later") is not None
    assert set(await repo.get_latest_many(["gone", "later", "forever"])) == {"later", "forever"}
    assert await repo.list_users() == ["forever", "later"]
    assert await repo.count_users() == 2


async def test_expiry_boundary_is_exactly_at_the_deadline(repo: sr.SnapshotRepository[Cart]):
    stored = await repo.upsert_latest(snap("u", "x"), ttl=timedelta(seconds=3600))
    assert stored.created_at is not None
    deadline = stored.created_at + timedelta(seconds=3600)
    async with repo.engine.connect() as conn:
        # Move the deadline to now, exactly, through the table (no clock games).
        now = datetime.now(UTC)
        # The driver's placeholder, and the value as the column holds it: SQLite and
        # MariaDB (DATETIME(6)) store naive UTC, Postgres a timestamptz.
        placeholder, value = {
            "sqlite": ("?", now.replace(tzinfo=None)),
            "mariadb": ("%s", now.replace(tzinfo=None)),
            "postgresql": ("$1", now),
        }[repo.engine.dialect.name]
        await conn.exec_driver_sql(
            f"UPDATE snapshot_latest SET expires_at = {placeholder}", (value,)
        )
        await conn.commit()
    assert deadline > now
    assert await repo.get_latest("u") is None  # at or after the deadline: expired


async def test_a_write_without_ttl_cancels_the_expiry(repo: sr.SnapshotRepository[Cart]):
    await repo.upsert_latest(snap("u", "a"), ttl=timedelta(0))
    assert await repo.get_latest("u") is None
    renewed = await repo.upsert_latest(snap("u", "b"))
    assert renewed.version == 2  # the expired row was rewritten, not reaped
    latest = await repo.get_latest("u")
    assert latest == renewed
    assert await repo.reap_expired() == 0


async def test_reap_erases_expired_users_with_receipts(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Cart, erasure_key=KEY) as repo:
        for n in range(5):
            await repo.upsert_latest(snap(f"temp{n}", "x"), ttl=timedelta(0))
        await repo.for_tenant("acme").upsert_latest(snap("tenant-temp", "x"), ttl=timedelta(0))
        await repo.upsert_latest(snap("keep", "x"), ttl=timedelta(days=1))
        seen: list[int] = []
        assert await repo.reap_expired(batch_size=2, progress=seen.append) == 6
        assert seen[-1] == 6
        assert await stored_rows(repo, "temp0") == (0, [])
        receipt = await repo.erasure_receipt("temp3")
        assert receipt is not None
        assert receipt.cause == "expired"
        assert await repo.get_latest("keep") is not None
        assert await repo.reap_expired() == 0


@pytest.mark.parametrize("ttl", [timedelta(seconds=-1), 5, "1h"])
async def test_bad_ttls_are_refused(repo: sr.SnapshotRepository[Cart], ttl):
    with pytest.raises(sr.SnapshotValidationError, match="ttl"):
        await repo.upsert_latest(snap("u", "x"), ttl=ttl)
    assert await stored_rows(repo, "u") == (0, [])


# --- no personal data in logs or errors ---------------------------------------------------------


async def test_logs_and_errors_never_show_ids_or_payloads(
    backend: Backend, caplog: pytest.LogCaptureFixture
):
    secret_user = "jane.doe@example.com"
    secret_state = f"PAYLOAD-{uuid.uuid4().hex}"
    texts: list[str] = []
    # The library's own records; drivers' DEBUG logs print SQL parameters by design
    # (the README says to keep aiosqlite and asyncpg above DEBUG in production).
    caplog.set_level(logging.DEBUG, logger="snapshot_repo")
    async with sr.SnapshotRepository.from_url(backend.url, Cart, erasure_key=KEY) as repo:
        stored = await repo.upsert_latest(snap(secret_user, secret_state))
        texts.append(repr(stored))
        texts.append(repr(await repo.get_latest(secret_user)))
        attempts = [
            repo.upsert_latest(snap(secret_user, secret_state), expected_version=9),
            repo.upsert_latest(
                sr.Snapshot.model_construct(
                    user_id=secret_user, state={"items": secret_state}, schema_version=None
                )
            ),
            repo.get_version(secret_user, 99),
            repo.diff(secret_user, 1, 5),
        ]
        for attempt in attempts:
            try:
                await attempt
            except sr.SnapshotRepoError as exc:
                texts.append(str(exc))
                texts.append(repr(exc))
        async with repo.changes() as stream:
            await repo.delete(secret_user)
            texts.append(repr(await asyncio.wait_for(anext(stream), timeout=5)))
    async with sr.SnapshotRepository.from_url(
        "postgresql+asyncpg://postgres@127.0.0.1:1/x",
        Cart,
        settings=sr.EngineSettings(connect_timeout=1),
    ) as down:
        try:
            await down.get_latest(secret_user)
        except sr.StorageError as exc:
            texts.append(str(exc))
        assert await down.health_check() is False
    texts.extend(r.getMessage() for r in caplog.records if r.name.startswith("snapshot_repo"))
    everything = "\n".join(texts)
    assert len(texts) > 8
    assert secret_user not in everything
    assert secret_state not in everything
    assert "jane..." in everything  # redacted ids still let operators correlate


def test_redaction_can_be_turned_off_and_on():
    try:
        sr.set_redaction(False)
        assert "alice@example.com" in repr(sr.Snapshot(user_id="alice@example.com", state={}))
        assert "s3cr3t" not in repr(sr.Snapshot(user_id="a", state={"x": "s3cr3t"}))
    finally:
        sr.set_redaction(True)
    assert "alice@example.com" not in repr(sr.Snapshot(user_id="alice@example.com", state={}))
