"""TLS and bearer tokens: a broker with a self-signed certificate and an HS256 secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import pathlib
import subprocess
import time
from typing import Any, Iterator, Tuple

import grpc
import pytest

from switchboard_client import Client, SwitchboardError

from conftest import Broker, Reader

SECRET = b"python-client-test-secret-of-at-least-32-bytes"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(claims: dict) -> str:
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = hmac.new(SECRET, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(signature)}"


@pytest.fixture
def secured(tmp_path: pathlib.Path) -> Iterator[Tuple[Broker, bytes]]:
    cert, key, secret = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "hs256"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    secret.write_bytes(SECRET)
    broker = Broker(tmp_path / "data", env={
        "SWITCHBOARD_TLS_CERT_FILE": str(cert),
        "SWITCHBOARD_TLS_KEY_FILE": str(key),
        "SWITCHBOARD_AUTH_HS256_SECRET_FILE": str(secret),
    })
    try:
        yield broker, cert.read_bytes()
    finally:
        broker.kill()


def test_tls_with_a_bearer_token(secured: Tuple[Broker, bytes]) -> None:
    broker, ca = secured
    token = hs256_token({
        "sub": "py-test", "exp": int(time.time()) + 600,
        "sb": {"publish": ["crm.>"], "subscribe": ["crm.>"]},
    })
    with Client(broker.addr, root_certificates=ca, token=token) as client:
        with client.subscribe("crm.>") as sub:
            ack = client.publish("crm.contact.updated", '{"id": 1}')
            (first,) = Reader(sub).take(1)
            assert first.offset == ack.offset
        with pytest.raises(SwitchboardError) as denied:
            client.publish("billing.invoice.paid", "{}")
        assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert denied.value.reason == "PUBLISH_DENIED"

    with Client(broker.addr, root_certificates=ca) as anonymous:
        with pytest.raises(SwitchboardError) as missing:
            anonymous.publish("crm.contact.updated", "{}")
        assert missing.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert missing.value.reason == "TOKEN_MISSING"

    with Client(broker.addr) as plaintext:  # TLS listener, plain client: no broker answer
        with pytest.raises(SwitchboardError) as refused:
            plaintext.publish("crm.contact.updated", "{}", timeout=5)
        assert refused.value.reason is None
