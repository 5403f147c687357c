"""Losing a RabbitMQ node in the middle of transfers loses and duplicates nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster.cluster_checks import (
    HostDirs,
    Robots,
    assert_stored_once,
    dead_letters,
    gateway_health,
    make_sources,
    sent_files,
    wait_outbox_empty,
)
from datahaul.faults.cluster import ClusterNode, RabbitCluster
from datahaul.faults.processes import ServiceProcess

pytestmark = pytest.mark.timeout(240)

FILES_PER_ROBOT = 6
ROBOTS = 2
PROCESS_NODE = 1
# Seconds; aiormq gives up on a silent peer after (heartbeat + 1) x 3.
HEARTBEAT = 4


def wait_for(
    condition: Callable[[], ClusterNode | None], what: str, within: float = 30.0
) -> ClusterNode:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = condition()
        if found is not None:
            return found
        time.sleep(0.3)
    raise AssertionError(f"{what} did not happen within {within:g}s")


def connected_node(cluster: RabbitCluster, prefix: str) -> ClusterNode | None:
    return cluster.node_of_connection(prefix)


async def test_files_arrive_once_when_the_queue_leader_stops(
    whole_cluster: RabbitCluster,
    gateway_factory: Callable[..., ServiceProcess],
    worker_factory: Callable[..., ServiceProcess],
    host_dirs: HostDirs,
    fresh_pg_url: str,
    shared_store: Path,
    tmp_path: Path,
) -> None:
    """Stopping the node leading every queue mid-transfer loses and doubles nothing."""
    cluster = whole_cluster
    leader = cluster.queue_leader("video_data_queue")
    gateway = gateway_factory()
    for _ in range(2):
        worker_factory("all", env=host_dirs.env())
    assert connected_node(cluster, "datahaul-gateway") is not leader

    sources = make_sources(tmp_path / "robot", FILES_PER_ROBOT * ROBOTS, seed=1)
    robots = Robots(gateway.url or "", [sources[i::ROBOTS] for i in range(ROBOTS)])

    async def stop_leader() -> None:
        await asyncio.to_thread(cluster.stop_node, leader)

    results = await robots.run(fault=stop_leader, after=3)

    assert robots.files_done_at_fault is not None
    assert robots.files_done_at_fault < robots.total
    new_leader = cluster.wait_for_leader("video_data_queue", not_on=leader)
    assert new_leader.is_running
    assert_stored_once(
        fresh_pg_url, sent_files(sources, results), shared_store / "staging"
    )
    print("HEALTH", wait_outbox_empty(gateway.url or ""))
    assert await dead_letters(new_leader.url()) == 0


async def test_gateway_and_worker_move_when_their_node_stops_and_returns(
    whole_cluster: RabbitCluster,
    gateway_factory: Callable[..., ServiceProcess],
    worker_factory: Callable[..., ServiceProcess],
    host_dirs: HostDirs,
    fresh_pg_url: str,
    shared_store: Path,
    tmp_path: Path,
) -> None:
    """A gateway and the only worker, on a node that stops and comes back,
    carry on through other nodes and every file still arrives exactly once."""
    cluster = whole_cluster
    gateway = gateway_factory()
    worker_factory("all", env=host_dirs.env())
    their_node = wait_for(
        lambda: connected_node(cluster, "datahaul-gateway"), "gateway connected"
    )
    assert connected_node(cluster, "datahaul-worker") is their_node
    assert their_node is not cluster.queue_leader("video_data_queue")

    first = make_sources(tmp_path / "before", FILES_PER_ROBOT * ROBOTS, seed=2)
    robots = Robots(gateway.url or "", [first[i::ROBOTS] for i in range(ROBOTS)])

    async def stop_their_node() -> None:
        await asyncio.to_thread(cluster.stop_node, their_node)

    results = await robots.run(fault=stop_their_node, after=3)
    assert robots.files_done_at_fault is not None
    assert robots.files_done_at_fault < robots.total

    def moved(prefix: str) -> Callable[[], ClusterNode | None]:
        def elsewhere() -> ClusterNode | None:
            node = connected_node(cluster, prefix)
            return node if node is not None and node is not their_node else None

        return elsewhere

    wait_for(moved("datahaul-gateway"), "gateway reconnected elsewhere")
    wait_for(moved("datahaul-worker"), "worker reconnected elsewhere")
    assert_stored_once(
        fresh_pg_url, sent_files(first, results), shared_store / "staging"
    )

    await asyncio.to_thread(cluster.start_node, their_node)
    after = make_sources(tmp_path / "after", 4, seed=3)
    later = await Robots(gateway.url or "", [after]).run()

    assert_stored_once(fresh_pg_url, sent_files(after, later), shared_store / "staging")
    print("HEALTH", wait_outbox_empty(gateway.url or ""))
    assert await dead_letters(cluster.first.url()) == 0


async def test_gateway_leaves_a_node_that_hangs(
    whole_cluster: RabbitCluster,
    gateway_factory: Callable[..., ServiceProcess],
    worker_factory: Callable[..., ServiceProcess],
    host_dirs: HostDirs,
    fresh_pg_url: str,
    shared_store: Path,
    tmp_path: Path,
) -> None:
    """When the gateway's node stops answering, unconfirmed packets go to the
    outbox, the gateway moves to another node, and every file arrives once."""
    cluster = whole_cluster
    hanging, worker_node = cluster.nodes[PROCESS_NODE], cluster.nodes[2]
    gateway = gateway_factory()
    worker_factory(
        "all",
        env={
            **host_dirs.env(),
            "DATAHAUL_AMQP_URL": cluster.amqp_url(first=worker_node),
        },
    )
    assert connected_node(cluster, "datahaul-gateway") is hanging
    assert connected_node(cluster, "datahaul-worker") is worker_node

    sources = make_sources(tmp_path / "robot", FILES_PER_ROBOT * ROBOTS, seed=4)
    robots = Robots(gateway.url or "", [sources[i::ROBOTS] for i in range(ROBOTS)])

    async def hang_then_recover() -> None:
        cluster.freeze_node(hanging)
        try:
            await asyncio.to_thread(wait_buffered_and_relinked, gateway.url or "")
        finally:
            cluster.thaw_node(hanging)

    results = await robots.run(fault=hang_then_recover, after=3)

    assert_stored_once(
        fresh_pg_url, sent_files(sources, results), shared_store / "staging"
    )
    health = wait_outbox_empty(gateway.url or "")
    assert health["broker"] == "up"
    assert await dead_letters(cluster.first.url()) == 0


def wait_buffered_and_relinked(gateway_url: str, within: float = 60.0) -> None:
    """Wait until the gateway has buffered packets and has a broker link again."""
    deadline = time.monotonic() + within
    health = gateway_health(gateway_url)
    while time.monotonic() < deadline:
        counters = health.get("counters")
        buffered = counters.get("buffered", 0) if isinstance(counters, dict) else 0
        if buffered and health.get("broker") == "up":
            return
        time.sleep(0.2)
        health = gateway_health(gateway_url)
    raise AssertionError(f"gateway did not buffer and relink in {within:g}s: {health}")


async def test_worker_with_a_short_heartbeat_leaves_a_node_that_hangs(
    whole_cluster: RabbitCluster,
    gateway_factory: Callable[..., ServiceProcess],
    worker_factory: Callable[..., ServiceProcess],
    host_dirs: HostDirs,
    fresh_pg_url: str,
    shared_store: Path,
    tmp_path: Path,
) -> None:
    """The only worker, on a node that hangs, notices by its AMQP heartbeat
    (heartbeat=4 in its URLs), moves to another node, and no file is lost."""
    cluster = whole_cluster
    hanging = cluster.nodes[PROCESS_NODE]
    gateway = gateway_factory(
        env={"DATAHAUL_AMQP_URL": cluster.amqp_url(first=cluster.nodes[2])}
    )
    urls = [f"{url}?heartbeat={HEARTBEAT}" for url in cluster.urls(first=hanging)]
    worker = worker_factory(
        "all", env={**host_dirs.env(), "DATAHAUL_AMQP_URL": ",".join(urls)}
    )
    assert connected_node(cluster, "datahaul-worker") is hanging

    sources = make_sources(tmp_path / "robot", FILES_PER_ROBOT * ROBOTS, seed=6)
    robots = Robots(gateway.url or "", [sources[i::ROBOTS] for i in range(ROBOTS)])

    async def hang_until_the_worker_moves() -> None:
        cluster.freeze_node(hanging)
        try:
            await asyncio.to_thread(wait_log_count, worker, "worker.consuming", 2)
        finally:
            cluster.thaw_node(hanging)

    results = await robots.run(fault=hang_until_the_worker_moves, after=3)

    assert_stored_once(
        fresh_pg_url, sent_files(sources, results), shared_store / "staging"
    )
    wait_outbox_empty(gateway.url or "")
    assert await dead_letters(cluster.first.url()) == 0


def wait_log_count(
    process: ServiceProcess, event: str, count: int, within: float = 60.0
) -> None:
    """Wait until the process has logged event at least count times."""
    deadline = time.monotonic() + within
    while process.log_path.read_text().count(event) < count:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{process.name} logged {event} fewer than {count} times in "
                f"{within:g}s:\n{process.log_tail()}"
            )
        time.sleep(0.2)
