"""The on-disk outbox (`Client.outbox_on_disk`, docs/CLIENT-RESILIENCE.md): messages survive the
outbox and the client being closed and opened again, a second outbox on the file is refused, a
torn or corrupt tail is dropped with a warning, the bounds hold, and the file is the Rust client's
format (checked by a reader written here from the documented layout, not with the package's own).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import struct
import subprocess
import sys
import zlib
from typing import Any, List, Tuple

import pytest

from switchboard.v1 import broker_pb2
from switchboard_client import (
    Client,
    OutboxFullError,
    OutboxOptions,
    OutboxStorageError,
    Publish,
)
from switchboard_client.outbox_file import Journal

from conftest import Broker

TIMEOUT = 30.0
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]
FAST = OutboxOptions(max_backoff=0.2)


def client_for(broker: Broker) -> Client:
    return Client(broker.addr, options=FAST_RECONNECT)


def stored(client: Client, pattern: str) -> List[broker_pb2.Message]:
    return list(client.history_all(pattern, start="earliest"))


def numbers(messages: List[broker_pb2.Message]) -> List[int]:
    return [json.loads(m.payload)["n"] for m in messages]


def message(n: int, key: str = "") -> broker_pb2.PublishRequest:
    return Publish("tele.disk.n", json.dumps({"n": n}), idempotency_key=key or f"key-{n}").request()


# The documented layout, read independently of switchboard_client.outbox_file:
# [length u32 LE][crc32 u32 LE of kind + body][kind u8][body]; kind 1 QUEUED (a PublishRequest),
# kind 2 DONE (u64 LE: how many QUEUED records from the start are answered).


def spec_record(kind: int, body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + struct.pack("<I", zlib.crc32(bytes([kind]) + body)) + bytes([kind]) + body


def spec_read(data: bytes) -> Tuple[List[Tuple[int, bytes]], int]:
    """Every whole, intact record as (kind, body), and where they end."""
    records = []
    at = 0
    while len(data) - at >= 9:
        length, crc = struct.unpack_from("<II", data, at)
        kind = data[at + 8]
        body = data[at + 9 : at + 9 + length]
        if len(body) < length or zlib.crc32(bytes([kind]) + body) != crc:
            break
        records.append((kind, body))
        at += 9 + length
    return records, at


def queued_in(path: pathlib.Path) -> List[broker_pb2.PublishRequest]:
    records, end = spec_read(path.read_bytes())
    assert end == path.stat().st_size, "no damaged tail in a file the client wrote"
    out = []
    for kind, body in records:
        if kind == 1:
            request = broker_pb2.PublishRequest()
            request.ParseFromString(body)
            out.append(request)
    return out


def test_queued_messages_survive_close_and_reopen_and_are_stored_once_in_order(
    broker: Broker, tmp_path: pathlib.Path, caplog: Any
) -> None:
    path = tmp_path / "outbox.log"
    addr = broker.addr
    client = client_for(broker)
    outbox = client.outbox_on_disk(path, FAST)
    for n in range(2):
        outbox.publish("tele.disk.n", json.dumps({"n": n}))
    assert outbox.flushed(timeout=TIMEOUT)
    assert path.stat().st_size == 0, "truncated once everything was answered"

    broker.kill()
    receipts = [outbox.publish("tele.disk.n", json.dumps({"n": n})) for n in range(2, 20)]
    keys = [r.idempotency_key for r in receipts]
    # On disk when publish returned, in order, with their keys.
    assert [r.idempotency_key for r in queued_in(path)] == keys

    # A second outbox on the file, in this process and in another, is refused.
    with pytest.raises(OutboxStorageError) as refused:
        client.outbox_on_disk(path)
    assert "another outbox" in str(refused.value) and refused.value.path == str(path)
    other = subprocess.run(
        [sys.executable, "-c",
         "import sys\nfrom switchboard_client.outbox_file import Journal\n"
         "from switchboard_client import OutboxStorageError\n"
         "try:\n    Journal.open(sys.argv[1])\nexcept OutboxStorageError:\n    sys.exit(3)\n",
         str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert other.returncode == 3, other.stderr

    outbox.close()
    client.close()
    # A torn write: the first half of one more record.
    torn = spec_record(1, message(99).SerializeToString())
    with open(path, "ab") as file:
        file.write(torn[: len(torn) // 2])

    caplog.set_level(logging.INFO, logger="switchboard_client.outbox")
    with client_for(broker) as client, client.outbox_on_disk(path, FAST) as outbox:
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "switchboard_client.outbox"]
        assert len(warnings) == 1 and warnings[0].dropped_bytes == len(torn) // 2
        assert len(outbox) == 18
        last = outbox.publish("tele.disk.n", json.dumps({"n": 20}))
        assert not outbox.flushed(timeout=0.2), "the broker is still down"
        broker.start(addr)
        assert outbox.flushed(timeout=TIMEOUT)
        assert last.result(timeout=TIMEOUT).offset > 0
        messages = stored(client, "tele.>")
        assert numbers(messages) == list(range(21))
        assert [m.idempotency_key for m in messages[2:20]] == keys
        assert path.stat().st_size == 0


def test_a_replayed_message_the_broker_had_stored_is_answered_duplicate_not_stored_again(
    broker: Broker, tmp_path: pathlib.Path
) -> None:
    # A crash after the broker stored messages and before their answers reached the file: the
    # file still has them queued. Built with the journal alone, as the crashed process left it.
    path = tmp_path / "outbox.log"
    with client_for(broker) as client:
        for n in range(3):
            client.publish(Publish("tele.disk.n", json.dumps({"n": n}), idempotency_key=f"key-{n}"))
        journal = Journal.open(path).journal
        for n in range(5):
            journal.append_queued(message(n))
        journal.mark_done()  # the first answer reached the file; the next two did not
        journal.close()
        with client.outbox_on_disk(path, FAST) as outbox:
            assert len(outbox) == 4
            assert outbox.flushed(timeout=TIMEOUT)
        messages = stored(client, "tele.>")
        assert numbers(messages) == [0, 1, 2, 3, 4]
        assert [m.idempotency_key for m in messages] == [f"key-{n}" for n in range(5)]
        assert path.stat().st_size == 0


def test_a_corrupt_record_ends_the_replay_with_a_warning_and_the_records_before_survive(
    broker: Broker, tmp_path: pathlib.Path, caplog: Any
) -> None:
    path = tmp_path / "outbox.log"
    good = b"".join(spec_record(1, message(n).SerializeToString()) for n in range(3))
    damaged = bytearray(spec_record(1, message(3).SerializeToString()))
    damaged[-1] ^= 0xFF  # a flipped bit in the body: the checksum fails
    after = spec_record(1, message(4).SerializeToString())
    path.write_bytes(good + bytes(damaged) + after)

    caplog.set_level(logging.WARNING, logger="switchboard_client.outbox")
    with client_for(broker) as client, client.outbox_on_disk(path, FAST) as outbox:
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "switchboard_client.outbox"]
        assert len(warnings) == 1
        assert (warnings[0].offset, warnings[0].dropped_bytes) == (len(good), len(damaged) + len(after))
        assert len(outbox) == 3
        assert outbox.flushed(timeout=TIMEOUT)
        assert numbers(stored(client, "tele.>")) == [0, 1, 2]


@pytest.mark.parametrize(
    "tail",
    [
        b"\xff" * 20,  # garbage: a length far past the end
        struct.pack("<II", 10, 0) + b"\x01",  # a header whose body never came
        b"\x05\x00",  # half a header
        spec_record(7, b"x"),  # an intact record of a kind nobody writes
        spec_record(1, b"\xff\xff\xff"),  # an intact QUEUED record whose body is not a request
    ],
)
def test_a_damaged_tail_is_dropped_and_the_file_rewritten_without_it(
    tmp_path: pathlib.Path, tail: bytes, caplog: Any
) -> None:
    path = tmp_path / "outbox.log"
    good = b"".join(spec_record(1, message(n).SerializeToString()) for n in range(3))
    path.write_bytes(good + tail)
    caplog.set_level(logging.WARNING, logger="switchboard_client.outbox")
    replayed = Journal.open(path)
    try:
        assert [r.idempotency_key for r in replayed.pending] == ["key-0", "key-1", "key-2"]
        assert replayed.dropped_bytes == len(tail)
        assert any(r.levelno == logging.WARNING for r in caplog.records)
        assert path.read_bytes() == good, "rewritten with the pending messages only"
        assert not (tmp_path / "outbox.log.compacting").exists()
    finally:
        replayed.journal.close()


def test_the_bounds_hold_and_replayed_messages_are_kept_past_them(
    broker: Broker, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "outbox.log"
    addr = broker.addr
    broker.kill()
    with client_for(broker) as client:
        with client.outbox_on_disk(path, OutboxOptions(max_messages=3, max_backoff=0.2)) as outbox:
            for n in range(3):
                outbox.publish("tele.disk.n", json.dumps({"n": n}))
            with pytest.raises(OutboxFullError) as full:
                outbox.publish("tele.disk.n", '{"n": 3}')
            assert (full.value.messages, full.value.max_messages) == (3, 3)
        assert [json.loads(r.payload)["n"] for r in queued_in(path)] == [0, 1, 2], "the refused one is not on disk"

        # Opened again with smaller bounds: all three are queued, new ones refused until room.
        one = message(0).ByteSize() + 36 + 4
        with client.outbox_on_disk(path, max_messages=2, max_bytes=10 * one, max_backoff=0.2) as outbox:
            assert len(outbox) == 3
            with pytest.raises(OutboxFullError):
                outbox.publish("tele.disk.n", '{"n": 3}')
            assert len(queued_in(path)) == 3
            broker.start(addr)
            assert outbox.flushed(timeout=TIMEOUT)
            outbox.publish("tele.disk.n", '{"n": 3}')
            assert outbox.flushed(timeout=TIMEOUT)

        broker.kill()
        with client.outbox_on_disk(path, max_bytes=2 * one, max_backoff=0.2) as by_bytes:
            by_bytes.publish("tele.disk.n", '{"n": 4}')
            by_bytes.publish("tele.disk.n", '{"n": 5}')
            with pytest.raises(OutboxFullError) as over_bytes:
                by_bytes.publish("tele.disk.n", '{"n": 6}')
            assert over_bytes.value.max_bytes == 2 * one and over_bytes.value.bytes <= 2 * one
            assert len(queued_in(path)) == 2
            broker.start(addr)
            assert by_bytes.flushed(timeout=TIMEOUT)
        assert numbers(stored(client, "tele.>")) == [0, 1, 2, 3, 4, 5]
        assert path.stat().st_size == 0


def test_the_file_is_the_documented_format(tmp_path: pathlib.Path) -> None:
    """What Python writes is read back by the documented rules (the Rust client's parser follows
    the same rules), and a file built from those rules alone is replayed by Python."""
    path = tmp_path / "outbox.log"
    journal = Journal.open(path).journal
    requests = [message(n) for n in range(4)]
    for request in requests:
        journal.append_queued(request)
    journal.mark_done()
    journal.mark_done()
    journal.close()

    data = path.read_bytes()
    records, end = spec_read(data)
    assert end == len(data)
    assert [kind for kind, _ in records] == [1, 1, 1, 1, 2, 2]
    assert [body for _, body in records[:4]] == [r.SerializeToString() for r in requests]
    assert [struct.unpack("<Q", body)[0] for _, body in records[4:]] == [1, 2]
    # The first header, byte by byte: length, CRC32 of kind and body, kind.
    body = requests[0].SerializeToString()
    assert data[:9] == struct.pack("<IIB", len(body), zlib.crc32(b"\x01" + body), 1)

    # A file written from the rules alone (as the Rust client writes it) is replayed.
    path.write_bytes(
        b"".join(spec_record(1, r.SerializeToString()) for r in requests)
        + spec_record(2, struct.pack("<Q", 3))
    )
    replayed = Journal.open(path)
    try:
        assert [r.idempotency_key for r in replayed.pending] == ["key-3"]
        assert replayed.dropped_bytes == 0
        assert path.read_bytes() == spec_record(1, requests[3].SerializeToString())
    finally:
        replayed.journal.close()
    assert os.path.exists(str(path) + ".lock")
