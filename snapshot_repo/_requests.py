"""A write call's arguments, checked and encoded into the request a backend runs.

`upsert_latest` and `upsert_many` hand their arguments here first: every
argument is validated, each state validated against the model and encoded
(the size limit, compression), before any I/O. What comes back is the
`PendingWrite` or `PendingBatch` the backend writes, with the validated
states the stored `Snapshot`s are built from (no read back).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from ._checks import (
    MAX_VERSION,
    check_batch_size,
    check_int,
    valid_actor,
    valid_identifier,
    valid_reason,
    valid_ttl,
    valid_user_id,
)
from ._context import RepositoryContext
from .backends import PendingBatch, PendingWrite
from .codec import JsonObject, encode_metadata
from .errors import SnapshotValidationError
from .snapshot import MAX_IDEMPOTENCY_KEY_LENGTH, Snapshot, StateT

__all__ = ["batch_request", "write_request"]


def write_request(
    context: RepositoryContext[StateT],
    snapshot: Snapshot[Any],
    *,
    expected_version: int | None,
    idempotency_key: str | None,
    actor: str | None,
    reason: str | None,
    metadata: JsonObject | None,
    ttl: timedelta | None,
) -> tuple[PendingWrite, StateT]:
    """`upsert_latest`'s write and its validated state.

    Raises:
        SnapshotValidationError: any argument or the state is invalid.
    """
    if not isinstance(snapshot, Snapshot):
        raise SnapshotValidationError(
            f"upsert_latest takes a Snapshot, not {type(snapshot).__name__}"
        )
    user_id = valid_user_id(snapshot.user_id)
    if expected_version is not None:
        check_int("expected_version", expected_version, minimum=0, maximum=MAX_VERSION)
    if idempotency_key is not None:
        valid_identifier("idempotency_key", idempotency_key, MAX_IDEMPOTENCY_KEY_LENGTH)
    state = context.codec.validate(snapshot.state, user_id)
    created_at = datetime.now(UTC)
    write = PendingWrite(
        scope=context.scope,
        user_id=user_id,
        schema_version=context.schema_version_of(snapshot),
        payload=context.codec.encode(state, user_id),
        created_at=created_at,
        expected_version=expected_version,
        idempotency_key=idempotency_key,
        actor=valid_actor(actor),
        reason=valid_reason(reason),
        metadata=encode_metadata(metadata),
        expires_at=None if ttl is None else created_at + valid_ttl(ttl),
        retention=context.retention_for(created_at),
        notify=context.notify,
    )
    return write, state


def batch_request(
    context: RepositoryContext[StateT],
    snapshots: Sequence[Snapshot[Any]],
    *,
    actor: str | None,
    reason: str | None,
    metadata: JsonObject | None,
) -> tuple[PendingBatch, list[StateT]]:
    """`upsert_many`'s batch and its validated states, in the order given.

    Raises:
        SnapshotValidationError: the batch is not a sequence of 1 to 10,000
            snapshots, or any snapshot or argument is invalid.
    """
    if isinstance(snapshots, Snapshot) or not isinstance(snapshots, Sequence):
        raise SnapshotValidationError("upsert_many takes a sequence of Snapshots")
    check_batch_size("snapshots", len(snapshots))
    created_at = datetime.now(UTC)
    actor, reason = valid_actor(actor), valid_reason(reason)
    encoded_metadata = encode_metadata(metadata)
    user_ids: list[str] = []
    schema_versions: list[int] = []
    payloads: list[bytes] = []
    states: list[StateT] = []
    validate, encode = context.codec.validate, context.codec.encode
    schema_version_of = context.schema_version_of
    for snapshot in snapshots:
        if not isinstance(snapshot, Snapshot):
            raise SnapshotValidationError(
                f"upsert_many takes Snapshots, not {type(snapshot).__name__}"
            )
        user_id = valid_user_id(snapshot.user_id)
        state = validate(snapshot.state, user_id)
        user_ids.append(user_id)
        schema_versions.append(schema_version_of(snapshot))
        payloads.append(encode(state, user_id))
        states.append(state)
    batch = PendingBatch(
        scope=context.scope,
        user_ids=user_ids,
        schema_versions=schema_versions,
        payloads=payloads,
        created_at=created_at,
        actor=actor,
        reason=reason,
        metadata=encoded_metadata,
        retention=context.retention_for(created_at),
        notify=context.notify,
    )
    return batch, states
