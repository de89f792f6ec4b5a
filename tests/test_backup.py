"""Whole-store backup and restore: `dump` to JSON Lines, `load` into an empty store of either kind.

The round trips compare the reads of the public API (latest and full history
of every user in every tenant and namespace, user listings, erasure receipts)
and, underneath, every row of the latest, history and receipt tables, payload
bytes and expiries included.
"""

from __future__ import annotations

import io
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic_core import from_json, to_json
from sqlalchemy import Table, event, func, insert, make_url, select
from sqlalchemy.ext.asyncio import AsyncEngine

import snapshot_repo as sr
from snapshot_repo import migrate
from snapshot_repo.backends.statements import FEED_POSITION_COLUMNS
from snapshot_repo.backup import DUMP_FORMAT, DUMP_FORMAT_VERSION, dump, load
from snapshot_repo.engine import create_engine
from snapshot_repo.tables import (
    changes_table,
    erasure_receipts_table,
    history_table,
    latest_table,
    user_counts_table,
)
from tests.support.databases import Backend, MariadbServer, PostgresServer, run_blocking

from .support.feed import feed_entries

TRICKY = (
    "nul \x00 emoji 🙂👩‍👩‍👧 quotes \"'` backslash \\ slash / newline \n cr \r tab \t "
    "nel \x85 ls \u2028 ps \u2029 bom \ufeff del \x7f cjk 用户 rtl \u202e"
)
TRICKY_REASON = TRICKY.replace("\x00", "")  # Postgres text cannot hold NUL; reasons refuse it
SAMPLE_ROWS = 7

ERASURE_KEY = "backup-tests-erasure-key"
ERASED_USERS = ("erased", "reborn", "zed")
# Rows of one namespace must share a schema version a repository can read; "prefs"
# rows are stored under schema version 2.
OPTIONS: dict[str, dict[str, Any]] = {"prefs": {"schema_version": 2}}


def repository(url: str, namespace: str) -> sr.SnapshotRepository[Any]:
    """A JSON repository of `namespace` that writes (and reads) erasure receipts."""
    return sr.SnapshotRepository.from_url(
        url, namespace=namespace, erasure_key=ERASURE_KEY, **OPTIONS.get(namespace, {})
    )


