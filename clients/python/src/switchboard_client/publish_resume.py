"""A publish stream that resumes: `Client.publish_stream` under a retry policy.

It runs `PublishStream` calls one after the other. Each message gets its idempotency key when it
is taken from the caller's iterable (the caller's, or a new UUID) and keeps it on every stream, so
when a stream breaks (the connection lost, the broker stopping or restarting, or a message refused
for a retryable reason such as `NO_LEADER`) the next stream first sends again, in order, every
message the broken one had not answered; one that the broken stream had in fact stored is answered
`duplicate` with its original offset (within the broker's `loops.dedup_window`). The caller sees
exactly one result per message, in order, numbered by its position in the iterable.

Ephemeral messages are at most once: one the broken stream had not answered is not sent again; its
result is an error (UNAVAILABLE, no reason) saying so.

With the client's circuit breaker, each stream is one call through it, opened only when there is a
message to send: its first answer is the breaker's success (a probe's answer closes the circuit at
once), a break before any answer with an endpoint failure its failure. While the circuit is open
the stream waits the cooldown out (at least the backoff's delay) within the policy's deadline, and
raises `CircuitOpenError` past it.

With failover (`Client(failover=True)`), each stream goes to the client's current node, and a stream
that broke with an endpoint failure moves the current node on to the next known one, so the next
stream, after the backoff, resends the unanswered messages there.

Threads: grpcio reads each call's requests on a thread of its own, from `_requests`; the caller's
iteration reads the answers. Both share the queue of taken, unanswered messages under one lock.
"""

from __future__ import annotations

import collections
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Deque, Iterable, Iterator, List, Optional, Union

import grpc

from switchboard.v1 import broker_pb2

from .errors import CircuitOpenError, SwitchboardError
from .retry import RetryPolicy, is_endpoint_failure, retry_after

if TYPE_CHECKING:
    from .client import Client, Publish, StreamResult


@dataclass
class _Taken:
    position: int
    request: broker_pb2.PublishRequest
    # An ephemeral message a broken stream had not answered: not sent again.
    lost: bool = False


