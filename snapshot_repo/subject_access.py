"""Everything held about a person, across namespaces and tenants: a GDPR access request.

`SnapshotRepository.export_user` exports one user in one namespace of one
tenant. A person's data may sit in several (a cart, preferences, an agent's
memory; several tenants of a multi-tenant service): `export_subject` finds
them all, as `erase_user` does for an erasure, and exports each in one
document; `export_subject_lines` streams the same as JSON Lines, so a person
with a long history never has to fit in memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Unpack, cast

from pydantic import JsonValue
from pydantic_core import to_json
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ._checks import valid_scope_name, valid_user_id
from ._context import RepositoryContext
from ._privacy import export_items
from ._queries import namespaces_of_user_statement
from .repository import RepositoryOptions, SnapshotRepository

__all__ = ["SUBJECT_EXPORT_FORMAT", "export_subject", "export_subject_lines"]

SUBJECT_EXPORT_FORMAT = "snapshot_repo.subject_export_everywhere"
"""The `format` of the document (and of the first line) these functions write."""


async def export_subject(
    engine_or_url: AsyncEngine | str | URL,
    user_id: str,
    *,
    tenant: str | None = None,
    **options: Unpack[RepositoryOptions],
) -> dict[str, JsonValue]:
    """Everything stored about `user_id` in every namespace (of every tenant, or of `tenant`).

    One JSON-serialisable document: a header (`format`, `format_version`,
    `user_id`, `tenant`, `exported_at`) and `scopes`, one per (tenant,
    namespace) holding the user, each with its `versions` newest first, as
    `export_user` gives them. Pass the repositories' options (`encryption`
    above all, so that sealed states are opened) as keyword arguments.

    Raises:
        SnapshotValidationError: bad user id.
        ConfigurationError: bad tenant or URL.
        StorageError: the database failed.
    """
    document: dict[str, JsonValue] = {}
    scopes: list[JsonValue] = []
    versions: list[JsonValue] = []  # the current scope's
    async for item in _items(engine_or_url, user_id, tenant, options):
        if "format" in item:
            document = item
        elif "versions" in item:  # a scope line: its versions follow
            versions = []
            scopes.append({**item, "versions": versions})
        else:
            versions.append(item)
    return {**document, "scopes": scopes}


async def export_subject_lines(
    engine_or_url: AsyncEngine | str | URL,
    user_id: str,
    *,
    tenant: str | None = None,
    **options: Unpack[RepositoryOptions],
) -> AsyncIterator[str]:
    """The same as `export_subject`, streamed as JSON Lines (each line ends with a newline).

    The header first, then for each scope a line `{"tenant", "namespace",
    "versions": []}` followed by one line per version, newest first; history is
    read in pages of 500.
    """
    async for item in _items(engine_or_url, user_id, tenant, options):
        yield to_json(item).decode() + "\n"


async def _items(
    engine_or_url: AsyncEngine | str | URL,
    user_id: str,
    tenant: str | None,
    options: RepositoryOptions,
) -> AsyncIterator[dict[str, JsonValue]]:
    user_id = valid_user_id(user_id)
    if tenant is not None:
        valid_scope_name("tenant", tenant)
    scoped: RepositoryOptions = cast(
        RepositoryOptions, {k: v for k, v in options.items() if k != "namespace"}
    )
    yield {
        "format": SUBJECT_EXPORT_FORMAT,
        "format_version": 1,
        "user_id": user_id,
        "tenant": tenant,
        "exported_at": datetime.now(UTC).isoformat(),
    }
    if isinstance(engine_or_url, AsyncEngine):  # the caller's engine stays open
        async for item in _scopes(engine_or_url, user_id, tenant, scoped):
            yield item
        return
    async with SnapshotRepository.from_url(engine_or_url, **scoped) as owner:
        async for item in _scopes(owner.engine, user_id, tenant, scoped):
            yield item


async def _scopes(
    engine: AsyncEngine, user_id: str, tenant: str | None, options: RepositoryOptions
) -> AsyncIterator[dict[str, JsonValue]]:
    """For each (tenant, namespace) holding the user: a scope line, then its versions."""
    finder: RepositoryContext[Any] = RepositoryContext(engine, None, options)
    async with finder.guard("export_subject", user_id):
        scopes = await finder.read(
            finder.backend.fetch, namespaces_of_user_statement(), {"user_id": user_id}
        )
    for row_tenant, namespace in sorted(scopes):
        if tenant is not None and row_tenant != tenant:
            continue
        per_namespace = cast(RepositoryOptions, {**options, "namespace": namespace})
        context: RepositoryContext[Any] = RepositoryContext(engine, None, per_namespace)
        if row_tenant:
            context = context.for_tenant(row_tenant)
        yield {"tenant": row_tenant or None, "namespace": namespace, "versions": []}
        async for item in export_items(context, user_id):
            if "format" not in item:  # the per-scope header: the scope line stands for it
                yield item
