"""What an erased user leaves in a MariaDB server's files, found by scanning them for a marker.

The SQLite and Postgres versions of this question live in
`tests/conformance/test_erasure.py` and `tests/test_privacy.py`; on SQLite
the library promises no trace in the database files at all. InnoDB keeps
copies the library cannot reach: deleted records stay in their pages until
purged and the space reused, the undo log holds the old row images until
purge, the redo log until its circular file wraps over them, and the binary
log (when on) until it is purged. So the library promises less here, and
this test asserts exactly that much:

- `delete` and `erase` remove every row: nothing the library or plain SQL
  reads holds the user any more;
- `erase(vacuum=True)` runs OPTIMIZE TABLE, which rebuilds the snapshot
  tables: afterwards no file of the database's directory (the tables'
  `.ibd` files) holds an erased user's id or state, while a bystander's
  rows are still there;
- with `encryption`, a state's plaintext never reaches any file at all
  (crypto-shredding is what covers the redo, undo and binary logs).

Everything else (which shared files still hold the marker after a plain
delete, after purge, after OPTIMIZE) depends on timing and sizes, so it is
printed as a table, not asserted. Each scan follows a clean shutdown, which
writes every dirty page: the data files then hold what the server held.

Runs on a throwaway server of its own (`tests/support/mariadb_server.py`),
twice: MariaDB's defaults (undo log inside `ibdata1`, no binary log), and
with three undo tablespaces and the binary log on, as replicated servers run.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import snapshot_repo as sr
from tests.support.databases import Cart, mariadb_fetch, migrate_database

from ..support.mariadb_server import MariadbServer, running_server

pytestmark = pytest.mark.fault

CONFIGURATIONS: dict[str, tuple[str, ...]] = {
    "defaults": (),
    "undo-tablespaces-binlog": (
        "--innodb-undo-tablespaces=3",
        "--log-bin=mariadb-bin",  # in the data directory, so the scan reads it
        "--binlog-format=ROW",
    ),
}
VERSIONS = 5
SNAPSHOT_TABLE_FILES = ("snapshot_latest.ibd", "snapshot_history.ibd")
"""The files of the tables that hold a user's id and states (see `snapshot_repo.tables`)."""

WRITTEN = "written"
AFTER_DELETE = "a: after delete"
AFTER_DELETE_AND_PURGE = "c: after delete, restart and purge"
AFTER_VACUUM = "b: after erase(vacuum=True)"
AFTER_VACUUM_AND_PURGE = "b+c: after erase(vacuum=True), restart and purge"

Scan = dict[str, dict[str, int]]
"""File (relative to the data directory) -> marker label -> occurrences, only files with a hit."""


@pytest.fixture(params=list(CONFIGURATIONS), ids=list(CONFIGURATIONS))
def erasure_server(request: pytest.FixtureRequest) -> Iterator[MariadbServer]:
    """A throwaway MariaDB server in one of `CONFIGURATIONS`, destroyed afterwards.

    Outside CI, a machine without MariaDB server binaries skips with the
    reason; with CI=true it fails.
    """
    with running_server(CONFIGURATIONS[request.param]) as server:
        yield server


def token() -> str:
    """A random 24-character ASCII marker that occurs nowhere by chance."""
    return secrets.token_hex(12)


