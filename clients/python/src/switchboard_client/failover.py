"""Failing over to another node of a cluster, as the Rust client does (docs/CLIENT-RESILIENCE.md).

A client that was given one node's address learns the others' public addresses (from the cluster
status RPC, `Cluster/Status`, and from `Client(nodes=[...])`), and a publish that fails because the
node it talks to is unhealthy (a lost connection, `NO_LEADER`, ...: an endpoint failure, see
`retry.is_endpoint_failure`) is sent to the next known node before the failure counts for the
retry policy and the circuit breaker. Any node takes a publish: a follower forwards it to the
leader.

Why this cannot duplicate: a message sent under failover always carries an idempotency key (the
caller's, or a UUID given before the first send), the same on every node, and the nodes share one
dedup table (it is replicated state), so a message the failed node had in fact stored is answered
`duplicate` by the next. Ephemeral messages have no key and are at most once: they go to the
current node only.

Visible: `Client.current_node()`, `Client.known_nodes()`, and the logger
`switchboard_client.failover`: a warning for each node given up on (extra fields `from_node`,
`to_node`, `error`), info when publishes settle on another node (extra field `node`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import grpc

from switchboard.v1 import broker_pb2, broker_pb2_grpc, cluster_pb2, cluster_pb2_grpc

from .errors import SwitchboardError
from .retry import is_endpoint_failure

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("switchboard_client.failover")


def node_target(address: str) -> str:
    """`host:port` for a node's address, which may also be given as a URL (`http://host:port/`)."""
    address = address.strip()
    if "://" in address:
        address = address.split("://", 1)[1]
    return address.rstrip("/")


@dataclass
class _Node:
    target: str
    # Created on first use: a node that is never needed costs no connection.
    channel: Optional[grpc.Channel] = None
    broker: Any = None
    # The client's own channel is the client's to close.
    owned: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)


class Failover:
    """The known nodes of a client's cluster and the one publishes go to first (`current`), shared
    by every thread using the client."""

    def __init__(self, client: "Client") -> None:
        self._client = client
        self._lock = threading.Lock()
        own = _Node(client.target, client._channel, client._broker, owned=False)
        self._nodes: List[_Node] = [own]
        self._current = 0

    def add(self, address: str) -> None:
        """Adds the node at `address` (`host:port` or a URL) unless it is known."""
        target = node_target(address)
        if not target:
            return
        with self._lock:
            if any(node.target == target for node in self._nodes):
                return
            self._nodes.append(_Node(target))
        log.debug("failover: learned a cluster node %s", target, extra={"node": target})

    def targets(self) -> List[str]:
        """The addresses of the known nodes, the client's own first."""
        with self._lock:
            return [node.target for node in self._nodes]

    def current(self) -> str:
        with self._lock:
            return self._nodes[self._current].target

    def _snapshot(self) -> Tuple[List[_Node], int]:
        with self._lock:
            return list(self._nodes), self._current

    def _open(self, node: _Node) -> Tuple[grpc.Channel, Any]:
        """The node's channel and `Broker` stub, the channel opened on first use."""
        with node.lock:
            if node.channel is None or node.broker is None:
                node.channel = self._client._open_channel(own_connection=False, target=node.target)
                node.broker = broker_pb2_grpc.BrokerStub(node.channel)
            return node.channel, node.broker

    def _broker(self, node: _Node) -> Any:
        return self._open(node)[1]

    def refresh(self, timeout: Optional[float]) -> List[str]:
        """Asks the known nodes, the current one first, for the cluster's members, adds the public
        address of each, and returns the known addresses. Raises the last node's error when none
        answered."""
        nodes, current = self._snapshot()
        last: Optional[SwitchboardError] = None
        for step in range(len(nodes)):
            node = nodes[(current + step) % len(nodes)]
            channel, _ = self._open(node)
            stub = cluster_pb2_grpc.ClusterStub(channel)
            try:
                status = stub.Status(
                    cluster_pb2.ClusterStatusRequest(),
                    timeout=timeout,
                    metadata=self._client._metadata(),
                )
            except grpc.RpcError as err:
                last = SwitchboardError.from_rpc_error(err)
                continue
            for member in status.nodes:
                if member.public_address:
                    self.add(member.public_address)
            return self.targets()
        raise last if last is not None else SwitchboardError(grpc.StatusCode.UNAVAILABLE, "no node")

    def publish(
        self, request: broker_pb2.PublishRequest, timeout: Optional[float]
    ) -> broker_pb2.PublishAck:
        """Sends `request` to the current node and, on an endpoint failure, to the next known
        node, each at most once; the first node that answers becomes the current one. Raises the
        last node's error when every node failed (or the first one's for an ephemeral message)."""
        nodes, current = self._snapshot()
        tries = 1 if request.ephemeral else len(nodes)
        step = 0
        while True:
            index = (current + step) % len(nodes)
            node = nodes[index]
            try:
                ack = self._client._call(self._broker(node).Publish, request, timeout)
            except SwitchboardError as error:
                if is_endpoint_failure(error) and step + 1 < tries:
                    following = nodes[(index + 1) % len(nodes)].target
                    log.warning(
                        "failover: %s did not take the publish (%s), trying %s",
                        node.target,
                        error,
                        following,
                        extra={"from_node": node.target, "to_node": following, "error": error},
                    )
                    step += 1
                    continue
                if step > 0 and not is_endpoint_failure(error):
                    # A refusal is an answer: that node is up.
                    self._settle(current, index)
                raise
            if step > 0:
                self._settle(current, index)
            return ack

    def stream_node(self) -> Tuple[int, Any]:
        """The current node, for a publish stream: its index and its `Broker` stub."""
        with self._lock:
            index = self._current
            node = self._nodes[index]
        return index, self._broker(node)

    def stream_failed(self, index: int, error: SwitchboardError) -> None:
        """A publish stream on node `index` broke with an endpoint failure: the next one goes to
        the next known node (unless another publish moved the current node meanwhile)."""
        with self._lock:
            if self._current != index or len(self._nodes) < 2:
                return
            following = (index + 1) % len(self._nodes)
            self._current = following
            source, target = self._nodes[index].target, self._nodes[following].target
        log.warning(
            "failover: a publish stream broke on %s (%s), the next one goes to %s",
            source,
            error,
            target,
            extra={"from_node": source, "to_node": target, "error": error},
        )

    def _settle(self, was: int, index: int) -> None:
        """Makes `index` the current node, unless another publish moved it since `was`."""
        with self._lock:
            if self._current != was or index >= len(self._nodes):
                return
            self._current = index
            target = self._nodes[index].target
        log.info("failover: publishing through %s", target, extra={"node": target})

    def close(self) -> None:
        with self._lock:
            nodes = list(self._nodes)
        for node in nodes:
            with node.lock:
                if node.owned and node.channel is not None:
                    node.channel.close()
