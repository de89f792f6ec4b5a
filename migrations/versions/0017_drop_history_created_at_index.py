"""Drop `ix_snapshot_history_created_at`: it cost every write more than it saved any read.

The index was (tenant, namespace, user_id, created_at): the primary key's
three leading columns again, so each write added an entry at a random place
in a second wide index. Measured on Postgres with 1,000,000 users x 10
versions (benchmarks/README.md, "Scale"): it held 70 bytes a history row
(15% of the table) and dropping it cut a write's p50 by about a quarter.
Only `get_as_of` read it; that query now walks the user's versions down the
primary key. Pruning never used it. Same on every database.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEX = "ix_snapshot_history_created_at"


def upgrade() -> None:
    op.drop_index(_INDEX, table_name="snapshot_history")


def downgrade() -> None:
    op.create_index(_INDEX, "snapshot_history", ["tenant", "namespace", "user_id", "created_at"])
