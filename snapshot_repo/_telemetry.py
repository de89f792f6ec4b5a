"""OpenTelemetry spans and metrics for repository calls (the optional `otel` extra).

Each public repository call is one span of kind CLIENT named
"{operation} {database}", with the database client semantic conventions'
attributes (`db.system.name`, `db.operation.name`, `db.namespace`,
`server.address`, `server.port`, and `error.type` when it fails), and one
`db.client.operation.duration` measurement in seconds with the same
attributes. The pools of the engines repositories run on are observed as
`db.client.connection.count` (state `used` or `idle`),
`db.client.connection.pending_requests` (calls waiting for a connection) and
`db.client.connection.max`.

What is recorded is fixed by configuration only: the database, the server
and the method's name. No user id, tenant, state, metadata, idempotency key
or exception message (which may hold a redacted user id) ever reaches an
attribute, an event, a span name or a status description; a failure is
recorded as its exception's class name and status ERROR only.

The OpenTelemetry API is imported once, here, when this module is imported.
Without it, `traced` hands back the method unchanged and `telemetry_for`
returns None, so a repository call does nothing more than one `is None`
check in its guard. With the API but no provider installed (no SDK
configured, and none given to the repository), a call checks that and
skips the API's stand-ins, which would record nothing: about 0.3 µs, where
going through them cost about 3 µs (SQLite's `get_latest`: 21.5 against
24.6 µs). Once an SDK installs a global provider, the next call is traced.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from time import perf_counter
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from sqlalchemy.ext.asyncio import AsyncEngine

from .errors import ConfigurationError

try:
    from opentelemetry import context as _otel_context
    from opentelemetry import metrics as _otel_metrics
    from opentelemetry import trace as _otel_trace
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # the `otel` extra is not installed: telemetry is off, at no cost
    AVAILABLE = False
else:
    AVAILABLE = True

if TYPE_CHECKING:
    from opentelemetry.metrics import Histogram, Meter, MeterProvider
    from opentelemetry.trace import Tracer, TracerProvider

    from ._context import RepositoryContext

__all__ = ["AVAILABLE", "INSTRUMENTATION_SCOPE", "Telemetry", "telemetry_for", "traced"]

INSTRUMENTATION_SCOPE = "snapshot_repo"
"""The name of the tracer and meter the spans and metrics come from."""

_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
"""The semantic conventions' advised buckets for `db.client.operation.duration`."""

_SYSTEMS = {"postgresql": "postgresql", "sqlite": "sqlite", "mysql": "mysql", "mariadb": "mariadb"}
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}

_IN_CALL: ContextVar[bool] = ContextVar("snapshot_repo_traced_call", default=False)
"""True inside a traced public call: its guards then open no span of their own."""

_MethodT = TypeVar("_MethodT", bound=Callable[..., Coroutine[Any, Any, Any]])
_ResultT = TypeVar("_ResultT")


_METRICS_API: Any = None
_GLOBALS_READABLE = False
if AVAILABLE:
    _METRICS_API = __import__("opentelemetry.metrics._internal", fromlist=["_"])
    # Where the API keeps the providers an SDK installs. It names them privately, so
    # they are checked once here: if a later API moves them, or the environment asks
    # the API to load providers itself, every call is recorded (`_globals_unset` False).
    _GLOBALS_READABLE = (
        hasattr(_otel_trace, "_TRACER_PROVIDER")
        and hasattr(_METRICS_API, "_METER_PROVIDER")
        and "OTEL_PYTHON_TRACER_PROVIDER" not in os.environ
        and "OTEL_PYTHON_METER_PROVIDER" not in os.environ
    )


def _globals_unset() -> bool:
    """Whether neither a global tracer provider nor a global meter provider is installed:
    the API's stand-ins would record nothing, so a call skips them. Read from the API's
    module globals (about 0.1 µs): `get_tracer_provider()` reads the environment each
    time, about 5 µs."""
    return (
        _GLOBALS_READABLE
        and _otel_trace._TRACER_PROVIDER is None
        and _METRICS_API._METER_PROVIDER is None
    )


class _HasContext(Protocol):
    _context: RepositoryContext[Any]


