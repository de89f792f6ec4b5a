"""Creating async engines from URLs, with the settings this library relies on.

SQLite (aiosqlite) connections get WAL journaling, a busy timeout, the
configured `synchronous` level, and transactions begun by us rather than by
the sqlite3 module: `BEGIN IMMEDIATE` for writes (so two writers never
deadlock upgrading read locks into write locks), a deferred `BEGIN` for the
rest. Postgres (asyncpg) connections get connect and command timeouts, and
behind a transaction pooler (`EngineSettings.transaction_pooler`) unnamed,
uncached statements.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, get_args

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import _deadlines
from ._checks import check_int, positive_seconds
from .errors import ConfigurationError, SnapshotValidationError

__all__ = [
    "DEFAULT_URL",
    "MAX_WAIT_SECONDS",
    "WRITE_TRANSACTION",
    "EngineSettings",
    "behind_transaction_pooler",
    "create_engine",
    "engine_settings",
    "install_sqlite_settings",
    "normalize_url",
]

DEFAULT_URL = "sqlite+aiosqlite:///snapshots.db"

WRITE_TRANSACTION = "snapshot_repo_write"
"""Execution option marking a connection whose next transaction writes (SQLite: BEGIN IMMEDIATE)."""

SqliteSynchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

MAX_WAIT_SECONDS = 2_147_483.647
"""The longest wait a setting may ask for: SQLite's busy timeout is 2^31 - 1 milliseconds
at most (a longer one silently becomes no wait at all), and no sane wait is longer."""

_MIN_BUSY_TIMEOUT = 0.001
"""SQLite counts the busy timeout in whole milliseconds: less would silently be no wait."""

_INT64_MAX = 2**63 - 1
"""The largest `sqlite_mmap_size` accepted: a pragma's number is a 64-bit integer (SQLite then
caps the mapping at its build's maximum, 2,147,418,112 bytes unless built otherwise)."""

_EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}
"""The optional extra that installs a database's driver (SQLite's ships with the package)."""

