"""The `snapshot-repo` console script: migrate, read, write and probe a snapshot store.

A thin shell over `SnapshotRepository` without a state model (states are JSON
objects): each invocation parses its arguments, reads its input, makes one
`asyncio.run` that opens the repository, calls one method and closes the
repository, then prints the result. Snapshots are printed as one-line JSON
objects (`user_id`, `state`, `version`, `created_at` in ISO-8601 UTC,
`schema_version`), so the output can be piped into `jq` or another program.

The database URL comes from `--url`, else the environment variable
`SNAPSHOT_REPO_URL`, else `sqlite+aiosqlite:///snapshots.db` in the working
directory.

Exit status, distinct per outcome so that scripts and probes can branch on it:

    0  success
    1  not found (`get` of a user without a snapshot) or unhealthy (`health`)
    2  usage error or bad input: arguments, JSON, user id, state, URL
    3  storage failure: database unreachable, timed out, or not migrated
    4  version conflict: `put --expected-version` lost; nothing was written
    130  interrupted (Ctrl-C)

Every failure is reported as one line on stderr prefixed `snapshot-repo: error: `
(argparse prints its usage line before its own errors), never as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from .codec import JsonObject
from .engine import DEFAULT_URL
from .errors import (
    ConfigurationError,
    SnapshotValidationError,
    StorageError,
    VersionConflictError,
    redact,
)
from .migrate import head_revision
from .repository import SnapshotRepository
from .snapshot import Snapshot

__all__ = ["main"]

_PROG = "snapshot-repo"
_URL_ENV = "SNAPSHOT_REPO_URL"
_DEFAULT_HISTORY_LIMIT = 10

_EXIT_OK = 0
_EXIT_NOT_FOUND = 1
_EXIT_BAD_INPUT = 2
_EXIT_STORAGE = 3
_EXIT_CONFLICT = 4
_EXIT_INTERRUPTED = 130

_EPILOG = f"""\
database URL: --url, else ${_URL_ENV},
  else {DEFAULT_URL} (in the working directory)

exit status:
  0    success
  1    not found (get) or unhealthy (health)
  2    usage error or bad input (arguments, JSON, user id, state, URL)
  3    storage failure (database unreachable, timed out, or not migrated)
  4    version conflict (put --expected-version lost; nothing was written)
  130  interrupted
