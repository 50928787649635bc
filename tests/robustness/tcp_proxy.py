"""A loopback TCP proxy that a test controls: delay, bandwidth limit, and a cut connection.

`TcpProxy(target)` listens on 127.0.0.1 (a free port) and forwards every
connection to `target`, both ways. While it runs the test may:

- `delay_s`: hold every chunk that long before passing it on (one way;
  chunks keep their order and the pipe stays full, as on a long link);
- `rate_bytes_per_s`: pass at most that many bytes per second, each way,
  per connection (0: unlimited);
- `cut()`: reset every open connection at once and refuse new ones (each is
  accepted and reset) until `restore()`; as a peer that went away, or a
  firewall that rejects, would look to both sides.

Everything stays on loopback and stops with `close()` (or the context).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from types import TracebackType
from typing import Self

CHUNK = 65536


class TcpProxy:
    """Forwards loopback TCP connections to `target` ("host:port", or a Unix socket), impaired on demand."""

    def __init__(self, target: str) -> None:
        """`target`: "host:port", or the path of a Unix socket (starting with "/")."""
        self._unix = target if target.startswith("/") else None
        host, _, port = target.rpartition(":")
        self._target = (host, int(port)) if self._unix is None else ("", 0)
        self.delay_s = 0.0
        self.rate_bytes_per_s = 0
        self._cut = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Connections accepted and forwarded, and bytes passed (both ways).
        self.connections = 0
        self.forwarded_bytes = 0

    @property
    def address(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    def cut(self) -> None:
        """Reset every open connection now, and every new one until `restore()`."""
        self._cut = True
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()

    def restore(self) -> None:
        """Pass traffic again (new connections; the cut ones stay cut)."""
        self._cut = False

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            _reset(writer)
            return
        try:
            if self._unix is not None:
                up_reader, up_writer = await asyncio.open_unix_connection(self._unix)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            _reset(writer)
            return
        self.connections += 1
        self._writers |= {writer, up_writer}
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        try:
            # Each direction ends at its end of file (passed on) or at a cut.
            await asyncio.wait(pumps)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.difference_update(pumps)
            for side in (writer, up_writer):
                self._writers.discard(side)
                side.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction, each chunk sent `delay_s` after it came, within the rate."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    writer.write_eof()
                    return
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                if self.rate_bytes_per_s:
                    for start in range(0, len(data), 1024):
                        part = data[start : start + 1024]
                        writer.write(part)
                        await writer.drain()
                        await asyncio.sleep(len(part) / self.rate_bytes_per_s)
                else:
                    writer.write(data)
                    await writer.drain()
                self.forwarded_bytes += len(data)

        sender = asyncio.create_task(send())
        try:
            while data := await reader.read(CHUNK):
                queue.put_nowait((time.monotonic() + self.delay_s, data))
            queue.put_nowait((time.monotonic() + self.delay_s, b""))
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await sender


def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort the connection (RST): the peer sees it break, not end."""
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER with a zero timeout makes close() send RST.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
