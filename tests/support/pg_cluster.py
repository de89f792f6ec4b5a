"""A throwaway PostgreSQL cluster that tests may stop, freeze, crash and restart.

The shared test server must never be stopped, so fault tests that take a
server down use one of these instead: `initdb` into a fresh directory, one
`postgres` process listening on a free loopback port, and a Unix socket in
the same directory. `initdb` and `postgres` refuse to run as root, so when
the tests run as root the cluster runs as an unprivileged user (`nobody`,
or a system user created for the purpose) and owns its directory.

`PgCluster.create_standby(primary)` makes a streaming standby of a running
cluster (`pg_basebackup -R`) on a port of its own, run the same way.

Every cluster registers itself for an `atexit` kill, so a crashed test run
does not leave servers behind; fixtures should still call `destroy()`.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from tests.support.databases import IN_CI
from tests.support.stopped import wait_until_stopped

__all__ = [
    "ClusterUnavailableError",
    "PgCluster",
    "StopMode",
    "create_or_skip",
    "find_bindir",
]

StopMode = Literal["smart", "fast", "immediate"]

_FALLBACK_USER = "snaprepo-pg"
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 30.0
_POLL_INTERVAL = 0.05
_live_clusters: set[PgCluster] = set()


class ClusterUnavailableError(Exception):
    """No throwaway cluster can be made here (no PostgreSQL binaries, or no unprivileged user)."""


def find_bindir() -> Path:
    """Where `initdb`, `pg_ctl` and `postgres` are.

    Looks at `$SNAPSHOT_REPO_PG_BIN`, then `pg_config --bindir` on `PATH`, then
    the newest `/usr/lib/postgresql/*/bin` (Debian's layout).

    Raises:
        ClusterUnavailableError: none of them has the binaries.
    """
    candidates: list[Path] = []
    if configured := os.environ.get("SNAPSHOT_REPO_PG_BIN"):
        candidates.append(Path(configured))
    if pg_config := shutil.which("pg_config"):
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0:
            candidates.append(Path(result.stdout.strip()))
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(debian)
    for candidate in candidates:
        if all((candidate / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return candidate
    raise ClusterUnavailableError(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found; "
        "set SNAPSHOT_REPO_PG_BIN to their directory"
    )


@dataclass(frozen=True)
class _Identity:
    """Who the server processes run as: None fields mean "the current user"."""

    uid: int | None
    gid: int | None
    name: str


def _server_identity() -> _Identity:
    """The current user, or an unprivileged one when running as root (initdb refuses root)."""
    if os.geteuid() != 0:
        return _Identity(None, None, pwd.getpwuid(os.geteuid()).pw_name)
    for name in ("nobody", _FALLBACK_USER):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return _Identity(entry.pw_uid, entry.pw_gid, name)
    useradd = shutil.which("useradd")
    if useradd is None:
        raise ClusterUnavailableError("running as root, no `nobody` user and no `useradd`")
    subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _FALLBACK_USER],
        check=True,
        capture_output=True,
    )
    entry = pwd.getpwnam(_FALLBACK_USER)
    return _Identity(entry.pw_uid, entry.pw_gid, _FALLBACK_USER)


def _traversable_by_all(path: Path) -> bool:
    """True if every directory from `/` down to `path` lets any user pass through."""
    return all(directory.stat().st_mode & stat.S_IXOTH for directory in (path, *path.parents))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _descendants(root_pid: int) -> list[int]:
    """Every live process below `root_pid` (its children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue  # the process exited while we looked
        # The command name is in parentheses and may contain spaces: split after it.
        fields = stat_line[stat_line.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    pending = [root_pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def _is_alive(pid: int) -> bool:
    """True unless `pid` is gone or a zombie (dead, waiting for init to reap it)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line[stat_line.rindex(")") + 2] not in "ZX"


def _signal_quietly(pid: int, signum: signal.Signals) -> None:
    """Send `signum` to `pid` unless the process has already gone."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return


class PgCluster:
    """One throwaway PostgreSQL cluster on 127.0.0.1, owned by the test run.

    Create one with `PgCluster.create()`, which runs `initdb` (a second or
    two); then `start()`. Every method blocks until its effect is complete
    (`start` until the server accepts connections, `stop` until it exited).

    Attributes:
        port: the loopback TCP port, kept across restarts.
        base_dir: the directory holding the data directory, the log and the socket.
    """

    def __init__(self, bindir: Path, base_dir: Path, identity: _Identity, port: int) -> None:
        self.bindir = bindir
        self.base_dir = base_dir
        self.port = port
        self._identity = identity
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @classmethod
    def create(cls) -> PgCluster:
        """Run `initdb` for a new cluster in a fresh temporary directory (not started).

        Raises:
            ClusterUnavailableError: no binaries, or no unprivileged user to run them as.
            subprocess.CalledProcessError: initdb failed (its output is in the exception).
        """
        cluster = cls._new(find_bindir(), _server_identity())
        try:
            cluster._run(
                "initdb",
                "--pgdata",
                str(cluster.data_dir),
                "--username",
                "postgres",
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
            )
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    @classmethod
    def create_standby(cls, primary: PgCluster) -> PgCluster:
        """A streaming standby of the running `primary`, on a port of its own (not started).

        `pg_basebackup -R` copies the primary (initdb's pg_hba already lets
        the loopback replicate, and wal_level is `replica` by default) and
        writes `standby.signal` and `primary_conninfo`, so `start()` brings
        it up as a hot standby that replays the primary's WAL as it streams in.

        Raises:
            subprocess.CalledProcessError: pg_basebackup failed (its output is in the exception).
        """
        standby = cls._new(primary.bindir, primary._identity)
        try:
            standby._run(
                "pg_basebackup",
                "--pgdata",
                str(standby.data_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(primary.port),
                "--username",
                "postgres",
                "--wal-method",
                "stream",
                "--checkpoint",
                "fast",
                "--write-recovery-conf",
                "--no-sync",
            )
        except BaseException:
            standby.destroy()
            raise
        return standby

    @classmethod
    def _new(cls, bindir: Path, identity: _Identity) -> PgCluster:
        """A cluster object on a fresh directory the server user owns and a free port."""
        parent = Path(tempfile.gettempdir())
        if identity.uid is not None and not _traversable_by_all(parent):
            parent = Path("/tmp")  # world-traversable, unlike a TMPDIR only root can enter
        base_dir = Path(tempfile.mkdtemp(prefix="snaprepo-pg-", dir=parent))
        if identity.uid is not None:
            os.chown(base_dir, identity.uid, identity.gid if identity.gid is not None else -1)
        cluster = cls(bindir, base_dir, identity, _free_port())
        _live_clusters.add(cluster)
        return cluster

    @property
    def data_dir(self) -> Path:
        """The cluster's PGDATA."""
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        """The server's log (stdout and stderr of every start, appended)."""
        return self.base_dir / "server.log"

    @property
    def running(self) -> bool:
        """True while the postmaster process exists (also when paused)."""
        return self._process is not None and self._process.poll() is None

    @property
    def paused(self) -> bool:
        """True between `pause()` and `resume()`."""
        return self._paused

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL (asyncpg) for `database` over TCP."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        """A plain libpq/asyncpg DSN for `database` over TCP."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def log_tail(self, lines: int = 30) -> str:
        """The last `lines` lines of the server log, for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        """Start the server and wait until it accepts connections (at most `timeout` seconds).

        Raises:
            RuntimeError: it is already running, exited during startup, or was
                not ready in time (the log's tail is in the message).
        """
        if self.running:
            raise RuntimeError("the cluster is already running")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.base_dir),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",  # the OS never crashes in these tests; a killed server recovers
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "shared_buffers=16MB",
                    "-c",
                    "max_connections=100",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=self._env(),
                start_new_session=True,  # keep the terminal's Ctrl-C for pytest
                **self._as_server_user(),
            )
        self._paused = False
        self._wait_ready(timeout)

    def stop(self, mode: StopMode = "fast") -> None:
        """`pg_ctl stop -m mode` and wait for the postmaster to exit.

        `fast` rolls back open transactions and disconnects clients;
        `immediate` aborts without a shutdown checkpoint (crash recovery on
        the next start).
        """
        if not self.running:
            raise RuntimeError("the cluster is not running")
        if self._paused:
            self.resume()
        self._run(
            "pg_ctl",
            "stop",
            "--pgdata",
            str(self.data_dir),
            "--mode",
            mode,
            "--wait",
            "--timeout",
            str(int(_STOP_TIMEOUT)),
        )
        self._reap(_STOP_TIMEOUT)

    def restart(self, mode: StopMode = "fast") -> None:
        """`stop(mode)` then `start()`; the port stays the same."""
        self.stop(mode)
        self.start()

    def pause(self) -> None:
        """Freeze every server process with SIGSTOP: connections stay open and nothing answers."""
        postmaster = self._require_running()
        # The postmaster first, so that it forks no backend we would miss.
        _signal_quietly(postmaster, signal.SIGSTOP)
        backends = _descendants(postmaster)
        for pid in backends:
            _signal_quietly(pid, signal.SIGSTOP)
        self._paused = True
        wait_until_stopped([postmaster, *backends])

    def resume(self) -> None:
        """Undo `pause()` with SIGCONT to every server process."""
        postmaster = self._require_running()
        for pid in _descendants(postmaster):
            _signal_quietly(pid, signal.SIGCONT)
        _signal_quietly(postmaster, signal.SIGCONT)
        self._paused = False

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend at once, like a machine losing power.

        No-op when the server is not running. The next `start()` runs crash recovery.
        """
        if not self.running:
            return
        postmaster = self._require_running()
        _signal_quietly(postmaster, signal.SIGSTOP)  # so that it forks nothing we would miss
        victims = _descendants(postmaster)
        _signal_quietly(postmaster, signal.SIGKILL)
        for pid in victims:
            _signal_quietly(pid, signal.SIGKILL)
        self._reap(_STOP_TIMEOUT)
        # Orphaned backends are re-parented to init; make sure none survived the postmaster.
        deadline = time.monotonic() + _STOP_TIMEOUT
        while any(_is_alive(pid) for pid in victims):
            if time.monotonic() > deadline:
                raise RuntimeError(f"server processes survived SIGKILL: {victims}")
            time.sleep(_POLL_INTERVAL)
        self._paused = False

    def destroy(self) -> None:
        """Kill the server if it runs and delete the cluster's directory. Idempotent."""
        try:
            self.kill()
        finally:
            _live_clusters.discard(self)
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _require_running(self) -> int:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError("the cluster is not running")
        return self._process.pid

    def _reap(self, timeout: float) -> None:
        if self._process is not None:
            self._process.wait(timeout=timeout)
            self._process = None

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        isready = str(self.bindir / "pg_isready")
        while True:
            if self._process is None or self._process.poll() is not None:
                self._process = None
                raise RuntimeError(f"postgres exited during startup:\n{self.log_tail()}")
            probe = subprocess.run(
                [isready, "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-t", "1"],
                capture_output=True,
                check=False,
                env=self._env(),
            )
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"postgres not ready after {timeout}s on port {self.port}:\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)  # bounded wait for the server to come up

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            [str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.base_dir,
            env=self._env(),
            **self._as_server_user(),
        )
        if result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, result.args, output=result.stdout, stderr=result.stderr
            )

    def _env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C",
            "HOME": str(self.base_dir),
        }

    def _as_server_user(self) -> dict[str, Any]:
        if self._identity.uid is None:
            return {}
        return {"user": self._identity.uid, "group": self._identity.gid, "extra_groups": []}


@atexit.register
def _kill_leftover_clusters() -> None:
    for cluster in list(_live_clusters):
        cluster.destroy()


def create_or_skip(purpose: str) -> PgCluster:
    """A new throwaway cluster (not started); without PostgreSQL's server binaries the
    test is skipped, or fails under CI=true, where `purpose` (e.g. "fault tests") must run."""
    try:
        return PgCluster.create()
    except ClusterUnavailableError as exc:
        reason = f"cannot make a throwaway Postgres cluster: {exc}"
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: {purpose} must run)")
        pytest.skip(reason)
