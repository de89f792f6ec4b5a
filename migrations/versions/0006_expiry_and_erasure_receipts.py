"""Add snapshot expiry (TTL) and erasure receipts.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from snapshot_repo._mysql_ddl import TABLE_OPTIONS, TIMESTAMP

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("snapshot_latest", sa.Column("expires_at", TIMESTAMP, nullable=True))
    op.create_index("ix_snapshot_latest_expires_at", "snapshot_latest", ["expires_at"])
    op.create_table(
        "snapshot_erasure_receipts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(255), nullable=False),
        sa.Column("namespace", sa.String(255), nullable=False),
        sa.Column("erased_at", TIMESTAMP, nullable=False),
        sa.Column("versions_erased", sa.BigInteger(), nullable=False),
        sa.Column("cause", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_snapshot_erasure_receipts"),
        **TABLE_OPTIONS,  # MySQL/MariaDB only: InnoDB, utf8mb4, binary collation
    )
    op.create_index(
        "ix_snapshot_erasure_receipts_subject",
        "snapshot_erasure_receipts",
        ["subject", "tenant", "namespace"],
    )


def downgrade() -> None:
    op.drop_table("snapshot_erasure_receipts")
    op.drop_index("ix_snapshot_latest_expires_at", table_name="snapshot_latest")
    with op.batch_alter_table("snapshot_latest") as batch:
        batch.drop_column("expires_at")
