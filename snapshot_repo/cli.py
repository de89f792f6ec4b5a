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
    1  not found (`get` of a user without a snapshot, `drop-consumer` of an unknown
       consumer) or unhealthy (`health`)
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
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from functools import partial
from typing import Any

from . import _cli_commands as commands
from ._cli_input import InputError, import_object, new_snapshot, read_state
from ._cli_output import (
    EXIT_BAD_INPUT,
    EXIT_CONFLICT,
    EXIT_INTERRUPTED,
    EXIT_STORAGE,
    PROG,
    fail,
)
from .engine import DEFAULT_URL
from .errors import (
    ConfigurationError,
    SnapshotRepoError,
    SnapshotValidationError,
    VersionConflictError,
)
from .repository import RepositoryOptions

__all__ = ["main"]

_URL_ENV = "SNAPSHOT_REPO_URL"
_DEFAULT_HISTORY_LIMIT = 10

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
        return asyncio.run(commands.run(_url(args), invocation))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (InputError, SnapshotValidationError, ConfigurationError) as exc:
        return fail(EXIT_BAD_INPUT, str(exc))
    except VersionConflictError as exc:
        return fail(EXIT_CONFLICT, str(exc))
    except SnapshotRepoError as exc:
        # StorageError (SchemaNotReadyError included), and any failure of the
        # library newer than this CLI.
        return fail(EXIT_STORAGE, str(exc))


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
        prog=PROG,
        description="Versioned per-user JSON state snapshots on SQLite or Postgres.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[url],
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return subparsers.add_parser(
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
    export.add_argument(
        "--everywhere",
        action="store_true",
        help="every namespace holding the user, of every tenant (or of --tenant)",
    )

    prune = add("prune", "delete old history versions (never the latest) of one user or all")
    prune.add_argument("--user", metavar="USER_ID", help="only this user (default: all users)")
    prune.add_argument("--keep-last", type=int, metavar="N", help="keep the newest N versions")
    prune.add_argument(
        "--older-than", type=float, metavar="SECONDS", help="keep versions younger than this"
    )

    add("reap", "erase every user whose snapshot expired, and print how many")

    trim = add("trim-changes", "delete old change-feed entries every registered consumer has read")
    trim.add_argument(
        "--older-than",
        type=float,
        required=True,
        metavar="SECONDS",
        help="keep entries younger than this",
    )
    add("feed-consumers", "print the registered feed consumers and their cursors as JSON")
    drop_consumer = add("drop-consumer", "forget a feed consumer, so trimming stops waiting")
    drop_consumer.add_argument("consumer", metavar="NAME")

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


def _invocation(args: argparse.Namespace) -> commands.Invocation:
    """Do the synchronous part of a command (reading input) and return the part that needs I/O.

    Input is read and validated here, before the database is opened, so bad
    input fails without touching the database.
    """
    user_id: str = getattr(args, "user_id", "")
    options = RepositoryOptions()
    if getattr(args, "namespace", None) is not None:
        options["namespace"] = args.namespace
    command: commands.Command
    model: Any = None
    match args.command:
        case "migrate":
            command = commands.migrate
        case "put":
            snapshot = new_snapshot(user_id, read_state(args.file), args.schema_version)
            write = commands.PutOptions(
                expected_version=args.expected_version,
                idempotency_key=args.idempotency_key,
                actor=args.actor,
                reason=args.reason,
                ttl=None if args.ttl is None else timedelta(seconds=args.ttl),
            )
            command = partial(commands.put, snapshot=snapshot, write=write)
        case "get":
            command = partial(commands.get, user_id=user_id)
        case "history":
            command = partial(commands.history, user_id=user_id, limit=args.limit)
        case "delete":
            command = partial(commands.delete, user_id=user_id)
        case "health":
            command = commands.health
        case "export":
            command = partial(
                commands.export,
                user_id=user_id,
                output=args.output,
                everywhere=args.everywhere,
                tenant=getattr(args, "tenant", None),
            )
        case "prune":
            older_than = None if args.older_than is None else timedelta(seconds=args.older_than)
            command = partial(
                commands.prune, user=args.user, keep_last=args.keep_last, older_than=older_than
            )
        case "reap":
            command = commands.reap
        case "trim-changes":
            command = partial(commands.trim_changes, older_than=timedelta(seconds=args.older_than))
        case "feed-consumers":
            command = commands.feed_consumers
        case "drop-consumer":
            command = partial(commands.drop_consumer, name=args.consumer)
        case "upgrade-payloads":
            options["schema_version"] = args.schema_version
            options["upgraders"] = import_object(args.upgraders, "--upgraders")
            model = None if args.model is None else import_object(args.model, "--model")
            command = commands.upgrade_payloads
        case "dump":
            command = partial(commands.dump, output=args.output)
        case "load":
            command = partial(commands.load, source=args.input)
        case _:  # argparse allows no other
            raise AssertionError(f"unhandled command {args.command!r}")
    return commands.Invocation(command, options, getattr(args, "tenant", None), model)


if __name__ == "__main__":
    sys.exit(main())
