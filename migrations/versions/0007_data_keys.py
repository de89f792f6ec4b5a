"""Add per-user data keys for crypto-shredding.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from snapshot_repo._mysql_ddl import BYTES, TABLE_OPTIONS, TIMESTAMP

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "snapshot_data_keys",
        sa.Column("tenant", sa.String(255), nullable=False),
        sa.Column("namespace", sa.String(255), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("key_id", sa.String(255), nullable=False),
        sa.Column("wrapped_key", BYTES, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "namespace", "user_id", name="pk_snapshot_data_keys"),
        **TABLE_OPTIONS,  # MySQL/MariaDB only: InnoDB, utf8mb4, binary collation
    )


def downgrade() -> None:
    op.drop_table("snapshot_data_keys")
