"""The benchmark harness: `snapshot_repo` against hand-written SQL on the raw drivers.

The question it answers is what the abstraction costs: the same workload runs
through the public `SnapshotRepository` API and through a careful
hand-written implementation on the bare driver (asyncpg on Postgres;
aiosqlite, and stdlib `sqlite3` on one worker thread, on SQLite; asyncmy on
MariaDB), against the
same tables and with the same semantics and durability, so that the ratio
library/raw isolates the library's own overhead. A fourth kind of side, the
peer (`sqlalchemy`, see `peer`), runs the same workloads in plain
SQLAlchemy Core on the same drivers: the alternative a user would otherwise
write, so library/peer says what choosing the library buys. With `core`, the
library also runs on its `core` backend (`backend="core"`, SQLAlchemy's public
Core API only) as a side of its own: library/core is what the fast backends
buy over the reference, and core/raw what the reference costs.

What keeps the comparison fair:

- Same schema: the database is created empty and migrated by the library
  (`repo.migrate()`); the raw baselines write the same rows into the same
  tables (payload = the model's JSON bytes, `created_at` in the library's
  storage format) and a start-up check reads what each side wrote through
  every other side.
- Same semantics: a write bumps `snapshot_latest` with `INSERT ... ON
  CONFLICT DO UPDATE SET version = snapshot_latest.version + 1` and appends
  the same row to `snapshot_history` atomically (Postgres: one CTE statement;
  SQLite: `BEGIN IMMEDIATE`, two statements, `COMMIT`; MariaDB: `ON DUPLICATE
  KEY UPDATE`, the version read back, history and feed entry, in one
  transaction); reads decode with
  `Model.model_validate_json`; a delete removes the latest row first, then
  the history up to its version, in one transaction.
- A good raw baseline, not a strawman: statements are prepared once and
  cached by the drivers, each operation makes as few round trips as the
  driver allows, and the asyncpg pool skips its per-release reset query
  (SQLAlchemy's pool does not send one either).
- Same durability: Postgres with its own `synchronous_commit`; SQLite in WAL
  mode with the `synchronous` level, busy timeout and `secure_delete` taken
  from the library's `EngineSettings`, checked on every connection before
  timing; MariaDB with the server's `innodb_flush_log_at_trx_commit`, every
  side's connections READ COMMITTED, as the library's.
- Same conditions: every round runs every workload on every side in turn
  (the order rotates per round), in one process and one event loop, after an
  untimed warm-up; the garbage collector is run before each timed phase and
  left enabled for both sides; medians across rounds are reported.

It is a developer tool: it lives in the checkout, not in the wheel, and the
installed `snapshot-repo` command does not know it. Besides the public API it
uses two modules of the library, on purpose: `snapshot_repo.tables` (the raw
SQL and the peer are built from the library's own table definitions, so they
write the same schema) and `snapshot_repo.engine` (`normalize_url`, which
picks the async driver of a URL as the library does, and the
`SqliteSynchronous` levels the flags accept).

Entry points: `run_benchmark(BenchConfig(...))` returns a `BenchReport`
(`to_dict()` for JSON, `format_table()` for people); `main(argv)` is the
command line (`python benchmarks/run.py`), and `add_arguments` /
`config_from_args` let another parser embed its flags. One module per job:

- `config`: `BenchConfig` and the names reports use;
- `state`: the ~1 KB state every workload stores;
- `sides`: the interface every side implements, and the library's sides (its
  fast backend, and its core backend);
- `rows`, `sql`: rows and statements written by hand;
- `asyncpg_side`, `sqlite_sides`, `mariadb_side`: the raw baselines;
- `peer`: the plain-SQLAlchemy peer;
- `databases`, `seeding`: a migrated, seeded database with every side connected;
- `workloads`, `timing`, `parity`: what is timed, how, and the check that the
  sides store the same rows;
- `stats`, `results`, `table`, `chart`: medians and ratios, and how they are reported;
- `runner`: the whole run; `cli`: the command line.
"""

from __future__ import annotations

from .cli import add_arguments, build_parser, config_from_args, main
from .config import (
    CORE,
    DEFAULT_JSON_PATH,
    DEFAULT_MARIADB_URL,
    DEFAULT_POSTGRES_URL,
    LIBRARY,
    MARIADB_URL_ENV,
    POSTGRES_URL_ENV,
    WORKLOADS,
    BackendName,
    BenchConfig,
    SynchronousCommit,
)
from .peer import PEER
from .results import BackendReport, BenchReport, RoundResult, SideResult, WorkloadResult
from .runner import run_benchmark
from .state import BenchState

__all__ = [
    "CORE",
    "DEFAULT_JSON_PATH",
    "DEFAULT_MARIADB_URL",
    "DEFAULT_POSTGRES_URL",
    "LIBRARY",
    "MARIADB_URL_ENV",
    "PEER",
    "POSTGRES_URL_ENV",
    "WORKLOADS",
    "BackendName",
    "BackendReport",
    "BenchConfig",
    "BenchReport",
    "BenchState",
    "RoundResult",
    "SideResult",
    "SynchronousCommit",
    "WorkloadResult",
    "add_arguments",
    "build_parser",
    "config_from_args",
    "main",
    "run_benchmark",
]
