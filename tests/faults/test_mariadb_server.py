"""The MariaDB server itself fails: stopped, crashed or frozen, under load and idle.

The MariaDB counterpart of `test_server.py`, on a throwaway server of this
module (`tests/support/mariadb_server.py`), never on the shared one. The
first test checks the server fixture itself with raw SQL (a kill keeps
committed rows, a freeze stops answers), so that a failure below is the
library's, not the harness's.

MariaDB differs from Postgres in one way that shapes these tests: it has
no statement timeout the driver can set per connection (`command_timeout`
is Postgres-only), and asyncmy's `connect_timeout` covers the TCP connect
but not the server's greeting. On a frozen server only the repository's
`operation_timeout` bounds a call, so the frozen-server test sets it. The
engine settings are the Postgres tests' `fault_settings` (conftest).

Each test brings the server back up before it ends; the `server` fixture
restarts it anyway if a test failed half-way.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator

import asyncmy.errors
import pytest

import snapshot_repo as sr
from tests.support.databases import (
    MARIADB_CLEAR_ALL,
    Cart,
    mariadb_admin,
    mariadb_connect,
    mariadb_fetch,
    migrate_database,
    run_blocking,
)

from ..support.consistency import assert_consistent, payload_items, read_tables
from ..support.mariadb_server import MariadbServer, running_server
from ..support.pool import queue_pool

# The same load and the same checks as the Postgres restart test, so that both
# databases are held to one standard.
from .test_server import (
    CLOSE_BOUND,
    HANG,
    WRITERS,
    Load,
    describe_calls,
    restart_problems,
)

pytestmark = pytest.mark.fault

OPERATION_TIMEOUT = 1.0
HEALTH_TIMEOUT = 1.0
# A registered deadline fires up to an eighth of the shortest limit late, and the
# connection's teardown follows: a bound, not a measured time.
TIMEOUT_SLACK = 0.75
CR_CONN_HOST_ERROR = 2003
"""The client's "Can't connect to MySQL server" (the connection was refused)."""


def snap(user_id: str, *items: str) -> sr.Snapshot[Cart]:
    return sr.Snapshot(user_id=user_id, state=Cart(items=list(items)))


@pytest.fixture(scope="module")
def mariadb_process() -> Iterator[MariadbServer]:
    """One throwaway MariaDB server for this module, destroyed at the end whatever happens.

    Outside CI, a machine without MariaDB server binaries skips these tests
    with the reason; with CI=true it fails them.
    """
    with running_server(()) as server:
        yield server


@pytest.fixture
def server(mariadb_process: MariadbServer) -> Iterator[MariadbServer]:
    """The throwaway server, running and thawed at the start and at the end of the test."""
    _bring_up(mariadb_process)
    yield mariadb_process
    _bring_up(mariadb_process)


def _bring_up(server: MariadbServer) -> None:
    if server.frozen:
        server.thaw()
    if not server.running:
        server.start()


@pytest.fixture(scope="module")
def migrated_url(mariadb_process: MariadbServer) -> str:
    """A database on the throwaway server, migrated once by the library's migrations."""
    url = mariadb_process.create_database(f"fault_{uuid.uuid4().hex[:12]}")
    run_blocking(migrate_database(url))
    return url


@pytest.fixture
def server_url(server: MariadbServer, migrated_url: str) -> str:
    """The migrated database, emptied (migrating afresh per test would cost a second)."""
    run_blocking(mariadb_admin(migrated_url, *MARIADB_CLEAR_ALL))
    return migrated_url


