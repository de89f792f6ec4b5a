"""What `ReplicaRouter` measures: replicas' WAL positions and this repository's last writes.

The routing rules live in `replicas` (see its docstring for the guarantee);
this module holds the bookkeeping they rest on, kept apart so the router
reads as rules:

- `WalSamples`: the primary's WAL position, sampled with the moment it was
  asked for. A write that returned before a sample was asked for committed
  at or below its position.
- `Replica`: one replica's backend and what its last check found, above all
  `visible_at`, the newest sample it has replayed (so every write that
  returned before that moment is there).
- `LastWrites`: per user id, when this repository's last write of it
  returned; a read of a user may go to a replica whose `visible_at` is later.
  Bounded in memory: users beyond the limit, and writes every working
  replica has replayed, fold into one floor that all reads wait for.

All times are `time.monotonic()`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, cast, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncEngine

from .._translate import describe
from . import Backend

__all__ = ["PRIMARY_POSITION", "LastWrites", "Replica", "WalSamples", "users_of"]

logger = logging.getLogger("snapshot_repo")

_MAX_TRACKED_USERS = 100_000
"""Users whose last write is remembered one by one; beyond that the oldest are folded
into one moment that every user's reads wait for (safe, and bounded in memory)."""

_ORIGIN: ColumnElement[Any] = literal_column("'0/0'")
PRIMARY_POSITION = select(
    cast(func.pg_wal_lsn_diff(func.pg_current_wal_lsn(), _ORIGIN), BigInteger)
)
"""The primary's WAL position, in bytes."""
_REPLAY_POSITION = select(
    func.pg_is_in_recovery(),
    cast(func.pg_wal_lsn_diff(func.pg_last_wal_replay_lsn(), _ORIGIN), BigInteger),
)
"""Whether a server is a standby, and the WAL position it has replayed (None on a primary)."""


class WalSamples:
    """The primary's recent WAL positions, each with when it was asked for, oldest first.

    Keeps at most `limit` samples: enough to cover the lag bound several times over.
    """

    __slots__ = ("_limit", "_samples")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._samples: list[tuple[float, int]] = []  # (when asked, primary WAL position)

    def add(self, asked: float, position: int) -> None:
        samples = self._samples
        if samples and samples[-1][0] > asked:  # a concurrent check (health) sampled later
            samples.append((asked, position))
            samples.sort()
        else:
            samples.append((asked, position))
        if len(samples) > self._limit:
            del samples[: len(samples) - self._limit]

    def newest_replayed(self, replayed: int) -> float | None:
        """When the newest sample at or below WAL position `replayed` was asked for, if any.

        Positions need not grow with time across concurrent checks, hence the search.
        """
        for sampled_at, position in reversed(self._samples):
            if position <= replayed:
                return sampled_at
        return None


class Replica:
    """One replica's backend and what the checks measured."""

    __slots__ = ("backend", "checked_at", "engine", "error", "ok", "replayed", "url", "visible_at")

    def __init__(self, engine: AsyncEngine, backend: Backend) -> None:
        self.engine = engine
        self.backend = backend
        self.url = engine.url.render_as_string(hide_password=True)
        self.ok = False  # unknown until the first check: reads go to the primary meanwhile
        self.error: str | None = "not checked yet"
        self.checked_at = 0.0
        self.replayed: int | None = None
        # Everything the primary committed before this moment has been replayed here.
        self.visible_at = 0.0

    def usable(self, now: float, since: float, max_lag: float) -> bool:
        """Fit for a read that must see writes up to `since`, `now`."""
        visible_at = self.visible_at
        return self.ok and visible_at > since and now - visible_at <= max_lag

    def fail(self, reason: str) -> None:
        if self.ok:
            logger.warning("snapshot_repo: replica %s is not used: %s", self.url, reason)
        self.ok = False
        self.error = reason

    async def measure(self, samples: WalSamples, left: float, time_limit: float) -> None:
        """Ask how far this replica replayed, waiting `left` of the check's `time_limit` s.

        Never raises (but for cancellation): a replica that fails, does not
        answer in time or is not a standby is marked failed with the reason.
        """
        asked = time.monotonic()
        try:
            async with asyncio.timeout(left):
                rows = await self.backend.fetch(_REPLAY_POSITION, {})
        except TimeoutError:
            self.fail(f"no answer within {time_limit:g} s")
            return
        except Exception as exc:
            self.fail(describe(exc))
            return
        in_recovery, replayed = rows[0]
        if not in_recovery or replayed is None:
            self.fail("not a standby (pg_is_in_recovery() is false): promoted, or a primary")
            return
        replayed = int(replayed)
        if asked < self.checked_at:  # a later check already answered
            return
        # The newest sample the replica has replayed: everything committed before it was
        # asked for is there.
        sampled_at = samples.newest_replayed(replayed)
        if sampled_at is not None:
            self.visible_at = max(self.visible_at, sampled_at)
        self.checked_at = asked
        self.replayed = replayed
        if not self.ok:
            logger.info("snapshot_repo: replica %s answers again", self.url)
        self.ok = True
        self.error = None


class LastWrites:
    """When this repository's last write of each user returned: what its reads must see.

    Recording a write is a dict update, no query. Not thread-safe: used on one event loop.

    Attributes:
        last: when the newest write of any user returned (0.0: none yet), what
            reads of no one user (`list_users`) must see.
    """

    __slots__ = ("_floor", "_written", "last")

    def __init__(self) -> None:
        # User id -> when this repository's last write of it returned, oldest first.
        self._written: dict[str, float] = {}
        self._floor = 0.0  # every user's write before this (forgotten one by one)
        self.last = 0.0

    def since(self, user_id: str) -> float:
        """When this repository's last write of `user_id` returned (0.0: not lately)."""
        floor = self._floor
        written = self._written.get(user_id, floor)
        return written if written > floor else floor

    def note(self, user_ids: Sequence[str] | None) -> None:
        """Remember that these users (None: possibly anyone) were written just now."""
        now = time.monotonic()
        self.last = now
        if user_ids is None:
            self._floor = now
            self._written.clear()
            return
        written = self._written
        for user_id in user_ids:
            written.pop(user_id, None)  # re-inserted last: the dict stays oldest first
            written[user_id] = now
        while len(written) > _MAX_TRACKED_USERS:
            oldest = next(iter(written))
            self._floor = max(self._floor, written.pop(oldest))

    def forget_replayed(self, everywhere: float) -> None:
        """Drop the remembered writes before `everywhere`, which every working replica holds."""
        written = self._written
        while written:
            oldest = next(iter(written))
            moment = written[oldest]
            if moment >= everywhere:
                break
            del written[oldest]
            # A replica back from an outage must also have replayed it (it is safe, if
            # conservative, to wait for the moment of any forgotten write).
            self._floor = max(self._floor, moment)


def users_of(params: Any) -> list[str] | None:
    """The user ids a write's statements name; None when one names none (a bulk change)."""
    users = []
    for values in params:
        user_id = values.get("user_id")
        if not isinstance(user_id, str):
            return None
        users.append(user_id)
    return users
