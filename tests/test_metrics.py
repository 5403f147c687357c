"""Prometheus /metrics of the gateway, the worker and the center, after real traffic.

Every process runs as it would in production (a gateway, a worker with
--metrics-port, `datahaul center`) against the test's RabbitMQ vhost; the
counters are scraped over HTTP and must have moved by exactly what was sent.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import aio_pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import PROCESSES
from datahaul.faults.processes import (
    HttpHealth,
    ServiceProcess,
    free_port,
    run_coroutine,
)
from pipeline_helpers import SourceFile, post_packets, wait_stored

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
TEXT = SourceFile("metrics-text", "text", b"metrics line\n" * 250, 1000, "m.txt")
IMAGE = SourceFile("metrics-image", "image", os.urandom(200_000), 65_536, "m.png")


def scrape(url: str) -> Samples:
    """Every sample of a /metrics page, by name and labels."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def eventually(
    url: str, check: Callable[[Samples], bool], within: float = 30.0
) -> Samples:
    """Scrape until check passes; the last scrape either way."""
    deadline = time.monotonic() + within
    while True:
        samples = scrape(url)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def track(request: pytest.FixtureRequest, process: ServiceProcess) -> ServiceProcess:
    request.node.stash.setdefault(PROCESSES, []).append(process)
    return process


