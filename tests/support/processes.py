"""Starting, reading and reaping `worker.py` subprocesses from async tests."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["WorkerProcess", "worker"]

WORKER_SCRIPT = Path(__file__).with_name("worker.py")


@dataclass
class WorkerProcess:
    """A running `worker.py` and the stdout lines read from it so far."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)

    async def read_line(self) -> str | None:
        """The next stdout line (without newline), or None at EOF."""
        assert self.process.stdout is not None
        raw = await self.process.stdout.readline()
        if not raw:
            return None
        line = raw.decode().rstrip("\n")
        self.lines.append(line)
        return line

    async def read_until(self, count: int, prefix: str) -> None:
        """Read lines until `count` lines starting with `prefix` were seen.

        Raises:
            AssertionError: the worker's stdout ended first (its stderr is in the message).
        """
        while sum(line.startswith(prefix) for line in self.lines) < count:
            if await self.read_line() is None:
                raise AssertionError(
                    f"worker exited early ({self.process.returncode}); "
                    f"stdout tail {self.lines[-5:]}; stderr: {await self.stderr()}"
                )

    async def read_to_end(self) -> None:
        """Read the remaining stdout lines until EOF."""
        while await self.read_line() is not None:
            continue

    async def stderr(self) -> str:
        """Whatever the worker wrote to stderr (waits for EOF)."""
        assert self.process.stderr is not None
        return (await self.process.stderr.read()).decode(errors="replace")

    def send_line(self, line: str) -> None:
        """Write one line to the worker's stdin."""
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")

    def kill(self) -> None:
        """SIGKILL the worker (no cleanup of any kind runs in it)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)


@contextlib.asynccontextmanager
async def worker(*args: str) -> AsyncIterator[WorkerProcess]:
    """Run `worker.py *args`; on exit kill it if still running, and reap it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER_SCRIPT),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    handle = WorkerProcess(process)
    try:
        yield handle
    finally:
        handle.kill()
        await process.communicate()
