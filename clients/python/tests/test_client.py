"""The Python client against a real broker (see conftest.py)."""

from __future__ import annotations

import json
import queue
import random
import threading
from typing import Any, Iterable, List

import grpc
import pytest

from switchboard.v1 import broker_pb2, reason_pb2
from switchboard_client import (
    Backoff,
    Client,
    Publish,
    RetryPolicy,
    SwitchboardError,
    retry_after,
)

from conftest import Broker, Reader, wait_for

TIMEOUT = 20.0


def test_publish_subscribe_round_trip_and_idempotency(broker: Broker) -> None:
    with Client(broker.addr) as client:
        with client.subscribe("crm.>") as sub:
            reader = Reader(sub)
            acks = [
                client.publish("crm.contact.updated", json.dumps({"n": n}), idempotency_key=f"k{n}")
                for n in range(3)
            ]
            messages = reader.take(3)
            assert [m.offset for m in messages] == [a.offset for a in acks]
            assert [json.loads(m.payload) for m in messages] == [{"n": 0}, {"n": 1}, {"n": 2}]
            assert {m.channel for m in messages} == {"crm.contact.updated"}
            assert messages[0].idempotency_key == "k0"
            again = client.publish(Publish("crm.contact.updated", '{"n": 0}', idempotency_key="k0"))
            assert again.duplicate and again.offset == acks[0].offset


def test_refusals_carry_code_reason_and_metadata(broker: Broker) -> None:
    with Client(broker.addr) as client:
        with pytest.raises(SwitchboardError) as refused:
            client.publish("crm..updated", "{}")
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.reason == "CHANNEL_INVALID"
        assert refused.value.reason_enum == reason_pb2.ERROR_REASON_CHANNEL_INVALID
        assert retry_after(refused.value) is None

        with pytest.raises(SwitchboardError) as bad_pattern:
            client.subscribe("orders")
        assert bad_pattern.value.reason == "PATTERN_INVALID"

        last = client.info().last_offset
        with pytest.raises(SwitchboardError) as beyond:
            client.subscribe("crm.>", start=last + 5)
        assert beyond.value.code == grpc.StatusCode.OUT_OF_RANGE
        assert beyond.value.reason == "START_BEYOND_END"
        assert beyond.value.metadata["next_offset"] == str(last + 1)


def test_publish_stream_answers_each_message_in_order(broker: Broker) -> None:
    with Client(broker.addr) as client:
        messages = [
            Publish("telemetry.widget.click", '{"x": 1}'),
            Publish("telemetry..click", '{"x": 2}'),
            Publish("telemetry.widget.click", "not json"),
            Publish("telemetry.widget.click", '{"x": 3}'),
        ]
        results = list(client.publish_stream(messages))
        assert [r.sequence for r in results] == [0, 1, 2, 3]
        assert results[0].ack and results[3].ack
        assert results[3].ack.offset > results[0].ack.offset
        assert results[1].error and results[1].error.reason == "CHANNEL_INVALID"
        assert results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert results[2].error and results[2].error.reason == "PAYLOAD_NOT_JSON"


