"""The seed-002 contract: writes, latest, history and delete, single and batched.

Each method is one transaction (or one autocommitted statement) that
validates its input first, then does its I/O inside the repository's error
guard, so a caller sees either a result or one of the errors in
`snapshot_repo.errors`. Committed changes are published to in-process
listeners afterwards (`_feed`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Self, cast

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
from ._core import logger
from ._driver import Erasure, PendingBatch, PendingWrite, Retention
from ._feed import ChangeFeed
from ._queries import history_before_statement
from .codec import JsonObject, encode_metadata
from .errors import SnapshotValidationError, VersionConflictError
from .snapshot import MAX_IDEMPOTENCY_KEY_LENGTH, Snapshot, StateT

__all__ = ["MAX_HISTORY_LIMIT", "Contract"]

MAX_HISTORY_LIMIT = 10_000
"""The most versions one `get_history` call returns; page or export for more."""


class Contract(ChangeFeed[StateT]):
    """Store and read one user's versions (seed 002's `StateStore`)."""

    async def upsert_latest(
        self,
        snapshot: Snapshot[StateT] | Snapshot[Any],
        *,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
        actor: str | None = None,
        reason: str | None = None,
        metadata: JsonObject | None = None,
        ttl: timedelta | None = None,
    ) -> Snapshot[StateT]:
        """Store `snapshot` as the user's next version, in `latest` and `history` at once.

        Args:
            snapshot: the user id, the state and its schema version; the
                snapshot's own `version` and `created_at` are ignored.
            expected_version: compare-and-set. None writes unconditionally;
                0 writes only if the user has no snapshot yet; N writes only if
                the latest version is N.
            idempotency_key: the caller's id for this write (1 to 255
                characters). If this user already has a version written with
                the same key, nothing is written and that version is returned,
                so a write whose outcome was unknown (a timeout, a connection
                lost during commit) can be retried safely.
            actor: who or what made the write (1 to 255 characters), kept
                with the version and returned with history.
            reason: why, free text up to 4096 characters.
            metadata: free JSON object describing the write (up to 64 KiB).
            ttl: the snapshot expires this long after the write (seed 004):
                from then on it reads as absent, and `reap_expired` erases the
                user. `timedelta(0)` expires at once; None (the default) never
                expires, and a write without `ttl` cancels an earlier expiry.

        Returns:
            The stored snapshot, with the `version` and `created_at` assigned
            (for a replayed key: the snapshot the first attempt stored).

        Raises:
            SnapshotValidationError: bad user id, state, expected_version or
                idempotency key, or a payload over the size limit. Nothing was written.
            VersionConflictError: `expected_version` did not match. Nothing was written.
            StorageError: the database failed or the operation timed out; the
                write was rolled back whole, or (after a timeout during commit)
                its outcome is unknown: retry with the same idempotency key.
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
        state = self._codec.validate(snapshot.state, user_id)
        created_at = datetime.now(UTC)
        write = PendingWrite(
            scope=self._scope,
            user_id=user_id,
            schema_version=self._schema_version_of(snapshot),
            payload=self._codec.encode(state, user_id),
            created_at=created_at,
            expected_version=expected_version,
            idempotency_key=idempotency_key,
            actor=valid_actor(actor),
            reason=valid_reason(reason),
            metadata=encode_metadata(metadata),
            expires_at=None if ttl is None else created_at + valid_ttl(ttl),
            retention=self._retention_for(created_at),
            notify=self._notify,
        )
        async with self._guard("upsert_latest", user_id):
            outcome = await self._write(write)
            if outcome is None:
                actual = await self._ops.current_version(self._scope, user_id)
            elif isinstance(outcome, tuple):  # the earlier write with this idempotency key
                return self._to_snapshot((await self._open([outcome]))[0])
        if outcome is None:
            raise VersionConflictError(user_id, cast(int, expected_version), actual)
        stored = self._stored(write, state, outcome)
        self._announce("write", user_id, outcome, write.created_at, stored)
        return stored

    async def upsert_many(
        self,
        snapshots: Sequence[Snapshot[StateT] | Snapshot[Any]],
        *,
        actor: str | None = None,
        reason: str | None = None,
        metadata: JsonObject | None = None,
    ) -> list[Snapshot[StateT]]:
        """Store a batch of snapshots in one transaction: all of them, or none.

        Each snapshot becomes its user's next version, as `upsert_latest`
        without `expected_version` would make it; a user appearing several
        times gets consecutive versions in batch order, and the last one is
        the latest. On Postgres the batch is one statement.

        Args:
            snapshots: 1 to 10,000 snapshots. (Idempotency keys and
                compare-and-set are per write: use `upsert_latest` for those.)
            actor: who or what made the writes, recorded on each version.
            reason: why, recorded on each version.
            metadata: free JSON object recorded on each version.

        Returns:
            The stored snapshots, in the order given.

        Raises:
            SnapshotValidationError: any snapshot is invalid, or the batch is
                empty or too large. Nothing was written.
            StorageError: the database failed; nothing was written.
        """
        if isinstance(snapshots, Snapshot) or not isinstance(snapshots, Sequence):
            raise SnapshotValidationError("upsert_many takes a sequence of Snapshots")
        check_batch_size("snapshots", len(snapshots))
        created_at = datetime.now(UTC)
        actor, reason = valid_actor(actor), valid_reason(reason)
        encoded_metadata = encode_metadata(metadata)
        user_ids, schema_versions, payloads, states = [], [], [], []
        validate, encode, schema_version_of = (
            self._codec.validate,
            self._codec.encode,
            self._schema_version_of,
        )
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
            scope=self._scope,
            user_ids=user_ids,
            schema_versions=schema_versions,
            payloads=payloads,
            created_at=created_at,
            actor=actor,
            reason=reason,
            metadata=encoded_metadata,
            retention=self._retention_for(created_at),
            notify=self._notify,
        )
        async with self._guard("upsert_many", None):
            versions = await self._write_many(batch)
        stored = self._stored_batch(batch, states, versions)
        self._announce_writes(stored, created_at)
        return stored

    async def get_latest_many(self, user_ids: Sequence[str]) -> dict[str, Snapshot[StateT]]:
        """The newest snapshot of each of `user_ids` that has one, in one query.

        Args:
            user_ids: 1 to 10,000 user ids; repeats are read once.

        Returns:
            A dict from user id to its latest snapshot; users without one are absent.

        Raises:
            SnapshotValidationError: a bad user id, or the batch is empty or too
                large, or a stored state no longer validates.
            StorageError: the database failed.
        """
        if isinstance(user_ids, str) or not isinstance(user_ids, Sequence):
            raise SnapshotValidationError("get_latest_many takes a sequence of user ids")
        check_batch_size("user_ids", len(user_ids))
        wanted = list(dict.fromkeys(valid_user_id(user_id) for user_id in user_ids))
        async with self._guard("get_latest_many", None):
            rows = await self._read(self._ops.latest_many, self._scope, wanted, datetime.now(UTC))
            rows = await self._open(rows)
        return {snapshot.user_id: snapshot for snapshot in map(self._to_snapshot, rows)}

    async def get_latest(self, user_id: str) -> Snapshot[StateT] | None:
        """The user's newest snapshot, or None if the user has none.

        Raises:
            SnapshotValidationError: bad user id, or the stored state no
                longer validates against the model.
            StorageError: the database failed or the operation timed out.
        """
        user_id = valid_user_id(user_id)
        async with self._guard("get_latest", user_id):
            row = await self._read(self._ops.latest, self._scope, user_id, datetime.now(UTC))
            if row is not None and self._keys is not None:
                row = (await self._open([row]))[0]
        return None if row is None else self._to_snapshot(row)

    async def get_history(
        self,
        user_id: str,
        limit: int = 100,
        *,
        before_version: int | None = None,
        skip_invalid: bool = False,
    ) -> list[Snapshot[StateT]]:
        """The user's newest `limit` versions, newest first (empty if none).

        Costs O(limit) whatever the length of the history: a backward scan of
        the history primary key.

        Args:
            user_id: whose history.
            limit: how many versions at most, 1 to 10,000.
            before_version: keyset paging: only versions below this one (pass
                the last version of the previous page).
            skip_invalid: leave out (and log a warning for) stored states that
                no longer validate against the model, instead of raising.

        Raises:
            SnapshotValidationError: bad user id, `limit` outside 1 to 10,000,
                or (unless `skip_invalid`) a stored state that no longer validates.
            StorageError: the database failed or the operation timed out.
        """
        user_id = valid_user_id(user_id)
        check_int("limit", limit, minimum=1, maximum=MAX_HISTORY_LIMIT)
        async with self._guard("get_history", user_id):
            if before_version is None:
                history = await self._read(self._ops.history, self._scope, user_id, limit)
                rows = await self._open(history)
            else:
                check_int("before_version", before_version, minimum=1, maximum=MAX_VERSION)
                params = {
                    **self._scope.key(user_id),
                    "before_version": before_version,
                    "limit": limit,
                }
                rows = await self._snapshot_rows(history_before_statement(), params)
        if not skip_invalid:
            return [self._to_snapshot(row) for row in rows]
        snapshots = []
        for row in rows:
            try:
                snapshots.append(self._to_snapshot(row))
            except SnapshotValidationError as exc:
                logger.warning("snapshot_repo skipped a stored state: %s", exc)
        return snapshots

    async def delete(self, user_id: str) -> int:
        """Erase the user's latest row and every history row, in one transaction.

        Idempotent. A user written again afterwards starts at version 1.

        Returns:
            How many versions were erased (0 when the user had none).

        Raises:
            SnapshotValidationError: bad user id.
            StorageError: the database failed; nothing was erased.
        """
        return await self._erase(valid_user_id(user_id), "delete")

    async def _erase(
        self,
        user_id: str,
        cause: str,
        *,
        only_expired: bool = False,
        drop_data_key: bool | None = None,
        checkpoint: bool = True,
    ) -> int:
        """Erase one user of this scope (with its receipt, feed entry and notification).

        The user's data key is destroyed when this repository encrypts, or
        whenever `drop_data_key` says so (erasing a person everywhere).
        Without `checkpoint` the caller owes a `checkpoint_erasures` (see
        `_erase_batch`).
        """
        erasure = Erasure(
            scope=self._scope,
            user_id=user_id,
            at=datetime.now(UTC),
            cause=cause,
            receipt_subject=self._receipt_subject(user_id),
            only_expired=only_expired,
            notify=self._notify,
            drop_data_key=self._keys is not None if drop_data_key is None else drop_data_key,
            checkpoint=checkpoint,
        )
        async with self._guard(cause, user_id):
            erased, last_version = await self._ops.delete(erasure)
        if self._keys is not None:
            self._keys.forget(self._scope, user_id)
        if erased:
            self._announce("erase", user_id, last_version, erasure.at)
        return erased

    async def _erase_batch(
        self,
        erasures: Iterable[tuple[Self, str]],
        cause: str,
        *,
        only_expired: bool = False,
        drop_data_key: bool | None = None,
    ) -> list[int]:
        """Erase each (view, user id), one transaction each, sharing one WAL checkpoint.

        On SQLite with `secure_delete` the checkpoint that makes an erasure
        leave no trace costs three fsyncs more than the erasure's commit;
        a batch (reaping, purging, a person across namespaces) runs it once at
        the end, also when an erasure fails part-way, so every erasure that
        committed has left no trace by the time this returns or raises.

        Returns:
            How many versions each erasure erased, in order (0: nothing to erase).
        """
        erased: list[int] = []
        try:
            for view, user_id in erasures:
                erased.append(
                    await view._erase(
                        user_id,
                        cause,
                        only_expired=only_expired,
                        drop_data_key=drop_data_key,
                        checkpoint=False,
                    )
                )
        finally:
            if any(erased):
                async with self._guard(cause, None):
                    await self._ops.checkpoint_erasures()
        return erased

    def _retention_for(self, now: datetime) -> Retention | None:
        policy = self._retention
        if policy is None:
            return None
        return Retention(keep_last=policy.keep_last, cutoff=policy.cutoff(now))
