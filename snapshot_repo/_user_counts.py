"""How many users a scope has, read from the +1/-1 rows the database keeps for it.

Revision 0018's triggers on `snapshot_latest` append a row to
`snapshot_user_counts` in the transaction that inserts (+1) or deletes (-1)
a user's latest row, so the count is exact for every path that changes the
users, including SQL the library does not run. Appending never waits on
another writer; the price is that the rows pile up, one per user added or
removed, so a count reads the rows added since the scope was last folded.

A fold replaces a scope's rows by one holding their sum, the oldest
`FOLD_CHUNK` at a time, each chunk one transaction (the backend's
`fold_statements`, see `backends.count_sql`) that sums and deletes exactly
the same rows, whatever commits meanwhile: a row appended later is not in
it, and a concurrent fold waits for the rows the first one locked, then
finds them gone (Postgres and InnoDB skip a row deleted while they waited)
and does not see the first one's sum (its statement began before that
committed; InnoDB's locking read does see it, and folds it again, which is
as exact). `count_users` folds when
it read more than `FOLD_AFTER` rows, and `reap_expired` after reaping;
`load` recounts every scope into one row each instead
(`backends.count_sql.recount_statements`).

Users whose snapshot expired but was not reaped yet are counted by the
triggers (their rows exist) and subtracted at read time, from the index on
`expires_at`: the count then costs what that backlog is, which
`reap_expired` keeps short.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from uuid import uuid4

from ._context import RepositoryContext, logger
from .backends import Backend, Scope
from .backends.count_sql import chunk_end_statement
from .errors import SnapshotRepoError

__all__ = ["FOLD_AFTER", "FOLD_CHUNK", "fold_chunk", "fold_logging_failure", "read_count"]

FOLD_AFTER = 1000
"""A count that reads more of the scope's rows than this folds them (about 0.1 ms to
read on each database)."""

FOLD_CHUNK = 10_000
"""The most rows one fold transaction takes (oldest first): a scope that gained a million
users through `upsert_many` is folded in a hundred short transactions, each well within
any operation timeout, rather than one that might never fit (a million rows: 1.7 s on
Postgres here, 12 s on MariaDB)."""

_NO_BOUND = 2**62
"""The upper id bound of a last chunk: above any id a row can get."""


def read_count(row: Sequence[Any]) -> tuple[int, int]:
    """(users, rows read) from the row of `_queries.count_users_statement`."""
    total, rows, expired = row
    return int(total) - int(expired), int(rows)


async def fold_chunk(backend: Backend, scope: Scope, after: int = 0) -> int | None:
    """Fold the scope's `FOLD_CHUNK` rows after id `after` (all, if fewer) into one, in
    one transaction (see the module); the id to fold after next, or None when done.

    The chunks walk up the ids, so none steps over the rows the earlier ones deleted
    (on Postgres, dead index entries until VACUUM); each chunk's sum row gets a new,
    higher id, and the last chunk, which has no upper bound, folds them all together.
    """
    key = {"tenant": scope.tenant, "namespace": scope.namespace, "after": after}
    chunk_end = await backend.fetch(chunk_end_statement(FOLD_CHUNK), key)
    upto = int(chunk_end[0][0]) if chunk_end else _NO_BOUND
    params: Mapping[str, Any] = {**key, "upto": upto, "fold": uuid4().hex}
    work = [(statement, params) for statement in backend.fold_statements]
    await backend.execute_in_transaction(work)
    return upto if chunk_end else None


async def fold_logging_failure(
    context: RepositoryContext[Any], tenants: Iterable[str] = ()
) -> None:
    """Fold the context's scope (and the same namespace in `tenants`), after a call whose
    result stands without it: a failure is logged, not raised, and the rows stay to be
    folded next time (a count is exact either way)."""
    scopes = {context.scope, *(Scope(tenant, context.scope.namespace) for tenant in tenants)}
    for scope in sorted(scopes, key=lambda scope: scope.tenant):
        after: int | None = 0
        while after is not None:  # each chunk within the operation timeout of its own
            try:
                async with context.guard("fold_user_counts", None):
                    after = await fold_chunk(context.backend, scope, after)
            except SnapshotRepoError as exc:
                logger.warning("snapshot_repo could not fold the user count: %s", exc)
                break