def scan(datadir: Path, markers: Mapping[str, str]) -> Scan:
    """Count each marker's bytes in every file under `datadir` (server stopped)."""
    needles = {label: marker.encode() for label, marker in markers.items()}
    found: Scan = {}
    for path in sorted(datadir.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        counts = {label: data.count(needle) for label, needle in needles.items() if needle in data}
        if counts:
            found[str(path.relative_to(datadir))] = counts
    return found


def files_with(found: Scan, label: str) -> set[str]:
    return {file for file, counts in found.items() if label in counts}


def table_files(database: str) -> set[str]:
    return {f"{database}/{name}" for name in SNAPSHOT_TABLE_FILES}


def database_files(found: Scan, label: str, database: str) -> set[str]:
    """The files of the database's own directory (its tables) that hold marker `label`."""
    return {file for file in files_with(found, label) if file.startswith(f"{database}/")}


def describe(stages: Mapping[str, Scan]) -> str:
    lines = []
    for stage, found in stages.items():
        lines.append(f"  {stage}:")
        lines.extend(f"    {file}: {counts}" for file, counts in found.items())
    return "\n".join(lines)


async def write_user(
    repo: sr.SnapshotRepository[Cart], user_id: str, state_marker: str, trail_marker: str
) -> None:
    """`VERSIONS` versions whose state holds `state_marker`, and whose actor, reason,
    metadata and idempotency keys (never encrypted) hold `trail_marker`."""
    for n in range(VERSIONS):
        state = Cart(items=[f"item-{state_marker}-{n}"], note=state_marker)
        await repo.upsert_latest(
            sr.Snapshot(user_id=user_id, state=state),
            idempotency_key=f"key-{trail_marker}-{n}",
            actor=f"actor-{trail_marker}",
            reason=f"reason-{trail_marker}",
            metadata={"note": f"metadata-{trail_marker}"},
        )


async def rows_holding(url: str, marker: str) -> int:
    """How many rows of the snapshot tables hold `marker`, read with plain SQL."""
    ((count,),) = await mariadb_fetch(
        url,
        "SELECT (SELECT count(*) FROM snapshot_latest WHERE user_id LIKE %s OR payload LIKE %s)"
        " + (SELECT count(*) FROM snapshot_history WHERE user_id LIKE %s OR payload LIKE %s)",
        *[f"%{marker}%"] * 4,
    )
    return int(count)


async def test_what_an_erasure_leaves_in_the_innodb_files(erasure_server: MariadbServer) -> None:
    """Write four users, erase three of them three ways, scan the data directory after each.

    - `kept`: a bystander, never erased (the scans must keep finding it);
    - `deleted`: `repo.delete` (no vacuum);
    - `vacuumed`: `repo.erase(vacuum=True)`, i.e. OPTIMIZE TABLE afterwards;
    - `encrypted-id`: written with `encryption`, erased with `erase(vacuum=True)`;
      its state holds a marker of its own (`encrypted-state`), since its user id,
      actor, reason, metadata and keys are stored in clear.
    """
    server = erasure_server
    database = "erasure"
    url = server.create_database(database)
    await migrate_database(url)
    markers = {
        "kept": token(),
        "deleted": token(),
        "vacuumed": token(),
        "encrypted-id": token(),
        "encrypted-state": token(),
    }
    users = {label: f"user-{marker}" for label, marker in markers.items()}
    keys = sr.LocalKeyProvider({"k1": secrets.token_bytes(32)}, active="k1")

    def open_repos() -> tuple[sr.SnapshotRepository[Cart], sr.SnapshotRepository[Cart]]:
        plain = sr.SnapshotRepository.from_url(url, Cart)
        secure = sr.SnapshotRepository.from_url(url, Cart, namespace="secure", encryption=keys)
        return plain, secure

    async def stop_and_scan(*, slow: bool = False) -> Scan:
        await asyncio.to_thread(server.stop, slow=slow)
        return scan(server.datadir, markers)

    stages: dict[str, Scan] = {}
    plain, secure = open_repos()
    try:
        for label in ("kept", "deleted", "vacuumed"):
            await write_user(plain, users[label], markers[label], markers[label])
        await write_user(
            secure, users["encrypted-id"], markers["encrypted-state"], markers["encrypted-id"]
        )
    finally:
        await plain.close()
        await secure.close()
    stages[WRITTEN] = await stop_and_scan()

    # (a) A plain delete, then a clean (fast) shutdown: purge may or may not have run.
    await asyncio.to_thread(server.start)
    plain, secure = open_repos()
    try:
        assert await plain.delete(users["deleted"]) == VERSIONS
        assert await plain.get_latest(users["deleted"]) is None
        assert await plain.get_history(users["deleted"]) == []
    finally:
        await plain.close()
        await secure.close()
    assert await rows_holding(url, markers["deleted"]) == 0
    stages[AFTER_DELETE] = await stop_and_scan()

    # (c) A restart, purge run to the end, and a slow shutdown (purge and change buffer).
    await asyncio.to_thread(server.start)
    await asyncio.to_thread(server.execute, "SET GLOBAL innodb_max_purge_lag_wait = 0")
    stages[AFTER_DELETE_AND_PURGE] = await stop_and_scan(slow=True)

    # (b) erase(vacuum=True): OPTIMIZE TABLE rebuilds the snapshot tables.
    await asyncio.to_thread(server.start)
    plain, secure = open_repos()
    try:
        assert await plain.erase(users["vacuumed"], vacuum=True) == VERSIONS
        assert await secure.erase(users["encrypted-id"], vacuum=True) == VERSIONS
        assert await plain.get_latest(users["vacuumed"]) is None
        assert await plain.get_latest(users["kept"]) is not None
    finally:
        await plain.close()
        await secure.close()
    for label in ("vacuumed", "encrypted-id"):
        assert await rows_holding(url, markers[label]) == 0, label
    stages[AFTER_VACUUM] = await stop_and_scan()

    await asyncio.to_thread(server.start)
    await asyncio.to_thread(server.execute, "SET GLOBAL innodb_max_purge_lag_wait = 0")
    stages[AFTER_VACUUM_AND_PURGE] = await stop_and_scan(slow=True)

    print(f"\nwhere the markers are ({server.options or 'defaults'}):\n{describe(stages)}")
    tables = table_files(database)
    written = stages[WRITTEN]
    # The scan can see what it looks for: every user is in both table files at first.
    for label in ("kept", "deleted", "vacuumed", "encrypted-id"):
        assert files_with(written, label) >= tables, (label, describe(stages))
    for stage, found in stages.items():
        # A bystander is never lost, and an encrypted state never reaches a file.
        assert files_with(found, "kept") >= tables, (stage, describe(stages))
        assert files_with(found, "encrypted-state") == set(), (stage, describe(stages))
    for stage in (AFTER_VACUUM, AFTER_VACUUM_AND_PURGE):
        found = stages[stage]
        # OPTIMIZE TABLE rebuilt the tables from their live rows: no erased user is in them.
        for label in ("vacuumed", "encrypted-id", "deleted"):
            assert database_files(found, label, database) == set(), (stage, label)
