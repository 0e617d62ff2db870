"""The circuit breaker of a broker endpoint, as in the Rust client (docs/CLIENT-RESILIENCE.md).

After `failure_threshold` endpoint failures in a row, publishes fail fast with `CircuitOpenError`
for `cooldown` seconds instead of each waiting on a broker that is down; then one call goes through
as a probe, and its outcome closes the circuit (an answer) or opens it for another cooldown (a
failure). While the probe is out, every other call fails fast.

Only failures that say the endpoint is unhealthy count (a lost connection, `NO_LEADER`, ...: see
`is_endpoint_failure`); any answer from the broker, a refusal of the message included, is a
success here. State changes are logged (logger `switchboard_client.circuit`: a warning when it
opens, info when it half-opens and closes) and `Client.circuit_state()` reads the state.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import CircuitOpenError, SwitchboardError
from .retry import is_endpoint_failure

log = logging.getLogger("switchboard_client.circuit")


@dataclass(frozen=True)
class CircuitPolicy:
    """When the circuit opens and for how long. Defaults as in the Rust client: 5 endpoint
    failures in a row open it for 5 seconds."""

    failure_threshold: int = 5
    cooldown: float = 5.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            object.__setattr__(self, "failure_threshold", 1)


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """One endpoint's breaker, shared by every publish of a `Client` (threads included).

    `admit()` lets a call through (returning a `Permit`) or raises `CircuitOpenError`; the caller
    must then `record` the call's outcome. A probe whose permit is released unrecorded (its caller
    died on an exception that is not a `SwitchboardError`) lets the next call probe.
    `clock` is a seam for tests of the state machine.
    """

    def __init__(
        self,
        target: str,
        policy: CircuitPolicy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._open_until = 0.0
        self.consecutive_failures = 0

    @property
    def state(self) -> CircuitState:
        """The state as calls last left it: an open circuit whose cooldown is over reads `OPEN`
        until the next call, which becomes the probe."""
        with self._lock:
            return self._state

    def admit(self) -> "Permit":
        with self._lock:
            now = self._clock()
            if self._state is CircuitState.CLOSED:
                return Permit(self, probe=False)
            if self._state is CircuitState.OPEN and now >= self._open_until:
                self._state = CircuitState.HALF_OPEN
                log.info(
                    "circuit half open: letting one probe through",
                    extra={"target": self.target, "state": CircuitState.HALF_OPEN.value},
                )
                return Permit(self, probe=True)
            retry_in = max(0.0, self._open_until - now) if self._state is CircuitState.OPEN else 0.0
            raise CircuitOpenError(self.target, retry_in)

    def _succeeded(self) -> None:
        with self._lock:
            self.consecutive_failures = 0
            if self._state is not CircuitState.CLOSED:
                self._state = CircuitState.CLOSED
                log.info(
                    "circuit closed: the broker answers again",
                    extra={"target": self.target, "state": CircuitState.CLOSED.value},
                )

    def _failed(self, probe: bool, error: SwitchboardError) -> None:
        with self._lock:
            self.consecutive_failures += 1
            if self._state is CircuitState.HALF_OPEN:
                opens = probe
            elif self._state is CircuitState.CLOSED:
                opens = self.consecutive_failures >= self.policy.failure_threshold
            else:
                # Already open: a call admitted before it opened does not extend the cooldown.
                opens = False
            if opens:
                self._state = CircuitState.OPEN
                self._open_until = self._clock() + self.policy.cooldown
                log.warning(
                    "circuit open: failing calls fast for %.3fs after %d failures: %s",
                    self.policy.cooldown,
                    self.consecutive_failures,
                    error,
                    extra={"target": self.target, "state": CircuitState.OPEN.value},
                )

    def _abandoned(self) -> None:
        with self._lock:
            if self._state is CircuitState.HALF_OPEN:
                self._state = CircuitState.OPEN
                self._open_until = self._clock()


class Permit:
    """Leave to make one call; `record` its outcome, or use it as a context manager around it."""

    def __init__(self, breaker: CircuitBreaker, probe: bool) -> None:
        self._breaker = breaker
        self.probe = probe
        self._recorded = False

    def record(self, error: Optional[SwitchboardError]) -> None:
        """`None` for an answer from the broker; else the call's error."""
        self._recorded = True
        if error is not None and is_endpoint_failure(error):
            self._breaker._failed(self.probe, error)
        else:
            self._breaker._succeeded()

    def release(self) -> None:
        """Ends the permit; a probe not recorded lets the next call probe."""
        if self.probe and not self._recorded:
            self._breaker._abandoned()
