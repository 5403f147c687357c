"""Processes take the cluster's nodes as repeated --amqp-url flags."""

from __future__ import annotations

import subprocess
import sys

from datahaul.broker import topology
from datahaul.faults.cluster import RabbitCluster
from datahaul.faults.processes import child_environment, free_port, run_coroutine
from datahaul.faults.rabbit import reset_topology


def test_repeated_amqp_url_flags_reach_a_live_node_past_a_dead_one(
    whole_cluster: RabbitCluster,
) -> None:
    """`datahaul topology` given one --amqp-url per node uses them all, in order."""
    run_coroutine(reset_topology(whole_cluster.first.url()))
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "datahaul",
            "topology",
            "--amqp-url",
            dead,
            "--amqp-url",
            whole_cluster.nodes[2].url(),
            "--amqp-url",
            dead,
        ],
        env=child_environment({}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    declared = {row["name"] for row in whole_cluster.list_queues("/", "name")}
    assert declared == {*topology.QUEUES.values(), topology.DEAD_QUEUE}
