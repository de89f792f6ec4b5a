"""The `snapshot-repo` commands: each makes one repository (or `backup`) call and prints it.

`cli` parses the arguments and reads the input, then hands `run` an
`Invocation`: the repository's options and the command bound to its
arguments. `run` opens the repository, awaits the command once and closes the
repository; the command returns the exit status. Nothing here parses
arguments, so each command reads as the one call it makes.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from . import backup
from ._cli_input import opened
from ._cli_output import EXIT_NOT_FOUND, EXIT_OK, Progress, fail, print_json
from .codec import JsonObject
from .errors import redact
from .migrate import head_revision
from .repository import RepositoryOptions, SnapshotRepository
from .snapshot import Snapshot
from .subject_access import export_subject_lines

__all__ = [
    "Command",
    "Invocation",
    "PutOptions",
    "delete",
    "drop_consumer",
    "dump",
    "export",
    "feed_consumers",
    "get",
    "health",
    "history",
    "load",
    "migrate",
    "prune",
    "put",
    "reap",
    "run",
    "trim_changes",
    "upgrade_payloads",
]

_THREAD_SETTLE_SECONDS = 1.0

_Repository = SnapshotRepository[JsonObject]
Command = Callable[[_Repository], Awaitable[int]]
"""A command bound to its arguments: takes the open repository, returns the exit status."""


@dataclass(frozen=True, slots=True)
class Invocation:
    """What one run needs: the repository's options and the call to make on it."""

    command: Command
    options: RepositoryOptions = field(default_factory=lambda: RepositoryOptions())
    tenant: str | None = None
    model: Any = None


@dataclass(frozen=True, slots=True)
class PutOptions:
    """The write options of `put`, as `upsert_latest` takes them."""

    expected_version: int | None
    idempotency_key: str | None
    actor: str | None
    reason: str | None
    ttl: timedelta | None


async def run(url: str, invocation: Invocation) -> int:
    """Open the repository at `url`, run the invocation's command on it, and close it.

    Returns:
        The command's exit status.

    Raises:
        SnapshotRepoError: from opening the repository or from the command.
    """
    threads_before = set(threading.enumerate())
    try:
        async with SnapshotRepository.from_url(url, invocation.model, **invocation.options) as repo:
            scoped = repo if invocation.tenant is None else repo.for_tenant(invocation.tenant)
            return await invocation.command(scoped)
    finally:
        await _settle_sqlite_threads(threads_before)


async def _settle_sqlite_threads(threads_before: set[threading.Thread]) -> None:
    """Wait (at most a second) for aiosqlite worker threads of this run to exit.

    When a SQLite file cannot be opened, aiosqlite (0.22) queues its worker
    thread's shutdown without awaiting it; if `asyncio.run` closes the loop
    first, the thread dies with "Event loop is closed" and Python prints its
    traceback after our one-line error (omnilib/aiosqlite#241, #389). Keeping
    the loop open until the thread is gone prevents that. Threads are found by
    the name Python gives them, "Thread-N (_connection_worker_thread)".
    """
    deadline = time.monotonic() + _THREAD_SETTLE_SECONDS
    while time.monotonic() < deadline:
        pending = [
            thread
            for thread in threading.enumerate()
            if thread not in threads_before and thread.name.endswith("(_connection_worker_thread)")
        ]
        if not pending:
            return
        await asyncio.sleep(0.001)


async def migrate(repo: _Repository) -> int:
    """Upgrade the schema to head and say which database and revision."""
    await repo.migrate()
    url = repo.engine.url.render_as_string(hide_password=True)
    print(f"migrated {url} to revision {head_revision()} (head)")
    return EXIT_OK


async def put(repo: _Repository, snapshot: Snapshot[Any], write: PutOptions) -> int:
    """Store `snapshot` as the user's next version and print the stored snapshot."""
    stored = await repo.upsert_latest(
        snapshot,
        expected_version=write.expected_version,
        idempotency_key=write.idempotency_key,
        actor=write.actor,
        reason=write.reason,
        ttl=write.ttl,
    )
    print_json(stored.model_dump(mode="json"))
    return EXIT_OK


