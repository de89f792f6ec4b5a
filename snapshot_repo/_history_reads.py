"""History queries users ask every peer for: one version, as of a moment, diffs, listing.

Each is one indexed statement (see `_queries`); the repository's methods of
the same names document them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic_core import from_json

from ._checks import MAX_VERSION, check_int, valid_user_id
from ._context import RepositoryContext
from ._queries import (
    as_of_statement,
    count_users_statement,
    exists_statement,
    history_before_statement,
    history_within_bytes_statement,
    list_users_statement,
    version_row_statement,
    versions_statement,
)
from .backends import Row
from .errors import SnapshotValidationError
from .patch import JsonPatchOperation, make_json_patch
from .snapshot import Snapshot, StateT

__all__ = [
    "MAX_LIST_LIMIT",
    "count_users",
    "diff",
    "exists",
    "get_as_of",
    "get_version",
    "history_page",
    "list_users",
]

MAX_LIST_LIMIT = 10_000


async def history_page(
    context: RepositoryContext[Any],
    user_id: str,
    limit: int,
    before_version: int | None,
    max_bytes: int | None,
) -> list[Row]:
    """A page of `get_history` (arguments checked): below `before_version` (None: from
    the newest), cut by the byte budget `max_bytes` in the database (None: no budget)."""
    params: dict[str, Any] = {
        **context.scope.key(user_id),
        "before_version": MAX_VERSION if before_version is None else before_version,
        "limit": limit,
    }
    if max_bytes is None:
        return await context.snapshot_rows(history_before_statement(), params)
    budgeted = {**params, "max_bytes": max_bytes}
    return await context.snapshot_rows(history_within_bytes_statement(), budgeted)


async def get_version(
    context: RepositoryContext[StateT], user_id: str, version: int
) -> Snapshot[StateT] | None:
    user_id = valid_user_id(user_id)
    check_int("version", version, minimum=1, maximum=MAX_VERSION)
    params = {**context.scope.key(user_id), "version": version}
    async with context.guard("get_version", user_id):
        opened = await context.snapshot_rows(version_row_statement(), params)
    return context.to_snapshot(opened[0]) if opened else None


async def get_as_of(
    context: RepositoryContext[StateT], user_id: str, at: datetime
) -> Snapshot[StateT] | None:
    user_id = valid_user_id(user_id)
    if not isinstance(at, datetime) or at.tzinfo is None:
        raise SnapshotValidationError("at must be a timezone-aware datetime")
    params = {**context.scope.key(user_id), "at": at}
    async with context.guard("get_as_of", user_id):
        opened = await context.snapshot_rows(as_of_statement(), params)
    return context.to_snapshot(opened[0]) if opened else None


async def diff(
    context: RepositoryContext[Any], user_id: str, from_version: int, to_version: int
) -> list[JsonPatchOperation]:
    user_id = valid_user_id(user_id)
    check_int("from_version", from_version, minimum=1, maximum=MAX_VERSION)
    check_int("to_version", to_version, minimum=1, maximum=MAX_VERSION)
    params = {**context.scope.key(user_id), "first": from_version, "second": to_version}
    async with context.guard("diff", user_id):
        opened = await context.snapshot_rows(versions_statement(), params)
    states: dict[int, Any] = {row.version: from_json(row.payload) for row in opened}
    missing = [v for v in (from_version, to_version) if v not in states]
    if missing:
        raise SnapshotValidationError(f"diff: version {missing[0]} of this user does not exist")
    return make_json_patch(states[from_version], states[to_version])


async def exists(context: RepositoryContext[Any], user_id: str) -> bool:
    user_id = valid_user_id(user_id)
    async with context.guard("exists", user_id):
        params = {**context.scope.key(user_id), "now": datetime.now(UTC)}
        rows = await context.read(context.backend.fetch, exists_statement(), params)
    return bool(rows[0][0])


async def list_users(context: RepositoryContext[Any], after: str | None, limit: int) -> list[str]:
    after_id = "" if after is None else valid_user_id(after)
    check_int("limit", limit, minimum=1, maximum=MAX_LIST_LIMIT)
    params = {
        "tenant": context.scope.tenant,
        "namespace": context.scope.namespace,
        "after": after_id,
        "limit": limit,
        "now": datetime.now(UTC),
    }
    async with context.guard("list_users", None):
        rows = await context.read(context.backend.fetch, list_users_statement(), params)
    return [row[0] for row in rows]


async def count_users(context: RepositoryContext[Any]) -> int:
    params = {
        "tenant": context.scope.tenant,
        "namespace": context.scope.namespace,
        "now": datetime.now(UTC),
    }
    async with context.guard("count_users", None):
        rows = await context.read(context.backend.fetch, count_users_statement(), params)
    return int(rows[0][0])
