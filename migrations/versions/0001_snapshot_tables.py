"""Create snapshot_latest and snapshot_history.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from snapshot_repo._mysql_ddl import BYTES, TABLE_OPTIONS, TIMESTAMP

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _snapshot_columns() -> list[sa.Column]:
    return [
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("payload", BYTES, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "snapshot_latest",
        *_snapshot_columns(),
        sa.PrimaryKeyConstraint("user_id", name="pk_snapshot_latest"),
        **TABLE_OPTIONS,  # MySQL/MariaDB only: InnoDB, utf8mb4, binary collation
    )
    op.create_table(
        "snapshot_history",
        *_snapshot_columns(),
        sa.PrimaryKeyConstraint("user_id", "version", name="pk_snapshot_history"),
        **TABLE_OPTIONS,
    )


def downgrade() -> None:
    op.drop_table("snapshot_history")
    op.drop_table("snapshot_latest")