def traced(method: _MethodT) -> _MethodT:
    """Run a public coroutine method of the repository in a span named after it.

    Without the OpenTelemetry API this returns `method` itself: no wrapper,
    no cost. Guards inside the call open no spans of their own; another
    traced method called from it (`merge` writes through `upsert_latest`)
    is a child span.
    """
    if not AVAILABLE:
        return method
    operation = method.__name__

    @functools.wraps(method)
    async def call(self: _HasContext, *args: Any, **kwargs: Any) -> Any:
        telemetry = self._context.telemetry
        if telemetry is None or not telemetry.recording():
            return await method(self, *args, **kwargs)
        return await telemetry.run(operation, method(self, *args, **kwargs))

    return cast(_MethodT, call)


def telemetry_for(
    engine: AsyncEngine, backend: Any, tracer_provider: Any, meter_provider: Any
) -> Telemetry | None:
    """The telemetry of a repository on `engine`; None when the API is not installed.

    None for a provider means the global one (`trace.set_tracer_provider`,
    `metrics.set_meter_provider`), looked up at each call through the API's
    proxies, so a provider set after the repository was made is used.

    Raises:
        ConfigurationError: a provider was given but the API is not installed.
    """
    if not AVAILABLE:
        if tracer_provider is not None or meter_provider is not None:
            raise ConfigurationError(
                "tracer_provider and meter_provider need OpenTelemetry: "
                "pip install 'snapshot-repo[otel]'"
            )
        return None
    instruments = _instruments_for(tracer_provider, meter_provider)
    instruments.pools.watch(engine, backend)
    on_globals = tracer_provider is None and meter_provider is None
    return Telemetry(engine, instruments, on_globals=on_globals)


class Telemetry:
    """Spans and duration measurements of one repository's calls (see the module)."""

    __slots__ = (
        "_attributes",
        "_dialect",
        "_duration",
        "_engine",
        "_names",
        "_on_globals",
        "_tracer",
    )

    def __init__(
        self, engine: AsyncEngine, instruments: _Instruments, *, on_globals: bool = False
    ) -> None:
        self._engine = engine
        self._on_globals = on_globals
        self._tracer = instruments.tracer
        self._duration = instruments.duration
        # Per operation: the span name and the attributes, built once (see `_for`).
        self._names: dict[str, str] = {}
        self._attributes: dict[str, dict[str, str | int]] = {}
        # MySQL URLs may reach a MariaDB server, known once connected: until then the
        # attributes are rebuilt, and `_dialect` holds the dialect still to be asked.
        self._dialect: Any = engine.dialect if engine.dialect.name == "mysql" else None

    def recording(self) -> bool:
        """Whether calls are traced and measured now: always with providers given to the
        repository; on the global ones, once an SDK has installed either of them."""
        return not (self._on_globals and _globals_unset())

    async def run(self, operation: str, call: Awaitable[_ResultT]) -> _ResultT:
        """Await `call` (one public call) inside its span, and measure it."""
        name, attributes = self._for(operation)
        span = self._tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        token = _enter(span)
        in_call = _IN_CALL.set(True)
        started = perf_counter()
        try:
            result = await call
        except BaseException as exc:
            self._finish(span, operation, attributes, started, exc)
            raise
        else:
            self._finish(span, operation, attributes, started, None)
            return result
        finally:
            _IN_CALL.reset(in_call)
            _leave(token)
            span.end()

    def guard(
        self, operation: str, errors: AbstractAsyncContextManager[None]
    ) -> AbstractAsyncContextManager[None]:
        """`errors` (a call's error guard), in a span of its own unless a traced call
        encloses it: the pages of `iter_history` and `export_user_lines`, and
        the steps of `erase_user` and `export_subject`, are spans each."""
        if _IN_CALL.get() or not self.recording():
            return errors
        return _GuardSpan(self, operation, errors)

    def _finish(
        self,
        span: Any,
        operation: str,
        attributes: dict[str, str | int],
        started: float,
        exc: BaseException | None,
    ) -> None:
        """Record the call's duration, and its failure (if `exc`) on the span."""
        duration = perf_counter() - started
        if self._dialect is not None:  # a MySQL URL: whether it is MariaDB is known by now
            _name, attributes = self._for(operation)
            span.set_attributes(attributes)
        if exc is not None:
            # The class name only: messages can hold (redacted) user ids and driver text.
            error = type(exc).__qualname__
            span.set_attribute("error.type", error)
            span.set_status(Status(StatusCode.ERROR))
            attributes = {**attributes, "error.type": error}
        self._duration.record(duration, attributes)

    def _for(self, operation: str) -> tuple[str, dict[str, str | int]]:
        attributes = self._attributes.get(operation)
        if attributes is None or self._dialect is not None:
            dialect = self._dialect
            if dialect is not None and getattr(dialect, "server_version_info", None) is not None:
                self._dialect = None  # connected: is_mariadb is known from now on
                self._attributes.clear()
            base = _database_attributes(self._engine)
            attributes = {**base, "db.operation.name": operation}
            namespace = base.get("db.namespace")
            self._names[operation] = f"{operation} {namespace}" if namespace else operation
            self._attributes[operation] = attributes
        return self._names[operation], attributes


