"""Publishers that ride out outages (docs/CLIENT-RESILIENCE.md), against real brokers.

Every test client shortens grpcio's own reconnect backoff (1 s growing to 2 minutes by default),
so that a broker started again is reached within the test's deadlines; the policies under test
decide when to try again.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import threading
from typing import Any, Iterator, List, Optional

import grpc
import pytest

from switchboard.v1 import broker_pb2
from switchboard_client import (
    Backoff,
    CircuitBreaker,
    CircuitOpenError,
    CircuitPolicy,
    CircuitState,
    Client,
    OutboxFullError,
    OutboxOptions,
    Publish,
    RetryPolicy,
    SwitchboardError,
)

from conftest import Broker, wait_for

TIMEOUT = 30.0
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]


def client_for(broker: Broker, **options: Any) -> Client:
    return Client(broker.addr, options=FAST_RECONNECT, **options)


def stored_numbers(client: Client, pattern: str) -> List[int]:
    """The `n` of every stored message on `pattern`, in offset order."""
    return [json.loads(m.payload)["n"] for m in client.history_all(pattern, start="earliest")]


def restart_hard(broker: Broker) -> None:
    """`kill -9` and start again on the same address and data."""
    addr = broker.addr
    broker.kill()
    broker.start(addr)


def test_a_publisher_through_a_broker_kill_stores_each_message_once_in_order(broker: Broker) -> None:
    total = 60
    published: "queue.Queue[Any]" = queue.Queue()
    with client_for(broker, retry=RetryPolicy.within(TIMEOUT)) as client:

        def publisher() -> None:
            try:
                for n in range(total):
                    published.put(client.publish("orders.eu.created", json.dumps({"n": n})))
            except BaseException as err:
                published.put(err)

        thread = threading.Thread(target=publisher, daemon=True)
        thread.start()
        acks = [published.get(timeout=TIMEOUT) for _ in range(20)]
        restart_hard(broker)
        acks += [published.get(timeout=TIMEOUT) for _ in range(total - 20)]
        thread.join(TIMEOUT)
        failures = [a for a in acks if isinstance(a, BaseException)]
        assert not failures, failures
        assert stored_numbers(client, "orders.>") == list(range(total))
        offsets = [a.offset for a in acks]
        assert offsets == sorted(offsets) and len(set(offsets)) == total


def test_a_publish_stream_resends_what_a_killed_broker_had_not_answered(broker: Broker) -> None:
    total = 300
    policy = RetryPolicy.within(TIMEOUT)
    with client_for(broker, retry=policy) as client:
        messages = (Publish("tele.widget.click", json.dumps({"n": n})) for n in range(total))
        stream = client.publish_stream(messages, max_in_flight=100)
        results = []
        for result in stream:
            results.append(result)
            if len(results) == 30:
                # Messages behind this one are in flight on the stream being killed.
                restart_hard(broker)
        assert [r.sequence for r in results] == list(range(total))
        assert all(r.ack is not None and r.error is None for r in results), [
            r.error for r in results if r.error
        ]
        assert stream.resumes >= 1  # type: ignore[attr-defined]
        assert stored_numbers(client, "tele.>") == list(range(total))
        # Each ack names where its message is: a duplicate ack the original's offset.
        stored = {m.offset: json.loads(m.payload)["n"] for m in client.history_all("tele.>")}
        assert [stored[r.ack.offset] for r in results] == list(range(total))


def test_a_publish_stream_goes_through_the_breaker_and_waits_out_an_open_circuit(
    broker: Broker,
) -> None:
    total = 300
    policy = RetryPolicy(deadline=TIMEOUT, max_backoff=0.2)
    breaker = CircuitPolicy(failure_threshold=2, cooldown=0.2)
    with client_for(broker, retry=policy, circuit_breaker=breaker) as client:
        killed = threading.Event()

        def messages() -> Iterator[Publish]:
            for n in range(total):
                if n == 30:
                    killed.wait(TIMEOUT)  # the rest is published while the broker is down
                yield Publish("tele.widget.click", json.dumps({"n": n}))

        stream = client.publish_stream(messages(), max_in_flight=50)
        results: "queue.Queue[Any]" = queue.Queue()

        def consume() -> None:
            try:
                for result in stream:
                    results.put(result)
                results.put(None)
            except BaseException as err:
                results.put(err)

        threading.Thread(target=consume, daemon=True).start()
        got = [results.get(timeout=TIMEOUT) for _ in range(30)]
        addr = broker.addr
        broker.kill()
        killed.set()
        wait_for(lambda: client.circuit_state() is not CircuitState.CLOSED, TIMEOUT, "open")
        assert results.empty()
        broker.start(addr)
        while True:
            item = results.get(timeout=TIMEOUT)
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            got.append(item)
        assert [r.sequence for r in got] == list(range(total))
        assert all(r.ack is not None for r in got)
        assert client.circuit_state() is CircuitState.CLOSED
        assert stored_numbers(client, "tele.>") == list(range(total))


def test_a_publish_stream_passes_refusals_on_without_resuming(broker: Broker) -> None:
    with client_for(broker, retry=RetryPolicy.within(TIMEOUT)) as client:
        stream = client.publish_stream(
            [
                Publish("tele.widget.click", '{"n": 0}'),
                Publish("tele..click", '{"n": 1}'),
                Publish("tele.widget.click", '{"n": 2}'),
            ]
        )
        results = list(stream)
        assert [r.sequence for r in results] == [0, 1, 2]
        assert results[1].error is not None and results[1].error.reason == "CHANNEL_INVALID"
        assert results[0].ack and results[2].ack
        assert stream.resumes == 0  # type: ignore[attr-defined]
        assert stored_numbers(client, "tele.>") == [0, 2]


def test_the_circuit_opens_fails_fast_half_opens_and_closes(broker: Broker) -> None:
    policy = CircuitPolicy(failure_threshold=3, cooldown=0.5)
    with client_for(broker, circuit_breaker=policy) as client:
        client.publish("crm.contact.updated", '{"n": 0}')
        addr = broker.addr
        broker.kill()
        for _ in range(3):
            with pytest.raises(SwitchboardError) as down:
                client.publish("crm.contact.updated", '{"n": 1}', timeout=5)
            assert not isinstance(down.value, CircuitOpenError)
            assert down.value.code == grpc.StatusCode.UNAVAILABLE
        assert client.circuit_state() is CircuitState.OPEN
        with pytest.raises(CircuitOpenError) as fast:
            client.publish("crm.contact.updated", '{"n": 1}')
        assert fast.value.code == grpc.StatusCode.UNAVAILABLE and fast.value.reason is None
        assert 0 < fast.value.retry_in <= 0.5

        # A broker that does not answer (stopped, its connection open): the probe waits. Info
        # does not go through the breaker: it shows when the client's connection is back.
        broker.start(addr)
        wait_for(lambda: _answers(client), TIMEOUT, "the client connected again")
        assert broker.process is not None
        os.kill(broker.process.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: _cooled(client), TIMEOUT, "the cooldown")
            probe: "queue.Queue[Any]" = queue.Queue()

            def send_probe() -> None:
                try:
                    probe.put(client.publish("crm.contact.updated", '{"n": 2}', timeout=TIMEOUT))
                except BaseException as err:
                    probe.put(err)

            threading.Thread(target=send_probe, daemon=True).start()
            wait_for(
                lambda: client.circuit_state() is CircuitState.HALF_OPEN, TIMEOUT, "half open"
            )
            with pytest.raises(CircuitOpenError) as during_probe:
                client.publish("crm.contact.updated", '{"n": 3}')
            assert during_probe.value.retry_in == 0
        finally:
            os.kill(broker.process.pid, signal.SIGCONT)
        answer = probe.get(timeout=TIMEOUT)
        if isinstance(answer, BaseException):
            raise answer
        assert client.circuit_state() is CircuitState.CLOSED
        client.publish("crm.contact.updated", '{"n": 4}')
        assert stored_numbers(client, "crm.>") == [0, 2, 4]


def _answers(client: Client) -> bool:
    try:
        client.info(timeout=5)
        return True
    except SwitchboardError:
        return False


def _cooled(client: Client) -> bool:
    """Whether the open circuit's cooldown is over (the next call would probe)."""
    breaker = client.circuit_breaker
    assert breaker is not None
    return breaker._clock() >= breaker._open_until


