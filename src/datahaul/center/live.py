"""The dashboard's feed: one snapshot of the pipeline, shared by every viewer.

A snapshot is taken at most once per `FRESH_FOR` seconds however many
browsers poll, and only while someone asks, so an unwatched center costs
the catalog and the broker nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from datahaul.broker.topology import DEAD_QUEUE
from datahaul.center import queries
from datahaul.center.service import Center
from datahaul.storage.catalog import Catalog

FRESH_FOR = 0.5
IN_FLIGHT_SHOWN = 50
RECENT_SHOWN = 20


class LiveView:
    def __init__(self, center: Center) -> None:
        self.center = center
        self.latest: dict[str, Any] | None = None
        self._taken = 0.0
        self._lock = asyncio.Lock()

    async def snapshot(self) -> dict[str, Any]:
        async with self._lock:
            if self.latest is None or time.monotonic() - self._taken > FRESH_FOR:
                self.latest = await self._take()
                self._taken = time.monotonic()
            return self.latest

    async def _take(self) -> dict[str, Any]:
        center = self.center
        files = await center.on_catalog(_catalog_part, center.catalog)
        queues = await center.broker.queue_depths()
        dead = next((q.messages for q in queues if q.queue == DEAD_QUEUE), None)
        return {
            "now": time.time(),
            **files,
            "queues": [q.to_json() for q in queues],
            "dead_letters": dead,
            "gateways": center.book.gateways(),
            "broker": center.broker.to_json(),
        }


def _catalog_part(catalog: Catalog) -> dict[str, Any]:
    flying, flying_count = queries.in_flight(catalog, IN_FLIGHT_SHOWN)
    return {
        "in_flight": flying,
        "in_flight_count": flying_count,
        "recent": queries.recent(catalog, RECENT_SHOWN),
        "throughput": queries.throughput(catalog),
        "states": queries.state_counts(catalog),
        "oldest_receiving_idle_seconds": round(
            queries.oldest_receiving_idle(catalog), 1
        ),
    }


class PipelineCollector:
    """Prometheus figures from the latest snapshot: what the center sees."""

    def __init__(self, view: LiveView) -> None:
        self.view = view

    def collect(self) -> Iterable[Metric]:
        snapshot = self.view.latest
        if snapshot is None:
            return []
        return [
            *_file_metrics(snapshot),
            *_queue_metrics(snapshot),
            *_gateway_metrics(snapshot),
        ]


def _file_metrics(snapshot: dict[str, Any]) -> list[Metric]:
    files = GaugeMetricFamily(
        "datahaul_center_files", "Files in the catalog by state.", labels=["state"]
    )
    for state, count in sorted(snapshot["states"].items()):
        files.add_metric([state], count)
    idle = GaugeMetricFamily(
        "datahaul_center_receiving_idle_seconds",
        "Seconds since the least recently active receiving file got a packet.",
        value=snapshot["oldest_receiving_idle_seconds"],
    )
    rate = GaugeMetricFamily(
        "datahaul_center_stored_bytes_per_second",
        "Bytes stored per second over the last minute.",
        value=snapshot["throughput"]["bytes_per_second"],
    )
    return [files, idle, rate]


def _queue_metrics(snapshot: dict[str, Any]) -> list[Metric]:
    messages = GaugeMetricFamily(
        "datahaul_queue_messages", "Messages ready in each queue.", labels=["queue"]
    )
    consumers = GaugeMetricFamily(
        "datahaul_queue_consumers", "Consumers of each queue.", labels=["queue"]
    )
    for queue in snapshot["queues"]:
        if queue["state"] == "ok":
            messages.add_metric([queue["queue"]], queue["messages"])
            consumers.add_metric([queue["queue"]], queue["consumers"])
    broker = GaugeMetricFamily(
        "datahaul_center_broker_up",
        "1 while the center is connected to RabbitMQ.",
        value=1 if snapshot["broker"]["up"] else 0,
    )
    return [messages, consumers, broker]


def _gateway_metrics(snapshot: dict[str, Any]) -> list[Metric]:
    link = GaugeMetricFamily(
        "datahaul_gateway_report_link_up",
        "1 while a gateway reports its RabbitMQ link up; 0 when down or stale.",
        labels=["gateway"],
    )
    outbox = GaugeMetricFamily(
        "datahaul_gateway_report_outbox_bytes",
        "Outbox bytes in each gateway's latest report.",
        labels=["gateway"],
    )
    age = GaugeMetricFamily(
        "datahaul_gateway_report_age_seconds",
        "Seconds since each gateway's latest report arrived.",
        labels=["gateway"],
    )
    for gateway in snapshot["gateways"]:
        name = [gateway["gateway_id"]]
        link.add_metric(name, 1 if gateway["link"] == "up" else 0)
        outbox.add_metric(name, gateway["outbox_bytes"])
        age.add_metric(name, gateway["age_seconds"])
    return [link, outbox, age]
