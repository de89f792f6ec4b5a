"""State to and from the bytes stored in the `payload` columns.

Payloads are UTF-8 JSON produced by pydantic's compiled serializer and stored
as they are (BLOB on SQLite, BYTEA on Postgres), so every string pydantic
accepts, `\\x00` included, round-trips exactly; Postgres `jsonb` would refuse
`\\u0000`. Everything that could make a write lossy or unreadable is refused
here, before any I/O, with a `SnapshotValidationError`.

Reads parse payloads with pydantic's JSON parser, which refuses nesting
deeper than `MAX_JSON_DEPTH`; writes validate and serialize Python objects,
which pydantic allows deeper (255 levels). So the writer checks a payload
against the reader's limit, or every read of an acknowledged write would fail.

Pydantic's own errors are never chained to ours: they quote the input (a
user id, a piece of the state), which messages must not show.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from enum import Enum
from functools import lru_cache
from itertools import accumulate
from typing import Any, Generic, cast

from pydantic import BaseModel, JsonValue, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError, from_json

from .compression import ZSTD_MAGIC, compress, decompress
from .errors import ConfigurationError, SnapshotValidationError, redact
from .snapshot import StateT
from .upgrades import PayloadUpgrades

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "MAX_JSON_DEPTH",
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

MAX_JSON_DEPTH = 200
"""The most objects and arrays a value of a stored state may sit inside.

