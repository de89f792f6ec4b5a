"""Restore, merge, purge and payload upgrades (seed 003's state view operations).

Methods of `SnapshotRepository` (its class assigns them), taking the repository as `self`.

Each builds on the single-write path, so it inherits its guarantees: a new
version is appended (history is never rewritten), atomically, and published
to listeners after commit.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import JsonValue
from pydantic_core import from_json

from ._checks import check_int, valid_user_id
from ._context import RepositoryContext
from ._queries import (
    latest_or_expired_statement,
    outdated_rows_statement,
    rewrite_payload_statement,
    scope_users_statement,
)
from ._telemetry import traced
from .backends import Row, StoredRow
from .backends.replicas import primary_reads
from .codec import JsonObject
from .errors import SnapshotValidationError, VersionConflictError
from .patch import apply_merge_patch
from .snapshot import Snapshot, StateT

if TYPE_CHECKING:
    from .repository import SnapshotRepository

__all__ = ["MERGE_ATTEMPTS", "merge", "purge_all", "purge_label", "restore", "upgrade_payloads"]

MERGE_ATTEMPTS = 100
"""How often `merge` re-reads and retries when other writers keep winning the race."""


@traced
async def restore(
    self: SnapshotRepository[StateT],
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
    # Read on the primary even with read replicas: a replica may still hold a
    # version another process has just erased or pruned, and writing it back
    # would undo that erasure.
    with primary_reads():
        old = await self.get_version(user_id, version)
    if old is None:
        raise SnapshotValidationError(f"restore: version {version} of this user does not exist")
    return await self.upsert_latest(
        Snapshot(user_id=old.user_id, state=old.state),
        actor=actor,
        reason=reason or f"restore of version {version}",
        metadata={"restored_from": version},
    )


@traced
async def merge(
    self: SnapshotRepository[StateT],
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
    snapshot creates one from the patch alone, if it validates; so does
    merging into an expired one, as the next version (as any write after
    expiry does: it continues the history and cancels the expiry).

    Raises:
        SnapshotValidationError: `partial` is not a JSON object, or the
            merged state does not validate against the model.
        VersionConflictError: other writers won `MERGE_ATTEMPTS` races in a row.
        StorageError: the database failed.
    """
    user_id = valid_user_id(user_id)
    context = self._context
    if not isinstance(partial, dict):
        raise SnapshotValidationError("merge takes a JSON object (a dict) as the patch")
    for _attempt in range(MERGE_ATTEMPTS):
        async with context.guard("merge", user_id):
            base_version, row = await _merge_base(context, user_id)
        document: JsonValue = {} if row is None else _current_document(context, row)
        merged = apply_merge_patch(document, partial)
        try:
            return await self.upsert_latest(
                Snapshot(user_id=user_id, state=context.codec.validate(merged, user_id)),
                expected_version=base_version,
                actor=actor,
                reason=reason,
                metadata=metadata,
            )
        except VersionConflictError:
            continue
    raise VersionConflictError(user_id, base_version, await _latest_version(context, user_id))


