"""Prometheus metrics of every datahaul process, and how each process serves them.

Each component's metrics are made outside any registry and join the
process's registry only when that component runs there, so that a gateway's
/metrics shows gateway figures and no idle worker counters. Updates happen
once per request, batch or file (an increment by a count), never once per
packet and never with a label per file: a scrape stays small whatever the
traffic. docs/operations.md says what each metric means and what to alert on.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from datahaul.broker.publisher import ConfirmingPublisher, Outgoing
    from datahaul.gateway.outbox import Outbox
    from datahaul.protocol.packet import Packet
    from datahaul.storage.catalog import StageOutcome
    from datahaul.worker.assembler import Finalized

log = structlog.get_logger("datahaul.metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST

# A `_created` series beside every counter doubles a scrape for no alert.
disable_created_metrics()  # type: ignore[no-untyped-call]

# From a small text file to a multi-gigabyte video on a slow disk.
FINALIZE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)

ERRORS = Counter(
    "datahaul_errors",
    "Errors by component and kind (see docs/operations.md for the kinds).",
    ["component", "kind"],
    registry=None,
)


class MetricGroup:
    """The metrics of one component, registered together."""

    def __init__(self) -> None:
        super().__init__()
        self.members: list[Collector] = []

    def counter(
        self, name: str, documentation: str, labels: Sequence[str] = ()
    ) -> Counter:
        metric = Counter(f"datahaul_{name}", documentation, list(labels), registry=None)
        self.members.append(metric)
        return metric

    def gauge(self, name: str, documentation: str) -> Gauge:
        metric = Gauge(f"datahaul_{name}", documentation, registry=None)
        self.members.append(metric)
        return metric


class GatewayMetrics(MetricGroup):
    """What the gateway accepted, published, buffered and forwarded."""

    def __init__(self) -> None:
        super().__init__()
        self.packets_accepted = self.counter(
            "gateway_packets_accepted", "Packets answered 2xx."
        )
        self.bytes_accepted = self.counter(
            "gateway_bytes_accepted", "Payload bytes of the packets answered 2xx."
        )
        self.packets_published = self.counter(
            "gateway_packets_published",
            "Packets RabbitMQ confirmed while their request waited.",
        )
        self.bytes_published = self.counter(
            "gateway_bytes_published",
            "Message bytes RabbitMQ confirmed on the request path.",
        )
        self.packets_buffered = self.counter(
            "gateway_packets_buffered", "Packets written to the outbox instead."
        )
        self.bytes_buffered = self.counter(
            "gateway_bytes_buffered", "Message bytes written to the outbox."
        )
        self.packets_forwarded = self.counter(
            "gateway_packets_forwarded",
            "Packets moved from the outbox to RabbitMQ (confirmed).",
        )
        self.bytes_forwarded = self.counter(
            "gateway_bytes_forwarded",
            "Message bytes moved from the outbox to RabbitMQ.",
        )
        self.outbox_packets = self.gauge(
            "gateway_outbox_packets", "Packets in the outbox."
        )
        self.outbox_bytes = self.gauge(
            "gateway_outbox_bytes",
            "Bytes the outbox holds on disk, counted against its quota: rows "
            "waiting, and rows forwarded but not deleted yet.",
        )
        self.outbox_quota_bytes = self.gauge(
            "gateway_outbox_quota_bytes", "The outbox's disk quota."
        )
        self.broker_link_up = self.gauge(
            "gateway_broker_link_up", "1 while the publishing link to RabbitMQ is up."
        )

    def watch(self, outbox: Outbox, publisher: ConfirmingPublisher) -> None:
        """Read the outbox depth and link state live, at each scrape."""
        self.outbox_packets.set_function(lambda: outbox.packets)
        self.outbox_bytes.set_function(lambda: outbox.bytes + outbox.forwarded_bytes)
        self.outbox_quota_bytes.set_function(lambda: outbox.quota_bytes)
        self.broker_link_up.set_function(lambda: 1.0 if publisher.link_up else 0.0)

    def record_accepted(self, packets: Sequence[Packet]) -> None:
        """Count one answered request's packets."""
        self.packets_accepted.inc(len(packets))
        self.bytes_accepted.inc(sum(len(packet.data) for packet in packets))

    def record_sent(self, messages: Sequence[Outgoing], *, buffered: bool) -> None:
        """Count messages confirmed by RabbitMQ, or kept in the outbox instead."""
        if not messages:
            return
        if buffered:
            self.packets_buffered.inc(_packet_count(messages))
            self.bytes_buffered.inc(_body_bytes(messages))
            ERRORS.labels("gateway", "publish_failed").inc(len(messages))
        else:
            self.packets_published.inc(_packet_count(messages))
            self.bytes_published.inc(_body_bytes(messages))

    def record_forwarded(
        self, messages: Sequence[Outgoing], results: Sequence[object]
    ) -> None:
        """Count one outbox drain batch: confirmed messages and failed ones."""
        confirmed = [
            message
            for message, result in zip(messages, results, strict=True)
            if result is None
        ]
        self.packets_forwarded.inc(_packet_count(confirmed))
        self.bytes_forwarded.inc(_body_bytes(confirmed))
        failed = len(messages) - len(confirmed)
        if failed:
            ERRORS.labels("gateway", "forward_failed").inc(failed)

    @staticmethod
    def error(kind: str) -> None:
        ERRORS.labels("gateway", kind).inc()


