"""A throwaway MariaDB server that tests may stop, freeze, crash and restart.

The shared MariaDB server (127.0.0.1:3306) must never be stopped, so fault
tests that take a server down use one of these instead, as the Postgres ones
use `pg_cluster.PgCluster`: `mariadb-install-db` into a fresh directory,
then one `mariadbd` process listening on a free loopback port, with its Unix
socket, pid file and data directory under the same directory. `mariadbd`
refuses to run as root, so when the tests run as root it runs as the
`mysql` system user (`--user=mysql`, which it switches to itself: the pid
the test holds is the server's) and that user owns the directory.

`root` logs in over TCP without a password (`root@127.0.0.1` from
`--auth-root-authentication-method=normal`, matched as such because of
`--skip-name-resolve`), as on the shared server. The server is tuned to
start in about a second (a small buffer pool and redo log, no binary log);
it is otherwise MariaDB's defaults, so what it keeps on disk is what a
default installation keeps.

Every server registers itself for an `atexit` kill, so a crashed test run
does not leave servers behind; fixtures should still call `destroy()`.
"""

from __future__ import annotations

import asyncio
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
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.stopped import wait_until_stopped

__all__ = ["MariadbServer", "ServerUnavailableError", "find_binaries"]

_SERVER_USER = "mysql"
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 60.0  # a slow shutdown purges and merges first: allow it more
_POLL_INTERVAL = 0.05
_CONNECT_TIMEOUT = 1
_SQL_TIMEOUT = 30.0
_TUNING = (
    "--innodb-buffer-pool-size=16M",
    "--innodb-log-file-size=8M",
    "--skip-log-bin",
    "--skip-name-resolve",  # root@127.0.0.1, no DNS lookup per connection
)
_live_servers: set[MariadbServer] = set()


class _OtherServer(Exception):
    """The server answering on this server's port is not this one."""


class ServerUnavailableError(Exception):
    """No throwaway server can be made here (no MariaDB binaries, or no user to run them as)."""


