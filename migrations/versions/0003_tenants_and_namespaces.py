"""Scope every key by tenant and namespace.

Existing rows move to tenant "" (none) and namespace "default", which is
where a repository without a tenant or namespace reads and writes, so they
stay visible exactly as before.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = {
    "snapshot_latest": ["user_id"],
    "snapshot_history": ["user_id", "version"],
}
_KEY_INDEX = "ux_snapshot_history_idempotency_key"


def upgrade() -> None:
    op.drop_index(_KEY_INDEX, table_name="snapshot_history")
    for table, key in _TABLES.items():
        # recreate="auto": SQLite copies the table (it cannot change a primary key
        # in place); Postgres alters it in place.
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("tenant", sa.String(255), nullable=False, server_default=""))
            batch.add_column(
                sa.Column("namespace", sa.String(255), nullable=False, server_default="default")
            )
            batch.drop_constraint(f"pk_{table}", type_="primary")
            batch.create_primary_key(f"pk_{table}", ["tenant", "namespace", *key])
    op.create_index(
        _KEY_INDEX,
        "snapshot_history",
        ["tenant", "namespace", "user_id", "idempotency_key"],
        unique=True,
    )


def refuse_downgrade(bind: sa.Connection) -> None:
    """Refuse to merge scopes silently: raise if any row is outside the default scope.

    Run by `downgrade` itself, and by `snapshot_repo.migrate.downgrade` before
    any revision is downgraded where DDL commits at once (MySQL), so that a
    refusal leaves the schema as it was rather than half downgraded.
    """
    for table in _TABLES:
        outside = bind.execute(
            sa.text(f"SELECT count(*) FROM {table} WHERE tenant <> '' OR namespace <> 'default'")
        ).scalar()
        if outside:
            raise RuntimeError(
                f"{table} has {outside} rows outside the default tenant and namespace; "
                "downgrading would merge or lose them. Erase or export them first."
            )


def downgrade() -> None:
    """Refuses to merge scopes silently: fails if any row is outside the default scope."""
    refuse_downgrade(op.get_bind())
    op.drop_index(_KEY_INDEX, table_name="snapshot_history")
    for table, key in _TABLES.items():
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"pk_{table}", type_="primary")
            batch.create_primary_key(f"pk_{table}", key)
            batch.drop_column("namespace")
            batch.drop_column("tenant")
    op.create_index(_KEY_INDEX, "snapshot_history", ["user_id", "idempotency_key"], unique=True)
