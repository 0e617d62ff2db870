"""When a failed publish may be sent again, and how long to wait first.

The same policy as the Rust client's (docs/CLIENT-RESILIENCE.md): off unless asked for; under a
policy, retryable failures are retried with exponential backoff and full jitter until a deadline,
and every attempt carries the same idempotency key, so a retry of a message that was in fact stored
is answered `duplicate` with its original offset instead of being stored twice.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar

import grpc

from .errors import (
    CircuitOpenError,
    ClosedError,
    OutboxFullError,
    OutboxStorageError,
    SwitchboardError,
)

T = TypeVar("T")

# UNAVAILABLE reasons after which nothing, or at most this message (deduplicated by its key), was
# written, and a later attempt can succeed.
_RETRYABLE_UNAVAILABLE = frozenset(
    {"NO_LEADER", "NOT_LEADER", "LEADER_UNREACHABLE", "NO_QUORUM", "SHUTTING_DOWN"}
)
# Codes grpcio reports, with no broker reason, when the way to the broker failed (refused or reset
# connection, a broken HTTP/2 stream, a transport deadline).
_TRANSPORT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


def retry_after(error: SwitchboardError) -> Optional[float]:
    """The least wait, in seconds, before `error`'s publish may be tried again; `None` never.

    Validation, grants, schemas, loops, a full disk and UNAVAILABLE reasons this client does not
    know are never retried: the same message would get the same answer. Neither are the client's
    own refusals (an open circuit, a full outbox, a closed outbox, an outbox file that cannot be
    written: INTERNAL with no reason, which would otherwise look like a transport failure).
    """
    if isinstance(error, (CircuitOpenError, OutboxFullError, OutboxStorageError, ClosedError)):
        return None
    if error.reason is None:
        return 0.0 if error.code in _TRANSPORT_CODES else None
    if error.code == grpc.StatusCode.UNAVAILABLE and error.reason in _RETRYABLE_UNAVAILABLE:
        return 0.0
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "RATE_LIMITED":
        try:
            return int(error.metadata["retry_after_ms"]) / 1000.0
        except (KeyError, ValueError):
            return 1.0
    return None


def is_endpoint_failure(error: SwitchboardError) -> bool:
    """Whether `error` says the broker endpoint is unhealthy (counted by the circuit breaker):
    retryable, and not a rate limit (the broker answered that one)."""
    if retry_after(error) is None:
        return False
    return not (error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "RATE_LIMITED")


@dataclass
class Backoff:
    """Exponential backoff: the base starts at `initial` and doubles up to `maximum`.

    `next_delay` draws from `[0, base]` (full jitter, for publishes) or, with `equal=True`, from
    `[base / 2, base]` (for subscriptions resuming, which should not come back at once).
    """

    initial: float
    maximum: float
    equal: bool = False
    rng: Callable[[], float] = random.random
    _base: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.maximum = max(self.maximum, self.initial)
        self._base = self.initial

    def next_delay(self) -> float:
        base = self._base
        self._base = min(base * 2, self.maximum)
        if self.equal:
            return base / 2 + self.rng() * base / 2
        return self.rng() * base

    def reset(self) -> None:
        self._base = self.initial


@dataclass
class RetryPolicy:
    """How long to keep retrying a publish.

    `deadline` (seconds) counts from the first attempt: no new attempt starts after it, and the
    caller then gets the last attempt's error unchanged. An attempt that has started is not cut
    short. Defaults as in the Rust client: 50 ms doubling to 2 s, full jitter.
    """

    deadline: float
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    # Seams for tests of the schedule; real callers leave them.
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    rng: Callable[[], float] = random.random

    @classmethod
    def within(cls, deadline: float) -> "RetryPolicy":
        return cls(deadline=deadline)

    def backoff(self) -> Backoff:
        return Backoff(self.initial_backoff, self.max_backoff, rng=self.rng)

    def run(self, attempt: Callable[[], T]) -> T:
        """Calls `attempt` until it returns, raises a non-retryable error, or the deadline passes."""
        started = self.clock()
        backoff = self.backoff()
        while True:
            try:
                return attempt()
            except SwitchboardError as error:
                least = retry_after(error)
                if least is None:
                    raise
                delay = max(least, backoff.next_delay())
                if self.clock() + delay > started + self.deadline:
                    raise
                self.sleep(delay)