class _GuardSpan:
    """A span around one error guard that no traced call encloses (see `Telemetry.guard`)."""

    __slots__ = (
        "_attributes",
        "_errors",
        "_operation",
        "_span",
        "_started",
        "_telemetry",
        "_token",
    )

    def __init__(
        self, telemetry: Telemetry, operation: str, errors: AbstractAsyncContextManager[None]
    ) -> None:
        self._telemetry = telemetry
        self._operation = operation
        self._errors = errors
        self._span: Any = None
        self._attributes: dict[str, str | int] = {}
        self._token: Any = None
        self._started = 0.0

    async def __aenter__(self) -> None:
        name, attributes = self._telemetry._for(self._operation)
        self._attributes = attributes
        self._span = self._telemetry._tracer.start_span(
            name, kind=SpanKind.CLIENT, attributes=attributes
        )
        self._token = _enter(self._span)
        self._started = perf_counter()
        try:
            await self._errors.__aenter__()
        except BaseException:
            _leave(self._token)
            self._span.end()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        telemetry, operation, span = self._telemetry, self._operation, self._span
        attributes = self._attributes
        try:
            # Translated first, so the span names the error the caller gets.
            await self._errors.__aexit__(exc_type, exc, traceback)
        except BaseException as translated:
            telemetry._finish(span, operation, attributes, self._started, translated)
            raise
        else:
            telemetry._finish(span, operation, attributes, self._started, exc)
        finally:
            _leave(self._token)
            self._span.end()


def _enter(span: Any) -> object:
    """Make `span` the current span (the parent of the driver's spans, if traced); a
    no-op tracer's span (invalid: nothing to propagate) is skipped, half the cost."""
    if not span.get_span_context().is_valid:
        return None
    return _otel_context.attach(_otel_trace.set_span_in_context(span))


def _leave(token: Any) -> None:
    if token is not None:
        _otel_context.detach(token)


def _database_attributes(engine: AsyncEngine) -> dict[str, str | int]:
    """The semantic conventions' attributes of the database `engine` reaches: configuration only."""
    url, dialect = engine.url, engine.dialect
    system = _SYSTEMS.get(dialect.name, dialect.name)
    if system == "mysql" and getattr(dialect, "is_mariadb", False):
        system = "mariadb"
    attributes: dict[str, str | int] = {"db.system.name": system}
    if url.database:
        attributes["db.namespace"] = url.database
    if url.host:
        attributes["server.address"] = url.host
        port = url.port or _DEFAULT_PORTS.get(system)
        if port is not None:
            attributes["server.port"] = port
    return attributes


def _pool_name(engine: AsyncEngine) -> str:
    """`server.address:server.port/db.namespace`, as the conventions suggest (SQLite: the file)."""
    attributes = _database_attributes(engine)
    namespace = attributes.get("db.namespace", "")
    if "server.address" not in attributes:
        return f"{attributes['db.system.name']}:{namespace}"
    return f"{attributes['server.address']}:{attributes.get('server.port', '')}/{namespace}"


