"""The precompiled statements and the values the driver layer binds to them agree."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy.dialects.postgresql import asyncpg as postgres_dialect
from sqlalchemy.dialects.sqlite import aiosqlite as sqlite_dialect

from snapshot_repo._dialects import (
    WRITE_COLUMNS,
    postgres_write_statement,
    sqlite_write_statements,
)
from snapshot_repo.backends import PendingWrite, Scope
from snapshot_repo.backends._compiled import compile_statement as _compile

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