async def test_the_throwaway_server_keeps_commits_across_a_kill_and_freezes(
    server: MariadbServer,
) -> None:
    """The harness itself: committed rows survive SIGKILL and a clean stop; while frozen,
    a connection gets no greeting; after thawing the same connection answers."""
    url = server.create_database(f"selfcheck_{uuid.uuid4().hex[:12]}")
    database = url.rsplit("/", 1)[1]
    await asyncio.to_thread(
        server.execute,
        "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(20)) ENGINE=InnoDB",
        "INSERT INTO t VALUES (1, 'one'), (2, 'two')",
        database=database,
    )
    await asyncio.to_thread(server.kill)
    assert not server.running
    with pytest.raises(asyncmy.errors.OperationalError) as refused:  # the port is closed
        await mariadb_connect(url)
    assert refused.value.args[0] == CR_CONN_HOST_ERROR, refused.value
    await asyncio.to_thread(server.start)
    assert await mariadb_fetch(url, "SELECT id, v FROM t ORDER BY id") == [(1, "one"), (2, "two")]

    conn = await mariadb_connect(url)
    try:
        await asyncio.to_thread(server.freeze)
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5), conn.cursor() as cursor:
                    await cursor.execute("SELECT 1")
            with pytest.raises(TimeoutError):  # the handshake waits for a greeting
                async with asyncio.timeout(0.5):
                    await mariadb_connect(url)
        finally:
            await asyncio.to_thread(server.thaw)
    finally:
        conn.close()
    await asyncio.to_thread(server.execute, "INSERT INTO t VALUES (3, 'three')", database=database)
    await asyncio.to_thread(server.stop)
    await asyncio.to_thread(server.start)
    assert [r[0] for r in await mariadb_fetch(url, "SELECT id FROM t ORDER BY id")] == [1, 2, 3]


async def check_acknowledged(url: str, acknowledged: dict[tuple[str, int], list[str]]) -> None:
    """Every acknowledged write is stored under its version; the tables are consistent."""
    rows = await read_tables(url)
    assert_consistent(rows)
    for (user, version), items in acknowledged.items():
        assert user in rows, f"{user} lost every version"
        stored = rows[user].history[version - 1]
        assert payload_items(stored) == items, (user, version)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_server_restart_under_load(
    server: MariadbServer, server_url: str, fault_settings: sr.EngineSettings, how: str
) -> None:
    """Writers keep writing while the server goes down and comes back (as `test_server.py`).

    During the outage every call fails fast with StorageError; after the
    restart the same repository writes again, with at most one failed call
    per connection that was pooled when the server went down and per
    writer; every acknowledged write is stored.
    """
    repo = sr.SnapshotRepository.from_url(server_url, Cart, settings=fault_settings)
    load = Load(repo)
    try:
        load.start()
        await load.wait_for("before", ok=True, count=100)
        pool = queue_pool(repo.engine)
        pooled = pool.checkedin() + pool.checkedout()

        load.phase = "stopping"
        await asyncio.to_thread(server.kill if how == "sigkill" else server.stop)
        load.phase = "outage"  # the server has exited: nothing can succeed now
        await load.wait_for("outage", ok=False, count=3 * WRITERS, within=10)

        load.phase = "restarting"
        await asyncio.to_thread(server.start)
        load.phase = "after"
        await load.wait_for("after", ok=True, count=200)
    finally:
        await load.stop()
        await asyncio.wait_for(repo.close(), HANG)

    calls = load.calls
    print(f"\n{how}: {pooled} pooled connections at the stop; calls by phase:")
    print(describe_calls(calls))
    problems = restart_problems(calls, pooled)
    acknowledged = {(c.user, c.version): c.items for c in calls if c.version is not None}
    try:
        await check_acknowledged(server_url, acknowledged)
    except AssertionError as exc:
        problems.append(f"stored rows: {exc}")
    assert not problems, problems


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
@pytest.mark.parametrize("first", ["write", "read"])
async def test_idle_pool_after_a_restart(
    server: MariadbServer,
    server_url: str,
    fault_settings: sr.EngineSettings,
    first: str,
    how: str,
) -> None:
    """The server restarts while every pooled connection is idle.

    A read on a dead connection is repeated once on a fresh one, so it
    succeeds. A write cannot be (it may have committed): the first one
    fails with ConnectionLostError, which drops the whole dead generation of
    the pool, and the call after it succeeds; then 100 calls in a row do.
    """
    async with sr.SnapshotRepository.from_url(server_url, Cart, settings=fault_settings) as repo:
        await asyncio.gather(*(repo.upsert_latest(snap(f"idle{n}", "w")) for n in range(6)))
        pooled = queue_pool(repo.engine).checkedin()
        assert pooled >= 2, pooled  # the gather needed several connections
        await asyncio.to_thread(server.kill if how == "sigkill" else server.stop)
        await asyncio.to_thread(server.start)

        failures: list[sr.StorageError] = []
        successes = 0
        for n in range(102):
            user = f"idle{n % 6}"
            write = (n % 2 == 0) == (first == "write")
            call = repo.upsert_latest(snap(user, str(n))) if write else repo.get_latest(user)
            try:
                async with asyncio.timeout(HANG):
                    await call
            except sr.StorageError as exc:
                failures.append(exc)
                continue
            successes += 1
            if successes == 100:
                break
        print(f"\n{how}, {pooled} idle pooled connections, first a {first}: {failures}")
        assert successes == 100
        if first == "read":
            assert failures == []
        else:
            assert len(failures) == 1, failures
            assert isinstance(failures[0], sr.ConnectionLostError), repr(failures[0])
            assert "idempotency key" in str(failures[0])
    assert_consistent(await read_tables(server_url))