class _Pools:
    """The pools of the engines repositories run on, observed for one meter.

    Registered once per engine (weakly: a dropped engine leaves the
    observations); engines reaching the same database are summed under one
    pool name. A connection a repository keeps between calls is checked out
    in SQLAlchemy's eyes but idle in fact, so it counts as idle.
    """

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()  # observed on the metric reader's thread
        self._engines: weakref.WeakKeyDictionary[Any, tuple[str, weakref.WeakSet[Any]]] = (
            weakref.WeakKeyDictionary()
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[self._observe_count],
            unit="{connection}",
            description="The number of connections that are currently in the state "
            "described by the state attribute.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.pending_requests",
            callbacks=[self._observe_pending],
            unit="{request}",
            description="The number of current pending requests for an open connection.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max",
            callbacks=[self._observe_max],
            unit="{connection}",
            description="The maximum number of open connections allowed.",
        )

    def watch(self, engine: AsyncEngine, backend: Any) -> None:
        sync_engine = engine.sync_engine
        with self._lock:
            entry = self._engines.get(sync_engine)
            if entry is None:
                entry = (_pool_name(engine), weakref.WeakSet())
                self._engines[sync_engine] = entry
            entry[1].add(backend)

    def _pools(self) -> Iterator[tuple[str, Any, int]]:
        """(pool name, pool, connections kept by repositories) of each live queue pool."""
        for name, pool, backends in self._entries():
            kept = sum(getattr(backend, "kept_connections", 0) for backend in backends)
            yield name, pool, kept

    def _entries(self) -> Iterator[tuple[str, Any, list[Any]]]:
        """(pool name, pool, backends watched on it) of each live queue pool."""
        with self._lock:
            entries = [
                (engine, name, list(backends)) for engine, (name, backends) in self._engines.items()
            ]
        for engine, name, backends in entries:
            pool = engine.pool
            if callable(getattr(pool, "checkedout", None)):  # a queue pool, with counts
                yield name, pool, backends

    def _observe_pending(self, _options: CallbackOptions) -> Iterable[Observation]:
        """Calls waiting for a connection: those the fast backends queue in turn
        (`_pool.Connections`); the core backend's waits in SQLAlchemy's pool are not counted
        (the pool does not say how many wait)."""
        pending: dict[str, int] = {}
        for name, _pool, backends in self._entries():
            waiting = sum(getattr(backend, "waiting_calls", 0) for backend in backends)
            pending[name] = pending.get(name, 0) + waiting
        return [
            Observation(count, {"db.client.connection.pool.name": name})
            for name, count in pending.items()
        ]

    def _observe_count(self, _options: CallbackOptions) -> Iterable[Observation]:
        counts: dict[tuple[str, str], int] = {}
        for name, pool, kept in self._pools():
            used = max(0, pool.checkedout() - kept)
            idle = pool.checkedin() + min(kept, pool.checkedout())
            for state, count in (("used", used), ("idle", idle)):
                counts[name, state] = counts.get((name, state), 0) + count
        return [
            Observation(
                count,
                {"db.client.connection.pool.name": name, "db.client.connection.state": state},
            )
            for (name, state), count in counts.items()
        ]

    def _observe_max(self, _options: CallbackOptions) -> Iterable[Observation]:
        from .backends._privates import pool_capacity  # the one reader of pool internals

        limits: dict[str, int] = {}
        for name, pool, _kept in self._pools():
            _size, capacity, _timeout = pool_capacity(pool)
            if capacity is not None:
                limits[name] = limits.get(name, 0) + capacity
        return [
            Observation(limit, {"db.client.connection.pool.name": name})
            for name, limit in limits.items()
        ]


class _Instruments:
    """The tracer, the duration histogram and the pool observer of one pair of providers."""

    __slots__ = ("duration", "pools", "tracer")

    def __init__(
        self, tracer_provider: TracerProvider | None, meter_provider: MeterProvider | None
    ) -> None:
        version = _package_version()
        self.tracer: Tracer = (
            _otel_trace.get_tracer(INSTRUMENTATION_SCOPE, version)
            if tracer_provider is None
            else tracer_provider.get_tracer(INSTRUMENTATION_SCOPE, version)
        )
        meter: Meter = (
            _otel_metrics.get_meter(INSTRUMENTATION_SCOPE, version)
            if meter_provider is None
            else meter_provider.get_meter(INSTRUMENTATION_SCOPE, version)
        )
        self.duration: Histogram = meter.create_histogram(
            "db.client.operation.duration",
            unit="s",
            description="Duration of database client operations.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.pools = _Pools(meter)


_instruments: dict[tuple[int, int], tuple[Any, Any, _Instruments]] = {}
_instruments_lock = threading.Lock()


def _instruments_for(tracer_provider: Any, meter_provider: Any) -> _Instruments:
    """The instruments of these providers, made once per pair (repositories share them).

    The providers are kept alive with their instruments: an application has a
    few, made at start-up.
    """
    key = (id(tracer_provider), id(meter_provider))
    with _instruments_lock:
        found = _instruments.get(key)
        if found is None:
            found = (tracer_provider, meter_provider, _Instruments(tracer_provider, meter_provider))
            _instruments[key] = found
        return found[2]


@functools.cache
def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("snapshot-repo")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"
