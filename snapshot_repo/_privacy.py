"""GDPR and the data lifecycle: erasure, receipts, subject-access export, retention, expiry.

Everything here erases through the one erasure path of `_contract` (latest,
history and feed in one transaction, then the receipt), so every way a
user's data leaves the store leaves the same trace: a receipt that names no
one, and an `erase` entry in the change feed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, JsonValue
from pydantic_core import from_json, to_json

from ._checks import MAX_VERSION, check_int, valid_user_id
from ._contract import Contract
from ._dialects import prune_statement
from ._queries import (
    expired_users_statement,
    history_before_statement,
    receipts_statement,
    users_page_statement,
)
from .errors import ConfigurationError
from .retention import policy_from_arguments
from .snapshot import StateT

__all__ = ["ErasureReceipt", "Privacy"]

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


class Privacy(Contract[StateT]):
    """Erase, prove erasure, export a person's data, trim history, expire snapshots."""

    async def erase(self, user_id: str, *, vacuum: bool = False) -> int:
        """Erase the user (as `delete`) and, with `vacuum`, the traces the database keeps.

        On SQLite every erasure already overwrites the freed bytes
        (`secure_delete`) and checkpoints the WAL, so no string of the state
        stays in the database files. On Postgres deleted rows stay on disk as
        dead tuples until vacuumed: `vacuum=True` runs VACUUM on the snapshot
        tables after the erasure commits (it takes a few milliseconds to
        seconds, depending on table size). WAL segments, backups and
        replicas keep their copies; see the README's erasure section.

        Returns:
            How many versions were erased.
        """
        erased = await self._erase(valid_user_id(user_id), "erase")
        if vacuum:
            async with self._guard("erase", user_id):
                await self._ops.vacuum()
        return erased

    async def erasure_receipt(self, user_id: str) -> ErasureReceipt | None:
        """The newest erasure receipt for `user_id` in this scope, found by its keyed hash.

        Answers "was this person erased, when, and how much" without the
        database ever holding the user id.

        Raises:
            ConfigurationError: the repository has no `erasure_key`.
        """
        user_id = valid_user_id(user_id)
        subject = self._receipt_subject(user_id)
        if subject is None:
            raise ConfigurationError("erasure receipts need the repository's erasure_key")
        params = {
            "subject": subject,
            "tenant": self._scope.tenant,
            "namespace": self._scope.namespace,
        }
        async with self._guard("erasure_receipt", user_id):
            rows = await self._read(self._ops.fetch, receipts_statement(), params)
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

    async def export_user(self, user_id: str) -> dict[str, JsonValue]:
        """Everything stored about the user in this scope, as one JSON-serialisable document.

        For GDPR articles 15 and 20: every version's state and metadata,
        newest first. History is read in pages of 500, so the database never
        returns an unbounded result; the document itself holds every version
        (use `export_user_lines` to stream it instead).
        """
        versions: list[JsonValue] = []
        header: dict[str, JsonValue] = {}
        async for item in self._export_items(user_id):
            if "format" in item:
                header = item
            else:
                versions.append(item)
        return {**header, "versions": versions}

    async def export_user_lines(self, user_id: str) -> AsyncIterator[str]:
        """The export as JSON Lines, streamed: a header line, then one line per version."""
        async for item in self._export_items(user_id):
            yield to_json(item).decode() + "\n"

    async def _export_items(self, user_id: str) -> AsyncIterator[dict[str, JsonValue]]:
        user_id = valid_user_id(user_id)
        yield {
            "format": "snapshot_repo.subject_export",
            "format_version": 1,
            "user_id": user_id,
            "tenant": self._scope.tenant or None,
            "namespace": self._scope.namespace,
            "exported_at": datetime.now(UTC).isoformat(),
        }
        before = MAX_VERSION
        while True:
            params = {**self._scope.key(user_id), "before_version": before, "limit": _EXPORT_PAGE}
            async with self._guard("export_user", user_id):
                opened = await self._snapshot_rows(history_before_statement(), params)
            if not opened:
                return
            for row in opened:
                _user, version, schema_version, payload, created_at, key, actor, reason, meta = row
                yield {
                    "version": version,
                    "created_at": created_at.isoformat(),
                    "schema_version": schema_version,
                    "idempotency_key": key,
                    "actor": actor,
                    "reason": reason,
                    "metadata": None if meta is None else from_json(meta),
                    "state": from_json(payload),
                }
                before = version

    async def rotate_wrapping_key(self, progress: Callable[[int], None] | None = None) -> int:
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
        if self._keys is None:
            raise ConfigurationError("rotate_wrapping_key needs a repository with encryption")
        async with self._guard("rotate_wrapping_key", None):
            return await self._keys.rotate(progress)

    async def reap_expired(
        self, *, batch_size: int = 500, progress: Callable[[int], None] | None = None
    ) -> int:
        """Erase every user of this namespace whose snapshot expired (seed 004's reaping).

        Each user is erased as by `delete` (receipt, feed entry, listeners),
        unless a write cleared the expiry meanwhile. Covers every tenant of
        the namespace (one tenant through a tenant view). On SQLite each batch
        of `batch_size` users shares one WAL checkpoint (see `_erase_batch`).

        Returns:
            How many users were erased.
        """
        check_int("batch_size", batch_size, minimum=1, maximum=10_000)
        reaped = 0
        while True:
            params = {
                "namespace": self._scope.namespace,
                "tenant": self._scope.tenant,
                "now": datetime.now(UTC),
                "limit": batch_size,
            }
            async with self._guard("reap_expired", None):
                rows = await self._read(
                    self._ops.fetch, expired_users_statement(bool(self._scope.tenant)), params
                )
            if not rows:
                return reaped
            erased = await self._erase_batch(
                (
                    (self if tenant == self._scope.tenant else self.for_tenant(tenant), user_id)
                    for tenant, user_id in rows
                ),
                "expired",
                only_expired=True,
            )
            reaped += sum(1 for versions in erased if versions)
            if progress is not None:
                progress(reaped)

    async def prune_history(
        self,
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
        a tenant view) is pruned, `batch_size` users per transaction.

        Returns:
            How many versions were deleted.

        Raises:
            SnapshotValidationError: no bound, or a bound out of range.
        """
        policy = policy_from_arguments(keep_last, older_than)
        check_int("batch_size", batch_size, minimum=1, maximum=10_000)
        cutoff = policy.cutoff(datetime.now(UTC))
        if user_id is not None:
            user_id = valid_user_id(user_id)
            one = self._prune_params(self._scope.tenant, user_id, policy.keep_last, cutoff)
            work = [(prune_statement(self._dialect_name), one)]
            async with self._guard("prune_history", user_id):
                return sum(await self._ops.execute_in_transaction(work))
        pruned = 0
        after: tuple[str, str] = ("", "")
        while True:
            params: dict[str, Any] = {
                "namespace": self._scope.namespace,
                "tenant": self._scope.tenant,
                "after_tenant": after[0],
                "after_user": after[1],
                "limit": batch_size,
            }
            async with self._guard("prune_history", None):
                users = await self._read(
                    self._ops.fetch, users_page_statement(bool(self._scope.tenant)), params
                )
                if not users:
                    return pruned
                work = [
                    (
                        prune_statement(self._dialect_name),
                        self._prune_params(tenant, uid, policy.keep_last, cutoff),
                    )
                    for tenant, uid, _version in users
                ]
                pruned += sum(await self._ops.execute_in_transaction(work))
            if progress is not None:
                progress(pruned)
            after = (users[-1][0], users[-1][1])

    def _prune_params(
        self, tenant: str, user_id: str, keep_last: int | None, cutoff: Any
    ) -> dict[str, Any]:
        # The statement reads the user's newest version itself (see prune_statement).
        return {
            "tenant": tenant,
            "namespace": self._scope.namespace,
            "user_id": user_id,
            "keep_last": keep_last,
            "cutoff": cutoff,
        }
