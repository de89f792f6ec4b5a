"""A real PgBouncer in transaction mode in front of the shared test Postgres server.

PgBouncer (Debian's `pgbouncer` package, `/usr/sbin/pgbouncer`; `.ci/run`
installs it) listens on a free loopback port with `pool_mode = transaction`
and a small pool, so that concurrent clients share a few server connections
and each transaction may land on a different one: exactly what breaks named
prepared statements and LISTEN. A wildcard database entry forwards every
database name to the upstream server, so the tests' throwaway databases work
through it. PgBouncer refuses to run as root: as `pg_cluster` does for
Postgres, it then runs as an unprivileged user and owns its directory.

Every bouncer registers itself for an `atexit` kill, so a crashed test run
leaves no process behind; fixtures should still call `stop()`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests.support.databases import IN_CI
from tests.support.pg_cluster import _free_port, _server_identity, _traversable_by_all

__all__ = [
    "PGBOUNCER_BINARY",
    "PgBouncer",
    "PgBouncerUnavailableError",
    "find_pgbouncer",
    "start_for_tests",
]

PGBOUNCER_BINARY = Path("/usr/sbin/pgbouncer")
"""Where Debian's package puts the binary (not on a non-root user's PATH)."""

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_POLL_INTERVAL = 0.02
_live: set[PgBouncer] = set()


class PgBouncerUnavailableError(Exception):
    """PgBouncer is not installed here."""


def find_pgbouncer() -> Path:
    """The pgbouncer binary: `$SNAPSHOT_REPO_PGBOUNCER`, then `PATH`, then Debian's place.

    Raises:
        PgBouncerUnavailableError: none of them has it.
    """
    configured = os.environ.get("SNAPSHOT_REPO_PGBOUNCER")
    candidates = [Path(configured)] if configured else []
    if on_path := shutil.which("pgbouncer"):
        candidates.append(Path(on_path))
    candidates.append(PGBOUNCER_BINARY)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise PgBouncerUnavailableError(
        "pgbouncer is not installed (apt-get install -y pgbouncer, as .ci/run does)"
    )


class PgBouncer:
    """One PgBouncer process in transaction mode on 127.0.0.1, owned by the test run.

    `start()` blocks until it accepts connections; `stop()` until it exited.

    Attributes:
        port: the loopback port PgBouncer listens on.
        pool_size: server connections per database and user (`default_pool_size`).
        upstream: the Postgres server's "host:port" it forwards to.
    """

    def __init__(self, upstream_url: str, *, pool_size: int = 3) -> None:
        upstream = make_url(upstream_url)
        self.upstream = f"{upstream.host or '127.0.0.1'}:{upstream.port or 5432}"
        self.user = upstream.username or "postgres"
        self.pool_size = pool_size
        self.port = _free_port()
        self.base_dir = Path(tempfile.mkdtemp(prefix="snaprepo-pgbouncer-", dir=_parent_dir()))
        self._identity = _server_identity()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.base_dir / "pgbouncer.ini"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "pgbouncer.log"

    def url(self, database_url: str, **query: str) -> str:
        """`database_url` (a database on the upstream server) reached through PgBouncer.

        The host and port change, and `query` is added: what the client needs
        (`transaction_pooler="true"`, or nothing to see what goes wrong without it).
        """
        return (
            make_url(database_url)
            .set(host="127.0.0.1", port=self.port)
            .update_query_dict(query)
            .render_as_string(hide_password=False)
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no pgbouncer log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        """Write the configuration, start PgBouncer, wait until it accepts connections.

        Raises:
            PgBouncerUnavailableError: pgbouncer is not installed.
            RuntimeError: it exited, or did not listen within 10 s (its log is in the message).
        """
        binary = find_pgbouncer()
        host, port = self.upstream.rsplit(":", 1)
        (self.base_dir / "userlist.txt").write_text(f'"{self.user}" ""\n')
        self.config_path.write_text(
            "\n".join(
                [
                    "[databases]",
                    # Any database name goes to the same-named database upstream.
                    f"* = host={host} port={port}",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = trust",
                    f"auth_file = {self.base_dir / 'userlist.txt'}",
                    "pool_mode = transaction",
                    f"default_pool_size = {self.pool_size}",
                    "min_pool_size = 0",
                    "reserve_pool_size = 0",
                    "max_client_conn = 1000",
                    "max_db_connections = 0",
                    # Clients wait for a server connection this long before an error.
                    "query_wait_timeout = 30",
                    f"logfile = {self.log_path}",
                    "log_connections = 0",
                    "log_disconnections = 0",
                    "",
                ]
            )
        )
        self._hand_over()
        _live.add(self)
        self._process = subprocess.Popen(
            [str(binary), str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.base_dir,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.base_dir)},
            start_new_session=True,  # keep the terminal's Ctrl-C for pytest
            **self._as_server_user(),
        )
        self._wait_listening()

    def stop(self) -> None:
        """Stop PgBouncer (SIGTERM, then SIGKILL after 10 s) and delete its directory."""
        try:
            if self._process is not None and self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(timeout=_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait(timeout=_STOP_TIMEOUT)
            self._process = None
        finally:
            _live.discard(self)
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self._process is None or self._process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited during startup:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"pgbouncer not listening on {self.port} after {_START_TIMEOUT}s:\n"
                        f"{self.log_tail()}"
                    ) from None
            time.sleep(_POLL_INTERVAL)  # bounded wait for the process to bind its port

    def _hand_over(self) -> None:
        """Give the directory and its files to the unprivileged user PgBouncer runs as."""
        if self._identity.uid is None:
            return
        gid = self._identity.gid if self._identity.gid is not None else -1
        for path in (self.base_dir, *self.base_dir.iterdir()):
            os.chown(path, self._identity.uid, gid)

    def _as_server_user(self) -> dict[str, Any]:
        if self._identity.uid is None:
            return {}
        return {"user": self._identity.uid, "group": self._identity.gid, "extra_groups": []}


def start_for_tests(upstream_url: str, *, pool_size: int = 3) -> PgBouncer:
    """A started PgBouncer for a fixture, which must `stop()` it.

    Not installed: the calling test skips, or fails with CI=true (as an
    unreachable Postgres does, see `tests/conftest.py`).
    """
    bouncer = PgBouncer(upstream_url, pool_size=pool_size)
    try:
        bouncer.start()
    except PgBouncerUnavailableError as exc:
        bouncer.stop()
        if IN_CI:
            pytest.fail(f"{exc} (CI=true: the PgBouncer tests must run)")
        pytest.skip(str(exc))
    except BaseException:
        bouncer.stop()
        raise
    return bouncer


def _parent_dir() -> Path:
    """A temporary directory the unprivileged user can reach."""
    parent = Path(tempfile.gettempdir())
    if os.geteuid() == 0 and not _traversable_by_all(parent):
        return Path("/tmp")
    return parent


@atexit.register
def _stop_leftovers() -> None:
    for bouncer in list(_live):
        bouncer.stop()
