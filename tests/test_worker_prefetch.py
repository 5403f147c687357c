"""How many unacked messages RabbitMQ may hand a worker, per queue."""

from __future__ import annotations

import subprocess
import time

import pytest

from datahaul.config import Settings
from datahaul.errors import ConfigError


def _consumer_prefetch(vhost: str) -> dict[str, int]:
    columns = ["queue_name", "prefetch_count", "--no-table-headers"]
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_consumers", "-p", vhost, *columns],
        capture_output=True,
        text=True,
        check=True,
    )
    counts = {}
    for line in listed.stdout.splitlines():
        queue, prefetch = line.split()
        counts[queue] = int(prefetch)
    return counts


def test_large_data_queues_get_the_smaller_prefetch(
    worker_factory, broker_vhost: str
) -> None:
    """Text consumers may hold DATAHAUL_PREFETCH messages; image and video
    ones, whose messages are up to 2 MiB each, DATAHAUL_LARGE_PREFETCH."""
    limits = {"DATAHAUL_PREFETCH": "24", "DATAHAUL_LARGE_PREFETCH": "6"}
    worker_factory("all", env=limits)

    deadline = time.monotonic() + 10
    while len(counts := _consumer_prefetch(broker_vhost)) < 3:
        assert time.monotonic() < deadline, counts
        time.sleep(0.2)

    assert counts == {
        "text_data_queue": 24,
        "image_data_queue": 6,
        "video_data_queue": 6,
    }


@pytest.mark.parametrize("name", ["PREFETCH", "LARGE_PREFETCH"])
def test_a_prefetch_of_zero_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """RabbitMQ reads 0 as no limit at all: the setting refuses it by name."""
    monkeypatch.setenv(f"DATAHAUL_{name}", "0")

    with pytest.raises(ConfigError, match=f"DATAHAUL_{name} must be at least 1"):
        Settings.load()
