"""Read replicas against a real streaming standby (`from_url(replicas=...)`).

One throwaway primary and one standby made from it with `pg_basebackup -R`
serve the whole module (see `tests/support/pg_cluster.py`). Which server
answered a read is proven by what it returns: with WAL replay paused on the
standby (`pg_wal_replay_pause()`), a write made on the primary by another
repository is on the primary only, so a read returning the older version
came from the replica and one returning the newer version from the primary.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import pytest

import snapshot_repo as sr
from snapshot_repo.backends.replicas import ReplicaRouter, primary_reads
from tests.support.databases import Cart, migrate_database, run_blocking

from .support.pg_cluster import PgCluster, create_or_skip

_T = TypeVar("_T")

_WAIT = 15.0
"""Seconds a condition may take to come true (replay, a check noticing) before a test fails."""

_MAX_LAG = 3.0
"""The lag bound of the tests that read stale rows on purpose: far more than they take."""


@dataclass
class Servers:
    primary: PgCluster
    standby: PgCluster
    database: str

    @property
    def primary_url(self) -> str:
        return self.primary.url(self.database)

    @property
    def standby_url(self) -> str:
        return self.standby.url(self.database)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    """A migrated database on a throwaway primary, and a streaming standby of it."""
    primary = create_or_skip("replica tests")
    standby: PgCluster | None = None
    try:
        primary.start()
        database = "replicas"
        run_blocking(_create_database(primary, database))
        run_blocking(migrate_database(primary.url(database)))
        standby = PgCluster.create_standby(primary)
        standby.start()
        yield Servers(primary, standby, database)
    finally:
        if standby is not None:
            standby.destroy()
        primary.destroy()


async def _create_database(cluster: PgCluster, name: str) -> None:
    conn = await asyncpg.connect(cluster.dsn(), timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@pytest.fixture
async def pair(servers: Servers) -> AsyncIterator[Servers]:
    """The servers with the standby running, replaying, and caught up (also afterwards)."""
    await _reset(servers)
    yield servers
    await _reset(servers)


async def _reset(servers: Servers) -> None:
    if servers.standby.paused:
        servers.standby.resume()
    if not servers.standby.running:
        servers.standby.start()
    await _standby_sql(servers, "SELECT pg_wal_replay_resume()")
    await _caught_up(servers)


async def _standby_sql(servers: Servers, statement: str) -> None:
    conn = await asyncpg.connect(servers.standby.dsn(), timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _caught_up(servers: Servers) -> None:
    """Wait until the standby has replayed everything the primary has written."""
    primary = await asyncpg.connect(servers.primary.dsn(), timeout=10)
    standby = await asyncpg.connect(servers.standby.dsn(), timeout=10)
    try:
        target = await primary.fetchval("SELECT pg_current_wal_lsn()")
        await _eventually(
            "the standby replays the primary's WAL",
            lambda: standby.fetchval("SELECT pg_last_wal_replay_lsn() >= $1", target),
        )
    finally:
        await primary.close()
        await standby.close()


async def _eventually(what: str, condition: Callable[[], object]) -> None:
    """Poll `condition` (returning a value or an awaitable) until true, at most `_WAIT` s."""
    deadline = time.monotonic() + _WAIT
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not within {_WAIT} s: {what}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def _replay_paused(servers: Servers) -> AsyncIterator[None]:
    """WAL replay paused on the standby: what the primary writes meanwhile is not there."""
    await _standby_sql(servers, "SELECT pg_wal_replay_pause()")
    try:
        yield
    finally:
        await _standby_sql(servers, "SELECT pg_wal_replay_resume()")


@asynccontextmanager
async def _repositories(
    servers: Servers, max_lag: float = _MAX_LAG, health_timeout: float = 3.0
) -> AsyncIterator[tuple[sr.SnapshotRepository[Cart], sr.SnapshotRepository[Cart], ReplicaRouter]]:
    """(reader with the standby as replica, a plain writer on the primary, the reader's router)."""
    reader = sr.SnapshotRepository.from_url(
        servers.primary_url,
        Cart,
        replicas=[servers.standby_url],
        max_replica_lag=max_lag,
        health_timeout=health_timeout,
    )
    writer = sr.SnapshotRepository.from_url(servers.primary_url, Cart)
    try:
        router = reader._backend
        assert isinstance(router, ReplicaRouter)
        yield reader, writer, router
    finally:
        await reader.close()
        await writer.close()


def _user() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


async def _put(repo: sr.SnapshotRepository[Cart], user_id: str, note: str) -> int:
    stored = await repo.upsert_latest(sr.Snapshot(user_id=user_id, state=Cart(note=note)))
    return stored.version


async def _replica_in_use(servers: Servers, router: ReplicaRouter, user_id: str) -> None:
    """Wait until the router sends reads of `user_id` to the standby."""
    await _eventually(
        "reads go to the replica", lambda: router.route(user_id) == _standby_name(servers)
    )


def _standby_name(servers: Servers) -> str:
    return f"postgresql+asyncpg://postgres@127.0.0.1:{servers.standby.port}/{servers.database}"


class _Fallbacks(logging.Handler):
    """Counts the router's "a read on replica ... failed, reading from the primary" records."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "failed, reading from the primary" in record.getMessage():
            self.count += 1


async def _read_recording_the_route(
    router: ReplicaRouter, read: Callable[[], Awaitable[_T]]
) -> tuple[_T, bool, bool]:
    """`read()`, whether the router chose a replica for it, and whether that replica failed
    (the read then answered by the primary, as designed)."""
    chosen: list[object] = []
    choose = router._replica_for

    def recording(since: float) -> Any:
        replica = choose(since)
        chosen.append(replica)
        return replica

    logger = logging.getLogger("snapshot_repo")
    fallbacks, level = _Fallbacks(), logger.level
    logger.addHandler(fallbacks)
    logger.setLevel(logging.INFO)
    router._replica_for = recording  # type: ignore[method-assign]
    try:
        result = await read()
    finally:
        del router._replica_for
        logger.removeHandler(fallbacks)
        logger.setLevel(level)
    return result, len(chosen) == 1 and chosen[0] is not None, fallbacks.count > 0


async def _proves_replica_serves(
    servers: Servers,
    reader: sr.SnapshotRepository[Cart],
    writer: sr.SnapshotRepository[Cart],
    user_id: str,
) -> None:
    """With replay paused, a write on the primary is not seen by `reader`: the replica answered.

    The router may rightly send the read to the primary instead: when its last
    measurement of the replica is older than `max_lag` (on a busy machine the
    measurements fall behind), or when the replica's answer fails or outlasts
    `max_lag` (a standby just thawed). Such an attempt proves nothing and is made
    again, at most three times; a read the router sent to the replica must be
    the replica's answer, at once.
    """
    router = reader._backend
    assert isinstance(router, ReplicaRouter)
    for _attempt in range(3):
        before = await writer.get_latest(user_id)
        assert before is not None
        async with _replay_paused(servers):
            newer = await _put(writer, user_id, "only on the primary")
            seen, on_replica, failed = await _read_recording_the_route(
                router, lambda: reader.get_latest(user_id)
            )
            assert seen is not None
            with primary_reads():  # the escape hatch reads the primary
                fresh = await reader.get_latest(user_id)
            assert fresh is not None
            assert fresh.version == newer
        if on_replica and not failed:
            assert (seen.version, seen.state.note) == (before.version, before.state.note)
            return
        assert seen.version == newer  # the primary answered, fresh
        await _caught_up(servers)
        await _replica_in_use(servers, router, user_id)
    pytest.fail("the router sent every proof read to the primary: the replica never served")


async def test_reads_are_served_by_the_replica(pair: Servers) -> None:
    async with _repositories(pair) as (reader, writer, router):
        alice = _user()
        for note in ("first", "second"):
            await _put(writer, alice, note)
        await _caught_up(pair)
        await _replica_in_use(pair, router, alice)
        async with _replay_paused(pair):
            await _put(writer, alice, "third, on the primary only")
            # Every kind of read a replica serves returns the replica's state.
            latest = await reader.get_latest(alice)
            assert latest is not None
            assert latest.version == 2
            assert [s.version for s in await reader.get_history(alice)] == [2, 1]
            assert [s.version for s in await reader.get_history(alice, before_version=2)] == [1]
            assert await reader.get_version(alice, 3) is None
            assert (await reader.get_latest_many([alice]))[alice].version == 2
            assert await reader.diff(alice, 1, 2)
            # Reads that decide a write, and compare-and-set, see the primary.
            merged = await reader.merge(alice, {"note": "merged"})
            assert merged.version == 4
        report = await reader.health()
        assert report.healthy
        (replica,) = report.replicas
        assert replica.url == _standby_name(pair)
        assert replica.reachable
        assert replica.in_use
        assert replica.error is None
        assert replica.lag_seconds is not None
        assert replica.lag_seconds < _MAX_LAG


async def test_read_your_writes_while_replay_is_paused(pair: Servers) -> None:
    async with _repositories(pair) as (reader, writer, router):
        bob, carol, dave = _user(), _user(), _user()
        await _put(writer, bob, "bob's first")
        await _put(writer, carol, "carol's first")
        await _caught_up(pair)
        await _replica_in_use(pair, router, bob)
        users_before = await reader.count_users()
        async with _replay_paused(pair):
            written = await _put(reader, bob, "bob's second")
            # This repository's own write is read back at once, from the primary...
            latest = await reader.get_latest(bob)
            assert latest is not None
            assert (latest.version, latest.state.note) == (written, "bob's second")
            assert [s.version for s in await reader.get_history(bob)] == [2, 1]
            assert (await reader.get_latest_many([bob, carol]))[bob].version == 2
            assert router.route(bob) is None
            # ...while another user's reads stay on the replica, which has not
            # replayed carol's new version written by another repository.
            await _put(writer, carol, "carol's second")
            assert router.route(carol) == _standby_name(pair)
            seen = await reader.get_latest(carol)
            assert seen is not None
            assert seen.version == 1
            # Reads of no one user wait for this repository's newest write of anyone.
            await _put(reader, dave, "dave's first")
            assert await reader.count_users() == users_before + 1
            assert dave in await reader.list_users(limit=10_000)
        # Once the standby replays bob's write, bob's reads go back to it.
        await _replica_in_use(pair, router, bob)
        await _proves_replica_serves(pair, reader, writer, bob)


async def test_restore_reads_the_version_it_copies_from_the_primary(pair: Servers) -> None:
    """Another process erases a user; within the replica's lag this repository restores
    version 1, which the replica still holds. Read there, the erased state would be
    written back: `restore` reads its version from the primary, where it is gone."""
    async with _repositories(pair) as (reader, writer, router):
        alice = _user()
        await _put(writer, alice, "alice's data")
        await _caught_up(pair)
        await _replica_in_use(pair, router, alice)
        async with _replay_paused(pair):
            assert await writer.delete(alice) == 1
            assert await reader.get_version(alice, 1) is not None  # the replica still has it
            with pytest.raises(sr.SnapshotValidationError, match="does not exist"):
                await reader.restore(alice, 1)
        assert await writer.get_latest(alice) is None


async def test_a_stopped_replica_is_skipped_and_used_again_when_back(pair: Servers) -> None:
    async with _repositories(pair) as (reader, writer, router):
        erin = _user()
        await _put(writer, erin, "erin's first")
        await _caught_up(pair)
        await _replica_in_use(pair, router, erin)
        await reader.get_latest(erin)  # the replica's pool now holds a connection
        pair.standby.stop("fast")
        await _put(writer, erin, "erin's second")
        # The read that finds the replica gone runs again on the primary.
        for _ in range(3):
            latest = await reader.get_latest(erin)
            assert latest is not None
            assert latest.version == 2
        assert [s.version for s in await reader.get_history(erin)] == [2, 1]
        report = await reader.health()
        assert report.healthy  # the primary serves every call
        (replica,) = report.replicas
        assert not replica.reachable
        assert not replica.in_use
        assert replica.lag_seconds is None
        assert replica.error
        assert router.route(erin) is None
        pair.standby.start()
        await _caught_up(pair)
        await _replica_in_use(pair, router, erin)
        await _proves_replica_serves(pair, reader, writer, erin)
        (replica,) = (await reader.health()).replicas
        assert replica.reachable
        assert replica.in_use


async def test_a_lagging_replica_is_skipped_until_it_catches_up(pair: Servers) -> None:
    bound = 1.0
    async with _repositories(pair, max_lag=bound) as (reader, writer, router):
        frank = _user()
        await _put(writer, frank, "frank's first")
        await _caught_up(pair)
        await _replica_in_use(pair, router, frank)
        async with _replay_paused(pair):
            paused_at = time.monotonic()
            await _put(writer, frank, "frank's second")  # the primary moves on
            await _eventually("the replica is skipped", lambda: router.route(frank) is None)
            # Not before it lagged the bound: measured from the newest WAL position it
            # replayed, sampled at most one check interval before the pause.
            assert time.monotonic() - paused_at >= bound - router.check_interval
            latest = await reader.get_latest(frank)
            assert latest is not None
            assert latest.version == 2
            (replica,) = (await reader.health()).replicas
            assert replica.reachable
            assert not replica.in_use
            assert replica.lag_seconds is not None
            assert replica.lag_seconds > bound
        await _replica_in_use(pair, router, frank)
        (replica,) = (await reader.health()).replicas
        assert replica.in_use
        assert replica.lag_seconds is not None
        assert replica.lag_seconds < bound


async def test_a_frozen_replica_delays_a_read_by_at_most_the_lag_bound(pair: Servers) -> None:
    bound = 1.0
    async with _repositories(pair, max_lag=bound, health_timeout=bound) as (
        reader,
        writer,
        router,
    ):
        gina = _user()
        await _put(writer, gina, "gina's first")
        await _caught_up(pair)
        await _replica_in_use(pair, router, gina)
        pair.standby.pause()  # SIGSTOP: connections stay open, nothing answers
        await _put(writer, gina, "gina's second")
        started = time.monotonic()
        latest = await reader.get_latest(gina)
        # At most the bound waiting for the replica, then the primary answers.
        assert time.monotonic() - started < bound + 1.0
        assert latest is not None
        assert latest.version == 2
        (replica,) = (await reader.health()).replicas
        assert not replica.reachable
        assert not replica.in_use
        assert replica.error == f"no answer within {bound:g} s"
        assert router.route(gina) is None
        pair.standby.resume()
        await _replica_in_use(pair, router, gina)
        await _proves_replica_serves(pair, reader, writer, gina)


async def test_replicas_must_be_postgres() -> None:
    with pytest.raises(sr.ConfigurationError, match="Postgres primary"):
        sr.SnapshotRepository.from_url(
            "sqlite+aiosqlite:///unused.db", replicas=["postgresql://u@127.0.0.1:1/db"]
        )
    with pytest.raises(sr.ConfigurationError, match="streaming standbys"):
        sr.SnapshotRepository.from_url(
            "postgresql://u@127.0.0.1:1/db", replicas=["mariadb://root@127.0.0.1:1/db"]
        )
    with pytest.raises(sr.ConfigurationError, match="sequence of database URLs"):
        sr.SnapshotRepository.from_url(
            "postgresql://u@127.0.0.1:1/db", replicas="postgresql://u@127.0.0.1:2/db"
        )
    with pytest.raises(sr.ConfigurationError, match="max_replica_lag"):
        sr.SnapshotRepository.from_url(
            "postgresql://u@127.0.0.1:1/db",
            replicas=["postgresql://u@127.0.0.1:2/db"],
            max_replica_lag=0,
        )
    plain = sr.SnapshotRepository.from_url("postgresql://u@127.0.0.1:1/db")
    try:  # without replicas nothing routes: no cost on the plain path
        assert not isinstance(plain._backend, ReplicaRouter)
    finally:
        await plain.close()
