"""The fault harness itself, against the machine's real RabbitMQ and datahaul."""

from __future__ import annotations

import asyncio
import secrets
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import psycopg
import pytest
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

import conftest
from conftest import GatewayFactory, WorkerFactory
from datahaul.faults import HarnessError
from datahaul.faults.processes import ServiceProcess
from datahaul.faults.proxy import FaultProxy, LinkMode
from datahaul.faults.rabbit import (
    QueueMissing,
    broker_accepts,
    queue_stats,
    rabbitmq_down,
    reset_topology,
    wait_for_consumers,
)


def test_a_missing_service_fails_in_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a service, tests fail when CI=true and are skipped otherwise."""
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        conftest.missing_service("RabbitMQ is gone")

    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="RabbitMQ is gone"):
        conftest.missing_service("RabbitMQ is gone")


async def connect(url: str) -> AbstractConnection:
    return await aio_pika.connect(url, timeout=5)


async def closed_event(connection: AbstractConnection) -> asyncio.Event:
    # aio-pika leaves is_closed false when the peer drops the link, but runs
    # the close callbacks.
    closed = asyncio.Event()
    connection.close_callbacks.add(lambda *_: closed.set())
    return closed


@pytest.fixture
async def proxied(
    fault_proxy: FaultProxy, amqp_url: str
) -> AsyncIterator[tuple[AbstractChannel, AbstractQueue]]:
    """A confirming channel through the proxy and a queue of the test's own."""
    connection = await connect(fault_proxy.url_for(amqp_url))
    channel = await connection.channel(publisher_confirms=True)
    queue = await channel.declare_queue(f"proxied-{secrets.token_hex(4)}")
    yield channel, queue
    fault_proxy.pass_through()
    await queue.delete(if_unused=False, if_empty=False)
    await connection.close()


def message(body: bytes) -> aio_pika.Message:
    return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


async def test_proxy_forwards_publish_and_consume(
    fault_proxy: FaultProxy, proxied: tuple[AbstractChannel, AbstractQueue]
) -> None:
    """A client through the proxy publishes with confirms and consumes its message."""
    channel, queue = proxied
    body = secrets.token_bytes(100_000)

    await channel.default_exchange.publish(message(body), queue.name, timeout=5)
    received = await queue.get(timeout=5, fail=True)
    await received.ack()

    assert received.body == body
    assert fault_proxy.bytes_to_broker > len(body)
    assert fault_proxy.bytes_to_client > len(body)
    assert fault_proxy.open_connections == 1


async def test_stall_holds_confirms_until_pass_through(
    fault_proxy: FaultProxy,
    proxied: tuple[AbstractChannel, AbstractQueue],
    amqp_url: str,
) -> None:
    """A stalled link lets no confirm back; after pass_through the held bytes flow."""
    channel, queue = proxied
    fault_proxy.stall()

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(
            channel.default_exchange.publish(message(b"held"), queue.name), 1.0
        )
    stalled = await queue_stats(amqp_url, queue.name)
    assert stalled.messages == 0
    assert fault_proxy.mode is LinkMode.STALL

    fault_proxy.pass_through()
    await channel.default_exchange.publish(message(b"after"), queue.name, timeout=5)
    assert (await queue_stats(amqp_url, queue.name)).messages == 2


async def test_stall_also_holds_new_connections(
    fault_proxy: FaultProxy, amqp_url: str
) -> None:
    """A connection opened during a stall never finishes its AMQP handshake."""
    fault_proxy.stall()

    with pytest.raises((asyncio.TimeoutError, aio_pika.exceptions.AMQPError)):
        await aio_pika.connect(fault_proxy.url_for(amqp_url), timeout=1)


async def test_cut_closes_a_live_connection_and_lets_new_ones_pass(
    fault_proxy: FaultProxy, amqp_url: str
) -> None:
    """cut() tears down an open aio-pika connection; the next connection works."""
    url = fault_proxy.url_for(amqp_url)
    connection = await connect(url)
    channel = await connection.channel(publisher_confirms=True)
    closed = await closed_event(connection)

    fault_proxy.cut()

    await asyncio.wait_for(closed.wait(), 5)
    with pytest.raises(
        (aio_pika.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError)
    ):
        await channel.default_exchange.publish(message(b"lost"), "nowhere", timeout=2)
    again = await connect(url)
    assert fault_proxy.open_connections == 1
    await again.close()
    await connection.close()


