"""`SyncSnapshotRepository`: the blocking API, shared by many threads, on SQLite and Postgres."""

from __future__ import annotations

import contextvars
import inspect
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import snapshot_repo as sr
from snapshot_repo.sync import SyncChangeStream, SyncSnapshotRepository, SyncSubscription
from tests.support.databases import Cart, sqlite_backend

THREADS = 16
WAIT = 10.0
"""Seconds any wait for another thread may take before the test fails."""


@pytest.fixture
def url(sqlite_or_postgres_url: str) -> str:
    return sqlite_or_postgres_url


@pytest.fixture
def repo(url: str) -> Iterator[SyncSnapshotRepository[Cart]]:
    with SyncSnapshotRepository.from_url(url, Cart) as repository:
        yield repository


def snap(user_id: str, *items: str) -> sr.Snapshot[Cart]:
    return sr.Snapshot(user_id=user_id, state=Cart(items=list(items)))


def portal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "snapshot-repo-sync"]


def run_in_threads(count: int, work: Any) -> list[Any]:
    """`work(i)` for i in range(count), each in its own thread, all released at once."""
    barrier = threading.Barrier(count, timeout=WAIT)

    def start(i: int) -> Any:
        barrier.wait()
        return work(i)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(start, range(count), timeout=WAIT * 3))


# --- many threads ------------------------------------------------------------------------


def test_threads_writing_one_user_get_gapless_versions_and_every_write_reads_back(
    repo: SyncSnapshotRepository[Cart],
):
    writes = 5

    def write(thread: int) -> list[tuple[int, str]]:
        stored = []
        for i in range(writes):
            snapshot = repo.upsert_latest(snap("shared", f"t{thread}-w{i}"))
            stored.append((snapshot.version, snapshot.state.items[0]))
        return stored

    stored = [pair for pairs in run_in_threads(THREADS, write) for pair in pairs]
    versions = sorted(version for version, _ in stored)
    assert versions == list(range(1, THREADS * writes + 1))  # no gap, no version twice
    history = {s.version: s.state.items[0] for s in repo.get_history("shared", limit=1000)}
    assert history == dict(stored)  # each write is readable under the version it was given
    latest = repo.get_latest("shared")
    assert latest is not None
    assert latest.version == THREADS * writes


def test_threads_on_different_users_run_side_by_side(repo: SyncSnapshotRepository[Cart]):
    writes = 5

    def work(thread: int) -> tuple[int, list[int]]:
        user = f"user-{thread}"
        for i in range(writes):
            repo.upsert_latest(snap(user, str(i)))
        latest = repo.get_latest(user)
        assert latest is not None
        return latest.version, [s.version for s in repo.get_history(user, limit=10)]

    results = run_in_threads(THREADS, work)
    assert results == [(writes, list(range(writes, 0, -1)))] * THREADS
    everyone = repo.get_latest_many([f"user-{i}" for i in range(THREADS)])
    assert {user: s.state.items for user, s in everyone.items()} == {
        f"user-{i}": [str(writes - 1)] for i in range(THREADS)
    }
    assert repo.count_users() == THREADS


def test_compare_and_set_conflicts_raise_through_the_sync_api(
    repo: SyncSnapshotRepository[Cart],
):
    repo.upsert_latest(snap("u", "a"), expected_version=0)
    with pytest.raises(sr.VersionConflictError) as conflict:
        repo.upsert_latest(snap("u", "lost"), expected_version=0)
    assert (conflict.value.expected_version, conflict.value.actual_version) == (0, 1)

    def race(thread: int) -> bool:
        try:
            repo.upsert_latest(snap("u", f"racer-{thread}"), expected_version=1)
        except sr.VersionConflictError:
            return False
        return True

    assert sum(run_in_threads(8, race)) == 1  # exactly one racer wins
    assert [s.version for s in repo.get_history("u")] == [2, 1]


def test_errors_are_the_async_repositorys(repo: SyncSnapshotRepository[Cart]):
    with pytest.raises(sr.SnapshotValidationError):
        repo.get_latest("bad\x00id")
    with pytest.raises(sr.SnapshotValidationError):
        repo.get_history("u", limit=0)
    with pytest.raises(sr.SnapshotValidationError):
        list(repo.iter_history("u", page_size=0))


