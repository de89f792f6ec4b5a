"""Read the snapshot tables through a plain driver connection and check their invariants.

Fault tests must not trust the library to report on itself, so this module
reads `snapshot_latest` and `snapshot_history` with raw asyncpg (Postgres),
raw asyncmy (MariaDB) or the standard `sqlite3` module (SQLite), on a
connection of its own, both tables in one read transaction: read by two
transactions, a commit landing between them (a killed client's last write,
finished by its server session after the client died) would look like the
latest row and history disagreeing.

The invariants, per user:

- history versions are exactly 1..N (no gap, no duplicate);
- the latest row exists iff history exists, and its version is N;
- the latest row equals history row N (schema version, payload, timestamp).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from .databases import LOCK_WAIT_POLL, mariadb_connect, mariadb_fetch

__all__ = [
    "StoredRow",
    "UserRows",
    "assert_consistent",
    "payload_items",
    "read_tables",
]

_COLUMNS = "user_id, version, schema_version, payload, created_at"


@dataclass(frozen=True)
class StoredRow:
    """One stored snapshot row, as the driver returned it."""

    version: int
    schema_version: int
    payload: bytes
    created_at: Any


@dataclass
class UserRows:
    """Everything stored for one user."""

    latest: StoredRow | None = None
    history: list[StoredRow] = field(default_factory=list)

    @property
    def versions(self) -> list[int]:
        """History versions in ascending order."""
        return [row.version for row in self.history]


def payload_items(row: StoredRow) -> list[str]:
    """The `items` list of a stored state (the tests' states are `{"items": [...], ...}`)."""
    items = json.loads(row.payload)["items"]
    assert isinstance(items, list)
    return [str(item) for item in items]


def _group(latest: list[tuple[Any, ...]], history: list[tuple[Any, ...]]) -> dict[str, UserRows]:
    users: dict[str, UserRows] = {}
    for user_id, *values in history:
        users.setdefault(user_id, UserRows()).history.append(
            StoredRow(int(values[0]), int(values[1]), bytes(values[2]), values[3])
        )
    for user_id, *values in latest:
        users.setdefault(user_id, UserRows()).latest = StoredRow(
            int(values[0]), int(values[1]), bytes(values[2]), values[3]
        )
    return users


async def _read_postgres(url: str) -> dict[str, UserRows]:
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            latest = await conn.fetch(f"SELECT {_COLUMNS} FROM snapshot_latest")
            history = await conn.fetch(
                f"SELECT {_COLUMNS} FROM snapshot_history ORDER BY user_id, version"
            )
    finally:
        await conn.close()
    return _group([tuple(r) for r in latest], [tuple(r) for r in history])


async def _read_mariadb(url: str) -> dict[str, UserRows]:
    conn = await mariadb_connect(url)
    try:
        async with conn.cursor() as cursor:
            # REPEATABLE READ: the library's sessions run READ COMMITTED, where a
            # transaction's snapshot lasts one statement only.
            await cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            await cursor.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            await cursor.execute(f"SELECT {_COLUMNS} FROM snapshot_latest")
            latest = [tuple(row) for row in await cursor.fetchall()]
            await cursor.execute(
                f"SELECT {_COLUMNS} FROM snapshot_history ORDER BY user_id, version"
            )
            history = [tuple(row) for row in await cursor.fetchall()]
            await cursor.execute("COMMIT")
    finally:
        conn.close()
    return _group(latest, history)


def _read_sqlite(path: str) -> dict[str, UserRows]:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN")  # one read transaction: one snapshot of the WAL
        latest = conn.execute(f"SELECT {_COLUMNS} FROM snapshot_latest").fetchall()
        history = conn.execute(
            f"SELECT {_COLUMNS} FROM snapshot_history ORDER BY user_id, version"
        ).fetchall()
        conn.execute("COMMIT")
    finally:
        conn.close()
    return _group(latest, history)


async def read_tables(url: str) -> dict[str, UserRows]:
    """Every user's rows, read through a new plain connection to the database at `url`.

    Args:
        url: the SQLAlchemy URL the repository used (`sqlite+aiosqlite:///...`
            `postgresql+asyncpg://...` or `mariadb+asyncmy://...`).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        assert parsed.database, "a SQLite URL with a file is needed"
        return await asyncio.to_thread(_read_sqlite, parsed.database)
    if parsed.get_backend_name() in ("mariadb", "mysql"):
        return await _read_mariadb(url)
    return await _read_postgres(url)


def assert_consistent(
    users: Mapping[str, UserRows], expected_counts: Mapping[str, int] | None = None
) -> None:
    """Fail unless every user's rows satisfy the module's invariants.

    Args:
        users: the result of `read_tables`.
        expected_counts: if given, exactly these users must exist, each with
            exactly this many versions.
    """
    problems: list[str] = []
    for user_id, rows in sorted(users.items()):
        count = len(rows.history)
        if rows.versions != list(range(1, count + 1)):
            problems.append(f"{user_id}: history versions are not 1..{count}: {rows.versions}")
        if rows.latest is None:
            problems.append(f"{user_id}: history without a latest row")
            continue
        if not rows.history:
            problems.append(f"{user_id}: latest row v{rows.latest.version} without history")
            continue
        if rows.latest != rows.history[-1]:
            problems.append(
                f"{user_id}: latest row (v{rows.latest.version}) differs from the newest "
                f"history row (v{rows.history[-1].version})"
            )
    if expected_counts is not None:
        actual = {user_id: len(rows.history) for user_id, rows in users.items()}
        if actual != dict(expected_counts):
            problems.append(f"version counts {actual} != expected {dict(expected_counts)}")
    assert not problems, "inconsistent snapshot tables:\n" + "\n".join(problems)


_POSTGRES_BUSY_SESSIONS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND backend_type = 'client backend' AND state <> 'idle'
"""

_MARIADB_BUSY_SESSIONS = """
SELECT COUNT(*) FROM information_schema.PROCESSLIST AS p
WHERE p.DB = DATABASE() AND p.ID <> CONNECTION_ID()
  AND (p.COMMAND <> 'Sleep'
       OR EXISTS (SELECT 1 FROM information_schema.INNODB_TRX AS t
                  WHERE t.trx_mysql_thread_id = p.ID))
"""


async def wait_for_other_sessions(url: str, within: float = 10.0) -> None:
    """Wait until no other session on the database of `url` runs a statement or holds a
    transaction open.

    A client killed after sending its write (one statement, or COMMIT) leaves
    its server session to finish and commit it on its own, and one killed
    mid-transaction leaves it to roll back: reading before then sees the
    tables before a write that lands afterwards. Idle sessions (a pool another
    test left open) do not count. SQLite has no server: a killed process's
    transaction ends with it.

    Raises:
        AssertionError: sessions were still busy after `within` seconds.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        if parsed.get_backend_name() in ("mariadb", "mysql"):
            busy = (await mariadb_fetch(url, _MARIADB_BUSY_SESSIONS))[0][0]
            poll = LOCK_WAIT_POLL  # InnoDB's information_schema cache, see there
        else:
            dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
            conn = await asyncpg.connect(dsn, timeout=10)
            try:
                busy = await conn.fetchval(_POSTGRES_BUSY_SESSIONS)
            finally:
                await conn.close()
            poll = 0.05
        if busy == 0:
            return
        assert loop.time() < deadline, f"{busy} other session(s) still busy after {within} s"
        await asyncio.sleep(poll)
