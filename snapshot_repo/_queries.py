"""Read queries beyond latest and history: one version, as of a moment, paging, listing, the feed.

Each is one statement on an index (see `tables`): the history primary key for
versions and paging, the `created_at` index for as-of reads, the latest
table's primary key for listing users with keyset paging (never OFFSET), and
the feed indexes for `changes_since`.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    CompoundSelect,
    Select,
    Update,
    bindparam,
    exists,
    func,
    select,
    tuple_,
    union,
    update,
)

from ._sql import indexed_by
from .backends.statements import ROW_COLUMNS, SCAN, alive, in_scope, is_key
from .tables import (
    data_keys_table,
    erasure_receipts_table,
    history_table,
    latest_table,
    user_counts_table,
)

__all__ = [
    "as_of_statement",
    "count_users_statement",
    "exists_statement",
    "expired_users_statement",
    "history_before_statement",
    "latest_or_expired_statement",
    "list_users_statement",
    "namespaces_of_user_statement",
    "outdated_rows_statement",
    "plain_read_statements",
    "receipts_statement",
    "rewrite_payload_statement",
    "scope_users_statement",
    "users_page_statement",
    "version_row_statement",
    "versions_statement",
]


def _history_row() -> list[Any]:
    return [history_table.c[name] for name in ROW_COLUMNS]


@cache
def version_row_statement() -> Select[Any]:
    """One exact version of a user: a primary-key lookup."""
    return select(*_history_row()).where(
        is_key(history_table), history_table.c.version == bindparam("version")
    )


@cache
def versions_statement() -> Select[Any]:
    """Two exact versions of a user (for a diff), in one primary-key probe each."""
    return select(*_history_row()).where(
        is_key(history_table),
        history_table.c.version.in_([bindparam("first"), bindparam("second")]),
    )


@cache
def as_of_statement() -> Select[Any]:
    """The highest version written at or before `at`: the user's versions walked down
    the primary key from the newest, stopping at the first old enough.

    By version, not by timestamp: a write takes its `created_at` before it waits
    for the user's row lock, so of two racing writes the one that committed later
    (the higher version) can carry the earlier time; from then on it is the
    user's state, and this returns it. It reads one row per version written
    after `at` (a few milliseconds for 10,000); no index on `created_at` is kept
    for it, since that index cost every write a random page (revision 0017).
    """
    return (
        select(*_history_row())
        .where(is_key(history_table), history_table.c.created_at <= bindparam("at"))
        .order_by(history_table.c.version.desc())
        .limit(1)
    )


@cache
def history_before_statement() -> Select[Any]:
    """Keyset paging: the newest `limit` versions below `before_version`."""
    return (
        select(*_history_row())
        .where(is_key(history_table), history_table.c.version < bindparam("before_version"))
        .order_by(history_table.c.version.desc())
        .limit(bindparam("limit"))
    )


@cache
def history_within_bytes_statement() -> Select[Any]:
    """Keyset paging under a byte budget: the newest `limit` versions below
    `before_version`, cut after the first whose stored payloads add up to `max_bytes`.

    The database adds the sizes up (a window over the page, which its LIMIT
    bounds before the window runs: MariaDB computes windows before an outer
    LIMIT), and returns only the rows within the budget: the rows past it are never sent,
    so a caller's memory is bounded by the budget, not by `limit` times the
    largest payload. The first version is always returned, whatever its size.
    """
    page = (  # the LIMIT first, in a subquery of its own: the window sees only the page
        select(*_history_row(), func.length(history_table.c.payload).label("size"))
        .where(is_key(history_table), history_table.c.version < bindparam("before_version"))
        .order_by(history_table.c.version.desc())
        .limit(bindparam("limit"))
        .subquery("page")
    )
    running = func.sum(page.c.size).over(order_by=page.c.version.desc())
    sized = select(*page.c, (running - page.c.size).label("before")).subquery("sized")
    return (
        select(*(sized.c[column.name] for column in _history_row()))
        .where(sized.c.before < bindparam("max_bytes", type_=BigInteger))
        .order_by(sized.c.version.desc())
    )


@cache
def latest_or_expired_statement() -> Select[Any]:
    """The user's latest row even if expired, and whether it is alive at `now` (last column).

    For compare-and-set on what a reader saw: an expired row reads as absent,
    yet still holds the version a write must follow (see `_lifecycle.merge`).
    Both come from one row read, so no write can slip between them.
    """
    return select(*(latest_table.c[name] for name in ROW_COLUMNS), alive().label("alive")).where(
        is_key(latest_table)
    )


@cache
def exists_statement() -> Select[Any]:
    """Whether the user has a snapshot in the scope."""
    return select(exists().where(is_key(latest_table), alive()))


@cache
def list_users_statement() -> Select[Any]:
    """Users of the scope in id order after `after` (keyset paging on the primary key)."""
    return (
        select(latest_table.c.user_id)
        .where(in_scope(latest_table), latest_table.c.user_id > bindparam("after"), alive())
        .order_by(latest_table.c.user_id)
        .limit(bindparam("limit"))
    )


@cache
def count_users_statement() -> Select[Any]:
    """One row: the sum of the scope's count rows, how many there are, and how many of
    the scope's users are expired but not yet reaped at the bound `now` (read from the
    index on `expires_at`). See `_user_counts`."""
    counts = indexed_by(user_counts_table, "ix_snapshot_user_counts_scope")
    latest = indexed_by(latest_table, "ix_snapshot_latest_expires_at")
    expired = select(func.count()).where(in_scope(latest), latest.c.expires_at <= bindparam("now"))
    return (
        select(func.coalesce(func.sum(counts.c.delta), 0), func.count(), expired.scalar_subquery())
        .where(in_scope(counts))
        # SQLite: off the event loop's thread, as the scan it replaced was: the
        # expired backlog has no bound until `reap_expired` runs.
        .execution_options(**{SCAN: True})
    )


@cache
def outdated_rows_statement(table_name: str, one_tenant: bool) -> Select[Any]:
    """A page of rows stored under an older schema version, in key order (keyset paging).

    Covers every tenant of the namespace (tenants share the model), or one
    tenant when called through a tenant view.
    """
    table = history_table if table_name == "history" else latest_table
    where = [table.c.namespace == bindparam("namespace")]
    if one_tenant:
        where.append(table.c.tenant == bindparam("tenant"))
    return (
        select(
            table.c.tenant,
            table.c.user_id,
            table.c.version,
            table.c.schema_version,
            table.c.payload,
        )
        .where(
            *where,
            table.c.schema_version < bindparam("current"),
            tuple_(table.c.tenant, table.c.user_id, table.c.version)
            > tuple_(
                bindparam("after_tenant"), bindparam("after_user"), bindparam("after_version")
            ),
        )
        .order_by(table.c.tenant, table.c.user_id, table.c.version)
        .limit(bindparam("limit"))
    )


@cache
def rewrite_payload_statement(table_name: str) -> Update:
    """Store an upgraded payload in place, only if the row is still the old version."""
    table = history_table if table_name == "history" else latest_table
    return (
        update(table)
        .where(
            table.c.tenant == bindparam("tenant"),
            table.c.namespace == bindparam("namespace"),
            table.c.user_id == bindparam("user_id"),
            table.c.version == bindparam("version"),
            table.c.schema_version == bindparam("old_schema_version"),
        )
        .values(payload=bindparam("new_payload"), schema_version=bindparam("new_schema_version"))
    )


@cache
def namespaces_of_user_statement() -> CompoundSelect[Any]:
    """Every (tenant, namespace) holding a user's snapshot or data key (for erasing them all).

    A data key without a snapshot is what an older release's failed write left.
    """
    held = [
        select(table.c.tenant, table.c.namespace).where(table.c.user_id == bindparam("user_id"))
        for table in (latest_table, data_keys_table)
    ]
    return union(*held).order_by("tenant", "namespace")


@cache
def expired_users_statement(one_tenant: bool) -> Select[Any]:
    """A page of users of the namespace whose snapshot expired by `now`, oldest expiry first."""
    where = [
        latest_table.c.namespace == bindparam("namespace"),
        latest_table.c.expires_at <= bindparam("now"),
    ]
    if one_tenant:
        where.append(latest_table.c.tenant == bindparam("tenant"))
    return (
        select(latest_table.c.tenant, latest_table.c.user_id)
        .where(*where)
        .order_by(latest_table.c.expires_at)
        .limit(bindparam("limit"))
    )


@cache
def receipts_statement() -> Select[Any]:
    """The erasure receipts of a subject in a scope, newest first."""
    table = erasure_receipts_table
    return (
        select(table.c.subject, table.c.erased_at, table.c.versions_erased, table.c.cause)
        .where(
            table.c.subject == bindparam("subject"),
            table.c.tenant == bindparam("tenant"),
            table.c.namespace == bindparam("namespace"),
        )
        .order_by(table.c.erased_at.desc(), table.c.id.desc())
    )


@cache
def users_page_statement(one_tenant: bool) -> Select[Any]:
    """Users of the namespace in key order after a (tenant, user_id) position, with versions."""
    where = [latest_table.c.namespace == bindparam("namespace")]
    if one_tenant:
        where.append(latest_table.c.tenant == bindparam("tenant"))
    return (
        select(latest_table.c.tenant, latest_table.c.user_id, latest_table.c.version)
        .where(
            *where,
            tuple_(latest_table.c.tenant, latest_table.c.user_id)
            > tuple_(bindparam("after_tenant"), bindparam("after_user")),
        )
        .order_by(latest_table.c.tenant, latest_table.c.user_id)
        .limit(bindparam("limit"))
    )


@cache
def scope_users_statement() -> Select[Any]:
    """A page of the scope's users, expired ones included (for purging)."""
    return (
        select(latest_table.c.user_id)
        .where(in_scope(latest_table))
        .order_by(latest_table.c.user_id)
        .limit(500)
    )


def plain_read_statements() -> tuple[Any, ...]:
    """The statements `fetch` runs for reads only, which replicas may serve (see
    `backends.replicas`); any other statement runs on the primary."""
    return (
        version_row_statement(),
        versions_statement(),
        as_of_statement(),
        history_before_statement(),
        history_within_bytes_statement(),
        exists_statement(),
        list_users_statement(),
        count_users_statement(),
        receipts_statement(),
    )