# --- iterators ---------------------------------------------------------------------------


def test_iterators_page_through_history_and_exports(repo: SyncSnapshotRepository[Cart]):
    for i in range(7):
        repo.upsert_latest(snap("u", str(i)))
    history = repo.iter_history("u", page_size=3)
    assert isinstance(history, Iterator)
    assert [s.version for s in history] == [7, 6, 5, 4, 3, 2, 1]

    early = repo.iter_history("u", page_size=2)
    assert next(early).version == 7
    early.close()  # leaving early releases the async generator on the loop
    with pytest.raises(StopIteration):
        next(early)

    lines = list(repo.export_user_lines("u"))
    assert len(lines) == 1 + 7
    assert lines[0].startswith('{"format":"snapshot_repo.subject_export"')
    assert repo.export_user("u")["user_id"] == "u"


# --- listeners ---------------------------------------------------------------------------


def test_subscribers_hear_changes_in_order_on_a_worker_thread(
    repo: SyncSnapshotRepository[Cart],
):
    heard: list[tuple[int, str]] = []
    done = threading.Event()
    calling_thread = threading.get_ident()
    threads: set[int] = set()

    def listener(change: sr.Change) -> None:
        threads.add(threading.get_ident())
        # A callback may block and call the repository: it is not on the loop's thread.
        assert repo.count_users() in (0, 1)
        heard.append((change.version, change.kind))
        if change.kind == "erase":
            done.set()

    subscription = repo.subscribe(listener)
    assert isinstance(subscription, SyncSubscription)
    for i in range(5):
        repo.upsert_latest(snap("u", str(i)))
    repo.delete("u")
    assert done.wait(WAIT)
    assert heard == [*((version, "write") for version in range(1, 6)), (5, "erase")]
    assert calling_thread not in threads
    assert portal_threads()[0].ident not in threads

    subscription.close()
    subscription.close()  # idempotent
    repo.upsert_latest(snap("u", "after close"))
    # The write above went through the loop after the close did; one more round trip
    # lets any (wrong) delivery run before the check.
    repo.count_users()
    assert len(heard) == 6


def test_coroutine_listeners_run_on_the_loop_and_no_listener_can_close_the_repository(
    repo: SyncSnapshotRepository[Cart],
):
    loop_threads: list[int] = []
    refusals: list[str] = []
    heard_both = threading.Event()

    def refused(exc: RuntimeError) -> None:
        refusals.append(str(exc))
        if len(refusals) == 2:
            heard_both.set()

    async def on_the_loop(_change: sr.Change) -> None:
        loop_threads.append(threading.get_ident())
        with pytest.raises(RuntimeError) as refusal:
            repo.get_latest("u")  # would wait for the loop it runs on
        refused(refusal.value)

    def closer(_change: sr.Change) -> None:
        with pytest.raises(RuntimeError) as refusal:
            repo.close()  # closing waits for this very delivery
        refused(refusal.value)

    with repo.subscribe(on_the_loop), repo.subscribe(closer):
        repo.upsert_latest(snap("u", "a"))
        assert heard_both.wait(WAIT)
    assert loop_threads == [repo._loop._thread_id]
    assert sorted(refusals) == [
        "SyncSnapshotRepository called from its own event loop's thread (a progress callback "
        "or a coroutine listener?), where it would wait for itself; use the async repository "
        "there",
        "a SyncSnapshotRepository cannot be closed from its own loop or change callbacks",
    ]
    assert repo.get_latest("u") is not None  # still open


