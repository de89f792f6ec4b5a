"""The count of each scope's users, kept by the database as +1/-1 rows.

`count_users` counted `snapshot_latest`'s rows of the scope: a scan whose
cost grew with the users (about 250 ms at a million on Postgres). Now a
trigger on `snapshot_latest` appends a row to `snapshot_user_counts` for
each user row inserted (+1) or deleted (-1), in the same transaction, so
every path that adds or removes a user counts (writes, batches, `load`,
erasure, reaping, purging, and SQL of the application's own). Rows are only
ever inserted, so concurrent writers never wait on each other here; an
update of an existing user fires nothing (an upsert's AFTER INSERT trigger
fires only when it inserted, on all three databases). The count is the sum
of the scope's rows, which `count_users` keeps short by folding them into
one (see `snapshot_repo._user_counts`).

The table starts with one row per scope holding its users now. On Postgres
and SQLite that happens in the migration's transaction, after the trigger
exists and while `CREATE TRIGGER`'s lock (Postgres) or the write lock
(SQLite) holds writers off: exact. MySQL commits every DDL statement, so
there the tables are locked (`LOCK TABLES ... WRITE`) from before the
triggers are made until the rows are counted.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from snapshot_repo._mysql_ddl import MYSQL, TABLE_OPTIONS

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_POSTGRES_FUNCTION = """
CREATE FUNCTION snapshot_repo_count_user() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO snapshot_user_counts (tenant, namespace, delta)
        VALUES (NEW.tenant, NEW.namespace, 1);
    ELSE
        INSERT INTO snapshot_user_counts (tenant, namespace, delta)
        VALUES (OLD.tenant, OLD.namespace, -1);
    END IF;
    RETURN NULL;
END
$$
"""

_POSTGRES_TRIGGER = """
CREATE TRIGGER snapshot_latest_counts_users
AFTER INSERT OR DELETE ON snapshot_latest
FOR EACH ROW EXECUTE FUNCTION snapshot_repo_count_user()
"""


def _row_triggers(body: str) -> list[str]:
    """SQLite's and MySQL's triggers: one per event, `body` the +1/-1 insert."""
    return [
        f"CREATE TRIGGER snapshot_latest_counts_{event.lower()} AFTER {event} "
        f"ON snapshot_latest FOR EACH ROW {body.format(row=row, delta=delta)}"
        for event, row, delta in (("INSERT", "NEW", 1), ("DELETE", "OLD", -1))
    ]


_INSERT_DELTA = (
    "INSERT INTO snapshot_user_counts (tenant, namespace, delta) "
    "VALUES ({row}.tenant, {row}.namespace, {delta})"
)

_COUNT_EXISTING = (
    "INSERT INTO snapshot_user_counts (tenant, namespace, delta) "
    "SELECT tenant, namespace, COUNT(*) FROM snapshot_latest GROUP BY tenant, namespace"
)


def upgrade() -> None:
    op.create_table(
        "snapshot_user_counts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("tenant", sa.String(255), nullable=False),
        sa.Column("namespace", sa.String(255), nullable=False),
        sa.Column("delta", sa.BigInteger(), nullable=False),
        # Set by a fold on the rows it is folding (see `_user_counts`), else NULL.
        sa.Column("fold", sa.String(32), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_snapshot_user_counts"),
        **TABLE_OPTIONS,  # MySQL/MariaDB only: InnoDB, utf8mb4, binary collation
    )
    # With the id: a scope's rows in id order, for folds that take the oldest first.
    op.create_index(
        "ix_snapshot_user_counts_scope", "snapshot_user_counts", ["tenant", "namespace", "id"]
    )
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(_POSTGRES_FUNCTION)
        op.execute(_POSTGRES_TRIGGER)
        op.execute(_COUNT_EXISTING)
    elif dialect in MYSQL:
        op.execute("LOCK TABLES snapshot_latest WRITE, snapshot_user_counts WRITE")
        try:
            for trigger in _row_triggers(_INSERT_DELTA):
                op.execute(trigger)
            op.execute(_COUNT_EXISTING)
        finally:
            op.execute("UNLOCK TABLES")
    else:
        for trigger in _row_triggers(f"BEGIN {_INSERT_DELTA}; END"):
            op.execute(trigger)
        op.execute(_COUNT_EXISTING)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER snapshot_latest_counts_users ON snapshot_latest")
        op.execute("DROP FUNCTION snapshot_repo_count_user()")
    else:
        for event in ("insert", "delete"):
            op.execute(f"DROP TRIGGER snapshot_latest_counts_{event}")
    op.drop_index("ix_snapshot_user_counts_scope", table_name="snapshot_user_counts")
    op.drop_table("snapshot_user_counts")
