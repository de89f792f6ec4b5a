"""`RepositoryOptions`: every keyword option a repository takes, and the checks of a few.

The options are documented once, here; `SnapshotRepository`, `from_url` and
`SyncSnapshotRepository` take them as `**options`. The checks of options
that need more than a type are functions `RepositoryContext` calls while it
is built, so a bad option fails the constructor, before any I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, TypedDict

from .backends import BackendKind
from .compression import Compression
from .crypto import KeyProvider
from .errors import ConfigurationError
from .retention import RetentionPolicy
from .upgrades import Upgrader

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

__all__ = ["RepositoryOptions", "backend_kind", "erasure_key", "feed_retention"]


class RepositoryOptions(TypedDict, total=False):
    """Keyword options of `SnapshotRepository` and `SnapshotRepository.from_url`.

    Attributes:
        max_payload_bytes: largest serialized state accepted (default 1 MiB,
            at most 16 MiB).
        health_timeout: seconds `health()`/`health_check()` wait at most (default 3).
        operation_timeout: seconds any other call may take, pool wait
            included, before it fails with `StorageError` (default 30; None: no limit).
        namespace: which of a user's states this repository holds (default
            "default"): repositories of different models share the tables
            under different namespaces, so one user can have a cart, preferences
            and an agent memory, each typed by its own model.
        notify: on Postgres, send a NOTIFY with every write and erasure, so
            listeners in other processes hear of it at once (default off).
            NOTIFY holds a cluster-wide lock until commit, so notifying writes
            cannot share WAL flushes: measured 4x fewer concurrent writes per
            second. Without it, listeners hear of this process's changes only,
            and other processes catch up through `changes_since`.
        encryption: a `KeyProvider` (e.g. `LocalKeyProvider`): payloads are
            then encrypted under a per-user data key that erasure destroys
            (crypto-shredding; needs the `snapshot-repo[crypto]` extra).
        erasure_key: the secret (at least 16 bytes) that keys the HMAC of
            user ids in erasure receipts. Without it no receipts are written.
            Keep it outside the database: with it, a receipt confirms a
            person was erased; without it, a receipt identifies no one.
        retention: a `RetentionPolicy`; each write then drops the user's
            history versions the policy no longer keeps, in the same transaction.
        schema_version: the schema version of today's model (default 1);
            writes are stored under it unless a snapshot names another.
        upgraders: `{n: fn}` upgrading a state document from schema version
            n to n + 1, applied when older rows are read (see `upgrades`).
        compression: "zstd" compresses each state (after validation and the
            `max_payload_bytes` check, which apply to the JSON, and before
            encryption) when that saves bytes; needs `snapshot-repo[zstd]` on
            Python < 3.14. Every row says whether it is compressed, so rows of
            either kind read with or without the option (reading a compressed
            row needs the codec installed).
        feed_retention: how long the change feed keeps entries (a `timedelta`;
            default None: for ever). `prune_history` and `reap_expired` then
            trim older entries too (as `trim_changes` does), never one a
            consumer registered with `acknowledge_changes` has not acknowledged.
        backend: "auto" (the default) runs on the fast backend of the engine's
            database; "core" runs every call through SQLAlchemy's public Core
            API: slower, for databases and drivers the fast backends do not
            cover, and the reference they are tested against.
        tracer_provider: the OpenTelemetry `TracerProvider` of the spans (one per
            public call, named "{method} {database}", database client semantic
            conventions); default: the global one. Needs `snapshot-repo[otel]`;
            without it, no telemetry and no cost.
        meter_provider: the OpenTelemetry `MeterProvider` of the metrics
            (`db.client.operation.duration`, `db.client.connection.count` and
            `.max`); default: the global one. Spans and metrics never hold a
            user id, tenant, state, metadata, key or error message: see `_telemetry`.
    """

    namespace: str
    notify: bool
    encryption: KeyProvider
    erasure_key: bytes | str
    retention: RetentionPolicy
    schema_version: int
    upgraders: Mapping[int, Upgrader]
    max_payload_bytes: int
    compression: Compression | None
    health_timeout: float
    operation_timeout: float | None
    feed_retention: timedelta | None
    backend: BackendKind
    tracer_provider: TracerProvider
    meter_provider: MeterProvider


def backend_kind(kind: object) -> BackendKind:
    if kind == "core":
        return "core"
    if kind == "auto":
        return "auto"
    raise ConfigurationError(f"backend must be 'auto' or 'core', not {kind!r}")


def feed_retention(retention: object) -> timedelta | None:
    if retention is None:
        return None
    if not isinstance(retention, timedelta) or retention < timedelta(0):
        raise ConfigurationError("feed_retention must be a non-negative timedelta or None")
    return retention


def erasure_key(key: object) -> bytes | None:
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes) or len(key) < 16:
        raise ConfigurationError("erasure_key must be bytes or str of at least 16 bytes")
    return key
