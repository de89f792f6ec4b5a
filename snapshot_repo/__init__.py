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
from .health import HealthReport
from .repository import MAX_BATCH_SIZE, MAX_HISTORY_LIMIT, RepositoryOptions, SnapshotRepository
from .snapshot import Snapshot

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "MAX_BATCH_SIZE",
    "MAX_HISTORY_LIMIT",
    "ConfigurationError",
    "EngineSettings",
    "HealthReport",
    "JsonObject",
    "RepositoryOptions",
    "SchemaNotReadyError",
    "Snapshot",
    "SnapshotRepoError",
    "SnapshotRepository",
    "SnapshotValidationError",
    "StorageError",
    "VersionConflictError",
    "create_engine",
]
