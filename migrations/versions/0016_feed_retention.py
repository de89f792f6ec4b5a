"""Change-feed retention: registered consumers and each scope's trim horizon.

`snapshot_feed_consumers` holds where each consumer that said so
(`acknowledge_changes`) has read a scope's feed to; trimming never removes
an entry after it. `snapshot_feed_horizons` holds how far each scope's feed
was trimmed, so a cursor before it fails (`CursorExpiredError`) instead of
silently skipping the trimmed entries. Both are plain tables on every
database (InnoDB, utf8mb4 and a binary collation on MySQL/MariaDB, as the
others); no existing row changes.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from snapshot_repo._mysql_ddl import TABLE_OPTIONS, TIMESTAMP

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "snapshot_feed_consumers",
        sa.Column("tenant", sa.String(255), nullable=False),
        sa.Column("namespace", sa.String(255), nullable=False),
        sa.Column("consumer", sa.String(255), nullable=False),
        sa.Column("acked_txid", sa.BigInteger(), nullable=False),
        sa.Column("acked_seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant", "namespace", "consumer", name="pk_snapshot_feed_consumers"
        ),
        **TABLE_OPTIONS,  # MySQL/MariaDB only: InnoDB, utf8mb4, binary collation
    )
    op.create_table(
        "snapshot_feed_horizons",
        sa.Column("tenant", sa.String(255), nullable=False),
        sa.Column("namespace", sa.String(255), nullable=False),
        sa.Column("txid", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("trimmed_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "namespace", name="pk_snapshot_feed_horizons"),
        **TABLE_OPTIONS,
    )


def downgrade() -> None:
    op.drop_table("snapshot_feed_horizons")
    op.drop_table("snapshot_feed_consumers")
