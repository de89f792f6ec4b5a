"""Index idempotency keys and expiries only where they are set.

Most writes carry neither an idempotency key nor an expiry, yet every write
added a NULL entry to both indexes: on Postgres that was a quarter of a bulk
write's server time. Partial indexes keep the same lookups (`= key`,
`<= now` imply NOT NULL, so both planners still use them) and skip the NULLs.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_IDEMPOTENCY = ("ux_snapshot_history_idempotency_key", "snapshot_history")
_EXPIRY = ("ix_snapshot_latest_expires_at", "snapshot_latest")
_IDEMPOTENCY_COLUMNS = ["tenant", "namespace", "user_id", "idempotency_key"]


def _where(column: str) -> dict[str, sa.TextClause]:
    predicate = sa.text(f"{column} IS NOT NULL")
    return {"postgresql_where": predicate, "sqlite_where": predicate}


def upgrade() -> None:
    op.drop_index(_IDEMPOTENCY[0], table_name=_IDEMPOTENCY[1])
    op.create_index(*_IDEMPOTENCY, _IDEMPOTENCY_COLUMNS, unique=True, **_where("idempotency_key"))
    op.drop_index(_EXPIRY[0], table_name=_EXPIRY[1])
    op.create_index(*_EXPIRY, ["expires_at"], **_where("expires_at"))


def downgrade() -> None:
    op.drop_index(_EXPIRY[0], table_name=_EXPIRY[1])
    op.create_index(*_EXPIRY, ["expires_at"])
    op.drop_index(_IDEMPOTENCY[0], table_name=_IDEMPOTENCY[1])
    op.create_index(*_IDEMPOTENCY, _IDEMPOTENCY_COLUMNS, unique=True)
