"""Rows written and read by hand: what the raw sides and the peer share.

The library stores a snapshot as the model's JSON bytes and, on SQLite, its
time as naive UTC text (on MariaDB a naive UTC `DATETIME(6)`); hand-written
code has to do the same to store rows the library reads back (and the parity
check makes sure it does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .state import BenchState

__all__ = [
    "BASELINE_COLUMNS",
    "RawSnapshot",
    "decode_row",
    "naive_utc",
    "require_distinct",
    "sqlite_time",
]

BASELINE_COLUMNS = ("user_id", "version", "schema_version", "payload", "created_at")
"""The columns the raw sides and the peer write and read; later columns keep their defaults."""


@dataclass(frozen=True, slots=True)
class RawSnapshot:
    """A row decoded by a raw baseline: what hand-written code would hand its caller."""

    user_id: str
    version: int
    schema_version: int
    state: BenchState
    created_at: datetime


def sqlite_time(moment: datetime) -> str:
    """`moment` as the library stores it on SQLite: naive UTC text with microseconds."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def naive_utc(moment: datetime) -> datetime:
    """`moment` as the library stores it on MariaDB: a naive UTC datetime."""
    return moment.astimezone(UTC).replace(tzinfo=None)


def decode_row(row: Sequence[Any]) -> RawSnapshot:
    """A raw row (asyncpg `Record`, sqlite3 or MariaDB driver tuple) as a decoded snapshot."""
    created_at = row[4]
    if isinstance(created_at, str):  # SQLite: naive UTC text
        created_at = datetime.fromisoformat(created_at).replace(tzinfo=UTC)
    elif created_at.tzinfo is None:  # MariaDB: a naive UTC DATETIME
        created_at = created_at.replace(tzinfo=UTC)
    return RawSnapshot(
        user_id=row[0],
        version=row[1],
        schema_version=row[2],
        state=BenchState.model_validate_json(row[3]),
        created_at=created_at,
    )


def require_distinct(user_ids: Sequence[str]) -> None:
    """Refuse a batch naming a user twice, as a hand-written bulk write must.

    One statement cannot bump a row twice: Postgres refuses, SQLite would
    leave a gap in the versions.

    Raises:
        ValueError: a user id appears more than once.
    """
    if len(set(user_ids)) != len(user_ids):
        raise ValueError("a bulk write needs distinct user ids")
