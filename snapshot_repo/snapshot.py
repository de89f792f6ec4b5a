"""The `Snapshot` model: one version of one user's state.

Kept free of SQLAlchemy so that services can build, validate and serialize
snapshots without importing the storage layer.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Any, Generic, NoReturn, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue

from .errors import redact

__all__ = [
    "MAX_ACTOR_LENGTH",
    "MAX_IDEMPOTENCY_KEY_LENGTH",
    "MAX_REASON_LENGTH",
    "MAX_SCOPE_LENGTH",
    "MAX_USER_ID_LENGTH",
    "Snapshot",
    "StateT",
    "UserId",
    "check_identifier",
    "check_user_id",
    "stored_snapshot",
]

MAX_USER_ID_LENGTH = 255
"""User ids are 1 to 255 characters: the `user_id` columns are VARCHAR(255)."""

MAX_IDEMPOTENCY_KEY_LENGTH = 255
"""Idempotency keys are 1 to 255 characters, with the same rules as user ids."""

MAX_SCOPE_LENGTH = 255
"""Tenants and namespaces are 1 to 255 characters, with the same rules as user ids."""

MAX_ACTOR_LENGTH = 255
"""Actors are 1 to 255 characters, with the same rules as user ids."""

MAX_REASON_LENGTH = 4096
"""A write's reason is free text up to 4096 characters."""

StateT = TypeVar("StateT")
SnapshotT = TypeVar("SnapshotT", bound="Snapshot[Any]")


def check_identifier(name: str, value: str, max_length: int) -> str:
    """Return `value` if it is a usable identifier, else raise `ValueError` saying why.

    Control characters and lone surrogates are refused because they cannot be
    logged, printed or (surrogates) encoded by either database driver.
    """
    if not value:
        raise ValueError(f"{name} must not be empty")
    if len(value) > max_length:
        raise ValueError(f"{name} is {len(value)} characters long; at most {max_length}")
    if value.isascii() and value.isprintable():
        return value  # the common case, checked in C: no control character, no surrogate
    for char in value:
        category = unicodedata.category(char)
        if category == "Cc":
            raise ValueError(f"{name} contains the control character {char!r}")
        if category == "Cs":
            raise ValueError(f"{name} contains a lone surrogate, which cannot be stored")
    return value


def check_user_id(value: str) -> str:
    """Return `value` if it is a usable user id (1 to 255 characters, no control characters)."""
    return check_identifier("user_id", value, MAX_USER_ID_LENGTH)


UserId = Annotated[str, Field(strict=True), AfterValidator(check_user_id)]
"""A validated user id; `strict` so that an int is refused rather than turned into text."""


class Snapshot(BaseModel, Generic[StateT]):
    """One version of one user's state.

    Build one with `user_id` and `state` (and optionally `schema_version`, the
    version of *your* state model, which is stored with the row); the
    repository assigns `version` and `created_at` when it stores it.

    Attributes:
        user_id: whose state this is; 1 to 255 characters, no control characters.
        state: the state itself, an instance of the repository's model (or a
            JSON object when the repository has no model).
        version: 1 for a user's first write, then +1 for each write; 0 on a
            snapshot that has not been stored yet.
        created_at: when the repository stored this version (timezone-aware
            UTC); None on a snapshot that has not been stored yet.
        schema_version: the version of the state's own schema. None (the
            default) means the repository's current `schema_version`; stored
            snapshots always carry the version they were stored under.
        idempotency_key: the key the write was made with, if any.
        actor: who or what made the write, if given.
        reason: why, if given.
        metadata: free JSON metadata of the write, if given.

    The last four describe the write, not the state: they are set by the
    repository on stored snapshots from the arguments of `upsert_latest`.
    """

    # Errors must not echo the user id or the state (README: no personal data in messages).
    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    user_id: UserId
    state: StateT
    version: Annotated[int, Field(ge=0)] = 0
    created_at: datetime | None = None
    schema_version: Annotated[int, Field(ge=1)] | None = None
    idempotency_key: str | None = None
    actor: str | None = None
    reason: str | None = None
    metadata: dict[str, JsonValue] | None = None

    def __repr_args__(self) -> Any:
        # Reprs end up in logs and tracebacks: show the user id redacted and never the state.
        for name, value in super().__repr_args__():
            if name == "user_id":
                yield name, redact(value)
            elif name == "state":
                yield name, "<redacted>"
            else:
                yield name, value


class _SharedFieldsSet(set[str]):
    """A fields set that many snapshots share: it refuses changes, which would change
    them all, and its copies are plain sets (what `model_copy` changes)."""

    def _refuse(self, *_args: object) -> NoReturn:
        raise TypeError(
            "stored snapshots share one model_fields_set: copy it (set(...)) to change it"
        )

    add = discard = remove = pop = clear = _refuse
    update = intersection_update = difference_update = symmetric_difference_update = _refuse
    __ior__ = __iand__ = __isub__ = __ixor__ = _refuse

    def __copy__(self) -> set[str]:
        return set(self)

    def __deepcopy__(self, _memo: object) -> set[str]:
        return set(self)

    def __reduce__(self) -> tuple[type[set[str]], tuple[list[str]]]:
        return set, (list(self),)


_EVERY_FIELD = _SharedFieldsSet(Snapshot.model_fields)
"""The `model_fields_set` of every stored snapshot, one set shared by all of them.

A set of nine names takes about 700 bytes, and one per snapshot made the garbage
collector run three times as many full collections (which scan every object of the
process): over 300 `get_latest_many(500)` calls on MariaDB, interleaved with the raw
driver reading the same rows, 18 full collections, all during the library's calls,
4 ms of collecting a call against 0.4 ms for the raw driver; with the set shared, 6
(and 5 during the raw driver's), 1.5 ms against 1.3. pydantic itself never changes it:
it adds to a model's fields set only on assignment, which a frozen model refuses
first, and `model_copy` copies the set before adding to it; a caller's change is
refused (`_SharedFieldsSet`).
"""


def stored_snapshot(snapshot_type: type[SnapshotT], values: dict[str, Any]) -> SnapshotT:
    """A `Snapshot` of already validated `values` (every field), without pydantic's checks.

    What `model_construct` does, without its per-field defaults and alias
    handling: a fifth of its cost, which matters at ten history rows per
    read. The repository only passes values it validated or read back.
    """
    snapshot = snapshot_type.__new__(snapshot_type)
    _set = object.__setattr__  # the model is frozen
    _set(snapshot, "__dict__", values)
    _set(snapshot, "__pydantic_fields_set__", _EVERY_FIELD)
    _set(snapshot, "__pydantic_extra__", None)
    _set(snapshot, "__pydantic_private__", None)
    return snapshot
