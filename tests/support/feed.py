"""The change feed's stored entries, read from the tables (not through `changes_since`).

Tests read the tables when `changes_since` could hold entries back: on a
shared Postgres server it returns only entries older than every transaction
still running anywhere in the cluster. Postgres keeps a write's entry on its
history row (`feed_txid`, `feed_seq`, revision 0010) and everything else in
`snapshot_changes`; SQLite keeps all of them in `snapshot_changes`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import literal_column, select, union_all
from sqlalchemy.ext.asyncio import AsyncConnection

from snapshot_repo.tables import changes_table, history_table


async def feed_entries(conn: AsyncConnection) -> list[tuple[Any, ...]]:
    """Every stored feed entry as (user_id, version, kind), in seq order."""
    changes, history = changes_table.c, history_table.c
    merged = union_all(
        select(changes.seq, changes.user_id, changes.version, changes.kind),
        select(
            history.feed_seq.label("seq"),
            history.user_id,
            history.version,
            literal_column("'write'").label("kind"),
        ).where(history.feed_seq.isnot(None)),
    ).subquery()
    query = select(merged.c.user_id, merged.c.version, merged.c.kind).order_by(merged.c.seq)
    return [tuple(row) for row in (await conn.execute(query)).all()]
