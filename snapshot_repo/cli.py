"""The `snapshot-repo` console script: migrate, read, write and probe a snapshot store.

A thin shell over `SnapshotRepository` without a state model (states are JSON
objects): each invocation parses its arguments, reads its input, makes one
`asyncio.run` that opens the repository, calls one method and closes the
repository, then prints the result. A snapshot is printed as the `Snapshot`
model's JSON on one line (`user_id`, `state`, `version`, `created_at` in
ISO-8601 UTC, `schema_version`, ...), so output can be piped into `jq`.

The database URL comes from `--url`, else the environment variable
`SNAPSHOT_REPO_URL`, else `sqlite+aiosqlite:///snapshots.db` in the working
directory.

Exit status, distinct per outcome so that scripts and probes can branch on it:

    0  success
    1  not found (`get` of a user without a snapshot) or unhealthy (`health`)
    2  usage error or bad input: arguments, JSON, user id, state, URL
    3  storage failure: database unreachable, timed out, or not migrated
       (and any other error of the library)
    4  version conflict: `put --expected-version` lost; nothing was written
    130  interrupted (Ctrl-C)

Every failure is reported as one line on stderr prefixed `snapshot-repo: error: `
(argparse prints its usage line before its own errors), never as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, TextIO

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from . import backup
from .codec import JsonObject
from .engine import DEFAULT_URL
from .errors import (
    ConfigurationError,
    SnapshotRepoError,
    SnapshotValidationError,
    VersionConflictError,
    redact,
)
from .migrate import head_revision
from .repository import RepositoryOptions, SnapshotRepository
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


@dataclass(frozen=True, slots=True)
class _Invocation:
    """What one run needs: the repository's options and the call to make on it."""

    command: _Command
    options: RepositoryOptions = field(default_factory=lambda: RepositoryOptions())
    tenant: str | None = None
    model: Any = None