"""

_THREAD_SETTLE_SECONDS = 1.0

_Repository = SnapshotRepository[JsonObject]
_Command = Callable[[_Repository], Awaitable[int]]


class _InputError(Exception):
    """Input the CLI itself refuses before any I/O: unreadable file, invalid or non-object JSON."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `snapshot-repo` command and return its exit status.

    Args:
        argv: the arguments after the program name; None reads `sys.argv`.

    Returns:
        The exit status documented in the module docstring.

    Raises:
        SystemExit: from argparse, for `--help` (status 0) and usage errors (status 2).
    """
    args = _parser().parse_args(argv)
    try:
        command = _command(args)
        return asyncio.run(_run(_url(args), command))
    except KeyboardInterrupt:
        return _EXIT_INTERRUPTED
    except (_InputError, SnapshotValidationError, ConfigurationError) as exc:
        return _fail(_EXIT_BAD_INPUT, str(exc))
    except VersionConflictError as exc:
        return _fail(_EXIT_CONFLICT, str(exc))
    except StorageError as exc:
        return _fail(_EXIT_STORAGE, str(exc))


def _parser() -> argparse.ArgumentParser:
    # --url is accepted before and after the subcommand; SUPPRESS keeps a
    # subcommand that was not given --url from erasing the top-level value.
    url = argparse.ArgumentParser(add_help=False)
    url.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"database URL (default: ${_URL_ENV}, else {DEFAULT_URL})",
    )
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Versioned per-user JSON state snapshots on SQLite or Postgres.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[url],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[url],
        )

    add("migrate", "upgrade the database schema to this package's newest revision")

    put = add("put", "store a JSON object (stdin, or --file) as the user's next version")
    put.add_argument("user_id", metavar="USER_ID")
    put.add_argument("--file", metavar="PATH", help="read the state from PATH instead of stdin")
    put.add_argument(
        "--expected-version",
        type=int,
        metavar="N",
        help="compare-and-set: write only if the latest version is N (0: only if none yet)",
    )
    put.add_argument(
        "--schema-version",
        type=int,
        default=1,
        metavar="N",
        help="the version of your state's own schema, stored with it (default: 1)",
    )

    get = add("get", "print the user's latest snapshot")
    get.add_argument("user_id", metavar="USER_ID")

    history = add("history", "print the user's newest versions as a JSON array, newest first")
    history.add_argument("user_id", metavar="USER_ID")
    history.add_argument(
        "--limit",
        type=int,
        default=_DEFAULT_HISTORY_LIMIT,
        metavar="N",
        help=f"how many versions at most (default: {_DEFAULT_HISTORY_LIMIT})",
    )

    delete = add("delete", "erase every version of the user and print how many were erased")
    delete.add_argument("user_id", metavar="USER_ID")

    add("health", 'exit 0 and print {"healthy": true} if the database is reachable and migrated')
    return parser


def _url(args: argparse.Namespace) -> str:
    # An empty variable counts as unset, as shells and manifests often leave one behind.
    url: str = getattr(args, "url", None) or os.environ.get(_URL_ENV) or DEFAULT_URL
    return url


def _command(args: argparse.Namespace) -> _Command:
    """Do the synchronous part of a command (reading input) and return the part that needs I/O.

    Input is read and validated here, before the database is opened, so bad
    input fails without touching the database.
    """
    user_id: str = getattr(args, "user_id", "")
    match args.command:
        case "migrate":
            return _migrate
        case "put":
            snapshot = _snapshot(user_id, _read_state(args.file), args.schema_version)
            expected: int | None = args.expected_version
            return lambda repo: _put(repo, snapshot, expected)
        case "get":
            return lambda repo: _get(repo, user_id)
        case "history":
            limit: int = args.limit
            return lambda repo: _history(repo, user_id, limit)
        case "delete":
            return lambda repo: _delete(repo, user_id)
        case "health":
            return _health
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse allows no other


async def _run(url: str, command: _Command) -> int:
    threads_before = set(threading.enumerate())
    try:
        async with SnapshotRepository.from_url(url) as repo:
            return await command(repo)
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


async def _migrate(repo: _Repository) -> int:
    await repo.migrate()
    url = repo.engine.url.render_as_string(hide_password=True)
    print(f"migrated {url} to revision {head_revision()} (head)")
    return _EXIT_OK


async def _put(repo: _Repository, snapshot: Snapshot[Any], expected_version: int | None) -> int:
    stored = await repo.upsert_latest(snapshot, expected_version=expected_version)
    _print_json(stored.model_dump(mode="json"))
    return _EXIT_OK


async def _get(repo: _Repository, user_id: str) -> int:
    snapshot = await repo.get_latest(user_id)
    if snapshot is None:
        return _fail(_EXIT_NOT_FOUND, f"no snapshot for user {redact(user_id)}")
    _print_json(snapshot.model_dump(mode="json"))
    return _EXIT_OK


async def _history(repo: _Repository, user_id: str, limit: int) -> int:
    snapshots = await repo.get_history(user_id, limit)
    _print_json([snapshot.model_dump(mode="json") for snapshot in snapshots])
    return _EXIT_OK


async def _delete(repo: _Repository, user_id: str) -> int:
    print(await repo.delete(user_id))
    return _EXIT_OK


async def _health(repo: _Repository) -> int:
    healthy = await repo.health_check()
    _print_json({"healthy": healthy})
    return _EXIT_OK if healthy else _EXIT_NOT_FOUND


def _read_state(path: str | None) -> object:
    """The JSON object from `path`, or from stdin when `path` is None.

    Raises:
        _InputError: the file cannot be read, or the text is not JSON or not an object.
    """
    source = "stdin" if path is None else path
    try:
        # Bytes from a file let `json` detect UTF-8/16/32 (and a UTF-8 BOM) itself.
        text: str | bytes = sys.stdin.read() if path is None else Path(path).read_bytes()
        state = json.loads(text)
    except OSError as exc:
        raise _InputError(f"cannot read {source}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise _InputError(f"{source} is not valid text: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        raise _InputError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(state, dict):
        raise _InputError(f"{source} must hold a JSON object, not {_json_kind(state)}")
    return state


def _snapshot(user_id: str, state: object, schema_version: int) -> Snapshot[Any]:
    """The snapshot to store; the model checks the user id and schema version.

    Raises:
        SnapshotValidationError: the user id or schema version is refused.
    """
    try:
        return Snapshot(user_id=user_id, state=state, schema_version=schema_version)
    except ValidationError as exc:
        raise SnapshotValidationError(
            "; ".join(_describe(error) for error in exc.errors())
        ) from None


def _describe(error: ErrorDetails) -> str:
    # A ValueError from our own validators (the user id's) already says which field and why.
    cause = error.get("ctx", {}).get("error")
    if error["type"] == "value_error" and cause is not None:
        return str(cause)
    field = ".".join(str(part) for part in error["loc"])
    return f"{field}: {error['msg']}"


def _json_kind(value: object) -> str:
    kinds: list[tuple[type | tuple[type, ...], str]] = [
        (list, "an array"),
        (str, "a string"),
        (bool, "a boolean"),
        ((int, float), "a number"),
    ]
    return next((name for kind, name in kinds if isinstance(value, kind)), "null")


def _print_json(value: object) -> None:
    # ASCII-only output prints on any terminal encoding; compact keeps it one line.
    print(json.dumps(value, separators=(",", ":")))


def _fail(status: int, message: str) -> int:
    # One line whatever the message holds, so log collectors keep it whole.
    text = " ".join(line.strip() for line in message.splitlines())
    print(f"{_PROG}: error: {text}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
