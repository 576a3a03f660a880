"""Connection limits end to end: the real service tree on 127.0.0.1, clients bound to 127.0.0.x.

smtplib, poplib and imaplib (and raw TCP / TLS sockets where a client library would hide what the
server said) connect from 127.0.0.2, 127.0.0.3 and 127.0.0.1 (Linux routes all of 127/8 to lo).
Every listener's factory shares one counter; the tests read it from the listener services.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from kms.limits import ConnectionCounter
from tests.support.clients import IMAPFrom, POP3From
from tests.support.server import RunningServer, write_config

LISTENERS = ("smtp", "pop3", "imap", "imaps")
NEIGHBOUR, EXEMPT, HOME = "127.0.0.2", "127.0.0.3", "127.0.0.1"
PER_ADDRESS = b"Too many connections from your address, try again later"
BUSY = b"Too many connections, server busy, try again later"


class _SMTP(smtplib.SMTP):
    def __init__(self, port: int, source: str) -> None:
        super().__init__("127.0.0.1", port, timeout=30, source_address=(source, 0))






def _raw(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), 30, source_address=(source, 0))


def _line(sock: socket.socket) -> bytes:
    """The first line the server sends (one recv is not enough under TLS or on a slow machine)."""
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


class _LimitsServer(TestCase):
    timeout = 120
    limits = ""
    local = '["10.9.9.9"]'

    async def setUp(self) -> None:
        directory = Path(self.mktemp()).absolute()
        listeners = {name: "tcp:0:interface=127.0.0.1" for name in LISTENERS}
        extra = f"[limits]\n{self.limits}"
        path = write_config(directory, listeners=listeners, local=self.local, extra=extra)
        self.server = RunningServer(path)
        await self.server.start()
        self.addCleanup(self.server.stop)
        self.tls = ssl.create_default_context(cafile=str(directory / "tls" / "server.pem"))
        self.tls.check_hostname = False

    @property
    def counter(self) -> ConnectionCounter:
        """The one counter of every listener (imaps: inside the TLS wrapper)."""
        factories = [self.server.service.getServiceNamed(name).factory for name in LISTENERS]
        counters = {id(getattr(f, "counter", None) or f.wrappedFactory.counter): f for f in factories}
        self.assertEqual(len(counters), 1)
        counter: ConnectionCounter = factories[0].counter
        return counter

    async def settled(self, done: Callable[[], bool]) -> None:
        """Let the reactor run until ``done()`` (connection closes reach the server a turn later)."""
        while not done():
            await deferLater(reactor, 0.01, lambda: None)

    def security_log(self) -> str:
        return (self.server.store / "logs" / "security.log").read_text()


class PerAddressTests(_LimitsServer):
    limits = "max_connections_per_ip = 3\n"

    async def test_fourth_connection_refused_on_each_protocol(self) -> None:
        """Three connections from 127.0.0.2 over three protocols fill its quota; a fourth on any
        listener gets that protocol's refusal; 127.0.0.1 is unaffected; closing one lets one in."""
        smtp_port, pop3_port, imap_port = (self.server.port(n) for n in ("smtp", "pop3", "imap"))
        held_smtp = await deferToThread(_SMTP, smtp_port, NEIGHBOUR)
        held_pop3 = await deferToThread(POP3From, NEIGHBOUR, pop3_port)
        held_imap = await deferToThread(IMAPFrom, NEIGHBOUR, imap_port)
        self.assertEqual((self.counter.count(NEIGHBOUR), self.counter.total), (3, 3))

        def refused_smtp() -> tuple[int, bytes]:
            with self.assertRaises(smtplib.SMTPConnectError) as caught:
                _SMTP(smtp_port, NEIGHBOUR)
            return caught.exception.smtp_code, caught.exception.smtp_error

        def refused_pop3() -> str:
            with self.assertRaises(poplib.error_proto) as caught:
                POP3From(NEIGHBOUR, pop3_port)
            return str(caught.exception.args[0], "ascii")

        def refused_imap() -> str:
            with self.assertRaises(imaplib.IMAP4.error) as caught:
                IMAPFrom(NEIGHBOUR, imap_port)
            return str(caught.exception)

        code, text = await deferToThread(refused_smtp)
        self.assertEqual((code, text), (421, b"4.7.0 mx.example.test " + PER_ADDRESS))
        self.assertEqual(await deferToThread(refused_pop3), "-ERR [SYS/TEMP] " + PER_ADDRESS.decode())
        self.assertIn("[UNAVAILABLE] " + PER_ADDRESS.decode(), await deferToThread(refused_imap))
        self.assertEqual(self.counter.total, 3)  # refusals hold no slot

        # The neighbour's full quota does not touch 127.0.0.1, over plain text or STARTTLS.
        def home() -> None:
            with _SMTP(smtp_port, HOME) as s:
                s.starttls(context=self.tls)
                self.assertEqual(s.ehlo()[0], 250)
                self.assertEqual(s.noop()[0], 250)
            p = POP3From(HOME, pop3_port)
            p.quit()
            m = IMAPFrom(HOME, imap_port)
            m.logout()

        await deferToThread(home)

        await deferToThread(held_pop3.quit)
        await self.settled(lambda: self.counter.count(NEIGHBOUR) == 2)
        again = await deferToThread(IMAPFrom, NEIGHBOUR, imap_port)
        self.assertEqual(self.counter.count(NEIGHBOUR), 3)
        for client in (held_smtp, held_imap, again):
            await deferToThread(client.quit if isinstance(client, smtplib.SMTP) else client.logout)
        await self.settled(lambda: self.counter.total == 0)

        # One security.log line for 127.0.0.2 in this minute, however many refusals.
        lines = [line for line in self.security_log().splitlines() if "connection-refused" in line]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("[127.0.0.2] connection-refused", lines[0])
        self.assertIn('reason="too many from this address" limit=3 held_back=0', lines[0])

    async def test_implicit_tls_counts_and_releases(self) -> None:
        """imaps: 20 TLS sessions opened and closed leave the count at 0; handshakes that never
        complete hold their slots until the client goes; a refusal arrives inside TLS."""
        port = self.server.port("imaps")

        def sessions() -> None:
            for _ in range(20):
                m = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=self.tls, timeout=30)
                m.logout()

        await deferToThread(sessions)
        await self.settled(lambda: self.counter.total == 0)

        silent = [await deferToThread(_raw, port, NEIGHBOUR) for _ in range(3)]  # TCP only, no handshake
        await self.settled(lambda: self.counter.count(NEIGHBOUR) == 3)

        def refused_over_tls() -> bytes:
            with self.tls.wrap_socket(_raw(port, NEIGHBOUR)) as s:
                return _line(s)

        self.assertEqual(
            await deferToThread(refused_over_tls), b"* BYE [UNAVAILABLE] " + PER_ADDRESS + b"\r\n"
        )
        for sock in silent:
            sock.close()
        await self.settled(lambda: self.counter.total == 0)
        m = await deferToThread(IMAPFrom, NEIGHBOUR, self.server.port("imap"))
        await deferToThread(m.logout)


