"""What runs around a SQLite write's COMMIT on the connection's thread.

`Commit` decides, under a lock, whether a write transaction may still commit
or was abandoned by a caller whose deadline passed; `truncate_committed`
truncates the WAL after erasures have committed, so the erased rows' old
bytes leave the files, and `PendingTruncation` remembers, per engine, a
truncation that readers held up. The SQLite backend runs the first two
inside its one hop to the connection's thread (see `sqlite`); the core
backend shares the third.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "Commit",
    "PendingTruncation",
    "pending_truncation",
    "truncate_committed",
    "truncate_wal",
]

_RETRY_SECONDS = 1.0
"""While a truncation is pending, how often later writes try it again."""
_STATE_ATTRIBUTE = "_snapshot_repo_pending_truncation"

logger = logging.getLogger("snapshot_repo")


def truncate_wal(conn: sqlite3.Connection, wait_ms: int, busy_ms: int) -> bool:
    """Copy the WAL into the database file and truncate the WAL to nothing; True if done.

    With `secure_delete` on (see `engine`), the freed cells of an erasure are
    zeroed in the pages it writes; the WAL still holds the frames that wrote
    the erased rows, and the main file their old pages, until this checkpoint.

    A truncating checkpoint must wait for every reader of an older snapshot
    (a backup, a long report) and blocks new writers while it waits, so it
    waits at most `wait_ms` (0 after a write: other users' writes never queue
    behind a reader), then gives up, leaving what it could not copy for a
    later attempt. `busy_ms` is the connection's own busy timeout, restored after.
    """
    conn.execute(f"PRAGMA busy_timeout = {wait_ms}")
    try:
        busy, _log, _moved = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
    return not busy


def truncate_committed(conn: sqlite3.Connection, wait_ms: int, busy_ms: int) -> bool:
    """`truncate_wal` after erasures have committed; a failure is logged, not raised."""
    try:
        return truncate_wal(conn, wait_ms, busy_ms)
    except (sqlite3.Error, OSError) as exc:
        # The erasures committed; only the WAL still holds the old bytes.
        logger.warning("snapshot_repo: WAL checkpoint after an erasure failed: %s", exc)
        return False


class Commit:
    """Whether a write transaction running on a connection's thread may still commit.

    The caller's deadline cancels the awaiting task, but not the function
    running on the connection's thread: without this, a write reported as
    timed out could commit a moment later, and a caller retrying it without
    an idempotency key would write twice. Whichever comes first wins, under a
    lock: the thread starting COMMIT, or the caller abandoning the write.
    A caller too late to abandon waits for `finished` and takes `result`
    (None if the COMMIT failed and rolled back), so a write that committed is
    reported as committed.
    """

    __slots__ = ("_lock", "_state", "finished", "result")

    _RUNNING, _COMMITTING, _ABANDONED = range(3)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = self._RUNNING
        self.finished = threading.Event()
        self.result: object = None

    def begin(self) -> None:
        """Called by the thread before COMMIT; raises `_Abandoned` if the caller gave up."""
        with self._lock:
            if self._state == self._ABANDONED:
                raise _Abandoned
            self._state = self._COMMITTING

    def abandon(self) -> bool:
        """Called by a caller that stops waiting: True if the write can no longer commit."""
        with self._lock:
            if self._state == self._COMMITTING:
                return False
            self._state = self._ABANDONED
            return True


class _Abandoned(Exception):
    """The caller stopped waiting before COMMIT: the transaction was rolled back."""


class PendingTruncation:
    """An erasure committed, but readers kept its WAL frames from being truncated.

    One per engine (one database file), shared by every backend on it, so a
    truncation one repository's erasure left pending (or `erase_user`'s
    short-lived per-namespace backends) is completed by any later write,
    `finish_erasures` or `close()` on that engine.
    """

    __slots__ = ("_lock", "_next_attempt", "_started", "pending")

    def __init__(self) -> None:
        self.pending = False
        self._next_attempt = 0.0
        self._started = 0  # how many truncations began; one that began before a newer
        self._lock = threading.Lock()  # failure must not clear the flag that failure set

    def begin(self) -> int:
        """Number a truncation about to run (on any connection's thread)."""
        with self._lock:
            self._started += 1
            return self._started

    def due(self) -> bool:
        """Whether a write should retry now: pending, and not tried in the last second."""
        return self.pending and time.monotonic() >= self._next_attempt

    def note(self, done: bool, attempt: int | None = None) -> None:
        """Record the outcome of truncation number `attempt` (from `begin`).

        A success clears the flag only if no truncation began after it: a later
        one may have failed (a reader arrived) and must stay pending. Warns once
        when a truncation starts to be pending.
        """
        with self._lock:
            if done:
                if attempt is None or attempt == self._started:
                    self.pending = False
                return
            if not self.pending:
                logger.warning(
                    "snapshot_repo: an erasure committed, but readers hold old snapshots of "
                    "the SQLite file, so the WAL still holds the erased bytes; later writes, "
                    "finish_erasures() and close() truncate it once the readers are done"
                )
            self.pending = True
            self._next_attempt = time.monotonic() + _RETRY_SECONDS


def pending_truncation(engine: AsyncEngine) -> PendingTruncation:
    """The engine's `PendingTruncation` (made on first use)."""
    sync_engine = engine.sync_engine
    state = getattr(sync_engine, _STATE_ATTRIBUTE, None)
    if not isinstance(state, PendingTruncation):
        state = PendingTruncation()
        setattr(sync_engine, _STATE_ATTRIBUTE, state)
    return state
