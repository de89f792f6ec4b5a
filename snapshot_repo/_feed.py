"""The change feed on the repository: durable catch-up reads and live listeners."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from ._checks import check_int
from ._core import RepositoryCore
from ._driver import row_decoder
from ._queries import CHANGE_FEED_COLUMNS, changes_since_statement
from .changes import (
    Change,
    ChangeCallback,
    ChangeHub,
    ChangePage,
    ChangeStream,
    Subscription,
    decode_cursor,
    encode_cursor,
    hub_for,
)
from .codec import decode_metadata
from .snapshot import Snapshot, StateT
from .tables import changes_table

__all__ = ["MAX_FEED_PAGE", "ChangeFeed"]

MAX_FEED_PAGE = 10_000
_LIVE_QUEUE = 10_000


class ChangeFeed(RepositoryCore[StateT]):
    """Follow the writes and erasures of this repository's scope (namespace and tenant)."""

    async def changes_since(self, cursor: str | None = None, limit: int = 100) -> ChangePage:
        """Committed changes after `cursor`, oldest first (seed 004's `transitions_since`).

        Start with `cursor=None`; pass each page's `cursor` to the next call.
        A consumer that was down resumes where it stopped and misses nothing
        that is still in the feed. Erased users' earlier writes leave the feed
        with their data; their erasure remains as one `erase` entry.

        Raises:
            SnapshotValidationError: a cursor this library did not make, or
                `limit` outside 1 to 10,000.
            StorageError: the database failed.
        """
        after_txid, after_seq = decode_cursor(cursor)
        check_int("limit", limit, minimum=1, maximum=MAX_FEED_PAGE)
        params = {
            "tenant": self._scope.tenant,
            "namespace": self._scope.namespace,
            "after_txid": after_txid,
            "after_seq": after_seq,
            "limit": limit,
        }
        statement = changes_since_statement(self._dialect_name)
        async with self._guard("changes_since", None):
            raw_rows = await self._read(self._ops.fetch, statement, params)
        decode = row_decoder(
            self._engine.dialect, [changes_table.c[name] for name in CHANGE_FEED_COLUMNS]
        )
        changes = []
        next_cursor = cursor or encode_cursor(0, 0)
        for raw in raw_rows:
            seq, txid, user_id, version, kind, created_at, actor, reason, metadata = decode(raw)
            changes.append(
                self._scoped_change(
                    seq=seq,
                    user_id=user_id,
                    version=version,
                    kind=kind,
                    created_at=created_at,
                    actor=actor,
                    reason=reason,
                    metadata=decode_metadata(metadata),
                )
            )
            next_cursor = encode_cursor(txid or 0, seq)
        return ChangePage(changes=changes, cursor=next_cursor)

    async def subscribe(self, callback: ChangeCallback) -> Subscription:
        """Call `callback(change)` after each committed write or erasure in this scope.

        `callback` may be a function or a coroutine function; its errors are
        logged, never raised into writers. Changes made through repositories
        of this process arrive; on Postgres, so do those of other processes
        whose repositories have `notify=True` (LISTEN/NOTIFY; one pooled
        connection is held while anyone listens).
        Close the returned subscription to stop.
        """
        hub = hub_for(self._engine)
        assert hub is not None
        async with self._guard("subscribe", None):
            return await hub.subscribe(self._scope.tenant, self._scope.namespace, callback)

    def changes(self) -> ChangeStream:
        """Live changes of this scope: `async with repo.changes() as stream: async for ...`.

        Delivery is best effort (see `ChangeStream`); pair it with
        `changes_since` where nothing may be missed.
        """
        hub = hub_for(self._engine)
        assert hub is not None
        return ChangeStream(hub, self._scope.tenant, self._scope.namespace, _LIVE_QUEUE)

    def _announce(
        self,
        kind: Literal["write", "erase"],
        user_id: str,
        version: int,
        at: datetime,
        snapshot: Snapshot[StateT] | None = None,
    ) -> None:
        """Deliver a commit of this process to local listeners, if there are any.

        Skipped when the write sent a NOTIFY: the hub's LISTEN connection
        delivers it, to this process as to every other. When nobody listens to
        the scope no `Change` is built (a bulk write would build thousands).
        """
        hub = self._local_hub()
        if hub is None:
            return
        hub.publish(
            self._scoped_change(
                seq=None,
                user_id=user_id,
                version=version,
                kind=kind,
                created_at=at,
                actor=snapshot.actor if snapshot else None,
                reason=snapshot.reason if snapshot else None,
                metadata=snapshot.metadata if snapshot else None,
            )
        )

    def _announce_writes(self, snapshots: Sequence[Snapshot[StateT]], at: datetime) -> None:
        """`_announce` each write of a batch; whether anyone listens is asked once."""
        if self._local_hub() is None:
            return
        for snapshot in snapshots:
            self._announce("write", snapshot.user_id, snapshot.version, at, snapshot)

    def _local_hub(self) -> ChangeHub | None:
        """The hub to publish this process's commits to: None when the write sent a
        NOTIFY (see `_announce`) or when nobody here listens to the scope."""
        hub = None if self._notify else hub_for(self._engine, create=False)
        if hub is None or not hub.listens_to(self._scope.tenant, self._scope.namespace):
            return None
        return hub

    def _scoped_change(self, **fields: Any) -> Change:
        """A `Change` of this repository's scope."""
        return Change(tenant=self._scope.tenant, namespace=self._scope.namespace, **fields)
