"""Setting up a backend: the database, its migration, every side's connections, and the
durability check.

Each opener is an async context manager that yields a `Setup` and removes
whatever it created (a throwaway Postgres or MariaDB database, a temporary
SQLite file) on exit, failure included. Each refuses a database that already
holds snapshots before migrating or writing anything. A MariaDB server that
cannot be reached, or no asyncmy installed, raises `BackendUnavailable`
before anything is created: the run goes on without that backend.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from snapshot_repo import ConfigurationError, EngineSettings, SnapshotRepository
from snapshot_repo.engine import normalize_url

from .asyncpg_side import AsyncpgSide, keep_session
from .config import CORE, LIBRARY, BenchConfig, hide_password
from .mariadb_side import READ_COMMITTED, MariadbSide, SharedConnections
from .peer import PEER, PeerSide, PeerStatements, peer_engine
from .seeding import MariadbSeeder, PostgresSeeder, Seeder, SqliteSeeder
from .sides import CoreSide, LibrarySide, Side
from .sql import holds_snapshots, raw_statements, scope_of
from .sqlite_sides import AiosqliteSide, Sqlite3Side, Sqlite3Thread
from .state import BenchState

__all__ = [
    "BackendUnavailable",
    "Setup",
    "mariadb_admin",
    "mariadb_connect_args",
    "mariadb_value",
    "open_mariadb",
    "open_postgres",
    "open_sqlite",
    "open_sqlite3",
    "sqlite_pragmas",
]


class BackendUnavailable(Exception):
    """The database cannot be reached (or its driver is not installed): skip the backend.

    Raised by an opener before it creates or changes anything.
    """


@dataclass
class Setup:
    """One migrated, empty database with every side connected to it."""

    server: str
    sides: list[Side]
    seeder: Seeder
    durability: dict[str, str]


def _asyncpg_dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _refuse_data(where: str) -> ConfigurationError:
    return ConfigurationError(
        f"{where} already holds snapshots: the benchmark runs only on an empty database"
    )


async def _add_core_and_peer(
    stack: AsyncExitStack,
    config: BenchConfig,
    url: URL,
    settings: EngineSettings,
    scope: dict[str, str],
    sides: list[Side],
    engines: dict[str, AsyncEngine],
) -> None:
    """The core-backend and plain-SQLAlchemy sides a server database runs with `--core`
    and `--peer` (SQLite adds its own: its core side also runs untraced)."""
    if config.core:
        core = SnapshotRepository.from_url(url, BenchState, settings=settings, backend="core")
        stack.push_async_callback(core.close)
        sides.append(CoreSide(core))
        engines[CORE] = core.engine
    if config.peer:
        peer = peer_engine(url, settings, ())
        stack.push_async_callback(peer.dispose)
        sides.append(PeerSide(peer, PeerStatements(peer.dialect.name, scope)))
        engines[PEER] = peer


@asynccontextmanager
async def open_postgres(config: BenchConfig) -> AsyncIterator[Setup]:
    """A migrated, empty Postgres database with the library, asyncpg, (`core`) the library on
    its core backend and (`peer`) the peer.

    A throwaway database (`snapshot_repo_bench_<random>`) unless
    `postgres_create_database` is off, dropped on exit even on failure.

    Raises:
        ConfigurationError: not a Postgres URL, or the database holds snapshots.
        RuntimeError: the sides run with different `synchronous_commit`.
    """
    url = normalize_url(config.postgres_url)
    if url.get_backend_name() != "postgresql":
        raise ConfigurationError(f"not a Postgres URL: {hide_password(config.postgres_url)}")
    settings = config.settings
    async with AsyncExitStack() as stack:
        if config.postgres_create_database:
            name = f"snapshot_repo_bench_{secrets.token_hex(4)}"
            admin = await asyncpg.connect(_asyncpg_dsn(url), timeout=settings.connect_timeout)
            try:
                await admin.execute(f'CREATE DATABASE "{name}"')
                if config.postgres_synchronous_commit is not None:
                    # A database default reaches every new session of both sides alike.
                    await admin.execute(
                        f'ALTER DATABASE "{name}" SET synchronous_commit = '
                        f"{config.postgres_synchronous_commit}"
                    )
            finally:
                await admin.close()
            stack.push_async_callback(_drop_database, url, name, settings.connect_timeout)
            url = url.set(database=name)
        pool = await asyncpg.create_pool(
            _asyncpg_dsn(url),
            min_size=settings.pool_size,
            max_size=settings.pool_size,
            timeout=settings.connect_timeout,
            command_timeout=settings.command_timeout,
            reset=keep_session,
        )
        stack.push_async_callback(pool.close)
        if await holds_snapshots(pool.fetchval, "SELECT to_regclass({table}) IS NOT NULL"):
            raise _refuse_data(hide_password(config.postgres_url))
        repo = SnapshotRepository.from_url(url, BenchState, settings=settings)
        stack.push_async_callback(repo.close)
        await repo.migrate()
        scope = await scope_of(repo, pool.fetchrow)
        sql = raw_statements("postgres", scope)
        sides: list[Side] = [LibrarySide(repo), AsyncpgSide(pool, sql)]
        engines = {LIBRARY: repo.engine}
        await _add_core_and_peer(stack, config, url, settings, scope, sides, engines)
        commits = await _engine_answers(engines, ("SHOW synchronous_commit",))
        raw_commit = str(await pool.fetchval("SHOW synchronous_commit"))
        commits["asyncpg"] = [raw_commit]
        if any(values != [raw_commit] for values in commits.values()):
            raise RuntimeError(f"synchronous_commit differs between sides: {commits}")
        server = "PostgreSQL " + str(await pool.fetchval("SHOW server_version"))
        yield Setup(
            server=server,
            sides=sides,
            seeder=PostgresSeeder(pool, sql),
            durability={"synchronous_commit": raw_commit},
        )


async def _engine_answers(
    engines: Mapping[str, AsyncEngine], queries: Sequence[str]
) -> dict[str, list[str]]:
    """Each SQLAlchemy side's answers to `queries` (settings), read on one of its connections."""
    answers: dict[str, list[str]] = {}
    for name, engine in engines.items():
        async with engine.connect() as conn:
            answers[name] = [str((await conn.exec_driver_sql(query)).scalar()) for query in queries]
    return answers


