"""Connections to RabbitMQ that try each known node in turn."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection

from datahaul.errors import BrokerError

log = structlog.get_logger("datahaul.broker")

CONNECT_TIMEOUT = 5.0
# Only for a connection nobody will use: a stop must not hang on a mute node.
ABANDON_TIMEOUT = 1.0
DEFAULT_HEARTBEAT = 15
BROKER_FAILURES: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    aio_pika.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,
)

CANCELLED_OR_FAILED: tuple[type[BaseException], ...] = (
    asyncio.CancelledError,
    *BROKER_FAILURES,
)


class NodeRing:
    """The broker addresses, tried round the ring from the last one that worked."""

    def __init__(self, urls: Sequence[str], name: str) -> None:
        if not urls:
            raise BrokerError("no broker address given; set DATAHAUL_AMQP_URL")
        self.urls = list(urls)
        self.name = name
        self._start = 0

    async def connect(self) -> AbstractConnection:
        failures: list[str] = []
        order = itertools.islice(
            itertools.cycle(range(len(self.urls))), self._start, None
        )
        for index in itertools.islice(order, len(self.urls)):
            url = self.urls[index]
            try:
                connection = await self._connect_to(url)
            except BROKER_FAILURES as exc:
                failures.append(f"{redact(url)}: {exc or type(exc).__name__}")
                continue
            self._start = index
            return connection
        raise BrokerError("could not reach RabbitMQ at " + "; ".join(failures))

    async def _connect_to(self, url: str) -> AbstractConnection:
        attempt = asyncio.ensure_future(self._open(url))
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # A cancel that lands inside the client's handshake leaves a socket
            # and its reader running with nobody holding them, to be torn down
            # by whoever closes the loop. Let the handshake end, then close.
            await _close_when_done(attempt)
            raise

    async def _open(self, url: str) -> AbstractConnection:
        return await aio_pika.connect(
            with_heartbeat(url),
            timeout=CONNECT_TIMEOUT,
            client_properties={"connection_name": self.name},
        )

    def skip_current(self) -> None:
        """Start the next attempt at another node (the current one misbehaved)."""
        self._start = (self._start + 1) % len(self.urls)


async def _close_when_done(attempt: asyncio.Future[AbstractConnection]) -> None:
    try:
        connection = await asyncio.wait_for(attempt, CONNECT_TIMEOUT)
    except CANCELLED_OR_FAILED:
        return
    with contextlib.suppress(*BROKER_FAILURES):
        await asyncio.wait_for(connection.close(), ABANDON_TIMEOUT)


def with_heartbeat(url: str) -> str:
    """The URL with a heartbeat, unless it names one: the broker's default of
    60 s lets a client sit for minutes on a node that hangs."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    if any(key == "heartbeat" for key, _ in query):
        return url
    query.append(("heartbeat", str(DEFAULT_HEARTBEAT)))
    return urlunsplit(parts._replace(query=urlencode(query)))


def redact(url: str) -> str:
    """The URL without its password, fit for a log line or an error."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


async def wait_closed(*closables: AbstractConnection | AbstractChannel) -> None:
    """Return once any of a connection and its channels is closed."""
    closed = asyncio.Event()
    for closable in closables:
        closable.close_callbacks.add(lambda *_: closed.set())
        if closable.is_closed:
            return
    await closed.wait()