async def test_a_write_whose_connection_died_is_retried_safely_with_its_idempotency_key(
    server: MariadbServer, server_url: str, fault_settings: sr.EngineSettings
) -> None:
    """What ConnectionLostError tells callers to do works on a restarted server: the
    retry with the same idempotency key stores the write once, whether or not it
    had committed."""
    async with sr.SnapshotRepository.from_url(server_url, Cart, settings=fault_settings) as repo:
        await repo.upsert_latest(snap("k", "v1"), idempotency_key="k-1")
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.start)
        with pytest.raises(sr.ConnectionLostError):
            await repo.upsert_latest(snap("k", "v2"), idempotency_key="k-2")
        retried = await repo.upsert_latest(snap("k", "v2"), idempotency_key="k-2")
        again = await repo.upsert_latest(snap("k", "v2"), idempotency_key="k-2")
        assert retried.version == again.version == 2
        assert [s.version for s in await repo.get_history("k")] == [2, 1]
    assert_consistent(await read_tables(server_url), expected_counts={"k": 2})


async def test_writes_acknowledged_before_a_kill_are_all_readable_after_the_restart(
    server: MariadbServer, server_url: str, fault_settings: sr.EngineSettings
) -> None:
    """SIGKILL right after a burst of concurrent writes and a batch: every write the
    library acknowledged is there after crash recovery, through the library and raw."""
    acknowledged: dict[tuple[str, int], list[str]] = {}
    async with sr.SnapshotRepository.from_url(server_url, Cart, settings=fault_settings) as repo:

        async def writer(n: int) -> None:
            for i in range(15):
                user, items = f"a{(n + i) % 5}", [f"{n}-{i}"]
                stored = await repo.upsert_latest(snap(user, *items))
                acknowledged[(user, stored.version)] = items

        await asyncio.gather(*(writer(n) for n in range(6)))
        batch = [snap(f"b{n}", f"batch-{n}") for n in range(20)]
        for stored in await repo.upsert_many(batch):
            acknowledged[(stored.user_id, stored.version)] = stored.state.items
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.start)

        for (user, version), items in acknowledged.items():
            found = await repo.get_version(user, version)
            assert found is not None, (user, version)
            assert found.state.items == items, (user, version)
    assert len(acknowledged) == 6 * 15 + 20
    await check_acknowledged(server_url, acknowledged)