The recursion limit of jiter, the JSON parser behind pydantic's
`validate_json` and `from_json`, which every read goes through; the tests
pin it, so a pydantic release that changes it fails them rather than reads.
"""


@lru_cache(maxsize=256)
def _adapter(state_type: Any) -> TypeAdapter[Any]:
    # Building a TypeAdapter compiles a validator and a serializer: do it once per type.
    return TypeAdapter(state_type)


@lru_cache(maxsize=256)
def _may_nest_too_deeply(state_type: Any) -> bool:
    """Whether a serialized state of `state_type` could exceed `MAX_JSON_DEPTH`.

    False only for a type whose JSON depth is bounded by its schema (no
    recursion, no `Any`, no custom serializer, no extra fields) and within the
    limit: most models, whose payloads then need no check at all.
    """
    try:
        depth = _schema_depth(_adapter(state_type).core_schema, {}, set())
    except Exception:  # an optimisation: any doubt means "check every payload"
        return True
    return depth is None or depth > MAX_JSON_DEPTH


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
        compress: bool = False,
    ) -> None:
        if not 1 <= max_payload_bytes <= HARD_MAX_PAYLOAD_BYTES:
            raise ConfigurationError(
                f"max_payload_bytes must be between 1 and {HARD_MAX_PAYLOAD_BYTES}, "
                f"not {max_payload_bytes}"
            )
        self.state_type: Any = JsonObject if state_type is None else state_type
        self.max_payload_bytes = max_payload_bytes
        self.upgrades = upgrades or PayloadUpgrades(1)
        self.compress = compress
        self._adapter = _adapter(cast(Any, self.state_type))
        # The serializer and validator themselves: `TypeAdapter.dump_json` spends a third
        # of a 1 KB state's serialization passing its keyword defaults on (0.5 of 1.8 µs),
        # and `validate_json` a seventh of its validation (0.3 of 2.35 µs).
        self._to_json: Callable[[Any], bytes] = self._adapter.serializer.to_json
        self._from_json: Callable[[bytes], StateT] = self._adapter.validator.validate_json
        self._field_names = _field_names(self.state_type)
        self._may_nest_too_deeply = _may_nest_too_deeply(cast(Any, self.state_type))

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
            errors = exc.errors(include_url=False, include_context=False, include_input=False)
        # Raised outside the `except` so that pydantic's error, which quotes the input, is
        # not even kept as the suppressed `__context__`.
        if any(error["type"] == "recursion_depth_exceeded" for error in errors):
            raise _too_deep(f"state for user {redact(user_id)}", None)
        raise SnapshotValidationError(
            f"state for user {redact(user_id)} does not validate against "
            f"{_type_name(self.state_type)}: {len(errors)} error(s): "
            + "; ".join(f"{_loc(e['loc'], self._field_names)}: {e['type']}" for e in errors)
        )

    def encode(self, state: StateT, user_id: str) -> bytes:
        """Serialize a validated state to payload bytes.

        Raises:
            SnapshotValidationError: the state holds NaN or an infinity (JSON
                has neither, and pydantic would silently write ``null``), a
                string that cannot be UTF-8 encoded (a lone surrogate),
                serializes to more than `max_payload_bytes`, or nests deeper
                than `MAX_JSON_DEPTH` (reads could not parse it).
        """
        problem: str | None = None
        try:
            payload = self._to_json(state)
        except PydanticSerializationError as exc:
            problem = _first_line(str(exc))
        if problem is not None:  # raised outside the `except`: see `validate`
            if "serialization depth" in problem:  # pydantic's own limit, above ours
                raise _too_deep(f"state for user {redact(user_id)}", None)
            raise SnapshotValidationError(
                f"state for user {redact(user_id)} cannot be serialized to JSON: {problem}"
            )
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
        if self._may_nest_too_deeply and _too_deep_to_read(payload):
            raise _too_deep(f"state for user {redact(user_id)}", _json_depth(payload))
        return compress(payload) if self.compress else payload

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
        if payload.startswith(ZSTD_MAGIC):  # rows read by a path that did not open them (kv)
            payload = decompress(payload, HARD_MAX_PAYLOAD_BYTES)
        return self.decode_json(payload, user_id, version, schema_version)

    def decode_json(
        self, payload: bytes, user_id: str, version: int, schema_version: int | None = None
    ) -> StateT:
        """`decode` of a payload known to be JSON (opened: decrypted, decompressed).

        Raises:
            SchemaVersionError, SnapshotValidationError: as `decode`.
        """
        try:
            upgrades = self.upgrades
            if schema_version is None or schema_version == upgrades.current or upgrades.any_version:
                return self._from_json(payload)
            document = upgrades.upgrade(from_json(payload), schema_version, user_id, version)
            return cast(StateT, self._adapter.validate_python(document))
        except ValidationError as exc:
            count = exc.error_count()
        raise SnapshotValidationError(  # outside the `except`: see `validate`
            f"stored state of user {redact(user_id)} version {version} does not "
            f"validate against {_type_name(self.state_type)}: {count} error(s)"
        )


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


_SCALAR_SCHEMAS = frozenset(
    {"none", "bool", "int", "float", "decimal", "str", "bytes", "date", "time", "datetime"}
    | {"timedelta", "uuid", "url", "multi-host-url"}
)
_WRAPPER_SCHEMAS = frozenset(
    {"default", "nullable", "model-field", "typed-dict-field", "dataclass-field"}
    | {"function-after", "function-before", "function-wrap", "custom-error"}
)
_FIELD_SCHEMAS = frozenset({"model-fields", "typed-dict", "dataclass-args"})


def _schema_depth(
    schema: Mapping[str, Any], definitions: dict[str, Any], resolving: set[str]
) -> int | None:
    """The deepest nesting of objects and arrays `schema` can serialize to; None: no bound.

    Walks pydantic-core's schema, whose shape is public (`pydantic_core.core_schema`).
    Anything not known here to serialize within a bound counts as unbounded, which is
    safe: it only means each payload is checked.
    """
    kind = schema.get("type")
    serialization = schema.get("serialization")
    if serialization is not None and serialization.get("type") not in ("to-string", "format"):
        return None  # a custom serializer may return anything
    if serialization is not None or kind in _SCALAR_SCHEMAS:
        return 0
    if kind in ("literal", "enum"):
        values = schema.get("expected", schema.get("members", ()))
        plain = (str, int, float, bool, type(None))
        simple = all(
            isinstance(value.value if isinstance(value, Enum) else value, plain) for value in values
        )
        return 0 if simple else None

    def depth(inner: Any) -> int | None:
        return _schema_depth(inner, definitions, resolving) if inner is not None else None

    def deepest(inners: list[Any]) -> int | None:
        depths = [depth(inner) for inner in inners]
        return None if None in depths else max(cast(list[int], depths), default=0)

    if kind == "definitions":
        for definition in schema["definitions"]:
            definitions[definition["ref"]] = definition
        return depth(schema["schema"])
    if kind == "definition-ref":
        ref = schema["schema_ref"]
        if ref in resolving or ref not in definitions:
            return None  # a recursive type: as deep as the data
        resolving.add(ref)
        try:
            return depth(definitions[ref])
        finally:
            resolving.discard(ref)
    if kind in _WRAPPER_SCHEMAS:
        return depth(schema.get("schema"))
    if kind in ("model", "dataclass"):
        extra = schema.get("config", {}).get("extra_fields_behavior")
        return None if extra == "allow" else depth(schema["schema"])
    if kind == "union":
        return deepest([c[0] if isinstance(c, tuple) else c for c in schema["choices"]])
    if kind == "tagged-union":
        return deepest(list(schema["choices"].values()))
    if kind in ("lax-or-strict", "json-or-python"):
        branches = ("lax_schema", "strict_schema", "json_schema", "python_schema")
        return deepest([schema[key] for key in branches if key in schema])
    if kind == "chain":
        return deepest(list(schema["steps"]))
    inner_depth: int | None
    if kind in ("list", "set", "frozenset"):
        inner_depth = depth(schema.get("items_schema"))
    elif kind == "tuple":
        inner_depth = deepest(list(schema.get("items_schema", ())))
    elif kind == "dict":
        inner_depth = depth(schema.get("values_schema"))
    elif kind in _FIELD_SCHEMAS:
        if schema.get("extra_behavior") == "allow":
            return None  # extra fields are serialized as they are
        fields = schema["fields"]
        inner_depth = deepest(
            [*(fields.values() if isinstance(fields, dict) else fields)]
            + [field["return_schema"] for field in schema.get("computed_fields", ())]
        )
    else:
        return None  # Any, a plain validator function, an arbitrary type...
    return None if inner_depth is None else inner_depth + 1


def _too_deep_to_read(payload: bytes) -> bool:
    """Whether reads would refuse `payload` for its nesting (see `MAX_JSON_DEPTH`)."""
    # Nesting past the limit needs more brackets than the limit: counting them (those
    # in strings too, which only errs on the safe side) clears nearly every payload at
    # C speed. The rest are parsed by the reader's own parser, for its exact verdict.
    if payload.count(b"{") + payload.count(b"[") <= MAX_JSON_DEPTH:
        return False
    try:
        from_json(payload)
    except ValueError:
        return True
    return False


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_A_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))


def _json_depth(payload: bytes) -> int:
    """How deeply objects and arrays nest in `payload` (1: a flat object). For messages."""
    brackets = _JSON_STRING.sub(b"", payload).translate(None, _NOT_A_BRACKET)
    return max(accumulate(1 if byte in b"[{" else -1 for byte in brackets), default=0)


def _too_deep(subject: str, depth: int | None) -> SnapshotValidationError:
    levels = f"more than {MAX_JSON_DEPTH}" if depth is None else str(depth)
    return SnapshotValidationError(
        f"{subject} nests objects and arrays {levels} levels deep; "
        f"at most {MAX_JSON_DEPTH} can be read back"
    )


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
    problem: str | None = None
    try:
        value = adapter.validate_python(metadata)
        payload = adapter.dump_json(value)
    except (ValidationError, PydanticSerializationError) as exc:
        problem = _first_line(str(exc))
    if problem is not None:  # raised outside the `except`: see `StateCodec.validate`
        raise SnapshotValidationError(f"metadata must be a JSON object: {problem}")
    if b"null" in payload and _has_non_finite_float(value):
        raise SnapshotValidationError("metadata contains NaN or an infinite float")
    if len(payload) > MAX_METADATA_BYTES:
        raise SnapshotValidationError(
            f"metadata serializes to {len(payload)} bytes; the limit is {MAX_METADATA_BYTES}"
        )
    if _too_deep_to_read(payload):
        raise _too_deep("metadata", _json_depth(payload))
    return payload


def decode_metadata(payload: bytes | None) -> JsonObject | None:
    """The metadata dict of a stored write (None when the write had none)."""
    if payload is None:
        return None
    return cast(JsonObject, _adapter(cast(Any, JsonObject)).validate_json(payload))
