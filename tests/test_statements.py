"""The precompiled statements and the values the driver layer binds to them agree."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest
from sqlalchemy.dialects.postgresql import asyncpg as postgres_dialect
from sqlalchemy.dialects.sqlite import aiosqlite as sqlite_dialect

from snapshot_repo._sql import indexed_by
from snapshot_repo.backends import PendingWrite, Scope
from snapshot_repo.backends._compiled import compile_statement as _compile
from snapshot_repo.backends.feed_sql import changes_since_statement
from snapshot_repo.backends.postgres_sql import (
    postgres_bulk_write_statement,
    postgres_erase_statement,
    postgres_write_statement,
)
from snapshot_repo.backends.sqlite_sql import sqlite_write_statements
from snapshot_repo.backends.statements import (
    WRITE_COLUMNS,
    sqlite_erasure_feed_statements,
)
from snapshot_repo.tables import changes_table

DIALECTS = {"postgres": postgres_dialect.dialect(), "sqlite": sqlite_dialect.dialect()}


def a_write() -> PendingWrite:
    return PendingWrite(
        scope=Scope(tenant="t", namespace="n"),
        user_id="u1",
        schema_version=3,
        payload=b"{}",
        created_at=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        expected_version=7,
        idempotency_key="k",
        actor="a",
        reason="r",
        metadata=b"{}",
        expires_at=datetime(2026, 2, 1, tzinfo=UTC),
    )


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("mode", ["upsert", "create", "replace"])
def test_every_write_bind_gets_a_value_from_the_write(dialect: str, mode: str):
    """A bind the write does not supply would silently take its default (None)."""
    statement = (
        postgres_write_statement(mode)
        if dialect == "postgres"
        else sqlite_write_statements(mode)[0]
    )
    compiled = _compile(statement, DIALECTS[dialect])
    params = a_write().params()
    assert {f"w_{name}" for name in WRITE_COLUMNS} <= set(params)
    for name in compiled.names:
        assert name in params or compiled.defaults[name] is not None, name
    args = dict(zip(compiled.names, compiled.args(params), strict=True))
    assert args["w_user_id"] == "u1"
    assert args["w_payload"] == b"{}"
    if dialect == "sqlite":  # timestamps are stored as naive UTC text
        assert args["w_created_at"] == "2026-01-02 03:04:05.000006"
    else:
        assert args["w_created_at"] == datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    if mode == "replace":
        assert args["expected_version"] == 7


BATCH_BINDS = {
    "user_ids",
    "schema_versions",
    "payloads",
    "created_at",
    "tenant",
    "namespace",
    "actor",
    "reason",
    "metadata",
}
"""What `PostgresBackend.write_many` binds (and `keep_last`, `cutoff` with retention)."""


@pytest.mark.parametrize(
    ("notifying", "prune", "distinct_users"), list(itertools.product([False, True], repeat=3))
)
def test_batch_write_binds_are_the_backends_or_constants(
    notifying: bool, prune: bool, distinct_users: bool
):
    """Every value the batch statement reads is one the backend binds, or a constant of its own."""
    statement = postgres_bulk_write_statement(
        notifying=notifying, prune=prune, distinct_users=distinct_users
    )
    compiled = _compile(statement, DIALECTS["postgres"])
    bound = BATCH_BINDS | ({"keep_last", "cutoff"} if prune else set())
    assert bound <= set(compiled.names)
    for name in set(compiled.names) - bound:
        assert compiled.defaults[name] is not None, name
    assert compiled.sql.count("unnest(") == 1
    assert ("WITH ORDINALITY" in compiled.sql) is not distinct_users
    assert ("pg_notify(" in compiled.sql) is notifying
    assert ("DELETE FROM snapshot_history" in compiled.sql) is prune


def test_erase_statement_is_one_call_of_the_function():
    compiled = _compile(postgres_erase_statement(), DIALECTS["postgres"])
    assert compiled.names == (
        "tenant",
        "namespace",
        "user_id",
        "at",
        "only_expired",
        "subject",
        "cause",
        "drop_data_key",
        "notify",
    )
    assert compiled.sql.count("snapshot_repo_erase(") == 1


@pytest.mark.parametrize(
    ("statement", "index"),
    [
        (changes_since_statement("sqlite"), "ix_snapshot_changes_feed"),
        (sqlite_erasure_feed_statements()[0], "ix_snapshot_changes_user"),
    ],
    ids=["changes_since", "forget_feed"],
)
def test_index_hints_render_on_sqlite_only(statement, index: str):
    """The hint is SQLite syntax; another dialect gets the same statement without it."""
    sqlite_sql = _compile(statement, DIALECTS["sqlite"]).sql
    assert f"snapshot_changes INDEXED BY {index} " in sqlite_sql, sqlite_sql
    assert sqlite_sql.count("INDEXED BY") == 1, sqlite_sql
    postgres_sql = _compile(statement, DIALECTS["postgres"]).sql
    assert "INDEXED BY" not in postgres_sql, postgres_sql
    assert "FROM snapshot_changes " in postgres_sql, postgres_sql


def test_index_hints_name_a_declared_index_and_key_the_cache():
    with pytest.raises(ValueError, match="no index"):
        indexed_by(changes_table, "ix_missing")
    feed = indexed_by(changes_table, "ix_snapshot_changes_feed")
    user = indexed_by(changes_table, "ix_snapshot_changes_user")
    # Statements differing only in the index must not share SQLAlchemy's compiled cache.
    assert feed._generate_cache_key() != user._generate_cache_key()