class WorkerMetrics(MetricGroup):
    """What the workers staged, assembled, stored and dead-lettered."""

    def __init__(self) -> None:
        super().__init__()
        self.packets_staged = self.counter(
            "worker_packets_staged", "Packets durably staged (duplicates excluded)."
        )
        self.bytes_staged = self.counter("worker_bytes_staged", "Payload bytes staged.")
        self.packets_duplicate = self.counter(
            "worker_packets_duplicate", "Packets already staged or for a finished file."
        )
        self.packets_dead_lettered = self.counter(
            "worker_packets_dead_lettered", "Packets sent to the dead-letter queue."
        )
        self.bytes_dead_lettered = self.counter(
            "worker_bytes_dead_lettered", "Message bytes sent to the dead-letter queue."
        )
        self.packets_assembled = self.counter(
            "worker_packets_assembled",
            "Packets put back together into finalized files.",
        )
        self.bytes_assembled = self.counter(
            "worker_bytes_assembled", "Bytes of the finalized files, stored or failed."
        )
        self.files_stored = self.counter(
            "worker_files_stored", "Files assembled, verified and stored.", ["type"]
        )
        self.bytes_stored = self.counter(
            "worker_bytes_stored", "Bytes of the files stored.", ["type"]
        )
        self.files_failed = self.counter(
            "worker_files_failed",
            "Files assembled that failed verification (bad SHA-256 or chunk).",
            ["type"],
        )
        self.files_expired = self.counter(
            "worker_files_expired", "Files marked expired after staying incomplete."
        )
        self.finalize_seconds = Histogram(
            "datahaul_worker_finalize_seconds",
            "Time to assemble, verify and store one complete file.",
            ["type"],
            buckets=FINALIZE_BUCKETS,
            registry=None,
        )
        self.members.append(self.finalize_seconds)

    def record_staged(self, outcomes: Sequence[StageOutcome]) -> None:
        """Count one staging transaction's outcomes (runs in the staging thread)."""
        staged = [o.packet for o in outcomes if o.status == "staged"]
        self.packets_staged.inc(len(staged))
        self.bytes_staged.inc(sum(len(packet.data) for packet in staged))
        self.packets_duplicate.inc(sum(1 for o in outcomes if o.status == "duplicate"))
        conflicts = sum(1 for o in outcomes if o.status == "conflict")
        if conflicts:
            ERRORS.labels("worker", "conflict").inc(conflicts)

    def record_dead_letter(self, body: bytes) -> None:
        self.packets_dead_lettered.inc()
        self.bytes_dead_lettered.inc(len(body))

    def record_finalized(self, done: Finalized) -> None:
        record = done.record
        size = record.size or 0
        self.packets_assembled.inc(record.total_seq)
        self.bytes_assembled.inc(size)
        self.finalize_seconds.labels(record.type).observe(done.duration)
        if done.state == "stored":
            self.files_stored.labels(record.type).inc()
            self.bytes_stored.labels(record.type).inc(size)
        else:
            self.files_failed.labels(record.type).inc()

    @staticmethod
    def error(kind: str, count: int = 1) -> None:
        ERRORS.labels("worker", kind).inc(count)


class CenterMetrics(MetricGroup):
    """The center API's own traffic; the pipeline's state comes from a collector."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = self.counter(
            "center_requests", "HTTP requests by route and status.", ["route", "status"]
        )
        self.bytes_served = self.counter(
            "center_bytes_served", "File content bytes sent to clients."
        )

    @staticmethod
    def error(kind: str) -> None:
        ERRORS.labels("center", kind).inc()


GATEWAY = GatewayMetrics()
WORKER = WorkerMetrics()
CENTER = CenterMetrics()

_registered: set[tuple[int, int]] = set()
_register_lock = threading.Lock()


def use(*groups: MetricGroup, registry: CollectorRegistry = REGISTRY) -> None:
    """Put the groups' metrics (and the shared error counter) into the registry.

    Safe to call again: a group already there is left alone.
    """
    with _register_lock:
        for collector in (ERRORS, *(c for g in groups for c in g.members)):
            key = (id(registry), id(collector))
            if key not in _registered:
                registry.register(collector)
                _registered.add(key)


def exposition(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The registry's metrics in Prometheus' text format."""
    return generate_latest(registry)


async def handle_metrics(request: web.Request) -> web.Response:
    """GET /metrics for an aiohttp app."""
    response = web.Response(body=exposition())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


def expose(app: web.Application, *groups: MetricGroup) -> None:
    """Register the groups and serve GET /metrics from the app."""
    use(*groups)
    app.router.add_get("/metrics", handle_metrics)


def serve_in_thread(host: str, port: int, *groups: MetricGroup) -> int:
    """Serve /metrics from a thread of its own; return the port (0 picks one).

    A thread keeps the scrape answering even while the process's event loop
    is busy, which is when the figures matter most.
    """
    use(*groups)
    server, _ = start_http_server(port, addr=host)
    bound: int = server.server_port
    log.info("metrics.listening", url=f"http://{host}:{bound}/metrics")
    return bound


def _packet_count(messages: Iterable[Outgoing]) -> int:
    return sum(max(1, len(message.keys)) for message in messages)


def _body_bytes(messages: Iterable[Outgoing]) -> int:
    return sum(len(message.body) for message in messages)