def test_history_pages_without_the_from_keyword(broker: Broker) -> None:
    with Client(broker.addr) as client:
        offsets = [client.publish("orders.eu.created", f'{{"n": {n}}}').offset for n in range(25)]
        client.publish("other.thing.happened", "{}")

        page = client.history("orders.>", limit=10)
        assert [m.offset for m in page.messages] == offsets[:10]
        assert page.next_offset == offsets[10]
        page = client.history("orders.>", start=page.next_offset, limit=10)
        assert [m.offset for m in page.messages] == offsets[10:20]

        every = list(client.history_all("orders.>", page_size=10))
        assert [m.offset for m in every] == offsets
        ranged = list(client.history_all("orders.>", start=offsets[5], to_offset=offsets[7]))
        assert [m.offset for m in ranged] == offsets[5:8]
        with pytest.raises(SwitchboardError) as latest:
            client.history("orders.>", start="latest")
        assert latest.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_subscription_resumes_after_a_restart_with_no_gap_and_no_duplicate(broker: Broker) -> None:
    with Client(broker.addr) as client:
        with client.subscribe("tele.>", start="earliest") as sub:
            reader = Reader(sub)
            before = [client.publish("tele.a.b", f'{{"n": {n}}}').offset for n in range(5)]
            assert [m.offset for m in reader.take(5)] == before

            broker.stop()
            broker.start(broker.addr)
            # Published while the subscription is (most likely) still backing off: the resumed
            # subscription must deliver these from the store, after the last offset it had.
            retrying = RetryPolicy.within(TIMEOUT)
            after = [
                client.publish("tele.a.b", f'{{"n": {n}}}', retry=retrying).offset
                for n in range(5, 10)
            ]
            got = reader.take(5)
            assert [m.offset for m in got] == after
            assert [json.loads(m.payload)["n"] for m in got] == list(range(5, 10))
            assert sub.reconnects >= 1
            # Nothing more (no duplicate of an earlier message) arrives before a marker.
            marker = client.publish("tele.a.b", '{"n": "marker"}').offset
            assert [m.offset for m in reader.take(1)] == [marker]


def test_publish_retries_through_a_broker_outage_with_one_key(broker: Broker) -> None:
    client = Client(broker.addr)
    addr = broker.addr
    broker.stop()
    sleeps: List[float] = []
    policy = RetryPolicy(deadline=TIMEOUT, sleep=lambda s: (sleeps.append(s), threading.Event().wait(s)))
    result: "queue.Queue[Any]" = queue.Queue()

    def publish() -> None:
        try:
            result.put(client.publish("crm.contact.updated", '{"id": 1}', retry=policy))
        except BaseException as err:
            result.put(err)

    threading.Thread(target=publish, daemon=True).start()
    wait_for(lambda: len(sleeps) >= 1, TIMEOUT, "a failed attempt while the broker is down")
    broker.start(addr)
    ack = result.get(timeout=TIMEOUT)
    if isinstance(ack, BaseException):
        raise ack
    assert ack.offset >= 1 and not ack.duplicate
    stored = list(client.history_all("crm.>"))
    assert [m.offset for m in stored] == [ack.offset]
    assert stored[0].idempotency_key  # generated under the policy
    client.close()


def test_non_retryable_refusals_are_not_retried(broker: Broker) -> None:
    sleeps: List[float] = []
    policy = RetryPolicy(deadline=TIMEOUT, sleep=sleeps.append)
    with Client(broker.addr, retry=policy) as client:
        with pytest.raises(SwitchboardError) as refused:
            client.publish("crm..updated", "{}")
        assert refused.value.reason == "CHANNEL_INVALID"
        assert sleeps == []


def test_retry_table_matches_the_rust_client() -> None:
    def error(code: grpc.StatusCode, reason: Any = None, **metadata: str) -> SwitchboardError:
        return SwitchboardError(code, "", reason, metadata)

    unavailable = grpc.StatusCode.UNAVAILABLE
    for reason in ["NO_LEADER", "NOT_LEADER", "LEADER_UNREACHABLE", "NO_QUORUM", "SHUTTING_DOWN"]:
        assert retry_after(error(unavailable, reason)) == 0.0
    assert retry_after(error(unavailable)) == 0.0  # a lost connection
    assert retry_after(error(unavailable, "SOMETHING_NEWER")) is None
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_after(error(exhausted, "RATE_LIMITED", retry_after_ms="250")) == 0.25
    assert retry_after(error(exhausted, "RATE_LIMITED")) == 1.0
    assert retry_after(error(exhausted, "STORAGE_FULL")) is None
    assert retry_after(error(grpc.StatusCode.PERMISSION_DENIED, "PUBLISH_DENIED")) is None
    assert retry_after(error(grpc.StatusCode.FAILED_PRECONDITION, "LOOP_DETECTED")) is None


