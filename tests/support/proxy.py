"""A loopback TCP proxy that can pass traffic, black-hole it, or drop connections.

Put it between a client and a server to simulate the network faults that a
real deployment meets:

- `pass_traffic()`: bytes flow both ways (also the bytes held while black-holed,
  like a network partition that heals before TCP gives up).
- `blackhole()`: connections are accepted but nothing is forwarded or answered,
  in either direction, on new and on existing connections; the peer sees a
  server that has frozen.
- `drop()`: every open connection is reset now; with `refuse_new=True` new
  connections are reset as soon as they are accepted, until `pass_traffic()`.

The proxy runs on the event loop of the test that opened it; `aclose()`
resets every connection and stops listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType
from typing import Literal, Self

__all__ = ["Mode", "TcpProxy"]

Mode = Literal["pass", "blackhole", "refuse"]

_CHUNK = 64 * 1024


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close `writer`'s socket with an RST rather than a FIN (SO_LINGER 0), like a dead peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # the socket may already be closed by the peer
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its upstream connection, once made."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.ended_by: BaseException | None = None

    def reset(self) -> None:
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port`, with injectable faults.

    Use as `async with TcpProxy(host, port) as proxy:` or call `start()` and
    `aclose()`. Starts in "pass" mode.

    Attributes:
        port: the loopback port clients connect to (known after `start()`).
        accepted: how many client connections were accepted so far.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self._mode: Mode = "pass"
        self._passing = asyncio.Event()
        self._passing.set()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def mode(self) -> Mode:
        """The current fault mode."""
        return self._mode

    @property
    def open_connections(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._links)

    async def start(self) -> None:
        """Listen on a free loopback port (`self.port`)."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def pass_traffic(self) -> None:
        """Forward everything again, including the bytes held while black-holed."""
        self._mode = "pass"
        self._passing.set()

    def blackhole(self) -> None:
        """Accept connections but forward and answer nothing, on old and new connections."""
        self._mode = "blackhole"
        self._passing.clear()

    def drop(self, *, refuse_new: bool = False) -> int:
        """Reset every open connection (both sides); return how many were reset.

        Args:
            refuse_new: also reset each new connection as soon as it is
                accepted, until `pass_traffic()`.
        """
        links = list(self._links)
        for link in links:
            link.reset()
        if refuse_new:
            self._mode = "refuse"
            self._passing.set()  # held bytes of the reset links go nowhere now
        return len(links)

    async def aclose(self) -> None:
        """Reset every connection, stop listening and wait for the proxy's tasks to end."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.reset()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A task of our own rather than the stream server's: `aclose()` cancels these,
        # and asyncio logs an error when the server's own callback task is cancelled.
        self.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        task = asyncio.get_running_loop().create_task(self._serve(link, reader))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refusing(self) -> bool:
        return self._mode == "refuse"

    async def _serve(self, link: _Link, reader: asyncio.StreamReader) -> None:
        try:
            if self._refusing():
                return
            await self._passing.wait()  # black-holed: accepted, never connected onwards
            if self._refusing() or link.client.is_closing():
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError as exc:
                link.ended_by = exc  # the server is down: the client sees its connection reset
                return
            link.upstream = up_writer
            await asyncio.gather(
                self._pipe(reader, up_writer, link),
                self._pipe(up_reader, link.client, link),
            )
        finally:
            self._links.discard(link)
            link.reset()

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Copy `source` to `sink` while passing; at EOF or error reset the whole link."""
        try:
            while data := await source.read(_CHUNK):
                await self._passing.wait()
                sink.write(data)
                await sink.drain()
        except OSError as exc:
            # A reset on either side ends the link; the finally resets the other side too.
            link.ended_by = exc
        finally:
            link.reset()
