"""Every exception `snapshot_repo` raises on purpose.

Callers catch these rather than driver or pydantic exceptions, which never
escape the public API unchained::

    SnapshotRepoError                      root of the hierarchy
    ├── SnapshotValidationError            bad input (also a ValueError); nothing was written
    │   └── SchemaVersionError             a stored state's schema version the code cannot read
    ├── ConfigurationError                 bad URL, driver or setting (also a ValueError)
    ├── VersionConflictError               compare-and-set lost; nothing was written
    ├── CursorExpiredError                 feed cursor before the trimmed horizon (a LookupError)
    ├── DecryptionError                    an encrypted state's key is missing (shredded) or wrong
    └── StorageError                       the database failed; the driver error is chained
        ├── ConnectionLostError            the connection died mid-operation (server restart, kill)
        └── SchemaNotReadyError            tables missing: run `migrate()` first

Messages never contain a state payload, and show user ids only redacted
(first four characters, then ``...``) so that they can be logged safely.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "ConnectionLostError",
    "CursorExpiredError",
    "DecryptionError",
    "SchemaNotReadyError",
    "SchemaVersionError",
    "SnapshotRepoError",
    "SnapshotValidationError",
    "StorageError",
    "VersionConflictError",
    "redact",
    "set_redaction",
]


_redacting = True


def set_redaction(enabled: bool) -> None:
    """Turn the redaction of user ids in messages, reprs and logs on (default) or off.

    Off is for development and for services whose user ids are not personal
    data; payloads are never shown either way.
    """
    global _redacting
    _redacting = bool(enabled)


def redact(user_id: object) -> str:
    """Show enough of a user id to correlate log lines, not enough to identify anyone.

    At most its first four characters, and never more than a third of it: a
    short id (an employee number, "4711") would otherwise be shown whole.
    """
    text = user_id if isinstance(user_id, str) else repr(user_id)
    if not _redacting:
        return text
    return text[: min(_SHOWN_CHARACTERS, len(text) // 3)] + "..."


_SHOWN_CHARACTERS = 4


class SnapshotRepoError(Exception):
    """Root of every error this library raises on purpose."""


class SnapshotValidationError(SnapshotRepoError, ValueError):
    """Input was refused before anything was written: bad user id, state, limit or size."""


class SchemaVersionError(SnapshotValidationError):
    """A stored state's schema version cannot be read by this code.

    It is newer than the repository's `schema_version`, older than its
    upgraders reach, or an upgrader failed on it.
    """


class ConfigurationError(SnapshotRepoError, ValueError):
    """The repository was configured wrongly: an unsupported URL or driver, a bad setting."""


class VersionConflictError(SnapshotRepoError):
    """A compare-and-set write found another version than the one it expected.

    Attributes:
        user_id: the user whose write was refused.
        expected_version: what the caller passed as ``expected_version``.
        actual_version: the version found just after the refusal (0 when the
            user has no snapshot). Informational: it may have moved on since.
    """

    def __init__(self, user_id: str, expected_version: int, actual_version: int) -> None:
        self.user_id = user_id
        self.expected_version = expected_version
        self.actual_version = actual_version
        super().__init__(
            f"version conflict for user {redact(user_id)}: expected version "
            f"{expected_version}, found {actual_version}; nothing was written"
        )


class CursorExpiredError(SnapshotRepoError, LookupError):
    """A change-feed cursor points before the entries trimming removed.

    The feed was trimmed (`trim_changes`, or `prune_history`/`reap_expired`
    with `feed_retention`) past an entry the cursor had not read, so reading
    on from it would skip that entry: the read is refused instead. Nothing
    was lost for a consumer that acknowledged its position
    (`acknowledge_changes`), which trimming never passes. Rebuild what the
    consumer derives from the feed (its current states, from `get_latest`),
    then resume from `horizon`.

    Attributes:
        cursor: the cursor that was refused.
        horizon: the cursor just after the trimmed entries, where reading can
            resume knowingly.
    """

    def __init__(self, cursor: str, horizon: str) -> None:
        self.cursor = cursor
        self.horizon = horizon
        super().__init__(
            f"change feed cursor {cursor!r} points before the trimmed horizon {horizon!r}: "
            "entries after it were trimmed; rebuild, then resume from the horizon"
        )


class DecryptionError(SnapshotRepoError):
    """An encrypted state cannot be opened: its data key was destroyed or is wrong.

    After a crypto-shredding erasure this is the expected outcome for any
    copy of the user's payloads.
    """


class StorageError(SnapshotRepoError):
    """The database failed (unreachable, timed out, refused the statement).

    The driver's exception is chained as ``__cause__``; the message says which
    operation failed. A failed write has been rolled back as a whole.
    """


class ConnectionLostError(StorageError):
    """The connection to the database was lost during the operation.

    The connection has been discarded (with every pooled connection of its
    generation), so the next call gets a fresh one. Reads are repeated once
    by the repository before this reaches you. For a write the outcome is
    unknown: it may have committed. Retry it with the same idempotency key to
    be safe.
    """


class SchemaNotReadyError(StorageError):
    """The snapshot schema is missing or older than this package: migrate the database."""
