"""GDPR and the data lifecycle: erasure, receipts, subject-access export, retention, expiry.

Everything here erases through the one erasure path of `_contract` (latest,
history and feed in one transaction, then the receipt), so every way a
user's data leaves the store leaves the same trace: a receipt that names no
one, and an `erase` entry in the change feed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, JsonValue
from pydantic_core import from_json, to_json

from ._checks import MAX_VERSION, check_int, valid_user_id
from ._context import RepositoryContext
from ._queries import (
    expired_users_statement,
    history_before_statement,
    receipts_statement,
    users_page_statement,
)
from .errors import ConfigurationError, SnapshotValidationError
from .retention import policy_from_arguments

__all__ = [
    "ErasureReceipt",
    "erase",
    "erasure_receipt",
    "erasure_subject",
    "export_items",
    "export_user",
    "export_user_lines",
    "prune_history",
    "reap_expired",
    "rotate_wrapping_key",
]

_EXPORT_PAGE = 500


class ErasureReceipt(BaseModel):
    """Proof that a person's data was erased, holding no personal data itself.

    Attributes:
        subject: HMAC-SHA256 of the user id under the repository's `erasure_key`.
        erased_at: when (UTC).
        versions_erased: how many versions were erased.
        cause: "delete", "erase", "expired" or "purge".
    """

    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    subject: str
    erased_at: datetime
    versions_erased: int
    cause: str


async def erase(
    context: RepositoryContext[Any], user_id: str, *, vacuum: bool | Literal["full"] = False
) -> int:
    """See `SnapshotRepository.erase`."""
    if not (isinstance(vacuum, bool) or vacuum == "full"):
        raise SnapshotValidationError(f"vacuum must be False, True or 'full', not {vacuum!r}")
    erased = await context.erase(valid_user_id(user_id), "erase")
    if vacuum:
        async with context.guard("erase", user_id):
            await context.backend.vacuum(full=vacuum == "full")
    return erased


def erasure_subject(context: RepositoryContext[Any], user_id: str) -> str:
    """See `SnapshotRepository.erasure_subject`."""
    subject = context.receipt_subject(valid_user_id(user_id))
    if subject is None:
        raise ConfigurationError("erasure subjects need the repository's erasure_key")
    return subject


async def erasure_receipt(context: RepositoryContext[Any], user_id: str) -> ErasureReceipt | None:
    """See `SnapshotRepository.erasure_receipt`."""
    subject = erasure_subject(context, user_id)
    params = {
        "subject": subject,
        "tenant": context.scope.tenant,
        "namespace": context.scope.namespace,
    }
    async with context.guard("erasure_receipt", user_id):
        rows = await context.read(context.backend.fetch, receipts_statement(), params)
    if not rows:
        return None
    subject, erased_at, versions_erased, cause = rows[0]
    if isinstance(erased_at, str):  # SQLite returns the stored text
        erased_at = datetime.fromisoformat(erased_at).replace(tzinfo=UTC)
    return ErasureReceipt(
        subject=subject,
        erased_at=erased_at.astimezone(UTC),
        versions_erased=versions_erased,
        cause=cause,
    )


async def export_user(context: RepositoryContext[Any], user_id: str) -> dict[str, JsonValue]:
    """See `SnapshotRepository.export_user`."""
    versions: list[JsonValue] = []
    header: dict[str, JsonValue] = {}
    async for item in export_items(context, user_id):
        if "format" in item:
            header = item
        else:
            versions.append(item)
    return {**header, "versions": versions}


async def export_user_lines(context: RepositoryContext[Any], user_id: str) -> AsyncIterator[str]:
    """See `SnapshotRepository.export_user_lines`."""
    async for item in export_items(context, user_id):
        yield to_json(item).decode() + "\n"


async def export_items(
    context: RepositoryContext[Any], user_id: str
) -> AsyncIterator[dict[str, JsonValue]]:
    """The export's header, then each stored version of the user in the scope, newest first."""
    user_id = valid_user_id(user_id)
    yield {
        "format": "snapshot_repo.subject_export",
        "format_version": 1,
        "user_id": user_id,
        "tenant": context.scope.tenant or None,
        "namespace": context.scope.namespace,
        "exported_at": datetime.now(UTC).isoformat(),
    }
    before = MAX_VERSION
    while True:
        params = {**context.scope.key(user_id), "before_version": before, "limit": _EXPORT_PAGE}
        async with context.guard("export_user", user_id):
            opened = await context.snapshot_rows(history_before_statement(), params)
        if not opened:
            return
        for row in opened:
            yield {
                "version": row.version,
                "created_at": row.created_at.isoformat(),
                "schema_version": row.schema_version,
                "idempotency_key": row.idempotency_key,
                "actor": row.actor,
                "reason": row.reason,
                "metadata": None if row.metadata is None else from_json(row.metadata),
                "state": from_json(row.payload),
            }
            before = row.version


