"""Column types and table options for MySQL and MariaDB, shared by the tables and migrations.

Each is what SQLAlchemy's generic type becomes everywhere else, and only
differs where MySQL's default would lose data or change meaning. The
migrations import them too (a revision must not change once released, so
these definitions only ever gain, never change: a MySQL database migrated
with them must keep matching `tables`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import DateTime, LargeBinary
from sqlalchemy.dialects import mysql

__all__ = [
    "BYTES",
    "IDEMPOTENCY_LOOKUP_INDEX",
    "MYSQL",
    "MYSQL_ONLY_INDEXES",
    "TABLE_OPTIONS",
    "TIMESTAMP",
]

MYSQL = ("mysql", "mariadb")
"""SQLAlchemy's names for the family: variants and table options are given for both."""

BYTES = LargeBinary().with_variant(mysql.LONGBLOB(), *MYSQL)
"""Payloads, metadata and keys: MySQL's BLOB holds only 64 KiB, LONGBLOB up to 4 GiB."""

TIMESTAMP = DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), *MYSQL)
"""A moment: MySQL's DATETIME drops microseconds unless asked to keep six digits."""

_COLLATIONS = {"mysql": "utf8mb4_0900_bin", "mariadb": "utf8mb4_nopad_bin"}

TABLE_OPTIONS: dict[str, Any] = {
    f"{prefix}_{option}": value
    for prefix in MYSQL
    for option, value in (
        ("engine", "InnoDB"),
        ("charset", "utf8mb4"),
        ("collate", _COLLATIONS[prefix]),
    )
}
"""InnoDB (row locks, transactions) and a binary NO PAD collation, so user ids, scopes and
keys compare byte for byte as on SQLite and Postgres: "Ann" is not "ann", and "a" is not
"a " (MariaDB's `utf8mb4_bin` pads with spaces, so it would take them for one user)."""

IDEMPOTENCY_LOOKUP_INDEX = "ix_snapshot_history_idempotency_lookup"
"""Revision 0015: finds a keyed write on MySQL, whose unique index is a hash it cannot search."""

MYSQL_ONLY_INDEXES = frozenset({IDEMPOTENCY_LOOKUP_INDEX})
"""Indexes the migrations make on MySQL alone (not in `tables`: `check` ignores them)."""
