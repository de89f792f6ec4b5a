"""What the `snapshot-repo` operator sees: the exit statuses, JSON on stdout, errors on stderr.

Kept apart from the commands so that every line the CLI prints to a script,
probe or log collector is shaped in one place: one compact JSON value per
line on stdout, one `snapshot-repo: error: ` line per failure on stderr, and
a progress counter that appears only on a terminal.
"""

from __future__ import annotations

import json
import sys

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_CONFLICT",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_STORAGE",
    "PROG",
    "Progress",
    "fail",
    "print_json",
]

PROG = "snapshot-repo"
"""The program's name, in its usage line and at the start of every error line."""

# Distinct per outcome so that scripts and probes can branch on them; the
# meaning of each is documented in `snapshot_repo.cli`.
EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_BAD_INPUT = 2
EXIT_STORAGE = 3
EXIT_CONFLICT = 4
EXIT_INTERRUPTED = 130


def print_json(value: object) -> None:
    """Print `value` as JSON on one line of stdout, for `jq` and scripts."""
    # ASCII-only output prints on any terminal encoding; compact keeps it one line.
    print(json.dumps(value, separators=(",", ":")))


def fail(status: int, message: str) -> int:
    """Print `message` as one `snapshot-repo: error: ` line on stderr.

    Returns:
        `status`, so that a command can `return fail(...)`.
    """
    # One line whatever the message holds, so log collectors keep it whole.
    text = " ".join(line.strip() for line in message.splitlines())
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return status


class Progress:
    """A one-line progress counter on stderr, shown only on a terminal.

    Called with the count done so far; used as a context manager, it ends its
    line on exit, so that what is printed next starts on a line of its own.
    """

    def __init__(self, what: str) -> None:
        self._what = what
        self._shown = False

    def __call__(self, done: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{self._what}: {done}", end="", file=sys.stderr, flush=True)
            self._shown = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._shown:
            print(file=sys.stderr)