async def rotate_wrapping_key(
    context: RepositoryContext[Any], progress: Callable[[int], None] | None = None
) -> int:
    """See `SnapshotRepository.rotate_wrapping_key`."""
    if context.keys is None:
        raise ConfigurationError("rotate_wrapping_key needs a repository with encryption")
    async with context.guard("rotate_wrapping_key", None):
        return await context.keys.rotate(progress)


async def reap_expired(
    context: RepositoryContext[Any],
    *,
    batch_size: int = 500,
    progress: Callable[[int], None] | None = None,
) -> int:
    """See `SnapshotRepository.reap_expired`."""
    check_int("batch_size", batch_size, minimum=1, maximum=10_000)
    reaped = 0
    while True:
        params = {
            "namespace": context.scope.namespace,
            "tenant": context.scope.tenant,
            "now": datetime.now(UTC),
            "limit": batch_size,
        }
        async with context.guard("reap_expired", None):
            rows = await context.read(
                context.backend.fetch, expired_users_statement(bool(context.scope.tenant)), params
            )
        if not rows:
            return reaped
        erased = await context.erase_batch(
            (
                (context if tenant == context.scope.tenant else context.for_tenant(tenant), user_id)
                for tenant, user_id in rows
            ),
            "expired",
            only_expired=True,
        )
        reaped += sum(1 for versions in erased if versions)
        if progress is not None:
            progress(reaped)


async def prune_history(
    context: RepositoryContext[Any],
    user_id: str | None = None,
    *,
    keep_last: int | None = None,
    older_than: timedelta | None = None,
    batch_size: int = 500,
    progress: Callable[[int], None] | None = None,
) -> int:
    """See `SnapshotRepository.prune_history`."""
    policy = policy_from_arguments(keep_last, older_than)
    check_int("batch_size", batch_size, minimum=1, maximum=10_000)
    cutoff = policy.cutoff(datetime.now(UTC))
    if user_id is not None:
        user_id = valid_user_id(user_id)
        one = _prune_params(context, context.scope.tenant, user_id, policy.keep_last, cutoff)
        work = [(context.backend.prune_statement, one)]
        async with context.guard("prune_history", user_id):
            return sum(await context.backend.execute_in_transaction(work))
    pruned = 0
    after: tuple[str, str] = ("", "")
    while True:
        params: dict[str, Any] = {
            "namespace": context.scope.namespace,
            "tenant": context.scope.tenant,
            "after_tenant": after[0],
            "after_user": after[1],
            "limit": batch_size,
        }
        async with context.guard("prune_history", None):
            users = await context.read(
                context.backend.fetch, users_page_statement(bool(context.scope.tenant)), params
            )
            if not users:
                return pruned
            work = [
                (
                    context.backend.prune_statement,
                    _prune_params(context, tenant, uid, policy.keep_last, cutoff),
                )
                # Code point order, whatever the database's collation: the order in which
                # batch writes lock users (see `prune_statement`), so the two cannot deadlock.
                for tenant, uid, _version in sorted(users, key=lambda row: (row[0], row[1]))
            ]
            pruned += sum(await context.backend.execute_in_transaction(work))
        if progress is not None:
            progress(pruned)
        after = (users[-1][0], users[-1][1])


def _prune_params(
    context: RepositoryContext[Any], tenant: str, user_id: str, keep_last: int | None, cutoff: Any
) -> dict[str, Any]:
    # The statement reads the user's newest version itself (see prune_statement).
    return {
        "tenant": tenant,
        "namespace": context.scope.namespace,
        "user_id": user_id,
        "keep_last": keep_last,
        "cutoff": cutoff,
    }