class ResumingPublishStream:
    def __init__(
        self,
        client: "Client",
        messages: Iterable[Union["Publish", broker_pb2.PublishRequest]],
        policy: RetryPolicy,
        max_in_flight: int,
    ) -> None:
        self._client = client
        self._source = iter(messages)
        self._policy = policy
        self._max_in_flight = max(1, max_in_flight)
        self._cond = threading.Condition()
        # Serialises reads of the caller's iterable (a dead stream's reader may still be in one).
        self._source_lock = threading.Lock()
        self._source_done = False
        self._source_error: Optional[BaseException] = None
        # Taken from the iterable, not answered yet, in order; positions are contiguous.
        self._pending: Deque[_Taken] = collections.deque()
        self._taken = 0
        # Bumped whenever a stream ends: the request reader of an older one stops.
        self._generation = 0
        # How many streams were opened after the first (a test and operator's counter).
        self.resumes = 0
        self._results = self._run()

    def __iter__(self) -> "ResumingPublishStream":
        return self

    def __next__(self) -> "StreamResult":
        return next(self._results)

    def _take(self) -> None:
        """Takes the next message from the caller's iterable into `_pending` (or marks the end)."""
        from .client import Publish

        try:
            message = next(self._source)
        except StopIteration:
            with self._cond:
                self._source_done = True
                self._cond.notify_all()
            return
        except BaseException as error:  # handed to the caller once everything is answered
            with self._cond:
                self._source_done = True
                self._source_error = error
                self._cond.notify_all()
            return
        if isinstance(message, Publish):
            request = message.request()
        else:
            request = broker_pb2.PublishRequest()
            request.CopyFrom(message)
        if not request.idempotency_key and not request.ephemeral:
            request.idempotency_key = str(uuid.uuid4())
        with self._cond:
            self._pending.append(_Taken(self._taken, request))
            self._taken += 1
            self._cond.notify_all()

    def _requests(self, generation: int, cursor: int) -> Iterator[broker_pb2.PublishRequest]:
        """The requests of one stream: the unanswered messages from `cursor` on, then new ones."""
        while True:
            with self._cond:
                if generation != self._generation:
                    return
                if cursor < self._taken:
                    taken = self._pending[cursor - self._pending[0].position]
                    cursor += 1
                    if taken.lost:
                        continue
                    request = taken.request
                elif self._source_done:
                    return
                elif len(self._pending) >= self._max_in_flight:
                    self._cond.wait()
                    continue
                else:
                    request = None
            if request is not None:
                yield request
                continue
            with self._source_lock:
                with self._cond:
                    # Another stream's reader may have taken one meanwhile: send that first.
                    if generation != self._generation or cursor < self._taken or self._source_done:
                        continue
                self._take()

    def _end_stream(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def _lost_at_front(self) -> List["StreamResult"]:
        from .client import StreamResult

        results = []
        while self._pending and self._pending[0].lost:
            taken = self._pending.popleft()
            error = SwitchboardError(
                grpc.StatusCode.UNAVAILABLE,
                "ephemeral message not answered before the stream broke; not sent again",
            )
            results.append(StreamResult(taken.position, None, error))
        self._cond.notify_all()
        return results

    def _run(self) -> Iterator["StreamResult"]:
        from .client import StreamResult

        policy = self._policy
        backoff = policy.backoff()
        failing_since: Optional[float] = None
        while True:
            with self._cond:
                lost = self._lost_at_front()
                finished = self._source_done and not self._pending
                generation = self._generation
                cursor = self._pending[0].position if self._pending else self._taken
            yield from lost
            if finished:
                if self._source_error is not None:
                    raise self._source_error
                return
            breaker = self._client.circuit_breaker
            permit = None
            if breaker is not None:
                # Opened for something to send: an idle stream is never the probe.
                with self._source_lock:
                    with self._cond:
                        idle = not self._pending and not self._source_done
                    if idle:
                        self._take()
                with self._cond:
                    if not self._pending and self._source_done:
                        continue
                    generation = self._generation
                    cursor = self._pending[0].position
                try:
                    permit = breaker.admit()
                except CircuitOpenError as open_circuit:
                    now = policy.clock()
                    if failing_since is None:
                        failing_since = now
                    delay = max(open_circuit.retry_in, backoff.next_delay())
                    if now + delay > failing_since + policy.deadline:
                        raise
                    policy.sleep(delay)
                    continue
            # With failover, each stream goes to the current node, which a break moves on.
            failover = self._client._failover
            node: Optional[int] = None
            broker = self._client._broker
            if failover is not None:
                node, broker = failover.stream_node()
            call = broker.PublishStream(
                self._requests(generation, cursor), metadata=self._client._metadata()
            )
            error: Optional[SwitchboardError] = None
            try:
                for answer in call:
                    with self._cond:
                        results = self._lost_at_front()
                        if not self._pending:
                            error = SwitchboardError(
                                grpc.StatusCode.INTERNAL, "an answer to a message not sent"
                            )
                            break
                        taken = self._pending.popleft()
                        self._cond.notify_all()
                    if answer.WhichOneof("result") == "refusal":
                        refused = SwitchboardError.from_refusal(answer.refusal)
                        if not taken.request.ephemeral and retry_after(refused) is not None:
                            # Handled as a break: it and what follows go again on a new stream.
                            with self._cond:
                                self._pending.appendleft(taken)
                            error = refused
                            yield from results
                            break
                        results.append(StreamResult(taken.position, None, refused))
                    else:
                        results.append(StreamResult(taken.position, answer.ack, None))
                    failing_since = None
                    backoff.reset()
                    if permit is not None:
                        permit.record(None)
                        permit = None
                    yield from results
                else:
                    with self._cond:
                        if self._pending and not all(t.lost for t in self._pending):
                            error = SwitchboardError(grpc.StatusCode.UNAVAILABLE, "stream ended")
            except grpc.RpcError as err:
                error = SwitchboardError.from_rpc_error(err)
            finally:
                self._end_stream()
                call.cancel()
                if permit is not None:
                    if error is not None:
                        permit.record(error)
                    permit.release()
            if error is None:
                continue  # the top of the loop answers what is left and ends
            if retry_after(error) is None:
                raise error
            if failover is not None and node is not None and is_endpoint_failure(error):
                failover.stream_failed(node, error)
            with self._cond:
                for taken in self._pending:
                    if taken.request.ephemeral:
                        taken.lost = True
            now = policy.clock()
            if failing_since is None:
                failing_since = now
            delay = max(retry_after(error) or 0.0, backoff.next_delay())
            if now + delay > failing_since + policy.deadline:
                raise error
            policy.sleep(delay)
            self.resumes += 1