@traced
async def purge_all(self: SnapshotRepository[Any], *, confirm: str) -> int:
    """Erase every user of this namespace (and tenant, for a tenant view): seed 003's reset.

    Each user is erased as by `delete` (one transaction per user, each
    recorded in the change feed), so a failure part-way leaves whole
    users erased or kept, never half of one; on SQLite each page of 500
    users shares one WAL checkpoint (see `RepositoryContext.erase_batch`). Users written
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
    context = self._context
    if confirm != purge_label(context):
        raise SnapshotValidationError(
            f"purge_all needs confirm={purge_label(context)!r} to erase this scope"
        )
    erased = 0
    scope = {"tenant": context.scope.tenant, "namespace": context.scope.namespace}
    while True:
        # Every user of the scope, expired ones included (list_users hides those).
        async with context.guard("purge_all", None):
            rows = await context.read(context.backend.fetch, scope_users_statement(), scope)
        if not rows:
            return erased
        purged = await context.erase_batch(((context, user_id) for (user_id,) in rows), "purge")
        erased += sum(1 for versions in purged if versions)


def purge_label(context: RepositoryContext[Any]) -> str:
    """What `purge_all(confirm=...)` expects: "namespace" or "tenant/namespace"."""
    scope = context.scope
    return f"{scope.tenant}/{scope.namespace}" if scope.tenant else scope.namespace


@traced
async def upgrade_payloads(
    self: SnapshotRepository[Any],
    *,
    batch_size: int = 500,
    progress: Callable[[int], None] | None = None,
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
    context = self._context
    check_int("batch_size", batch_size, minimum=1, maximum=10_000)
    current = context.codec.upgrades.current
    rewritten = 0
    for table in ("history", "latest"):
        select_page = outdated_rows_statement(table, bool(context.scope.tenant))
        rewrite = rewrite_payload_statement(table)
        after: tuple[str, str, int] = ("", "", 0)
        while True:
            params = {
                "namespace": context.scope.namespace,
                "tenant": context.scope.tenant,
                "current": current,
                "after_tenant": after[0],
                "after_user": after[1],
                "after_version": after[2],
                "limit": batch_size,
            }
            async with context.guard("upgrade_payloads", None):
                rows = await context.read(context.backend.fetch, select_page, params)
            if not rows:
                break
            work: list[tuple[Any, dict[str, Any]]] = []
            for tenant, user_id, version, schema_version, payload in rows:
                scoped = context if tenant == context.scope.tenant else context.for_tenant(tenant)
                async with context.guard("upgrade_payloads", user_id):
                    opened = await scoped.open_stored(user_id, version, payload)
                state = context.codec.decode(opened, user_id, version, schema_version)
                async with context.guard("upgrade_payloads", user_id):
                    new_payload = await scoped.seal(user_id, context.codec.encode(state, user_id))
                work.append(
                    (
                        rewrite,
                        {
                            "tenant": tenant,
                            "namespace": context.scope.namespace,
                            "user_id": user_id,
                            "version": version,
                            "old_schema_version": schema_version,
                            "new_payload": new_payload,
                            "new_schema_version": current,
                        },
                    )
                )
            async with context.guard("upgrade_payloads", None):
                counts = await context.backend.execute_in_transaction(work)
            rewritten += sum(counts)
            if progress is not None:
                progress(rewritten)
            last = rows[-1]
            after = (last[0], last[1], int(last[2]))
    return rewritten


async def _merge_base(context: RepositoryContext[Any], user_id: str) -> tuple[int, Row | None]:
    """The version a merge compares against, and the latest row it merges onto (None: none).

    An expired snapshot reads as absent, so a merge onto it starts from an
    empty document; but its row still holds the user's version, which a write
    after expiry follows and compare-and-set compares against (see
    `upsert_latest`), so the merge must expect that version, not 0. Both come
    from one read of the row.
    """
    params = {**context.scope.key(user_id), "now": datetime.now(UTC)}
    found = await context.read(context.backend.fetch, latest_or_expired_statement(), params)
    if not found:
        return 0, None
    *columns, alive = found[0]
    row = context.backend.decode_snapshot_row(columns)
    if not alive:
        return int(row.version), None
    return int(row.version), (await context.open([row]))[0]


def _current_document(context: RepositoryContext[Any], row: StoredRow) -> JsonValue:
    """The latest row's state as a JSON document of today's schema version."""
    document = from_json(row.payload)
    upgrade = context.codec.upgrades.upgrade
    return upgrade(document, int(row.schema_version), row.user_id, int(row.version))  # type: ignore[no-any-return]


async def _latest_version(context: RepositoryContext[Any], user_id: str) -> int:
    async with context.guard("merge", user_id):
        return await context.backend.current_version(context.scope, user_id)
