"""A TCP proxy between a datahaul process and RabbitMQ whose link can be broken.

The proxy runs its own event loop in a background thread, so a synchronous
test, an asynchronous test and the soak command can all drive it the same
way: every control method blocks until the change is in force on the loop.

    with FaultProxy() as proxy:
        gateway_env["DATAHAUL_AMQP_URL"] = proxy.url_for(amqp_url)
        ...
        proxy.stall()         # bytes stop both ways, sockets stay open
        proxy.pass_through()  # held bytes flow again
        proxy.cut()           # every open connection is reset now
        proxy.refuse()        # new connections are reset at once
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import structlog

from datahaul.faults import HarnessError

log = structlog.get_logger("datahaul.faults")

T = TypeVar("T")

AMQP_PORT = 5672
READ_BYTES = 256 * 1024
CONTROL_TIMEOUT = 10.0


class LinkMode(enum.Enum):
    """What the proxy does with bytes and with new connections."""

    PASS = "pass"
    STALL = "stall"
    REFUSE = "refuse"


class FaultProxy:
    """Forwards 127.0.0.1:<port> to a broker on the loopback, with faults on demand."""

    def __init__(
        self, upstream_port: int = AMQP_PORT, upstream_host: str = "127.0.0.1"
    ) -> None:
        require_loopback(upstream_host)
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.connections_accepted = 0
        self.bytes_to_broker = 0
        self.bytes_to_client = 0
        self._mode = LinkMode.PASS
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._closed = False

        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._thread = threading.Thread(
            target=self._run_loop, name="datahaul-fault-proxy", daemon=True
        )
        self._thread.start()
        try:
            self._server = self._call(self._listen())
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CONTROL_TIMEOUT)
            raise
        self.port: int = self._server.sockets[0].getsockname()[1]
        log.debug("proxy.listening", port=self.port, upstream=upstream_port)

    @classmethod
    def for_url(cls, amqp_url: str) -> FaultProxy:
        """A proxy in front of the broker that amqp_url points at."""
        host, port = _host_and_port(amqp_url)
        return cls(upstream_port=port, upstream_host=host)

    def url_for(self, amqp_url: str) -> str:
        """amqp_url with its host and port replaced by the proxy's."""
        _, port = _host_and_port(amqp_url)
        if port != self.upstream_port:
            raise HarnessError(
                f"{amqp_url!r} points at port {port} but this proxy forwards to "
                f"{self.upstream_port}; make the proxy with FaultProxy.for_url(url)"
            )

        parts = urlsplit(amqp_url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}127.0.0.1:{self.port}"))

    @property
    def mode(self) -> LinkMode:
        return self._mode

    @property
    def open_connections(self) -> int:
        """Connections currently forwarded (stalled ones included)."""
        return len(self._links)

    def pass_through(self) -> None:
        """Forward bytes both ways and accept new connections; held bytes flow."""
        self._call(self._set_mode(LinkMode.PASS))

    def stall(self) -> None:
        """Keep every connection open but forward no byte either way."""
        self._call(self._set_mode(LinkMode.STALL))

    def refuse(self, *, cut_open: bool = False) -> None:
        """Reset new connections at once; with cut_open, reset the open ones too."""
        self._call(self._refuse(cut_open))

    def cut(self) -> None:
        """Reset every open connection now; connections made afterwards pass."""
        self._call(self._cut())

    def wait_connections(self, count: int = 1, timeout: float = 15.0) -> None:
        """Block until at least `count` connections are open through the proxy."""
        deadline = time.monotonic() + timeout
        while self.open_connections < count:
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"only {self.open_connections} of {count} connections opened "
                    f"through the proxy on port {self.port} within {timeout:g}s; "
                    "is the client pointed at proxy.url_for(...)?"
                )
            time.sleep(0.05)

    def close(self) -> None:
        """Reset every connection, stop listening and end the proxy's thread."""
        if self._closed:
            return
        self._closed = True
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise HarnessError(
                "FaultProxy controls block until the change is made, so they "
                "cannot be called from the proxy's own thread"
            )
        if self._closed and not self._loop.is_running():
            coro.close()
            raise HarnessError(f"the proxy on port {self.port} is already closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(
            CONTROL_TIMEOUT
        )

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            # Let cancelled tasks finish so that nothing is destroyed pending.
            leftovers = asyncio.all_tasks(self._loop)
            for task in leftovers:
                task.cancel()
            self._loop.run_until_complete(
                asyncio.gather(*leftovers, return_exceptions=True)
            )
            self._loop.close()

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _set_mode(self, mode: LinkMode) -> None:
        if mode is not self._mode:
            log.info("proxy.mode", port=self.port, mode=mode.value)
        self._mode = mode
        if mode is LinkMode.STALL:
            self._flowing.clear()
        else:
            self._flowing.set()

    async def _refuse(self, cut_open: bool) -> None:
        if cut_open:
            self._reset_links()
        await self._set_mode(LinkMode.REFUSE)

    async def _cut(self) -> None:
        # Reset first: bytes held by a stall must not slip through on the way.
        count = self._reset_links()
        log.info("proxy.cut", port=self.port, connections=count)
        await self._set_mode(LinkMode.PASS)

    def _reset_links(self) -> int:
        links = list(self._links)
        for link in links:
            link.reset()
        self._links.clear()
        return len(links)

    async def _shutdown(self) -> None:
        self._server.close()
        self._reset_links()
        # Handlers end by themselves once their links are reset; cancelling
        # them instead trips asyncio's stream callback on Python 3.11.
        if self._handlers:
            _, stuck = await asyncio.wait(self._handlers, timeout=CONTROL_TIMEOUT / 2)
            for task in stuck:
                task.cancel()

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections_accepted += 1
        if self._mode is LinkMode.REFUSE:
            _reset(writer)
            return

        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._forward(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _forward(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            _reset(writer)
            return

        link = _Link(writer, upstream_writer)
        self._links.add(link)
        try:
            await link.run(
                self._pump(reader, upstream_writer, to_broker=True),
                self._pump(upstream_reader, writer, to_broker=False),
            )
        finally:
            self._links.discard(link)

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        *,
        to_broker: bool,
    ) -> None:
        try:
            while True:
                data = await source.read(READ_BYTES)
                # A stall holds what was read, end of stream included.
                await self._flowing.wait()
                if not data:
                    return
                # Counted before the write: whoever receives the bytes may
                # read the counters at once, before this task runs again.
                if to_broker:
                    self.bytes_to_broker += len(data)
                else:
                    self.bytes_to_client += len(data)
                sink.write(data)
                await sink.drain()
        except OSError:
            return


class _Link:
    """One client connection and its connection to the broker."""

    def __init__(
        self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter
    ) -> None:
        self.writers = (client, upstream)
        self.pumps: list[asyncio.Task[None]] = []

    async def run(self, *pumps: Coroutine[Any, Any, None]) -> None:
        self.pumps = [asyncio.create_task(pump) for pump in pumps]
        try:
            await asyncio.wait(self.pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # AMQP never half-closes, so one side ending ends the link.
            for pump in self.pumps:
                pump.cancel()
            await asyncio.gather(*self.pumps, return_exceptions=True)
            for writer in self.writers:
                writer.close()

    def reset(self) -> None:
        for pump in self.pumps:
            pump.cancel()
        for writer in self.writers:
            _reset(writer)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset, the way a torn link looks to the peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
    writer.transport.abort()


def require_loopback(host: str) -> None:
    """Refuse any target off this machine: faults are only ever injected locally."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise HarnessError(
            f"the fault proxy only forwards to this machine, not to {host!r}; "
            "use 127.0.0.1 or localhost"
        )


def _host_and_port(amqp_url: str) -> tuple[str, int]:
    parts = urlsplit(amqp_url)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise HarnessError(
            f"{amqp_url!r} is not an AMQP URL; expected amqp://user:pass@host:port/vhost"
        )
    return parts.hostname, parts.port or AMQP_PORT
