"""The schema: the only `MetaData` Alembic compares the database against.

The snapshot tables share their columns (`snapshot_history` adds a feed
position, `snapshot_latest` an expiry); with them:

- `snapshot_latest`: one row per user and scope, the newest version
  (primary key `(tenant, namespace, user_id)`).
- `snapshot_history`: one row per user, scope and version (primary key
  `(tenant, namespace, user_id, version)`), which is also the index that
  makes "the newest N versions of a user" a backward range scan costing
  O(N) at any depth. A unique index on the key plus `idempotency_key` makes
  keyed writes idempotent.
- `snapshot_changes`: the ordered feed of committed writes and erasures
  (on Postgres, from revision 0010, a write's entry is carried by its history
  row instead; see the table).
- `snapshot_erasure_receipts`: proof of each erasure, keyed by an HMAC of the user id.
- `snapshot_data_keys`: per-user data keys for crypto-shredding, stored wrapped.
- `snapshot_feed_consumers` and `snapshot_feed_horizons` (revision 0016): where
  each registered feed consumer has read to, and how far each scope's feed
  has been trimmed (see `feed_retention`).
- `snapshot_user_counts` (revision 0018): +1/-1 rows that triggers on
  `snapshot_latest` append as users are added and removed; a scope's users
  are the sum of its rows (see `_user_counts`).

Later capabilities (tenant, namespace, expiry, write metadata) add columns in
new Alembic revisions; nothing here is created outside migrations.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.types import TypeEngine

from ._mysql_ddl import BYTES, MYSQL
from ._mysql_ddl import TABLE_OPTIONS as MYSQL_TABLE_OPTIONS
from .snapshot import (
    MAX_ACTOR_LENGTH,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    MAX_SCOPE_LENGTH,
    MAX_USER_ID_LENGTH,
)

__all__ = [
    "UTCDateTime",
    "changes_table",
    "data_keys_table",
    "erasure_receipts_table",
    "feed_consumers_table",
    "feed_horizons_table",
    "history_table",
    "latest_table",
    "metadata",
    "user_counts_table",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


_NAIVE = ("sqlite", *MYSQL)
"""Databases whose timestamp type has no time zone: UTC is stored as a naive value."""


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    Postgres stores `timestamptz`; SQLite has no time zones, so the value is
    stored as UTC text and the zone is put back when it is read; MySQL and
    MariaDB store it as UTC in a `DATETIME(6)` (microseconds kept).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        # MySQL's DATETIME drops the microseconds unless asked to keep them.
        if dialect.name in MYSQL:
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(self.impl)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("UTCDateTime needs a timezone-aware datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name in _NAIVE else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        if dialect.name not in _NAIVE:
            return super().bind_processor(dialect)

        def to_text(value: datetime | None) -> str | None:
            # SQLAlchemy's SQLite DATETIME format, written by the C isoformat rather
            # than SQLAlchemy's Python formatting: on every read (the expiry bound)
            # and write. Same text, so stored values compare as before.
            if value is None:
                return None
            if value.tzinfo is None:
                raise ValueError("UTCDateTime needs a timezone-aware datetime")
            if value.tzinfo is not UTC:  # the library's own `now` is UTC already
                value = value.astimezone(UTC)
            return value.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")

        return to_text

    def result_processor(self, dialect: Dialect, coltype: Any) -> Callable[[Any], Any] | None:
        if dialect.name != "sqlite":
            if self.load_dialect_impl(dialect).result_processor(dialect, coltype) is not None:
                return super().result_processor(dialect, coltype)
            # The driver's own datetime (asyncpg, asyncmy), converted by one plain call
            # rather than through TypeDecorator's wrapper: every row read carries one.
            return _naive_as_utc if dialect.name in _NAIVE else _aware_as_utc

        def from_text(value: str | None) -> datetime | None:
            # C `fromisoformat` instead of SQLAlchemy's regular expression: ten
            # history rows carry ten timestamps.
            return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)

        return from_text


def _naive_as_utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.replace(tzinfo=UTC)


def _aware_as_utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is UTC:
        return value
    return value.astimezone(UTC)


def _snapshot_columns() -> list[Column[Any]]:
    return [
        # Every key starts with the scope: a tenant ("" for none) and a namespace
        # (one per state type), so one user can hold several typed states and no
        # query of one tenant can reach another's rows.
        Column("tenant", String(MAX_SCOPE_LENGTH), nullable=False, server_default=""),
        Column("namespace", String(MAX_SCOPE_LENGTH), nullable=False, server_default="default"),
        Column("user_id", String(MAX_USER_ID_LENGTH), nullable=False),
        Column("version", BigInteger, nullable=False),
        Column("schema_version", Integer, nullable=False),
        Column("payload", BYTES, nullable=False),
        Column("created_at", UTCDateTime, nullable=False),
        # The caller's id for the action that wrote this version (seed 004's action id):
        # retrying a write with the same key finds its history row instead of writing again.
        Column("idempotency_key", String(MAX_IDEMPOTENCY_KEY_LENGTH), nullable=True),
        # Who or what caused the write, why, and free JSON metadata (seed 004's
        # transition records).
        Column("actor", String(MAX_ACTOR_LENGTH), nullable=True),
        Column("reason", Text, nullable=True),
        Column("metadata", BYTES, nullable=True),
    ]


def _only_where_set(column: str) -> dict[str, Any]:
    """Dialect options that make an index partial: only rows where `column` is not NULL."""
    predicate = text(f"{column} IS NOT NULL")
    return {"postgresql_where": predicate, "sqlite_where": predicate}


latest_table = Table(
    "snapshot_latest",
    metadata,
    *_snapshot_columns(),
    # When the snapshot expires (seed 004's TTL): it then reads as absent until
    # `reap_expired` erases it. NULL: never. Only the latest row expires.
    Column("expires_at", UTCDateTime, nullable=True),
    PrimaryKeyConstraint("tenant", "namespace", "user_id"),
    # Partial (revision 0008): most rows never expire, and a NULL entry would
    # cost every write an index insert for nothing.
    Index("ix_snapshot_latest_expires_at", "expires_at", **_only_where_set("expires_at")),
    **MYSQL_TABLE_OPTIONS,
    # Postgres keeps half of each page free (revision 0009, fillfactor 50): every
    # write rewrites its user's row, and with room on the page it does so in
    # place (a HOT update) without new index entries. Not declared here with
    # `postgresql_with`, which SQLAlchemy 2.0 does not accept; Alembic does not
    # compare storage parameters either way.
)

history_table = Table(
    "snapshot_history",
    metadata,
    *_snapshot_columns(),
    # Postgres (revision 0010): the version's place in the change feed, so that a
    # write's feed entry is its history row rather than a row of its own in
    # `snapshot_changes` (see that table). The writing transaction's id and a
    # number from the feed's sequence, as `txid` and `seq` there. NULL on SQLite,
    # for rows written before 0010, and for rows a `load` restored.
    Column("feed_txid", BigInteger, nullable=True),
    Column("feed_seq", BigInteger, nullable=True),
    PrimaryKeyConstraint("tenant", "namespace", "user_id", "version"),
    Index(
        "ux_snapshot_history_idempotency_key",
        "tenant",
        "namespace",
        "user_id",
        "idempotency_key",
        unique=True,
        **_only_where_set("idempotency_key"),  # partial, as above (revision 0008)
    ),
    **MYSQL_TABLE_OPTIONS,
)

# For changes_since on Postgres: the feed entries history rows carry, in feed order.
Index(
    "ix_snapshot_history_feed",
    history_table.c.tenant,
    history_table.c.namespace,
    history_table.c.feed_txid,
    history_table.c.feed_seq,
    **_only_where_set("feed_seq"),
)

# No index on created_at (dropped by revision 0017): `get_as_of` walks the user's
# versions down the primary key, and pruning goes user by user; the index cost every
# write a random leaf page and 70 bytes a history row (see benchmarks/README.md).

changes_table = Table(
    "snapshot_changes",
    metadata,
    # The global, ordered change feed (seed 004's transitions): one row per
    # committed write or erasure, never a payload. On Postgres, from revision
    # 0010, a write's entry is carried by its history row (`feed_txid`,
    # `feed_seq`) and this table holds erasures, writes from before 0010, and
    # the entries of versions that retention pruned (moved here, same txid and
    # seq): one heap row and three index entries fewer per write. Readers merge
    # both in (txid, seq) order.
    Column(
        "seq",
        BigInteger().with_variant(Integer, "sqlite"),  # SQLite: an alias of the rowid
        primary_key=True,
        autoincrement=True,
    ),
    # Postgres: the writing transaction's id. Readers only return rows of
    # transactions older than every transaction still running, ordered by
    # (txid, seq), so a row that commits late can never fall behind a cursor.
    # SQLite serializes writers, so seq alone is commit order there (NULL).
    Column("txid", BigInteger, nullable=True),
    Column("tenant", String(MAX_SCOPE_LENGTH), nullable=False),
    Column("namespace", String(MAX_SCOPE_LENGTH), nullable=False),
    Column("user_id", String(MAX_USER_ID_LENGTH), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("actor", String(MAX_ACTOR_LENGTH), nullable=True),
    Column("reason", Text, nullable=True),
    Column("metadata", BYTES, nullable=True),
    Index("ix_snapshot_changes_feed", "tenant", "namespace", "txid", "seq"),
    Index("ix_snapshot_changes_user", "tenant", "namespace", "user_id"),
    # AUTOINCREMENT: never reuse a seq after the newest row is deleted (by an
    # erasure), which a consumer's cursor could already have passed.
    sqlite_autoincrement=True,
    **MYSQL_TABLE_OPTIONS,
)

erasure_receipts_table = Table(
    "snapshot_erasure_receipts",
    metadata,
    # Proof that a person's data was erased, without keeping the person: the
    # subject is an HMAC of the user id under a key only the application holds.
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("subject", String(64), nullable=False),
    Column("tenant", String(MAX_SCOPE_LENGTH), nullable=False),
    Column("namespace", String(MAX_SCOPE_LENGTH), nullable=False),
    Column("erased_at", UTCDateTime, nullable=False),
    Column("versions_erased", BigInteger, nullable=False),
    Column("cause", String(16), nullable=False),
    Index("ix_snapshot_erasure_receipts_subject", "subject", "tenant", "namespace"),
    **MYSQL_TABLE_OPTIONS,
)

data_keys_table = Table(
    "snapshot_data_keys",
    metadata,
    # Crypto-shredding: each user's data key, wrapped by a key-encryption key
    # (`key_id` names which). Erasing the user deletes this row.
    Column("tenant", String(MAX_SCOPE_LENGTH), nullable=False),
    Column("namespace", String(MAX_SCOPE_LENGTH), nullable=False),
    Column("user_id", String(MAX_USER_ID_LENGTH), nullable=False),
    Column("key_id", String(255), nullable=False),
    Column("wrapped_key", BYTES, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("tenant", "namespace", "user_id"),
    **MYSQL_TABLE_OPTIONS,
)

feed_consumers_table = Table(
    "snapshot_feed_consumers",
    metadata,
    # A consumer of a scope's change feed that said where it is
    # (`acknowledge_changes`): trimming keeps every entry after its position.
    Column("tenant", String(MAX_SCOPE_LENGTH), nullable=False),
    Column("namespace", String(MAX_SCOPE_LENGTH), nullable=False),
    Column("consumer", String(MAX_SCOPE_LENGTH), nullable=False),
    # The feed position of the last entry it acknowledged, as in its cursor
    # (`txid` 0 outside Postgres). Never moves back.
    Column("acked_txid", BigInteger, nullable=False),
    Column("acked_seq", BigInteger, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("tenant", "namespace", "consumer"),
    **MYSQL_TABLE_OPTIONS,
)

feed_horizons_table = Table(
    "snapshot_feed_horizons",
    metadata,
    # How far a scope's feed was trimmed: every entry at or before this position
    # is gone, so a cursor before it raises `CursorExpiredError` instead of
    # silently skipping what was trimmed. One row per scope, made by the first
    # trim or acknowledgement; its lock orders the two (see `feed_retention`).
    Column("tenant", String(MAX_SCOPE_LENGTH), nullable=False),
    Column("namespace", String(MAX_SCOPE_LENGTH), nullable=False),
    Column("txid", BigInteger, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("trimmed_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("tenant", "namespace"),
    **MYSQL_TABLE_OPTIONS,
)

user_counts_table = Table(
    "snapshot_user_counts",
    metadata,
    # Not written by the library: revision 0018's triggers on `snapshot_latest` append
    # +1 for each user row inserted and -1 for each deleted, in that transaction. A
    # scope's user count is the sum of its rows; `_user_counts` folds them into one.
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("tenant", String(MAX_SCOPE_LENGTH), nullable=False),
    Column("namespace", String(MAX_SCOPE_LENGTH), nullable=False),
    Column("delta", BigInteger, nullable=False),
    # The token of the fold that is replacing this row by a sum, else NULL.
    Column("fold", String(32), nullable=True),
    # With the id: a scope's rows oldest first, for folds that take a chunk at a time.
    Index("ix_snapshot_user_counts_scope", "tenant", "namespace", "id"),
    **MYSQL_TABLE_OPTIONS,
)
