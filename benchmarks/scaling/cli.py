"""The scale benchmark's command line: `python benchmarks/scale.py --scale USERS [flags]`.

Also reached as `python benchmarks/run.py --scale USERS [flags]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..harness.cli import positive_int
from ..harness.config import DEFAULT_POSTGRES_URL
from .created_at import render_experiment
from .report import render
from .runner import ScaleOptions, created_at_experiment, run_scale, working_set_experiment
from .working_set import render_working_set

__all__ = ["build_parser", "main"]

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Row = TypeVar("_Row", bound="DataclassInstance")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The scale benchmark's argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Load USERS users x M versions through upsert_many into a big database and "
            "1,000 users into a small one, then time both interleaved: p50/p99 ratios "
            "big/small, and bytes per row of every table and index."
        ),
    )
    parser.add_argument("--scale", type=positive_int, required=True, metavar="USERS")
    parser.add_argument("--scale-versions", type=positive_int, default=10, metavar="M")
    parser.add_argument("--small-users", type=positive_int, default=1000)
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument(
        "--batch", type=positive_int, default=1000, help="snapshots per upsert_many"
    )
    parser.add_argument("--workers", type=positive_int, default=2, help="concurrent loaders")
    parser.add_argument("--rounds", type=positive_int, default=30)
    parser.add_argument("--block", type=positive_int, default=25, help="calls per size in a row")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--sqlite-dir", type=Path, default=None)
    parser.add_argument(
        "--keep", action="store_true", help="keep the databases created (names in the notes)"
    )
    parser.add_argument("--big-database", default=None, help="reuse a loaded database or file")
    parser.add_argument("--small-database", default=None)
    parser.add_argument(
        "--created-at",
        action="store_true",
        help="instead: the created_at index experiment on --big-database/--small-database",
    )
    parser.add_argument(
        "--working-set",
        action="store_true",
        help=(
            "instead: get_latest_many(100) on --big-database with ids drawn from its first "
            "K users, K from the small size up to all, against --small-database"
        ),
    )
    parser.add_argument(
        "--sqlite-mmap-size",
        type=positive_int,
        default=0,
        metavar="BYTES",
        help="EngineSettings.sqlite_mmap_size for both SQLite databases (default 0: off)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Run the scale benchmark; 0 on success."""
    args = build_parser(prog).parse_args(argv)
    options = ScaleOptions(
        backend=args.backend,
        users=args.scale,
        small_users=args.small_users,
        versions=args.scale_versions,
        batch=args.batch,
        workers=args.workers,
        rounds=args.rounds,
        block=args.block,
        postgres_url=args.postgres_url,
        directory=args.sqlite_dir,
        keep=args.keep,
        big_database=args.big_database,
        small_database=args.small_database,
        sqlite_mmap_size=args.sqlite_mmap_size,
    )

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    if args.created_at:
        return _experiment(
            args,
            "--created-at",
            lambda: created_at_experiment(options, progress),
            render_experiment,
            postgres_only=True,
        )
    if args.working_set:
        return _experiment(
            args,
            "--working-set",
            lambda: working_set_experiment(options, progress),
            render_working_set,
            postgres_only=False,
        )
    report = asyncio.run(run_scale(options, progress))
    print(render(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    return 0


def _experiment(
    args: argparse.Namespace,
    flag: str,
    experiment: Callable[[], Coroutine[Any, Any, list[_Row]]],
    render_rows: Callable[[list[_Row]], str],
    *,
    postgres_only: bool,
) -> int:
    """Run an experiment on two loaded databases, print its table, write its JSON; exit status."""
    if (
        args.big_database is None
        or args.small_database is None
        or (postgres_only and args.backend != "postgres")
    ):
        where = " on Postgres" if postgres_only else ""
        print(f"{flag} needs --big-database and --small-database{where}")
        return 2
    rows = asyncio.run(experiment())
    print(render_rows(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    return 0
