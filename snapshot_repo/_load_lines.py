"""The dump's lines read back: numbered, parsed, and checked into rows ready to insert.

Nothing here touches the database: `backup.load` feeds each line through
these checks and hands the rows to `_loader`. Every error is a
`SnapshotValidationError` that names the line, so a bad dump is refused
before or inside the load's transaction, never half-loaded.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, TypeVar

from pydantic_core import from_json, to_json

from ._checks import check_int, valid_actor, valid_identifier, valid_reason
from ._dump_format import COLUMNS, DUMP_FORMAT, DUMP_FORMAT_VERSION, RECEIPT_COLUMNS, json_problem
from .codec import HARD_MAX_PAYLOAD_BYTES, encode_metadata
from .errors import SnapshotValidationError
from .snapshot import MAX_IDEMPOTENCY_KEY_LENGTH, MAX_SCOPE_LENGTH, MAX_USER_ID_LENGTH
from .tables import erasure_receipts_table

__all__ = [
    "check_end",
    "check_header",
    "numbered",
    "parse",
    "receipt_from_line",
    "row_from_line",
]

_ROW_FIELDS: Final = frozenset(
    {*(name for name in COLUMNS if name != "payload"), "state", "expires_at"}
)
_END_FIELDS: Final = frozenset({"end", "rows", "receipts"})
_MAX_BIGINT: Final = 2**63 - 1
_MAX_INTEGER: Final = 2**31 - 1
_ResultT = TypeVar("_ResultT")


async def numbered(
    lines: Iterable[str | bytes] | AsyncIterable[str | bytes],
) -> AsyncGenerator[tuple[int, str | bytes], None]:
    """The non-blank lines with their 1-based line numbers (blank lines are counted)."""
    number = 0
    if isinstance(lines, AsyncIterable):
        async for line in lines:
            number += 1
            if _has_content(number, line):
                yield number, line
        return
    iterator = iter(lines)
    while True:
        try:
            line = next(iterator)
        except StopIteration:
            return
        except UnicodeDecodeError as exc:  # a text file that is not UTF-8
            raise SnapshotValidationError(
                f"line {number + 1} of the dump is not UTF-8: {exc.reason}"
            ) from None
        number += 1
        if _has_content(number, line):
            yield number, line


def _has_content(number: int, line: object) -> bool:
    if not isinstance(line, str | bytes):
        raise SnapshotValidationError(
            f"line {number} of the dump is a {type(line).__name__}, not str or bytes"
        )
    return bool(line.strip())


def parse(number: int, line: str | bytes) -> Any:
    """The JSON value of line `number`, or SnapshotValidationError naming the line."""
    try:
        # No NaN or Infinity: JSON has neither, and the stores refuse them.
        return from_json(line, allow_inf_nan=False)
    except ValueError as exc:
        raise SnapshotValidationError(
            f"line {number} of the dump is not JSON: {json_problem(exc)}"
        ) from None


def check_header(first: tuple[int, str | bytes] | None) -> None:
    """Refuse a dump whose first line is not a header of this package's format version."""
    if first is None:
        raise SnapshotValidationError("the dump is empty: it has no header line")
    number, line = first
    try:
        header = parse(number, line)
    except SnapshotValidationError:
        header = None
    if not isinstance(header, dict) or header.get("format") != DUMP_FORMAT:
        raise SnapshotValidationError(
            f"line {number} is not the header of a snapshot_repo dump "
            f'(a JSON object with "format": "{DUMP_FORMAT}")'
        )
    version = header.get("version")
    if version != DUMP_FORMAT_VERSION or isinstance(version, bool):
        raise SnapshotValidationError(
            f"the dump is of format version {version!r}; this package reads "
            f"version {DUMP_FORMAT_VERSION}"
        )


def check_end(end: tuple[int, Mapping[str, Any]] | None, rows: int, receipts: int) -> None:
    """Refuse a dump cut short: no end line, or one whose counts differ from what was read."""
    if end is None:
        raise SnapshotValidationError(
            f"the dump has no end line after its {rows} rows: it was cut short"
        )
    number, value = end
    if set(value) != _END_FIELDS or value["end"] is not True:
        raise SnapshotValidationError(
            f"line {number} of the dump is not a valid end line "
            '({"end": true, "rows": N, "receipts": M})'
        )
    for name, read in (("rows", rows), ("receipts", receipts)):
        counted = _checked(number, partial(check_int, name, value[name], minimum=0))
        if counted != read:
            raise SnapshotValidationError(
                f"the dump's end line (line {number}) counts {counted} {name}, but {read} were read"
            )


