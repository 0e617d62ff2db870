"""Failover to other cluster nodes (docs/CLIENT-RESILIENCE.md), against a three-node cluster of
real brokers started by the test: a node the client publishes through is killed (SIGKILL) and the
publishes go on through another node, every message stored once, in order."""

from __future__ import annotations

import logging
import pathlib
import threading
from typing import Any, Iterator, List, Tuple

import grpc
import pytest

from switchboard.v1 import cluster_pb2, cluster_pb2_grpc
from switchboard_client import (
    CircuitOpenError,
    CircuitPolicy,
    CircuitState,
    Client,
    Publish,
    RetryPolicy,
    SwitchboardError,
)

from conftest import TIMEOUT, Broker, start_cluster, wait_for


@pytest.fixture
def cluster(tmp_path: pathlib.Path) -> Iterator[Tuple[List[Broker], int]]:
    """Three nodes with a leader whose members all announced their public addresses; and the
    leader's id (node id i is `nodes[i - 1]`)."""
    nodes = start_cluster(tmp_path, 3)
    try:

        def status() -> Any:
            with grpc.insecure_channel(nodes[0].addr) as channel:
                try:
                    got = cluster_pb2_grpc.ClusterStub(channel).Status(
                        cluster_pb2.ClusterStatusRequest(), timeout=2
                    )
                except grpc.RpcError:
                    return None
            announced = len(got.nodes) == 3 and all(n.public_address for n in got.nodes)
            return got if got.leader_id and announced else None

        leader = wait_for(status, TIMEOUT, "a leader whose members announced their addresses")
        yield nodes, leader.leader_id
    finally:
        for node in nodes:
            node.kill()


class Publisher:
    """Publishes payloads "0".."n-1" one at a time on a thread, keeping the acks in order."""

    def __init__(self, client: Client, channel: str, n: int) -> None:
        self.acks: List[Any] = []
        self.error: List[BaseException] = []
        self.done = threading.Event()

        def run() -> None:
            try:
                for i in range(n):
                    self.acks.append(client.publish(channel, str(i)))
            except BaseException as err:  # handed to the test
                self.error.append(err)
            finally:
                self.done.set()

        threading.Thread(target=run, daemon=True).start()

    def finish(self) -> List[Any]:
        assert self.done.wait(TIMEOUT), f"the publisher did not finish: {len(self.acks)} acks"
        if self.error:
            raise self.error[0]
        return self.acks


def stored_once_in_order(reader: Client, channel: str, acks: List[Any], n: int) -> None:
    """Every payload "0".."n-1" is stored once, in order, at the offset its ack gave."""
    last = acks[-1].offset

    def stored() -> Any:
        # A follower applies what its leader committed shortly after the ack.
        messages = list(reader.history_all(channel, start="earliest"))
        return messages if messages and messages[-1].offset >= last else None

    messages = wait_for(stored, TIMEOUT, f"{channel} up to offset {last} on the reader's node")
    assert [m.payload.decode() for m in messages] == [str(i) for i in range(n)]
    assert [m.offset for m in messages] == [ack.offset for ack in acks]


def index(node_id: int) -> int:
    return node_id - 1


def test_publishes_fail_over_to_another_node_before_the_circuit_opens(
    cluster: Tuple[List[Broker], int], caplog: pytest.LogCaptureFixture
) -> None:
    nodes, leader = cluster
    follower = next(i for i in (1, 2, 3) if i != leader)
    follower_addr = nodes[index(follower)].addr
    # No retry policy, and a breaker that opens at the first failure that counts: only the
    # failover keeps the publishes going when the node the client talks to dies.
    client = Client(
        follower_addr,
        failover=True,
        circuit_breaker=CircuitPolicy(failure_threshold=1, cooldown=60.0),
    )
    caplog.set_level(logging.INFO, logger="switchboard_client.failover")
    with client:
        assert sorted(client.known_nodes()) == sorted(n.addr for n in nodes)
        assert client.known_nodes()[0] == follower_addr
        assert client.current_node() == follower_addr

        n = 300
        publisher = Publisher(client, "pyfailover.tick", n)
        wait_for(lambda: len(publisher.acks) >= 30 or publisher.done.is_set(), TIMEOUT, "30 acks")
        nodes[index(follower)].kill()
        at_kill = len(publisher.acks)
        acks = publisher.finish()
        assert at_kill < n, "the publisher was done before the kill"
        assert client.current_node() != follower_addr, "moved to another node"
        assert client.circuit_state() is CircuitState.CLOSED

        warnings = [r for r in caplog.records if r.name == "switchboard_client.failover"
                    and r.levelno == logging.WARNING]
        assert warnings and getattr(warnings[0], "from_node") == follower_addr
        settled = [r for r in caplog.records if r.name == "switchboard_client.failover"
                   and r.levelno == logging.INFO]
        assert settled and getattr(settled[-1], "node") == client.current_node()

    with Client(nodes[index(leader)].addr) as reader:
        stored_once_in_order(reader, "pyfailover.tick", acks, n)


