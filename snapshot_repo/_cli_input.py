"""What the `snapshot-repo` operator hands in: files, the state JSON, `MODULE:NAME` specs.

Everything here is checked by the CLI itself, and refused with `InputError`
(exit status 2) or `SnapshotValidationError`, before the database is opened
where it can be, so that bad input fails without touching the database.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TextIO

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from ._cli_output import PROG
from .errors import SnapshotValidationError
from .snapshot import Snapshot

__all__ = ["InputError", "import_object", "new_snapshot", "opened", "read_state"]


class InputError(Exception):
    """Input the CLI itself refuses before any I/O: unreadable file, invalid or non-object JSON."""


@contextmanager
def opened(path: str | None, mode: Literal["r", "w"]) -> Iterator[TextIO]:
    """`path` opened as UTF-8 text, or stdin/stdout when it is None.

    Raises:
        InputError: the file cannot be opened.
    """
    if path is None:
        yield sys.stdin if mode == "r" else sys.stdout
        return
    try:
        handle = open(path, mode, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InputError(f"cannot open {path}: {exc.strerror or exc}") from None
    with handle:
        yield handle


def import_object(spec: str, flag: str) -> Any:
    """The object named by "module:attribute" (for --model and --upgraders).

    Raises:
        InputError: `spec` is not MODULE:NAME, or names nothing importable.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise InputError(f"{flag} takes MODULE:NAME, not {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"{flag} {spec}: {exc}") from None


def read_state(path: str | None) -> object:
    """The JSON object from `path`, or from stdin when `path` is None.

    Raises:
        InputError: the file cannot be read, or the text is not JSON or not an object.
    """
    source = "stdin" if path is None else path
    stdin: TextIO | None = sys.stdin  # None when the process was started with stdin closed
    try:
        if path is not None:
            # Bytes let `json` detect UTF-8/16/32 (and a UTF-8 BOM) itself.
            text: str | bytes = Path(path).read_bytes()
        elif stdin is None:
            raise InputError("stdin is closed: pipe the state in, or use --file PATH")
        else:
            if stdin.isatty():
                # Otherwise a user who forgot the pipe sees a command that seems to hang.
                print(f"{PROG}: reading the state from stdin (end with Ctrl-D)", file=sys.stderr)
            text = stdin.read()
        state = json.loads(text)
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{source} is not valid text: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(state, dict):
        raise InputError(f"{source} must hold a JSON object, not {_json_kind(state)}")
    return state


def new_snapshot(user_id: str, state: object, schema_version: int | None) -> Snapshot[Any]:
    """The snapshot to store; the model checks the user id.

    Raises:
        SnapshotValidationError: the user id is refused.
    """
    try:
        return Snapshot(user_id=user_id, state=state, schema_version=schema_version)
    except ValidationError as exc:
        raise SnapshotValidationError(
            "; ".join(_describe(error) for error in exc.errors())
        ) from None


def _describe(error: ErrorDetails) -> str:
    # A ValueError from our own validators (the user id's) already says which field and why.
    cause = error.get("ctx", {}).get("error")
    if error["type"] == "value_error" and cause is not None:
        return str(cause)
    field = ".".join(str(part) for part in error["loc"])
    return f"{field}: {error['msg']}"


def _json_kind(value: object) -> str:
    kinds: list[tuple[type | tuple[type, ...], str]] = [
        (list, "an array"),
        (str, "a string"),
        (bool, "a boolean"),
        ((int, float), "a number"),
    ]
    return next((name for kind, name in kinds if isinstance(value, kind)), "null")