def find_binaries() -> tuple[Path, Path]:
    """Where `mariadbd` and `mariadb-install-db` are: `(server, installer)`.

    Looks in `$SNAPSHOT_REPO_MARIADB_BIN` (a directory holding both), then
    on `PATH`, then in Debian's `/usr/sbin` and `/usr/bin`.

    Raises:
        ServerUnavailableError: either of them is missing.
    """
    directories: list[Path] = []
    if configured := os.environ.get("SNAPSHOT_REPO_MARIADB_BIN"):
        directories.append(Path(configured))
    search_path = os.pathsep.join(
        [*(str(d) for d in directories), os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"]
    )
    server = shutil.which("mariadbd", path=search_path)
    installer = shutil.which("mariadb-install-db", path=search_path)
    if server is None or installer is None:
        raise ServerUnavailableError(
            "no MariaDB server binaries (mariadbd, mariadb-install-db) found; "
            "set SNAPSHOT_REPO_MARIADB_BIN to their directory"
        )
    return Path(server), Path(installer)


def _server_account() -> pwd.struct_passwd | None:
    """Whom `mariadbd` runs as: None for the current user, the `mysql` user when root.

    Raises:
        ServerUnavailableError: running as root and there is no `mysql` user.
    """
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(_SERVER_USER)
    except KeyError:
        raise ServerUnavailableError(
            f"running as root and there is no {_SERVER_USER!r} user for mariadbd"
        ) from None


def _traversable_by_all(path: Path) -> bool:
    """True if every directory from `/` down to `path` lets any user pass through."""
    return all(directory.stat().st_mode & stat.S_IXOTH for directory in (path, *path.parents))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _run_sql(port: int, database: str, statements: Sequence[str]) -> list[tuple[Any, ...]]:
    """Run `statements` in one autocommit session; the rows of the last one."""
    import asyncmy  # the MariaDB tests' driver; imported only when a server is used

    conn = await asyncmy.connect(
        host="127.0.0.1",
        port=port,
        user="root",
        password="",
        database=database,
        connect_timeout=_CONNECT_TIMEOUT,
        autocommit=True,
    )
    try:
        rows: list[tuple[Any, ...]] = []
        async with conn.cursor() as cursor:
            for statement in statements:
                await cursor.execute(statement)
                rows = [tuple(row) for row in await cursor.fetchall()]
    except BaseException:
        conn.close()  # at once: the server may not be answering (frozen, timed out)
        raise
    await conn.ensure_closed()  # COM_QUIT: no "aborted connection" in the server's log
    return rows


class MariadbServer:
    """One throwaway MariaDB server on 127.0.0.1, owned by the test run.

    Create one with `MariadbServer.create()`, which runs `mariadb-install-db`
    (about half a second); then `start()`. Every method blocks until its
    effect is complete (`start` until root can log in and run a query,
    `stop` and `kill` until the process exited). Blocking: from async code
    call them with `asyncio.to_thread`.

    Attributes:
        port: the loopback TCP port, kept across restarts.
        base_dir: the directory holding the data directory, the log, the
            socket and the pid file.
        options: extra `mariadbd` options given to `create()`, used by the
            installer and by every start.
    """

    def __init__(
        self,
        server: Path,
        installer: Path,
        base_dir: Path,
        account: pwd.struct_passwd | None,
        port: int,
        options: Sequence[str],
    ) -> None:
        self.server = server
        self.installer = installer
        self.base_dir = base_dir
        self.port = port
        self.options = tuple(options)
        self._account = account
        self._process: subprocess.Popen[bytes] | None = None
        self._frozen = False

    @classmethod
    def create(cls, options: Sequence[str] = ()) -> MariadbServer:
        """Run `mariadb-install-db` for a new server in a fresh temporary directory (not started).

        Args:
            options: extra `mariadbd` options (`--innodb-undo-tablespaces=2`,
                `--log-bin=...`) for the installer and every start; options
                fixed at install time must be given here.

        Raises:
            ServerUnavailableError: no binaries, or no user to run them as.
            subprocess.CalledProcessError: the installer failed (its output is in the exception).
        """
        server, installer = find_binaries()
        account = _server_account()
        parent = Path(tempfile.gettempdir())
        if account is not None and not _traversable_by_all(parent):
            parent = Path("/tmp")  # world-traversable, unlike a TMPDIR only root can enter
        base_dir = Path(tempfile.mkdtemp(prefix="snaprepo-mariadb-", dir=parent))
        if account is not None:
            os.chown(base_dir, account.pw_uid, account.pw_gid)
        instance = cls(server, installer, base_dir, account, _free_port(), options)
        _live_servers.add(instance)
        try:
            instance._install()
        except BaseException:
            instance.destroy()
            raise
        return instance

    @property
    def datadir(self) -> Path:
        """The server's data directory: every file InnoDB and Aria keep."""
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        """The server's error log (its stderr, appended at every start)."""
        return self.base_dir / "server.log"

    @property
    def running(self) -> bool:
        """True while the `mariadbd` process exists (also when frozen)."""
        return self._process is not None and self._process.poll() is None

    @property
    def frozen(self) -> bool:
        """True between `freeze()` and `thaw()`."""
        return self._frozen

    def url(self, database: str) -> str:
        """A SQLAlchemy URL (asyncmy) for `database` over TCP, as root without a password."""
        return f"mariadb+asyncmy://root@127.0.0.1:{self.port}/{database}"

    def log_tail(self, lines: int = 30) -> str:
        """The last `lines` lines of the server log, for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def execute(self, *statements: str, database: str = "") -> list[tuple[Any, ...]]:
        """Run `statements` as root in one autocommit session; return the last one's rows.

        For setup and inspection from sync code (a fixture) or a worker thread;
        blocks for at most 30 s.
        """
        return self._sql(database, statements, _SQL_TIMEOUT)

    def create_database(self, name: str, collation: str = "utf8mb4_nopad_bin") -> str:
        """Create database `name` (utf8mb4) and return its URL.

        The default collation is the binary NO PAD one the library's tables
        use on MariaDB (as `tests.support.databases.MariadbServer` does);
        the tables name their collation themselves, so it only matters for
        tables a test creates.
        """
        if not name.isidentifier():
            raise ValueError(f"not a plain database name: {name!r}")
        self.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE {collation}")
        return self.url(name)

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        """Start the server and wait until root can run a query (at most `timeout` seconds).

        Raises:
            RuntimeError: it is already running, exited during startup, or was
                not ready in time (the log's tail is in the message).
        """
        if self.running:
            raise RuntimeError("the server is already running")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    str(self.server),
                    "--no-defaults",  # must come first: no /etc/mysql/my.cnf
                    f"--datadir={self.datadir}",
                    f"--socket={self.base_dir / 'sock'}",
                    f"--pid-file={self.base_dir / 'mariadbd.pid'}",
                    f"--port={self.port}",
                    "--bind-address=127.0.0.1",
                    *self._tmpdir_option(),
                    *self._user_option(),
                    *_TUNING,
                    *self.options,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,  # without --log-error, mariadbd logs to stderr
                cwd=self.base_dir,
                env=self._env(),
                start_new_session=True,  # keep the terminal's Ctrl-C for pytest
            )
        self._frozen = False
        self._wait_ready(timeout)

    def start_on_a_free_port(self, attempts: int = 3) -> None:
        """`start()`, on another free port when this one was taken meanwhile.

        `_free_port` finds a port free now; another process (another test worker's
        server) may bind it before this server does. That server then answers
        here, which `_wait_ready` tells by its data directory, and this one exits
        on "Address already in use". Only a first start moves: a restart keeps
        the port the tests' URLs name.
        """
        for attempt in range(attempts):
            try:
                self.start()
            except RuntimeError as exc:
                taken = "Address already in use" in str(exc) or "another server" in str(exc)
                if not taken or attempt == attempts - 1:
                    raise
                if self.running:
                    self.kill()
                self.port = _free_port()
            else:
                return

    def stop(self, *, slow: bool = False) -> None:
        """Shut the server down cleanly (SIGTERM) and wait for it to exit.

        A clean shutdown writes every dirty page to the data files, so they
        hold what the server held. With `slow`, it first sets
        `innodb_fast_shutdown = 0`: InnoDB then also purges every deleted
        record and empties the change buffer before it exits.

        Raises:
            RuntimeError: the server is not running, or did not exit in time.
        """
        pid = self._require_running()
        if self._frozen:
            self.thaw()
        if slow:
            self.execute("SET GLOBAL innodb_fast_shutdown = 0")
        os.kill(pid, signal.SIGTERM)
        self._reap(_STOP_TIMEOUT)

    def restart(self, *, slow: bool = False) -> None:
        """`stop(slow=slow)` then `start()`; the port stays the same."""
        self.stop(slow=slow)
        self.start()

    def kill(self) -> None:
        """SIGKILL the server, like a machine losing power (but the OS keeps its page cache).

        No-op when the server is not running. The next `start()` runs crash recovery.
        """
        if not self.running:
            return
        os.kill(self._require_running(), signal.SIGKILL)
        self._reap(_STOP_TIMEOUT)
        self._frozen = False

    def freeze(self) -> None:
        """SIGSTOP the server (one process, every thread): connections stay open, nothing answers.

        The kernel still completes TCP handshakes into the listen backlog, so
        a new connection hangs waiting for the server's greeting rather than
        being refused.
        """
        pid = self._require_running()
        os.kill(pid, signal.SIGSTOP)
        self._frozen = True
        wait_until_stopped([pid])

    def thaw(self) -> None:
        """Undo `freeze()` with SIGCONT."""
        os.kill(self._require_running(), signal.SIGCONT)
        self._frozen = False

    def destroy(self) -> None:
        """Kill the server if it runs and delete its directory. Idempotent."""
        try:
            self.kill()
        finally:
            _live_servers.discard(self)
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _install(self) -> None:
        result = subprocess.run(
            [
                str(self.installer),
                "--no-defaults",
                "--auth-root-authentication-method=normal",
                f"--datadir={self.datadir}",
                *self._tmpdir_option(),
                *self._user_option(),
                "--skip-test-db",
                *_TUNING,
                *self.options,
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.base_dir,
            env=self._env(),
        )
        if result.returncode != 0:
            # What the installer said: pytest shows only the exception's message.
            raise RuntimeError(
                f"mariadb-install-db exited {result.returncode}:\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            )

    def _tmpdir_option(self) -> list[str]:
        """Temporary files in the server's own directory, not /tmp: the installer's
        bootstrap failed now and then ("Could not remove temporary table
        '/tmp/#sql-temptable-...'", then "Unknown table 'mysql.tmp_user_sys'") while
        other servers used /tmp beside it (one run in five of this module on 4 workers)."""
        return [f"--tmpdir={self.base_dir}"]

    def _user_option(self) -> list[str]:
        return [] if self._account is None else [f"--user={self._account.pw_name}"]

    def _require_running(self) -> int:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError("the server is not running")
        return self._process.pid

    def _reap(self, timeout: float) -> None:
        if self._process is not None:
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"mariadbd did not exit within {timeout}s:\n{self.log_tail()}"
                ) from None
            self._process = None

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process is None or self._process.poll() is not None:
                self._process = None
                raise RuntimeError(f"mariadbd exited during startup:\n{self.log_tail()}")
            try:
                self._check_it_answers()
            except Exception as exc:  # refused, or asyncmy's error while the server starts
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mariadbd not ready after {timeout}s on port {self.port} ({exc!r}):\n"
                        f"{self.log_tail()}"
                    ) from exc
                time.sleep(_POLL_INTERVAL)  # bounded wait for the server to come up
            else:
                return

    def _check_it_answers(self) -> None:
        """Raise unless this server answers on its port: another test worker's server may
        have bound the same free port first (this one then fails to bind and exits, see
        `start_on_a_free_port`); its data directory tells them apart."""
        # asyncmy's connect_timeout covers the TCP connect only, not the greeting.
        (answer,) = self._sql("", ["SELECT @@datadir"], _CONNECT_TIMEOUT + 1)
        if Path(str(answer[0])).resolve() != self.datadir.resolve():
            raise _OtherServer(f"port {self.port} is another server's ({answer[0]})")

    def _sql(
        self, database: str, statements: Sequence[str], seconds: float
    ) -> list[tuple[Any, ...]]:
        """`_run_sql` within `seconds`, on a loop of its own in a worker thread (callers
        may be on a loop already); TimeoutError when the server does not answer in time."""

        async def bounded() -> list[tuple[Any, ...]]:
            return await asyncio.wait_for(_run_sql(self.port, database, statements), seconds)

        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, bounded()).result()

    def _env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C",
            "HOME": str(self.base_dir),
        }


@atexit.register
def _kill_leftover_servers() -> None:
    for server in list(_live_servers):
        server.destroy()


@contextmanager
def running_server(options: Sequence[str] = ()) -> Iterator[MariadbServer]:
    """A started throwaway server with `options`, destroyed at the end whatever happens.

    Outside CI, a machine without MariaDB server binaries skips the test with
    the reason; with CI=true it fails it (fault tests must run there).
    """
    try:
        server = MariadbServer.create(options)
    except ServerUnavailableError as exc:
        reason = f"cannot make a throwaway MariaDB server: {exc}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{reason} (CI=true: fault tests must run)")
        pytest.skip(reason)
    try:
        server.start_on_a_free_port()
        yield server
    finally:
        server.destroy()
