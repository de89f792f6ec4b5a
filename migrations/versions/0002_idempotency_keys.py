"""Record each write's idempotency key, unique per user in snapshot_history.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable column is added in place on both backends; existing rows get NULL,
    # and NULLs are distinct in the unique index, so history without keys is unaffected.
    for table in ("snapshot_latest", "snapshot_history"):
        op.add_column(table, sa.Column("idempotency_key", sa.String(255), nullable=True))
    op.create_index(
        "ux_snapshot_history_idempotency_key",
        "snapshot_history",
        ["user_id", "idempotency_key"],
        unique=True,
    )


def downgrade() -> None:
    op.drop_index("ux_snapshot_history_idempotency_key", table_name="snapshot_history")
    for table in ("snapshot_history", "snapshot_latest"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("idempotency_key")
