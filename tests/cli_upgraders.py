"""An application's upgrade chain, importable by `snapshot-repo upgrade-payloads --upgraders`."""

from __future__ import annotations

from typing import Any


def items_to_lines(document: dict[str, Any]) -> dict[str, Any]:
    return {"lines": [{"sku": sku} for sku in document.get("items", [])]}


UPGRADERS = {1: items_to_lines}
