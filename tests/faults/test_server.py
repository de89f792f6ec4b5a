"""The Postgres server itself fails: stopped, crashed or frozen under load.

These run on the throwaway cluster (`tests/support/pg_cluster.py`), never on
the shared server. Each test brings its cluster back up before it ends; the
`cluster` fixture restarts it anyway if the test failed half-way.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

import snapshot_repo as sr
from tests.support.databases import Cart

from ..support.consistency import assert_consistent, payload_items, read_tables
from ..support.pg_cluster import PgCluster
from ..support.pool import queue_pool

pytestmark = pytest.mark.fault

WRITERS = 8
USERS = [f"r{n}" for n in range(4)]
# One connect_timeout plus one command_timeout (1 s each in `fault_settings`) plus slack.
FAIL_FAST = 2.5
HEALTH_TIMEOUT = 1.0
CLOSE_BOUND = 6.0  # "a few seconds"
# A call still running after this long has hung, whatever the library's own limits.
HANG = 30.0


def snap(user_id: str, *items: str) -> sr.Snapshot[Cart]:
    return sr.Snapshot(user_id=user_id, state=Cart(items=list(items)))


@dataclass
class Call:
    """One write made by a writer task during the test."""

    writer: int
    phase_at_start: str
    phase_at_end: str
    elapsed: float
    user: str
    items: list[str]
    version: int | None = None
    error: BaseException | None = None


class Load:
    """`WRITERS` tasks writing `USERS` in a loop until stopped; every call is recorded.

    The test moves `phase` along ("before", "stopping", "outage", "restarting",
    "after"); each call records the phase when it started and when it ended.
    """

    def __init__(self, repo: sr.SnapshotRepository[Cart]) -> None:
        self.repo = repo
        self.phase = "before"
        self.calls: list[Call] = []
        self._stop = asyncio.Event()
        self._progress = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._writer(n)) for n in range(WRITERS)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def count(self, phase: str, *, ok: bool) -> int:
        return sum(1 for c in self.calls if c.phase_at_start == phase and (c.error is None) == ok)

    async def wait_for(self, phase: str, *, ok: bool, count: int, within: float = 20.0) -> None:
        """Wait until `count` calls that started in `phase` succeeded (or failed)."""
        async with asyncio.timeout(within):
            while self.count(phase, ok=ok) < count:
                self._progress.clear()
                await self._progress.wait()

    async def _writer(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        i = 0
        while not self._stop.is_set():
            user = USERS[(n + i) % len(USERS)]
            call = Call(n, self.phase, "", 0.0, user, [f"{n}-{i}"])
            started = loop.time()
            try:
                async with asyncio.timeout(HANG):
                    stored = await self.repo.upsert_latest(snap(user, *call.items))
                call.version = stored.version
            except Exception as exc:
                # Recorded, not raised: the test reports every kind of failure at the end
                # (anything but StorageError, including the HANG guard, fails it).
                call.error = exc
            call.elapsed = loop.time() - started
            call.phase_at_end = self.phase
            self.calls.append(call)
            self._progress.set()
            i += 1
            if call.error is not None:
                # A client backs off after a failure; without this the writers spin
                # on "connection refused" and starve the restarting server of CPU.
                await asyncio.sleep(0.02)


def describe_calls(calls: list[Call]) -> str:
    kinds = Counter(
        f"{c.phase_at_start}->{c.phase_at_end}: "
        + ("ok" if c.error is None else f"{type(c.error).__name__}: {c.error}"[:140])
        for c in calls
    )
    return "\n".join(f"  {n:5d} x {kind}" for kind, n in sorted(kinds.items()))


async def check_acknowledged(url: str, calls: list[Call]) -> None:
    """Every acknowledged write is stored under its version; the tables are consistent."""
    rows = await read_tables(url)
    assert_consistent(rows)
    for call in calls:
        if call.version is not None:
            stored = rows[call.user].history[call.version - 1]
            assert payload_items(stored) == call.items, (call.user, call.version)


def restart_problems(calls: list[Call], pooled: int) -> list[str]:
    """What a restart under load must not show, gathered so that one run reports them all:
    a call failing with anything but `StorageError`, a write succeeding with the server
    down, a call slow to fail during the outage, more failures after the restart than
    pooled connections, or one writer failing twice."""
    problems: list[str] = []  # gathered, so that one run reports every kind of problem
    unexpected = [
        f"{c.phase_at_start}->{c.phase_at_end} after {c.elapsed:.2f}s: "
        f"{type(c.error).__module__}.{type(c.error).__qualname__}: {c.error}"
        for c in calls
        if c.error is not None and not isinstance(c.error, sr.StorageError)
    ]
    if unexpected:
        problems.append(f"{len(unexpected)} calls failed without StorageError: {unexpected[:3]}")
    outage = [c for c in calls if c.phase_at_start == "outage" and c.phase_at_end == "outage"]
    if not outage:
        problems.append("no call ran during the outage")
    if any(c.error is None for c in outage):
        problems.append("a write succeeded with the server down")
    slow = sorted(c.elapsed for c in outage if c.elapsed >= FAIL_FAST)
    if slow:
        problems.append(f"{len(slow)} calls during the outage took up to {slow[-1]:.1f}s to fail")
    after = [c for c in calls if c.phase_at_start == "after"]
    failed_after = [c for c in after if c.error is not None]
    print(f"after the restart: {len(failed_after)} failed of the first {len(after)} calls")
    if len(failed_after) > pooled:
        problems.append(f"{len(failed_after)} failures after the restart > {pooled} connections")
    per_writer = Counter(c.writer for c in failed_after)
    if max(per_writer.values(), default=0) > 1:
        problems.append(f"a writer failed more than once after the restart: {per_writer}")
    return problems


@pytest.mark.parametrize("how", ["pg_ctl_stop_fast", "sigkill_all"])
async def test_server_restart_under_load(
    cluster: PgCluster, cluster_url: str, fault_settings: sr.EngineSettings, how: str
):
    """Writers keep writing while the server goes down and comes back.

    During the outage every call fails fast with StorageError; after the
    restart the same repository writes again, with at most one failed call
    per connection that was pooled when the server went down.
    """
    repo = sr.SnapshotRepository.from_url(cluster_url, Cart, settings=fault_settings)
    load = Load(repo)
    try:
        load.start()
        await load.wait_for("before", ok=True, count=100)
        pool = queue_pool(repo.engine)
        pooled = pool.checkedin() + pool.checkedout()

        load.phase = "stopping"
        if how == "sigkill_all":
            await asyncio.to_thread(cluster.kill)
        else:
            await asyncio.to_thread(cluster.stop, "fast")
        load.phase = "outage"  # the server has exited: nothing can succeed now
        await load.wait_for("outage", ok=False, count=3 * WRITERS, within=10)

        load.phase = "restarting"
        await asyncio.to_thread(cluster.start)
        load.phase = "after"
        await load.wait_for("after", ok=True, count=200)
    finally:
        await load.stop()
        await asyncio.wait_for(repo.close(), HANG)

    calls = load.calls
    print(f"\n{how}: {pooled} pooled connections at the stop; calls by phase:")
    print(describe_calls(calls))
    problems = restart_problems(calls, pooled)
    try:
        await check_acknowledged(cluster_url, calls)
    except AssertionError as exc:
        problems.append(f"stored rows: {exc}")
    assert not problems, problems


@pytest.mark.parametrize("first", ["write", "read"])
async def test_idle_pool_after_a_restart_fails_at_most_one_call(
    cluster: PgCluster, cluster_url: str, fault_settings: sr.EngineSettings, first: str
):
    """A restart while every pooled connection is idle: sequential calls afterwards
    meet the dead connections one at a time; at most one call fails, then 200 succeed."""
    async with sr.SnapshotRepository.from_url(cluster_url, Cart, settings=fault_settings) as repo:
        await asyncio.gather(*(repo.upsert_latest(snap(f"idle{n}", "w")) for n in range(6)))
        pooled = queue_pool(repo.engine).checkedin()
        await asyncio.to_thread(cluster.restart, "fast")
        outcomes: list[str] = []
        successes = 0
        for n in range(201):
            user = f"idle{n % 6}"
            write = (n % 2 == 0) == (first == "write")
            call = repo.upsert_latest(snap(user, str(n))) if write else repo.get_latest(user)
            try:
                async with asyncio.timeout(HANG):
                    await call
            except sr.StorageError as exc:
                outcomes.append(f"call {n} ({'write' if write else 'read'}): {exc}")
                continue
            successes += 1
            if successes == 200:
                break
        print(
            f"\n{pooled} idle pooled connections, first call a {first}; "
            f"after the restart: {outcomes}, then {successes} ok"
        )
        assert successes == 200
        assert len(outcomes) <= 1, outcomes
    assert_consistent(await read_tables(cluster_url))


async def test_frozen_server_fails_fast_and_close_is_bounded(
    cluster: PgCluster, cluster_url: str, fault_settings: sr.EngineSettings
):
    """SIGSTOP every server process: calls fail within ~2 s with StorageError, health is
    False within its timeout, `close()` of a second repository returns within a few
    seconds; after SIGCONT the first repository works again."""
    repo = sr.SnapshotRepository.from_url(
        cluster_url, Cart, settings=fault_settings, health_timeout=HEALTH_TIMEOUT
    )
    other = sr.SnapshotRepository.from_url(cluster_url, Cart, settings=fault_settings)
    observed: list[str] = []
    failures: list[str] = []
    loop = asyncio.get_running_loop()
    try:
        for r in (repo, other):
            await asyncio.gather(*(r.upsert_latest(snap(f"f{n}", "w")) for n in range(4)))
        await asyncio.to_thread(cluster.pause)
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "upsert_latest": lambda: repo.upsert_latest(snap("f0", "frozen")),
            "get_latest": lambda: repo.get_latest("f0"),
        }
        for name, make in calls.items():
            started = loop.time()
            try:
                async with asyncio.timeout(HANG):
                    await make()
                failures.append(f"{name} succeeded on a frozen server")
            except sr.StorageError as exc:
                elapsed = loop.time() - started
                observed.append(f"{name} failed in {elapsed:.2f}s: {exc}")
                if elapsed >= FAIL_FAST:
                    failures.append(f"{name} took {elapsed:.1f}s to fail")
            except TimeoutError:
                failures.append(f"{name} hung for {HANG}s")
        started = loop.time()
        async with asyncio.timeout(HANG):
            healthy = await repo.health_check()
        elapsed = loop.time() - started
        observed.append(f"health_check {healthy} in {elapsed:.2f}s")
        if healthy or elapsed >= HEALTH_TIMEOUT + 0.5:
            failures.append(f"health_check answered {healthy} after {elapsed:.1f}s")
        started = loop.time()
        async with asyncio.timeout(HANG):
            await other.close()
        elapsed = loop.time() - started
        observed.append(f"close() of an idle repository took {elapsed:.2f}s")
        if elapsed >= CLOSE_BOUND:
            failures.append(f"close() took {elapsed:.1f}s on a frozen server")
    finally:
        await asyncio.to_thread(cluster.resume)
    try:
        for n in range(20):
            async with asyncio.timeout(HANG):
                await repo.upsert_latest(snap("f0", f"thawed{n}"))
        async with asyncio.timeout(HANG):
            assert await repo.health_check() is True
    finally:
        await asyncio.wait_for(repo.close(), HANG)
        await asyncio.wait_for(other.close(), HANG)
    print("\n" + "\n".join(observed))
    assert not failures, failures
    assert_consistent(await read_tables(cluster_url))
