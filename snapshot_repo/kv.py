"""A key/value facade (seeds 000/001): opaque JSON objects keyed by a string.

Some services do not want models, versions or write metadata: they want to
`save` a JSON blob under a key at shutdown and `load` it at the next boot.
`KeyValue` is that contract, kept small so services type against it and tests
swap implementations:

- `KeyValueStore` keeps the blobs in the snapshot tables, through a
  `SnapshotRepository` without a model, in its own namespace (``"kv"`` by
  default). Keys are user ids; every save is a new version, so the history
  of a key stays readable (here and through any JSON repository on the same
  namespace).
- `InMemoryStore` keeps them in process memory, for tests and as an explicit
  non-durable default. It validates and serializes exactly as the database
  store does (one `StateCodec`), so a value it accepts is one the database
  accepts, and what `load` returns is what the database would return.

Both refuse a bad key or value with `SnapshotValidationError` before
changing anything, and neither hands out an object it keeps: `save` stores
serialized bytes and `load` builds a fresh dict from them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable
from types import TracebackType
from typing import Protocol, Self, TypeVar, Unpack, runtime_checkable

from sqlalchemy.engine import URL

from ._checks import check_int, valid_user_id
from ._closing import AsyncClosing
from .codec import DEFAULT_MAX_PAYLOAD_BYTES, JsonObject, StateCodec
from .engine import EngineSettings
from .errors import ConfigurationError
from .repository import MAX_HISTORY_LIMIT, RepositoryOptions, SnapshotRepository
from .snapshot import Snapshot

__all__ = ["DEFAULT_KV_NAMESPACE", "InMemoryStore", "KeyValue", "KeyValueStore"]

DEFAULT_KV_NAMESPACE = "kv"
"""The namespace `KeyValueStore.from_url` stores in: apart from the repositories' default."""

_KEYS_PAGE_SIZE = 1_000  # iter_keys() reads the key listing in pages of this many

_ResultT = TypeVar("_ResultT")