async def test_frozen_server_calls_are_bounded_by_the_operation_timeout(
    server: MariadbServer, server_url: str, fault_settings: sr.EngineSettings
) -> None:
    """SIGSTOP the server: a read and a write on pooled connections, and a call that
    needs a new connection, fail with StorageError ("timed out") within
    `operation_timeout`; `health()` reports unreachable within its timeout;
    `close()` of an idle repository returns within a few seconds. After SIGCONT
    the same repository works again and the tables are consistent."""

    def bounded() -> sr.SnapshotRepository[Cart]:
        return sr.SnapshotRepository.from_url(
            server_url,
            Cart,
            settings=fault_settings,
            operation_timeout=OPERATION_TIMEOUT,
            health_timeout=HEALTH_TIMEOUT,
        )

    repo, other, cold = bounded(), bounded(), bounded()
    observed: list[str] = []
    failures: list[str] = []
    loop = asyncio.get_running_loop()
    bound = OPERATION_TIMEOUT + TIMEOUT_SLACK
    try:
        for r in (repo, other):
            await asyncio.gather(*(r.upsert_latest(snap(f"f{n}", "w")) for n in range(4)))
        await asyncio.to_thread(server.freeze)
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "upsert_latest": lambda: repo.upsert_latest(snap("f0", "frozen")),
            "get_latest": lambda: repo.get_latest("f0"),
            "get_latest on a new connection": lambda: cold.get_latest("f0"),
        }
        for name, make in calls.items():
            started = loop.time()
            try:
                async with asyncio.timeout(HANG):
                    await make()
                failures.append(f"{name} succeeded on a frozen server")
            except sr.StorageError as exc:
                elapsed = loop.time() - started
                observed.append(f"{name} failed in {elapsed:.2f}s: {type(exc).__name__}: {exc}")
                if elapsed >= bound:
                    failures.append(f"{name} took {elapsed:.1f}s to fail")
                if "timed out" not in str(exc):
                    failures.append(f"{name} failed with {exc!r}, not a timeout")
            except TimeoutError:
                failures.append(f"{name} hung for {HANG}s")
        started = loop.time()
        async with asyncio.timeout(HANG):
            report = await repo.health()
        elapsed = loop.time() - started
        observed.append(f"health {report.healthy} in {elapsed:.2f}s: {report.error}")
        if report.healthy or report.reachable or elapsed >= HEALTH_TIMEOUT + TIMEOUT_SLACK:
            failures.append(f"health() answered {report} after {elapsed:.1f}s")
        started = loop.time()
        async with asyncio.timeout(HANG):
            await other.close()
        elapsed = loop.time() - started
        observed.append(f"close() of an idle repository took {elapsed:.2f}s")
        if elapsed >= CLOSE_BOUND:
            failures.append(f"close() took {elapsed:.1f}s on a frozen server")
    finally:
        await asyncio.to_thread(server.thaw)
    try:
        for n in range(20):
            async with asyncio.timeout(HANG):
                await repo.upsert_latest(snap("f0", f"thawed{n}"))
        async with asyncio.timeout(HANG):
            assert await repo.health_check() is True
            assert await cold.get_latest("f0") is not None
    finally:
        for r in (repo, other, cold):
            await asyncio.wait_for(r.close(), HANG)
    print("\n" + "\n".join(observed))
    assert not failures, failures
    rows = await read_tables(server_url)
    assert_consistent(rows)
    assert payload_items(rows["f0"].history[-1]) == ["thawed19"]


async def test_a_new_connection_to_a_frozen_server_is_bounded_by_connect_timeout(
    server: MariadbServer, server_url: str
) -> None:
    """asyncmy bounds only the TCP connect; a frozen server accepts TCP and never greets.
    The library bounds the whole connect by `connect_timeout`, which is what bounds
    `migrate()` (it has no operation timeout): it took until `operation_timeout` (or
    forever for `migrate`) before."""
    settings = sr.EngineSettings(connect_timeout=1.0)
    repo = sr.SnapshotRepository.from_url(server_url, Cart, settings=settings)
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(server.freeze)
    try:
        started = loop.time()
        with pytest.raises(sr.StorageError, match=r"timed out after 1 s \(connect_timeout\)"):
            async with asyncio.timeout(HANG):
                await repo.migrate()
        elapsed = loop.time() - started
        assert elapsed < 1.0 + TIMEOUT_SLACK, f"migrate() failed after {elapsed:.2f} s"
    finally:
        await asyncio.to_thread(server.thaw)
        await repo.close()


