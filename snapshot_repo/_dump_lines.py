"""The dump's lines: stored rows and erasure receipts turned into UTF-8 JSON Lines.

Each function here is pure but for `writer`'s stream: `backup.dump` reads the
rows, these turn them into bytes. The format is documented in `backup`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import IO, Any, Final

from pydantic_core import from_json, to_json

from ._dump_format import COLUMNS, RECEIPT_COLUMNS, check_utf8, is_text, json_problem
from .codec import HARD_MAX_PAYLOAD_BYTES
from .compression import decompress
from .crypto import SEALED_PREFIX
from .errors import SnapshotValidationError

__all__ = ["escape_line_breaks", "receipt_line", "row_line", "timestamp", "writer"]

# Line breaks to `str.splitlines` (and some editors) that JSON leaves raw inside
# strings; in UTF-8 these byte sequences can only be these characters.
_RAW_LINE_BREAKS: Final = (
    (b"\xc2\x85", b"\\u0085"),
    (b"\xe2\x80\xa8", b"\\u2028"),
    (b"\xe2\x80\xa9", b"\\u2029"),
)


def writer(out: IO[bytes] | IO[str]) -> Callable[[bytes], object]:
    """A function writing UTF-8 bytes to `out`, binary or text."""
    if not is_text(out):
        binary: IO[bytes] = out  # type: ignore[assignment]
        return binary.write
    check_utf8(out, "dump writes")
    textual: IO[str] = out  # type: ignore[assignment]
    return lambda data: textual.write(data.decode("utf-8"))


def row_line(row: Any) -> bytes:
    """The line of one history row (a `backup._rows_page` row), line breaks not yet escaped."""
    values = row._mapping
    record = {name: values[name] for name in COLUMNS if name not in ("payload", "metadata")}
    record["created_at"] = timestamp(values["created_at"])
    record["metadata"] = _stored_json(values, "metadata")
    record["state"] = _stored_json(values, "payload")
    expires_at = values["expires_at"]
    record["expires_at"] = None if expires_at is None else timestamp(expires_at)
    return to_json(record) + b"\n"


def receipt_line(row: Any) -> bytes:
    """The ``{"receipt": ...}`` line of one erasure receipt."""
    values = row._mapping
    receipt = {name: values[name] for name in RECEIPT_COLUMNS}
    receipt["erased_at"] = timestamp(values["erased_at"])
    return to_json({"receipt": receipt}) + b"\n"


def _stored_json(values: Mapping[str, Any], column: str) -> Any:
    stored = values[column]
    if stored is None:
        return None
    if bytes(stored).startswith(SEALED_PREFIX):
        raise SnapshotValidationError(
            "dump found an encrypted (crypto-shredding) payload: dumps hold readable JSON "
            "and no data keys, so stores with encryption cannot be dumped"
        )
    try:
        return from_json(decompress(bytes(stored), HARD_MAX_PAYLOAD_BYTES))
    except ValueError as exc:
        raise SnapshotValidationError(
            f"dump found a stored {column} that is not JSON ({json_problem(exc)}) in "
            f"tenant {values['tenant']!r}, namespace {values['namespace']!r}, "
            f"version {values['version']} of a user"
        ) from None


def timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC to the microsecond: one spelling, whatever the driver returned."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def escape_line_breaks(data: bytes) -> bytes:
    """`data` with U+0085, U+2028 and U+2029 escaped, so no line splitter cuts a line."""
    for raw, escaped in _RAW_LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return data
