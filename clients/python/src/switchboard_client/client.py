"""A thin, typed layer over the generated stubs (`switchboard.v1`).

What it adds to the stubs: connecting with TLS and a bearer token; errors decoded to
`SwitchboardError` (code, reason, metadata); publishes with an idempotency key, an opt-in retry
policy and circuit breaker, failover to other cluster nodes, publish streams that resume, a bounded
outbox; subscriptions that resume after a lost connection with no gap and no duplicate, each on a
connection of its own; history without the `from` keyword; entities. Everything else is the
generated messages, returned as they are.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import grpc
from google.protobuf import timestamp_pb2

from switchboard.v1 import broker_pb2, broker_pb2_grpc, entity_pb2, entity_pb2_grpc

from .circuit import CircuitBreaker, CircuitPolicy, CircuitState
from .errors import SwitchboardError
from .failover import Failover
from .retry import Backoff, RetryPolicy, retry_after

if TYPE_CHECKING:
    from .outbox import Outbox, OutboxOptions

log = logging.getLogger("switchboard_client.failover")

Payload = Union[bytes, str]
# Where a subscription or a history read starts: "latest", "earliest", an offset, or a time.
Start = Union[str, int, datetime.datetime, None]

# grpc-python keeps one global pool of connections: channels with the same target and options
# share one HTTP/2 connection, and with it the connection's flow-control window and the broker's
# per-connection bounds. This option gives a channel connections of its own.
_OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


def _payload(payload: Payload) -> bytes:
    return payload.encode() if isinstance(payload, str) else payload


def _timestamp(when: datetime.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when.astimezone(datetime.timezone.utc) if when.tzinfo else when)
    return stamp


def start_position(start: Start) -> Optional[broker_pb2.StartPosition]:
    """`None` (the call's default), "latest", "earliest", an offset (int) or a datetime."""
    if start is None:
        return None
    if start == "latest":
        return broker_pb2.StartPosition(latest=broker_pb2.Latest())
    if start == "earliest":
        return broker_pb2.StartPosition(earliest=broker_pb2.Earliest())
    if isinstance(start, bool):
        raise TypeError("a start is 'latest', 'earliest', an offset or a datetime")
    if isinstance(start, int):
        return broker_pb2.StartPosition(offset=start)
    if isinstance(start, datetime.datetime):
        return broker_pb2.StartPosition(time=_timestamp(start))
    raise TypeError(f"a start is 'latest', 'earliest', an offset or a datetime, not {start!r}")


@dataclass(frozen=True)
class Publish:
    """One message to publish; the fields of `PublishRequest`, with a payload as bytes or text."""

    channel: str
    payload: Payload = b""
    content_type: str = ""
    schema_version: str = ""
    correlation_id: str = ""
    causation_id: str = ""
    idempotency_key: str = ""
    ttl_ms: int = 0
    headers: Optional[Mapping[str, str]] = None
    hops: int = 0
    ephemeral: bool = False

    def request(self) -> broker_pb2.PublishRequest:
        return broker_pb2.PublishRequest(
            channel=self.channel,
            payload=_payload(self.payload),
            content_type=self.content_type,
            schema_version=self.schema_version,
            correlation_id=self.correlation_id,
            causation_id=self.causation_id,
            idempotency_key=self.idempotency_key,
            ttl_ms=self.ttl_ms,
            headers=dict(self.headers or {}),
            hops=self.hops,
            ephemeral=self.ephemeral,
        )


@dataclass(frozen=True)
class StreamResult:
    """The answer to one message of a publish stream: `ack` or `error`, never both."""

    sequence: int
    ack: Optional[broker_pb2.PublishAck]
    error: Optional[SwitchboardError]


class Client:
    """A connection to one broker. Unary calls and publishes share its channel; every
    subscription and entity watch opens a channel (and so a connection) of its own.

    `target` is `host:port`. `tls=True` (or `root_certificates`, PEM bytes; `None` means the
    system's roots) uses TLS; `token` sends `authorization: Bearer <token>` on every call.
    `retry` is the default publish retry policy: `None`, one attempt, as in the Rust client.
    `circuit_breaker` puts a `CircuitBreaker` with that policy in front of single publishes and the
    outbox: `None` (the default) has none.
    `failover=True` (or `nodes`, more nodes' `host:port`, which also turns it on) sends a publish
    that failed because its node is unhealthy to the next known node of the cluster before the
    failure counts: see `failover.py`. The other nodes are learned from the cluster status RPC
    when the client is made (best effort, within `refresh_timeout` seconds) and by
    `refresh_nodes()`. Off by default.
    """

    def __init__(
        self,
        target: str,
        *,
        tls: bool = False,
        root_certificates: Optional[bytes] = None,
        token: Optional[str] = None,
        retry: Optional[RetryPolicy] = None,
        circuit_breaker: Optional[CircuitPolicy] = None,
        options: Sequence[tuple[str, Any]] = (),
        failover: bool = False,
        nodes: Iterable[str] = (),
        refresh_timeout: float = 5.0,
    ) -> None:
        self.target = target
        self._tls = tls or root_certificates is not None
        self._root_certificates = root_certificates
        self._options = list(options)
        self.token = token
        self.retry = retry
        self.circuit_breaker = (
            CircuitBreaker(target, circuit_breaker) if circuit_breaker is not None else None
        )
        self._channel = self._open_channel(own_connection=False)
        self._broker = broker_pb2_grpc.BrokerStub(self._channel)
        self._entities = entity_pb2_grpc.EntitiesStub(self._channel)
        seeds = list(nodes)
        self._failover: Optional[Failover] = None
        if failover or seeds:
            self._failover = Failover(self)
            for seed in seeds:
                self._failover.add(seed)
            # Best effort, as in the Rust client: a single node, a node down at this moment, or a
            # token without the admin grant still leave the nodes it was given.
            try:
                self._failover.refresh(refresh_timeout)
            except SwitchboardError as error:
                log.debug("failover: could not read the cluster's members: %s", error)

    def _open_channel(self, own_connection: bool, target: Optional[str] = None) -> grpc.Channel:
        """A channel to `target` (the client's own node by default) with the client's TLS and
        options."""
        target = target if target is not None else self.target
        options = self._options + ([_OWN_CONNECTION] if own_connection else [])
        if self._tls:
            credentials = grpc.ssl_channel_credentials(self._root_certificates)
            return grpc.secure_channel(target, credentials, options=options)
        return grpc.insecure_channel(target, options=options)

    def _metadata(self) -> Optional[list[tuple[str, str]]]:
        # Plain metadata rather than grpc call credentials: grpcio refuses call credentials on an
        # insecure channel, and a broker behind a TLS-terminating proxy still wants the token.
        return [("authorization", f"Bearer {self.token}")] if self.token else None

    def _call(self, method: Any, request: Any, timeout: Optional[float]) -> Any:
        try:
            return method(request, timeout=timeout, metadata=self._metadata())
        except grpc.RpcError as err:
            raise SwitchboardError.from_rpc_error(err) from None

    def _publish_once(
        self, request: broker_pb2.PublishRequest, timeout: Optional[float]
    ) -> broker_pb2.PublishAck:
        """One `Publish` call, through the circuit breaker when the client has one; with
        failover, one round of the known nodes (the breaker counts it as one call)."""
        breaker = self.circuit_breaker
        if breaker is None:
            return self._send(request, timeout)
        permit = breaker.admit()
        try:
            ack = self._send(request, timeout)
        except SwitchboardError as error:
            permit.record(error)
            raise
        else:
            permit.record(None)
            return ack
        finally:
            permit.release()

    def _send(
        self, request: broker_pb2.PublishRequest, timeout: Optional[float]
    ) -> broker_pb2.PublishAck:
        failover = self._failover
        if failover is None:
            return self._call(self._broker.Publish, request, timeout)
        # It may reach another node after a failure whose outcome is unknown: the key makes it
        # count once.
        if not request.ephemeral and not request.idempotency_key:
            request.idempotency_key = str(uuid.uuid4())
        return failover.publish(request, timeout)

    def refresh_nodes(self, *, timeout: Optional[float] = 5.0) -> List[str]:
        """Learns the cluster's members from the cluster status RPC (asking the known nodes, the
        current one first) and returns the known node addresses. Making a client with failover
        does this once; call it again after the membership changed. Raises `ValueError` without
        failover, and the last node's `SwitchboardError` when none answered."""
        if self._failover is None:
            raise ValueError("failover is off: make the client with failover=True")
        return self._failover.refresh(timeout)

    def known_nodes(self) -> List[str]:
        """The addresses of the cluster nodes this client knows for failover (its own first);
        just its own without failover."""
        return self._failover.targets() if self._failover is not None else [self.target]

    def current_node(self) -> str:
        """The address of the node publishes go to first: the client's own, until a failover
        moved them to another node."""
        return self._failover.current() if self._failover is not None else self.target

    def circuit_state(self) -> Optional[CircuitState]:
        """The state of the circuit breaker (`CLOSED`, `OPEN`, `HALF_OPEN`); `None` without one."""
        return self.circuit_breaker.state if self.circuit_breaker is not None else None

    def close(self) -> None:
        if self._failover is not None:
            self._failover.close()
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Publishing.

    def publish(
        self,
        message: Union[Publish, str],
        payload: Payload = b"",
        *,
        timeout: Optional[float] = None,
        retry: Optional[RetryPolicy] = None,
        **fields: Any,
    ) -> broker_pb2.PublishAck:
        """Publishes one message: `publish(Publish(...))` or `publish(channel, payload, **fields)`.

        Under a retry policy (`retry`, else the client's), a message without an idempotency key
        gets a random one, the same on every attempt, and retryable failures are tried again
        (see `retry.retry_after`); the ack then says `duplicate` when an earlier attempt stored it.
        Under failover a message that is not ephemeral gets a key too, and an endpoint failure
        sends it on to the next known node before it counts as the attempt's failure.
        """
        if isinstance(message, str):
            message = Publish(message, payload, **fields)
        request = message.request()
        policy = retry if retry is not None else self.retry
        if policy is None or request.ephemeral:
            return self._publish_once(request, timeout)
        if not request.idempotency_key:
            request.idempotency_key = str(uuid.uuid4())
        return policy.run(lambda: self._publish_once(request, timeout))

    def publish_stream(
        self,
        messages: Iterable[Union[Publish, broker_pb2.PublishRequest]],
        *,
        retry: Optional[RetryPolicy] = None,
        max_in_flight: int = 1000,
    ) -> Iterator[StreamResult]:
        """Publishes a stream of messages; yields one result per message, in order.

        A refused message yields a result with its `error` and the stream goes on. Without a retry
        policy (`retry`, else the client's), a failure of the stream itself (the broker stopping,
        a lost connection) raises `SwitchboardError`: the messages answered before it are durable,
        the others may be sent again (with their idempotency keys).

        Under a policy the stream resumes (`ResumingPublishStream`): every message gets an
        idempotency key, and when the stream breaks (or a message is refused for a retryable
        reason) a new one is opened and the unanswered messages are sent again first, in order;
        `sequence` is then the message's position in `messages`. At most `max_in_flight` messages
        are sent and unanswered at once. With failover, each of its streams goes to the current
        node and a break moves that on; without a policy the stream goes to the client's own node.
        """
        policy = retry if retry is not None else self.retry
        if policy is not None:
            from .publish_resume import ResumingPublishStream

            return ResumingPublishStream(self, messages, policy, max_in_flight)
        return self._publish_stream_once(messages)

    def _publish_stream_once(
        self, messages: Iterable[Union[Publish, broker_pb2.PublishRequest]]
    ) -> Iterator[StreamResult]:
        requests = (m.request() if isinstance(m, Publish) else m for m in messages)
        call = self._broker.PublishStream(requests, metadata=self._metadata())
        try:
            for answer in call:
                if answer.WhichOneof("result") == "refusal":
                    error = SwitchboardError.from_refusal(answer.refusal)
                    yield StreamResult(answer.sequence, None, error)
                else:
                    yield StreamResult(answer.sequence, answer.ack, None)
        except grpc.RpcError as err:
            raise SwitchboardError.from_rpc_error(err) from None
        finally:
            call.cancel()

    def outbox(self, options: Optional["OutboxOptions"] = None, **bounds: Any) -> "Outbox":
        """A bounded in-memory `Outbox` in front of this client's publishes, flushed in order by
        a thread of its own: `outbox(OutboxOptions(...))` or `outbox(max_messages=..., ...)`."""
        from .outbox import Outbox, OutboxOptions

        return Outbox(self, options if options is not None else OutboxOptions(**bounds))

    def outbox_on_disk(
        self, path: "os.PathLike[str] | str", options: Optional["OutboxOptions"] = None, **bounds: Any
    ) -> "Outbox":
        """An `Outbox` whose queue is also kept in the file at `path`, which it owns: every
        message is appended and synced (`fdatasync`) before `Outbox.publish` returns, and the file
        is truncated when everything in it was answered. Opening it again (after a crash or a
        restart of the process, or after `close()`) replays it: the messages not yet answered are
        queued first, in order, and sent again with their idempotency keys, so each is stored
        once (within the broker's `loops.dedup_window` of its first send). A damaged record at
        the end (a write torn by a crash) is dropped with a warning. Bounded like `outbox`; the
        replayed messages count toward the bounds (all queued even past them). The file format
        is the Rust client's (docs/CLIENT-RESILIENCE.md).

        Raises `OutboxStorageError` when the file cannot be read or written, or another outbox (in
        this process or another) has it open."""
        from .outbox import Outbox, OutboxOptions
        from .outbox_file import Journal

        # Options first: a bad keyword must not leave the file locked.
        options = options if options is not None else OutboxOptions(**bounds)
        replayed = Journal.open(path)
        if replayed.pending or replayed.dropped_bytes:
            logging.getLogger("switchboard_client.outbox").info(
                "outbox file %s replayed: %d messages to send again (%d damaged bytes dropped)",
                replayed.journal.path,
                len(replayed.pending),
                replayed.dropped_bytes,
            )
        return Outbox(
            self,
            options,
            replayed.journal,
            replayed.pending,
        )

    # Reading.

    def history(
        self,
        pattern: str,
        *,
        start: Start = None,
        to_offset: int = 0,
        to_time: Optional[datetime.datetime] = None,
        limit: int = 0,
        timeout: Optional[float] = None,
    ) -> broker_pb2.HistoryResponse:
        """One page of stored messages; `start` is the request's `from` (a Python keyword).

        Read the next page with `start=page.next_offset` while it is not 0, or use
        `history_all`.
        """
        request = broker_pb2.HistoryRequest(pattern=pattern, to_offset=to_offset, limit=limit)
        position = start_position(start)
        if position is not None:
            getattr(request, "from").CopyFrom(position)
        if to_time is not None:
            request.to_time.CopyFrom(_timestamp(to_time))
        return self._call(self._broker.History, request, timeout)

    def history_all(
        self, pattern: str, *, start: Start = None, page_size: int = 0, **range_: Any
    ) -> Iterator[broker_pb2.Message]:
        """Every stored message matching `pattern` in the range, page by page."""
        while True:
            page = self.history(pattern, start=start, limit=page_size, **range_)
            yield from page.messages
            if page.next_offset == 0:
                return
            start = page.next_offset

    def info(self, *, timeout: Optional[float] = None) -> broker_pb2.InfoResponse:
        return self._call(self._broker.Info, broker_pb2.InfoRequest(), timeout)

    def subscribe(
        self,
        pattern: str,
        *,
        start: Start = None,
        policy: "broker_pb2.FlowPolicy" = broker_pb2.FLOW_POLICY_UNSPECIFIED,
        window: int = 0,
        max_unacked: int = 0,
        durable_name: str = "",
        ack_timeout_ms: int = 0,
        exclude_ephemeral: bool = False,
        max_batch: int = 64,
        initial_backoff: float = 0.05,
        max_backoff: float = 5.0,
        max_reconnect_attempts: Optional[int] = None,
    ) -> "Subscription":
        """Subscribes and waits for the broker's confirmation (`Subscribed`), so anything
        published after this returns is delivered. See `Subscription` for how it resumes.

        `max_batch`: the most messages the broker may put in one event when several are ready at
        once (`SubscribeEvent.batch`); the subscription unpacks them, so iterating still yields
        one message at a time. 1 (or 0) asks for one message per event."""
        request = broker_pb2.SubscribeRequest(
            pattern=pattern,
            policy=policy,
            window=window,
            max_unacked=max_unacked,
            durable_name=durable_name,
            ack_timeout_ms=ack_timeout_ms,
            exclude_ephemeral=exclude_ephemeral,
            max_batch=max_batch,
        )
        position = start_position(start)
        if position is not None:
            request.start.CopyFrom(position)
        backoff = Backoff(initial_backoff, max_backoff, equal=True)
        return Subscription(self, request, backoff, max_reconnect_attempts)

    # Entities.

    def update_entity(
        self,
        entity_type: str,
        entity_id: str,
        fields: Union[Mapping[str, Any], bytes],
        *,
        writer: str,
        timestamp_ms: int = 0,
        version: int = 0,
        expected_version: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> entity_pb2.Entity:
        """Merges `fields` (a JSON object) into the entity; `timestamp_ms=0` lets the broker stamp
        the write. Raises STALE_UPDATE, VERSION_CONFLICT, ... with `current_version` metadata."""
        body = fields if isinstance(fields, bytes) else json.dumps(dict(fields)).encode()
        request = entity_pb2.UpdateEntityRequest(
            key=entity_pb2.EntityKey(type=entity_type, id=entity_id),
            fields=body,
            stamp=entity_pb2.WriteStamp(timestamp_ms=timestamp_ms, version=version, writer=writer),
        )
        if expected_version is not None:
            request.expected_version = expected_version
        return self._call(self._entities.UpdateEntity, request, timeout).entity

    def delete_entity(
        self,
        entity_type: str,
        entity_id: str,
        *,
        writer: str,
        timestamp_ms: int = 0,
        version: int = 0,
        expected_version: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> entity_pb2.Entity:
        request = entity_pb2.DeleteEntityRequest(
            key=entity_pb2.EntityKey(type=entity_type, id=entity_id),
            stamp=entity_pb2.WriteStamp(timestamp_ms=timestamp_ms, version=version, writer=writer),
        )
        if expected_version is not None:
            request.expected_version = expected_version
        return self._call(self._entities.DeleteEntity, request, timeout).entity

    def get_entity(
        self,
        entity_type: str,
        entity_id: str,
        *,
        if_none_match: str = "",
        stale_ok: bool = False,
        timeout: Optional[float] = None,
    ) -> Optional[entity_pb2.Entity]:
        """The entity's merged state, or `None` when `if_none_match` matched its ETag (not
        modified). NOT_FOUND `ENTITY_NOT_FOUND` when it was never written."""
        request = entity_pb2.GetEntityRequest(
            key=entity_pb2.EntityKey(type=entity_type, id=entity_id),
            if_none_match=if_none_match,
            stale_ok=stale_ok,
        )
        response = self._call(self._entities.GetEntity, request, timeout)
        return None if response.not_modified else response.entity

    def watch_entities(
        self,
        pattern: str,
        *,
        policy: "broker_pb2.FlowPolicy" = broker_pb2.FLOW_POLICY_UNSPECIFIED,
        min_interval_ms: int = 0,
    ) -> "EntityWatch":
        """The entities matching `pattern` (over `type.id`): a snapshot, `snapshot_complete`, then
        every change. On a connection of its own. Not resumed: after an error, watch again (the
        new snapshot brings the watcher up to date)."""
        request = entity_pb2.WatchEntitiesRequest(
            pattern=pattern, policy=policy, min_interval_ms=min_interval_ms
        )
        return EntityWatch(self, request)


class _Stream:
    """A server stream on a channel of its own, cancelled and closed by `close()`."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._closed = False
        self._channel: Optional[grpc.Channel] = None
        self._call: Any = None

    def _open(self, method_of: Any, request: Any) -> Any:
        with self._lock:
            if self._closed:
                raise SwitchboardError(grpc.StatusCode.CANCELLED, "closed")
            if self._channel is not None:
                self._channel.close()
            self._channel = self._client._open_channel(own_connection=True)
            self._call = method_of(self._channel)(request, metadata=self._client._metadata())
            return self._call

    def close(self) -> None:
        """Ends the stream; an iteration in progress on another thread stops."""
        with self._lock:
            self._closed = True
            if self._call is not None:
                self._call.cancel()
            if self._channel is not None:
                self._channel.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Subscription(_Stream):
    """Deliveries of one subscription: iterate to get `Message`s and `Gap`s, in offset order.

    When the stream breaks for a reason that is not the broker's refusal (a lost connection, the
    broker stopping or restarting: see `retry.retry_after`), it subscribes again after a backoff
    (50 ms doubling to 5 s, equal jitter), from the offset after the last message delivered (or
    the `next_offset` the broker confirmed, when none was), and drops any message at or below
    the last delivered offset: no gap, no duplicate. A refusal (a bad pattern, a grant) raises
    `SwitchboardError` from the iteration. A durable consumer resumes after its acknowledged
    offset instead (the broker's choice), so it may see unacknowledged messages again.
    """

    def __init__(
        self,
        client: Client,
        request: broker_pb2.SubscribeRequest,
        backoff: Backoff,
        max_reconnect_attempts: Optional[int],
    ) -> None:
        super().__init__(client)
        self._request = request
        self._backoff = backoff
        self._max_attempts = max_reconnect_attempts
        self.last_offset = 0  # the highest offset delivered (or skipped by a gap)
        self.next_offset = 0  # from the latest `Subscribed`
        self.subscription_id = 0
        self.reconnects = 0
        self._wake = threading.Event()  # set by close(): ends a backoff wait at once
        self._events = self._connect_first()

    def _subscribe(self) -> Iterator[broker_pb2.SubscribeEvent]:
        request = broker_pb2.SubscribeRequest()
        request.CopyFrom(self._request)
        if self.last_offset or self.next_offset:
            resume_at = self.last_offset + 1 if self.last_offset else self.next_offset
            request.start.CopyFrom(broker_pb2.StartPosition(offset=resume_at))
        call = self._open(lambda channel: broker_pb2_grpc.BrokerStub(channel).Subscribe, request)
        first = next(call)
        if first.WhichOneof("event") != "subscribed":
            raise SwitchboardError(grpc.StatusCode.INTERNAL, "stream did not open with Subscribed")
        self.subscription_id = first.subscribed.subscription_id
        if not self.last_offset:
            self.next_offset = first.subscribed.next_offset
        return call

    def _connect_first(self) -> Iterator[broker_pb2.SubscribeEvent]:
        try:
            return self._subscribe()
        except grpc.RpcError as err:
            self.close()
            raise SwitchboardError.from_rpc_error(err) from None
        except StopIteration:
            self.close()
            raise SwitchboardError(grpc.StatusCode.UNAVAILABLE, "stream ended") from None

    def _reconnect(self, error: SwitchboardError) -> Iterator[broker_pb2.SubscribeEvent]:
        attempts = 0
        while True:
            if self._closed or retry_after(error) is None:
                raise error
            if self._max_attempts is not None and attempts >= self._max_attempts:
                raise error
            attempts += 1
            # Waits on an event rather than sleeping, so `close()` ends the wait at once.
            if self._wake.wait(self._backoff.next_delay()) or self._closed:
                raise error
            try:
                events = self._subscribe()
                self.reconnects += 1
                self._backoff.reset()
                return events
            except grpc.RpcError as err:
                error = SwitchboardError.from_rpc_error(err)
            except StopIteration:
                error = SwitchboardError(grpc.StatusCode.UNAVAILABLE, "stream ended")

    def close(self) -> None:
        super().close()
        self._wake.set()

    def __iter__(self) -> Iterator[Union[broker_pb2.Message, broker_pb2.Gap]]:
        durable = bool(self._request.durable_name)
        while True:
            try:
                for event in self._events:
                    kind = event.WhichOneof("event")
                    if kind == "message" or kind == "batch":
                        # A batch is its messages, each as if it had come in its own event.
                        messages = [event.message] if kind == "message" else event.batch.messages
                        for message in messages:
                            if message.offset == 0:  # ephemeral: never stored, no position
                                yield message
                                continue
                            if message.offset <= self.last_offset and not durable:
                                continue  # already delivered before a reconnect
                            self.last_offset = max(self.last_offset, message.offset)
                            yield message
                    elif kind == "gap":
                        self.last_offset = max(self.last_offset, event.gap.to_offset)
                        yield event.gap
                    elif kind == "subscribed":
                        self.subscription_id = event.subscribed.subscription_id
                if self._closed:
                    return
                error = SwitchboardError(grpc.StatusCode.UNAVAILABLE, "stream ended")
            except grpc.RpcError as err:
                if self._closed:
                    return
                error = SwitchboardError.from_rpc_error(err)
            self._events = self._reconnect(error)

    def ack(self, offsets: Iterable[int], *, timeout: Optional[float] = None) -> broker_pb2.AckResponse:
        """Acknowledges deliveries (credits, durable consumers), on the client's shared channel."""
        request = broker_pb2.AckRequest(subscription_id=self.subscription_id, offsets=list(offsets))
        return self._client._call(self._client._broker.Ack, request, timeout)


class EntityWatch(_Stream):
    """Events of an entity watch: iterate to get `EntityEvent`s (`WhichOneof("event")` is
    `snapshot`, `snapshot_complete` or `change`). Errors raise `SwitchboardError`."""

    def __init__(self, client: Client, request: entity_pb2.WatchEntitiesRequest) -> None:
        super().__init__(client)
        self._events = self._open(
            lambda channel: entity_pb2_grpc.EntitiesStub(channel).WatchEntities, request
        )

    def __iter__(self) -> Iterator[entity_pb2.EntityEvent]:
        try:
            yield from self._events
        except grpc.RpcError as err:
            if not self._closed:
                raise SwitchboardError.from_rpc_error(err) from None


def connect(target: str, **options: Any) -> Client:
    """`Client(target, **options)`: see `Client`."""
    return Client(target, **options)
