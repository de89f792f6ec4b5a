"""Postgres: a write's change-feed entry is its history row, not a row of its own.

Every write added a `snapshot_changes` row: a heap tuple, a sequence number
and three index entries, about 50 of a write's 190 microseconds of server
time and 4 of a 500-snapshot `upsert_many`'s 19 milliseconds (`EXPLAIN
ANALYZE`). From this revision the history row carries the entry instead
(`feed_txid`, `feed_seq`: the same transaction id and sequence number the
feed row held), indexed only where set; `snapshot_changes` keeps erasures,
the entries written before this revision, and the entries of versions that
retention prunes (moved there with their txid and seq). Feed readers merge
the two in (txid, seq) order, so cursors issued before the upgrade stay valid.

SQLite writes its feed rows as before: the columns stay NULL there.

Downgrading moves the history-carried entries back into `snapshot_changes`
first, so the feed loses nothing either way.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEX = "ix_snapshot_history_feed"
_FEED_COLUMNS = "tenant, namespace, user_id, version, created_at, actor, reason, metadata"


def upgrade() -> None:
    # Nullable columns without a default: no table rewrite on either database.
    op.add_column("snapshot_history", sa.Column("feed_txid", sa.BigInteger(), nullable=True))
    op.add_column("snapshot_history", sa.Column("feed_seq", sa.BigInteger(), nullable=True))
    predicate = sa.text("feed_seq IS NOT NULL")
    op.create_index(
        _INDEX,
        "snapshot_history",
        ["tenant", "namespace", "feed_txid", "feed_seq"],
        postgresql_where=predicate,
        sqlite_where=predicate,
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"INSERT INTO snapshot_changes (seq, txid, kind, {_FEED_COLUMNS}) "
            f"SELECT feed_seq, feed_txid, 'write', {_FEED_COLUMNS} "
            "FROM snapshot_history WHERE feed_seq IS NOT NULL"
        )
    op.drop_index(_INDEX, table_name="snapshot_history")
    with op.batch_alter_table("snapshot_history") as table:
        table.drop_column("feed_seq")
        table.drop_column("feed_txid")