@dataclass(frozen=True, slots=True)
class _PutOptions:
    expected_version: int | None
    idempotency_key: str | None
    actor: str | None
    reason: str | None
    ttl: timedelta | None


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
        invocation = _invocation(args)
        return asyncio.run(_run(_url(args), invocation))
    except KeyboardInterrupt:
        return _EXIT_INTERRUPTED
    except (_InputError, SnapshotValidationError, ConfigurationError) as exc:
        return _fail(_EXIT_BAD_INPUT, str(exc))
    except VersionConflictError as exc:
        return _fail(_EXIT_CONFLICT, str(exc))
    except SnapshotRepoError as exc:
        # StorageError (SchemaNotReadyError included), and any failure of the
        # library newer than this CLI.
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
    url.add_argument(
        "--namespace",
        default=argparse.SUPPRESS,
        help="which of a user's states (default: default)",
    )
    url.add_argument(
        "--tenant", default=argparse.SUPPRESS, help="act within this tenant only (default: none)"
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
        metavar="N",
        help="the version of your state's own schema, stored with it (default: 1)",
    )
    put.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="retry-safe write: a second put with the same KEY returns the first one's version",
    )
    put.add_argument("--actor", help="who or what makes the write, kept with the version")
    put.add_argument("--reason", help="why, kept with the version")
    put.add_argument(
        "--ttl", type=float, metavar="SECONDS", help="the snapshot expires after SECONDS"
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

    add(
        "health",
        "print the readiness report as JSON; exit 0 if reachable and migrated to head, else 1",
    )

    export = add("export", "write everything stored about a user as JSON Lines (GDPR art. 15/20)")
    export.add_argument("user_id", metavar="USER_ID")
    export.add_argument("--output", metavar="PATH", help="write to PATH instead of stdout")

    prune = add("prune", "delete old history versions (never the latest) of one user or all")
    prune.add_argument("--user", metavar="USER_ID", help="only this user (default: all users)")
    prune.add_argument("--keep-last", type=int, metavar="N", help="keep the newest N versions")
    prune.add_argument(
        "--older-than", type=float, metavar="SECONDS", help="keep versions younger than this"
    )

    add("reap", "erase every user whose snapshot expired, and print how many")

    upgrade = add("upgrade-payloads", "rewrite states stored under older schema versions")
    upgrade.add_argument(
        "--model",
        metavar="MODULE:CLASS",
        help="your state model (default: JSON objects, which no upgrade applies to)",
    )
    upgrade.add_argument(
        "--upgraders",
        metavar="MODULE:NAME",
        required=True,
        help="the mapping {n: function upgrading a state document from n to n + 1}",
    )
    upgrade.add_argument(
        "--schema-version", type=int, required=True, metavar="N", help="your model's version"
    )

    dump = add("dump", "write every namespace, tenant, user and version as JSON Lines")
    dump.add_argument("--output", metavar="PATH", help="write to PATH instead of stdout")
    load = add("load", "load a dump into an empty, migrated database")
    load.add_argument("--input", metavar="PATH", help="read PATH instead of stdin")
    return parser


def _url(args: argparse.Namespace) -> str:
    # An empty variable counts as unset, as shells and manifests often leave one behind.
    url: str = getattr(args, "url", None) or os.environ.get(_URL_ENV) or DEFAULT_URL
    return url


def _invocation(args: argparse.Namespace) -> _Invocation:
    """Do the synchronous part of a command (reading input) and return the part that needs I/O.

    Input is read and validated here, before the database is opened, so bad
    input fails without touching the database.
    """
    user_id: str = getattr(args, "user_id", "")
    options = RepositoryOptions()
    if getattr(args, "namespace", None) is not None:
        options["namespace"] = args.namespace
    tenant: str | None = getattr(args, "tenant", None)
    match args.command:
        case "migrate":
            return _Invocation(_migrate, options, tenant)
        case "put":
            snapshot = _snapshot(user_id, _read_state(args.file), args.schema_version)
            write = _PutOptions(
                expected_version=args.expected_version,
                idempotency_key=args.idempotency_key,
                actor=args.actor,
                reason=args.reason,
                ttl=None if args.ttl is None else timedelta(seconds=args.ttl),
            )
            return _Invocation(lambda repo: _put(repo, snapshot, write), options, tenant)
        case "get":
            return _Invocation(lambda repo: _get(repo, user_id), options, tenant)
        case "history":
            limit: int = args.limit
            return _Invocation(lambda repo: _history(repo, user_id, limit), options, tenant)
        case "delete":
            return _Invocation(lambda repo: _delete(repo, user_id), options, tenant)
        case "health":
            return _Invocation(_health, options, tenant)
        case "export":
            output: str | None = args.output
            return _Invocation(lambda repo: _export(repo, user_id, output), options, tenant)
        case "prune":
            prune = _prune_call(args)
            return _Invocation(prune, options, tenant)
        case "reap":
            return _Invocation(_reap, options, tenant)
        case "upgrade-payloads":
            options["schema_version"] = args.schema_version
            options["upgraders"] = _import(args.upgraders, "--upgraders")
            model = None if args.model is None else _import(args.model, "--model")
            return _Invocation(_upgrade_payloads, options, tenant, model)
        case "dump":
            destination: str | None = args.output
            return _Invocation(lambda repo: _dump(repo, destination), options, tenant)
        case "load":
            source: str | None = args.input
            return _Invocation(lambda repo: _load(repo, source), options, tenant)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse allows no other


async def _run(url: str, invocation: _Invocation) -> int:
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


async def _migrate(repo: _Repository) -> int:
    await repo.migrate()
    url = repo.engine.url.render_as_string(hide_password=True)
    print(f"migrated {url} to revision {head_revision()} (head)")
    return _EXIT_OK


async def _put(repo: _Repository, snapshot: Snapshot[Any], write: _PutOptions) -> int:
    stored = await repo.upsert_latest(
        snapshot,
        expected_version=write.expected_version,
        idempotency_key=write.idempotency_key,
        actor=write.actor,
        reason=write.reason,
        ttl=write.ttl,
    )
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
    report = await repo.health()
    _print_json(report.model_dump(mode="json"))
    return _EXIT_OK if report.healthy else _EXIT_NOT_FOUND


async def _export(repo: _Repository, user_id: str, output: str | None) -> int:
    with _opened(output, "w") as out:
        async for line in repo.export_user_lines(user_id):
            out.write(line)
    return _EXIT_OK


def _prune_call(args: argparse.Namespace) -> _Command:
    keep_last: int | None = args.keep_last
    older_than = None if args.older_than is None else timedelta(seconds=args.older_than)
    user: str | None = args.user

    async def prune(repo: _Repository) -> int:
        with _Progress("pruned versions") as progress:
            pruned = await repo.prune_history(
                user, keep_last=keep_last, older_than=older_than, progress=progress
            )
        print(pruned)
        return _EXIT_OK

    return prune


async def _reap(repo: _Repository) -> int:
    with _Progress("reaped users") as progress:
        print(await repo.reap_expired(progress=progress))
    return _EXIT_OK


async def _upgrade_payloads(repo: _Repository) -> int:
    with _Progress("rewritten rows") as progress:
        print(await repo.upgrade_payloads(progress=progress))
    return _EXIT_OK


async def _dump(repo: _Repository, output: str | None) -> int:
    with _opened(output, "w") as out, _Progress("dumped versions") as progress:
        count = await backup.dump(repo.engine, out, progress=progress)
    print(f"dumped {count} versions", file=sys.stderr)
    return _EXIT_OK


async def _load(repo: _Repository, source: str | None) -> int:
    with _opened(source, "r") as lines, _Progress("loaded versions") as progress:
        count = await backup.load(repo.engine, lines, progress=progress)
    print(f"loaded {count} versions", file=sys.stderr)
    return _EXIT_OK


@contextmanager
def _opened(path: str | None, mode: Literal["r", "w"]) -> Iterator[TextIO]:
    """`path` opened as UTF-8 text, or stdin/stdout when it is None."""
    if path is None:
        yield sys.stdin if mode == "r" else sys.stdout
        return
    try:
        handle = open(path, mode, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise _InputError(f"cannot open {path}: {exc.strerror or exc}") from None
    with handle:
        yield handle


class _Progress:
    """A one-line progress counter on stderr, shown only on a terminal."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._shown = False

    def __call__(self, done: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{self._what}: {done}", end="", file=sys.stderr, flush=True)
            self._shown = True

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._shown:
            print(file=sys.stderr)


def _import(spec: str, flag: str) -> Any:
    """The object named by "module:attribute" (for --model and --upgraders)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise _InputError(f"{flag} takes MODULE:NAME, not {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise _InputError(f"{flag} {spec}: {exc}") from None


def _read_state(path: str | None) -> object:
    """The JSON object from `path`, or from stdin when `path` is None.

    Raises:
        _InputError: the file cannot be read, or the text is not JSON or not an object.
    """
    source = "stdin" if path is None else path
    stdin: TextIO | None = sys.stdin  # None when the process was started with stdin closed
    try:
        if path is not None:
            # Bytes let `json` detect UTF-8/16/32 (and a UTF-8 BOM) itself.
            text: str | bytes = Path(path).read_bytes()
        elif stdin is None:
            raise _InputError("stdin is closed: pipe the state in, or use --file PATH")
        else:
            if stdin.isatty():
                # Otherwise a user who forgot the pipe sees a command that seems to hang.
                print(f"{_PROG}: reading the state from stdin (end with Ctrl-D)", file=sys.stderr)
            text = stdin.read()
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


def _snapshot(user_id: str, state: object, schema_version: int | None) -> Snapshot[Any]:
    """The snapshot to store; the model checks the user id.

    Raises:
        SnapshotValidationError: the user id is refused.
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