async def _drop_database(url: URL, name: str, connect_timeout: float) -> None:
    admin = await asyncpg.connect(_asyncpg_dsn(url), timeout=connect_timeout)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


MARIADB_STATEMENT_CACHE = 64
"""Server-side prepared statements each raw MariaDB connection keeps (asyncmy's
`stmt_cache_size`): every statement of the raw side is then prepared once per
connection and runs in the binary protocol, as asyncpg's statement cache does on
Postgres; 0 would send every statement as text, with its values escaped in."""


def mariadb_connect_args(url: URL, settings: EngineSettings) -> dict[str, Any]:
    """asyncmy's (and aiomysql's) `connect` arguments for the server of `url`, no database."""
    return {
        "host": url.host or "127.0.0.1",
        "port": url.port or 3306,
        "user": url.username or "root",
        "password": url.password or "",
        "charset": "utf8mb4",  # as the library's connections
        "connect_timeout": max(1, round(settings.connect_timeout)),
    }


async def mariadb_value(conn: Any, query: str) -> Any:
    """The first column of the first row of `query`, on a raw connection."""
    async with conn.cursor() as cursor:
        await cursor.execute(query)
        row = await cursor.fetchone()
    return None if row is None else row[0]


async def mariadb_admin(connect: Mapping[str, Any], within: float) -> Any:
    """A raw asyncmy connection to the server (no database), in autocommit mode, made within
    `within` seconds (asyncmy's own `connect_timeout` bounds the TCP connect only)."""
    import asyncmy

    async with asyncio.timeout(within):
        return await asyncmy.connect(**connect, autocommit=True)


