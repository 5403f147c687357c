"""Fault injection for tests and soak runs: a broker proxy, broker restarts, processes.

Everything here acts on this machine only: the proxy forwards to a loopback
address, the broker helpers drive the local RabbitMQ with rabbitmqctl, and
the processes are datahaul commands started with the current interpreter.
"""

from __future__ import annotations

from datahaul.errors import DatahaulError


class HarnessError(DatahaulError):
    """Raised when the fault harness cannot set up or undo a fault."""


__all__ = ["HarnessError"]
