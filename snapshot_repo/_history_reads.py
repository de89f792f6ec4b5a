"""History queries users ask every peer for: one version, as of a moment, diffs, listing.

Methods of `SnapshotRepository` (its class assigns them): each takes the
repository as `self` and runs one indexed statement (see `_queries`);
`iter_history` pages through `get_history`'s keyset reads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic_core import from_json

from . import _user_counts
from ._checks import MAX_VERSION, check_int, valid_user_id
from ._context import RepositoryContext, logger
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
from ._telemetry import traced
from .backends import Row
from .errors import SnapshotValidationError
from .patch import JsonPatchOperation, make_json_patch
from .snapshot import Snapshot, StateT

if TYPE_CHECKING:
    from .repository import SnapshotRepository

__all__ = [
    "MAX_HISTORY_LIMIT",
    "MAX_LIST_LIMIT",
    "count_users",
    "diff",
    "exists",
    "get_as_of",
    "get_version",
    "history_page",
    "iter_history",
    "list_users",
    "snapshots_of",
]

MAX_HISTORY_LIMIT = 10_000
"""The most versions one `get_history` call returns; page or export for more."""

MAX_LIST_LIMIT = 10_000


def snapshots_of(
    context: RepositoryContext[StateT], rows: list[Row], *, skip_invalid: bool
) -> list[Snapshot[StateT]]:
    """The snapshots of stored `rows`; with `skip_invalid`, those that no longer validate
    are left out with a warning instead of raising `SnapshotValidationError`."""
    if not skip_invalid:
        return [context.to_snapshot(row) for row in rows]
    snapshots = []
    for row in rows:
        try:
            snapshots.append(context.to_snapshot(row))
        except SnapshotValidationError as exc:
            logger.warning("snapshot_repo skipped a stored state: %s", exc)
    return snapshots


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


@traced
async def get_version(
    self: SnapshotRepository[StateT], user_id: str, version: int
) -> Snapshot[StateT] | None:
    """Exactly version `version` of the user, or None if it does not exist.

    Raises:
        SnapshotValidationError: bad user id or version (not 1 to 2^63-1).
        StorageError: the database failed.
    """
    context = self._context
    user_id = valid_user_id(user_id)
    check_int("version", version, minimum=1, maximum=MAX_VERSION)
    params = {**context.scope.key(user_id), "version": version}
    async with context.guard("get_version", user_id):
        opened = await context.snapshot_rows(version_row_statement(), params)
    return context.to_snapshot(opened[0]) if opened else None


@traced
async def get_as_of(
    self: SnapshotRepository[StateT], user_id: str, at: datetime
) -> Snapshot[StateT] | None:
    """The user's state as it was at `at`: the highest version stored at or before it.

    Returns None if the user had no version yet at that moment (or none
    that survives: erased users have no past).

    Raises:
        SnapshotValidationError: bad user id, or `at` is not a timezone-aware datetime.
        StorageError: the database failed.
    """
    context = self._context
    user_id = valid_user_id(user_id)
    if not isinstance(at, datetime) or at.tzinfo is None:
        raise SnapshotValidationError("at must be a timezone-aware datetime")
    params = {**context.scope.key(user_id), "at": at}
    async with context.guard("get_as_of", user_id):
        opened = await context.snapshot_rows(as_of_statement(), params)
    return context.to_snapshot(opened[0]) if opened else None


@traced
async def diff(
    self: SnapshotRepository[Any], user_id: str, from_version: int, to_version: int
) -> list[JsonPatchOperation]:
    """The JSON Patch (RFC 6902) that turns one version's state into another's.

    Raises:
        SnapshotValidationError: bad arguments, or either version does not exist.
        StorageError: the database failed.
    """
    context = self._context
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


@traced
async def exists(self: SnapshotRepository[Any], user_id: str) -> bool:
    """Whether the user has a snapshot here (in this namespace and tenant)."""
    context = self._context
    user_id = valid_user_id(user_id)
    async with context.guard("exists", user_id):
        params = {**context.scope.key(user_id), "now": datetime.now(UTC)}
        rows = await context.read(context.backend.fetch, exists_statement(), params)
    return bool(rows[0][0])


@traced
async def list_users(
    self: SnapshotRepository[Any], after: str | None = None, limit: int = 100
) -> list[str]:
    """User ids with a snapshot here, in id order, after `after` (keyset paging).

    Pass the last id of a page as `after` to get the next page; an empty
    list means the end. Costs O(limit) at any position (no OFFSET).

    Raises:
        SnapshotValidationError: bad `after` or `limit` (1 to 10,000).
        StorageError: the database failed.
    """
    context = self._context
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


@traced
async def count_users(self: SnapshotRepository[Any]) -> int:
    """How many users have a snapshot here (expired ones not counted): exact, from the
    count the database keeps as users are added and removed (revision 0018), so its
    cost does not grow with the users. Folds that count when it grew long (see
    `_user_counts`), so it may write."""
    context = self._context
    params = {
        "tenant": context.scope.tenant,
        "namespace": context.scope.namespace,
        "now": datetime.now(UTC),
    }
    async with context.guard("count_users", None):
        rows = await context.read(context.backend.fetch, count_users_statement(), params)
    users, rows_read = _user_counts.read_count(rows[0])
    if rows_read > _user_counts.FOLD_AFTER:
        await _user_counts.fold_logging_failure(context)
    return users


async def iter_history(
    self: SnapshotRepository[StateT],
    user_id: str,
    *,
    page_size: int = 100,
    max_bytes: int | None = 16 * 1024 * 1024,
    skip_invalid: bool = False,
) -> AsyncIterator[Snapshot[StateT]]:
    """Every version of the user, newest first, read page by page as it is consumed.

    For callers that want a whole history of any length: each page is one
    keyset read as `get_history(before_version=...)` makes (O(page) each), so
    memory holds one page, at most `page_size` versions and about
    `max_bytes` of stored states (16 MiB by default; None: no byte bound).
    Versions written after the iteration began are not included; versions
    pruned or erased meanwhile may be missing.

    Raises:
        SnapshotValidationError: as `get_history`, when the first page is read.
        StorageError: the database failed, on the page being read.
    """
    context = self._context
    user_id = valid_user_id(user_id)
    check_int("page_size", page_size, minimum=1, maximum=MAX_HISTORY_LIMIT)
    if max_bytes is not None:
        check_int("max_bytes", max_bytes, minimum=1)
    before: int | None = None
    while True:
        async with context.guard("iter_history", user_id):
            rows = await history_page(context, user_id, page_size, before, max_bytes)
        for row in rows:
            try:
                snapshot = context.to_snapshot(row)
            except SnapshotValidationError as exc:
                if not skip_invalid:
                    raise
                logger.warning("snapshot_repo skipped a stored state: %s", exc)
                continue
            yield snapshot
        # Page on from the last version read, valid or not: an invalid one skipped
        # must neither end the iteration nor be read again.
        if not rows or rows[-1].version <= 1:
            return
        before = rows[-1].version
