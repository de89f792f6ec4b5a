"""Read replicas: a `Backend` sending reads to Postgres streaming standbys, the rest to the primary.

`ReplicaRouter` wraps the primary's backend and one backend per replica.
Which calls go where:

- to a replica (when one is usable, see below): `latest`, `history`,
  `latest_many`, and `fetch` of the statements the repository names as plain
  reads (`get_version`, `get_as_of`,
  `diff`, `exists`, `list_users`, `count_users`, `get_history` pages,
  `iter_history`, `export_user`, `erasure_receipt`);
- to the primary, always: every write (`write`, `write_many`, `delete`,
  `execute_in_transaction`, `vacuum`, erasure upkeep), `current_version`
  (compare-and-set conflicts and `merge`), the change feed (`feed_page`,
  whose cursor must follow the primary's commit order), and `fetch` of any
  other statement, and every read inside `primary_reads()`: the reads that
  decide a write (the version `restore` copies, merge, purges, upgrades,
  reaping, data keys, feed retention, erasure across namespaces, subject
  access) and the health probe's schema revision.

Read-your-writes, per user: every write of this repository (and its tenant
views) records, per user id, the moment it returned, at no cost beyond a dict
update: no query is added to a write. A monitor task (started by the first
call, every `check_interval` seconds) samples the primary's WAL position
(`pg_current_wal_lsn()`), then each replica's replayed position
(`pg_last_wal_replay_lsn()`). A write that returned before a sample began
committed at or below the sampled position (commits are flushed before they
return, under the default `synchronous_commit`), so once a replica has
replayed that position it holds the write. A read of a user goes to a
replica only if the replica has replayed a position sampled after this
repository's last write of that user; otherwise to the primary. Reads
without a user id (`list_users`, `count_users`) wait in the same way for
the repository's newest write of any user. Writes made by other processes
are not tracked: read them with `primary_reads()`.

A replica is usable when its last check succeeded and its staleness is at
most `max_lag` seconds: the time since the newest primary sample it had
replayed. A replica that is down, not a standby (promoted), or further
behind is skipped until a check finds it well again; a read a replica fails
(connection refused or lost, a recovery conflict, anything) or does not
answer within `max_lag` seconds (frozen, overloaded) marks it down and runs
again on the primary. Reads never fail because a replica did.

Staleness is measured against the primary: while the primary does not
answer, replicas serve reads until their last measurement is `max_lag`
seconds old, then reads go to the primary (and fail with it). The
guarantee for writes assumes commits are flushed before they return (the
default `synchronous_commit = on`); with it off, a write may reach
replicas up to the WAL writer's delay (`wal_writer_delay`, 200 ms) later
than its own reads go back to them.

This module holds the routing rules; the measurements they rest on (WAL
samples, each replica's replayed position, the last write per user) are in
`replica_positions`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import ClauseElement
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from .._checks import positive_seconds
from .._translate import describe
from ..engine import EngineSettings, create_engine
from ..errors import ConfigurationError
from . import Backend, BackendKind, backend_for
from .replica_positions import PRIMARY_POSITION, LastWrites, Replica, WalSamples, users_of
from .values import Erasure, PendingBatch, PendingWrite, Row, Scope, WriteOutcome

__all__ = [
    "DEFAULT_MAX_REPLICA_LAG",
    "ReplicaRouter",
    "ReplicaState",
    "primary_reads",
    "route_reads",
]

logger = logging.getLogger("snapshot_repo")

DEFAULT_MAX_REPLICA_LAG = 5.0
"""Seconds a replica may be behind the primary before reads skip it."""

_primary_only: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "snapshot_repo_primary_reads", default=False
)

_ResultT = TypeVar("_ResultT")


@contextmanager
def primary_reads() -> Iterator[None]:
    """Within this block (this task and the tasks it starts), every read goes to the primary.

    For reads that must see writes made elsewhere (another process, another
    repository object): this repository's own writes are read back from the
    primary anyway until the replicas have them. Without replicas it changes nothing.
    """
    token = _primary_only.set(True)
    try:
        yield
    finally:
        _primary_only.reset(token)


@dataclass(slots=True)
class ReplicaState:
    """What the last checks found about one replica (see `ReplicaRouter.check`).

    Attributes:
        url: the replica's URL, password hidden.
        reachable: its last check succeeded, and no read failed on it since.
        lag_seconds: how far behind the primary it was when last checked, in
            seconds: the time since the newest primary WAL position it had
            replayed was current. None when unreachable or not measured yet.
        in_use: reads may go to it now: reachable and within the lag bound.
        error: why it is not reachable (None when it is).
    """

    url: str
    reachable: bool
    lag_seconds: float | None
    in_use: bool
    error: str | None


class ReplicaRouter:
    """A `Backend` over a Postgres primary and its streaming replicas (see the module docstring).

    Made by `route_reads`; owns the replicas' engines and disposes them in
    `release()`. No I/O until the first call, which starts the monitor task.
    """

    def __init__(
        self,
        primary: Backend,
        replicas: Sequence[tuple[AsyncEngine, Backend]],
        *,
        max_lag: float,
        plain_reads: Collection[ClauseElement],
    ) -> None:
        self._primary = primary
        self._replicas = [Replica(engine, backend) for engine, backend in replicas]
        self.max_lag = max_lag
        # Often enough that a replica's staleness is known to a tenth of the bound;
        # at least once a second, at most every 50 ms.
        self.check_interval = min(1.0, max(0.05, max_lag / 10))
        self._check_timeout = min(5.0, max(0.5, max_lag))
        self._plain_reads = frozenset(id(statement) for statement in plain_reads)
        self._keep_alive = list(plain_reads)  # the ids above stay theirs
        self._writes = LastWrites()
        self._samples = WalSamples(int(max_lag / self.check_interval) * 4 + 8)
        self._primary_failing = False  # logged once, when the primary stops answering
        self._next = 0
        self._monitor: asyncio.Task[None] | None = None
        self._monitor_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # --- what the repository asks of any backend ----------------------------------

    @property
    def notifies(self) -> bool:
        return self._primary.notifies

    @property
    def prune_statement(self) -> ClauseElement:
        return self._primary.prune_statement

    @property
    def claim_key_statement(self) -> ClauseElement:
        return self._primary.claim_key_statement

    @property
    def fold_statements(self) -> tuple[ClauseElement, ...]:
        return self._primary.fold_statements

    async def write(self, write: PendingWrite) -> WriteOutcome:
        try:
            return await self._primary.write(write)
        finally:  # also after a failure: its outcome may be unknown, committed
            self._writes.note((write.user_id,))

    async def write_many(self, batch: PendingBatch) -> list[int]:
        try:
            return await self._primary.write_many(batch)
        finally:
            self._writes.note(batch.user_ids)

    async def delete(self, erasure: Erasure) -> tuple[int, int]:
        try:
            return await self._primary.delete(erasure)
        finally:
            self._writes.note((erasure.user_id,))

    async def execute_in_transaction(
        self, work: Sequence[tuple[ClauseElement, Mapping[str, Any]]]
    ) -> list[int]:
        try:
            return await self._primary.execute_in_transaction(work)
        finally:
            self._writes.note(users_of(params for _statement, params in work))

    async def latest(self, scope: Scope, user_id: str, now: Any) -> Row | None:
        return await self._read(
            self._writes.since(user_id), lambda backend: backend.latest(scope, user_id, now)
        )

    async def history(self, scope: Scope, user_id: str, limit: int) -> list[Row]:
        return await self._read(
            self._writes.since(user_id), lambda backend: backend.history(scope, user_id, limit)
        )

    async def latest_many(self, scope: Scope, user_ids: Sequence[str], now: Any) -> list[Row]:
        return await self._read(
            max(map(self._writes.since, user_ids), default=0.0),
            lambda backend: backend.latest_many(scope, user_ids, now),
        )

    async def current_version(self, scope: Scope, user_id: str) -> int:
        # Asked after a compare-and-set failed and by merge: only the primary's answer counts.
        return await self._primary.current_version(scope, user_id)

    async def fetch(self, statement: ClauseElement, params: Mapping[str, Any]) -> list[Any]:
        if id(statement) not in self._plain_reads:
            if not statement.is_dml:
                return await self._primary.fetch(statement, params)
            try:  # a write with RETURNING
                return await self._primary.fetch(statement, params)
            finally:
                self._writes.note(users_of((params,)))
        user_id = params.get("user_id")
        since = self._writes.last if user_id is None else self._writes.since(user_id)
        return await self._read(since, lambda backend: backend.fetch(statement, params))

    async def feed_page(self, params: Mapping[str, Any]) -> list[Any]:
        return await self._primary.feed_page(params)

    async def vacuum(self, full: bool = False) -> None:
        await self._primary.vacuum(full)

    async def checkpoint_erasures(self) -> None:
        await self._primary.checkpoint_erasures()

    async def finish_erasures(self, wait: float) -> bool:
        return await self._primary.finish_erasures(wait)

    async def missing_database(self) -> str | None:
        return await self._primary.missing_database()

    def decode_snapshot_row(self, raw: Sequence[Any]) -> Row:
        return self._primary.decode_snapshot_row(raw)

    def keep_connections(self, count: int) -> None:
        self._primary.keep_connections(count)
        for replica in self._replicas:
            replica.backend.keep_connections(count)

    async def release(self) -> None:
        """Stop the monitor, return kept connections, and dispose the replicas' engines.

        The primary's engine is its owner's to dispose (the repository's `close()`).
        """
        self._closed = True
        monitor, self._monitor = self._monitor, None
        if monitor is not None and not monitor.done():
            monitor.cancel()
            if self._monitor_loop is asyncio.get_running_loop():
                await asyncio.gather(monitor, return_exceptions=True)
        await self._primary.release()
        for replica in self._replicas:
            try:
                async with asyncio.timeout(self._check_timeout):
                    await replica.backend.release()
                    await replica.engine.dispose()
            except TimeoutError:  # a frozen replica never acknowledges: abandon its sockets
                await replica.engine.dispose(close=False)

    # --- routing --------------------------------------------------------------------

    def route(self, user_id: str | None = None) -> str | None:
        """The URL of the replica the next read of `user_id` would go to; None: the primary.

        `user_id` None stands for reads of no one user (`list_users`). Each call
        moves the round robin on, as a read does.
        """
        since = self._writes.last if user_id is None else self._writes.since(user_id)
        replica = self._replica_for(since)
        return None if replica is None else replica.url

    async def _read(self, since: float, read: Callable[[Backend], Awaitable[_ResultT]]) -> _ResultT:
        """`read` on a replica fit for it (see `_replica_for`), else (or if it fails) the primary.

        A replica gets `max_lag` seconds to answer: one that takes longer is
        further behind than the bound allows, frozen or overloaded.
        """
        replica = self._replica_for(since)
        if replica is not None:
            try:
                async with asyncio.timeout(self.max_lag):
                    return await read(replica.backend)
            except TimeoutError:
                self._replica_failed(replica, f"no answer within {self.max_lag:g} s")
            except Exception as exc:
                self._replica_failed(replica, describe(exc))
        return await read(self._primary)

    def _replica_for(self, since: float) -> Replica | None:
        """A replica fit for a read that must see this repository's writes up to `since`."""
        self._ensure_monitor()
        if _primary_only.get():
            return None
        replicas = self._replicas
        count = len(replicas)
        now = time.monotonic()
        for step in range(count):
            index = (self._next + step) % count
            replica = replicas[index]
            if replica.usable(now, since, self.max_lag):
                self._next = (index + 1) % count
                return replica
        return None

    def _replica_failed(self, replica: Replica, reason: str) -> None:
        logger.info(
            "snapshot_repo: a read on replica %s failed, reading from the primary: %s",
            replica.url,
            reason,
        )
        replica.fail(reason)

    # --- measuring ------------------------------------------------------------------

    def _ensure_monitor(self) -> None:
        """Start the monitor in the running loop, once (again if that loop is a new one)."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        monitor = self._monitor
        if monitor is not None and not monitor.done() and loop is self._monitor_loop:
            return
        self._monitor_loop = loop
        self._monitor = loop.create_task(self._watch(), name="snapshot_repo replica monitor")

    async def _watch(self) -> None:
        while True:
            try:
                await self._measure(self._check_timeout)
            except Exception:  # a bug here must not stop routing, nor go unseen
                logger.exception("snapshot_repo: checking the replicas failed")
                for replica in self._replicas:
                    replica.fail("the replica monitor failed")
            await asyncio.sleep(self.check_interval)

    async def check(self, time_limit: float) -> list[ReplicaState]:
        """Measure every replica now, within `time_limit` seconds, and report each.

        Never raises (but for cancellation): a replica or primary that fails
        or does not answer in time is reported with the reason.
        """
        self._ensure_monitor()
        await self._measure(time_limit)
        now = time.monotonic()
        states = []
        for replica in self._replicas:
            lag = None
            if replica.visible_at:
                lag = round(max(0.0, replica.checked_at - replica.visible_at), 3)
            states.append(
                ReplicaState(
                    url=replica.url,
                    reachable=replica.ok,
                    lag_seconds=lag if replica.ok else None,
                    in_use=replica.usable(now, 0.0, self.max_lag),
                    error=replica.error,
                )
            )
        return states

    async def _measure(self, time_limit: float) -> None:
        """Sample the primary's WAL position, then each replica's replay position."""
        asked = time.monotonic()
        try:
            async with asyncio.timeout(time_limit):
                rows = await self._primary.fetch(PRIMARY_POSITION, {})
        except Exception as exc:
            # Without a new sample replicas go on being measured against older ones,
            # so their staleness grows until the primary answers again.
            if not self._primary_failing:
                logger.info(
                    "snapshot_repo: cannot read the primary's WAL position: %s", describe(exc)
                )
            self._primary_failing = True
        else:
            self._primary_failing = False
            self._samples.add(asked, int(rows[0][0]))
        left = max(0.0, time_limit - (time.monotonic() - asked))
        await asyncio.gather(
            *(replica.measure(self._samples, left, time_limit) for replica in self._replicas)
        )
        self._forget_replayed_writes()

    def _forget_replayed_writes(self) -> None:
        """Drop the remembered writes that every working replica has replayed."""
        working = [replica.visible_at for replica in self._replicas if replica.ok]
        if not working:
            return
        self._writes.forget_replayed(min(working))


def route_reads(
    primary: Backend,
    primary_engine: AsyncEngine,
    replica_urls: Sequence[str | URL],
    *,
    settings: EngineSettings | None,
    kind: BackendKind,
    max_lag: float,
    plain_reads: Collection[ClauseElement],
) -> ReplicaRouter:
    """A `ReplicaRouter` over `primary` and an engine per replica URL (none connects yet).

    Replicas share the primary's `settings` and backend kind.

    Raises:
        ConfigurationError: the primary or a replica is not Postgres, `replica_urls`
            is not a sequence of URLs, `max_lag` is not a positive number of
            seconds, or a replica URL is invalid.
    """
    if isinstance(replica_urls, str | URL) or not isinstance(replica_urls, Sequence):
        raise ConfigurationError("replicas must be a sequence of database URLs")
    max_lag = positive_seconds("max_replica_lag", max_lag)
    if primary_engine.dialect.name != "postgresql":
        raise ConfigurationError(
            f"read replicas need a Postgres primary, not {primary_engine.dialect.name!r}"
        )
    engines: list[AsyncEngine] = []
    try:
        for url in replica_urls:
            engines.append(create_engine(url, settings))
            _check_postgres(engines[-1])
        replicas = [(engine, backend_for(engine, kind)) for engine in engines]
    except BaseException:
        for engine in engines:
            engine.sync_engine.dispose(close=False)  # nothing connected yet
        raise
    return ReplicaRouter(primary, replicas, max_lag=max_lag, plain_reads=plain_reads)


def _check_postgres(replica: AsyncEngine) -> None:
    if replica.dialect.name != "postgresql":
        raise ConfigurationError(
            "read replicas are Postgres streaming standbys; "
            f"{replica.url.render_as_string(hide_password=True)!r} is {replica.dialect.name!r}"
        )