def test_a_change_stream_is_a_blocking_iterator_that_ends_when_closed(
    repo: SyncSnapshotRepository[Cart],
):
    with repo.changes() as stream:
        assert isinstance(stream, SyncChangeStream)
        repo.upsert_latest(snap("u", "a"))
        change = stream.get(timeout=WAIT)
        assert change is not None
        assert (change.user_id, change.version) == ("u", 1)
        assert stream.get(timeout=0.05) is None  # nothing more: the bounded wait gives up

    consumed: list[int] = []
    listening = threading.Event()
    stream = repo.changes()
    stream.open()

    def consume() -> None:
        listening.set()
        consumed.extend(change.version for change in stream)  # blocks until closed

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert listening.wait(WAIT)
    repo.upsert_latest(snap("u", "b"))
    stream.close()  # from this thread: the blocked iteration in the other one ends
    consumer.join(WAIT)
    assert not consumer.is_alive()
    assert consumed in ([], [2])  # the close may come before or after the delivery


def test_calling_the_repository_from_its_own_loop_raises_instead_of_deadlocking(
    repo: SyncSnapshotRepository[Cart],
):
    repo.upsert_latest(snap("u", "a"))
    repo.upsert_latest(snap("u", "b"))
    errors: list[RuntimeError] = []

    def progress(_count: int) -> None:  # runs on the background loop's thread
        try:
            repo.count_users()
        except RuntimeError as exc:
            errors.append(exc)

    assert repo.prune_history(keep_last=1, progress=progress) == 1
    assert len(errors) == 1
    assert "own event loop" in str(errors[0])


def test_calls_run_in_the_calling_threads_context(repo: SyncSnapshotRepository[Cart]):
    # How an OpenTelemetry span or a request id of the caller reaches the call on the loop.
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
    seen: list[str] = []

    def prune_as(name: str) -> None:
        request_id.set(name)
        repo.upsert_latest(snap("u", name))
        repo.upsert_latest(snap("u", name))
        assert repo.prune_history(keep_last=1, progress=lambda _n: seen.append(request_id.get()))

    prune_as("main")
    other = threading.Thread(target=prune_as, args=("worker",))
    other.start()
    other.join(WAIT)
    assert seen == ["main", "worker"]
    assert request_id.get() == "main"


# --- construction, views, closing ---------------------------------------------------------


def test_close_refuses_later_calls_and_stops_the_loop(url: str):
    before = len(portal_threads())
    repo = SyncSnapshotRepository.from_url(url, Cart)
    assert len(portal_threads()) == before + 1
    view = repo.for_tenant("acme")
    view.upsert_latest(snap("u", "tenant"))
    stream = repo.changes()
    view.close()  # a view's close leaves the repository open
    assert repo.get_latest("u") is None  # the view's write is confined to its tenant
    assert view.tenant == "acme"
    assert repo.tenant is None

    repo.close()
    repo.close()  # idempotent
    assert len(portal_threads()) == before
    for call in (lambda: repo.get_latest("u"), lambda: view.get_latest("u"), repo.health):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    assert stream.get(timeout=WAIT) is None  # the repository's close ended its stream


def test_close_lets_calls_in_flight_finish(url: str):
    repo = SyncSnapshotRepository.from_url(url, Cart)
    started = threading.Barrier(THREADS + 1, timeout=WAIT)
    outcomes: list[str] = []
    lock = threading.Lock()

    def writer(thread: int) -> None:
        started.wait()
        for i in range(50):
            try:
                repo.upsert_latest(snap(f"user-{thread}", str(i)))
            except RuntimeError as exc:  # refused: the repository is closed
                with lock:
                    outcomes.append(str(exc))
                return
        with lock:
            outcomes.append("finished")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    started.wait()
    repo.close()
    for thread in threads:
        thread.join(WAIT)
    # Every writer ended, with all its writes or with a clear refusal.
    assert len(outcomes) == THREADS
    assert set(outcomes) <= {"finished", "this SyncSnapshotRepository is closed"}
    with SyncSnapshotRepository.from_url(url, Cart) as again:
        for thread in range(THREADS):
            # Versions stay gapless: each accepted write committed whole.
            versions = [s.version for s in again.get_history(f"user-{thread}", limit=100)]
            assert versions == list(range(len(versions), 0, -1))


