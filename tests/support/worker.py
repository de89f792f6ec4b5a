"""A separate process that uses the library, for tests that kill or race processes.

Run as a script (`python tests/support/worker.py COMMAND ...`); it speaks a
line protocol on stdout, flushed after every line, so a parent can tell what
was acknowledged before it killed the process:

    write URL USERS TASKS COUNT
        TASKS concurrent tasks write snapshots round-robin over the
        comma-separated USERS; COUNT writes per task (0: forever). Prints
        `ok USER VERSION ITEM` after each write returned (the state written is
        `{"items": [ITEM]}`), `err TYPE MESSAGE` after
        each write that raised, then `done` and exits 0 if no write failed, 1 otherwise.

    migrate URL
        Prints `ready` once everything is imported and the repository exists,
        waits for one line on stdin (so that several processes start migrating
        together), calls `repo.migrate()`, prints `migrated`; on failure prints
        `err TYPE MESSAGE` and exits 1.
"""

from __future__ import annotations

import asyncio
import os
import sys
import traceback

import snapshot_repo as sr


def _emit(line: str) -> None:
    sys.stdout.write(line.replace("\n", " ") + "\n")
    sys.stdout.flush()


async def _write(url: str, users: list[str], tasks: int, count: int) -> int:
    pid = os.getpid()
    failures = 0

    async def writer(task: int) -> None:
        nonlocal failures
        i = 0
        while count == 0 or i < count:
            user = users[(task + i) % len(users)]
            item = f"{pid}-{task}-{i}"
            state = {"items": [item], "note": ""}
            try:
                stored = await repo.upsert_latest(sr.Snapshot(user_id=user, state=state))
            except sr.SnapshotRepoError as exc:
                failures += 1
                _emit(f"err {type(exc).__name__} {exc}")
            else:
                _emit(f"ok {user} {stored.version} {item}")
            i += 1

    async with sr.SnapshotRepository.from_url(url) as repo:
        await asyncio.gather(*(writer(n) for n in range(tasks)))
    _emit("done")
    return 1 if failures else 0


async def _migrate(url: str) -> int:
    async with sr.SnapshotRepository.from_url(url) as repo:
        _emit("ready")
        await asyncio.to_thread(sys.stdin.readline)
        try:
            await repo.migrate()
        except Exception as exc:
            _emit(f"err {type(exc).__name__} {exc} {traceback.format_exc()}")
            return 1
    _emit("migrated")
    return 0


def main(argv: list[str]) -> int:
    """Run one worker command (see the module docstring); return the exit status."""
    command, url, *rest = argv
    if command == "write":
        users, tasks, count = rest
        return asyncio.run(_write(url, users.split(","), int(tasks), int(count)))
    if command == "migrate":
        return asyncio.run(_migrate(url))
    raise SystemExit(f"unknown worker command {command!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
