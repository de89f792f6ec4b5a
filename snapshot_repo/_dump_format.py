"""What writing a dump and reading one back must agree on: header values, fields, encoding.

`backup` documents the format and runs `dump` and `load`; the lines are
written by `_dump_lines` and read back by `_load_lines` and `_loader`. The
names both directions share live here, below all of them, so that neither
side imports the other.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from typing import Final

from .backends.statements import STORED_COLUMNS
from .errors import ConfigurationError

__all__ = [
    "COLUMNS",
    "DUMP_FORMAT",
    "DUMP_FORMAT_VERSION",
    "KEY",
    "RECEIPT_COLUMNS",
    "Progress",
    "check_utf8",
    "is_text",
    "json_problem",
]

DUMP_FORMAT: Final = "snapshot_repo.dump"
"""The header's ``format``: what `load` looks for on the first line."""

DUMP_FORMAT_VERSION: Final = 1
"""The header's ``version``: the shape of the other lines, bumped when it changes."""

Progress = Callable[[int], object]
"""Called with the number of history rows dumped or loaded so far, once per batch."""

COLUMNS: Final = STORED_COLUMNS  # every column of a history row, in table order
KEY: Final = ("tenant", "namespace", "user_id", "version")
RECEIPT_COLUMNS: Final = (
    "subject",
    "tenant",
    "namespace",
    "erased_at",
    "versions_erased",
    "cause",
)

_JSON_POSITION = re.compile(r"\bline 1 column\b")


def is_text(stream: object) -> bool:
    """Whether `stream` reads or writes `str` rather than `bytes`."""
    # Text streams (files opened in text mode, sys.stdout, StringIO) have an
    # `encoding` attribute; binary ones (BytesIO, files opened with "b") do not.
    return hasattr(stream, "encoding")


def check_utf8(stream: object, verb: str) -> None:
    """Refuse a text stream that would re-encode the dump's UTF-8 as something else."""
    encoding = getattr(stream, "encoding", None) if is_text(stream) else None
    if isinstance(encoding, str) and codecs.lookup(encoding).name != "utf-8":
        raise ConfigurationError(
            f"{verb} UTF-8 JSON Lines: give it a binary stream or a text stream "
            f"encoding UTF-8, not {encoding}"
        )


def json_problem(exc: ValueError) -> str:
    """The parser's message without its "line 1", which would contradict the dump's line."""
    return _JSON_POSITION.sub("column", str(exc))
