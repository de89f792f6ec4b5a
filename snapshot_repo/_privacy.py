"""GDPR and the data lifecycle: erasure, receipts, subject-access export, retention, expiry.

Methods of `SnapshotRepository` (its class assigns them), taking the
repository as `self`. Everything here erases through the one erasure path,
`RepositoryContext.erase` (latest, history and feed in one transaction,
then the receipt), so every way a user's data leaves the store leaves the
same trace: a receipt that names no one, and an `erase` entry in the feed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, JsonValue
from pydantic_core import from_json, to_json

from ._checks import MAX_VERSION, check_int, valid_user_id
from ._context import RepositoryContext
from ._feed_retention import trim_configured
from ._queries import (
    expired_users_statement,
    history_before_statement,
    receipts_statement,
    users_page_statement,
)
from ._telemetry import traced
from ._user_counts import fold_logging_failure
from .errors import ConfigurationError, SnapshotValidationError
from .retention import RetentionPolicy, policy_from_arguments

if TYPE_CHECKING:
    from .repository import SnapshotRepository

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


@traced
async def erase(
    self: SnapshotRepository[Any], user_id: str, *, vacuum: bool | Literal["full"] = False
) -> int:
    """Erase the user (as `delete`) and, with `vacuum`, the traces the database keeps.

    On SQLite every erasure already overwrites the freed bytes
    (`secure_delete`) and checkpoints the WAL, so no string of the state
    stays in the database files. On Postgres deleted rows stay on disk as
    dead tuples until vacuumed: `vacuum=True` runs VACUUM on the snapshot
    tables after the erasure commits (milliseconds to seconds, by table
    size), which frees the tuples but leaves their bytes in the freed page
    space until it is reused; `vacuum="full"` runs VACUUM FULL, which
    rewrites the tables and indexes into new files without them, and
    blocks every other call on those tables while it runs. On MariaDB/MySQL
    both run OPTIMIZE TABLE (an online rebuild). WAL, redo and undo logs,
    binary logs, backups and replicas keep their copies; see the README's
    erasure section.

    Raises:
        SnapshotValidationError: a bad user id, or `vacuum` not False, True or "full".

    Returns:
        How many versions were erased.
    """
    context = self._context
    if not (isinstance(vacuum, bool) or vacuum == "full"):
        raise SnapshotValidationError(f"vacuum must be False, True or 'full', not {vacuum!r}")
    erased = await context.erase(valid_user_id(user_id), "erase")
    if vacuum:
        async with context.guard("erase", user_id):
            await context.backend.vacuum(full=vacuum == "full")
    return erased


def erasure_subject(self: SnapshotRepository[Any], user_id: str) -> str:
    """What erasure receipts and the feed's `erase` entries call `user_id`.

    The HMAC-SHA256 of the id under `erasure_key`, in hex: a feed consumer
    holding the key matches an `erase` entry (`Change.user_id`) to the user
    it cached, while the database holds no id of an erased person.

    Raises:
        SnapshotValidationError: a bad user id.
        ConfigurationError: the repository has no `erasure_key`.
    """
    context = self._context
    subject = context.receipt_subject(valid_user_id(user_id))
    if subject is None:
        raise ConfigurationError("erasure subjects need the repository's erasure_key")
    return subject


@traced
async def erasure_receipt(self: SnapshotRepository[Any], user_id: str) -> ErasureReceipt | None:
    """The newest erasure receipt for `user_id` in this scope, found by its keyed hash.

    Answers "was this person erased, when, and how much" without the
    database ever holding the user id.

    Raises:
        ConfigurationError: the repository has no `erasure_key`.
    """
    context = self._context
    subject = erasure_subject(self, user_id)
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


@traced
async def export_user(self: SnapshotRepository[Any], user_id: str) -> dict[str, JsonValue]:
    """Everything stored about the user in this scope, as one JSON-serialisable document.

    For GDPR articles 15 and 20: every version's state and metadata,
    newest first. History is read in pages of 500, so the database never
    returns an unbounded result; the document itself holds every version
    (use `export_user_lines` to stream it instead).
    """
    context = self._context
    versions: list[JsonValue] = []
    header: dict[str, JsonValue] = {}
    async for item in export_items(context, user_id):
        if "format" in item:
            header = item
        else:
            versions.append(item)
    return {**header, "versions": versions}


async def export_user_lines(self: SnapshotRepository[Any], user_id: str) -> AsyncIterator[str]:
    """The export as JSON Lines, streamed: a header line, then one line per version."""
    context = self._context
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


@traced
async def rotate_wrapping_key(
    self: SnapshotRepository[Any], progress: Callable[[int], None] | None = None
) -> int:
    """Re-wrap every data key under the key provider's active key, without touching payloads.

    Run it after making a new key active; once it returns, the old
    key-encryption key can be retired, and with it every backup's copy
    of the data keys of users erased before the rotation.

    Returns:
        How many data keys were re-wrapped.

    Raises:
        ConfigurationError: the repository has no encryption.
        DecryptionError: a data key is wrapped under a key the provider lacks.
    """
    context = self._context
    if context.keys is None:
        raise ConfigurationError("rotate_wrapping_key needs a repository with encryption")
    async with context.guard("rotate_wrapping_key", None):
        return await context.keys.rotate(progress)


async def _reap(
    context: RepositoryContext[Any],
    *,
    batch_size: int = 500,
    progress: Callable[[int], None] | None = None,
) -> int:
    """`reap_expired` without the feed trim."""
    check_int("batch_size", batch_size, minimum=1, maximum=10_000)
    reaped = 0
    tenants: set[str] = set()
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
            if reaped:  # each reaped user left a -1 row in the count (see `_user_counts`)
                await fold_logging_failure(context, tenants)
            return reaped
        tenants.update(tenant for tenant, _user_id in rows)
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


async def _prune(
    context: RepositoryContext[Any],
    user_id: str | None,
    policy: RetentionPolicy,
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> int:
    """`prune_history` (arguments checked) without the feed trim."""
    cutoff = policy.cutoff(datetime.now(UTC))
    if user_id is not None:
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


@traced
async def reap_expired(
    self: SnapshotRepository[Any],
    *,
    batch_size: int = 500,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Erase every user of this namespace whose snapshot expired (seed 004's reaping).

    Each user is erased as by `delete` (receipt, feed entry, listeners),
    unless a write cleared the expiry meanwhile. Covers every tenant of
    the namespace (one tenant through a tenant view). On SQLite each batch
    of `batch_size` users shares one WAL checkpoint (see `RepositoryContext.erase_batch`).
    With `feed_retention`, the change feed is then trimmed (`trim_changes`).

    Returns:
        How many users were erased.
    """
    reaped = await _reap(self._context, batch_size=batch_size, progress=progress)
    await trim_configured(self._context)
    return reaped


@traced
async def prune_history(
    self: SnapshotRepository[Any],
    user_id: str | None = None,
    *,
    keep_last: int | None = None,
    older_than: timedelta | None = None,
    batch_size: int = 500,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Delete old history versions (never the latest) of one user or of all.

    A version is deleted when it is outside every bound given: not among
    the newest `keep_last` and (if given) older than `older_than`. With no
    `user_id`, every user of the namespace (every tenant; one tenant via
    a tenant view) is pruned, `batch_size` users per transaction. On
    Postgres each user is locked as a write locks it, so writers of a
    page's users wait for that page's transaction to commit.
    With `feed_retention`, the change feed is then trimmed (`trim_changes`).

    Returns:
        How many versions were deleted.

    Raises:
        SnapshotValidationError: no bound, or a bound out of range.
    """
    policy = policy_from_arguments(keep_last, older_than)
    check_int("batch_size", batch_size, minimum=1, maximum=10_000)
    checked_user = None if user_id is None else valid_user_id(user_id)
    pruned = await _prune(self._context, checked_user, policy, batch_size, progress)
    await trim_configured(self._context)
    return pruned
