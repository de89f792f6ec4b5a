"""snapshot_repo: typed, versioned per-user state on SQLite, Postgres and MariaDB/MySQL."""

from .backends.replicas import primary_reads
from .changes import Change, ChangePage, ChangeStream, FeedConsumer, Subscription
from .codec import DEFAULT_MAX_PAYLOAD_BYTES, JsonObject
from .crypto import KeyProvider, LocalKeyProvider
from .engine import EngineSettings, create_engine
from .erasure import erase_user
from .errors import (
    ConfigurationError,
    ConnectionLostError,
    CursorExpiredError,
    DecryptionError,
    SchemaNotReadyError,
    SchemaVersionError,
    SnapshotRepoError,
    SnapshotValidationError,
    StorageError,
    VersionConflictError,
    set_redaction,
)
from .health import HealthReport, ReplicaHealth
from .kv import InMemoryStore, KeyValue, KeyValueStore
from .patch import apply_merge_patch, make_json_patch
from .repository import MAX_BATCH_SIZE, MAX_HISTORY_LIMIT, RepositoryOptions, SnapshotRepository
from .retention import RetentionPolicy
from .snapshot import Snapshot
from .subject_access import export_subject, export_subject_lines
from .sync import SyncSnapshotRepository
from .upgrades import Upgrader

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "MAX_BATCH_SIZE",
    "MAX_HISTORY_LIMIT",
    "Change",
    "ChangePage",
    "ChangeStream",
    "ConfigurationError",
    "ConnectionLostError",
    "CursorExpiredError",
    "DecryptionError",
    "EngineSettings",
    "FeedConsumer",
    "HealthReport",
    "InMemoryStore",
    "JsonObject",
    "KeyProvider",
    "KeyValue",
    "KeyValueStore",
    "LocalKeyProvider",
    "ReplicaHealth",
    "RepositoryOptions",
    "RetentionPolicy",
    "SchemaNotReadyError",
    "SchemaVersionError",
    "Snapshot",
    "SnapshotRepoError",
    "SnapshotRepository",
    "SnapshotValidationError",
    "StorageError",
    "Subscription",
    "SyncSnapshotRepository",
    "Upgrader",
    "VersionConflictError",
    "apply_merge_patch",
    "create_engine",
    "erase_user",
    "export_subject",
    "export_subject_lines",
    "make_json_patch",
    "primary_reads",
    "set_redaction",
]