def test_circuit_state_machine_with_the_time_passed_in() -> None:
    now = [0.0]
    breaker = CircuitBreaker("b:1", CircuitPolicy(3, 5.0), clock=lambda: now[0])
    down = SwitchboardError(grpc.StatusCode.UNAVAILABLE, "connection refused")
    refused = SwitchboardError(grpc.StatusCode.INVALID_ARGUMENT, "bad", "CHANNEL_INVALID")
    limited = SwitchboardError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow", "RATE_LIMITED")
    for error in [down, down, refused, down, down, limited]:
        breaker.admit().record(error)
    assert breaker.state is CircuitState.CLOSED  # a refusal and a rate limit are answers
    for _ in range(2):
        breaker.admit().record(down)
    assert breaker.state is CircuitState.CLOSED
    breaker.admit().record(down)
    assert breaker.state is CircuitState.OPEN
    now[0] = 2.0
    with pytest.raises(CircuitOpenError) as fast:
        breaker.admit()
    assert fast.value.retry_in == 3.0
    now[0] = 5.0
    probe = breaker.admit()
    assert probe.probe and breaker.state is CircuitState.HALF_OPEN
    probe.record(down)  # the probe failed: open for another cooldown
    assert breaker.state is CircuitState.OPEN
    now[0] = 10.0
    abandoned = breaker.admit()
    abandoned.release()  # never answered: the next call probes
    assert breaker.state is CircuitState.OPEN
    breaker.admit().record(None)
    assert breaker.state is CircuitState.CLOSED


