"""MySQL/MariaDB: the feed gate, one row whose lock orders feed entries against readers.

An AUTO_INCREMENT `seq` is taken when a feed entry is inserted, not when it
commits, and MySQL has no `pg_snapshot_xmin` to tell a reader which entries
can still appear below the newest it sees. Writers share-lock this row
before they take a seq and hold the lock until they commit; a feed reader
locks it exclusively while it reads a page (see
`snapshot_repo.backends.mysql_sql.gate_shared_statement`). Nothing to do on
SQLite (writers are serialized) or Postgres (the feed orders by transaction id).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from snapshot_repo._mysql_ddl import MYSQL, TABLE_OPTIONS

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name in MYSQL:
        gate = op.create_table(
            "snapshot_feed_gate",
            sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
            sa.PrimaryKeyConstraint("id", name="pk_snapshot_feed_gate"),
            **TABLE_OPTIONS,
        )
        assert gate is not None
        op.bulk_insert(gate, [{"id": 1}])


def downgrade() -> None:
    if op.get_bind().dialect.name in MYSQL:
        op.drop_table("snapshot_feed_gate")
