"""`Outbox`: a bounded, in-memory queue of messages that a thread of its own publishes in order,
retrying each until the broker takes or refuses it; the Rust client's `Outbox`
(docs/CLIENT-RESILIENCE.md).

One queue for everything, not only for what failed: a message queued during an outage must not be
overtaken by one published after the broker came back. Bounded by count and by bytes (each message
counted as its encoded request): over either, `publish` raises `OutboxFullError` and queues
nothing. Every message carries an idempotency key (the caller's or a generated UUID) and is resent
with it, so it is stored once, provided the broker comes back within its `loops.dedup_window` (2
minutes by default) of a send whose fate was unknown. `Client.outbox` keeps it in memory only: it
dies with the process. `Client.outbox_on_disk` also keeps it in a file (outbox_file.py) that is
replayed when the outbox is opened again.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Deque, Iterable, Optional, Union

from switchboard.v1 import broker_pb2

from .errors import CircuitOpenError, ClosedError, OutboxFullError, SwitchboardError
from .retry import Backoff, retry_after

if TYPE_CHECKING:
    from .client import Client, Publish
    from .outbox_file import Journal

log = logging.getLogger("switchboard_client.outbox")


@dataclass(frozen=True)
class OutboxOptions:
    """The bounds of an outbox and the pace of its resends (seconds). Defaults as in the Rust
    client: 10 000 messages, 16 MiB, backoff 50 ms doubling to 2 s with full jitter."""

    max_messages: int = 10_000
    max_bytes: int = 16 * 1024 * 1024
    initial_backoff: float = 0.05
    max_backoff: float = 2.0


class OutboxReceipt:
    """What `Outbox.publish` returns: the message's `idempotency_key` at once, and `result()` (the
    broker's `PublishAck`, or raises the refusal that dropped it, or `ClosedError`)."""

    def __init__(self, idempotency_key: str) -> None:
        self.idempotency_key = idempotency_key
        self._future: "concurrent.futures.Future[broker_pb2.PublishAck]" = (
            concurrent.futures.Future()
        )

    def result(self, timeout: Optional[float] = None) -> broker_pb2.PublishAck:
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()


@dataclass
class _Entry:
    request: broker_pb2.PublishRequest
    size: int
    receipt: OutboxReceipt


class Outbox:
    """A bounded queue in front of `Client.publish`, flushed in order by a daemon thread through
    the client's circuit breaker (if it has one), with backoff and full jitter between resends (at
    least the circuit's `retry_in`, or a rate limit's wait). See `Client.outbox`.

    `close()` (or leaving a `with` block) stops the thread; receipts still waiting get
    `ClosedError`. Call `flushed()` first to wait for everything queued. An on-disk outbox
    (`Client.outbox_on_disk`) also closes its file and releases its lock then; what was not
    answered stays in the file for the next outbox opened on it.
    """

    def __init__(
        self,
        client: "Client",
        options: OutboxOptions,
        journal: Optional["Journal"] = None,
        replayed: Iterable[broker_pb2.PublishRequest] = (),
    ) -> None:
        self._client = client
        self.options = options
        self._lock = threading.Condition()
        self._entries: Deque[_Entry] = collections.deque()
        self._bytes = 0
        self._closed = False
        self._journal = journal
        # Replayed messages are all queued, even past the bounds (they are never dropped); nobody
        # holds their receipts: `flushed()` says when they are gone.
        for request in replayed:
            size = request.ByteSize()
            self._entries.append(_Entry(request, size, OutboxReceipt(request.idempotency_key)))
            self._bytes += size
        self._thread = threading.Thread(target=self._flush, name="switchboard-outbox", daemon=True)
        self._thread.start()

    def publish(
        self, message: Union["Publish", broker_pb2.PublishRequest, str], payload: Any = b"", **fields: Any
    ) -> OutboxReceipt:
        """Queues a message at once (`Publish`, a `PublishRequest`, or `channel, payload, **fields`
        as for `Client.publish`). Raises `OutboxFullError` when it would pass a bound,
        `OutboxStorageError` when an on-disk outbox cannot write it to its file (nothing queued
        either way), and `ClosedError` after `close()`.

        An on-disk outbox appends the message to its file and waits for `fdatasync` before this
        returns (about a millisecond on a local disk): a message it says is queued survives the
        process."""
        from .client import Publish

        if isinstance(message, str):
            message = Publish(message, payload, **fields)
        if isinstance(message, Publish):
            request = message.request()
        else:
            request = broker_pb2.PublishRequest()
            request.CopyFrom(message)
        if not request.idempotency_key and not request.ephemeral:
            request.idempotency_key = str(uuid.uuid4())
        size = request.ByteSize()
        receipt = OutboxReceipt(request.idempotency_key)
        with self._lock:
            if self._closed:
                raise ClosedError("the outbox is closed")
            if (
                len(self._entries) >= self.options.max_messages
                or self._bytes + size > self.options.max_bytes
            ):
                raise OutboxFullError(
                    len(self._entries), self._bytes, self.options.max_messages, self.options.max_bytes
                )
            if self._journal is not None:
                # Under the lock, so the file's order is the queue's.
                self._journal.append_queued(request)
            self._entries.append(_Entry(request, size, receipt))
            self._bytes += size
            self._lock.notify_all()
        return receipt

    def __len__(self) -> int:
        """Messages queued, the one being sent included."""
        with self._lock:
            return len(self._entries)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def flushed(self, timeout: Optional[float] = None) -> bool:
        """Waits until everything queued so far was stored or refused; False on `timeout`."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._entries or self._closed, timeout)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            entries = list(self._entries)
            self._entries.clear()
            self._bytes = 0
            if self._journal is not None:
                self._journal.close()
            self._lock.notify_all()
        for entry in entries:
            if not entry.receipt.done():
                entry.receipt._future.set_exception(ClosedError())

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _flush(self) -> None:
        options = self.options
        backoff = Backoff(options.initial_backoff, options.max_backoff)
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._entries or self._closed)
                if self._closed:
                    return
                entry = self._entries[0]
            error: Optional[SwitchboardError] = None
            ack = None
            try:
                ack = self._client._publish_once(entry.request, None)
            except SwitchboardError as failed:
                error = failed
            wait: Optional[float] = None
            if error is not None and not entry.request.ephemeral:
                if isinstance(error, CircuitOpenError):
                    wait = error.retry_in
                else:
                    wait = retry_after(error)
            if wait is not None:
                delay = max(wait, backoff.next_delay())
                log.debug("outbox: the broker did not take the message (%s), again in %.3fs", error, delay)
                with self._lock:
                    # Waits on the condition, so `close()` ends the wait at once.
                    if self._lock.wait_for(lambda: self._closed, delay):
                        return
                continue
            backoff.reset()
            with self._lock:
                if self._closed or not self._entries or self._entries[0] is not entry:
                    return
                self._entries.popleft()
                self._bytes -= entry.size
                if self._journal is not None:
                    self._journal.mark_done()
                self._lock.notify_all()
            if error is not None:
                log.warning(
                    "outbox: the broker refused a message on %s (key %s); dropped from the queue: %s",
                    entry.request.channel,
                    entry.request.idempotency_key,
                    error,
                )
                entry.receipt._future.set_exception(error)
            else:
                entry.receipt._future.set_result(ack)
