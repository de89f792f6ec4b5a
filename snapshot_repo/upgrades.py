"""Payload schema upgrades: reading states written by older versions of a model.

A repository declares the schema version its model is at (`schema_version`,
default 1) and one function per step, `{1: v1_to_v2, 2: v2_to_v3}`. Each
function takes and returns the state as a JSON document (dict), so it can
rename, move or fill fields before the current model validates the result.
Reading an older row upgrades it in memory; `upgrade_payloads()` rewrites
old rows in place. A row newer than the code is refused: guessing would risk
writing a downgraded state back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import JsonValue

from .errors import ConfigurationError, SchemaVersionError, redact

__all__ = ["PayloadUpgrades", "Upgrader"]

Upgrader = Callable[[dict[str, JsonValue]], dict[str, JsonValue]]
"""Turns a state document of schema version N into one of version N + 1."""


class PayloadUpgrades:
    """The upgrade chain up to `current`.

    Args:
        current: the schema version of today's model (>= 1).
        steps: `{n: fn}` where `fn` upgrades a version-n document to n + 1.
            The steps must be consecutive and end at `current - 1`; rows
            older than the first step cannot be read.
        any_version: accept documents of every schema version unchanged
            (for repositories without a model, when no steps are given).

    Raises:
        ConfigurationError: `current` is not a positive int, or the steps do
            not form one chain ending at `current - 1`.
    """

    def __init__(
        self,
        current: int,
        steps: Mapping[int, Upgrader] | None = None,
        *,
        any_version: bool = False,
    ) -> None:
        if isinstance(current, bool) or not isinstance(current, int) or current < 1:
            raise ConfigurationError(f"schema_version must be an integer >= 1, not {current!r}")
        steps = dict(steps or {})
        if steps:
            if not all(isinstance(k, int) and callable(fn) for k, fn in steps.items()):
                raise ConfigurationError("upgraders must map schema versions (int) to functions")
            expected = set(range(min(steps), current))
            if set(steps) != expected or min(steps) < 1:
                raise ConfigurationError(
                    f"upgraders must be consecutive steps ending at {current - 1} "
                    f"(schema_version - 1), got {sorted(steps)}"
                )
        self.current = current
        self._steps = steps
        # A repository without a model has no schema to enforce: it reads and
        # writes documents of every schema version as they are (operators' tools).
        self.any_version = any_version and not steps

    @property
    def oldest_readable(self) -> int:
        """The oldest schema version this chain can bring to `current`."""
        return min(self._steps) if self._steps else self.current

    def check_writable(self, schema_version: int) -> None:
        """Refuse to store a state under a schema version newer than today's model."""
        if schema_version > self.current and not self.any_version:
            raise SchemaVersionError(
                f"schema_version {schema_version} is newer than this repository's {self.current}"
            )

    def upgrade(self, document: Any, schema_version: int, user_id: str, version: int) -> Any:
        """`document` (of `schema_version`) brought to `current`.

        Raises:
            SchemaVersionError: the row is newer than the code, older than the
                chain reaches, or an upgrader failed.
        """
        if self.any_version:
            return document
        where = f"stored state of user {redact(user_id)} version {version}"
        if schema_version > self.current:
            raise SchemaVersionError(
                f"{where} has schema version {schema_version}, newer than this code's "
                f"{self.current}: upgrade the application, do not guess"
            )
        if schema_version < self.oldest_readable:
            raise SchemaVersionError(
                f"{where} has schema version {schema_version} and no upgrader starts there "
                f"(oldest readable: {self.oldest_readable})"
            )
        for step in range(schema_version, self.current):
            try:
                document = self._steps[step](document)
            except Exception as exc:
                raise SchemaVersionError(
                    f"{where}: upgrader {step} -> {step + 1} failed: {type(exc).__name__}"
                ) from exc
        return document