_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
    # asyncmy over aiomysql: its protocol is compiled (Cython), and measured here
    # it runs this library's reads and writes faster (see benchmarks/README.md).
    "mysql": "mysql+asyncmy",
    "mysql+asyncmy": "mysql+asyncmy",
    "mariadb": "mariadb+asyncmy",
    "mariadb+asyncmy": "mariadb+asyncmy",
}


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Connection settings for engines this library creates itself.

    Every value is checked when the settings are built (`dataclasses.replace`
    included): a wrong type or an out-of-range value raises
    `ConfigurationError` naming the setting. Waits are numbers of seconds
    above 0 and at most `MAX_WAIT_SECONDS`.

    Attributes:
        connect_timeout: seconds to wait for a new connection before failing.
        command_timeout: seconds a single Postgres statement may run before it
            is cancelled (None: no limit).
        busy_timeout: seconds a SQLite connection waits for another
            process's write lock before failing; at least 0.001 (SQLite
            counts whole milliseconds).
        sqlite_synchronous: SQLite's `synchronous` pragma: OFF, NORMAL, FULL or
            EXTRA (any case; kept in upper case). FULL (the default)
            makes every committed write survive power loss; NORMAL is faster
            and survives a crash of the process but may lose the last commits
            on power loss.
        sqlite_secure_delete: erase without a trace (default on): SQLite
            overwrites deleted content with zeros, and every erasure that
            removed rows then checkpoints the WAL into the database file and
            truncates it, so no byte of an erased state stays in either file.
            Off: erasures cost one fsync instead of about four, and the
            erased bytes stay in free pages and in the WAL until reused.
        sqlite_mmap_size: bytes of the SQLite file each connection reads through
            memory-mapped I/O (SQLite's `mmap_size` pragma). A read then takes
            pages straight from the OS page cache instead of copying each one
            through a system call: measured here on a 200,000-user file,
            `get_latest_many(100)` of random users took 0.84 to 0.90 ms instead
            of 1.05 to 1.09 (a 1,000-user file: 0.6 either way). 0, the
            default, leaves the pragma alone: off in standard SQLite builds
            (an engine you created yourself keeps what your own connect hook
            set). Off by default because an I/O error of the disk under a
            mapped page is a SIGBUS that ends the process, not an error the
            library can raise. SQLite caps the value at its build's maximum
            (2,147,418,112 bytes unless built otherwise); writes never go
            through the mapping. The last field, so that settings built with
            positional arguments keep their meaning.
        sqlite_inline_reads: run SQLite reads on the event loop's own thread
            (default on). A read of a few rows takes 10 to 20 µs in SQLite,
            less than the hop to a connection's thread and back (30 to 120
            µs), and in WAL mode it never waits for a writer. Writes always
            hop, since their commit waits for the disk. Turn it off if the
            database file is on storage slow enough that a read missing the
            OS page cache would hold up the loop (a network file system).
        pool_size: connections kept open per engine (at least 1).
        max_overflow: extra connections opened under load beyond `pool_size`
            (default 0). SQLAlchemy closes an overflow connection as soon as it
            is returned, so bursts would pay for new connections again and again;
            with 0 a burst waits for a pooled connection instead (up to
            `pool_timeout`), as asyncpg's own pool does.
        pool_timeout: seconds to wait for a free pooled connection.
        transaction_pooler: Postgres is reached through a pooler in transaction
            mode (PgBouncer's `pool_mode = transaction`, or pgcat, Supavisor, RDS
            Proxy), which may run each transaction on a different server
            connection. Statements are then never cached or named, neither by
            SQLAlchemy nor by asyncpg: a named prepared statement lives on one
            server connection, so the next transaction would find it missing,
            or its name taken by another client's. Each statement is then
            parsed and planned on every call, in one more round trip (measured
            straight to Postgres: a read 0.2 -> 0.55 ms, a write 0.5 -> 1.3 ms;
            the default keeps its cache). `subscribe()` and `changes()` raise
            `ConfigurationError`: LISTEN holds a server connection, which the
            pooler gives away after the statement. Everything else works,
            `migrate()` included (its lock is transaction-scoped). Also turned
            on by `transaction_pooler=true` or asyncpg's `statement_cache_size=0`
            in the URL (see `create_engine`). Default off; ignored for SQLite
            and MySQL/MariaDB.
    """

    connect_timeout: float = 5.0
    command_timeout: float | None = 30.0
    busy_timeout: float = 10.0
    sqlite_synchronous: SqliteSynchronous = "FULL"
    sqlite_secure_delete: bool = True
    sqlite_inline_reads: bool = True
    pool_size: int = 10
    max_overflow: int = 0
    pool_timeout: float = 10.0
    transaction_pooler: bool = False
    sqlite_mmap_size: int = 0

    def __post_init__(self) -> None:
        """Refuse every bad setting here, so that no construction path can open a connection
        with one: SQLite and the drivers would silently turn a negative wait into none and
        an unknown `synchronous` level into NORMAL, a durability downgrade.

        Raises:
            ConfigurationError: a setting has the wrong type or is out of range;
                the message names it.
        """
        for name in ("connect_timeout", "pool_timeout"):
            positive_seconds(name, getattr(self, name), most=MAX_WAIT_SECONDS)
        if self.command_timeout is not None:
            positive_seconds("command_timeout", self.command_timeout, most=MAX_WAIT_SECONDS)
        positive_seconds(
            "busy_timeout", self.busy_timeout, least=_MIN_BUSY_TIMEOUT, most=MAX_WAIT_SECONDS
        )
        for name in ("sqlite_secure_delete", "sqlite_inline_reads", "transaction_pooler"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(
                    f"{name} must be True or False, not {getattr(self, name)!r}"
                )
        try:
            check_int("pool_size", self.pool_size, minimum=1)
            check_int("max_overflow", self.max_overflow, minimum=0)
            check_int("sqlite_mmap_size", self.sqlite_mmap_size, minimum=0, maximum=_INT64_MAX)
        except SnapshotValidationError as exc:
            raise ConfigurationError(str(exc)) from None
        # SQLite reads the level case-insensitively, so lowercase is accepted too; it is
        # stored in upper case so that comparisons and reprs see one spelling.
        level = self.sqlite_synchronous
        levels = get_args(SqliteSynchronous)
        if not isinstance(level, str) or level.upper() not in levels:
            raise ConfigurationError(
                f"sqlite_synchronous must be one of {', '.join(levels)}, not {level!r}"
            )
        object.__setattr__(self, "sqlite_synchronous", level.upper())  # frozen


def normalize_url(url: str | URL) -> URL:
    """Return `url` with this library's async driver, or raise `ConfigurationError`.

    `sqlite://...`, `postgresql://...` (or `postgres://`), `mariadb://...` and
    `mysql://...` are accepted and mapped to aiosqlite, asyncpg and asyncmy,
    so the usual URLs work unchanged.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigurationError(f"not a database URL: {exc}") from None
    driver = _DRIVERS.get(parsed.drivername)
    if driver is None:
        raise ConfigurationError(
            f"unsupported database URL scheme {parsed.drivername!r}: use "
            "'sqlite+aiosqlite:///path.db', 'postgresql+asyncpg://user@host/db' or "
            "'mariadb+asyncmy://user@host/db' (or 'mysql+asyncmy://')"
        )
    return parsed.set(drivername=driver)