def test_full_jitter_spreads_the_retries_of_many_clients() -> None:
    rng = random.Random(7)
    base = 0.05
    firsts = [Backoff(base, 2.0, rng=rng.random).next_delay() for _ in range(1000)]
    assert all(0 <= d <= base for d in firsts)
    tenths = [0] * 10
    for delay in firsts:
        tenths[min(int(delay / base * 10), 9)] += 1
    assert all(count > 0 for count in tenths) and max(tenths) < 200
    backoff = Backoff(base, 0.2, rng=lambda: 1.0)
    assert [backoff.next_delay() for _ in range(4)] == [0.05, 0.1, 0.2, 0.2]


def test_entities_update_get_and_watch(broker: Broker) -> None:
    with Client(broker.addr) as client:
        first = client.update_entity("contact", "42", {"name": "Ada"}, writer="py-test")
        assert first.version == 1 and json.loads(first.fields) == {"name": "Ada"}

        with client.watch_entities("contact.*") as watch:
            reader = Reader(watch)
            snapshot, complete = reader.take(2)
            assert snapshot.WhichOneof("event") == "snapshot"
            assert snapshot.snapshot.key.id == "42"
            assert complete.WhichOneof("event") == "snapshot_complete"

            second = client.update_entity("contact", "42", {"phone": "+1"}, writer="py-test")
            (change,) = reader.take(1)
            assert change.WhichOneof("event") == "change"
            assert change.change.version == second.version == 2
            assert json.loads(change.change.fields) == {"name": "Ada", "phone": "+1"}

        got = client.get_entity("contact", "42")
        assert got is not None and got.version == 2
        assert client.get_entity("contact", "42", if_none_match=got.etag) is None

        with pytest.raises(SwitchboardError) as conflict:
            client.update_entity("contact", "42", {"x": 1}, writer="py-test", expected_version=1)
        assert conflict.value.code == grpc.StatusCode.ABORTED
        assert conflict.value.reason == "VERSION_CONFLICT"
        assert conflict.value.metadata["current_version"] == "2"

        with pytest.raises(SwitchboardError) as missing:
            client.get_entity("contact", "nobody")
        assert missing.value.reason == "ENTITY_NOT_FOUND"
        assert missing.value.code == grpc.StatusCode.NOT_FOUND


def _established_to(port: int) -> int:
    """TCP connections to `port` on this machine, from /proc/net/tcp{,6} (state 01, ESTABLISHED).

    grpcio connects to 127.0.0.1 through an IPv6 socket (a v4-mapped address): both tables count.
    """
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as table:
            for line in list(table)[1:]:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[3] == "01":
                    count += 1
    return count


def test_each_subscription_has_a_connection_of_its_own(broker: Broker) -> None:
    port = int(broker.addr.rsplit(":", 1)[1])
    with Client(broker.addr) as client:
        client.info()  # opens the shared connection used by unary calls
        wait_for(lambda: _established_to(port) == 1, TIMEOUT, "the shared connection")
        with client.subscribe("a.>"), client.subscribe("b.>"):
            # grpc-python would put both on the shared connection without the local pool.
            wait_for(lambda: _established_to(port) == 3, TIMEOUT, "one connection per subscription")


def test_batched_and_unbatched_subscriptions_see_every_message_once_in_order(broker: Broker) -> None:
    """Catching up from the start, a subscription that asks for batches gets several messages per
    event from the broker; one that does not (max_batch=1, as an older client) gets one per event.
    Both yield each message once, in offset order."""
    with Client(broker.addr) as client:
        acks = [client.publish("batch.py", json.dumps({"n": n})) for n in range(500)]
        offsets = [a.offset for a in acks]
        for max_batch in (256, 1):
            with client.subscribe("batch.py", start="earliest", max_batch=max_batch) as sub:
                messages = Reader(sub).take(len(offsets))
                assert [m.offset for m in messages] == offsets, max_batch
                assert [json.loads(m.payload)["n"] for m in messages] == list(range(500))
