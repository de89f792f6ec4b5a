"""Readiness: is the database reachable, how fast, and is its schema what this code needs.

A liveness probe that only pings would call a database ready before its
migrations ran; this report is only healthy when the schema revision in the
database is the head revision this installed package ships.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, computed_field
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from . import _deadlines, migrate
from ._translate import describe, is_missing_schema
from .backends import Backend

__all__ = ["HealthReport", "probe"]


class HealthReport(BaseModel):
    """What a readiness probe needs to know, JSON-serialisable (`model_dump_json()`).

    Attributes:
        reachable: the database answered a query within the timeout.
        latency_ms: the round trip of that query, in milliseconds (None if unreachable).
        database_revision: the schema revision recorded in the database (None
            if never migrated or unreachable).
        head_revision: the newest revision this installed package ships.
        error: why the probe failed, one line (None when it did not).
    """

    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    reachable: bool
    latency_ms: float | None
    database_revision: str | None
    head_revision: str
    error: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def healthy(self) -> bool:
        """Reachable and migrated to exactly this package's head."""
        return self.reachable and self.database_revision == self.head_revision


async def probe(engine: AsyncEngine, ops: Backend, time_limit: float) -> HealthReport:
    """Measure one round trip and read the schema revision, within `time_limit` seconds.

    Never raises (but for cancellation) and never creates anything: a
    missing SQLite file is reported unreachable rather than created.
    """
    head = migrate.head_revision()
    missing = await ops.missing_database()
    if missing is not None:
        return HealthReport(
            reachable=False,
            latency_ms=None,
            database_revision=None,
            head_revision=head,
            error=missing,
        )
    started = time.perf_counter()
    # A registered deadline (not asyncio.timeout), so that waits the loop cannot
    # cancel (a SQLite connection opening on its thread) are cut to it too. On the
    # driver path a timed-out probe drops its connection at once instead of
    # waiting for a polite close from a server that may be frozen.
    deadline = _deadlines.start(time_limit)
    try:
        revision = await _schema_revision(ops)
    except BaseException as exc:
        _deadlines.stop(deadline)
        if deadline.expired_for(type(exc)):
            error = f"no answer within {time_limit:g} s"
        elif isinstance(exc, Exception):
            error = describe(exc)
        else:
            raise
    else:
        _deadlines.stop(deadline)
        deadline.expired_for(None)  # withdraw a cancel that came too late to matter
        return HealthReport(
            reachable=True,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
            database_revision=revision,
            head_revision=head,
        )
    return HealthReport(
        reachable=False, latency_ms=None, database_revision=None, head_revision=head, error=error
    )


_REVISION = text(f"SELECT version_num FROM {migrate.VERSION_TABLE}")


async def _schema_revision(ops: Backend) -> str | None:
    """The revision recorded in the database; None when it was never migrated."""
    try:
        rows = await ops.fetch(_REVISION, {})
    except Exception as exc:
        if is_missing_schema(exc):
            return None
        raise
    return str(rows[0][0]) if rows else None