MYSQL_STATEMENT_CACHE = 64
"""Prepared statements each MySQL/MariaDB connection keeps (the least recently used go):
the library runs about 30 statements, plus one per IN-list size of batch reads and writes.
The server caps them all at `max_prepared_stmt_count` (16,382 by default): 64 each
leaves room for about 250 connections."""


def create_engine(url: str | URL, settings: EngineSettings | None = None) -> AsyncEngine:
    """Create an async engine for `url` configured as this library expects.

    No connection is opened here; the first operation opens one.

    A Postgres URL's query options are asyncpg's connection arguments, checked
    and converted here (a URL carries text): `statement_cache_size`,
    `max_cached_statement_lifetime`, `max_cacheable_statement_size` and
    SQLAlchemy's `prepared_statement_cache_size` are whole numbers of at least 0.
    Two more turn on `EngineSettings.transaction_pooler`: `transaction_pooler=true`
    and `statement_cache_size=0`, asyncpg's documented setting for PgBouncer (to
    turn statement caching off without the pooler's restrictions, add
    `transaction_pooler=false`).

    Raises:
        ConfigurationError: the URL is not SQLite, Postgres or MySQL/MariaDB, a
            Postgres query option is unknown to asyncpg or has a bad value, a
            transaction pooler is combined with a statement cache, or `settings`
            is not an `EngineSettings` (whose own constructor refuses bad values).
    """
    if settings is None:
        settings = EngineSettings()
    elif not isinstance(settings, EngineSettings):
        raise ConfigurationError(
            f"settings must be an EngineSettings, not {type(settings).__name__}"
        )
    parsed = normalize_url(url)
    kwargs: dict[str, Any] = {}
    pooled = False
    if parsed.get_backend_name() == "postgresql":
        parsed, query_args, pooled = _postgres_query(parsed, settings.transaction_pooler)
        kwargs["connect_args"] = {
            **query_args,
            "timeout": settings.connect_timeout,
            "command_timeout": settings.command_timeout,
        }
        if pooled:
            kwargs["connect_args"].update(_UNCACHED_STATEMENTS)
        kwargs.update(
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_timeout=settings.pool_timeout,
        )
    elif parsed.get_backend_name() in ("mysql", "mariadb"):
        kwargs["connect_args"] = {
            "connect_timeout": settings.connect_timeout,
            "charset": "utf8mb4",
            # Statements with values run as server-side prepared statements, prepared once
            # per connection (asyncmy's cache, like asyncpg's): binary protocol, no
            # escaping, no parse per call.
            "stmt_cache_size": MYSQL_STATEMENT_CACHE,
        }
        kwargs.update(
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_timeout=settings.pool_timeout,
            # The server closes a connection idle for `wait_timeout` (8 h by default);
            # recycling earlier means the pool never hands one out that it dropped.
            pool_recycle=3600,
            # Each statement sees what committed before it, as on Postgres (InnoDB's
            # default, REPEATABLE READ, also takes gap locks: more lock waits). Set
            # once per connection, not per transaction: a round trip fewer per write.
            isolation_level="READ COMMITTED",
            # Every transaction here ends itself (SQLAlchemy's Connection rolls back on
            # close, the driver path commits or rolls back, see `backends.mysql_driver`),
            # so the pool's reset-on-return ROLLBACK would be a round trip per call, and
            # one that hangs on a frozen server when `close()` returns kept connections.
            pool_reset_on_return=None,
        )
    elif parsed.database not in (None, "", ":memory:"):
        kwargs["connect_args"] = {"timeout": settings.busy_timeout}
        kwargs.update(
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_timeout=settings.pool_timeout,
            # Connections run in autocommit mode and every transaction here ends
            # itself (SQLAlchemy's Connection rolls back on close; the driver path
            # commits or rolls back in the same call), so the pool's reset-on-return
            # ROLLBACK would only cost a thread hop per operation.
            pool_reset_on_return=None,
        )
    if parsed.get_backend_name() in ("mysql", "mariadb"):
        from .backends.mysql_connect import bounded_connect  # imports asyncmy

        kwargs["async_creator"] = bounded_connect(
            parsed, kwargs.pop("connect_args"), settings.connect_timeout
        )
    try:
        engine = create_async_engine(parsed, **kwargs)
    except ModuleNotFoundError as exc:  # the driver is an optional extra
        extra = _EXTRAS.get(parsed.get_backend_name(), "")
        raise ConfigurationError(
            f"{parsed.drivername} needs the {exc.name!r} package: "
            f"pip install 'snapshot-repo[{extra}]'"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        install_sqlite_settings(engine, settings)
    if pooled:
        setattr(engine.sync_engine, _POOLER_ATTRIBUTE, True)
    return engine


_POOLER_ATTRIBUTE = "_snapshot_repo_transaction_pooler"

_POOLER_OPTION = "transaction_pooler"
"""This library's own URL query option (see `create_engine`); not passed to asyncpg."""

_WHOLE_NUMBER_OPTIONS = frozenset(
    {
        "statement_cache_size",
        "max_cached_statement_lifetime",
        "max_cacheable_statement_size",
        "prepared_statement_cache_size",  # SQLAlchemy's, for its own statement cache
    }
)
"""URL query options that asyncpg or SQLAlchemy's adapter needs as integers, not text."""

_CACHE_OPTIONS = ("statement_cache_size", "prepared_statement_cache_size")

_OTHER_OPTIONS = frozenset({"plugin", "plugins"})
"""Query options SQLAlchemy's `create_engine` takes for itself (it loads those plugins)."""

_NOT_TEXT = frozenset({"dsn", "loop", "connection_class", "record_class", "server_settings"})
"""asyncpg's connection arguments that no URL can give (objects, not text)."""

_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True}
_BOOLEANS.update(dict.fromkeys(("false", "0", "no", "off"), False))