async def test_refuse_resets_new_connections_and_can_cut_open_ones(
    fault_proxy: FaultProxy, amqp_url: str
) -> None:
    """refuse() turns new connections away; refuse(cut_open=True) drops open ones."""
    url = fault_proxy.url_for(amqp_url)
    survivor = await connect(url)
    closed = await closed_event(survivor)

    fault_proxy.refuse()
    with pytest.raises(ConnectionError):
        await connect(url)
    assert not closed.is_set()

    fault_proxy.refuse(cut_open=True)
    await asyncio.wait_for(closed.wait(), 5)
    assert fault_proxy.open_connections == 0
    await survivor.close()


def test_url_for_keeps_credentials_and_vhost() -> None:
    """url_for swaps host and port only, and rejects a URL for another broker."""
    url = "amqp://guest:guest@localhost:5672/datahaul-test-x%2Fy?heartbeat=5"

    with FaultProxy() as proxy:
        assert proxy.url_for(url) == (
            f"amqp://guest:guest@127.0.0.1:{proxy.port}/datahaul-test-x%2Fy?heartbeat=5"
        )
        with pytest.raises(HarnessError, match="port 5673"):
            proxy.url_for("amqp://guest:guest@127.0.0.1:5673/")


def test_proxy_only_forwards_to_this_machine() -> None:
    """The proxy refuses an upstream that is not a loopback address."""
    with pytest.raises(HarnessError, match="only forwards to this machine"):
        FaultProxy(upstream_host="192.0.2.1")


async def test_vhost_keeps_queues_apart(amqp_url: str) -> None:
    """A queue declared in the run's vhost does not exist in the default vhost."""
    name = f"isolation-probe-{secrets.token_hex(4)}"
    connection = await connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, auto_delete=False)
        await channel.default_exchange.publish(message(b"x"), name)

        assert (await queue_stats(amqp_url, name)).messages == 1
        with pytest.raises(QueueMissing):
            await queue_stats("amqp://guest:guest@127.0.0.1:5672/", name)
        await queue.delete(if_unused=False, if_empty=False)


def test_pg_url_is_a_database_of_the_runs_own(pg_url: str) -> None:
    """pg_url names a fresh datahaul_test_* database that the run can write to."""
    with psycopg.connect(pg_url) as connection:
        name = connection.execute("SELECT current_database()").fetchone()
        connection.execute("CREATE TABLE harness_probe (id int)")
        connection.execute("DROP TABLE harness_probe")

    assert name is not None
    assert name[0].startswith("datahaul_test_")


async def test_reset_topology_drops_leftover_packets(amqp_url: str) -> None:
    """reset_topology deletes datahaul's queues, so no packet outlives its test."""
    connection = await connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            "text_data_queue", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await channel.default_exchange.publish(message(b"leftover"), queue.name)

    await reset_topology(amqp_url)

    with pytest.raises(QueueMissing):
        await queue_stats(amqp_url, "text_data_queue")


async def test_wait_for_consumers_rides_out_an_unreachable_broker(
    fault_proxy: FaultProxy, amqp_url: str
) -> None:
    """wait_for_consumers keeps trying while connections are refused, then sees one."""
    name = f"awaited-{secrets.token_hex(4)}"
    connection = await connect(amqp_url)
    channel = await connection.channel()
    queue = await channel.declare_queue(name)
    fault_proxy.refuse()

    waiting = asyncio.create_task(
        wait_for_consumers(
            fault_proxy.url_for(amqp_url), [name], lambda queue: 1, within=30
        )
    )
    try:
        await asyncio.sleep(1.5)
        assert not waiting.done()
        assert fault_proxy.connections_accepted >= 2

        fault_proxy.pass_through()
        await queue.consume(ack_it)
        await asyncio.wait_for(waiting, 15)
    finally:
        waiting.cancel()
        await queue.delete(if_unused=False, if_empty=False)
        await connection.close()


async def ack_it(delivered: AbstractIncomingMessage) -> None:
    await delivered.ack()


