"""State to and from the bytes stored in the `payload` columns.

Payloads are UTF-8 JSON produced by pydantic's compiled serializer and stored
as they are (BLOB on SQLite, BYTEA on Postgres), so every string pydantic
accepts, `\\x00` included, round-trips exactly; Postgres `jsonb` would refuse
`\\u0000`. Everything that could make a write lossy is refused here, before
any I/O, with a `SnapshotValidationError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Generic, cast

from pydantic import BaseModel, JsonValue, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError, from_json

from .errors import ConfigurationError, SnapshotValidationError, redact
from .snapshot import StateT
from .upgrades import PayloadUpgrades

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "MAX_METADATA_BYTES",
    "JsonObject",
    "StateCodec",
    "decode_metadata",
    "encode_metadata",
]

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
"""1 MiB: generous for per-user state, small enough that a runaway state fails loudly."""

HARD_MAX_PAYLOAD_BYTES = 16 * 1024 * 1024

JsonObject = dict[str, JsonValue]
"""The state type of a repository built without a model: any JSON object."""

MAX_METADATA_BYTES = 64 * 1024
"""Write metadata describes a write; 64 KiB of JSON is plenty and keeps history rows lean."""


@lru_cache(maxsize=256)
def _adapter(state_type: Any) -> TypeAdapter[Any]:
    # Building a TypeAdapter compiles a validator and a serializer: do it once per type.
    return TypeAdapter(state_type)


def _has_non_finite_float(value: object) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite_float(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(_has_non_finite_float(item) for item in value)
    return False


class StateCodec(Generic[StateT]):
    """Validates states against one model and turns them into payload bytes and back.

    Args:
        state_type: a pydantic model (or any type pydantic can validate); None
            for plain JSON objects.
        max_payload_bytes: the largest serialized state accepted, in bytes.
    """

    def __init__(
        self,
        state_type: type[StateT] | None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        upgrades: PayloadUpgrades | None = None,
    ) -> None:
        if not 1 <= max_payload_bytes <= HARD_MAX_PAYLOAD_BYTES:
            raise ConfigurationError(
                f"max_payload_bytes must be between 1 and {HARD_MAX_PAYLOAD_BYTES}, "
                f"not {max_payload_bytes}"
            )
        self.state_type: Any = JsonObject if state_type is None else state_type
        self.max_payload_bytes = max_payload_bytes
        self.upgrades = upgrades or PayloadUpgrades(1)
        self._adapter = _adapter(cast(Any, self.state_type))
        # The serializer and validator themselves: `TypeAdapter.dump_json` spends a third
        # of a 1 KB state's serialization passing its keyword defaults on (0.5 of 1.8 µs),
        # and `validate_json` a seventh of its validation (0.3 of 2.35 µs).
        self._to_json: Callable[[Any], bytes] = self._adapter.serializer.to_json
        self._from_json: Callable[[bytes], Any] = self._adapter.validator.validate_json
        self._field_names = _field_names(self.state_type)

    def validate(self, state: object, user_id: str) -> StateT:
        """Return `state` validated against the model (model instances pass as they are).

        Raises:
            SnapshotValidationError: the state does not fit the model.
        """
        if isinstance(self.state_type, type) and isinstance(state, self.state_type):
            return cast(StateT, state)
        try:
            return cast(StateT, self._adapter.validate_python(state))
        except ValidationError as exc:
            raise SnapshotValidationError(
                f"state for user {redact(user_id)} does not validate against "
                f"{_type_name(self.state_type)}: {exc.error_count()} error(s): "
                + "; ".join(
                    f"{_loc(e['loc'], self._field_names)}: {e['type']}" for e in exc.errors()
                )
            ) from None

    def encode(self, state: StateT, user_id: str) -> bytes:
        """Serialize a validated state to payload bytes.

        Raises:
            SnapshotValidationError: the state holds NaN or an infinity (JSON
                has neither, and pydantic would silently write ``null``), a
                string that cannot be UTF-8 encoded (a lone surrogate), or
                serializes to more than `max_payload_bytes`.
        """
        try:
            payload = self._to_json(state)
        except PydanticSerializationError as exc:
            raise SnapshotValidationError(
                f"state for user {redact(user_id)} cannot be serialized to JSON: "
                f"{_first_line(str(exc))}"
            ) from None
        # pydantic writes NaN and infinities as null; only a payload with a null can hide one.
        if b"null" in payload and _has_non_finite_float(self._adapter.dump_python(state)):
            raise SnapshotValidationError(
                f"state for user {redact(user_id)} contains NaN or an infinite float, "
                "which JSON cannot represent; it would be stored as null"
            )
        if len(payload) > self.max_payload_bytes:
            raise SnapshotValidationError(
                f"state for user {redact(user_id)} serializes to {len(payload)} bytes; "
                f"the limit is {self.max_payload_bytes} (max_payload_bytes)"
            )
        return payload

    def decode(
        self, payload: bytes, user_id: str, version: int, schema_version: int | None = None
    ) -> StateT:
        """Validate stored payload bytes into a state, upgrading an older schema first.

        Raises:
            SchemaVersionError: the row's schema version cannot be brought to
                the current one.
            SnapshotValidationError: the stored state no longer fits the model
                (the model changed since it was written); names user and version.
        """
        try:
            upgrades = self.upgrades
            if schema_version is None or schema_version == upgrades.current or upgrades.any_version:
                return cast(StateT, self._from_json(payload))
            document = upgrades.upgrade(from_json(payload), schema_version, user_id, version)
            return cast(StateT, self._adapter.validate_python(document))
        except ValidationError as exc:
            raise SnapshotValidationError(
                f"stored state of user {redact(user_id)} version {version} does not "
                f"validate against {_type_name(self.state_type)}: {exc.error_count()} error(s)"
            ) from None


def _field_names(state_type: Any) -> frozenset[str]:
    """Every field name of a model and of the models nested in it (not dict keys)."""
    names: set[str] = set()
    pending = [state_type]
    while pending:
        model = pending.pop()
        if isinstance(model, type) and issubclass(model, BaseModel):
            for name, field in model.model_fields.items():
                if name not in names:
                    names.add(name)
                    pending.extend(getattr(field.annotation, "__args__", ()) or [field.annotation])
    return frozenset(names)


def _type_name(state_type: Any) -> str:
    if isinstance(state_type, type) and issubclass(state_type, BaseModel):
        return state_type.__name__
    return str(state_type)


def _loc(loc: tuple[int | str, ...], field_names: frozenset[str]) -> str:
    # Only the model's own field names are shown: dict keys and list positions come
    # from the state itself and may be personal data (an e-mail used as a key).
    shown = [part if isinstance(part, str) and part in field_names else "*" for part in loc]
    return ".".join(shown) or "<root>"


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text


def encode_metadata(metadata: object) -> bytes | None:
    """Serialize a write's free metadata (a JSON object) or refuse it.

    Raises:
        SnapshotValidationError: not a JSON object, NaN or infinity inside, a
            lone surrogate, or over `MAX_METADATA_BYTES`.
    """
    if metadata is None:
        return None
    adapter = _adapter(cast(Any, JsonObject))
    try:
        value = adapter.validate_python(metadata)
        payload = adapter.dump_json(value)
    except (ValidationError, PydanticSerializationError) as exc:
        raise SnapshotValidationError(
            f"metadata must be a JSON object: {_first_line(str(exc))}"
        ) from None
    if b"null" in payload and _has_non_finite_float(value):
        raise SnapshotValidationError("metadata contains NaN or an infinite float")
    if len(payload) > MAX_METADATA_BYTES:
        raise SnapshotValidationError(
            f"metadata serializes to {len(payload)} bytes; the limit is {MAX_METADATA_BYTES}"
        )
    return payload


def decode_metadata(payload: bytes | None) -> JsonObject | None:
    """The metadata dict of a stored write (None when the write had none)."""
    if payload is None:
        return None
    return cast(JsonObject, _adapter(cast(Any, JsonObject)).validate_json(payload))