FORK_AND_FORGET = """
import os, sys, time
import snapshot_repo as sr

repo = sr.SyncSnapshotRepository.from_url(sys.argv[1])
repo.upsert_latest(sr.Snapshot(user_id="u", state={"a": 1}))
child = os.fork()  # as a pre-fork server does after importing the app
if child == 0:
    try:
        repo.get_latest("u")  # the loop's thread is not in this process
    except RuntimeError as exc:
        print("child:", exc, flush=True)
    sys.exit(0)  # a normal interpreter exit, which must not hang
deadline = time.monotonic() + 10
while os.waitpid(child, os.WNOHANG) == (0, 0):
    assert time.monotonic() < deadline, "the forked child hung on exit"
    time.sleep(0.01)
repo.changes().open()
print("parent:", repo.get_latest("u").version, flush=True)
# No close(): the exit hook closes the repository while its loop still runs.
"""


def test_a_forked_child_and_a_forgotten_close_neither_hang_nor_warn(
    tmp_path: Path, sqlite_template: Path
):
    # Without the fork hook the child's calls waited forever for a loop that is not
    # in the child, and its exit did too; without the exit hook a program that never
    # closed hung on exit (the portal was stopped by a finalizer after the loop's
    # daemon thread had stopped running).
    warnings = ["-W", "error", "-W", "ignore:This process:DeprecationWarning"]
    url = sqlite_backend(tmp_path, sqlite_template).url
    done = subprocess.run(
        [sys.executable, *warnings, "-c", FORK_AND_FORGET, url],
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == [
        "child: this SyncSnapshotRepository was made in the parent of this forked process; "
        "make one in each process (e.g. after a pre-fork server forked its workers)",
        "parent: 1",
    ]


def test_wrapping_an_async_repository_owns_and_closes_it(url: str):
    repository = sr.SnapshotRepository.from_url(url, Cart)
    with SyncSnapshotRepository(repository) as repo:
        assert repo.upsert_latest(snap("u", "a")).version == 1
        assert repo.state_type is Cart
        assert repo.namespace == "default"
        assert repo.engine is repository.engine
        assert repo.health_check()
        assert repr(repo).startswith("SyncSnapshotRepository(")
    with pytest.raises(TypeError):
        SyncSnapshotRepository(object())  # type: ignore[arg-type]


def test_a_bad_url_raises_and_leaves_no_thread():
    before = len(portal_threads())
    with pytest.raises(sr.ConfigurationError):
        SyncSnapshotRepository.from_url("ftp://nowhere/db", Cart)
    assert len(portal_threads()) == before


# --- parity with SnapshotRepository ---------------------------------------------------------


def public_members(cls: type) -> dict[str, Any]:
    return {
        name: inspect.getattr_static(cls, name) for name in dir(cls) if not name.startswith("_")
    }


def test_every_public_method_has_a_sync_counterpart_with_the_same_parameters():
    async_members = public_members(sr.SnapshotRepository)
    sync_members = public_members(SyncSnapshotRepository)
    assert sorted(sync_members) == sorted(async_members)
    for name, member in async_members.items():
        counterpart = sync_members[name]
        if isinstance(member, property):
            assert isinstance(counterpart, property), name
            continue
        assert type(counterpart) is type(member), name  # classmethod stays classmethod
        async_function = getattr(sr.SnapshotRepository, name)
        sync_function = getattr(SyncSnapshotRepository, name)
        sync_parameters = list(inspect.signature(sync_function).parameters.values())
        async_parameters = list(inspect.signature(async_function).parameters.values())
        # `self` aside: a method defined in a capability module annotates it.
        if async_parameters and async_parameters[0].name == "self":
            assert sync_parameters[0].name == "self", name
            sync_parameters, async_parameters = sync_parameters[1:], async_parameters[1:]
        assert sync_parameters == async_parameters, name
        assert not inspect.iscoroutinefunction(sync_function), name
        assert not inspect.isasyncgenfunction(sync_function), name
        returns = inspect.signature(async_function).return_annotation
        if inspect.isasyncgenfunction(async_function) or returns.startswith("AsyncIterator"):
            assert inspect.signature(sync_function).return_annotation.startswith("Iterator"), name


def test_the_package_exports_the_sync_repository():
    assert sr.SyncSnapshotRepository is SyncSnapshotRepository
    assert "SyncSnapshotRepository" in sr.__all__
