"""`kms.net.write_now` against real TCP connections on 127.0.0.1: bytes leave in the call when
nothing waits ahead of them, never overtake what Twisted has buffered, and none are lost when the
kernel takes only part."""

from __future__ import annotations

import socket
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from kms.net import write_now


class _Capture(Protocol):
    def connectionMade(self) -> None:
        self.factory.connected.callback(self.transport)  # type: ignore[attr-defined]


def _read_exactly(client: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        piece = client.recv(min(count - len(data), 65536))
        if not piece:
            break
        data += piece
    return bytes(data)


class WriteNowTests(TestCase):
    @inlineCallbacks
    def setUp(self) -> Generator[Deferred[Any], Any, None]:
        factory = Factory.forProtocol(_Capture)
        factory.connected = Deferred()  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        self.addCleanup(self.client.close)
        self.transport = yield factory.connected
        self.addCleanup(self.transport.abortConnection)

    def test_sent_within_the_call(self) -> None:
        """The reactor does not run between write_now and recv, so only a direct send can arrive."""
        write_now(self.transport, b"+OK hello\r\n")
        self.assertEqual(_read_exactly(self.client, 11), b"+OK hello\r\n")

    @inlineCallbacks
    def test_never_overtakes_buffered_bytes(self) -> Generator[Deferred[Any], Any, None]:
        self.transport.write(b"first ")  # Twisted holds this until the reactor's next turn
        write_now(self.transport, b"second")
        self.client.setblocking(False)
        self.assertRaises(BlockingIOError, self.client.recv, 100)
        self.client.settimeout(5)
        received = yield deferToThread(_read_exactly, self.client, 12)
        self.assertEqual(received, b"first second")

    @inlineCallbacks
    def test_what_the_kernel_refuses_is_buffered(self) -> Generator[Deferred[Any], Any, None]:
        """Far more than the socket buffers hold: the rest goes out later, in order, complete."""
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        payload = bytes(range(256)) * 8_000  # 2 MB
        write_now(self.transport, payload)
        self.assertTrue(self.transport.dataBuffer or self.transport._tempDataBuffer)
        write_now(self.transport, b"tail")
        received = yield deferToThread(_read_exactly, self.client, len(payload) + 4)
        self.assertEqual(len(received), len(payload) + 4)
        self.assertTrue(received == payload + b"tail")
