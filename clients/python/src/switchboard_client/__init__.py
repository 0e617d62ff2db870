"""Switchboard's Python client: a thin, typed layer over the generated gRPC stubs.

The generated modules are importable as `switchboard.v1.*` (`broker_pb2`, `entity_pb2`,
`reason_pb2`, ...); this package returns their messages unchanged.
"""

from .client import Client, EntityWatch, Publish, StreamResult, Subscription, connect
from .errors import SwitchboardError, reason_enum, status_code
from .retry import Backoff, RetryPolicy, retry_after

__all__ = [
    "Backoff",
    "Client",
    "EntityWatch",
    "Publish",
    "RetryPolicy",
    "StreamResult",
    "Subscription",
    "SwitchboardError",
    "connect",
    "reason_enum",
    "retry_after",
    "status_code",
]
