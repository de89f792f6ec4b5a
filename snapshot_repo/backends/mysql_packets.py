"""How large a MySQL/MariaDB statement may be: `max_allowed_packet` checks, batch chunks.

The server drops a statement longer than its `max_allowed_packet`, and the
connection with it; the client then sees a lost connection, which would be
retried and fail again. A write is refused before sending when its statement
could not fit (`check_packet`, `check_batch_packets`); a batch is cut into
statements that do (`chunks`). Sizes are counted as the text protocol would
send the values (escaping can double a value); prepared statements send them
raw, so the bound holds with room to spare.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import StorageError, redact

__all__ = [
    "CHUNK_BYTES",
    "STATEMENT_ROOM",
    "VALUE_OVERHEAD",
    "check_batch_packets",
    "check_packet",
    "chunks",
    "text_length",
    "utf8_length",
]

STATEMENT_ROOM = 4096
"""Bytes of a write statement besides its values: the SQL text, numbers and timestamps."""

_ESCAPED = (b"\x00", b"\n", b"\r", b"\\", b"'", b'"', b"\x1a")
"""Bytes the text protocol sends as two (MySQL's string escaping)."""

_MAX_PLACEHOLDERS = 65_535
"""The most values one prepared statement takes (MySQL's protocol counts them in 16 bits)."""

CHUNK_BYTES = 4 << 20
"""Values one upsert statement of a batch carries at most (a bulk execution or a multi-row
statement; a batch runs as several), and at most half the server's `max_allowed_packet`."""

VALUE_OVERHEAD = 20
"""Bytes a value costs in a statement besides its own: its type, length and separator."""


def _escaped_length(value: bytes) -> int:
    return len(value) + sum(value.count(byte) for byte in _ESCAPED)


def check_packet(limit: int, user_id: str, params: Mapping[str, Any]) -> None:
    """Refuse, before sending, a write whose statement the server would not take.

    A statement longer than the server's `max_allowed_packet` (`limit`) makes the
    server drop the connection (the client sees "server has gone away"), which
    would read as a lost connection to be retried, and would fail again. The
    statement's length is its text values (payload, metadata, ids, actor,
    reason, key) as the text protocol escapes them, plus room for the rest.
    Escaping at most doubles a value, so the values are only scanned when twice
    their length could exceed the limit (never with the default 1 MiB states
    and a 16 MiB limit: no scan on the write path).

    Raises:
        StorageError: the statement would be too long; nothing was sent.
    """
    values = [
        value if isinstance(value, bytes) else value.encode()
        for value in params.values()
        if isinstance(value, bytes | str)
    ]
    if 2 * sum(map(len, values)) + STATEMENT_ROOM <= limit:
        return
    needed = sum(map(_escaped_length, values))
    if needed + STATEMENT_ROOM > limit:
        raise StorageError(
            f"a write for user {redact(user_id)} needs a statement of about "
            f"{needed + STATEMENT_ROOM} bytes, over the server's max_allowed_packet "
            f"({limit}): raise max_allowed_packet or lower max_payload_bytes; "
            "nothing was written"
        )


def check_batch_packets(
    limit: int, user_ids: Sequence[str], payloads: Sequence[bytes], metadata: bytes | None
) -> None:
    """`check_packet` for every row of a batch (each may have to go in a statement alone).

    One comparison for the usual batch: a user id takes at most 4 bytes a
    character, so when the largest row's bound fits twice over (escaping at most
    doubles it), every row fits; only otherwise is each row measured.

    Raises:
        StorageError: a row's statement would be too long; nothing was sent.
    """
    shared = len(metadata or b"")
    bound = shared + max(4 * len(u) + len(p) for u, p in zip(user_ids, payloads, strict=True))
    if 2 * bound + STATEMENT_ROOM <= limit:
        return
    for user_id, payload in zip(user_ids, payloads, strict=True):
        row = {"payload": payload, "metadata": metadata, "user_id": user_id}
        check_packet(limit, user_id, row)


def utf8_length(text: str) -> int:
    """Bytes of `text` as sent (UTF-8), without encoding it when it is ASCII."""
    return len(text) if text.isascii() else len(text.encode())


def text_length(row: Sequence[Any]) -> int:
    """Bytes of a row's text values as sent (UTF-8): what its size in a statement grows with."""
    return sum(
        len(value) if isinstance(value, bytes) else utf8_length(value)
        for value in row
        if isinstance(value, bytes | str)
    )


def chunks(
    rows: Sequence[tuple[Any, ...]], sizes: Sequence[int], width: int, budget: int
) -> list[list[tuple[Any, ...]]]:
    """The rows cut into the statements that carry them: at most `_MAX_PLACEHOLDERS`
    values (rows of `width`) and about `budget` bytes each (`sizes`: each row's bytes,
    counting `VALUE_OVERHEAD` per value); a row alone over the budget goes alone
    (`check_packet` let it through)."""
    chunks: list[list[tuple[Any, ...]]] = []
    current: list[tuple[Any, ...]] = []
    size = 0
    most = max(1, _MAX_PLACEHOLDERS // width)
    for row, row_size in zip(rows, sizes, strict=True):
        if current and (len(current) >= most or size + row_size > budget):
            chunks.append(current)
            current, size = [], 0
        current.append(row)
        size += row_size
    if current:
        chunks.append(current)
    return chunks
