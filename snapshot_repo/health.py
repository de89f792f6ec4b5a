"""Readiness: is the database reachable, how fast, and is its schema what this code needs.

A liveness probe that only pings would call a database ready before its
migrations ran; this report is only healthy when the schema revision in the
database is the head revision this installed package ships.
"""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel, ConfigDict, computed_field
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from . import _deadlines, migrate
from ._translate import describe, is_missing_schema
from .backends import Backend
from .backends.replicas import ReplicaRouter

__all__ = ["HealthReport", "ReplicaHealth", "probe"]


class ReplicaHealth(BaseModel):
    """One read replica, as `HealthReport.replicas` reports it.

    Attributes:
        url: the replica's URL, password hidden.
        reachable: it answered within the health timeout, as a standby.
        lag_seconds: how far behind the primary it is: the time since the
            newest primary WAL position it has replayed was current (None when
            unreachable or not measured yet).
        in_use: reads go to it: reachable, and at most `max_replica_lag` behind.
        error: why it is unreachable, one line (None when it is reachable).
    """

    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    url: str
    reachable: bool
    lag_seconds: float | None
    in_use: bool
    error: str | None = None


class HealthReport(BaseModel):
    """What a readiness probe needs to know, JSON-serialisable (`model_dump_json()`).

    Attributes:
        reachable: the database answered a query within the timeout.
        latency_ms: the round trip of that query, in milliseconds (None if unreachable).
        database_revision: the schema revision recorded in the database (None
            if never migrated or unreachable).
        head_revision: the newest revision this installed package ships.
        error: why the probe failed, one line (None when it did not).
        replicas: each read replica (`from_url(replicas=...)`), in the order
            given. They do not count towards `healthy`: reads skip a replica
            that is down or lagging, so the primary alone serves every call.
    """

    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    reachable: bool
    latency_ms: float | None
    database_revision: str | None
    head_revision: str
    error: str | None = None
    replicas: tuple[ReplicaHealth, ...] = ()

    @computed_field  # type: ignore[prop-decorator]
    @property
    def healthy(self) -> bool:
        """Reachable and migrated to exactly this package's head."""
        return self.reachable and self.database_revision == self.head_revision


async def probe(engine: AsyncEngine, ops: Backend, time_limit: float) -> HealthReport:
    """Measure one round trip and read the schema revision, within `time_limit` seconds.

    With read replicas, each is checked at the same time (its lag measured
    anew) within the same time limit. Never raises (but for cancellation)
    and never creates anything: a missing SQLite file is reported
    unreachable rather than created.
    """
    if not isinstance(ops, ReplicaRouter):
        return await _probe(engine, ops, time_limit)
    report, replicas = await asyncio.gather(_probe(engine, ops, time_limit), ops.check(time_limit))
    return report.model_copy(
        update={
            "replicas": tuple(
                ReplicaHealth(
                    url=state.url,
                    reachable=state.reachable,
                    lag_seconds=state.lag_seconds,
                    in_use=state.in_use,
                    error=state.error,
                )
                for state in replicas
            )
        }
    )


async def _probe(engine: AsyncEngine, ops: Backend, time_limit: float) -> HealthReport:
    """`probe` of the database `ops` writes to."""
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
