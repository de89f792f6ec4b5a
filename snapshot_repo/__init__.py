"""snapshot_repo: typed, versioned per-user state snapshots on SQLite and Postgres."""

from .codec import DEFAULT_MAX_PAYLOAD_BYTES, JsonObject
from .engine import EngineSettings, create_engine
from .errors import (
    ConfigurationError,
    SchemaNotReadyError,
    SnapshotRepoError,
    SnapshotValidationError,
    StorageError,
    VersionConflictError,
)
from .repository import MAX_HISTORY_LIMIT, SnapshotRepository
from .snapshot import Snapshot

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "MAX_HISTORY_LIMIT",
    "ConfigurationError",
    "EngineSettings",
    "JsonObject",
    "SchemaNotReadyError",
    "Snapshot",
    "SnapshotRepoError",
    "SnapshotRepository",
    "SnapshotValidationError",
    "StorageError",
    "VersionConflictError",
    "create_engine",
]
