"""The repository's use of crypto-shredding: sealing writes, opening reads, rotating keys.

A write reads the user's data key (never from the cache: another process
may have erased the user since), or makes a new one, seals its payload under
it, and hands the key to the backend (`DataKeyRef`), which stores the new key
or checks the old one inside the write's own transaction. So a write never
commits a payload under a key an erasure destroyed, and a write that fails
leaves no key behind. Keys are cached unwrapped in memory for reads
(bounded), and deleted with the user's erasure. See `crypto` for the scheme
and what it protects.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Any

from sqlalchemy import Select, Update, bindparam, select, update

from .backends import Backend, DataKeyRef, Row, Scope
from .backends.statements import is_key
from .crypto import KeyProvider, new_data_key, open_payload, seal_payload
from .errors import DecryptionError, redact
from .tables import data_keys_table

__all__ = ["DataKeys"]

_CACHE_SIZE = 10_000
_ROTATE_PAGE = 500


@cache
def _find_statement() -> Select[Any]:
    return select(data_keys_table.c.key_id, data_keys_table.c.wrapped_key).where(
        is_key(data_keys_table)
    )


@cache
def _page_statement() -> Select[Any]:
    table = data_keys_table
    return (
        select(
            table.c.tenant, table.c.namespace, table.c.user_id, table.c.key_id, table.c.wrapped_key
        )
        .where(table.c.key_id != bindparam("active"))
        .order_by(table.c.tenant, table.c.namespace, table.c.user_id)
        .limit(bindparam("limit"))
    )


@cache
def _rewrap_statement() -> Update:
    return (
        update(data_keys_table)
        .where(is_key(data_keys_table), data_keys_table.c.key_id == bindparam("old_key_id"))
        .values(key_id=bindparam("new_key_id"), wrapped_key=bindparam("new_wrapped"))
    )


def _associated(scope: Scope, user_id: str) -> bytes:
    return f"{scope.tenant}\x00{scope.namespace}\x00{user_id}".encode()


class DataKeys:
    """One repository's data keys: get or create, seal, open, forget, rotate."""

    def __init__(self, provider: KeyProvider, ops: Backend) -> None:
        self._provider = provider
        self._ops = ops
        self._cache: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()

    async def seal(self, scope: Scope, user_id: str, payload: bytes) -> bytes:
        """`payload` encrypted under the user's data key (created on first use).

        Writes always read the key row, never the cache: another process may
        have erased the user (and destroyed the key) since it was cached, and
        a write sealed under a destroyed key could never be read.
        """
        key = await self._key(scope, user_id, create=True, cached=False)
        assert key is not None
        return seal_payload(key, payload, _associated(scope, user_id))

    async def for_write(self, scope: Scope, user_id: str, at: datetime) -> tuple[bytes, DataKeyRef]:
        """The user's data key as stored now, or a new one to store with the write.

        Returns the unwrapped key to seal with and the reference the backend
        checks or stores in the write's transaction.
        """
        rows = await self._ops.fetch(_find_statement(), scope.key(user_id))
        if rows:
            key_id, wrapped = rows[0]
            wrapped = bytes(wrapped)
            return self._provider.unwrap(key_id, wrapped), DataKeyRef(key_id, wrapped, False, at)
        key = new_data_key()
        key_id, wrapped = self._provider.wrap(key)
        return key, DataKeyRef(key_id, wrapped, True, at)

    def seal_with(self, key: bytes, scope: Scope, user_id: str, payload: bytes) -> bytes:
        """`payload` sealed under `key` (from `for_write`) for this user."""
        return seal_payload(key, payload, _associated(scope, user_id))

    def remember(self, scope: Scope, user_id: str, key: bytes) -> None:
        """Cache the key a write committed under, for the reads that follow."""
        cache_key = (scope.tenant, scope.namespace, user_id)
        self._cache[cache_key] = key
        self._cache.move_to_end(cache_key)
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)

    async def open_rows(self, scope: Scope, rows: Sequence[Row]) -> list[Row]:
        """Rows with their payloads decrypted (see `open_stored`)."""
        return [
            row._replace(
                payload=await self.open_stored(scope, row.user_id, row.version, row.payload)
            )
            for row in rows
        ]

    async def open_stored(self, scope: Scope, user_id: str, version: int, payload: bytes) -> bytes:
        """One stored payload of the user, decrypted (plain payloads pass through).

        A cached key that does not open a payload is read again once: another
        process may have erased the user and written it anew under a new key.
        """
        key = await self._key(scope, user_id, create=False)
        where = f"the state of user {redact(user_id)} version {version}"
        associated = _associated(scope, user_id)
        try:
            return open_payload(key, bytes(payload), associated, where)
        except DecryptionError:
            fresh = await self._key(scope, user_id, create=False, cached=False)
            if fresh is None or fresh == key:
                raise
            return open_payload(fresh, bytes(payload), associated, where)

    def forget(self, scope: Scope, user_id: str) -> None:
        """Drop the cached key of an erased user."""
        self._cache.pop((scope.tenant, scope.namespace, user_id), None)

    async def rotate(self, progress: Callable[[int], None] | None = None) -> int:
        """Re-wrap every data key not yet under the provider's active key; how many.

        Payloads are untouched. Each page is one transaction; a key changed
        meanwhile is skipped (the update checks the old key id), so the job
        can be stopped and rerun.
        """
        active = self._provider.active_key_id
        rewrapped = 0
        while True:
            rows = await self._ops.fetch(
                _page_statement(), {"active": active, "limit": _ROTATE_PAGE}
            )
            if not rows:
                return rewrapped
            work = []
            for tenant, namespace, user_id, key_id, wrapped in rows:
                data_key = self._provider.unwrap(key_id, bytes(wrapped))
                new_key_id, new_wrapped = self._provider.wrap(data_key)
                params = {
                    "tenant": tenant,
                    "namespace": namespace,
                    "user_id": user_id,
                    "old_key_id": key_id,
                    "new_key_id": new_key_id,
                    "new_wrapped": new_wrapped,
                }
                work.append((_rewrap_statement(), params))
            rewrapped += sum(await self._ops.execute_in_transaction(work))
            if progress is not None:
                progress(rewrapped)

    async def _key(
        self, scope: Scope, user_id: str, *, create: bool, cached: bool = True
    ) -> bytes | None:
        cache_key = (scope.tenant, scope.namespace, user_id)
        key = self._cache.get(cache_key) if cached else None
        if key is not None:
            self._cache.move_to_end(cache_key)
            return key
        rows = await self._ops.fetch(_find_statement(), scope.key(user_id))
        if not rows and create:
            key_id, wrapped = self._provider.wrap(new_data_key())
            values = {
                **scope.key(user_id),
                "key_id": key_id,
                "wrapped_key": wrapped,
                "created_at": datetime.now(UTC),
            }
            await self._ops.execute_in_transaction([(self._ops.claim_key_statement, values)])
            rows = await self._ops.fetch(_find_statement(), scope.key(user_id))  # a racer's wins
        if not rows:
            return None
        key_id, wrapped = rows[0]
        key = self._provider.unwrap(key_id, bytes(wrapped))
        self._cache[cache_key] = key
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return key