def test_a_retrying_publish_stops_at_an_open_circuit(broker: Broker) -> None:
    sleeps: List[float] = []
    policy = RetryPolicy(deadline=TIMEOUT, sleep=sleeps.append)
    with client_for(broker, retry=policy, circuit_breaker=CircuitPolicy(2, 60.0)) as client:
        broker.kill()
        with pytest.raises(CircuitOpenError):
            client.publish("crm.contact.updated", "{}", timeout=5)
        assert len(sleeps) == 2  # two failures opened it; the third attempt failed fast


def test_the_outbox_bound_is_enforced_and_it_flushes_in_order_once(broker: Broker) -> None:
    with client_for(broker, circuit_breaker=CircuitPolicy(2, 0.2)) as client:
        addr = broker.addr
        broker.kill()
        one = Publish("tele.widget.click", '{"n": 0}').request().ByteSize() + 36 + 4
        with client.outbox(OutboxOptions(max_messages=3, max_backoff=0.2)) as outbox:
            receipts = [outbox.publish("tele.widget.click", json.dumps({"n": n})) for n in range(3)]
            with pytest.raises(OutboxFullError) as full:
                outbox.publish("tele.widget.click", '{"n": 3}')
            assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (full.value.messages, full.value.max_messages) == (3, 3)
            assert len(outbox) == 3
            # Its sends while the broker is down open the circuit; it waits the cooldowns out.
            wait_for(lambda: client.circuit_state() is not CircuitState.CLOSED, TIMEOUT, "open")
            assert not outbox.flushed(timeout=0.2)
            broker.start(addr)
            assert outbox.flushed(timeout=TIMEOUT)
            acks = [r.result(timeout=TIMEOUT) for r in receipts]
            assert [a.offset for a in acks] == sorted(a.offset for a in acks)
            assert len(outbox) == 0 and outbox.bytes == 0

        with client.outbox(max_bytes=2 * one) as by_bytes:
            broker.kill()
            by_bytes.publish("tele.widget.click", '{"n": 3}')
            by_bytes.publish("tele.widget.click", '{"n": 4}')
            with pytest.raises(OutboxFullError) as over_bytes:
                by_bytes.publish("tele.widget.click", '{"n": 5}')
            assert over_bytes.value.max_bytes == 2 * one
            assert over_bytes.value.bytes <= 2 * one
            broker.start(addr)
            assert by_bytes.flushed(timeout=TIMEOUT)
        assert stored_numbers(client, "tele.>") == [0, 1, 2, 3, 4]


