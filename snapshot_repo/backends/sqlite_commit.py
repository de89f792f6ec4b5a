"""What runs around a SQLite write's COMMIT on the connection's thread.

`Commit` decides, under a lock, whether a write transaction may still commit
or was abandoned by a caller whose deadline passed; `truncate_committed`
truncates the WAL after erasures have committed, so the erased rows' old
bytes leave the files. The SQLite backend runs both inside its one hop to the
connection's thread (see `sqlite`).
"""

from __future__ import annotations

import logging
import sqlite3
import threading

__all__ = ["Commit", "truncate_committed", "truncate_wal"]

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
    """

    __slots__ = ("_lock", "_state")

    _RUNNING, _COMMITTING, _ABANDONED = range(3)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = self._RUNNING

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
