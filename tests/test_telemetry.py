"""OpenTelemetry: a span and a duration per public call, pool counts, nothing personal.

Spans and metrics go to the SDK's in-memory exporter and reader through the
repositories' `tracer_provider` and `meter_provider` options, so every test
has providers of its own (the global ones can be set only once per
process); the global providers are tested in a subprocess, as is a process
without OpenTelemetry at all.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy.engine import make_url

import snapshot_repo as sr
from tests.support.databases import sqlite_backend

DURATION = "db.client.operation.duration"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Recorded:
    """What the SDK received from the repositories made with `options`."""

    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    options: dict[str, Any]

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def points(self, metric: str) -> list[Any]:
        """The data points of `metric` collected now (each with `.attributes`)."""
        data = self.reader.get_metrics_data()
        assert data is not None
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for found in scope.metrics
            if found.name == metric
            for point in found.data.data_points
        ]


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield Recorded(
        exporter,
        reader,
        {"tracer_provider": tracer_provider, "meter_provider": meter_provider},
    )
    tracer_provider.shutdown()
    meter_provider.shutdown()


@pytest.fixture
def db_url(sqlite_or_postgres_url: str) -> str:
    return sqlite_or_postgres_url


def expected_attributes(url: str, operation: str) -> dict[str, Any]:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return {
            "db.system.name": "sqlite",
            "db.namespace": parsed.database,
            "db.operation.name": operation,
        }
    return {
        "db.system.name": "postgresql",
        "db.namespace": parsed.database,
        "server.address": parsed.host,
        "server.port": parsed.port or 5432,
        "db.operation.name": operation,
    }


def by_operation(spans: list[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        assert span.attributes is not None
        found.setdefault(str(span.attributes["db.operation.name"]), []).append(span)
    return found


async def test_a_span_per_call_follows_the_database_conventions(
    db_url: str, recorded: Recorded
) -> None:
    database = make_url(db_url).database
    async with sr.SnapshotRepository.from_url(db_url, **recorded.options) as repo:
        await repo.upsert_latest(sr.Snapshot(user_id="u1", state={"n": 1}))
        await repo.get_latest("u1")
        await repo.get_history("u1")
        await repo.merge("u1", {"m": 2})
        assert await repo.delete("u1") == 2
    spans = by_operation(recorded.spans())

    # merge writes through upsert_latest, a child of its span; close() finishes erasures.
    assert {name: len(found) for name, found in spans.items()} == {
        "upsert_latest": 2,
        "get_latest": 1,
        "get_history": 1,
        "merge": 1,
        "delete": 1,
        "finish_erasures": 1,
    }
    for operation, found in spans.items():
        for span in found:
            assert span.name == f"{operation} {database}"
            assert span.kind is SpanKind.CLIENT
            assert dict(span.attributes or {}) == expected_attributes(db_url, operation)
            assert span.status.status_code is StatusCode.UNSET
            assert not span.events
            assert not span.links
    merge = spans["merge"][0]
    parents = [span.parent.span_id if span.parent else None for span in spans["upsert_latest"]]
    assert parents == [None, merge.context.span_id]


async def test_failures_carry_the_error_type_and_nothing_else(
    db_url: str, recorded: Recorded, tmp_path: Path
) -> None:
    async with sr.SnapshotRepository.from_url(db_url, **recorded.options) as repo:
        await repo.upsert_latest(sr.Snapshot(user_id="u1", state={"n": 1}))
        with pytest.raises(sr.VersionConflictError):
            await repo.upsert_latest(sr.Snapshot(user_id="u1", state={"n": 2}), expected_version=7)
        with pytest.raises(sr.SnapshotValidationError):
            await repo.get_latest("")
    if make_url(db_url).get_backend_name() == "sqlite":  # a database never migrated
        broken_url, error = f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}", "SchemaNotReadyError"
    else:  # a database that does not exist
        broken_url = str(make_url(db_url).set(database="snapshot_repo_telemetry_missing"))
        error = "StorageError"
    async with sr.SnapshotRepository.from_url(broken_url, **recorded.options) as broken:
        with pytest.raises(sr.StorageError) as caught:
            await broken.get_latest("u1")
    assert type(caught.value).__name__ == error

    failed = [span for span in recorded.spans() if span.status.status_code is StatusCode.ERROR]
    assert [(span.name.split()[0], (span.attributes or {})["error.type"]) for span in failed] == [
        ("upsert_latest", "VersionConflictError"),
        ("get_latest", "SnapshotValidationError"),
        ("get_latest", error),
    ]
    for span in failed:
        assert span.status.description is None  # never the message: it names the user
        assert not span.events
    errors = {
        (point.attributes["db.operation.name"], point.attributes.get("error.type")): point.count
        for point in recorded.points(DURATION)
    }
    assert errors[("upsert_latest", "VersionConflictError")] == 1
    assert errors[("upsert_latest", None)] == 1
    assert errors[("get_latest", "SnapshotValidationError")] == 1
    assert errors[("get_latest", error)] == 1


async def test_durations_and_pool_connections_are_measured(db_url: str, recorded: Recorded) -> None:
    async with sr.SnapshotRepository.from_url(db_url, **recorded.options) as repo:
        for version in range(3):
            await repo.upsert_latest(sr.Snapshot(user_id="u1", state={"n": version}))
        assert (await repo.get_latest("u1")) is not None

        durations = {
            point.attributes["db.operation.name"]: point for point in recorded.points(DURATION)
        }
        assert durations["upsert_latest"].count == 3
        assert durations["get_latest"].count == 1
        assert dict(durations["get_latest"].attributes) == expected_attributes(db_url, "get_latest")
        assert 0 < durations["get_latest"].sum < 5  # seconds
        assert list(durations["get_latest"].explicit_bounds)[:3] == [0.001, 0.005, 0.01]

        def pool() -> dict[str, int]:
            points = recorded.points("db.client.connection.count")
            names = {point.attributes["db.client.connection.pool.name"] for point in points}
            assert len(names) == 1
            return {point.attributes["db.client.connection.state"]: point.value for point in points}

        idle = pool()
        assert idle["used"] == 0
        assert idle["idle"] >= 1  # the connections kept between calls
        async with repo.engine.connect() as connection:
            await connection.exec_driver_sql("SELECT 1")
            busy = pool()
            assert busy["used"] == 1
        assert pool()["used"] == 0
        engine_pool: Any = repo.engine.sync_engine.pool
        (limit,) = recorded.points("db.client.connection.max")
        assert limit.value == engine_pool.size() + engine_pool._max_overflow


async def test_calls_waiting_for_a_connection_are_pending_requests(
    db_url: str, recorded: Recorded
) -> None:
    settings = sr.EngineSettings(pool_size=1, pool_timeout=5)
    async with sr.SnapshotRepository.from_url(
        db_url, settings=settings, **recorded.options
    ) as repo:
        await repo.upsert_latest(sr.Snapshot(user_id="u1", state={"n": 1}))

        def pending() -> int:
            (point,) = recorded.points("db.client.connection.pending_requests")
            return int(point.value)

        assert pending() == 0
        connections = repo._backend._connections
        async with connections.checkout():  # the pool's only connection
            reads = [asyncio.create_task(repo.get_latest("u1")) for _ in range(2)]
            async with asyncio.timeout(5):  # they queue at once
                while True:
                    if connections.waiting == 2:
                        break
                    await asyncio.sleep(0.001)
            assert pending() == 2
        assert [(await read) is not None for read in reads] == [True, True]
        assert pending() == 0


async def test_pages_of_iterators_and_cross_namespace_calls_are_spans(
    recorded: Recorded, tmp_path: Path, sqlite_template: Path
) -> None:
    url = sqlite_backend(tmp_path, sqlite_template).url
    async with sr.SnapshotRepository.from_url(url, **recorded.options) as repo:
        for version in range(3):
            await repo.upsert_latest(sr.Snapshot(user_id="u1", state={"n": version}))
        recorded.exporter.clear()
        versions = [snapshot.version async for snapshot in repo.iter_history("u1", page_size=1)]
        assert versions == [3, 2, 1]
        lines = [line async for line in repo.export_user_lines("u1")]
        assert len(lines) == 4  # the header and three versions
        assert await sr.erase_user(repo.engine, "u1", **recorded.options) == 3
    operations = [(span.attributes or {})["db.operation.name"] for span in recorded.spans()]
    # One span per page read; erase_user: the lookup, the erasure, its checkpoint.
    assert operations == ["iter_history"] * 3 + ["export_user"] * 2 + ["erase_user"] + [
        "erase"
    ] * 2 + ["finish_erasures"]


MARK = "zq7"
"""In every user id, tenant, namespace, state, metadata, key, actor and reason below."""


async def test_no_personal_data_in_any_span_or_metric(
    db_url: str, recorded: Recorded, tmp_path: Path
) -> None:
    sr.set_redaction(False)  # error messages then hold whole user ids: none may be recorded
    try:
        await _many_operations(db_url, recorded.options, tmp_path)
    finally:
        sr.set_redaction(True)
    spans = recorded.spans()
    assert len(spans) > 40
    assert any(span.status.status_code is StatusCode.ERROR for span in spans)
    leaks = [text for text in _everything_recorded(recorded) if MARK in text.lower()]
    assert leaks == []


async def _many_operations(url: str, options: dict[str, Any], tmp_path: Path) -> None:
    key = f"{MARK}-erasure-key-0123456789"
    async with sr.SnapshotRepository.from_url(
        url, namespace=f"{MARK}-namespace", erasure_key=key, **options
    ) as base:
        repo = base.for_tenant(f"{MARK}-tenant")
        user, other = f"{MARK}-user-alice", f"{MARK}-user-bob"
        extra: dict[str, Any] = {
            "actor": f"{MARK}-actor",
            "reason": f"{MARK}-reason",
            "metadata": {f"{MARK}-meta": f"{MARK}-value"},
        }
        state = {"secret": f"{MARK}-state"}
        await repo.upsert_latest(
            sr.Snapshot(user_id=user, state=state), idempotency_key=f"{MARK}-key", **extra
        )
        await repo.upsert_latest(  # replayed
            sr.Snapshot(user_id=user, state=state), idempotency_key=f"{MARK}-key", **extra
        )
        await repo.upsert_latest(sr.Snapshot(user_id=user, state={"v": f"{MARK}-2"}), **extra)
        with pytest.raises(sr.VersionConflictError, match=user):
            await repo.upsert_latest(sr.Snapshot(user_id=user, state=state), expected_version=9)
        with pytest.raises(sr.SnapshotValidationError):
            await repo.get_latest(f"{MARK}\x00bad")
        with pytest.raises(sr.SnapshotValidationError):
            await repo.diff(user, 1, 99)
        await repo.upsert_many(
            [sr.Snapshot(user_id=name, state=state) for name in (user, other, other)], **extra
        )
        await repo.get_latest(user)
        await repo.get_latest_many([user, other, f"{MARK}-nobody"])
        await repo.get_history(user, limit=2, before_version=3)
        assert [snapshot async for snapshot in repo.iter_history(user, page_size=2)]
        await repo.get_version(user, 1)
        await repo.get_as_of(user, datetime.now(UTC))
        await repo.diff(user, 1, 2)
        await repo.exists(user)
        await repo.list_users(after=f"{MARK}-a")
        await repo.count_users()
        await repo.changes_since(None)
        await repo.merge(user, {f"{MARK}-merged": True}, **extra)
        await repo.restore(user, 1, actor=f"{MARK}-actor", reason=f"{MARK}-reason")
        await repo.export_user(user)
        assert [line async for line in repo.export_user_lines(user)]
        await repo.prune_history(user, keep_last=2)
        await repo.prune_history(older_than=timedelta(days=1))
        await repo.upsert_latest(
            sr.Snapshot(user_id=f"{MARK}-short", state=state), ttl=timedelta(0)
        )
        await repo.reap_expired()
        await repo.erase(other)
        await repo.erasure_receipt(other)
        await sr.export_subject(base.engine, user, **options)
        await sr.erase_user(base.engine, user, tenant=f"{MARK}-tenant", **options)
        await repo.delete(user)
        await repo.purge_all(confirm=repo.purge_label)
        await base.health()
    # Unmigrated: the error's message names the user (redaction is off), its span must not.
    unmigrated = f"sqlite+aiosqlite:///{tmp_path / 'unmigrated.db'}"
    async with sr.SnapshotRepository.from_url(unmigrated, **options) as broken:
        with pytest.raises(sr.SchemaNotReadyError, match=f"{MARK}-user-alice"):
            await broken.get_latest(f"{MARK}-user-alice")


def _everything_recorded(recorded: Recorded) -> Iterator[str]:
    """Every string of every span and metric: names, attributes, events, links, statuses."""

    def attributes(found: Any) -> Iterator[str]:
        for name, value in dict(found or {}).items():
            yield str(name)
            yield str(value)

    for span in recorded.spans():
        yield span.name
        yield from attributes(span.attributes)
        yield from attributes(span.resource.attributes)
        yield str(span.status.description)
        for event in span.events:
            yield event.name
            yield from attributes(event.attributes)
        for link in span.links:
            yield from attributes(link.attributes)
    data = recorded.reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                yield metric.name
                for point in metric.data.data_points:
                    yield from attributes(point.attributes)
                    for exemplar in getattr(point, "exemplars", None) or ():
                        yield from attributes(exemplar.filtered_attributes)


def _without_opentelemetry(directory: Path) -> str:
    return f"""
        import asyncio, sys
        sys.modules["opentelemetry"] = None  # as if the `otel` extra were not installed

        import snapshot_repo as sr
        from snapshot_repo import _telemetry
        from snapshot_repo.repository import SnapshotRepository

        assert not _telemetry.AVAILABLE
        # No wrapper at all: the methods are the functions written in repository.py.
        assert not hasattr(SnapshotRepository.get_latest, "__wrapped__")

        async def main():
            url = "sqlite:///{directory / "plain.db"}"
            async with sr.SnapshotRepository.from_url(url) as repo:
                assert repo._context.telemetry is None
                await repo.migrate()
                await repo.upsert_latest(sr.Snapshot(user_id="u1", state={{"n": 1}}))
                assert (await repo.get_latest("u1")).version == 1
                assert len([s async for s in repo.iter_history("u1")]) == 1
                assert await repo.delete("u1") == 1
            try:
                sr.SnapshotRepository.from_url(url, tracer_provider=object())
            except sr.ConfigurationError as exc:
                print("refused:", exc)
            loaded = sorted(name for name, module in sys.modules.items()
                            if name.startswith("opentelemetry") and module is not None)
            print("loaded:", loaded)

        asyncio.run(main())
        """


def _with_global_providers(directory: Path) -> str:
    return f"""
        import asyncio
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        import snapshot_repo as sr

        async def main():
            async with sr.SnapshotRepository.from_url("sqlite:///{directory / "g.db"}") as repo:
                await repo.migrate()  # the API's no-op tracer: nothing recorded, no error
                print("recording before:", repo._context.telemetry.recording())
                exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
                provider = TracerProvider()
                provider.add_span_processor(SimpleSpanProcessor(exporter))
                trace.set_tracer_provider(provider)
                metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
                print("recording after:", repo._context.telemetry.recording())
                await repo.get_latest("u1")
                print("spans:", [span.name.split()[0] for span in exporter.get_finished_spans()])
                names = [m.name for r in reader.get_metrics_data().resource_metrics
                         for s in r.scope_metrics for m in s.metrics]
                print("metrics:", sorted(names))

        asyncio.run(main())
        """


@pytest.fixture(scope="module", autouse=True)
def processes(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """Both subprocess scenarios, started with the module's first test (most of their
    time is imports, which overlaps the other tests); their tests, last, read them."""
    directory = tmp_path_factory.mktemp("telemetry")
    started = {
        name: subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script(directory))],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, script in (("absent", _without_opentelemetry), ("global", _with_global_providers))
    }
    yield started
    for process in started.values():
        if process.poll() is None:
            process.kill()
        process.communicate()


def _output(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return out


def test_without_opentelemetry_nothing_is_traced_and_nothing_is_added(
    processes: dict[str, subprocess.Popen[str]],
) -> None:
    out = _output(processes["absent"])
    assert "refused: tracer_provider and meter_provider need OpenTelemetry" in out
    assert "loaded: []" in out


def test_the_global_providers_are_used_even_when_set_after_the_repository(
    processes: dict[str, subprocess.Popen[str]],
) -> None:
    out = _output(processes["global"])
    # Without a provider the API's stand-ins are skipped (they would record nothing).
    assert "recording before: False" in out
    assert "recording after: True" in out
    assert "spans: ['get_latest']" in out
    assert (
        "metrics: ['db.client.connection.count', 'db.client.connection.max', "
        "'db.client.connection.pending_requests', 'db.client.operation.duration']" in out
    )
