"""Argument checks shared by the public methods: each refuses bad input with a typed error.

Every check runs before any I/O, so a refused call has changed nothing.
"""

from __future__ import annotations

from datetime import timedelta

from .errors import ConfigurationError, SnapshotValidationError
from .snapshot import (
    MAX_ACTOR_LENGTH,
    MAX_REASON_LENGTH,
    MAX_SCOPE_LENGTH,
    MAX_USER_ID_LENGTH,
    check_identifier,
)

__all__ = [
    "MAX_BATCH_SIZE",
    "MAX_VERSION",
    "check_batch_size",
    "check_int",
    "positive_seconds",
    "valid_actor",
    "valid_identifier",
    "valid_reason",
    "valid_scope_name",
    "valid_ttl",
    "valid_user_id",
]

MAX_BATCH_SIZE = 10_000
"""The most snapshots or user ids one batch call takes."""

MAX_VERSION = 2**63 - 1
"""The largest version the BIGINT `version` columns hold."""


def valid_identifier(name: str, value: object, max_length: int) -> str:
    """`value` if it is a string identifier of 1 to `max_length` characters without control
    characters, else `SnapshotValidationError`."""
    if not isinstance(value, str):
        raise SnapshotValidationError(f"{name} must be a string, not {type(value).__name__}")
    try:
        return check_identifier(name, value, max_length)
    except ValueError as exc:
        raise SnapshotValidationError(str(exc)) from None


def valid_user_id(user_id: object) -> str:
    return valid_identifier("user_id", user_id, MAX_USER_ID_LENGTH)


def valid_scope_name(name: str, value: object) -> str:
    """A tenant or namespace name: a configuration error, since it is set up, not passed."""
    try:
        return valid_identifier(name, value, MAX_SCOPE_LENGTH)
    except SnapshotValidationError as exc:
        raise ConfigurationError(str(exc)) from None


def valid_actor(actor: object) -> str | None:
    return None if actor is None else valid_identifier("actor", actor, MAX_ACTOR_LENGTH)


def valid_reason(reason: object) -> str | None:
    if reason is None:
        return None
    if not isinstance(reason, str):
        raise SnapshotValidationError(f"reason must be a string, not {type(reason).__name__}")
    if len(reason) > MAX_REASON_LENGTH:
        raise SnapshotValidationError(
            f"reason is {len(reason)} characters long; at most {MAX_REASON_LENGTH}"
        )
    if any("\ud800" <= char <= "\udfff" for char in reason):
        raise SnapshotValidationError("reason contains a lone surrogate, which cannot be stored")
    if "\x00" in reason:
        raise SnapshotValidationError("reason contains NUL, which Postgres text cannot store")
    return reason


def check_batch_size(name: str, size: int) -> None:
    if not 1 <= size <= MAX_BATCH_SIZE:
        raise SnapshotValidationError(f"{name} must hold 1 to {MAX_BATCH_SIZE} items, not {size}")


def positive_seconds(
    name: str, value: object, *, least: float | None = None, most: float | None = None
) -> float:
    """`value` as a float if it is a number of seconds above 0, else `ConfigurationError`.

    `least` and `most` narrow the range where a driver would otherwise turn an
    out-of-range wait into another one without a word (SQLite rounds a busy
    timeout under a millisecond down to no wait at all). `most` also refuses
    infinity; NaN is always refused.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(f"{name} must be a positive number of seconds, not {value!r}")
    if least is not None and value < least:
        raise ConfigurationError(f"{name} must be at least {least} seconds, not {value!r}")
    if most is not None and not value <= most:
        raise ConfigurationError(f"{name} must be at most {most} seconds, not {value!r}")
    return float(value)


def check_int(name: str, value: object, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SnapshotValidationError(f"{name} must be an integer, not {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise SnapshotValidationError(f"{name} must be {bound}, not {value}")
    return value


def valid_ttl(ttl: object) -> timedelta:
    """A time to live: a non-negative timedelta (0 means expired at once, never "forever")."""
    if not isinstance(ttl, timedelta):
        raise SnapshotValidationError(f"ttl must be a timedelta, not {type(ttl).__name__}")
    if ttl < timedelta(0):
        raise SnapshotValidationError(f"ttl must not be negative, not {ttl}")
    return ttl