async def get(repo: _Repository, user_id: str) -> int:
    """Print the user's latest snapshot; exit status 1 when there is none."""
    snapshot = await repo.get_latest(user_id)
    if snapshot is None:
        return fail(EXIT_NOT_FOUND, f"no snapshot for user {redact(user_id)}")
    print_json(snapshot.model_dump(mode="json"))
    return EXIT_OK


async def history(repo: _Repository, user_id: str, limit: int) -> int:
    """Print the user's newest `limit` versions as one JSON array, newest first."""
    snapshots = await repo.get_history(user_id, limit)
    print_json([snapshot.model_dump(mode="json") for snapshot in snapshots])
    return EXIT_OK


async def delete(repo: _Repository, user_id: str) -> int:
    """Erase every version of the user and print how many were erased."""
    print(await repo.delete(user_id))
    return EXIT_OK


async def health(repo: _Repository) -> int:
    """Print the readiness report; exit status 1 when it is not healthy."""
    report = await repo.health()
    print_json(report.model_dump(mode="json"))
    return EXIT_OK if report.healthy else EXIT_NOT_FOUND


async def export(
    repo: _Repository,
    user_id: str,
    output: str | None,
    everywhere: bool = False,
    tenant: str | None = None,
) -> int:
    """Write everything stored about the user as JSON Lines to `output` (None: stdout):
    in the repository's namespace, or with `everywhere` in every namespace holding the
    user, of `tenant` or (None) of every tenant (`export_subject_lines`)."""
    lines = (
        export_subject_lines(repo.engine, user_id, tenant=tenant)
        if everywhere
        else repo.export_user_lines(user_id)
    )
    with opened(output, "w") as out:
        async for line in lines:
            out.write(line)
    return EXIT_OK


async def prune(
    repo: _Repository, user: str | None, keep_last: int | None, older_than: timedelta | None
) -> int:
    """Delete old history versions of `user` (None: every user) and print how many."""
    with Progress("pruned versions") as progress:
        pruned = await repo.prune_history(
            user, keep_last=keep_last, older_than=older_than, progress=progress
        )
    print(pruned)
    return EXIT_OK


async def reap(repo: _Repository) -> int:
    """Erase every user whose snapshot expired and print how many."""
    with Progress("reaped users") as progress:
        print(await repo.reap_expired(progress=progress))
    return EXIT_OK


async def trim_changes(repo: _Repository, older_than: timedelta) -> int:
    """Trim change-feed entries older than `older_than` that every registered consumer
    acknowledged, and print how many."""
    print(await repo.trim_changes(older_than=older_than))
    return EXIT_OK


async def feed_consumers(repo: _Repository) -> int:
    """Print the registered feed consumers and their acknowledged cursors as a JSON array."""
    print_json([consumer.model_dump(mode="json") for consumer in await repo.feed_consumers()])
    return EXIT_OK


async def drop_consumer(repo: _Repository, name: str) -> int:
    """Forget a registered feed consumer; exit 1 if there was none of that name."""
    return EXIT_OK if await repo.drop_feed_consumer(name) else EXIT_NOT_FOUND


async def upgrade_payloads(repo: _Repository) -> int:
    """Rewrite states stored under older schema versions and print how many rows."""
    with Progress("rewritten rows") as progress:
        print(await repo.upgrade_payloads(progress=progress))
    return EXIT_OK


async def dump(repo: _Repository, output: str | None) -> int:
    """Write the whole database as JSON Lines to `output` (None: stdout); count on stderr."""
    with opened(output, "w") as out, Progress("dumped versions") as progress:
        count = await backup.dump(repo.engine, out, progress=progress)
    print(f"dumped {count} versions", file=sys.stderr)
    return EXIT_OK


async def load(repo: _Repository, source: str | None) -> int:
    """Load a dump from `source` (None: stdin) into the database; count on stderr."""
    with opened(source, "r") as lines, Progress("loaded versions") as progress:
        count = await backup.load(repo.engine, lines, progress=progress)
    print(f"loaded {count} versions", file=sys.stderr)
    return EXIT_OK
