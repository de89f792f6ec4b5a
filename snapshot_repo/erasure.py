"""Erasing a person: every namespace (and tenant) at once, for a GDPR request.

A repository's `delete` erases one user in one namespace. A person's data
may sit in several namespaces (a cart, preferences, an agent memory) and,
in multi-tenant services, under several tenants: `erase_user` finds them
all and erases each as `delete` does.
"""

from __future__ import annotations

from typing import Any, Unpack, cast

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ._checks import valid_scope_name, valid_user_id
from ._context import RepositoryContext
from ._queries import namespaces_of_user_statement
from .repository import RepositoryOptions, SnapshotRepository

__all__ = ["erase_user"]


async def erase_user(
    engine_or_url: AsyncEngine | str | URL,
    user_id: str,
    *,
    tenant: str | None = None,
    **options: Unpack[RepositoryOptions],
) -> int:
    """Erase `user_id` in every namespace (of every tenant, or only of `tenant`).

    Each (tenant, namespace) is erased in its own transaction, as
    `SnapshotRepository.erase` does (change feed, listeners), and the user's
    data keys are always destroyed. Pass the repositories' `erasure_key` (for
    receipts) and other options as keyword arguments. Call it again after a
    failure: it is idempotent.

    Returns:
        How many versions were erased in total (0 if the user had none).

    Raises:
        SnapshotValidationError: bad user id.
        ConfigurationError: bad tenant or URL.
        StorageError: the database failed; namespaces erased before stay erased.
    """
    user_id = valid_user_id(user_id)
    if tenant is not None:
        valid_scope_name("tenant", tenant)
    scoped_options: RepositoryOptions = cast(
        RepositoryOptions, {k: v for k, v in options.items() if k != "namespace"}
    )
    if isinstance(engine_or_url, AsyncEngine):  # the caller's engine stays open
        return await _erase_everywhere(engine_or_url, user_id, tenant, scoped_options)
    # A repository of our own owns the engine: closing it finishes the erasures' traces.
    async with SnapshotRepository.from_url(engine_or_url, **scoped_options) as owner:
        return await _erase_everywhere(owner.engine, user_id, tenant, scoped_options)


async def _erase_everywhere(
    engine: AsyncEngine, user_id: str, tenant: str | None, options: RepositoryOptions
) -> int:
    finder: RepositoryContext[Any] = RepositoryContext(engine, None, options)
    async with finder.guard("erase_user", user_id):
        scopes = await finder.read(
            finder.backend.fetch, namespaces_of_user_statement(), {"user_id": user_id}
        )
    found: list[tuple[RepositoryContext[Any], str]] = []
    for row_tenant, namespace in scopes:
        if tenant is not None and row_tenant != tenant:
            continue
        per_namespace = cast(RepositoryOptions, {**options, "namespace": namespace})
        context: RepositoryContext[Any] = RepositoryContext(engine, None, per_namespace)
        found.append((context.for_tenant(row_tenant) if row_tenant else context, user_id))
    return sum(await finder.erase_batch(found, "erase", drop_data_key=True))