@asynccontextmanager
async def engine_for(url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def migrated(url: str) -> str:
    async with engine_for(url) as engine:
        await migrate.upgrade(engine)
    return url


def sqlite_copy(template: Path, directory: Path) -> str:
    path = directory / f"{uuid.uuid4().hex}.db"
    shutil.copyfile(template, path)
    return f"sqlite+aiosqlite:///{path}"


# --- data -----------------------------------------------------------------------


async def populate_sample(url: str) -> None:
    """Seven history rows and one erasure receipt, in two tenants and two namespaces."""
    async with (
        sr.SnapshotRepository.from_url(url, namespace="carts", schema_version=3) as carts,
        repository(url, "prefs") as prefs,
    ):
        await carts.upsert_latest(
            sr.Snapshot(
                user_id="alice", state={"items": ["apple"], "note": TRICKY}, schema_version=1
            ),
            idempotency_key="alice-1",
            actor="checkout-service",
            reason=TRICKY_REASON,
            metadata={"nul": "\x00", "nested": {"list": [1, 2.5, None, True]}, "😀": TRICKY},
        )
        await carts.upsert_latest(
            sr.Snapshot(user_id="alice", state={"items": []}, schema_version=1)
        )
        await carts.upsert_latest(
            sr.Snapshot(user_id="alice", state={"big": 2**70, "f": 0.1}, schema_version=3),
            actor="migration",
        )
        await prefs.upsert_latest(
            sr.Snapshot(user_id="Bob", state={"theme": "dark"}), ttl=timedelta(days=3650)
        )
        await prefs.upsert_latest(sr.Snapshot(user_id="zed", state={}))
        assert await prefs.delete("zed") == 1  # leaves a receipt
        acme = carts.for_tenant("acme")
        await acme.upsert_latest(
            sr.Snapshot(user_id="ünï 用户 🙂", state={"\x00key": TRICKY}, schema_version=1)
        )
        await acme.upsert_many(
            [
                sr.Snapshot(user_id="ünï 用户 🙂", state={"n": 2}, schema_version=1),
                sr.Snapshot(user_id="carol", state={"n": 1}, schema_version=1),
            ],
            reason="batch",
        )


@pytest.fixture(scope="session")
def sample_dump(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A dump of `populate_sample`, made once: dumps do not depend on the backend."""
    url = sqlite_copy(sqlite_template, tmp_path_factory.mktemp("sample"))

    async def make() -> bytes:
        await populate_sample(url)
        out = io.BytesIO()
        async with engine_for(url) as engine:
            assert await dump(engine, out) == SAMPLE_ROWS
        return out.getvalue()

    return run_blocking(make())


@pytest.fixture
def sample_lines(sample_dump: bytes) -> list[str]:
    lines = sample_dump.decode().split("\n")
    assert lines[-1] == ""
    return [line + "\n" for line in lines[:-1]]


async def populate_store(url: str) -> None:
    """Three tenants by two namespaces, through every write path of the library."""
    for namespace in ("carts", "prefs"):
        async with repository(url, namespace) as root:
            for tenant in ("", "acme", "globex ✓"):
                repo = root.for_tenant(tenant) if tenant else root
                await repo.upsert_latest(
                    sr.Snapshot(user_id="alice", state={"v": 1, "s": TRICKY}),
                    idempotency_key="alice-1",
                    actor="svc",
                    reason=TRICKY_REASON,
                    metadata={"tenant": tenant, "nul": "\x00", "deep": {"a": [1.5, None]}},
                )
                await repo.upsert_latest(
                    sr.Snapshot(user_id="alice", state={"v": 2}),
                    expected_version=1,
                    idempotency_key="alice-2",
                )
                await repo.upsert_latest(sr.Snapshot(user_id="alice", state={"v": 3}))
                for user_id in ("Bob", "bob", 'o\'brien "q"', "ünï 用户 🙂", "x" * 255):
                    await repo.upsert_latest(
                        sr.Snapshot(user_id=user_id, state={"who": user_id, "t": TRICKY}),
                        expected_version=0,
                    )
                await repo.upsert_many(
                    [
                        sr.Snapshot(user_id="carol", state={"n": 1}),
                        sr.Snapshot(user_id="dave", state={"n": 1}),
                        sr.Snapshot(user_id="carol", state={"n": 2, "big": -(2**80)}),
                    ],
                    actor="bulk",
                    metadata={"batch": True},
                )
                # Expiry lives on the latest row only.
                await repo.upsert_latest(
                    sr.Snapshot(user_id="ttl-later", state={}), ttl=timedelta(days=30)
                )
                await repo.upsert_latest(
                    sr.Snapshot(user_id="ttl-past", state={"n": 1}), ttl=timedelta(days=1)
                )
                await repo.upsert_latest(
                    sr.Snapshot(user_id="ttl-past", state={"n": 2}), ttl=timedelta(0)
                )  # expired, not reaped: reads as absent
                await repo.upsert_latest(
                    sr.Snapshot(user_id="ttl-cleared", state={"n": 1}), ttl=timedelta(days=1)
                )
                await repo.upsert_latest(sr.Snapshot(user_id="ttl-cleared", state={"n": 2}))
                # Erasures leave receipts; a user can come back at version 1.
                await repo.upsert_latest(sr.Snapshot(user_id="erased", state={}))
                await repo.delete("erased")
                await repo.upsert_latest(sr.Snapshot(user_id="reborn", state={"life": 1}))
                await repo.upsert_latest(sr.Snapshot(user_id="reborn", state={"life": 1.5}))
                await repo.delete("reborn")
                await repo.upsert_latest(sr.Snapshot(user_id="reborn", state={"life": 2}))


# --- reading a whole store ------------------------------------------------------------


def snapshot_columns(table: Table) -> list[Any]:
    """A snapshot table's columns without history's feed positions, which are the
    change feed's (a dump does not carry the feed: it starts again at the load)."""
    return [column for column in table.c if column.name not in FEED_POSITION_COLUMNS]


async def table_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the snapshot tables: latest and history in Python order (the
    databases' collations differ), receipts in id order without their ids."""
    receipts = erasure_receipts_table
    async with engine_for(url) as engine, engine.connect() as conn:
        rows = {
            table.name: sorted(
                tuple(row) for row in (await conn.execute(select(*snapshot_columns(table)))).all()
            )
            for table in (latest_table, history_table)
        }
        columns = [column for column in receipts.c if column.name != "id"]
        query = select(*columns).order_by(receipts.c.id)
        rows[receipts.name] = [tuple(row) for row in (await conn.execute(query)).all()]
        return rows


async def changes_count(url: str) -> int:
    async with engine_for(url) as engine, engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(changes_table)) or 0)


async def all_reads(url: str) -> dict[tuple[str, ...], Any]:
    """Through the public API: every user's latest and history, each scope's listing,
    and the erasure receipts of the erased users."""
    async with engine_for(url) as engine, engine.connect() as conn:
        keys = [history_table.c.tenant, history_table.c.namespace, history_table.c.user_id]
        users = {tuple(row) for row in (await conn.execute(select(*keys).distinct())).all()}
    reads: dict[tuple[str, ...], Any] = {}
    for tenant, namespace in sorted({(tenant, namespace) for tenant, namespace, _ in users}):
        async with repository(url, namespace) as root:
            repo = root.for_tenant(tenant) if tenant else root
            listed: list[str] = []
            while page := await repo.list_users(after=listed[-1] if listed else None, limit=3):
                listed.extend(page)
            reads[("listing", tenant, namespace)] = (listed, await repo.count_users())
            for user_id in sorted(u for t, n, u in users if (t, n) == (tenant, namespace)):
                latest = await repo.get_latest(user_id)
                history = await repo.get_history(user_id, limit=1000)
                if latest is not None:
                    assert history[0] == latest
                reads[(tenant, namespace, user_id)] = (
                    None if latest is None else latest.model_dump(),
                    [snapshot.model_dump() for snapshot in history],
                )
            for user_id in ERASED_USERS:
                receipt = await repo.erasure_receipt(user_id)
                reads[("receipt", tenant, namespace, user_id)] = (
                    None if receipt is None else receipt.model_dump()
                )
    return reads


def newest_history_rows(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    newest: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for row in rows:  # (tenant, namespace, user_id, version, ...)
        if row[:3] not in newest or row[3] > newest[row[:3]][3]:
            newest[row[:3]] = row
    return sorted(newest.values())


def row_lines(dumped: bytes) -> list[bytes]:
    """The row lines of a dump, sorted: two dumps of equal stores have equal row lines."""
    lines = dumped.split(b"\n")
    assert lines[-1] == b""
    return sorted(lines[1:-2])


async def dump_bytes(url: str, **kwargs: Any) -> bytes:
    out = io.BytesIO()
    async with engine_for(url) as engine:
        await dump(engine, out, **kwargs)
    return out.getvalue()


async def load_lines(url: str, lines: Any, **kwargs: Any) -> int:
    async with engine_for(url) as engine:
        return await load(engine, lines, **kwargs)


async def assert_empty(url: str) -> None:
    assert await table_rows(url) == {
        "snapshot_latest": [],
        "snapshot_history": [],
        "snapshot_erasure_receipts": [],
    }
    assert await changes_count(url) == 0


async def assert_same_store(source: str, target: str) -> None:
    source_rows, target_rows = await table_rows(source), await table_rows(target)
    assert target_rows == source_rows  # payload bytes, timestamps, expiries and all
    async with engine_for(target) as engine, engine.connect() as conn:
        counts = user_counts_table
        per_scope = select(counts.c.tenant, counts.c.namespace, counts.c.delta)
        scopes = {(t, n) for t, n, *_ in source_rows["snapshot_latest"]}
        # The load counted each scope's users once, in one row per scope (a +1 per user
        # inserted, as its inserts left them, would be as exact but slower to read).
        assert sorted((await conn.execute(per_scope)).all()) == sorted(
            (t, n, sum(1 for row in source_rows["snapshot_latest"] if row[:2] == (t, n)))
            for t, n in scopes
        )
    reads = await all_reads(source)
    assert len(reads) > 1
    assert await all_reads(target) == reads


# --- round trips ----------------------------------------------------------------------


async def test_the_latest_row_is_always_the_newest_history_row(backend: Backend):
    """The invariant that lets a dump leave out snapshot_latest, over every write path."""
    await populate_store(backend.url)
    rows = await table_rows(backend.url)
    shared = len(snapshot_columns(history_table))  # latest adds expires_at after these
    latest = [row[:shared] for row in rows["snapshot_latest"]]
    assert len(rows["snapshot_history"]) > len(latest) > 10
    assert latest == newest_history_rows(rows["snapshot_history"])
    assert [c.name for c in latest_table.c if c.name not in history_table.c] == [
        "expires_at"
    ]  # if this grows, the dump must carry the new latest-only columns too
    assert [c.name for c in history_table.c if c.name not in latest_table.c] == list(
        FEED_POSITION_COLUMNS
    )  # and any other history-only column too


async def test_a_dump_loaded_into_an_empty_database_gives_identical_reads(backend: Backend):
    await populate_store(backend.url)
    history_rows = len((await table_rows(backend.url))["snapshot_history"])
    dumped = await dump_bytes(backend.url)
    target = await migrated(backend.fresh_url())

    assert await load_lines(target, io.BytesIO(dumped)) == history_rows

    await assert_same_store(backend.url, target)
    assert await changes_count(target) == 0  # the feed starts at the load
    assert row_lines(await dump_bytes(target)) == row_lines(dumped)


DIALECTS = {"sqlite": "sqlite", "postgres": "postgresql", "mariadb": "mariadb"}


@pytest.mark.parametrize(
    ("source_kind", "target_kind"),
    [(source, target) for source in DIALECTS for target in DIALECTS if source != target],
)
async def test_a_dump_of_one_database_loads_into_each_other(
    source_kind: str, target_kind: str, request: pytest.FixtureRequest, tmp_path: Path
):
    """Between every pair of the three databases: same reads, and the target dumps back
    the same row lines byte for byte."""

    async def fresh(kind: str) -> str:
        if kind == "sqlite":
            return sqlite_copy(request.getfixturevalue("sqlite_template"), tmp_path)
        server: PostgresServer | MariadbServer = request.getfixturevalue(f"{kind}_server")
        return await migrated(server.create_database())

    source, target = await fresh(source_kind), await fresh(target_kind)
    await populate_store(source)
    dumped = await dump_bytes(source)
    header = from_json(dumped.split(b"\n", 1)[0])
    assert header["dialect"] == DIALECTS[source_kind]

    await load_lines(target, io.BytesIO(dumped))

    await assert_same_store(source, target)
    # Dumped back out of the other database, every row line is byte for byte the same.
    assert row_lines(await dump_bytes(target)) == row_lines(dumped)


async def test_writes_continue_after_a_load(backend: Backend):
    await populate_store(backend.url)
    target = await migrated(backend.fresh_url())
    await load_lines(target, io.BytesIO(await dump_bytes(backend.url)))

    async with sr.SnapshotRepository.from_url(target, namespace="carts") as root:
        repo = root.for_tenant("acme")
        latest = await repo.get_latest("alice")
        assert latest is not None
        assert latest.version == 3

        replayed = await repo.upsert_latest(
            sr.Snapshot(user_id="alice", state={"v": "other"}), idempotency_key="alice-1"
        )
        assert replayed.version == 1
        assert replayed.state == {"v": 1, "s": TRICKY}
        assert replayed.actor == "svc"
        assert await repo.get_latest("alice") == latest  # the replay wrote nothing

        nxt = await repo.upsert_latest(sr.Snapshot(user_id="alice", state={"v": 4}))
        assert nxt.version == latest.version + 1
        cas = await repo.upsert_latest(
            sr.Snapshot(user_id="alice", state={"v": 5}),
            expected_version=nxt.version,
            idempotency_key="alice-5",
        )
        assert cas.version == nxt.version + 1
        bulk = await repo.upsert_many([sr.Snapshot(user_id="carol", state={"n": 3})])
        assert bulk[0].version == 3
        with pytest.raises(sr.VersionConflictError):
            await repo.upsert_latest(
                sr.Snapshot(user_id="Bob", state={}), expected_version=0
            )  # Bob exists: create-only refuses
        assert [s.version for s in await repo.get_history("alice")] == [5, 4, 3, 2, 1]
    # The feed starts at the load. (Read from the table: on a shared Postgres server
    # changes_since may hold entries back while other databases' transactions run.)
    async with engine_for(target) as engine, engine.connect() as conn:
        entries = await feed_entries(conn)
    assert entries == [
        ("alice", 4, "write"),
        ("alice", 5, "write"),
        ("carol", 3, "write"),
    ]


# --- what is refused --------------------------------------------------------------------


@pytest.mark.parametrize("contents", ["rows", "feed only"])
async def test_loading_into_a_database_that_is_not_empty_is_refused(
    backend: Backend, sample_lines: list[str], contents: str
):
    async with sr.SnapshotRepository.from_url(backend.url, namespace="carts") as repo:
        await repo.upsert_latest(sr.Snapshot(user_id="alice", state={"mine": True}))
        if contents == "feed only":  # the feed still records the erasure
            await repo.delete("alice")
    before = await table_rows(backend.url)
    feed_before = await changes_count(backend.url)

    table = "snapshot_latest" if contents == "rows" else "snapshot_changes"
    with pytest.raises(sr.ConfigurationError, match=f"empty database, but {table} has rows"):
        await load_lines(backend.url, sample_lines)

    assert await table_rows(backend.url) == before
    assert await changes_count(backend.url) == feed_before


def _edit_row(edit: Callable[[dict[str, Any]], object]) -> Callable[[str], str]:
    def apply(line: str) -> str:
        row = from_json(line)
        edit(row)
        return to_json(row).decode() + "\n"

    return apply


def _set(field: str, value: object) -> Callable[[str], str]:
    return _edit_row(lambda row: row.__setitem__(field, value))


BAD_LINES: dict[str, tuple[Callable[[str], str], str]] = {
    "not JSON": (lambda line: line[:-10] + "\n", "is not JSON"),
    "not an object": (lambda line: "[1, 2]\n", "not an object"),
    "NaN state": (
        lambda line: line.rsplit('"state":', 1)[0] + '"state":NaN}\n',
        "is not JSON",
    ),
    "missing field": (_edit_row(lambda row: row.pop("version")), "missing version"),
    "unknown field": (_set("extra", 1), "unknown extra"),
    "version as text": (_set("version", "4"), "version must be an integer, not str"),
    "version as bool": (_set("version", True), "version must be an integer, not bool"),
    "version zero": (_set("version", 0), "version must be between 1"),
    "version too big": (_set("version", 2**63), "version must be between 1"),
    "schema_version zero": (_set("schema_version", 0), "schema_version must be between 1"),
    "user_id too long": (_set("user_id", "u" * 256), "user_id is 256 characters long"),
    "user_id empty": (_set("user_id", ""), "user_id must not be empty"),
    "user_id control": (_set("user_id", "a\nb"), "user_id contains the control character"),
    "user_id number": (_set("user_id", 7), "user_id must be a string, not int"),
    "tenant too long": (_set("tenant", "t" * 256), "tenant is 256 characters long"),
    "namespace empty": (_set("namespace", ""), "namespace must not be empty"),
    "naive created_at": (_set("created_at", "2024-01-01T00:00:00"), "has no UTC offset"),
    "bad created_at": (_set("created_at", "yesterday"), "not an ISO 8601 time"),
    "created_at number": (_set("created_at", 0), "created_at must be an ISO 8601 string"),
    "NUL in reason": (_set("reason", "a\x00b"), "reason contains NUL"),
    "reason too long": (_set("reason", "r" * 4097), "reason is 4097 characters long"),
    "actor too long": (_set("actor", "a" * 256), "actor is 256 characters long"),
    "idempotency_key empty": (_set("idempotency_key", ""), "idempotency_key must not be empty"),
    "metadata not an object": (_set("metadata", [1]), "metadata must be a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
async def test_a_bad_line_is_refused_with_its_number_and_nothing_is_loaded(
    backend: Backend, sample_lines: list[str], case: str
):
    corrupt, message = BAD_LINES[case]
    lines = list(sample_lines)
    lines[5] = corrupt(lines[5])  # line 6: after two batches of two have been inserted
    loaded: list[int] = []

    with pytest.raises(
        sr.SnapshotValidationError, match=f"^line 6 of the dump.*{re.escape(message)}"
    ):
        await load_lines(backend.url, lines, batch_size=2, progress=loaded.append)

    assert loaded == [2, 4]  # rows were inserted, and then rolled back
    await assert_empty(backend.url)


END = '{{"end": true, "rows": {rows}, "receipts": {receipts}}}\n'
BAD_FRAMES: dict[str, tuple[Callable[[list[str]], list[str]], str]] = {
    "empty file": (lambda lines: [], "the dump is empty"),
    "blank lines only": (lambda lines: ["\n", "  \n"], "the dump is empty"),
    "no header": (lambda lines: lines[1:], "line 1 is not the header of a snapshot_repo dump"),
    "header not JSON": (lambda lines: ["hello\n", *lines[1:]], "line 1 is not the header"),
    "foreign format": (
        lambda lines: ['{"format": "other.dump", "version": 1}\n', *lines[1:]],
        "line 1 is not the header",
    ),
    "future format version": (
        lambda lines: [f'{{"format": "{DUMP_FORMAT}", "version": 2}}\n', *lines[1:]],
        "format version 2; this package reads version 1",
    ),
    "no end line": (lambda lines: lines[:-1], "has no end line after its 7 rows: it was cut short"),
    "cut after a row": (lambda lines: lines[:4], "has no end line after its 3 rows"),
    "end row count wrong": (
        lambda lines: [*lines[:-1], END.format(rows=6, receipts=1)],
        "end line (line 10) counts 6 rows, but 7 were read",
    ),
    "end receipt count wrong": (
        lambda lines: [*lines[:-1], END.format(rows=7, receipts=0)],
        "end line (line 10) counts 0 receipts, but 1 were read",
    ),
    "end line with a field more": (
        lambda lines: [*lines[:-1], '{"end": true, "rows": 7, "receipts": 1, "more": 1}\n'],
        "line 10 of the dump is not a valid end line",
    ),
    "end line without receipts": (
        lambda lines: [*lines[:-1], '{"end": true, "rows": 7}\n'],
        "line 10 of the dump is not a valid end line",
    ),
    "negative end count": (
        lambda lines: [*lines[:-1], END.format(rows=-1, receipts=1)],
        "line 10 of the dump: rows must be >= 0",
    ),
    "data after the end": (
        lambda lines: [*lines, lines[1]],
        "line 11 of the dump follows its end line (line 10)",
    ),
    "a user's versions descending": (
        lambda lines: [lines[0], lines[2], lines[1], *lines[3:]],
        "line 3 of the dump: version 1 follows version 2 of the same user (line 2)",
    ),
    "a version twice in a row": (
        lambda lines: [*lines[:2], lines[1], *lines[2:-1], END.format(rows=8, receipts=1)],
        "line 3 of the dump: version 1 follows version 1 of the same user (line 2)",
    ),
    "expiry on a version that is not the latest": (
        lambda lines: [
            lines[0],
            _set("expires_at", "2030-01-01T00:00:00.000000+00:00")(lines[1]),
            *lines[2:],
        ],
        "line 2 of the dump: expires_at is set on a version that is not the user's latest "
        "(line 3 has a newer one)",
    ),
    "bad expiry": (
        lambda lines: [*lines[:4], _set("expires_at", "soon")(lines[4]), *lines[5:]],
        "line 5 of the dump: expires_at 'soon' is not an ISO 8601 time",
    ),
    "receipt with a field more": (
        lambda lines: [*lines[:8], _edit_receipt("extra", 1)(lines[8]), lines[9]],
        "line 9 of the dump: unknown extra",
    ),
    "receipt subject too long": (
        lambda lines: [*lines[:8], _edit_receipt("subject", "s" * 65)(lines[8]), lines[9]],
        "line 9 of the dump: subject is 65 characters long",
    ),
    "receipt count negative": (
        lambda lines: [*lines[:8], _edit_receipt("versions_erased", -1)(lines[8]), lines[9]],
        "line 9 of the dump: versions_erased must be between 0",
    ),
    "receipt not an object": (
        lambda lines: [*lines[:8], '{"receipt": [1]}\n', lines[9]],
        "line 9 of the dump: the receipt is a JSON list, not an object",
    ),
}


def _edit_receipt(field: str, value: object) -> Callable[[str], str]:
    return _edit_row(lambda line: line["receipt"].__setitem__(field, value))


@pytest.mark.parametrize("case", list(BAD_FRAMES))
async def test_a_file_that_is_not_a_whole_ordered_dump_is_refused(
    backend: Backend, sample_lines: list[str], case: str
):
    reshape, message = BAD_FRAMES[case]
    with pytest.raises(sr.SnapshotValidationError, match=re.escape(message)):
        await load_lines(backend.url, reshape(sample_lines), batch_size=2)
    await assert_empty(backend.url)


@pytest.mark.parametrize(
    ("duplicate", "lines"),
    [
        ("key", "8 to 9"),  # alice's version 1 again: the history insert fails
        ("idempotency key", "8 to 9"),  # a new version with alice-1's key: likewise
        # Alice's fourth version, but not next to her others: history takes it, and
        # the second latest row for her fails at the end.
        ("user split apart", "9 to 9"),
    ],
)
async def test_rows_the_database_refuses_leave_it_empty(
    backend: Backend, sample_lines: list[str], duplicate: str, lines: str
):
    rows, receipt, end = sample_lines[1:8], sample_lines[8], END.format(rows=8, receipts=1)
    alice = from_json(rows[0])
    assert (alice["user_id"], alice["version"], alice["idempotency_key"]) == ("alice", 1, "alice-1")
    if duplicate == "idempotency key":
        alice["version"] = 99
    elif duplicate == "user split apart":
        alice["version"], alice["idempotency_key"] = 4, None
    dump_lines = [sample_lines[0], *rows, to_json(alice).decode() + "\n", receipt, end]

    with pytest.raises(sr.StorageError, match=rf"load \(the rows of lines {lines}\) failed"):
        await load_lines(backend.url, dump_lines, batch_size=2)

    await assert_empty(backend.url)


def create_empty_file(sqlite_url: str) -> None:
    """An empty file is an empty SQLite database: it exists but was never migrated."""
    Path(str(make_url(sqlite_url).database)).touch()


async def test_an_unmigrated_database_is_refused(backend: Backend, sample_lines: list[str]):
    fresh = backend.fresh_url()
    if backend.name == "sqlite":
        create_empty_file(fresh)
    with pytest.raises(sr.SchemaNotReadyError, match="never migrated"):
        await load_lines(fresh, sample_lines)
    with pytest.raises(sr.SchemaNotReadyError, match="never migrated"):
        await dump_bytes(fresh)
    async with engine_for(fresh) as engine:
        await migrate.upgrade(engine, "0004")
    with pytest.raises(sr.SchemaNotReadyError, match="is at 0004"):
        await load_lines(fresh, sample_lines)


async def test_a_missing_sqlite_file_is_refused_not_created(
    tmp_path: Path, sample_lines: list[str]
):
    path = tmp_path / "missing.db"
    with pytest.raises(sr.SchemaNotReadyError, match="does not exist"):
        await dump_bytes(f"sqlite+aiosqlite:///{path}")
    with pytest.raises(sr.SchemaNotReadyError, match="does not exist"):
        await load_lines(f"sqlite+aiosqlite:///{path}", sample_lines)
    assert not path.exists()


@pytest.mark.parametrize("batch_size", [0, -1, 10_001, True, 2.0])
async def test_a_bad_batch_size_is_refused_before_any_io(tmp_path: Path, batch_size: Any):
    url = f"sqlite+aiosqlite:///{tmp_path / 'never.db'}"
    with pytest.raises(sr.SnapshotValidationError, match="batch_size"):
        await dump_bytes(url, batch_size=batch_size)
    with pytest.raises(sr.SnapshotValidationError, match="batch_size"):
        await load_lines(url, [], batch_size=batch_size)
    assert not (tmp_path / "never.db").exists()


# --- streaming, progress and consistency ---------------------------------------------------


@pytest.fixture
async def sample_store(backend: Backend, sample_lines: list[str]) -> str:
    """The sample store (7 rows), loaded into the test's database."""
    assert await load_lines(backend.url, sample_lines) == SAMPLE_ROWS
    return backend.url


@pytest.mark.parametrize(
    ("batch_size", "calls", "queries"),
    [
        (2, [2, 4, 6, 7], 4),
        (1, [1, 2, 3, 4, 5, 6, 7], 8),  # the 8th finds nothing
        (7, [7], 2),
        (8, [7], 1),
    ],
)
async def test_dump_streams_in_keyset_batches(
    sample_store: str, batch_size: int, calls: list[int], queries: int
):
    statements: list[str] = []
    progress: list[int] = []
    out = io.BytesIO()
    async with engine_for(sample_store) as engine:

        def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if "FROM snapshot_history" in statement:
                statements.append(statement)

        event.listen(engine.sync_engine, "before_cursor_execute", record)
        assert await dump(engine, out, batch_size=batch_size, progress=progress.append) == 7

    assert progress == calls
    assert len(statements) == queries
    assert all("LIMIT" in statement for statement in statements)
    assert row_lines(out.getvalue()) == row_lines(await dump_bytes(sample_store))


@pytest.mark.parametrize(
    ("batch_size", "calls"),
    [(1, [1, 2, 3, 4, 5, 6, 7]), (2, [2, 4, 6, 7]), (7, [7]), (100, [7])],
)
async def test_load_inserts_in_batches_and_reports_progress(
    backend: Backend,
    sample_lines: list[str],
    sample_dump: bytes,
    batch_size: int,
    calls: list[int],
):
    progress: list[int] = []
    assert (
        await load_lines(backend.url, sample_lines, batch_size=batch_size, progress=progress.append)
        == SAMPLE_ROWS
    )
    assert progress == calls
    # Whatever the batches, every row, latest row, expiry and receipt arrived.
    assert row_lines(await dump_bytes(backend.url)) == row_lines(sample_dump)
    rows = await table_rows(backend.url)
    assert len(rows["snapshot_latest"]) == 4
    assert len(rows["snapshot_erasure_receipts"]) == 1


async def test_a_dump_is_one_consistent_snapshot_while_others_write(sample_store: str):
    """Writes committed during a dump are not in it, even those after its position."""
    wrote: list[int] = []

    async def write_more() -> None:
        async with sr.SnapshotRepository.from_url(sample_store, namespace="zzz") as repo:
            await repo.for_tenant("zzz").upsert_latest(sr.Snapshot(user_id="zed", state={}))
        async with sr.SnapshotRepository.from_url(sample_store, namespace="prefs") as repo:
            await repo.upsert_latest(sr.Snapshot(user_id="Bob", state={"theme": "light"}))

    def during_dump(count: int) -> None:
        if not wrote:  # after the first batch, from another thread and connection
            run_blocking(write_more())
            wrote.append(count)

    dumped = io.BytesIO()
    async with engine_for(sample_store) as engine:
        rows = await dump(engine, dumped, batch_size=1, progress=during_dump)

    assert wrote == [1]
    assert rows == SAMPLE_ROWS
    assert len((await table_rows(sample_store))["snapshot_history"]) == SAMPLE_ROWS + 2
    assert b'"zed"' not in dumped.getvalue()
    assert dumped.getvalue().endswith(b'{"end":true,"rows":7,"receipts":1}\n')


# --- the file format ---------------------------------------------------------------------


def test_the_dump_is_readable_json_lines(sample_dump: bytes):
    text = sample_dump.decode("utf-8")
    assert text.endswith("\n")
    lines = text.split("\n")[:-1]
    # No character any line splitter breaks on is left raw inside a line.
    assert text.splitlines() == lines
    for raw in ("\x85", "\u2028", "\u2029", "\r", "\x00"):
        assert raw not in text

    header, *rows, receipt, end = (from_json(line) for line in lines)
    assert header["format"] == DUMP_FORMAT
    assert header["version"] == DUMP_FORMAT_VERSION
    assert header["schema_revision"] == migrate.head_revision()
    assert end == {"end": True, "rows": SAMPLE_ROWS, "receipts": 1}
    assert set(receipt) == {"receipt"}
    assert set(receipt["receipt"]) == {
        "subject",
        "tenant",
        "namespace",
        "erased_at",
        "versions_erased",
        "cause",
    }
    assert (receipt["receipt"]["namespace"], receipt["receipt"]["cause"]) == ("prefs", "delete")
    assert len(rows) == SAMPLE_ROWS
    fields = {
        "tenant",
        "namespace",
        "user_id",
        "version",
        "schema_version",
        "created_at",
        "idempotency_key",
        "actor",
        "reason",
        "metadata",
        "state",
        "expires_at",
    }
    timestamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")
    for row in rows:
        assert set(row) == fields
        assert timestamp.match(row["created_at"])
    expiring = [row for row in rows if row["expires_at"] is not None]
    assert [row["user_id"] for row in expiring] == ["Bob"]
    assert timestamp.match(expiring[0]["expires_at"])
    first = rows[0]  # primary-key order: the untenanted scope, carts, alice, version 1
    assert (first["tenant"], first["namespace"], first["user_id"], first["version"]) == (
        "",
        "carts",
        "alice",
        1,
    )
    assert first["state"] == {"items": ["apple"], "note": TRICKY}  # JSON, not base64
    assert first["reason"] == TRICKY_REASON
    assert first["metadata"]["nul"] == "\x00"
    assert (first["idempotency_key"], first["actor"]) == ("alice-1", "checkout-service")
    assert rows[2]["state"] == {"big": 2**70, "f": 0.1}
    assert rows[2]["schema_version"] == 3
    assert rows[1]["metadata"] is None


async def test_dump_writes_text_streams_too(sample_store: str, tmp_path: Path):
    as_text = io.StringIO()
    async with engine_for(sample_store) as engine:
        await dump(engine, as_text)
        path = tmp_path / "dump.jsonl"
        with path.open("w", encoding="utf-8") as file:
            await dump(engine, file)
        with (
            (tmp_path / "latin.jsonl").open("w", encoding="latin-1") as file,
            pytest.raises(sr.ConfigurationError, match="not latin-1"),
        ):
            await dump(engine, file)
    as_bytes = await dump_bytes(sample_store)
    assert row_lines(as_text.getvalue().encode()) == row_lines(as_bytes)
    assert row_lines(path.read_bytes()) == row_lines(as_bytes)
    assert (tmp_path / "latin.jsonl").read_bytes() == b""  # refused before writing


@pytest.mark.parametrize("kind", ["binary file", "text file", "str lines", "bytes lines", "async"])
async def test_load_reads_files_and_iterables(
    backend: Backend, sample_dump: bytes, tmp_path: Path, kind: str
):
    path = tmp_path / "dump.jsonl"
    path.write_bytes(sample_dump)

    async def async_lines() -> AsyncIterator[str]:
        for line in sample_dump.decode().splitlines(keepends=True):
            yield line

    async with engine_for(backend.url) as engine:
        if kind == "binary file":
            with path.open("rb") as file:
                assert await load(engine, file) == SAMPLE_ROWS
        elif kind == "text file":
            with path.open(encoding="utf-8") as file:
                assert await load(engine, file) == SAMPLE_ROWS
        elif kind == "str lines":
            assert await load(engine, sample_dump.decode().split("\n")) == SAMPLE_ROWS
        elif kind == "bytes lines":
            assert await load(engine, sample_dump.split(b"\n")) == SAMPLE_ROWS
        else:
            assert await load(engine, async_lines()) == SAMPLE_ROWS
    assert row_lines(await dump_bytes(backend.url)) == row_lines(sample_dump)


async def test_load_refuses_a_whole_string_or_a_non_utf8_text_file(
    backend: Backend, sample_dump: bytes, tmp_path: Path
):
    path = tmp_path / "dump.jsonl"
    path.write_bytes(sample_dump)
    async with engine_for(backend.url) as engine:
        with pytest.raises(sr.SnapshotValidationError, match="not one string"):
            await load(engine, sample_dump.decode())  # type: ignore[arg-type]
        with (
            path.open(encoding="latin-1") as file,
            pytest.raises(sr.ConfigurationError, match="not latin-1"),
        ):
            await load(engine, file)
        bad = tmp_path / "bad.jsonl"
        bad.write_bytes(sample_dump.replace(b"checkout-service", b"checkout-\xff-service"))
        with (
            bad.open(encoding="utf-8") as file,
            pytest.raises(sr.SnapshotValidationError, match="is not UTF-8"),
        ):
            await load(engine, file)
        with pytest.raises(sr.SnapshotValidationError, match=r"^line 2 of the dump is not JSON"):
            await load(engine, bad.read_bytes().split(b"\n"))
    await assert_empty(backend.url)


# --- failures of the caller's streams and of stored data ---------------------------------


class _FailingOut(io.BytesIO):
    def write(self, data: Any) -> int:
        if self.tell():
            raise BrokenPipeError("the reader went away")
        return super().write(data)


async def test_a_failing_output_stream_is_an_os_error_not_a_storage_error(sample_store: str):
    async with engine_for(sample_store) as engine:
        with pytest.raises(BrokenPipeError):
            await dump(engine, _FailingOut(), batch_size=2)
        assert engine.sync_engine.pool.checkedout() == 0  # the dump's connection went back


async def test_a_failing_input_stream_passes_through_and_nothing_is_loaded(
    backend: Backend, sample_lines: list[str]
):
    def lines() -> Iterator[str]:
        yield from sample_lines[:6]
        raise OSError("the disk went away")

    with pytest.raises(OSError, match="the disk went away") as raised:
        await load_lines(backend.url, lines(), batch_size=2)
    assert not isinstance(raised.value, sr.SnapshotRepoError)
    await assert_empty(backend.url)


async def test_a_stored_payload_that_is_not_json_is_named_by_the_dump(backend: Backend):
    row = {
        "tenant": "acme",
        "namespace": "carts",
        "user_id": "alice",
        "version": 1,
        "schema_version": 1,
        "payload": b"{not json",
        "created_at": datetime.now(UTC),
    }
    async with engine_for(backend.url) as engine, engine.begin() as conn:
        await conn.execute(insert(history_table), [row])
    with pytest.raises(sr.SnapshotValidationError, match="stored payload that is not JSON"):
        await dump_bytes(backend.url)
