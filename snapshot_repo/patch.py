"""JSON documents: merge patches (RFC 7386) and structural diffs as JSON Patch (RFC 6902).

Small enough to own: the merge algorithm is the RFC's ten lines, and the
diff needs only `add`, `remove` and `replace`. The tests check both against
the RFCs' own examples and check every diff by applying it with the
`jsonpatch` reference implementation.
"""

from __future__ import annotations

from typing import Any

from pydantic import JsonValue

__all__ = ["JsonPatchOperation", "apply_merge_patch", "make_json_patch"]

JsonPatchOperation = dict[str, Any]
"""One RFC 6902 operation: {"op": "add" | "remove" | "replace", "path": ..., "value"?: ...}."""


def apply_merge_patch(target: JsonValue, patch: JsonValue) -> JsonValue:
    """Apply an RFC 7386 JSON merge patch to `target` and return the result.

    Objects merge key by key; a `null` in the patch removes the key; any
    other value (arrays included) replaces. `target` is not modified.
    """
    if not isinstance(patch, dict):
        return patch
    result: dict[str, JsonValue] = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def make_json_patch(source: JsonValue, target: JsonValue) -> list[JsonPatchOperation]:
    """The RFC 6902 operations that turn `source` into `target`.

    Objects are compared key by key and arrays index by index (the common
    prefix is patched in place, the tail is added or removed from the end),
    so applying the operations in order yields `target` exactly.
    """
    operations: list[JsonPatchOperation] = []
    _diff(source, target, "", operations)
    return operations


def _pointer(path: str, key: str | int) -> str:
    token = str(key).replace("~", "~0").replace("/", "~1")
    return f"{path}/{token}"


def _same(a: JsonValue, b: JsonValue) -> bool:
    # JSON's true is not 1, and 1 is not 1.0 for a reader that checks types.
    return type(a) is type(b) and a == b


def _diff(source: JsonValue, target: JsonValue, path: str, out: list[JsonPatchOperation]) -> None:
    if isinstance(source, dict) and isinstance(target, dict):
        for key in source:
            if key not in target:
                out.append({"op": "remove", "path": _pointer(path, key)})
        for key, value in target.items():
            if key in source:
                _diff(source[key], value, _pointer(path, key), out)
            else:
                out.append({"op": "add", "path": _pointer(path, key), "value": value})
        return
    if isinstance(source, list) and isinstance(target, list):
        common = min(len(source), len(target))
        for index in range(common):
            _diff(source[index], target[index], _pointer(path, index), out)
        for index in range(len(source) - 1, common - 1, -1):
            out.append({"op": "remove", "path": _pointer(path, index)})
        for index in range(common, len(target)):
            out.append({"op": "add", "path": _pointer(path, "-"), "value": target[index]})
        return
    if not _same(source, target):
        out.append({"op": "replace", "path": path, "value": target})