async def test_a_state_over_the_servers_max_allowed_packet_is_refused_before_it_is_sent() -> None:
    """A server with a 1 MiB `max_allowed_packet` and a repository accepting 4 MiB states:
    a 2 MB state is refused with a StorageError that names the setting, nothing is
    written, and the connection stays usable (the server dropped it before: "server has
    gone away", read as a lost connection that a retry would hit again). Batches over the
    limit in all are stored, in statements under it, however wide their characters."""
    with running_server(["--max-allowed-packet=1M"]) as small_packets:
        url = small_packets.create_database(f"packets_{uuid.uuid4().hex[:8]}")
        await migrate_database(url)
        options: dict[str, int] = {"max_payload_bytes": 4 * 1024 * 1024}
        async with sr.SnapshotRepository.from_url(url, Cart, **options) as repo:  # type: ignore[arg-type]
            await repo.upsert_latest(snap("fits", "x" * 900_000))
            with pytest.raises(sr.StorageError, match="max_allowed_packet") as refused:
                await repo.upsert_latest(snap("big", "x" * 2_000_000))
            assert not isinstance(refused.value, sr.ConnectionLostError)
            with pytest.raises(sr.StorageError, match="max_allowed_packet"):
                await repo.upsert_many([snap("small", "y"), snap("big", "x" * 2_000_000)])
            assert await repo.get_latest("big") is None
            assert await repo.get_latest("small") is None  # the batch wrote nothing
            fits = await repo.get_latest("fits")
            assert fits is not None
            assert fits.state.items == ["x" * 900_000]
            # A batch of small states adding up to 3 MB: its upsert statements are cut
            # to half the server's limit, not to the 4 MiB a default server takes.
            batch = [snap(f"many-{n}", "z" * 30_000) for n in range(100)]
            assert {stored.version for stored in await repo.upsert_many(batch)} == {1}
            # Sizes are counted in bytes as sent: a reason of 4,096 four-byte characters
            # is 16 KB on every row (counted as 4 KB, 120 rows would go in 2 MB).
            wide = [snap(f"wide-{n}", "w") for n in range(200)]
            stored = await repo.upsert_many(wide, reason="\U0001f600" * 4096)
            assert {(row.version, len(row.reason or "")) for row in stored} == {(1, 4096)}
            assert await repo.count_users() == 301


async def test_a_lock_wait_timeout_is_retried_inside_the_library(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """InnoDB gives up waiting for a row lock after `innodb_lock_wait_timeout` (1 s on this
    server) with error 1205 and rolls back the statement: the library rolls back the rest
    and runs the write again, which then finds the row free. The row is held for 1.5 s by
    another transaction: the fault itself, not a wait for the library."""
    caplog.set_level(logging.INFO, logger="snapshot_repo")
    with running_server(["--innodb-lock-wait-timeout=1"]) as server:
        url = server.create_database(f"locks_{uuid.uuid4().hex[:8]}")
        await migrate_database(url)
        async with sr.SnapshotRepository.from_url(url, Cart) as repo:
            await repo.upsert_latest(snap("held", "v1"))
            holder = await mariadb_connect(url, autocommit=False)
            try:
                async with holder.cursor() as cursor:
                    await cursor.execute(
                        "SELECT version FROM snapshot_latest WHERE user_id = 'held' FOR UPDATE"
                    )
                write = asyncio.create_task(repo.upsert_latest(snap("held", "v2")))
                await asyncio.sleep(1.5)  # the library's first attempt times out at 1 s
                await holder.rollback()
                stored = await write
            finally:
                holder.close()
        assert stored.version == 2
    retried = [r.getMessage() for r in caplog.records if "rolled back" in r.getMessage()]
    assert len(retried) == 1, retried
    assert "1205" in retried[0]