class ExemptTests(_LimitsServer):
    limits = 'max_connections_per_ip = 2\nexempt_group = "local"\n'
    local = '["127.0.0.3"]'

    async def test_exempt_group_not_limited(self) -> None:
        port = self.server.port("pop3")
        exempt = [await deferToThread(POP3From, EXEMPT, port) for _ in range(6)]
        self.assertEqual(self.counter.count(EXEMPT), 6)
        others = [await deferToThread(POP3From, NEIGHBOUR, port) for _ in range(2)]

        def refused() -> bytes:
            with _raw(port, NEIGHBOUR) as s:
                return _line(s)

        self.assertEqual(await deferToThread(refused), b"-ERR [SYS/TEMP] " + PER_ADDRESS + b"\r\n")
        for p in exempt + others:
            await deferToThread(p.quit)
        await self.settled(lambda: self.counter.total == 0)


class OverallTests(_LimitsServer):
    limits = "max_connections = 4\n"

    async def test_server_full(self) -> None:
        """Four connections fill the server for everyone, whatever their address; one closing
        makes room."""
        port = self.server.port("smtp")
        held = [await deferToThread(_SMTP, port, source) for source in (HOME, HOME, NEIGHBOUR, EXEMPT)]

        def refused(source: str, listener: str) -> bytes:
            with _raw(self.server.port(listener), source) as s:
                return _line(s)

        self.assertEqual(
            await deferToThread(refused, "127.0.0.4", "smtp"), b"421 4.3.2 mx.example.test " + BUSY + b"\r\n"
        )
        self.assertEqual(await deferToThread(refused, HOME, "imap"), b"* BYE [UNAVAILABLE] " + BUSY + b"\r\n")
        await deferToThread(held.pop().quit)
        await self.settled(lambda: self.counter.total == 3)
        m = await deferToThread(IMAPFrom, "127.0.0.4", self.server.port("imap"))
        await deferToThread(m.logout)
        for s in held:
            await deferToThread(s.quit)
        await self.settled(lambda: self.counter.total == 0)
        self.assertIn('reason="server full" limit=4', self.security_log())