def _unnamed_statement() -> str:
    """The name SQLAlchemy's adapter gives asyncpg for each statement it prepares.

    asyncpg prepares a statement named "" as Postgres's unnamed statement,
    which lasts until the next one and is never left on a server connection;
    Parse and Bind are sent without a Sync between them, so a transaction
    pooler keeps both on one server connection.
    """
    return ""


_UNCACHED_STATEMENTS: dict[str, Any] = {
    "statement_cache_size": 0,  # asyncpg's `fetch` and `execute` then use unnamed statements
    "prepared_statement_cache_size": 0,
    "prepared_statement_name_func": _unnamed_statement,
}
"""The connection arguments for a transaction pooler: no statement is named or kept."""


def behind_transaction_pooler(engine: AsyncEngine) -> bool:
    """Whether `engine` was made by `create_engine` for a transaction pooler.

    An engine the application created itself reads False: make it with
    `create_engine(url, EngineSettings(transaction_pooler=True))` instead.
    """
    return getattr(engine.sync_engine, _POOLER_ATTRIBUTE, False) is True


def _postgres_query(url: URL, pooler: bool) -> tuple[URL, dict[str, Any], bool]:
    """Check and convert a Postgres URL's query options (see `create_engine`).

    Returns the URL without the options converted here, those options as
    asyncpg's connection arguments, and whether a transaction pooler is in front.
    """
    query = dict(url.query)
    known = _url_options()
    unknown = [] if known is None else sorted(set(query) - known)
    if unknown:
        raise ConfigurationError(
            f"unknown Postgres URL option {unknown[0]!r}: the query options are "
            "asyncpg's connection arguments (e.g. ssl=require, statement_cache_size=0)"
        )
    converted: dict[str, Any] = {}
    for name in sorted(_WHOLE_NUMBER_OPTIONS & set(query)):
        converted[name] = _whole_number(name, query[name])
    said = _url_boolean(query[_POOLER_OPTION]) if _POOLER_OPTION in query else None
    if pooler and said is False:
        raise ConfigurationError(
            "EngineSettings(transaction_pooler=True) contradicts "
            "transaction_pooler=false in the URL"
        )
    pooled = pooler or said is True or (said is None and converted.get("statement_cache_size") == 0)
    cached = [name for name in _CACHE_OPTIONS if converted.get(name, 0) > 0]
    if pooled and cached:
        raise ConfigurationError(
            f"{cached[0]}={converted[cached[0]]} in the URL cannot work through a transaction "
            "pooler: a statement cached on one server connection is missing on the next "
            "(remove it; transaction_pooler turns both statement caches off)"
        )
    return url.difference_update_query([*converted, _POOLER_OPTION]), converted, pooled


