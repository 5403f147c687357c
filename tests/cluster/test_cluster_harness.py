"""The cluster harness itself: membership, replication factor, clean failure."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from cluster.cluster_checks import declare_through
from datahaul.broker import topology
from datahaul.config import Settings
from datahaul.faults import HarnessError
from datahaul.faults.cluster import RabbitCluster
from datahaul.faults.processes import run_coroutine
from datahaul.faults.rabbit import reset_topology


def test_three_nodes_form_one_cluster_beside_the_machines_broker(
    whole_cluster: RabbitCluster,
) -> None:
    """Three nodes of the harness run as one cluster, on ports other than 5672."""
    status = json.loads(whole_cluster.ctl(2, "cluster_status", "--formatter", "json"))

    assert sorted(status["running_nodes"]) == sorted(
        node.nodename for node in whole_cluster.nodes
    )
    assert all(node.accepts() for node in whole_cluster.nodes)
    assert 5672 not in {node.amqp_port for node in whole_cluster.nodes}


def test_quorum_group_size_sets_how_many_nodes_hold_each_queue(
    whole_cluster: RabbitCluster,
) -> None:
    """By default every node holds a queue; quorum_group_size=2 makes it two."""
    members = replicas(whole_cluster)
    assert set(members.values()) == {3}

    url = whole_cluster.first.url()
    run_coroutine(reset_topology(url))
    run_coroutine(declare_through(url, Settings(quorum_group_size=2)))

    members = replicas(whole_cluster)
    assert set(members) == {*topology.QUEUES.values(), topology.DEAD_QUEUE}
    assert set(members.values()) == {2}


def replicas(cluster: RabbitCluster) -> dict[str, int]:
    rows = cluster.list_queues("/", "name", "members")
    return {row["name"]: len(row["members"]) for row in rows}


def test_a_cluster_that_cannot_boot_is_removed_entirely(tmp_path: Path) -> None:
    """A node that fails to boot raises HarnessError and leaves no node running."""
    cluster = RabbitCluster(tmp_path / "broken", size=2)
    taken = cluster.nodes[1].amqp_port
    with socket.create_server(("127.0.0.1", taken)), pytest.raises(HarnessError):
        cluster.start()

    assert [node.process for node in cluster.nodes] == [None, None]
    for node in cluster.nodes:
        found = subprocess.run(
            ["pgrep", "-f", node.name], capture_output=True, text=True, check=False
        )
        assert found.stdout == "", f"{node.nodename} still runs: {found.stdout}"