def test_the_outbox_through_a_broker_kill_stores_each_message_once_in_order(broker: Broker) -> None:
    total = 200
    with client_for(broker) as client, client.outbox(max_backoff=0.2) as outbox:
        receipts = []
        for n in range(total):
            receipts.append(outbox.publish("orders.eu.created", json.dumps({"n": n})))
            if n == 50:
                restart_hard(broker)
        assert outbox.flushed(timeout=TIMEOUT)
        assert [r.result(0).offset for r in receipts] == [
            m.offset for m in client.history_all("orders.>", start="earliest")
        ]
        assert stored_numbers(client, "orders.>") == list(range(total))


def test_the_outbox_drops_a_refused_message_without_retrying_it(broker: Broker) -> None:
    with client_for(broker) as client:
        attempts: List[str] = []
        send = client._publish_once

        def counting(request: broker_pb2.PublishRequest, timeout: Optional[float]) -> Any:
            attempts.append(request.channel)
            return send(request, timeout)

        client._publish_once = counting  # type: ignore[method-assign]
        with client.outbox() as outbox:
            good = outbox.publish("tele.widget.click", '{"n": 0}')
            bad = outbox.publish("tele..click", '{"n": 1}')
            last = outbox.publish("tele.widget.click", '{"n": 2}')
            assert outbox.flushed(timeout=TIMEOUT)
            with pytest.raises(SwitchboardError) as refused:
                bad.result(0)
            assert refused.value.reason == "CHANNEL_INVALID"
            assert good.result(0).offset < last.result(0).offset
        assert attempts == ["tele.widget.click", "tele..click", "tele.widget.click"]
        assert stored_numbers(client, "tele.>") == [0, 2]


def test_jitter_spreads_the_retry_schedule_within_the_doubling_bases() -> None:
    """The sleeps of a retrying publish: each drawn from [0, base], the base doubling from 50 ms
    to 2 s; many publishers' schedules differ (no two retry at the same instants)."""

    def schedule(seed: int) -> List[float]:
        clock = [0.0]
        sleeps: List[float] = []

        def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            clock[0] += seconds

        policy = RetryPolicy(
            deadline=10.0, sleep=sleep, clock=lambda: clock[0], rng=random.Random(seed).random
        )

        def down() -> None:
            raise SwitchboardError(grpc.StatusCode.UNAVAILABLE, "connection refused")

        with pytest.raises(SwitchboardError):
            policy.run(down)
        assert sum(sleeps) <= 10.0
        return sleeps

    schedules = [schedule(seed) for seed in range(200)]
    bases = [min(0.05 * 2**i, 2.0) for i in range(12)]
    for sleeps in schedules:
        assert all(0 <= s <= bases[i] for i, s in enumerate(sleeps[:12]))
    # The k-th retries of 200 publishers cover [0, base] rather than bunching.
    for k in range(6):
        fractions = [s[k] / bases[k] for s in schedules]
        tenths = [0] * 10
        for f in fractions:
            tenths[min(int(f * 10), 9)] += 1
        assert all(count > 0 for count in tenths) and max(tenths) < 50, (k, tenths)
    firsts = {round(s[0], 6) for s in schedules}
    assert len(firsts) > 190
    backoff = Backoff(0.05, 2.0, rng=lambda: 1.0)
    assert [backoff.next_delay() for _ in range(8)] == bases[:8]


def test_non_retryable_refusals_are_not_retried_by_any_path(broker: Broker) -> None:
    sleeps: List[float] = []
    policy = RetryPolicy(deadline=TIMEOUT, sleep=sleeps.append)
    with client_for(broker, retry=policy, circuit_breaker=CircuitPolicy(1, 60.0)) as client:
        for channel, payload, reason in [
            ("crm..updated", "{}", "CHANNEL_INVALID"),
            ("crm.contact.updated", "not json", "PAYLOAD_NOT_JSON"),
        ]:
            with pytest.raises(SwitchboardError) as refused:
                client.publish(channel, payload)
            assert refused.value.reason == reason
        assert sleeps == []
        # A refusal is the broker's answer: the circuit (threshold 1) stays closed.
        assert client.circuit_state() is CircuitState.CLOSED
        assert list(client.history_all("crm.>", start="earliest")) == []

