"""Add the change feed and an index for reading history as of a moment.

Existing history is not back-filled into the feed: the feed starts at the
upgrade, and consumers catch up on older state with `get_history`.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from snapshot_repo._mysql_ddl import BYTES, TABLE_OPTIONS, TIMESTAMP

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_snapshot_history_created_at",
        "snapshot_history",
        ["tenant", "namespace", "user_id", "created_at"],
    )
    op.create_table(
        "snapshot_changes",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("txid", sa.BigInteger(), nullable=True),
        sa.Column("tenant", sa.String(255), nullable=False),
        sa.Column("namespace", sa.String(255), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("actor", sa.String(255), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("metadata", BYTES, nullable=True),
        sa.PrimaryKeyConstraint("seq", name="pk_snapshot_changes"),
        sqlite_autoincrement=True,  # never reuse the seq of a deleted newest row
        **TABLE_OPTIONS,  # MySQL/MariaDB only: InnoDB, utf8mb4, binary collation
    )
    op.create_index(
        "ix_snapshot_changes_feed", "snapshot_changes", ["tenant", "namespace", "txid", "seq"]
    )
    op.create_index(
        "ix_snapshot_changes_user", "snapshot_changes", ["tenant", "namespace", "user_id"]
    )


def downgrade() -> None:
    op.drop_table("snapshot_changes")
    op.drop_index("ix_snapshot_history_created_at", table_name="snapshot_history")