async def _drop_mariadb_database(connect: Mapping[str, Any], name: str, within: float) -> None:
    admin = await mariadb_admin(connect, within)
    try:
        await mariadb_value(admin, f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        admin.close()


_ISOLATION = "SELECT @@SESSION.tx_isolation"
"""A connection's isolation level, read back from every side's connections."""


@asynccontextmanager
async def open_mariadb(config: BenchConfig) -> AsyncIterator[Setup]:
    """A migrated, empty MariaDB database with the library, raw asyncmy, (`core`) the library
    on its core backend and (`peer`) the peer.

    A throwaway database (`bench_snapshot_repo_<random>`, utf8mb4 with a binary
    collation) unless `mariadb_create_database` is off, dropped on exit even on
    failure.

    Raises:
        BackendUnavailable: the server cannot be reached, or asyncmy is not
            installed; nothing was created.
        ConfigurationError: not a MariaDB URL, a MySQL server (the raw side's SQL
            is MariaDB's: `DELETE ... RETURNING`, the sequence engine), or the
            database holds snapshots.
        RuntimeError: the sides run with different isolation levels.
    """
    url = normalize_url(config.mariadb_url)
    where = hide_password(config.mariadb_url)
    if url.get_backend_name() not in ("mariadb", "mysql"):
        raise ConfigurationError(f"not a MariaDB URL: {where}")
    if not config.mariadb_create_database and not url.database:
        raise ConfigurationError(f"no database to run in: {where} names none")
    try:
        import asyncmy
        import asyncmy.errors
    except ModuleNotFoundError as exc:
        raise BackendUnavailable(
            f"the MariaDB driver is not installed ({exc.name}): pip install 'snapshot-repo[mysql]'"
        ) from None
    settings = config.settings
    connect = mariadb_connect_args(url, settings)
    try:
        admin = await mariadb_admin(connect, settings.connect_timeout)
    except (OSError, TimeoutError, asyncmy.errors.Error) as exc:
        raise BackendUnavailable(f"MariaDB at {where} is unreachable: {exc!r}") from exc
    async with AsyncExitStack() as stack:
        try:
            version = str(await mariadb_value(admin, "SELECT VERSION()"))
            if "mariadb" not in version.lower():
                raise ConfigurationError(
                    f"{where} is not MariaDB but {version}: the raw side's SQL is MariaDB's"
                )
            durability = {
                "innodb_flush_log_at_trx_commit": str(
                    await mariadb_value(admin, "SELECT @@GLOBAL.innodb_flush_log_at_trx_commit")
                ),
                "log_bin": str(await mariadb_value(admin, "SELECT @@GLOBAL.log_bin")),
            }
            if config.mariadb_create_database:
                name = f"bench_snapshot_repo_{secrets.token_hex(4)}"
                await mariadb_value(
                    admin,
                    f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
                )
                stack.push_async_callback(
                    _drop_mariadb_database, connect, name, settings.connect_timeout
                )
                url = url.set(database=name)
        finally:
            admin.close()
        pool = await asyncmy.create_pool(
            minsize=settings.pool_size,
            maxsize=settings.pool_size,
            database=url.database,
            autocommit=True,
            init_command=READ_COMMITTED,
            stmt_cache_size=MARIADB_STATEMENT_CACHE,
            **connect,
        )

        async def close_pool() -> None:
            pool.close()
            await pool.wait_closed()

        stack.push_async_callback(close_pool)

        async def value(query: str) -> Any:
            async with pool.acquire() as conn:
                return await mariadb_value(conn, query)

        async def first_row(query: str) -> Sequence[Any]:
            async with pool.acquire() as conn, conn.cursor() as cursor:
                await cursor.execute(query)
                return tuple(await cursor.fetchone())

        exists = (
            "SELECT COUNT(*) > 0 FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_name = {table}"
        )
        if await holds_snapshots(value, exists):
            raise _refuse_data(where)
        repo = SnapshotRepository.from_url(url, BenchState, settings=settings)
        stack.push_async_callback(repo.close)
        await repo.migrate()
        scope = await scope_of(repo, first_row, quote="`")
        sql = raw_statements("mariadb", scope)
        # The raw SQL runs on the library's own connections (see `SharedConnections`);
        # the asyncmy pool seeds and answers the setup's questions.
        sides: list[Side] = [LibrarySide(repo), MariadbSide(SharedConnections(repo), sql)]
        engines = {LIBRARY: repo.engine}
        await _add_core_and_peer(stack, config, url, settings, scope, sides, engines)
        levels = await _engine_answers(engines, (_ISOLATION,))
        raw_level = str(await value(_ISOLATION))
        levels["asyncmy"] = [raw_level]
        if any(values != [raw_level] for values in levels.values()):
            raise RuntimeError(f"isolation levels differ between sides: {levels}")
        yield Setup(
            server="MariaDB " + version.split("-", 1)[0],  # 10.11.19-MariaDB-0+deb12u1
            sides=sides,
            seeder=MariadbSeeder(pool, sql),
            durability={**durability, "isolation": raw_level},
        )


def sqlite_pragmas(settings: EngineSettings) -> tuple[str, ...]:
    """The pragmas `snapshot_repo.engine` sets on its connections, from the same settings."""
    return (
        f"PRAGMA busy_timeout = {int(settings.busy_timeout * 1000)}",
        "PRAGMA journal_mode = WAL",
        f"PRAGMA synchronous = {settings.sqlite_synchronous}",
        f"PRAGMA secure_delete = {'ON' if settings.sqlite_secure_delete else 'OFF'}",
        f"PRAGMA mmap_size = {settings.sqlite_mmap_size}",
    )


_DURABILITY_QUERIES = (
    "PRAGMA journal_mode",
    "PRAGMA synchronous",
    "PRAGMA busy_timeout",
    "PRAGMA secure_delete",
    "PRAGMA mmap_size",
)


def open_sqlite3(path: Path, settings: EngineSettings) -> sqlite3.Connection:
    """A stdlib `sqlite3` connection with the library's pragmas, transactions left to the caller."""
    # isolation_level=None: the sqlite3 module must not begin transactions itself;
    # every write transaction is an explicit BEGIN IMMEDIATE, as in the library.
    conn = sqlite3.connect(path, timeout=settings.busy_timeout, isolation_level=None)
    for pragma in sqlite_pragmas(settings):
        conn.execute(pragma)
    return conn


@asynccontextmanager
async def open_sqlite(config: BenchConfig) -> AsyncIterator[Setup]:
    """A migrated, empty SQLite file with the library, aiosqlite, sqlite3, (`core`) the library
    on its core backend and (`peer`) the peer.

    A file in a temporary directory removed on exit, unless `sqlite_path` names one.

    Raises:
        ConfigurationError: the file holds snapshots.
        RuntimeError: the sides' connections differ in durability settings.
    """
    settings = config.settings
    async with AsyncExitStack() as stack:
        if config.sqlite_path is None:
            directory = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="snapshot-repo-bench-")
            )
            path = Path(directory) / "bench.db"
        else:
            path = config.sqlite_path
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-sqlite3")
        stack.callback(executor.shutdown)
        loop = asyncio.get_running_loop()
        raw = await loop.run_in_executor(executor, open_sqlite3, path, settings)
        stack.push_async_callback(loop.run_in_executor, executor, raw.close)
        thread = Sqlite3Thread(executor, raw)

        async def value(query: str) -> Any:
            rows: list[Any] = await thread.call(thread.fetch, query)
            return rows[0][0]

        exists = (
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = {table})"
        )
        if await holds_snapshots(value, exists):
            raise _refuse_data(str(path))
        url = URL.create("sqlite+aiosqlite", database=str(path))
        repo = SnapshotRepository.from_url(url, BenchState, settings=settings)
        stack.push_async_callback(repo.close)
        await repo.migrate()
        untraced_settings = replace(settings, sqlite_secure_delete=False)
        untraced = SnapshotRepository.from_url(url, BenchState, settings=untraced_settings)
        stack.push_async_callback(untraced.close)

        async def first_row(query: str) -> Sequence[Any]:
            rows: list[Any] = await thread.call(thread.fetch, query)
            return tuple(rows[0])

        scope = await scope_of(repo, first_row)
        sql = raw_statements("sqlite", scope)
        aconn = await aiosqlite.connect(path, timeout=settings.busy_timeout, isolation_level=None)
        stack.push_async_callback(aconn.close)
        for pragma in sqlite_pragmas(settings):
            await aconn.execute(pragma)

        sides: list[Side] = [
            LibrarySide(repo, untraced),
            AiosqliteSide(aconn, sql),
            Sqlite3Side(thread, sql),
        ]
        engines = {LIBRARY: repo.engine}
        if config.core:
            core = SnapshotRepository.from_url(url, BenchState, settings=settings, backend="core")
            stack.push_async_callback(core.close)
            core_untraced = SnapshotRepository.from_url(
                url, BenchState, settings=untraced_settings, backend="core"
            )
            stack.push_async_callback(core_untraced.close)
            sides.append(CoreSide(core, core_untraced))
            engines[CORE] = core.engine
        if config.peer:
            peer = peer_engine(url, settings, sqlite_pragmas(settings))
            stack.push_async_callback(peer.dispose)
            sides.append(PeerSide(peer, PeerStatements("sqlite", scope)))
            engines[PEER] = peer
        observed = await _engine_answers(engines, _DURABILITY_QUERIES)
        observed["aiosqlite"] = []
        observed["sqlite3"] = []
        for query in _DURABILITY_QUERIES:
            observed["aiosqlite"].append(str(next(iter(await aconn.execute_fetchall(query)))[0]))
            observed["sqlite3"].append(str((await thread.call(thread.fetch, query))[0][0]))
        if any(values != observed[LIBRARY] for values in observed.values()):
            raise RuntimeError(f"SQLite connections differ in durability settings: {observed}")
        journal_mode, synchronous, busy_ms, secure_delete, mmap_size = observed[LIBRARY]
        yield Setup(
            server=f"SQLite {sqlite3.sqlite_version}",
            sides=sides,
            seeder=SqliteSeeder(thread, sql),
            durability={
                "journal_mode": journal_mode,
                "synchronous": f"{settings.sqlite_synchronous} ({synchronous})",
                "busy_timeout_ms": busy_ms,
                "secure_delete": secure_delete,
                "mmap_size": mmap_size,
                "path": str(path),
            },
        )
