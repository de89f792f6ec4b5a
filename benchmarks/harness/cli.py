"""The benchmark's command line: flags to a `BenchConfig`, the run, the table, the JSON.

`python benchmarks/run.py` is the entry point; `add_arguments` and
`config_from_args` let another parser embed the same flags.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sqlite3
import sys
from dataclasses import replace
from pathlib import Path
from typing import cast, get_args

import asyncpg

from snapshot_repo import ConfigurationError, EngineSettings, SnapshotRepoError
from snapshot_repo.engine import SqliteSynchronous

from .config import (
    DEFAULT_JSON_PATH,
    DEFAULT_MARIADB_URL,
    DEFAULT_POSTGRES_URL,
    MARIADB_URL_ENV,
    POSTGRES_URL_ENV,
    BackendName,
    BenchConfig,
    SynchronousCommit,
)
from .runner import run_benchmark

__all__ = ["add_arguments", "build_parser", "config_from_args", "main", "positive_int"]

_EXIT_OK, _EXIT_USAGE, _EXIT_STORAGE, _EXIT_INTERRUPTED = 0, 2, 3, 130


def _failures() -> tuple[type[Exception], ...]:
    """What says a database failed (exit 3): the library's and the raw drivers' errors
    (asyncmy's only if installed), and the harness's RuntimeError (the sides disagree, or
    the schema is one the raw baselines do not know)."""
    failures: tuple[type[Exception], ...] = (
        RuntimeError,
        SnapshotRepoError,
        OSError,
        sqlite3.Error,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    )
    try:
        import asyncmy.errors
    except ModuleNotFoundError:  # an optional extra: MariaDB is then skipped, not failed
        return failures
    return (*failures, asyncmy.errors.Error)


def positive_int(text_value: str) -> int:
    """An argparse type: a whole number of at least 1 (`_` separators allowed)."""
    try:
        value = int(text_value.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text_value!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _backends(text_value: str) -> tuple[BackendName, ...]:
    names = tuple(part.strip() for part in text_value.split(",") if part.strip())
    for name in names:
        if name not in get_args(BackendName):
            raise argparse.ArgumentTypeError(
                f"unknown backend {name!r}: use sqlite, postgres and/or mariadb"
            )
    return cast(tuple[BackendName, ...], names)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's flags to `parser` (e.g. a `bench` subcommand's parser)."""
    defaults = BenchConfig()
    sizes = parser.add_argument_group("sizes")
    sizes.add_argument(
        "--ops",
        type=positive_int,
        default=defaults.ops,
        help="timed writes/deletes per side and round (default %(default)s)",
    )
    sizes.add_argument(
        "--read-ops",
        type=positive_int,
        default=defaults.read_ops,
        help="timed single reads per side and round (default %(default)s)",
    )
    sizes.add_argument(
        "--rounds",
        type=positive_int,
        default=defaults.rounds,
        help="interleaved rounds; medians are reported (default %(default)s)",
    )
    sizes.add_argument(
        "--deep-versions",
        type=positive_int,
        default=defaults.deep_versions,
        help="versions of the deep-history user (default %(default)s)",
    )
    sizes.add_argument(
        "--history-versions",
        type=positive_int,
        default=defaults.history_versions,
        help="versions of the shallow-history users (default %(default)s)",
    )
    sizes.add_argument(
        "--concurrency",
        type=positive_int,
        default=defaults.concurrency,
        help="concurrent writers (default %(default)s)",
    )
    sizes.add_argument(
        "--bulk-size",
        type=positive_int,
        default=defaults.bulk_size,
        help="snapshots per bulk call (default %(default)s)",
    )
    sizes.add_argument(
        "--bulk-batches",
        type=positive_int,
        default=defaults.bulk_batches,
        help="bulk calls per side and round (default %(default)s)",
    )
    sizes.add_argument(
        "--warmup-ops",
        type=int,
        default=defaults.warmup_ops,
        help="untimed operations per workload before round 1 (default %(default)s)",
    )
    sizes.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the random user choice (default %(default)s)",
    )
    sides = parser.add_argument_group("sides")
    sides.add_argument(
        "--core",
        action=argparse.BooleanOptionalAction,
        default=defaults.core,
        help="also run the library on its core backend (SQLAlchemy's public Core API only) "
        f"beside its default, fast one; about triples the run time "
        f"(default: {'on' if defaults.core else 'off'})",
    )
    sides.add_argument(
        "--peer",
        action="store_true",
        help="also run the same workloads in plain SQLAlchemy Core, the alternative to "
        "this library (about doubles the run time)",
    )
    where = parser.add_argument_group("databases")
    where.add_argument(
        "--backends",
        type=_backends,
        default=defaults.backends,
        help="comma-separated: sqlite,postgres,mariadb (default: all three; a MariaDB server "
        "that cannot be reached is skipped with a message)",
    )
    where.add_argument(
        "--postgres-url",
        default=os.environ.get(POSTGRES_URL_ENV, defaults.postgres_url),
        help=f"Postgres server to create a throwaway database on (default "
        f"${POSTGRES_URL_ENV}, else {DEFAULT_POSTGRES_URL})",
    )
    where.add_argument(
        "--postgres-use-database",
        action="store_true",
        help="run in --postgres-url's own database (it must hold no snapshots; "
        "the benchmark's rows stay there) instead of a throwaway one",
    )
    where.add_argument(
        "--postgres-synchronous-commit",
        choices=get_args(SynchronousCommit),
        default=None,
        help="synchronous_commit for every side, set on the throwaway database "
        "(default: the server's, normally on)",
    )
    where.add_argument(
        "--mariadb-url",
        default=os.environ.get(MARIADB_URL_ENV, defaults.mariadb_url),
        help=f"MariaDB server to create a throwaway database on (default "
        f"${MARIADB_URL_ENV}, else {DEFAULT_MARIADB_URL})",
    )
    where.add_argument(
        "--mariadb-use-database",
        action="store_true",
        help="run in --mariadb-url's own database (it must hold no snapshots; "
        "the benchmark's rows stay there) instead of a throwaway one",
    )
    where.add_argument(
        "--sqlite-path",
        type=Path,
        default=None,
        help="SQLite file to run in (it must hold no snapshots; default: a "
        "temporary file, removed afterwards)",
    )
    where.add_argument(
        "--sqlite-synchronous",
        choices=get_args(SqliteSynchronous),
        default=defaults.settings.sqlite_synchronous,
        help="SQLite synchronous level for every side (default: the library's, %(default)s)",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--json",
        type=Path,
        default=Path(DEFAULT_JSON_PATH),
        metavar="PATH",
        help="where to write the JSON report (default %(default)s)",
    )
    output.add_argument(
        "--chart",
        type=Path,
        default=None,
        metavar="PATH",
        help="also draw the library's ratios as a PNG at PATH (needs matplotlib, in the dev extra)",
    )
    output.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The `BenchConfig` described by flags parsed with `add_arguments`.

    Raises:
        ConfigurationError: the sizes are inconsistent.
    """
    return BenchConfig(
        backends=args.backends,
        ops=args.ops,
        read_ops=args.read_ops,
        rounds=args.rounds,
        warmup_ops=args.warmup_ops,
        concurrency=args.concurrency,
        deep_versions=args.deep_versions,
        history_versions=args.history_versions,
        bulk_size=args.bulk_size,
        bulk_batches=args.bulk_batches,
        postgres_url=args.postgres_url,
        postgres_create_database=not args.postgres_use_database,
        postgres_synchronous_commit=args.postgres_synchronous_commit,
        mariadb_url=args.mariadb_url,
        mariadb_create_database=not args.mariadb_use_database,
        sqlite_path=args.sqlite_path,
        settings=replace(EngineSettings(), sqlite_synchronous=args.sqlite_synchronous),
        seed=args.seed,
        peer=args.peer,
        core=args.core,
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The benchmark's own argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Compare snapshot_repo with hand-written SQL on the raw drivers "
        "(asyncpg; aiosqlite and sqlite3; asyncmy), with its own core backend (--core) and, "
        "with --peer, with plain SQLAlchemy Core, and print ops/s, p50, p99 and the library's "
        "ratio to each.",
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Parse `argv`, run the benchmark, print the table, write the JSON (and the chart).

    Returns the exit status.

    Exit status: 0 done; 2 bad flags or configuration (including a database
    that already holds snapshots); 3 a database failed, or every backend was
    skipped (an unreachable MariaDB alone is skipped, not failed); 130 interrupted.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    name = parser.prog

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    # Fail now, not after minutes of benchmarking.
    if not args.json.parent.is_dir():
        print(f"{name}: error: no directory for the JSON report: {args.json}", file=sys.stderr)
        return _EXIT_USAGE
    if args.chart is not None:
        if not args.chart.parent.is_dir():
            print(f"{name}: error: no directory for the chart: {args.chart}", file=sys.stderr)
            return _EXIT_USAGE
        if importlib.util.find_spec("matplotlib") is None:
            print(
                f"{name}: error: --chart needs matplotlib (pip install -e '.[dev]')",
                file=sys.stderr,
            )
            return _EXIT_USAGE
    try:
        config = config_from_args(args)
        report = asyncio.run(run_benchmark(config, progress))
    except ConfigurationError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return _EXIT_USAGE
    except _failures() as exc:
        print(f"{name}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return _EXIT_STORAGE
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED
    if not report.backends:
        for backend, reason in report.skipped.items():
            print(f"{name}: error: {backend} skipped: {reason}", file=sys.stderr)
        print(f"{name}: error: no backend ran", file=sys.stderr)
        return _EXIT_STORAGE
    print(report.format_table())
    try:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        print(f"{name}: error: cannot write the JSON report: {exc}", file=sys.stderr)
        return _EXIT_USAGE
    print(f"\nJSON report written to {args.json}")
    if args.chart is not None:
        from .chart import write_chart  # matplotlib is imported only when a chart is asked for

        try:
            write_chart(report.to_dict(), args.chart)
        except OSError as exc:
            print(f"{name}: error: cannot write the chart: {exc}", file=sys.stderr)
            return _EXIT_USAGE
        print(f"chart written to {args.chart}")
    return _EXIT_OK