async def test_wait_for_consumers_gives_up_with_what_it_saw(amqp_url: str) -> None:
    """Without a consumer, wait_for_consumers fails naming the counts it saw."""
    with pytest.raises(HarnessError, match=r"within 0.5s: consumers \{'nobody_"):
        await wait_for_consumers(
            amqp_url, ["nobody_consumes_this"], lambda queue: 1, within=0.5
        )


def test_gateway_is_ready_killed_and_restarted(gateway: ServiceProcess) -> None:
    """The gateway fixture answers /healthz; kill9 stops it; restart brings it back."""
    url = f"{gateway.url}/healthz"
    assert _http_status(url) == 200

    assert gateway.kill9() == -9
    assert _http_status(url) is None

    gateway.restart()
    assert _http_status(url) == 200
    assert gateway.starts == 2
    assert gateway.log_path.read_text().count("=== start") == 2


def test_gateway_factory_puts_the_proxy_between_gateway_and_broker(
    gateway_factory: GatewayFactory, fault_proxy: FaultProxy
) -> None:
    """A gateway started with proxy= reaches RabbitMQ through it, after a cut too."""
    gateway_factory(proxy=fault_proxy)
    fault_proxy.wait_connections(1)
    accepted = fault_proxy.connections_accepted

    fault_proxy.cut()

    fault_proxy.wait_connections(1, timeout=30)
    assert fault_proxy.connections_accepted > accepted


def test_wait_ready_reports_an_early_exit_with_the_log(
    datahaul_env: dict[str, str], log_dir: Path, free_tcp_port: int
) -> None:
    """A gateway that exits at once makes wait_ready raise with its log's tail."""
    process = ServiceProcess.gateway(
        free_tcp_port, datahaul_env, log_dir, extra_args=["--no-such-flag"]
    )
    process.start()

    with pytest.raises(HarnessError, match="exited with code 2") as raised:
        process.wait_ready(timeout=20)

    assert "--no-such-flag" in str(raised.value)


async def test_workers_are_ready_once_their_own_consumer_is_there(
    worker_factory: WorkerFactory, amqp_url: str
) -> None:
    """Each worker the factory returns is consuming; kill9 takes its consumer away."""
    first = worker_factory("text")
    assert (await queue_stats(amqp_url, "text_data_queue")).consumers == 1

    second = worker_factory("all")
    assert (await queue_stats(amqp_url, "text_data_queue")).consumers == 2
    assert (await queue_stats(amqp_url, "video_data_queue")).consumers == 1

    first.kill9()
    deadline = time.monotonic() + 10
    while (await queue_stats(amqp_url, "text_data_queue")).consumers != 1:
        assert time.monotonic() < deadline, "the killed worker's consumer stayed"
        await asyncio.sleep(0.1)
    assert second.is_running


def test_unknown_worker_type_is_refused(
    datahaul_env: dict[str, str], log_dir: Path
) -> None:
    """ServiceProcess.worker names the valid types when given an unknown one."""
    with pytest.raises(HarnessError, match="text, image, video, all"):
        ServiceProcess.worker("audio", datahaul_env, log_dir)


@pytest.mark.broker_outage
async def test_rabbitmq_down_stops_and_restarts_the_broker(amqp_url: str) -> None:
    """Inside rabbitmq_down the broker refuses clients; after it, it serves again."""
    connection = await connect(amqp_url)
    closed = await closed_event(connection)

    async with rabbitmq_down():
        assert not broker_accepts()
        await asyncio.wait_for(closed.wait(), 10)
        with pytest.raises(ConnectionError):
            await connect(amqp_url)

    assert broker_accepts()
    again = await connect(amqp_url)
    await again.close()
    await connection.close()


@pytest.mark.broker_outage
@pytest.mark.usefixtures("rabbitmq")
def test_rabbitmq_down_restarts_the_broker_when_the_body_fails() -> None:
    """An exception inside rabbitmq_down still leaves the broker running."""

    def fail_during_outage() -> None:
        with rabbitmq_down():
            assert not broker_accepts()
            raise RuntimeError("body failed")

    with pytest.raises(RuntimeError, match="body failed"):
        fail_during_outage()

    assert broker_accepts()


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except OSError:
        return None