@pytest.fixture
def center_url(
    request: pytest.FixtureRequest, datahaul_env: dict[str, str], log_dir: Path
) -> Iterator[str]:
    """`datahaul center` on a free port with this test's settings."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = track(
        request,
        ServiceProcess(
            "center",
            ["center", "--port", str(port)],
            datahaul_env,
            log_dir,
            HttpHealth(f"{url}/healthz"),
        ),
    )
    process.start().wait_ready()
    yield url
    process.terminate()


@pytest.fixture
def worker_metrics(
    request: pytest.FixtureRequest, datahaul_env: dict[str, str], log_dir: Path
) -> Iterator[str]:
    """A worker of all types serving /metrics on a free port; that URL."""
    port = free_port()
    process = track(
        request,
        ServiceProcess.worker(
            "all",
            datahaul_env,
            log_dir,
            name="worker-metrics",
            extra_args=["--metrics-port", str(port)],
        ),
    )
    process.start().wait_ready()
    yield f"http://127.0.0.1:{port}/metrics"
    process.kill9()


def publish_poison(amqp_url: str) -> None:
    async def publish() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.default_exchange.publish(
                aio_pika.Message(b"{ not json", content_type="application/json"),
                "image_data_queue",
            )

    run_coroutine(publish())


def test_gateway_and_worker_count_exactly_what_was_sent(
    gateway, worker_metrics, datahaul_env, data_dir
) -> None:
    """Packets and bytes accepted, published, staged, assembled and stored, and
    the finalize histogram, move by the files sent; a duplicate, a bad packet, a
    conflict and a poison packet each land in their own counter."""
    gateway_metrics = f"{gateway.url}/metrics"
    sizes = {"text": len(TEXT.content), "image": len(IMAGE.content)}
    packets = TEXT.total_seq + IMAGE.total_seq

    for source in (TEXT, IMAGE):
        status, _ = post_packets(gateway.url, source.packets())
        assert status == 200
    wait_stored(datahaul_env["DATAHAUL_CATALOG_URL"], [TEXT.file_id, IMAGE.file_id])

    front = scrape(gateway_metrics)
    assert value(front, "datahaul_gateway_packets_accepted_total") == packets
    assert value(front, "datahaul_gateway_bytes_accepted_total") == sum(sizes.values())
    assert value(front, "datahaul_gateway_packets_published_total") == packets
    assert value(front, "datahaul_gateway_packets_buffered_total") == 0
    assert value(front, "datahaul_gateway_bytes_published_total") >= sum(sizes.values())
    assert value(front, "datahaul_gateway_broker_link_up") == 1
    assert value(front, "datahaul_gateway_outbox_packets") == 0
    assert not [name for name, _ in front if name.startswith("datahaul_worker_")]

    back = eventually(
        worker_metrics,
        lambda s: value(s, "datahaul_worker_files_stored_total", type="image") == 1,
    )
    assert value(back, "datahaul_worker_packets_staged_total") == packets
    assert value(back, "datahaul_worker_bytes_staged_total") == sum(sizes.values())
    assert value(back, "datahaul_worker_packets_assembled_total") == packets
    assert value(back, "datahaul_worker_bytes_assembled_total") == sum(sizes.values())
    for kind, size in sizes.items():
        assert value(back, "datahaul_worker_files_stored_total", type=kind) == 1
        assert value(back, "datahaul_worker_bytes_stored_total", type=kind) == size
        assert value(back, "datahaul_worker_finalize_seconds_count", type=kind) == 1
    assert value(back, "datahaul_worker_packets_duplicate_total") == 0

    duplicate = IMAGE.packet(2)
    bad = {**TEXT.packet(1), "seq": 0}
    conflict = {**TEXT.packet(1), "total_seq": 99}
    assert post_packets(gateway.url, [duplicate])[0] == 200
    assert post_packets(gateway.url, [bad])[0] == 400
    assert post_packets(gateway.url, [conflict])[0] == 409
    publish_poison(datahaul_env["DATAHAUL_AMQP_URL"])

    front = scrape(gateway_metrics)
    assert value(front, "datahaul_gateway_packets_accepted_total") == packets + 1
    errors = "datahaul_errors_total"
    assert value(front, errors, component="gateway", kind="rejected") == 1
    assert value(front, errors, component="gateway", kind="conflict") == 1

    back = eventually(
        worker_metrics,
        lambda s: (
            value(s, "datahaul_worker_packets_dead_lettered_total") == 1
            and value(s, "datahaul_worker_packets_duplicate_total") == 1
        ),
    )
    assert value(back, "datahaul_worker_packets_dead_lettered_total") == 1
    assert value(back, "datahaul_worker_bytes_dead_lettered_total") == len(
        b"{ not json"
    )
    assert value(back, errors, component="worker", kind="poison") == 1
    assert value(back, "datahaul_worker_packets_duplicate_total") == 1
    assert value(back, "datahaul_worker_packets_staged_total") == packets


def test_outbox_counters_and_reports_follow_a_cut_broker_link(
    gateway_factory, fault_proxy, worker_metrics, center_url, datahaul_env
) -> None:
    """With the gateway's link cut, packets are counted buffered, the outbox
    gauges and the center's view of the gateway show it; once the link is back,
    the same packets are counted forwarded and the outbox is empty."""
    gateway = gateway_factory(proxy=fault_proxy)
    gateway_metrics = f"{gateway.url}/metrics"
    center_metrics = f"{center_url}/metrics"
    up = "datahaul_gateway_report_link_up"
    eventually(
        center_metrics, lambda s: any(n == up and v == 1 for (n, _), v in s.items())
    )

    fault_proxy.refuse(cut_open=True)
    eventually(
        gateway_metrics, lambda s: value(s, "datahaul_gateway_broker_link_up") == 0
    )
    status, answer = post_packets(gateway.url, IMAGE.packets())
    assert (status, answer["status"]) == (202, "buffered")

    cut = scrape(gateway_metrics)
    assert value(cut, "datahaul_gateway_packets_buffered_total") == IMAGE.total_seq
    assert value(cut, "datahaul_gateway_outbox_packets") == IMAGE.total_seq
    assert value(cut, "datahaul_gateway_outbox_bytes") >= len(IMAGE.content)
    assert value(cut, "datahaul_gateway_packets_published_total") == 0
    assert (
        value(cut, "datahaul_errors_total", component="gateway", kind="publish_failed")
        >= 1
    )
    stale = eventually(
        center_metrics, lambda s: any(n == up and v == 0 for (n, _), v in s.items())
    )
    assert [v for (n, _), v in stale.items() if n == up] == [0]

    fault_proxy.pass_through()
    drained = eventually(
        gateway_metrics,
        lambda s: (
            value(s, "datahaul_gateway_packets_forwarded_total") == IMAGE.total_seq
        ),
    )
    assert value(drained, "datahaul_gateway_packets_forwarded_total") == IMAGE.total_seq
    assert value(drained, "datahaul_gateway_outbox_packets") == 0
    assert value(drained, "datahaul_gateway_outbox_bytes") == 0
    wait_stored(datahaul_env["DATAHAUL_CATALOG_URL"], [IMAGE.file_id])
    back = eventually(
        center_metrics, lambda s: [v for (n, _), v in s.items() if n == up] == [1]
    )
    assert value(back, "datahaul_center_files", state="stored") == 1


def test_the_center_reports_queues_files_and_its_own_traffic(
    gateway, worker_metrics, center_url, datahaul_env
) -> None:
    """The center's /metrics shows consumers, dead letters, files by state and
    the requests and bytes it served."""
    assert post_packets(gateway.url, TEXT.packets())[0] == 200
    wait_stored(datahaul_env["DATAHAUL_CATALOG_URL"], [TEXT.file_id])
    publish_poison(datahaul_env["DATAHAUL_AMQP_URL"])
    with urllib.request.urlopen(
        f"{center_url}/v1/files/{TEXT.file_id}/content", timeout=10
    ) as answer:
        assert answer.read() == TEXT.content

    queue = "datahaul_queue_messages"
    samples = eventually(
        f"{center_url}/metrics",
        lambda s: value(s, queue, queue="datahaul_dead_letter_queue") == 1,
    )
    assert value(samples, queue, queue="datahaul_dead_letter_queue") == 1
    for name in ("text_data_queue", "image_data_queue", "video_data_queue"):
        assert value(samples, "datahaul_queue_consumers", queue=name) == 1
    assert value(samples, "datahaul_center_files", state="stored") == 1
    assert value(samples, "datahaul_center_broker_up") == 1
    assert value(samples, "datahaul_center_bytes_served_total") == len(TEXT.content)
    served = value(
        samples, "datahaul_center_requests_total", route="content", status="200"
    )
    assert served == 1


def test_a_worker_asked_for_port_zero_serves_on_the_port_it_logs(
    request, datahaul_env, log_dir
) -> None:
    """--metrics-port 0 picks a free port and says which in its log."""
    process = track(
        request,
        ServiceProcess.worker(
            "text",
            datahaul_env,
            log_dir,
            name="worker-port-zero",
            extra_args=["--metrics-port", "0"],
        ),
    )
    process.start().wait_ready()
    try:
        found = re.search(
            r"url=(http://127\.0\.0\.1:\d+/metrics)", process.log_tail(200)
        )
        assert found, process.log_tail(40)
        samples = scrape(found.group(1))
    finally:
        process.kill9()

    assert ("datahaul_worker_packets_staged_total", frozenset()) in samples
    assert not [name for name, _ in samples if name.startswith("datahaul_gateway_")]
