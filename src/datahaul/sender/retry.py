"""When to try a request again, and how long to wait first.

A 4xx means the packet is wrong: sending it again cannot help. A 503 (or 429)
with Retry-After means the gateway is alive but full: it says when to come
back, and that wait has its own, longer budget. Anything else that is not a
success (another 5xx, a refused or dropped connection, a timeout) is retried
with exponential backoff and jitter, so that many robots reconnecting after an
outage do not all knock at once, and a bounded number of times.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from datahaul.errors import ConfigError


class Outcome(enum.Enum):
    SUCCESS = "success"
    REJECTED = "rejected"
    BUSY = "busy"
    TRANSIENT = "transient"


def classify(status: int | None, retry_after: str | None = None) -> Outcome:
    """What an answer means for the request; None stands for no answer at all."""
    if status is None:
        return Outcome.TRANSIENT
    if 200 <= status < 300:
        return Outcome.SUCCESS
    if status in (429, 503) and retry_after is not None:
        return Outcome.BUSY
    if status == 408 or status >= 500:
        return Outcome.TRANSIENT
    return Outcome.REJECTED


def parse_retry_after(value: str, *, now: datetime | None = None) -> float | None:
    """Seconds a Retry-After header asks for (seconds or a date); None if unreadable."""
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one request tries before its file is given up."""

    attempts: int = 8
    base_delay: float = 0.25
    max_delay: float = 15.0
    max_retry_after: float = 60.0
    max_busy_wait: float = 600.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"retry attempts must be at least 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ConfigError(
                "retry delays must satisfy 0 <= base_delay <= max_delay, got "
                f"base_delay={self.base_delay} max_delay={self.max_delay}"
            )

    def backoff(self, failures: int, rng: random.Random) -> float:
        """The wait after the n-th failure: doubling, capped, half of it random."""
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** (failures - 1))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)

    def start(self, rng: random.Random | None = None) -> RetryBudget:
        return RetryBudget(self, rng or random.Random())


@dataclass
class RetryBudget:
    """What one request has spent of its policy so far."""

    policy: RetryPolicy
    rng: random.Random
    attempts_made: int = 0
    failures: int = 0
    busy_waited: float = field(default=0.0)

    def next_delay(self, status: int | None, retry_after: str | None) -> float | None:
        """Seconds to wait before trying again, or None when it must not be retried.

        Call it once per failed attempt, with the answer's status (None when
        there was no answer) and its Retry-After header.
        """
        self.attempts_made += 1
        outcome = classify(status, retry_after)
        if outcome is Outcome.BUSY:
            return self._busy_delay(retry_after or "")
        if outcome is Outcome.TRANSIENT:
            return self._transient_delay()
        return None

    def _busy_delay(self, retry_after: str) -> float | None:
        asked = parse_retry_after(retry_after)
        if asked is None:
            return self._transient_delay()
        delay = min(asked, self.policy.max_retry_after)
        if self.busy_waited + delay > self.policy.max_busy_wait:
            return None
        self.busy_waited += delay
        return delay

    def _transient_delay(self) -> float | None:
        self.failures += 1
        if self.failures >= self.policy.attempts:
            return None
        return self.policy.backoff(self.failures, self.rng)
