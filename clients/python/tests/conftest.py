"""A real broker per test: the debug binary, on port 0, with its data in a temp dir.

The binary is `$SWITCHBOARD_BINARY`, by default `target/debug/switchboard` of this repository
(`cargo build -p switchboard-broker --bin switchboard`). The broker prints `listening on ADDR` on
stdout once it accepts requests; the fixture reads that line, as tests/src/lib.rs does.
`start_cluster` starts a three-node static cluster on loopback the way tests/src/lib.rs does.
"""

from __future__ import annotations

import os
import pathlib
import queue
import socket
import subprocess
import threading
import time
from typing import Any, Callable, Iterable, Iterator, List, Optional, TypeVar

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
BINARY = pathlib.Path(os.environ.get("SWITCHBOARD_BINARY", ROOT / "target/debug/switchboard"))
START_TIMEOUT = 30.0

T = TypeVar("T")
TIMEOUT = 20.0


def wait_for(condition: Callable[[], Optional[T]], timeout: float = 10.0, what: str = "") -> T:
    """Polls `condition` until it returns something truthy, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.01)


class Broker:
    def __init__(
        self,
        data_dir: pathlib.Path,
        env: Optional[dict] = None,
        args: Iterable[str] = (),
    ) -> None:
        if not BINARY.exists():
            raise RuntimeError(
                f"{BINARY} does not exist: cargo build -p switchboard-broker --bin switchboard, "
                "or set SWITCHBOARD_BINARY"
            )
        self.data_dir = data_dir
        self.env = dict(env or {})
        self.args = list(args)
        self.log_path = data_dir.with_suffix(".log")
        self.process: Optional[subprocess.Popen[str]] = None
        self.addr = ""
        self.start("127.0.0.1:0")

    def start(self, listen: str) -> None:
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            [str(BINARY), "--listen", listen, "--data-dir", str(self.data_dir),
             "--admin-listen", "off", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "SWITCHBOARD_LOG_LEVEL": "info,openraft=warn", **self.env},
        )
        log.close()
        lines: "queue.Queue[Optional[str]]" = queue.Queue()
        stdout = self.process.stdout
        assert stdout is not None

        def read() -> None:
            for line in stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"broker did not start in time; log: {self.log()}") from None
            if line is None:
                raise RuntimeError(f"broker exited before listening; log: {self.log()}")
            if line.startswith("listening on "):
                self.addr = line[len("listening on "):].strip()
                return

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM and wait: a graceful stop, as an operator's restart would do."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def restart(self) -> None:
        """Stops the broker and starts it again on the same address and data."""
        self.stop()
        self.start(self.addr)


@pytest.fixture
def broker(tmp_path: pathlib.Path) -> Iterator[Broker]:
    running = Broker(tmp_path / "data")
    try:
        yield running
    finally:
        running.kill()


class Reader:
    """Iterates a stream on its own thread, so a test can wait for events with a deadline."""

    def __init__(self, stream: Iterable[Any]) -> None:
        self.events: "queue.Queue[Any]" = queue.Queue()
        self.error: List[BaseException] = []

        def run() -> None:
            try:
                for event in stream:
                    self.events.put(event)
            except BaseException as err:  # handed to the test
                self.error.append(err)
                self.events.put(err)

        threading.Thread(target=run, daemon=True).start()

    def take(self, n: int, timeout: float = TIMEOUT) -> List[Any]:
        got = []
        for _ in range(n):
            try:
                event = self.events.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"got {len(got)} of {n} events in {timeout}s: {got}") from None
            if isinstance(event, BaseException):
                raise event
            got.append(event)
        return got


def free_loopback_ports(n: int) -> List[int]:
    """`n` loopback ports that were free a moment ago (bound to port 0 together, then released):
    for the raft listeners every member of a static cluster names before it starts."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _start_cluster_once(root: pathlib.Path, n: int) -> List[Broker]:
    root.mkdir(parents=True, exist_ok=True)
    raft = [f"127.0.0.1:{port}" for port in free_loopback_ports(n)]
    members = ",".join(f"{i + 1}={addr}" for i, addr in enumerate(raft))
    nodes: List[Broker] = []
    try:
        for i, addr in enumerate(raft):
            env = {"SWITCHBOARD_CLUSTER_LISTEN": addr, "SWITCHBOARD_CLUSTER_MEMBERS": members}
            nodes.append(Broker(root / f"node{i + 1}", env, ["--node-id", str(i + 1)]))
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return nodes


def start_cluster(root: pathlib.Path, n: int = 3) -> List[Broker]:
    """Nodes 1..=n of one static cluster on loopback (`nodes[i]` is node i + 1). A raft port
    another process took between picking and binding starts the cluster again, on fresh ports
    and empty folders, a few times."""
    attempt = 1
    while True:
        try:
            return _start_cluster_once(root / f"try{attempt}", n)
        except RuntimeError as err:
            if attempt >= 4 or "Address already in use" not in str(err):
                raise
            attempt += 1
