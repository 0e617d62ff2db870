"""Switchboard's Python client: a thin, typed layer over the generated gRPC stubs.

The generated modules are importable as `switchboard.v1.*` (`broker_pb2`, `entity_pb2`,
`reason_pb2`, ...); this package returns their messages unchanged.
"""

from .circuit import CircuitBreaker, CircuitPolicy, CircuitState
from .client import Client, EntityWatch, Publish, StreamResult, Subscription, connect
from .errors import (
    CircuitOpenError,
    ClosedError,
    OutboxFullError,
    OutboxStorageError,
    SwitchboardError,
    reason_enum,
    status_code,
)
from .outbox import Outbox, OutboxOptions, OutboxReceipt
from .retry import Backoff, RetryPolicy, is_endpoint_failure, retry_after

__all__ = [
    "Backoff",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitPolicy",
    "CircuitState",
    "Client",
    "ClosedError",
    "EntityWatch",
    "Outbox",
    "OutboxFullError",
    "OutboxOptions",
    "OutboxReceipt",
    "OutboxStorageError",
    "Publish",
    "RetryPolicy",
    "StreamResult",
    "Subscription",
    "SwitchboardError",
    "connect",
    "is_endpoint_failure",
    "reason_enum",
    "retry_after",
    "status_code",
]