def row_from_line(number: int, value: Any) -> tuple[dict[str, Any], datetime | None]:
    """The history row line `number` describes, ready to insert, and the expiry it carries."""
    value = _fields(number, value, _ROW_FIELDS, "the line")
    row = _checked(number, lambda: _history_row(value))
    return row, _checked(number, lambda: _expiry(value["expires_at"]))


def receipt_from_line(number: int, value: Any) -> dict[str, Any]:
    """The erasure receipt line `number` describes, ready to insert."""
    value = _fields(number, value, frozenset({"receipt"}), "the line")
    receipt = _fields(number, value["receipt"], frozenset(RECEIPT_COLUMNS), "the receipt")
    return _checked(number, lambda: _receipt_row(receipt))


def _fields(number: int, value: Any, expected: frozenset[str], what: str) -> dict[str, Any]:
    """`value` if it is a JSON object with exactly the `expected` fields."""
    if not isinstance(value, dict):
        raise SnapshotValidationError(
            f"line {number} of the dump: {what} is a JSON {type(value).__name__}, not an object"
        )
    missing, unknown = expected - value.keys(), value.keys() - expected
    if missing or unknown:
        problems = []
        if missing:
            problems.append("missing " + ", ".join(sorted(missing)))
        if unknown:
            problems.append("unknown " + ", ".join(sorted(unknown)))
        raise SnapshotValidationError(f"line {number} of the dump: {'; '.join(problems)}")
    return value


def _history_row(value: dict[str, Any]) -> dict[str, Any]:
    """The history row a dump line describes, validated, ready to insert."""
    key = value["idempotency_key"]
    payload = _json_bytes("state", value["state"])
    if len(payload) > HARD_MAX_PAYLOAD_BYTES:
        raise SnapshotValidationError(
            f"state serializes to {len(payload)} bytes; the most any store holds is "
            f"{HARD_MAX_PAYLOAD_BYTES}"
        )
    return {
        "tenant": _tenant(value["tenant"]),
        "namespace": valid_identifier("namespace", value["namespace"], MAX_SCOPE_LENGTH),
        "user_id": valid_identifier("user_id", value["user_id"], MAX_USER_ID_LENGTH),
        "version": check_int("version", value["version"], minimum=1, maximum=_MAX_BIGINT),
        "schema_version": check_int(
            "schema_version", value["schema_version"], minimum=1, maximum=_MAX_INTEGER
        ),
        "payload": payload,
        "created_at": _moment("created_at", value["created_at"]),
        "idempotency_key": None
        if key is None
        else valid_identifier("idempotency_key", key, MAX_IDEMPOTENCY_KEY_LENGTH),
        "actor": valid_actor(value["actor"]),
        "reason": valid_reason(value["reason"]),
        "metadata": encode_metadata(value["metadata"]),
    }


def _receipt_row(value: dict[str, Any]) -> dict[str, Any]:
    columns = erasure_receipts_table.c
    return {
        "subject": valid_identifier("subject", value["subject"], _length(columns.subject)),
        "tenant": _tenant(value["tenant"]),
        "namespace": valid_identifier("namespace", value["namespace"], MAX_SCOPE_LENGTH),
        "erased_at": _moment("erased_at", value["erased_at"]),
        "versions_erased": check_int(
            "versions_erased", value["versions_erased"], minimum=0, maximum=_MAX_BIGINT
        ),
        "cause": valid_identifier("cause", value["cause"], _length(columns.cause)),
    }


def _length(column: Any) -> int:
    """The declared length of a VARCHAR column: the longest value it takes."""
    length = getattr(column.type, "length", None)
    assert isinstance(length, int), f"{column.name} has no declared length"
    return length


def _tenant(value: object) -> str:
    return "" if value == "" else valid_identifier("tenant", value, MAX_SCOPE_LENGTH)


def _json_bytes(name: str, value: Any) -> bytes:
    try:
        return to_json(value)
    except ValueError as exc:  # PydanticSerializationError is a ValueError
        raise SnapshotValidationError(f"{name} cannot be stored as JSON: {exc}") from None


def _moment(name: str, value: object) -> datetime:
    if not isinstance(value, str):
        raise SnapshotValidationError(
            f"{name} must be an ISO 8601 string, not {type(value).__name__}"
        )
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise SnapshotValidationError(f"{name} {value!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise SnapshotValidationError(f"{name} {value!r} has no UTC offset")
    return moment.astimezone(UTC)


def _expiry(value: object) -> datetime | None:
    return None if value is None else _moment("expires_at", value)


def _checked(number: int, check: Callable[[], _ResultT]) -> _ResultT:
    """Run a validation, prefixing its error with the line number."""
    try:
        return check()
    except SnapshotValidationError as exc:
        raise SnapshotValidationError(f"line {number} of the dump: {exc}") from None
