"""Retention: how much of each user's history to keep.

A policy keeps the newest `keep_last` versions and/or versions younger than
`older_than`; a version is dropped only when it falls outside every bound
given. The latest version is never dropped: retention trims history, it
never erases a user (that is `delete`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from .errors import ConfigurationError, SnapshotValidationError

__all__ = ["RetentionPolicy"]


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Which history versions to keep.

    Attributes:
        keep_last: keep at least the newest N versions (N >= 1), or None.
        older_than: keep versions younger than this, or None.

    Raises:
        ConfigurationError: neither bound given, or a bound out of range.
    """

    keep_last: int | None = None
    older_than: timedelta | None = None

    def __post_init__(self) -> None:
        if self.keep_last is None and self.older_than is None:
            raise ConfigurationError("a RetentionPolicy needs keep_last, older_than or both")
        if self.keep_last is not None and (
            isinstance(self.keep_last, bool)
            or not isinstance(self.keep_last, int)
            or self.keep_last < 1
        ):
            raise ConfigurationError(f"keep_last must be an integer >= 1, not {self.keep_last!r}")
        if self.older_than is not None and (
            not isinstance(self.older_than, timedelta) or self.older_than < timedelta(0)
        ):
            raise ConfigurationError("older_than must be a non-negative timedelta")

    def cutoff(self, now: datetime) -> datetime | None:
        """Versions created before this moment are old enough to drop (None: any age)."""
        return None if self.older_than is None else now - self.older_than


def policy_from_arguments(keep_last: object, older_than: object) -> RetentionPolicy:
    """A policy from `prune_history` arguments; bad ones are a validation error."""
    try:
        return RetentionPolicy(keep_last=keep_last, older_than=older_than)  # type: ignore[arg-type]
    except ConfigurationError as exc:
        raise SnapshotValidationError(str(exc)) from None
