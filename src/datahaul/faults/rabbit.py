"""The machine's RabbitMQ as a fault: stop it, start it, give tests their own vhost.

Stopping uses `rabbitmqctl stop_app` by default: the broker application
(listeners, connections, queues, message stores) shuts down exactly as in a
full stop and recovers its queues from disk on `start_app`, and clients see
the same thing (their sockets closed, new connections refused), but the
Erlang node stays up, so the broker is back in about two seconds instead of
ten and cannot fail to boot because the caller's environment differs from
the one the node was first started in. `mode="node"` stops the whole node
(`rabbitmqctl stop`) and boots it again with `rabbitmq-server -detached`,
for a test that needs the operating-system process gone.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import aio_pika
import structlog

from datahaul.broker import topology
from datahaul.faults import HarnessError
from datahaul.faults.proxy import AMQP_PORT

log = structlog.get_logger("datahaul.faults")

StopMode = Literal["app", "node"]

BROKER_HOST = "127.0.0.1"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
TOPOLOGY_EXCHANGES = (
    topology.PACKET_EXCHANGE,
    topology.DEAD_EXCHANGE,
    topology.EVENT_EXCHANGE,
    topology.STATUS_EXCHANGE,
)
BROKER_UNREACHABLE = (
    OSError,
    asyncio.TimeoutError,
    aio_pika.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,
)
VHOST_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")


def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    """Run rabbitmqctl and return what it printed; a failure raises HarnessError."""
    command = ["rabbitmqctl", *args]
    if shutil.which("rabbitmqctl") is None:
        raise HarnessError(
            "rabbitmqctl is not on PATH; install RabbitMQ (apt-get install "
            "rabbitmq-server) or run the tests where it is installed"
        )
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise HarnessError(
            f"`{' '.join(command)}` did not finish within {timeout:g}s; "
            "check the broker with `rabbitmqctl status`"
        ) from None
    if result.returncode != 0:
        said = (result.stderr.strip() or result.stdout.strip())[-800:]
        raise HarnessError(
            f"`{' '.join(command)}` failed with exit {result.returncode}: {said}"
        )
    return result.stdout


def broker_accepts(port: int = AMQP_PORT, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on the broker's port."""
    try:
        with socket.create_connection((BROKER_HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def node_responds() -> bool:
    """Whether the RabbitMQ Erlang node is up, whether or not the broker runs."""
    try:
        rabbitmqctl("-q", "ping", "--timeout", "5", timeout=30)
    except HarnessError:
        return False
    return True


def stop_rabbitmq(mode: StopMode = "app", port: int = AMQP_PORT) -> None:
    """Stop the local broker and return once its port refuses connections."""
    started = time.monotonic()
    if mode == "app":
        rabbitmqctl("stop_app", timeout=STOP_TIMEOUT)
    else:
        rabbitmqctl("stop", timeout=STOP_TIMEOUT)
    _wait_port(port, open_=False, timeout=STOP_TIMEOUT)
    log.info(
        "rabbitmq.stopped", mode=mode, seconds=round(time.monotonic() - started, 2)
    )


def start_rabbitmq(port: int = AMQP_PORT) -> None:
    """Start the local broker (the app, or the whole node if it is down) and wait."""
    started = time.monotonic()
    if node_responds():
        rabbitmqctl("start_app", timeout=START_TIMEOUT)
    else:
        _boot_node()
    rabbitmqctl("await_startup", "--timeout", str(int(START_TIMEOUT)))
    _wait_port(port, open_=True, timeout=START_TIMEOUT)
    log.info("rabbitmq.started", seconds=round(time.monotonic() - started, 2))


def ensure_running(port: int = AMQP_PORT) -> None:
    """Start the broker unless it already accepts connections."""
    if not broker_accepts(port):
        start_rabbitmq(port)


# Lower-case because it reads as a statement: `with rabbitmq_down(): ...`.
class rabbitmq_down:
    """The broker stopped for the body of a `with` or `async with`, then restarted.

    The broker is started again however the body ends, an exception
    included. The asynchronous form runs the slow rabbitmqctl calls in a
    thread, so the caller's event loop keeps serving while the broker is down.
    """

    def __init__(self, mode: StopMode = "app", port: int = AMQP_PORT) -> None:
        self.mode: StopMode = mode
        self.port = port

    def __enter__(self) -> rabbitmq_down:
        stop_rabbitmq(self.mode, self.port)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        start_rabbitmq(self.port)

    async def __aenter__(self) -> rabbitmq_down:
        await asyncio.to_thread(stop_rabbitmq, self.mode, self.port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Shielded: a cancelled test must still leave the broker running.
        await asyncio.shield(asyncio.to_thread(start_rabbitmq, self.port))


def create_vhost(name: str, user: str = "guest") -> None:
    """Create a vhost (no error if it exists) and give `user` every permission."""
    _check_vhost_name(name)
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
    log.debug("rabbitmq.vhost_created", vhost=name)


def delete_vhost(name: str) -> None:
    """Delete a vhost and everything in it; a vhost already gone is not an error."""
    _check_vhost_name(name)
    try:
        rabbitmqctl("delete_vhost", name)
    except HarnessError as exc:
        if "does not exist" not in str(exc):
            raise
    log.debug("rabbitmq.vhost_deleted", vhost=name)


@dataclass(frozen=True)
class QueueStats:
    """What a passive declare tells of a queue."""

    queue: str
    messages: int
    """Messages ready for delivery; unacknowledged ones are not counted."""
    consumers: int


class QueueMissing(HarnessError):
    """Raised when a queue asked about does not exist in the vhost."""


async def queue_stats(amqp_url: str, queue: str) -> QueueStats:
    """Ready messages and consumers of one queue, by a passive declare."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        return await _passive_stats(connection, queue)


async def wait_for_consumers(
    amqp_url: str,
    queues: Iterable[str],
    at_least: Callable[[str], int],
    *,
    within: float,
    still_worth_waiting: Callable[[], bool] = lambda: True,
) -> None:
    """Return once every queue has at least at_least(queue) consumers.

    Polls over one connection, opened again whenever the broker drops it, so
    that a worker started while RabbitMQ restarts is waited for as well.
    Raises HarnessError after `within` seconds, or as soon as
    still_worth_waiting() turns false (say, the consumer's process died).
    """
    wanted = list(queues)
    deadline = time.monotonic() + within
    while True:
        try:
            connection = await aio_pika.connect(amqp_url, timeout=5)
            async with connection:
                await _poll_consumers(
                    connection,
                    wanted,
                    at_least,
                    (deadline, within),
                    still_worth_waiting,
                )
                return
        except BROKER_UNREACHABLE as exc:
            seen = f"RabbitMQ unreachable ({exc or type(exc).__name__})"
        _keep_waiting(seen, (deadline, within), still_worth_waiting)
        await asyncio.sleep(0.5)


async def _poll_consumers(
    connection: aio_pika.abc.AbstractConnection,
    wanted: list[str],
    at_least: Callable[[str], int],
    limit: tuple[float, float],
    still_worth_waiting: Callable[[], bool],
) -> None:
    while True:
        counts = {q: await _consumers_or_zero(connection, q) for q in wanted}
        needed = {q: at_least(q) for q in wanted}
        if all(counts[q] >= needed[q] for q in wanted):
            return
        seen = f"consumers {counts}, wanted {needed}"
        _keep_waiting(seen, limit, still_worth_waiting)
        await asyncio.sleep(0.1)


def _keep_waiting(
    seen: str, limit: tuple[float, float], still_worth_waiting: Callable[[], bool]
) -> None:
    deadline, within = limit
    if not still_worth_waiting():
        raise HarnessError(f"gave up waiting for consumers: {seen}")
    if time.monotonic() > deadline:
        raise HarnessError(f"no consumers as wanted within {within:g}s: {seen}")


async def reset_topology(amqp_url: str) -> None:
    """Delete datahaul's queues and exchanges in the URL's vhost, messages and all.

    What a test or a soak round starts from: no packet left over from an
    earlier run, and queues free to be declared again with other arguments.
    """
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        for queue in (*topology.QUEUES.values(), topology.DEAD_QUEUE):
            await channel.queue_delete(queue)
        for exchange in TOPOLOGY_EXCHANGES:
            await channel.exchange_delete(exchange)


async def _consumers_or_zero(
    connection: aio_pika.abc.AbstractConnection, queue: str
) -> int:
    # A queue not declared yet simply has no consumer yet.
    try:
        return (await _passive_stats(connection, queue)).consumers
    except QueueMissing:
        return 0


async def _passive_stats(
    connection: aio_pika.abc.AbstractConnection, queue: str
) -> QueueStats:
    # A passive declare of a missing queue closes its channel, so each
    # question gets a channel of its own.
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        raise QueueMissing(
            f"queue {queue!r} does not exist in this vhost; declare the topology "
            "first (start a worker or run `datahaul topology`)"
        ) from None
    finally:
        if not channel.is_closed:
            await channel.close()

    result = declared.declaration_result
    return QueueStats(queue, result.message_count or 0, result.consumer_count or 0)


def _boot_node() -> None:
    if shutil.which("rabbitmq-server") is None:
        raise HarnessError(
            "the RabbitMQ node is down and rabbitmq-server is not on PATH; "
            "install rabbitmq-server"
        )
    result = subprocess.run(
        ["rabbitmq-server", "-detached"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        raise HarnessError(
            f"`rabbitmq-server -detached` failed with exit {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-800:]}"
        )

    # await_startup gives up at once on a node that has not registered yet.
    deadline = time.monotonic() + START_TIMEOUT
    while not node_responds():
        if time.monotonic() > deadline:
            raise HarnessError(
                f"the RabbitMQ node did not come up within {START_TIMEOUT:g}s of "
                "`rabbitmq-server -detached`; see /var/log/rabbitmq/"
            )
        time.sleep(0.5)


def _wait_port(port: int, *, open_: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while broker_accepts(port, timeout=0.5) is not open_:
        if time.monotonic() > deadline:
            state = "accept" if open_ else "refuse"
            raise HarnessError(
                f"RabbitMQ's port {port} did not {state} connections within "
                f"{timeout:g}s; check `rabbitmqctl status`"
            )
        time.sleep(0.1)


def _check_vhost_name(name: str) -> None:
    if not VHOST_NAME.fullmatch(name):
        raise HarnessError(
            f"vhost name {name!r} is not allowed here; use 1-200 letters, "
            "digits, '.', '_' or '-'"
        )