def test_without_failover_the_kill_fails_the_publish_and_opens_the_circuit(
    cluster: Tuple[List[Broker], int]
) -> None:
    nodes, leader = cluster
    follower = next(i for i in (1, 2, 3) if i != leader)
    follower_addr = nodes[index(follower)].addr
    with Client(
        follower_addr, circuit_breaker=CircuitPolicy(failure_threshold=1, cooldown=60.0)
    ) as client:
        assert client.known_nodes() == [follower_addr]
        client.publish("pyfailover.off", "1")
        nodes[index(follower)].kill()
        with pytest.raises(SwitchboardError) as failed:
            client.publish("pyfailover.off", "2")
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
        assert not isinstance(failed.value, CircuitOpenError)
        assert client.circuit_state() is CircuitState.OPEN
        with pytest.raises(CircuitOpenError):
            client.publish("pyfailover.off", "3")
        assert client.current_node() == follower_addr
    with pytest.raises(ValueError):
        client.refresh_nodes()


def test_publishes_streams_and_the_outbox_on_a_killed_leader_fail_over_storing_each_once(
    cluster: Tuple[List[Broker], int]
) -> None:
    nodes, leader = cluster
    leader_addr = nodes[index(leader)].addr
    survivor = next(i for i in (1, 2, 3) if i != leader)

    def connect() -> Client:
        # A retry policy as well: the survivors answer NO_LEADER until they elected a leader.
        return Client(
            leader_addr,
            failover=True,
            retry=RetryPolicy(deadline=TIMEOUT, initial_backoff=0.02, max_backoff=0.5),
        )

    # One client per way of publishing: each must move to another node by itself.
    single, streaming, queueing = connect(), connect(), connect()
    try:
        for client in (single, streaming, queueing):
            assert len(client.known_nodes()) == 3

        n = 200
        publisher = Publisher(single, "pyfailover.leader", n)

        streamed = 2000
        stream_acks: List[Any] = []
        stream_error: List[BaseException] = []
        stream_done = threading.Event()

        def stream() -> None:
            messages = (Publish("pyfailover.stream", str(i)) for i in range(streamed))
            try:
                for result in streaming.publish_stream(messages, max_in_flight=50):
                    if result.error is not None:
                        raise result.error
                    stream_acks.append(result.ack)
            except BaseException as err:  # handed to the test
                stream_error.append(err)
            finally:
                stream_done.set()

        threading.Thread(target=stream, daemon=True).start()

        outboxed = 200
        outbox = queueing.outbox(initial_backoff=0.02, max_backoff=0.5)
        receipts = [outbox.publish("pyfailover.outbox", str(i)) for i in range(outboxed // 2)]

        wait_for(lambda: len(publisher.acks) >= 30 or publisher.done.is_set(), TIMEOUT, "acks")
        wait_for(lambda: len(stream_acks) >= 100 or stream_done.is_set(), TIMEOUT, "stream acks")
        wait_for(lambda: receipts[19].done(), TIMEOUT, "20 outbox messages stored")
        nodes[index(leader)].kill()
        at_kill = (len(publisher.acks), len(stream_acks))
        receipts += [
            outbox.publish("pyfailover.outbox", str(i)) for i in range(outboxed // 2, outboxed)
        ]

        acks = publisher.finish()
        assert stream_done.wait(TIMEOUT), f"the stream did not finish: {len(stream_acks)} acks"
        if stream_error:
            raise stream_error[0]
        assert outbox.flushed(TIMEOUT), f"the outbox still holds {len(outbox)} messages"
        outbox_acks = [receipt.result(0) for receipt in receipts]
        outbox.close()
        assert at_kill[0] < n and at_kill[1] < streamed, f"done before the kill: {at_kill}"
        for client in (single, streaming, queueing):
            assert client.current_node() != leader_addr
    finally:
        for client in (single, streaming, queueing):
            client.close()

    with Client(nodes[index(survivor)].addr) as reader:
        stored_once_in_order(reader, "pyfailover.leader", acks, n)
        stored_once_in_order(reader, "pyfailover.stream", stream_acks, streamed)
        stored_once_in_order(reader, "pyfailover.outbox", outbox_acks, outboxed)