@cache
def _url_options() -> frozenset[str] | None:
    """The query options a Postgres URL may have: `asyncpg.connect`'s text arguments, and
    SQLAlchemy's and ours. None without asyncpg (`create_async_engine` then names the extra)."""
    try:
        import asyncpg
    except ModuleNotFoundError:
        return None
    arguments = frozenset(inspect.signature(asyncpg.connect).parameters) - _NOT_TEXT
    return arguments | _WHOLE_NUMBER_OPTIONS | _OTHER_OPTIONS | {_POOLER_OPTION}


def _whole_number(name: str, value: str | tuple[str, ...]) -> int:
    """A URL query option that must be an integer of at least 0."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise ConfigurationError(
        f"{name} in the URL must be a whole number of at least 0, not {value!r}"
    )


def _url_boolean(value: str | tuple[str, ...]) -> bool:
    """`transaction_pooler=` in a URL: true/false (or 1/0, yes/no, on/off)."""
    flag = _BOOLEANS.get(value.lower()) if isinstance(value, str) else None
    if flag is None:
        raise ConfigurationError(
            f"transaction_pooler in the URL must be true or false, not {value!r}"
        )
    return flag


def _use_wal(cursor: Any) -> None:
    """Switch the database file to WAL journaling (a setting kept in the file).

    Switching needs the file to itself, and SQLite does not wait on its busy
    handler for that: when several processes open a new file at once, all but
    one get "database is locked". The switch is then left to the one that got
    it (every later connection sees WAL), rather than failing the connection.
    """
    cursor.execute("PRAGMA journal_mode")
    if str(cursor.fetchone()[0]).lower() == "wal":
        return
    try:
        cursor.execute("PRAGMA journal_mode = WAL")
    except Exception as exc:  # the driver's OperationalError, wrapped by SQLAlchemy's adapter
        if "locked" not in str(exc):
            raise


_SETTINGS_ATTRIBUTE = "_snapshot_repo_settings"


def engine_settings(engine: AsyncEngine) -> EngineSettings:
    """The settings a SQLite engine was configured with (see `install_sqlite_settings`).

    The defaults for an engine this library never configured.
    """
    settings = getattr(engine.sync_engine, _SETTINGS_ATTRIBUTE, None)
    return settings if isinstance(settings, EngineSettings) else EngineSettings()


def install_sqlite_settings(engine: AsyncEngine, settings: EngineSettings) -> None:
    """Set the pragmas and transaction handling on every connection of a SQLite engine.

    Also applied by `SnapshotRepository` to engines the application created
    itself, since the write path depends on it. Idempotent.
    """
    sync_engine = engine.sync_engine
    if getattr(sync_engine, _SETTINGS_ATTRIBUTE, None) is not None:
        return
    setattr(sync_engine, _SETTINGS_ATTRIBUTE, settings)
    busy_ms = int(settings.busy_timeout * 1000)
    synchronous = settings.sqlite_synchronous
    secure_delete = "ON" if settings.sqlite_secure_delete else "OFF"
    mmap_size = settings.sqlite_mmap_size

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module: it would
        # begin deferred transactions lazily, which deadlock between writers.
        dbapi_connection.isolation_level = None
        # Opening reads the file's journal mode, which waits while another process
        # holds the file exclusively (crash recovery, locking_mode=EXCLUSIVE): that
        # wait is cut to what the calling operation has left of its deadline.
        left = _deadlines.remaining()
        wait_ms = busy_ms if left is None else min(busy_ms, int(left * 1000))
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {wait_ms}")
            _use_wal(cursor)
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
            cursor.execute(f"PRAGMA secure_delete = {secure_delete}")
            if mmap_size:
                cursor.execute(f"PRAGMA mmap_size = {mmap_size}")
            if wait_ms != busy_ms:
                cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
        finally:
            cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        if connection.get_execution_options().get(WRITE_TRANSACTION):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")
