"""The values that pass between the repository and a backend: scopes, writes, erasures.

Validated by the repository before any I/O; a backend only reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from ..errors import ConnectionLostError

__all__ = [
    "DataKeyChanged",
    "DataKeyRef",
    "Erasure",
    "PendingBatch",
    "PendingWrite",
    "Retention",
    "Row",
    "Scope",
    "StoredRow",
    "WriteOutcome",
    "is_retryable",
]


class StoredRow(NamedTuple):
    """A stored snapshot row, read by name, type-converted by the backend that read it.

    `payload` is the stored bytes (sealed when encryption is on, until the
    repository opens it) and `metadata` the write metadata's JSON bytes.
    """

    user_id: str
    version: int
    schema_version: int
    payload: bytes
    created_at: datetime
    idempotency_key: str | None
    actor: str | None
    reason: str | None
    metadata: bytes | None


Row = StoredRow
"""A stored snapshot row, its values in `ROW_COLUMNS` order, already type-converted."""


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a repository's rows live: a tenant ("" for none) and a namespace."""

    tenant: str
    namespace: str

    def key(self, user_id: str) -> dict[str, Any]:
        """The bound values that select one user's rows in this scope."""
        return {"tenant": self.tenant, "namespace": self.namespace, "user_id": user_id}


@dataclass(frozen=True, slots=True)
class Retention:
    """Which history versions a write drops in its own transaction (see `prune_condition`)."""

    keep_last: int | None
    cutoff: Any

    def params(self) -> dict[str, Any]:
        return {"keep_last": self.keep_last, "cutoff": self.cutoff}


@dataclass(frozen=True, slots=True)
class Erasure:
    """One user's erasure: where, when, why, and the receipt to record (if any)."""

    scope: Scope
    user_id: str
    at: Any
    cause: str = "delete"
    receipt_subject: str | None = None
    only_expired: bool = False
    notify: bool = False
    drop_data_key: bool = False
    checkpoint: bool = True
    """SQLite: checkpoint the WAL after this erasure's commit. A batch of erasures
    clears it and calls `checkpoint_erasures` once instead."""

    def key(self) -> dict[str, Any]:
        return self.scope.key(self.user_id)

    @property
    def feed_subject(self) -> str:
        """Who the erasure's feed entry names: the receipt subject (an HMAC of the user
        id), or "" without an erasure key. Never the user id: it would outlive the erasure."""
        return self.receipt_subject or ""

    def feed_params(self, version: int) -> dict[str, Any]:
        return {
            **self.key(),
            "user_id": self.feed_subject,
            "version": version,
            "created_at": self.at,
            "actor": None,
            "reason": None,
            "metadata": None,
        }

    def receipt_params(self, versions_erased: int) -> dict[str, Any]:
        return {
            "subject": self.receipt_subject,
            "tenant": self.scope.tenant,
            "namespace": self.scope.namespace,
            "created_at": self.at,
            "versions_erased": versions_erased,
            "cause": self.cause,
        }


@dataclass(frozen=True, slots=True)
class DataKeyRef:
    """The data key a write sealed its payload under, as the write must find it at commit.

    `new`: made for this write and not stored yet; the write stores it in its
    own transaction (so a write that fails leaves no key behind). Otherwise
    the write checks that the stored key is still this one (an erasure may
    have destroyed it since it was read). Either way, if not, the write rolls
    back and raises `DataKeyChanged`.
    """

    key_id: str
    wrapped_key: bytes
    new: bool
    created_at: Any

    def params(self, scope: Scope, user_id: str) -> dict[str, Any]:
        return {
            **scope.key(user_id),
            "key_id": self.key_id,
            "wrapped_key": self.wrapped_key,
            "created_at": self.created_at,
        }


class DataKeyChanged(Exception):
    """A write's data key was destroyed or replaced before it committed; nothing was written.

    The repository reseals the payload under the user's current key and
    writes again (see `RepositoryContext.write`); it never reaches callers.
    """


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """One validated write, ready for the database."""

    scope: Scope
    user_id: str
    schema_version: int
    payload: bytes
    created_at: Any
    expected_version: int | None = None
    idempotency_key: str | None = None
    actor: str | None = None
    reason: str | None = None
    metadata: bytes | None = None
    expires_at: Any = None
    retention: Retention | None = None
    notify: bool = False
    data_key: DataKeyRef | None = None

    def params(self) -> dict[str, Any]:
        scope = self.scope
        params = {
            "w_tenant": scope.tenant,
            "w_namespace": scope.namespace,
            "w_user_id": self.user_id,
            "w_schema_version": self.schema_version,
            "w_payload": self.payload,
            "w_created_at": self.created_at,
            "w_idempotency_key": self.idempotency_key,
            "w_actor": self.actor,
            "w_reason": self.reason,
            "w_metadata": self.metadata,
            "w_expires_at": self.expires_at,
            "expected_version": self.expected_version,
        }
        if self.retention is not None:
            params.update(self.retention.params())
        return params

    def keyed_params(self) -> dict[str, Any]:
        return {**self.scope.key(self.user_id), "idempotency_key": self.idempotency_key}


@dataclass(frozen=True, slots=True)
class PendingBatch:
    """Validated writes of many users (`upsert_many`), as parallel lists.

    Everything but the user, the schema version and the payload is the
    batch's, so nothing per write is built beyond the three values: at 500
    writes a call, per-write objects were a visible share of the call.
    """

    scope: Scope
    user_ids: list[str]
    schema_versions: list[int]
    payloads: list[bytes]
    created_at: Any
    actor: str | None = None
    reason: str | None = None
    metadata: bytes | None = None
    retention: Retention | None = None
    notify: bool = False
    data_keys: Mapping[str, DataKeyRef] | None = None
    """Encrypted batches: each user's data key (see `DataKeyRef`)."""

    def write(self, index: int) -> PendingWrite:
        """The batch's write number `index` on its own (for one-at-a-time paths)."""
        return PendingWrite(
            scope=self.scope,
            user_id=self.user_ids[index],
            schema_version=self.schema_versions[index],
            payload=self.payloads[index],
            created_at=self.created_at,
            actor=self.actor,
            reason=self.reason,
            metadata=self.metadata,
            retention=self.retention,
            notify=self.notify,
        )

    def distinct_users(self) -> bool:
        return len(set(self.user_ids)) == len(self.user_ids)


WriteOutcome = int | Row | None
"""The new version; the earlier row when the idempotency key was used before; None on a
compare-and-set that found another version."""


def is_retryable(exc: BaseException) -> bool:
    """Whether `exc` says the connection was lost, so that repeating a read is safe and useful.

    Cancellation and timeouts are not: the caller asked to stop.
    """
    return isinstance(exc, ConnectionLostError)
