"""What a benchmark run measures and how big: `BenchConfig`, and the names reports use.

`BenchConfig` checks its own consistency when built, so a bad combination of
sizes fails before any database is touched (`ConfigurationError`, exit 2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from snapshot_repo import ConfigurationError, EngineSettings
from snapshot_repo.engine import normalize_url

__all__ = [
    "CORE",
    "DEFAULT_JSON_PATH",
    "DEFAULT_MARIADB_URL",
    "DEFAULT_POSTGRES_URL",
    "LIBRARY",
    "MARIADB_URL_ENV",
    "POSTGRES_URL_ENV",
    "WORKLOADS",
    "BackendName",
    "BenchConfig",
    "SynchronousCommit",
    "hide_password",
]

BackendName = Literal["sqlite", "postgres", "mariadb"]
SynchronousCommit = Literal["on", "off", "local", "remote_write", "remote_apply"]

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
"""The server the benchmark creates its throwaway database on, unless told otherwise."""

POSTGRES_URL_ENV = "SNAPSHOT_REPO_BENCH_POSTGRES_URL"

DEFAULT_MARIADB_URL = "mariadb://root@127.0.0.1:3306/test"
"""The MariaDB server the benchmark creates its throwaway database on, unless told otherwise."""

MARIADB_URL_ENV = "SNAPSHOT_REPO_BENCH_MARIADB_URL"
DEFAULT_JSON_PATH = "benchmark-results.json"

LIBRARY = "library"
"""The name of the library's side in reports; the raw sides are named after their driver,
the plain-SQLAlchemy peer `PEER` ("sqlalchemy")."""

CORE = "core"
"""The name in reports of the library run on its `core` backend (`backend="core"`): the same
public API through SQLAlchemy's public Core API only, the reference the fast backends are
measured against. "library" is the library on its fast backend (`backend="auto"`)."""

WORKLOADS: tuple[str, ...] = (
    "write",
    "write_concurrent",
    "get_latest",
    "get_history_shallow",
    "get_history_deep",
    "delete",
    "delete_traceless",
    "delete_plain",
    "bulk_write",
    "bulk_write_single",
    "bulk_read",
    "bulk_read_single",
)
"""Every workload, in the order they run and are reported."""


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What to run and how big; the defaults take under 3 minutes for the three backends on 2
    cores.

    Attributes:
        backends: which databases to benchmark, in order.
        ops: timed operations per side, per round, for the write and delete workloads.
        read_ops: timed operations per side, per round, for the single-read workloads.
        rounds: how many times every workload runs on every side; medians are reported.
        warmup_ops: untimed operations per workload and side before the first round.
        concurrency: concurrent writers in `write_concurrent`.
        deep_versions: history depth of the one user of `get_history_deep`.
        history_versions: history depth of the users of `get_history_shallow`.
        history_users: how many users `get_history_shallow` picks from.
        history_limit: the `limit` of every `get_history` call.
        read_users: how many single-version users the reads pick from.
        write_users: how many users the sequential writes cycle through.
        delete_versions: versions of each user a delete erases.
        bulk_size: snapshots per bulk call (and single calls in the `*_single` workloads).
        bulk_batches: bulk calls per side, per round.
        postgres_url: with `postgres_create_database`, the server (and the
            maintenance database to connect to) on which a throwaway database is
            created and dropped afterwards; otherwise the database to run in.
        postgres_create_database: create a throwaway database (needs the
            CREATEDB right) rather than run in `postgres_url`'s database.
        postgres_synchronous_commit: None runs with the server's setting (on
            by default); a value is set on the throwaway database for every
            side (e.g. "off" to take fsync waits out of the comparison).
        mariadb_url: with `mariadb_create_database`, the MariaDB server on which a
            throwaway database is created and dropped afterwards; otherwise the
            database to run in. A server that cannot be reached (or no asyncmy
            installed) skips the MariaDB backend with a message, not the run.
        mariadb_create_database: create a throwaway database (needs the CREATE
            and DROP privileges) rather than run in `mariadb_url`'s database.
        sqlite_path: the SQLite file to run in; None: a file in a temporary
            directory removed afterwards. Put it on the disk you care about:
            on tmpfs an fsync costs nothing.
        settings: the library's engine settings; the raw baselines take their
            pool size, timeouts and SQLite pragmas from the same object.
        seed: seeds the random choice of users, so runs are repeatable.
        peer: also run the peer, plain SQLAlchemy Core (`peer`). Off by
            default: its calls are 2 to 10 times slower than the other sides',
            so it about doubles the run (SQLite and Postgres on 2 cores: 64 to 68 s
            without, 138 s with).
        core: also run the library on its `core` backend (`CORE`), on the same
            workloads and databases, with repositories (and a pool) of its own.
            Off by default: its calls are 3 to 50 times slower than the fast
            backend's, so it about triples the run (SQLite and Postgres on 2 cores:
            62 s without, 192 s with).
    """

    backends: tuple[BackendName, ...] = ("sqlite", "postgres", "mariadb")
    # Many short rounds rather than a few long ones: a median of nine pairings of the sides
    # rather than three, on a machine whose fsync switches between two speeds at second
    # scale or faster. Postgres sequential writes measured 0.69 to 1.31 of asyncpg over
    # four runs of 3 rounds of 200, and 0.79 to 1.17 over six runs of 9 rounds of 70.
    ops: int = 70
    read_ops: int = 700
    rounds: int = 9
    warmup_ops: int = 20
    concurrency: int = 16
    deep_versions: int = 100_000
    history_versions: int = 50
    history_users: int = 200
    history_limit: int = 10
    read_users: int = 1000
    write_users: int = 100
    delete_versions: int = 3
    bulk_size: int = 500
    bulk_batches: int = 2
    postgres_url: str = DEFAULT_POSTGRES_URL
    postgres_create_database: bool = True
    postgres_synchronous_commit: SynchronousCommit | None = None
    mariadb_url: str = DEFAULT_MARIADB_URL
    mariadb_create_database: bool = True
    sqlite_path: Path | None = None
    settings: EngineSettings = field(default_factory=EngineSettings)
    seed: int = 1
    peer: bool = False
    core: bool = False

    def __post_init__(self) -> None:
        if not self.backends:
            raise ConfigurationError("choose at least one backend")
        for backend in self.backends:
            if backend not in get_args(BackendName):
                raise ConfigurationError(
                    f"unknown backend {backend!r}: use sqlite, postgres or mariadb"
                )
        if len(set(self.backends)) != len(self.backends):
            raise ConfigurationError("a backend is listed twice")
        positive = (
            "ops read_ops rounds concurrency deep_versions history_versions history_users "
            "history_limit read_users write_users delete_versions bulk_size bulk_batches"
        )
        for name in positive.split():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a positive integer, not {value!r}")
        if self.postgres_synchronous_commit is not None:
            if self.postgres_synchronous_commit not in get_args(SynchronousCommit):
                raise ConfigurationError(
                    f"unknown synchronous_commit {self.postgres_synchronous_commit!r}"
                )
            if not self.postgres_create_database:
                # Changing a setting of a database we did not create would outlive the run.
                raise ConfigurationError(
                    "postgres_synchronous_commit needs a throwaway database "
                    "(not postgres_use_database)"
                )
        if self.warmup_ops < 0:
            raise ConfigurationError(f"warmup_ops must be >= 0, not {self.warmup_ops}")
        if self.read_users < self.bulk_size:
            # A bulk read asks for bulk_size distinct existing users.
            raise ConfigurationError(
                f"read_users ({self.read_users}) must be at least bulk_size ({self.bulk_size})"
            )
        if self.history_limit > self.history_versions:
            raise ConfigurationError(
                f"history_limit ({self.history_limit}) must not exceed "
                f"history_versions ({self.history_versions})"
            )

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready values (the URL without its password)."""
        values = asdict(self)
        values["backends"] = list(self.backends)
        values["sqlite_path"] = None if self.sqlite_path is None else str(self.sqlite_path)
        values["postgres_url"] = hide_password(self.postgres_url)
        values["mariadb_url"] = hide_password(self.mariadb_url)
        return values


def hide_password(url: str) -> str:
    """`url` fit for a report or an error message: its password masked, or a placeholder."""
    try:
        return normalize_url(url).render_as_string(hide_password=True)
    except ConfigurationError:
        return "<not a database URL>"
