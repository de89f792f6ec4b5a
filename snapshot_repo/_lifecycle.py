"""Restore, merge, purge and payload upgrades (seed 003's state view operations).

Each builds on the single-write path, so it inherits its guarantees: a new
version is appended (history is never rewritten), atomically, and published
to listeners after commit.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import JsonValue
from pydantic_core import from_json

from ._checks import check_int, valid_user_id
from ._history_reads import HistoryReads
from ._privacy import Privacy
from ._queries import (
    outdated_rows_statement,
    rewrite_payload_statement,
    scope_users_statement,
)
from .codec import JsonObject
from .errors import SnapshotValidationError, VersionConflictError
from .patch import apply_merge_patch
from .snapshot import Snapshot, StateT

__all__ = ["MERGE_ATTEMPTS", "Lifecycle"]

MERGE_ATTEMPTS = 100
"""How often `merge` re-reads and retries when other writers keep winning the race."""


class Lifecycle(Privacy[StateT], HistoryReads[StateT]):
    """Operations that derive a new version from stored ones, and bulk maintenance."""

    async def restore(
        self,
        user_id: str,
        version: int,
        *,
        actor: str | None = None,
        reason: str | None = None,
    ) -> Snapshot[StateT]:
        """Make an old version the latest again by appending it as a new version.

        History is never rewritten: the restored state becomes version
        latest + 1, with `metadata={"restored_from": version}`.

        Raises:
            SnapshotValidationError: bad arguments, the version does not exist,
                or its state no longer validates against the model.
            StorageError: the database failed.
        """
        old = await self.get_version(user_id, version)
        if old is None:
            raise SnapshotValidationError(f"restore: version {version} of this user does not exist")
        return await self.upsert_latest(
            Snapshot(user_id=old.user_id, state=old.state),
            actor=actor,
            reason=reason or f"restore of version {version}",
            metadata={"restored_from": version},
        )

    async def merge(
        self,
        user_id: str,
        partial: JsonObject,
        *,
        actor: str | None = None,
        reason: str | None = None,
        metadata: JsonObject | None = None,
    ) -> Snapshot[StateT]:
        """Apply an RFC 7386 JSON merge patch to the latest state and store the result.

        Atomic and free of lost updates: the merge is written with
        compare-and-set against the version it was computed from, and
        recomputed from the new latest state when another writer got there
        first (up to `MERGE_ATTEMPTS` times). Merging into a user without a
        snapshot creates one from the patch alone, if it validates.

        Raises:
            SnapshotValidationError: `partial` is not a JSON object, or the
                merged state does not validate against the model.
            VersionConflictError: other writers won `MERGE_ATTEMPTS` races in a row.
            StorageError: the database failed.
        """
        user_id = valid_user_id(user_id)
        if not isinstance(partial, dict):
            raise SnapshotValidationError("merge takes a JSON object (a dict) as the patch")
        for _attempt in range(MERGE_ATTEMPTS):
            async with self._guard("merge", user_id):
                row = await self._read(self._ops.latest, self._scope, user_id, datetime.now(UTC))
                if row is not None:
                    row = (await self._open([row]))[0]
            base_version = 0 if row is None else int(row[1])
            document: JsonValue = {} if row is None else self._current_document(row)
            merged = apply_merge_patch(document, partial)
            try:
                return await self.upsert_latest(
                    Snapshot(user_id=user_id, state=self._codec.validate(merged, user_id)),
                    expected_version=base_version,
                    actor=actor,
                    reason=reason,
                    metadata=metadata,
                )
            except VersionConflictError:
                continue
        raise VersionConflictError(user_id, base_version, await self._latest_version(user_id))

    async def purge_all(self, *, confirm: str) -> int:
        """Erase every user of this namespace (and tenant, for a tenant view): seed 003's reset.

        Each user is erased as by `delete` (one transaction per user, each
        recorded in the change feed), so a failure part-way leaves whole
        users erased or kept, never half of one; on SQLite each page of 500
        users shares one WAL checkpoint (see `_erase_batch`). Users written
        while the purge runs may survive it.

        Args:
            confirm: must equal `purge_label`, e.g. "default" or "acme/cart",
                so that a purge of the wrong scope cannot happen by accident.

        Returns:
            How many users were erased.

        Raises:
            SnapshotValidationError: `confirm` does not name this scope.
            StorageError: the database failed; users erased before it stay erased.
        """
        if confirm != self.purge_label:
            raise SnapshotValidationError(
                f"purge_all needs confirm={self.purge_label!r} to erase this scope"
            )
        erased = 0
        scope = {"tenant": self._scope.tenant, "namespace": self._scope.namespace}
        while True:
            # Every user of the scope, expired ones included (list_users hides those).
            async with self._guard("purge_all", None):
                rows = await self._read(self._ops.fetch, scope_users_statement(), scope)
            if not rows:
                return erased
            purged = await self._erase_batch(((self, user_id) for (user_id,) in rows), "purge")
            erased += sum(1 for versions in purged if versions)

    @property
    def purge_label(self) -> str:
        """What `purge_all(confirm=...)` expects: "namespace" or "tenant/namespace"."""
        scope = self._scope
        return f"{scope.tenant}/{scope.namespace}" if scope.tenant else scope.namespace

    async def upgrade_payloads(
        self, *, batch_size: int = 500, progress: Callable[[int], None] | None = None
    ) -> int:
        """Rewrite rows stored under older schema versions with the upgraders, in batches.

        Covers history and latest rows of this namespace (every tenant; one
        tenant through a tenant view). Each batch is one transaction; a row
        changed meanwhile by another upgrade is skipped, so the job can be
        stopped and rerun. Versions and timestamps are kept: this changes how
        a state is stored, not which state it was.

        Returns:
            How many rows were rewritten.

        Raises:
            SchemaVersionError: a row cannot be upgraded (nothing of its batch
                was written).
            SnapshotValidationError: an upgraded state does not validate.
            StorageError: the database failed.
        """
        check_int("batch_size", batch_size, minimum=1, maximum=10_000)
        current = self._codec.upgrades.current
        rewritten = 0
        for table in ("history", "latest"):
            select_page = outdated_rows_statement(table, bool(self._scope.tenant))
            rewrite = rewrite_payload_statement(table)
            after: tuple[str, str, int] = ("", "", 0)
            while True:
                params = {
                    "namespace": self._scope.namespace,
                    "tenant": self._scope.tenant,
                    "current": current,
                    "after_tenant": after[0],
                    "after_user": after[1],
                    "after_version": after[2],
                    "limit": batch_size,
                }
                async with self._guard("upgrade_payloads", None):
                    rows = await self._read(self._ops.fetch, select_page, params)
                if not rows:
                    break
                work: list[tuple[Any, dict[str, Any]]] = []
                for tenant, user_id, version, schema_version, payload in rows:
                    scoped = self if tenant == self._scope.tenant else self.for_tenant(tenant)
                    async with self._guard("upgrade_payloads", user_id):
                        opened = await scoped._open([(user_id, version, schema_version, payload)])
                    state = self._codec.decode(opened[0][3], user_id, version, schema_version)
                    async with self._guard("upgrade_payloads", user_id):
                        new_payload = await scoped._seal(
                            user_id, self._codec.encode(state, user_id)
                        )
                    work.append(
                        (
                            rewrite,
                            {
                                "tenant": tenant,
                                "namespace": self._scope.namespace,
                                "user_id": user_id,
                                "version": version,
                                "old_schema_version": schema_version,
                                "new_payload": new_payload,
                                "new_schema_version": current,
                            },
                        )
                    )
                async with self._guard("upgrade_payloads", None):
                    counts = await self._ops.execute_in_transaction(work)
                rewritten += sum(counts)
                if progress is not None:
                    progress(rewritten)
                last = rows[-1]
                after = (last[0], last[1], int(last[2]))
        return rewritten

    def _current_document(self, row: Any) -> JsonValue:
        """The latest row's state as a JSON document of today's schema version."""
        document = from_json(row[3])
        return self._codec.upgrades.upgrade(document, int(row[2]), row[0], int(row[1]))  # type: ignore[no-any-return]

    async def _latest_version(self, user_id: str) -> int:
        async with self._guard("merge", user_id):
            return await self._ops.current_version(self._scope, user_id)
