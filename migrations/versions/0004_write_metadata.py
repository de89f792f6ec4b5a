"""Record who or what caused each write, why, and free JSON metadata.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from snapshot_repo._mysql_ddl import BYTES

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("snapshot_latest", "snapshot_history")


def upgrade() -> None:
    for table in _TABLES:
        op.add_column(table, sa.Column("actor", sa.String(255), nullable=True))
        op.add_column(table, sa.Column("reason", sa.Text(), nullable=True))
        op.add_column(table, sa.Column("metadata", BYTES, nullable=True))


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("metadata")
            batch.drop_column("reason")
            batch.drop_column("actor")