@runtime_checkable
class KeyValue(Protocol):
    """What a service needs from a key/value store of JSON objects (seeds 000/001).

    Keys are 1 to 255 characters without control characters or lone
    surrogates; values are JSON objects (`JsonObject`) without NaN or
    infinities. Every method refuses a bad key, value or limit with
    `SnapshotValidationError` before changing anything. All methods are
    coroutines, except `iter_keys`, which returns an async iterator.
    """

    async def load(self, key: str) -> JsonObject | None:
        """The value last saved under `key` (a fresh dict), or None if there is none."""
        ...

    async def save(self, key: str, value: JsonObject) -> None:
        """Store `value` under `key`, replacing the previous value; durable when it returns."""
        ...

    async def delete(self, key: str) -> bool:
        """Erase `key` and its history; True if there was something to erase."""
        ...

    def iter_keys(self) -> AsyncIterator[str]:
        """Every key that holds a value, each once, in the store's key order."""
        ...

    async def history(self, key: str, limit: int = 100) -> list[JsonObject]:
        """The newest `limit` (1 to 10,000) values saved under `key`, newest first."""
        ...

    async def flush(self) -> None:
        """Return once every write this store had in flight has finished."""
        ...

    async def close(self) -> None:
        """Flush, then release what the store owns."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class KeyValueStore(AsyncClosing, KeyValue):
    """JSON objects keyed by a string, in the snapshot tables (seed 000's durable backend).

    A thin facade over a `SnapshotRepository` without a model: a key is a
    user id of the repository's namespace, `save` is `upsert_latest`, `load`
    is `get_latest`. So the data is ordinary snapshot data: a JSON repository
    on the same namespace reads and writes the same keys, migrations and
    health checks are the repository's, and a key's earlier values stay in
    its history until it is deleted.

    Args:
        repository: a repository without a model (`SnapshotRepository.from_url(url)`
            or `SnapshotRepository(engine)`), possibly a tenant view. The store
            uses it as it is (its namespace, tenant and limits) and never closes
            it: it belongs to the caller. Use `from_url` for a store that owns
            its repository.

    Raises:
        ConfigurationError: `repository` is not a `SnapshotRepository`, or it
            has a state model (its states would not be plain JSON objects).

    No I/O happens in the constructor. One store may be shared by any number
    of tasks of one event loop.
    """

    def __init__(self, repository: SnapshotRepository[JsonObject]) -> None:
        if not isinstance(repository, SnapshotRepository):
            raise ConfigurationError(
                f"KeyValueStore takes a SnapshotRepository, not {type(repository).__name__}"
            )
        if repository.state_type != JsonObject:
            raise ConfigurationError(
                "KeyValueStore needs a repository without a model (states are JSON "
                f"objects), not one of {repository.state_type!r}"
            )
        self._repository = repository
        self._owns_repository = False
        # One future per write in flight, resolved when it finishes: `flush`
        # waits for the ones present when it is called.
        self._writes: set[asyncio.Future[None]] = set()

    @classmethod
    def from_url(
        cls,
        url: str | URL,
        *,
        settings: EngineSettings | None = None,
        **options: Unpack[RepositoryOptions],
    ) -> KeyValueStore:
        """A store that owns a repository (and engine) on `url`; `close()` disposes them.

        Args:
            url: a SQLite or Postgres URL, as for `SnapshotRepository.from_url`.
            settings: the connection settings (timeouts, pool, SQLite pragmas).
            **options: see `RepositoryOptions`; `namespace` defaults to
                ``"kv"`` (`DEFAULT_KV_NAMESPACE`) rather than the repositories'
                ``"default"``, so the key/value data stays apart from typed states.

        Raises:
            ConfigurationError: the URL is not SQLite or Postgres, or an option is invalid.

        No I/O happens here: the tables must exist (`migrate()`) before use.
        """
        merged: RepositoryOptions = {"namespace": DEFAULT_KV_NAMESPACE, **options}
        store = cls(SnapshotRepository.from_url(url, settings=settings, **merged))
        store._owns_repository = True
        return store

    @property
    def repository(self) -> SnapshotRepository[JsonObject]:
        """The repository the data lives in: for history details, health, change feeds."""
        return self._repository

    @property
    def namespace(self) -> str:
        """The namespace of the repository, where the keys live."""
        return self._repository.namespace

    async def migrate(self) -> None:
        """Create or upgrade the tables (`SnapshotRepository.migrate`); idempotent.

        Raises:
            StorageError: the database failed or refused a migration.
        """
        await self._repository.migrate()

    async def load(self, key: str) -> JsonObject | None:
        """The value last saved under `key`, or None if there is none.

        A missing key is not an error: a first boot gets None. Each call
        returns a new dict, so changing it changes nothing stored.

        Raises:
            SnapshotValidationError: a bad key.
            StorageError: the database failed or the operation timed out.
        """
        snapshot = await self._repository.get_latest(valid_user_id(key))
        return None if snapshot is None else snapshot.state

    async def save(self, key: str, value: JsonObject) -> None:
        """Store `value` under `key` as its next version, replacing the previous value.

        The value is validated and serialized before the call first waits,
        so changing the dict afterwards (even while the save is still
        running) does not change what is stored. When the call returns, the
        write is committed: durable, and visible to every reader.

        Raises:
            SnapshotValidationError: a bad key, a value that is not a JSON
                object (sets, bytes, non-string keys), NaN or an infinity, a
                lone surrogate, or a value over `max_payload_bytes`. Nothing
                was written.
            StorageError: the database failed or the operation timed out; the
                write was rolled back (or, after a timeout during commit, its
                outcome is unknown: saving again is safe).
        """
        # Unparametrized on purpose: the repository's codec validates the value
        # (raising SnapshotValidationError), not pydantic while building the snapshot.
        snapshot: Snapshot[JsonObject] = Snapshot(user_id=valid_user_id(key), state=value)
        await self._tracked(self._repository.upsert_latest(snapshot))

    async def delete(self, key: str) -> bool:
        """Erase `key`: its value and every earlier one, in one transaction.

        Idempotent. A key saved again afterwards starts a new history.

        Returns:
            True if the key held a value, False if there was nothing to erase.

        Raises:
            SnapshotValidationError: a bad key.
            StorageError: the database failed; nothing was erased.
        """
        user_id = valid_user_id(key)
        return await self._tracked(self._repository.delete(user_id)) > 0

    async def iter_keys(self) -> AsyncIterator[str]:
        """Every key that holds a value, in the database's order of user ids.

        Reads the listing in pages of 1,000 by keyset (`list_users`), so
        iterating costs O(keys) in all and holds no connection between pages.
        Keys saved or deleted during the iteration may or may not be seen;
        none is seen twice.

        Raises:
            StorageError: the database failed (from the `async for`).
        """
        after: str | None = None
        while True:
            page = await self._repository.list_users(after=after, limit=_KEYS_PAGE_SIZE)
            for key in page:
                yield key
            if len(page) < _KEYS_PAGE_SIZE:
                return
            after = page[-1]

    async def history(self, key: str, limit: int = 100) -> list[JsonObject]:
        """The newest `limit` values saved under `key`, newest first (empty if none).

        Raises:
            SnapshotValidationError: a bad key, or `limit` outside 1 to 10,000.
            StorageError: the database failed or the operation timed out.
        """
        snapshots = await self._repository.get_history(valid_user_id(key), limit)
        return [snapshot.state for snapshot in snapshots]

    async def flush(self) -> None:
        """Wait until every write this store had in flight when called has finished.

        Each `save` and `delete` is committed before it returns, so nothing
        is ever buffered. What `flush` adds is for shutdown: writes still
        running in other tasks (started through this store, and already
        begun running: a task created but not yet scheduled has not begun)
        finish before it returns, and so before `close()` disposes the
        engine. Writes begun after `flush` was called are not waited for, so
        a steady stream of saves cannot hold it forever.

        It waits as long as those writes take, each bounded by the
        repository's `operation_timeout`. It never raises for a write that
        failed (that write's caller got the error), and cancelling it does
        not cancel the writes.
        """
        if self._writes:
            await asyncio.wait(list(self._writes))

    async def close(self) -> None:
        """Flush, then dispose the repository's engine if this store created it (`from_url`).

        A repository given to the constructor belongs to the caller and stays open.
        """
        await self.flush()
        if self._owns_repository:
            await self._repository.close()

    def __repr__(self) -> str:
        return f"KeyValueStore({self._repository!r})"

    async def _tracked(self, write: Awaitable[_ResultT]) -> _ResultT:
        """Run `write`, registered as in flight (for `flush`) until it finishes either way."""
        finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writes.add(finished)
        try:
            return await write
        finally:
            self._writes.discard(finished)
            finished.set_result(None)


class _SharedMap:
    """The state every clone of one `InMemoryStore` shares: per key, its payloads, oldest first."""

    def __init__(self, codec: StateCodec[JsonObject]) -> None:
        self.codec = codec
        self.payloads: dict[str, list[bytes]] = {}
        # The map may be shared by clones in other threads (each with its own loop).
        self.lock = threading.Lock()


class InMemoryStore(AsyncClosing, KeyValue):
    """JSON objects keyed by a string, in process memory: for tests, and as a non-durable default.

    Same interface and semantics as `KeyValueStore`, minus durability:
    keys and values are checked by the same rules and refused with the same
    errors; values are stored serialized, exactly as the database store
    encodes them, so a loaded value equals what the database would return
    and callers never share a dict with the store; a save keeps the previous
    values as history; `delete` erases it all.

    Clones (`clone()`) share one map, as handles on one database do: a write
    through any of them is seen by all. Data lives as long as some clone does;
    `close()` does not erase it.

    Args:
        max_payload_bytes: the largest serialized value accepted, as the
            repository option of that name (default 1 MiB).

    Raises:
        ConfigurationError: `max_payload_bytes` is out of range.
    """

    def __init__(self, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self._shared = _SharedMap(StateCodec(None, max_payload_bytes))

    def clone(self) -> InMemoryStore:
        """Another handle on the same data (seed 001's cheap `Clone` of an `Arc`)."""
        clone = InMemoryStore.__new__(InMemoryStore)
        clone._shared = self._shared
        return clone

    async def load(self, key: str) -> JsonObject | None:
        """The value last saved under `key` (a new dict), or None if there is none.

        Raises:
            SnapshotValidationError: a bad key.
        """
        key = valid_user_id(key)
        with self._shared.lock:
            payloads = self._shared.payloads.get(key)
            if not payloads:
                return None
            newest, version = payloads[-1], len(payloads)
        return self._shared.codec.decode(newest, key, version)

    async def save(self, key: str, value: JsonObject) -> None:
        """Store `value` under `key` as its next version, replacing the previous value.

        Raises:
            SnapshotValidationError: a bad key or value, as `KeyValueStore.save`.
                Nothing was written.
        """
        key = valid_user_id(key)
        codec = self._shared.codec
        payload = codec.encode(codec.validate(value, key), key)
        with self._shared.lock:
            self._shared.payloads.setdefault(key, []).append(payload)

    async def delete(self, key: str) -> bool:
        """Erase `key` and its history; True if it held a value.

        Raises:
            SnapshotValidationError: a bad key.
        """
        key = valid_user_id(key)
        with self._shared.lock:
            return self._shared.payloads.pop(key, None) is not None

    async def iter_keys(self) -> AsyncIterator[str]:
        """Every key that holds a value, in code point order.

        The keys are taken when the iteration starts: later saves and
        deletes do not change what it yields.
        """
        with self._shared.lock:
            keys = sorted(self._shared.payloads)
        for key in keys:
            yield key

    async def history(self, key: str, limit: int = 100) -> list[JsonObject]:
        """The newest `limit` values saved under `key`, newest first (empty if none).

        Raises:
            SnapshotValidationError: a bad key, or `limit` outside 1 to 10,000.
        """
        key = valid_user_id(key)
        check_int("limit", limit, minimum=1, maximum=MAX_HISTORY_LIMIT)
        with self._shared.lock:
            payloads = list(self._shared.payloads.get(key, ()))
        newest = range(len(payloads), max(len(payloads) - limit, 0), -1)
        return [self._shared.codec.decode(payloads[v - 1], key, v) for v in newest]

    async def flush(self) -> None:
        """Return at once: a save has finished when its call returns, and none ever waits."""

    async def close(self) -> None:
        """Flush; the data stays, for the other clones."""
        await self.flush()

    def __repr__(self) -> str:
        # Keys are user ids: show how many, never which.
        with self._shared.lock:
            count = len(self._shared.payloads)
        return f"InMemoryStore(keys={count})"
