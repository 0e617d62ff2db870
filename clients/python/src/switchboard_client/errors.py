"""Refusals and failures as one exception type that carries the broker's reason.

The broker puts a `google.rpc.ErrorInfo` (domain `switchboard`) in every refusal's status
details; grpcio alone exposes only the code and the message text, so the details are read with
grpcio-status. A `PublishStream` refusal arrives as a `Refusal` message instead of a status and is
turned into the same exception type, so callers handle both alike.
"""

from __future__ import annotations

from typing import Mapping, Optional

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from switchboard.v1 import broker_pb2, reason_pb2

DOMAIN = "switchboard"

# grpc.StatusCode values are (number, name) pairs; a Refusal carries the number alone.
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The `grpc.StatusCode` for a `google.rpc.Code` number (UNKNOWN for a number grpc lacks)."""
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def reason_enum(reason: Optional[str]) -> int:
    """The `switchboard.v1.ErrorReason` value for a wire reason string.

    `ERROR_REASON_UNSPECIFIED` (0) for no reason and for a reason newer than these stubs: a broker
    may add reasons, and the string (kept on the exception) still says which.
    """
    if not reason:
        return reason_pb2.ERROR_REASON_UNSPECIFIED
    try:
        return reason_pb2.ErrorReason.Value("ERROR_REASON_" + reason)
    except ValueError:
        return reason_pb2.ERROR_REASON_UNSPECIFIED


class SwitchboardError(Exception):
    """A call the broker refused, or one that failed on the way to it.

    `code` is the gRPC status code; `reason` the broker's stable reason string (`CHANNEL_INVALID`,
    `NO_LEADER`, ...) or `None` when the failure did not come from the broker (a lost connection,
    a deadline); `reason_enum` the same as a `switchboard.v1.ErrorReason` value; `metadata` the
    ErrorInfo metadata (`current_version`, `leader_id`, `retry_after_ms`, `next_offset`, ...).
    Switch on `reason`, never on `message`.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: Optional[str] = None,
        metadata: Optional[Mapping[str, str]] = None,
    ) -> None:
        super().__init__(f"{code.name}{' ' + reason if reason else ''}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})

    @property
    def reason_enum(self) -> int:
        return reason_enum(self.reason)

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> "SwitchboardError":
        """Decodes a grpcio error, its ErrorInfo included when the broker sent one."""
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        message = err.details() if hasattr(err, "details") else str(err)
        reason = None
        metadata: dict[str, str] = {}
        try:
            status = rpc_status.from_call(err)  # type: ignore[arg-type]
        except ValueError:
            # The details trailer disagrees with the status line: keep the code and text.
            status = None
        for detail in status.details if status is not None else []:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                if info.domain == DOMAIN:
                    reason = info.reason
                    metadata = dict(info.metadata)
                    break
        return cls(code or grpc.StatusCode.UNKNOWN, message or "", reason, metadata)

    @classmethod
    def from_refusal(cls, refusal: broker_pb2.Refusal) -> "SwitchboardError":
        """A refused message of a `PublishStream`, as the unary call would have raised it."""
        return cls(
            status_code(refusal.code),
            refusal.message,
            refusal.reason or None,
            dict(refusal.metadata),
        )


class CircuitOpenError(SwitchboardError):
    """The client's circuit breaker is open: the call was not sent (code UNAVAILABLE, no reason).

    `retry_in` is how long, in seconds, until the circuit lets a probe through (0 while a probe is
    out already). Never retried by a `RetryPolicy`: failing fast is the point; an `Outbox` waits
    the cooldown out.
    """

    def __init__(self, target: str, retry_in: float) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            f"circuit open for {target}: failing fast, a probe in {retry_in:.3f}s",
        )
        self.target = target
        self.retry_in = retry_in


class OutboxFullError(SwitchboardError):
    """Queueing the message would pass the outbox's bounds: nothing was queued (code
    RESOURCE_EXHAUSTED, no reason). Never retried."""

    def __init__(self, messages: int, size: int, max_messages: int, max_bytes: int) -> None:
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"outbox full: {messages} messages, {size} bytes queued "
            f"(bounds {max_messages} messages, {max_bytes} bytes)",
        )
        self.messages = messages
        self.bytes = size
        self.max_messages = max_messages
        self.max_bytes = max_bytes


class ClosedError(SwitchboardError):
    """The outbox (or stream) was closed before the broker answered for this message."""

    def __init__(self, what: str = "closed before the broker answered") -> None:
        super().__init__(grpc.StatusCode.CANCELLED, what)


class OutboxStorageError(SwitchboardError):
    """An on-disk outbox could not read or write its file, or another outbox (in this process or
    another, Python or Rust) holds its lock (code INTERNAL, no reason). For a publish: the message
    was not queued. Never retried. `path` is the file, `detail` what failed and the system's
    error."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(grpc.StatusCode.INTERNAL, f"the outbox file {path}: {detail}")
        self.path = path
        self.detail = detail
