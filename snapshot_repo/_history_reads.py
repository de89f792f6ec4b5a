"""History queries users ask every peer for: one version, as of a moment, diffs, listing.

Each is one indexed statement (see `_queries`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic_core import from_json

from ._checks import MAX_VERSION, check_int, valid_user_id
from ._core import RepositoryCore
from ._queries import (
    as_of_statement,
    count_users_statement,
    exists_statement,
    list_users_statement,
    version_row_statement,
    versions_statement,
)
from .errors import SnapshotValidationError
from .patch import JsonPatchOperation, make_json_patch
from .snapshot import Snapshot, StateT

__all__ = ["MAX_LIST_LIMIT", "HistoryReads"]

MAX_LIST_LIMIT = 10_000


class HistoryReads(RepositoryCore[StateT]):
    """Reads of single versions, moments, differences, and the users of a scope."""

    async def get_version(self, user_id: str, version: int) -> Snapshot[StateT] | None:
        """Exactly version `version` of the user, or None if it does not exist.

        Raises:
            SnapshotValidationError: bad user id or version (not 1 to 2^63-1).
            StorageError: the database failed.
        """
        user_id = valid_user_id(user_id)
        check_int("version", version, minimum=1, maximum=MAX_VERSION)
        params = {**self._scope.key(user_id), "version": version}
        async with self._guard("get_version", user_id):
            opened = await self._snapshot_rows(version_row_statement(), params)
        return self._to_snapshot(opened[0]) if opened else None

    async def get_as_of(self, user_id: str, at: datetime) -> Snapshot[StateT] | None:
        """The user's state as it was at `at`: the newest version stored at or before it.

        Returns None if the user had no version yet at that moment (or none
        that survives: erased users have no past).

        Raises:
            SnapshotValidationError: bad user id, or `at` is not a timezone-aware datetime.
            StorageError: the database failed.
        """
        user_id = valid_user_id(user_id)
        if not isinstance(at, datetime) or at.tzinfo is None:
            raise SnapshotValidationError("at must be a timezone-aware datetime")
        params = {**self._scope.key(user_id), "at": at}
        async with self._guard("get_as_of", user_id):
            opened = await self._snapshot_rows(as_of_statement(), params)
        return self._to_snapshot(opened[0]) if opened else None

    async def diff(
        self, user_id: str, from_version: int, to_version: int
    ) -> list[JsonPatchOperation]:
        """The JSON Patch (RFC 6902) that turns one version's state into another's.

        Raises:
            SnapshotValidationError: bad arguments, or either version does not exist.
            StorageError: the database failed.
        """
        user_id = valid_user_id(user_id)
        check_int("from_version", from_version, minimum=1, maximum=MAX_VERSION)
        check_int("to_version", to_version, minimum=1, maximum=MAX_VERSION)
        params = {**self._scope.key(user_id), "first": from_version, "second": to_version}
        async with self._guard("diff", user_id):
            opened = await self._snapshot_rows(versions_statement(), params)
        states: dict[int, Any] = {row[1]: from_json(row[3]) for row in opened}
        missing = [v for v in (from_version, to_version) if v not in states]
        if missing:
            raise SnapshotValidationError(f"diff: version {missing[0]} of this user does not exist")
        return make_json_patch(states[from_version], states[to_version])

    async def exists(self, user_id: str) -> bool:
        """Whether the user has a snapshot here (in this namespace and tenant)."""
        user_id = valid_user_id(user_id)
        async with self._guard("exists", user_id):
            params = {**self._scope.key(user_id), "now": datetime.now(UTC)}
            rows = await self._read(self._ops.fetch, exists_statement(), params)
        return bool(rows[0][0])

    async def list_users(self, after: str | None = None, limit: int = 100) -> list[str]:
        """User ids with a snapshot here, in id order, after `after` (keyset paging).

        Pass the last id of a page as `after` to get the next page; an empty
        list means the end. Costs O(limit) at any position (no OFFSET).

        Raises:
            SnapshotValidationError: bad `after` or `limit` (1 to 10,000).
            StorageError: the database failed.
        """
        after_id = "" if after is None else valid_user_id(after)
        check_int("limit", limit, minimum=1, maximum=MAX_LIST_LIMIT)
        params = {
            "tenant": self._scope.tenant,
            "namespace": self._scope.namespace,
            "after": after_id,
            "limit": limit,
            "now": datetime.now(UTC),
        }
        async with self._guard("list_users", None):
            rows = await self._read(self._ops.fetch, list_users_statement(), params)
        return [row[0] for row in rows]

    async def count_users(self) -> int:
        """How many users have a snapshot here."""
        params = {
            "tenant": self._scope.tenant,
            "namespace": self._scope.namespace,
            "now": datetime.now(UTC),
        }
        async with self._guard("count_users", None):
            rows = await self._read(self._ops.fetch, count_users_statement(), params)
        return int(rows[0][0])
