"""The ESMTP protocol on a StringTransport: exact replies, ordering, limits, timers, AUTH, STARTTLS.

The backend is a recording double that can hold its answers (to test pipelining) and refuse; the
login session is a double around the real SASL mechanisms, so AUTH is tested end to end up to the
password check.  Regression tests for the Twisted bugs S1–S6 (audit §1.3) are marked as such.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from kms.auth.errors import AuthenticationFailed, TemporaryAuthFailure
from kms.auth.policy import SecurityPolicy, engine_policy
from kms.auth.sasl import Authenticated, SASLEngine
from kms.clientinfo import ClientInfo
from kms.ipgroups import parse_group
from kms.smtp.commands import DataReader
from kms.smtp.interfaces import Envelope, Refusal
from kms.smtp.server import BACKLOG_LIMIT, SMTPFactory, SMTPServer, SMTPSettings

HOST = "mx.example.test"
CONTEXT = object()  # stands in for an IOpenSSLServerConnectionCreator
SETTINGS = SMTPSettings(
    hostname=HOST,
    listener="smtp",
    banner="ESMTP",
    implicit_tls=False,
    require_auth=False,
    max_message_size=1000,
    max_recipients=3,
    max_errors=5,
    command_timeout=300,
    data_timeout=600,
    max_command_line=512,
)
EHLO_REPLY = (
    b"250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
    b"250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n"
)
PLAIN_OK = base64.b64encode(b"\0alice\0secret")
INTERNAL = object()  # a backend answer that fails with an unexpected exception


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# --- doubles -------------------------------------------------------------------------------------


class FakeSpool:
    def __init__(self) -> None:
        self.data = bytearray()
        self.size = 0
        self.discarded = 0
        self.fail_writes = False

    def write(self, data: bytes) -> None:
        if self.discarded:
            raise AssertionError("write after discard")
        if self.fail_writes:
            raise OSError(28, "No space left on device")
        self.data += data
        self.size += len(data)

    def discard(self) -> None:
        self.discarded += 1


class FakeBackend:
    """Records every call; answers at once or, with ``hold``, when the test calls `release`."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.refusals: dict[tuple[str, str], object] = {}
        self.spools: list[FakeSpool] = []
        self.delivered: list[tuple[Envelope, bytes]] = []
        self.deliver_answer: object = "QID1"
        self.new_spool_fails = False
        self.hold = False
        self.pending: list[tuple[Deferred[Any], object]] = []

    def _answer(self, result: object) -> Deferred[Any]:
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.pending.append((d, result))
            return d
        return self._fired(result)

    @staticmethod
    def _fired(result: object) -> Deferred[Any]:
        if isinstance(result, Exception):
            return fail(result)
        if result is INTERNAL:
            return fail(RuntimeError("backend bug"))
        return succeed(result)

    def release(self) -> None:
        d, result = self.pending.pop(0)
        self._fired(result).chainDeferred(d)

    def check_sender(self, client: ClientInfo, sender: str, params: dict[str, str | None]) -> Deferred[None]:
        self.calls.append(("MAIL", sender, dict(params)))
        return self._answer(self.refusals.get(("MAIL", sender)))

    def check_recipient(self, client: ClientInfo, sender: str, recipient: str) -> Deferred[str]:
        self.calls.append(("RCPT", recipient))
        return self._answer(self.refusals.get(("RCPT", recipient), f"route:{recipient}"))

    def new_spool(self) -> FakeSpool:
        if self.new_spool_fails:
            raise OSError(13, "Permission denied")
        spool = FakeSpool()
        self.spools.append(spool)
        return spool

    def deliver(self, envelope: Envelope, spool: FakeSpool) -> Deferred[str]:
        self.calls.append(("DELIVER",))
        self.delivered.append((envelope, bytes(spool.data)))
        return self._answer(self.deliver_answer)


def _policy(name: str, client: ClientInfo) -> bool:
    """LOGIN only over TLS, so 538 and the post-STARTTLS mechanism list can be tested."""
    return name != "LOGIN" or client.tls


class FakeSession:
    """A login session around the real PLAIN/LOGIN mechanisms; alice/secret is the only login."""

    def __init__(self, client: ClientInfo, test: SMTPServerTestCase) -> None:
        self.client = client
        self.test = test
        self.logouts = 0
        self._engine = SASLEngine(["PLAIN", "LOGIN"], _policy)

    def mechanisms(self) -> list[str]:
        return self._engine.available(self.client)

    def begin(self, name: str) -> Any:
        return self._engine.create(name, self)

    def login(self, credentials: Any) -> Deferred[Authenticated]:
        password = credentials.password
        self.test.logins.append((credentials.username, credentials.mechanism))
        if password == "tempfail":
            result: Deferred[Authenticated] = fail(TemporaryAuthFailure("directory down"))
        elif password == "crash":
            result = fail(ZeroDivisionError("checker bug"))
        elif (credentials.username, password) == ("alice", "secret"):
            result = succeed(Authenticated("alice@example.test"))
        else:
            result = fail(AuthenticationFailed("wrong password"))
        if self.test.hold_logins:
            held: Deferred[Authenticated] = Deferred()
            self.test.held_logins.append((held, result))
            return held
        return result

    def refuse(self, username: str, method: str, reason: str) -> Deferred[Authenticated]:
        return fail(AuthenticationFailed(reason))

    def logout(self) -> None:
        self.logouts += 1


class RecordingLogs:
    def __init__(self) -> None:
        self.debugs: list[tuple[str, str, dict[str, object]]] = []
        self.errors: list[tuple[str, dict[str, object]]] = []

    def debug(self, category: str, event: str, client: ClientInfo | None = None, **fields: object) -> None:
        self.debugs.append((category, event, fields))

    def error(self, event: str, client: ClientInfo | None = None, **fields: object) -> None:
        self.errors.append((event, fields))


class Transport(StringTransport):
    """A TCP-like StringTransport: records NODELAY, writes, and STARTTLS (with what preceded it)."""

    def __init__(self) -> None:
        super().__init__(
            hostAddress=IPv4Address("TCP", "192.0.2.1", 25),
            peerAddress=IPv4Address("TCP", "198.51.100.7", 40000),
        )
        self.nodelay: bool | None = None
        self.writes = 0
        self.tls_context: object = None
        self.before_tls = b""

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def startTLS(self, context: object) -> None:
        self.tls_context = context
        self.before_tls = self.value()


class Conn:
    """One client connection; `send` returns exactly what the server wrote in response."""

    def __init__(self, protocol: SMTPServer, transport: Transport) -> None:
        self.protocol = protocol
        self.transport = transport

    def send(self, data: bytes) -> bytes:
        self.transport.clear()
        self.protocol.dataReceived(data)
        return self.take()

    def take(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


class SMTPServerTestCase(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = FakeBackend()
        self.logs = RecordingLogs()
        self.sessions: list[FakeSession] = []
        self.logins: list[tuple[str, str]] = []
        self.hold_logins = False
        self.held_logins: list[tuple[Deferred[Authenticated], Deferred[Authenticated]]] = []

    def session_factory(self, client: ClientInfo) -> FakeSession:
        session = FakeSession(client, self)
        self.sessions.append(session)
        return session

    def connect(
        self, tls_context: object = CONTEXT, transport: Transport | None = None, **changes: Any
    ) -> Conn:
        settings = dataclasses.replace(SETTINGS, **changes)
        factory = SMTPFactory(
            settings, self.backend, self.session_factory, tls_context, self.clock, self.logs
        )
        protocol = factory.buildProtocol(None)
        transport = transport or Transport()
        protocol.makeConnection(transport)
        conn = Conn(protocol, transport)
        conn.take()
        return conn

    def ehlo(self, **changes: Any) -> Conn:
        conn = self.connect(**changes)
        conn.send(b"EHLO client.example.test\r\n")
        return conn

    def authenticated(self, **changes: Any) -> Conn:
        conn = self.ehlo(**changes)
        self.assertEqual(
            conn.send(b"AUTH PLAIN " + PLAIN_OK + b"\r\n"), b"235 2.7.0 Authentication successful\r\n"
        )
        return conn

    def release_logins(self) -> None:
        while self.held_logins:
            held, result = self.held_logins.pop(0)
            result.chainDeferred(held)


# --- greeting, EHLO, simple commands -------------------------------------------------------------


class GreetingTests(SMTPServerTestCase):
    def test_greeting_and_nodelay(self) -> None:
        """The 220 names the host and banner only; TCP_NODELAY is set; the connect is logged."""
        transport = Transport()
        factory = SMTPFactory(
            dataclasses.replace(SETTINGS, banner="ESMTP kms 0.1.0"),
            self.backend,
            self.session_factory,
            None,
            self.clock,
            self.logs,
        )
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        self.assertEqual(transport.value(), b"220 mx.example.test ESMTP kms 0.1.0\r\n")
        self.assertTrue(transport.nodelay)
        self.assertEqual(protocol.client.peer_host, "198.51.100.7")
        self.assertFalse(protocol.client.tls)
        self.assertEqual(self.logs.debugs[0][:2], ("smtp", "connect"))

    def test_nodelay_reaches_tcp_under_a_tls_wrapper(self) -> None:
        """Under TLSMemoryBIOProtocol the TCP transport is one ``.transport`` down."""

        class Wrapper(StringTransport):
            transport = Transport()

        wrapper = Wrapper()
        self.connect(transport=wrapper)  # type: ignore[arg-type]
        self.assertTrue(Wrapper.transport.nodelay)

    def test_implicit_tls_client_is_tls_from_the_start(self) -> None:
        """On smtps the client is TLS at once: STARTTLS is not offered, LOGIN is."""
        conn = self.connect(listener="smtps", implicit_tls=True, require_auth=True)
        self.assertTrue(conn.protocol.client.tls)
        self.assertEqual(conn.protocol.client.listener, "smtps")
        self.assertEqual(conn.send(b"EHLO c\r\n"), EHLO_REPLY + b"250 AUTH PLAIN LOGIN\r\n")


class EhloTests(SMTPServerTestCase):
    def test_ehlo_lists_extensions(self) -> None:
        """EHLO lists the extensions, STARTTLS (context, no TLS yet) and the allowed mechanisms."""
        conn = self.connect()
        self.assertEqual(
            conn.send(b"EHLO client.example.test\r\n"), EHLO_REPLY + b"250-STARTTLS\r\n250 AUTH PLAIN\r\n"
        )

    def test_ehlo_without_tls_or_mechanisms(self) -> None:
        """No context: no STARTTLS; no mechanism available: no AUTH line at all."""
        conn = self.connect(tls_context=None)
        self.sessions[0]._engine = SASLEngine([])
        self.assertEqual(conn.send(b"ehlo c\r\n"), EHLO_REPLY.replace(b"250-ENHANCED", b"250 ENHANCED"))

    def test_helo_lists_nothing(self) -> None:
        """HELO is answered with the host name alone."""
        self.assertEqual(self.connect().send(b"HELO client\r\n"), b"250 mx.example.test\r\n")

    def test_helo_ehlo_need_a_name(self) -> None:
        """A missing or malformed name is 501 5.5.4; the session state is unchanged (MAIL still 503)."""
        conn = self.connect()
        self.assertEqual(conn.send(b"EHLO\r\n"), b"501 5.5.4 Syntax: EHLO hostname\r\n")
        self.assertEqual(conn.send(b"HELO a b\r\n"), b"501 5.5.4 Syntax: HELO hostname\r\n")
        self.assertEqual(conn.send(b"MAIL FROM:<a@x.test>\r\n"), b"503 5.5.1 Error: send HELO/EHLO first\r\n")

    def test_ehlo_resets_the_transaction(self) -> None:
        """A second EHLO (or HELO) drops the transaction in progress."""
        conn = self.ehlo()
        conn.send(b"MAIL FROM:<a@x.test>\r\n")
        conn.send(b"HELO again\r\n")
        self.assertEqual(conn.send(b"RCPT TO:<b@x.test>\r\n"), b"503 5.5.1 Error: need MAIL command\r\n")

    def test_simple_commands(self) -> None:
        """NOOP, RSET, VRFY, EXPN, HELP, BDAT, unknown and empty lines, in any case."""
        conn = self.ehlo(max_errors=50)
        expected = [
            (b"noop\r\n", b"250 2.0.0 Ok\r\n"),
            (b"NOOP anything\r\n", b"250 2.0.0 Ok\r\n"),
            (b"RSET\r\n", b"250 2.0.0 Ok\r\n"),
            (b"RSET x\r\n", b"501 5.5.4 Syntax: RSET\r\n"),
            (
                b"VRFY bob\r\n",
                b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n",
            ),
            (b"VRFY\r\n", b"501 5.5.4 Syntax: VRFY address\r\n"),
            (b"EXPN list\r\n", b"502 5.5.1 EXPN not available\r\n"),
            (
                b"HELP\r\n",
                b"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY STARTTLS AUTH\r\n",
            ),
            (b"BDAT 10 LAST\r\n", b"502 5.5.1 BDAT not available: CHUNKING is not offered\r\n"),
            (b"XYZZY\r\n", b"500 5.5.2 Command unrecognized\r\n"),
            (b"\r\n", b"500 5.5.2 Command unrecognized\r\n"),
            (b"NOOP\n", b"250 2.0.0 Ok\r\n"),
        ]
        for line, reply in expected:
            self.assertEqual(conn.send(line), reply, line)

    def test_nul_and_non_utf8_commands(self) -> None:
        """NUL bytes and invalid UTF-8 in a command are 500 5.5.2, and the connection goes on."""
        conn = self.ehlo()
        self.assertEqual(conn.send(b"NO\0OP\r\n"), b"500 5.5.2 NUL character in command\r\n")
        self.assertEqual(
            conn.send(b"MAIL FROM:<\xff@x.test>\r\n"), b"500 5.5.2 Command is not valid UTF-8\r\n"
        )
        self.assertEqual(conn.send(b"NOOP\r\n"), b"250 2.0.0 Ok\r\n")

    def test_quit(self) -> None:
        """QUIT says 221 and closes; what was pipelined after it is ignored."""
        conn = self.ehlo()
        self.assertEqual(conn.send(b"QUIT\r\nNOOP\r\n"), b"221 2.0.0 Bye\r\n")
        self.assertTrue(conn.closed)
        self.assertEqual(conn.send(b"NOOP\r\n"), b"")


# --- transactions --------------------------------------------------------------------------------


class TransactionTests(SMTPServerTestCase):
    def test_full_transaction(self) -> None:
        """MAIL, RCPT, DATA, body, end: delivered with the right envelope and an LF body."""
        conn = self.ehlo()
        self.assertEqual(
            conn.send(b"MAIL FROM:<alice@x.test> SIZE=100 BODY=8BITMIME\r\n"), b"250 2.1.0 Ok\r\n"
        )
        self.assertEqual(conn.send(b"RCPT TO:<bob@example.test>\r\n"), b"250 2.1.5 Ok\r\n")
        self.assertEqual(conn.send(b"RCPT TO:<Postmaster>\r\n"), b"250 2.1.5 Ok\r\n")
        self.assertEqual(conn.send(b"DATA\r\n"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(conn.send(b"Subject: hi\r\n\r\n..dotted\r\nbody\r\n"), b"")
        self.assertEqual(conn.send(b".\r\n"), b"250 2.0.0 Ok: queued as QID1\r\n")
        [(envelope, body)] = self.backend.delivered
        self.assertEqual(body, b"Subject: hi\n\n.dotted\nbody\n")
        self.assertEqual(envelope.sender, "alice@x.test")
        self.assertEqual(list(envelope.recipients), ["bob@example.test", "Postmaster"])
        self.assertEqual(list(envelope.routes), ["route:bob@example.test", "route:Postmaster"])
        self.assertEqual(dict(envelope.mail_params), {"SIZE": "100", "BODY": "8BITMIME"})
        self.assertEqual(list(envelope.rcpt_params), [{}, {}])
        self.assertEqual(envelope.helo, "client.example.test")
        self.assertEqual(envelope.protocol, "ESMTP")
        self.assertIs(envelope.client, conn.protocol.client)
        self.assertEqual(self.backend.spools[0].discarded, 0)  # the backend owns it now
        # The transaction is over, the greeting is not.
        self.assertEqual(conn.send(b"RCPT TO:<b@x.test>\r\n"), b"503 5.5.1 Error: need MAIL command\r\n")
        self.assertEqual(conn.send(b"MAIL FROM:<>\r\n"), b"250 2.1.0 Ok\r\n")

    def test_protocol_names(self) -> None:
        """RFC 3848: HELO -> SMTP, EHLO -> ESMTP, +A when authenticated, +S under TLS."""
        cases = [
            (self.connect(), b"HELO c\r\n", "SMTP"),
            (self.ehlo(), b"", "ESMTP"),
            (self.authenticated(), b"", "ESMTPA"),
            (self.ehlo(implicit_tls=True), b"", "ESMTPS"),
            (self.authenticated(implicit_tls=True), b"", "ESMTPSA"),
        ]
        for conn, greeting, _ in cases:
            conn.send(greeting + b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n.\r\n")
        self.assertEqual([env.protocol for env, _ in self.backend.delivered], [name for _, _, name in cases])

    def test_sequence_errors(self) -> None:
        """MAIL before HELO, nested MAIL, RCPT/DATA without MAIL, DATA without recipients."""
        conn = self.connect(max_errors=50)
        self.assertEqual(conn.send(b"MAIL FROM:<a@x.test>\r\n"), b"503 5.5.1 Error: send HELO/EHLO first\r\n")
        conn.send(b"EHLO c\r\n")
        self.assertEqual(conn.send(b"RCPT TO:<b@x.test>\r\n"), b"503 5.5.1 Error: need MAIL command\r\n")
        self.assertEqual(conn.send(b"DATA\r\n"), b"503 5.5.1 Error: need MAIL command\r\n")
        conn.send(b"MAIL FROM:<a@x.test>\r\n")
        self.assertEqual(conn.send(b"MAIL FROM:<a@x.test>\r\n"), b"503 5.5.1 Error: nested MAIL command\r\n")
        self.assertEqual(conn.send(b"DATA\r\n"), b"554 5.5.1 No valid recipients\r\n")
        self.assertEqual(conn.send(b"DATA now\r\n"), b"501 5.5.4 Syntax: DATA\r\n")
        self.assertEqual(self.backend.calls, [("MAIL", "a@x.test", {})])

    def test_syntax_errors_reach_the_client(self) -> None:
        """Address and parameter problems come back with their own codes; the backend is not asked."""
        conn = self.connect(max_errors=50)
        conn.send(b"HELO c\r\n")
        self.assertEqual(
            conn.send(b"MAIL FROM:<a@x.test> SIZE=1\r\n"), b"555 5.5.4 ESMTP parameters need EHLO\r\n"
        )
        conn.send(b"EHLO c\r\n")
        self.assertEqual(conn.send(b"MAIL FROM:<a b@x.test>\r\n"), b"501 5.1.7 Bad address syntax\r\n")
        self.assertEqual(
            conn.send(b"MAIL FROM:<j\xc3\xb6@x.test>\r\n"),
            b"553 5.6.7 Non-ASCII addresses require SMTPUTF8\r\n",
        )
        self.assertEqual(
            conn.send(b"MAIL FROM:<a@x.test> MTRK=1\r\n"), b"555 5.5.4 Unsupported parameter MTRK\r\n"
        )
        self.assertEqual(
            conn.send(b"MAIL FROM:<a@x.test\r>\r\n"),
            b"501 5.1.7 Control characters are not allowed in addresses\r\n",
        )
        self.assertEqual(self.backend.calls, [])
        self.assertEqual(conn.send(b"MAIL FROM:<j\xc3\xb6@x.test> SMTPUTF8\r\n"), b"250 2.1.0 Ok\r\n")
        self.assertEqual(conn.send(b"RCPT TO:<b\xc3\xbc@x.test>\r\n"), b"250 2.1.5 Ok\r\n")
        self.assertEqual(conn.send(b"RCPT TO:<b@x..test>\r\n"), b"501 5.1.3 Bad domain syntax\r\n")

    def test_backend_refusals_and_failures(self) -> None:
        """A Refusal is sent as given (controls blanked); any other failure is 451 4.3.0 and logged."""
        self.backend.refusals[("MAIL", "spam@x.test")] = Refusal(550, "5.7.1", "Go away\r\n250 fake")
        self.backend.refusals[("RCPT", "nobody@x.test")] = Refusal(550, "5.1.1", "User unknown")
        self.backend.refusals[("RCPT", "broken@x.test")] = INTERNAL
        conn = self.ehlo()
        self.assertEqual(conn.send(b"MAIL FROM:<spam@x.test>\r\n"), b"550 5.7.1 Go away  250 fake\r\n")
        self.assertEqual(conn.send(b"MAIL FROM:<a@x.test>\r\n"), b"250 2.1.0 Ok\r\n")
        self.assertEqual(conn.send(b"RCPT TO:<nobody@x.test>\r\n"), b"550 5.1.1 User unknown\r\n")
        self.assertEqual(
            conn.send(b"RCPT TO:<broken@x.test>\r\n"), b"451 4.3.0 Local error in processing\r\n"
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(
            self.logs.errors, [("smtp-internal-error", {"error": "backend bug", "type": "RuntimeError"})]
        )
        self.assertEqual(conn.send(b"DATA\r\n"), b"554 5.5.1 No valid recipients\r\n")

    def test_delivery_refused_or_failing(self) -> None:
        """deliver's Refusal is the reply; another failure is 451; either way the transaction ends."""
        conn = self.ehlo()
        for answer, reply in [
            (
                Refusal(452, "4.3.1", "Insufficient system storage"),
                b"452 4.3.1 Insufficient system storage\r\n",
            ),
            (INTERNAL, b"451 4.3.0 Local error in processing\r\n"),
        ]:
            self.backend.deliver_answer = answer
            conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
            self.assertEqual(conn.send(b"x\r\n.\r\n"), reply)
            self.assertEqual(conn.send(b"RCPT TO:<b@x.test>\r\n"), b"503 5.5.1 Error: need MAIL command\r\n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_commands_after_the_end_marker_in_the_same_chunk(self) -> None:
        """Bytes after CRLF.CRLF in one segment are the next pipelined commands."""
        conn = self.ehlo()
        conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
        self.assertEqual(
            conn.send(b"body\r\n.\r\nMAIL FROM:<c@x.test>\r\nQUIT\r\n"),
            b"250 2.0.0 Ok: queued as QID1\r\n250 2.1.0 Ok\r\n221 2.0.0 Bye\r\n",
        )
        self.assertEqual(self.backend.delivered[0][1], b"body\n")

    def test_body_pipelined_with_data_is_read_as_body(self) -> None:
        """Everything after an accepted DATA in the same segment is message text, end marker included."""
        conn = self.ehlo()
        reply = conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\nhello\r\n.\r\nNOOP\r\n")
        self.assertEqual(
            reply,
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
            b"250 2.0.0 Ok: queued as QID1\r\n250 2.0.0 Ok\r\n",
        )
        self.assertEqual(self.backend.delivered[0][1], b"hello\n")

    def test_smuggled_terminators_stay_in_the_message(self) -> None:
        """SMTP smuggling: "\\n.\\n" and friends do not end DATA, so the smuggled MAIL is body text."""
        conn = self.ehlo()
        conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
        for fake in (b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"):
            self.assertEqual(conn.send(b"text" + fake + b"MAIL FROM:<evil@x.test>\r\n"), b"")
        self.assertEqual(conn.send(b".\r\n"), b"250 2.0.0 Ok: queued as QID1\r\n")
        self.assertEqual(self.backend.calls.count(("MAIL", "evil@x.test", {})), 0)
        self.assertEqual(self.backend.delivered[0][1].count(b"MAIL FROM:<evil@x.test>\n"), 5)

    def test_error_in_an_unknown_state_closes_with_421(self) -> None:
        """A failure between states (here inside the DATA reader) is 421 4.3.0 and a close, logged."""

        def broken(reader: DataReader, data: bytes) -> tuple[bytes, bool, bytes]:
            raise RuntimeError("reader bug")

        conn = self.ehlo()
        conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
        self.patch(DataReader, "feed", broken)
        self.assertEqual(conn.send(b"body\r\n"), b"421 4.3.0 mx.example.test Error: internal error\r\n")
        self.assertTrue(conn.closed)
        conn.protocol.connectionLost()
        self.assertEqual(self.backend.spools[0].discarded, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_spool_creation_failure_is_451(self) -> None:
        """If no spool can be made, DATA gets 451 4.3.0 and the session stays in command mode."""
        self.backend.new_spool_fails = True
        conn = self.ehlo()
        conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n")
        self.assertEqual(conn.send(b"DATA\r\n"), b"451 4.3.0 Local error in processing\r\n")
        self.assertEqual(conn.send(b"NOOP\r\n"), b"250 2.0.0 Ok\r\n")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_spool_write_failure_reads_to_the_end_then_451(self) -> None:
        """A failing spool write does not desynchronise: DATA is read to its end, then 451."""
        conn = self.ehlo()
        conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
        self.backend.spools[0].fail_writes = True
        self.assertEqual(conn.send(b"line\r\nNOOP\r\n"), b"")
        self.assertEqual(
            conn.send(b".\r\nNOOP\r\n"), b"451 4.3.0 Local error in processing\r\n250 2.0.0 Ok\r\n"
        )
        self.assertEqual(self.backend.spools[0].discarded, 1)
        self.assertEqual(self.backend.delivered, [])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


# --- limits --------------------------------------------------------------------------------------


class LimitTests(SMTPServerTestCase):
    def test_size_parameter(self) -> None:
        """SIZE above the maximum is 552 5.3.4 before the backend is asked; at the maximum it is fine."""
        conn = self.ehlo()
        self.assertEqual(
            conn.send(b"MAIL FROM:<a@x.test> SIZE=1001\r\n"),
            b"552 5.3.4 Message size exceeds fixed maximum message size\r\n",
        )
        self.assertEqual(self.backend.calls, [])
        self.assertEqual(conn.send(b"MAIL FROM:<a@x.test> SIZE=1000\r\n"), b"250 2.1.0 Ok\r\n")

    def test_size_during_data(self) -> None:
        """Counted with CRLF line ends: 1000 octets pass; 1001 are read to the end, then 552, spool gone."""
        conn = self.ehlo()
        conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
        self.assertEqual(conn.send(b"x" * 998 + b"\r\n.\r\n"), b"250 2.0.0 Ok: queued as QID1\r\n")
        conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
        for _ in range(20):
            self.assertEqual(conn.send(b"y" * 50 + b"\r\nQUIT\r\n"), b"")
        self.assertEqual(
            conn.send(b".\r\nNOOP\r\n"),
            b"552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.0.0 Ok\r\n",
        )
        self.assertEqual(len(self.backend.delivered), 1)
        spool = self.backend.spools[1]
        self.assertEqual(spool.discarded, 1)
        self.assertLessEqual(len(spool.data), 1000)
        self.assertEqual(conn.send(b"RCPT TO:<b@x.test>\r\n"), b"503 5.5.1 Error: need MAIL command\r\n")

    def test_max_recipients(self) -> None:
        """After max_recipients accepted, RCPT is 452 4.5.3 unasked; refused recipients do not count."""
        self.backend.refusals[("RCPT", "nobody@x.test")] = Refusal(550, "5.1.1", "User unknown")
        conn = self.ehlo()
        conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<nobody@x.test>\r\n")
        replies = conn.send(b"".join(b"RCPT TO:<r%d@x.test>\r\n" % i for i in range(5)))
        self.assertEqual(replies, b"250 2.1.5 Ok\r\n" * 3 + b"452 4.5.3 Too many recipients\r\n" * 2)
        self.assertEqual(len([c for c in self.backend.calls if c[0] == "RCPT"]), 4)

    def test_too_many_errors(self) -> None:
        """The error after max_errors 5xx replies is followed by 421 4.7.0 and the connection closes."""
        conn = self.ehlo()
        self.assertEqual(conn.send(b"BAD\r\n" * 5), b"500 5.5.2 Command unrecognized\r\n" * 5)
        self.assertFalse(conn.closed)
        self.assertEqual(
            conn.send(b"BAD\r\nNOOP\r\n"),
            b"500 5.5.2 Command unrecognized\r\n421 4.7.0 mx.example.test Too many errors\r\n",
        )
        self.assertTrue(conn.closed)

    def test_4xx_replies_do_not_count_as_errors(self) -> None:
        """Too many recipients (452) is not misbehaviour: it never leads to 421."""
        conn = self.ehlo()
        conn.send(b"MAIL FROM:<a@x.test>\r\n")
        replies = conn.send(b"RCPT TO:<r@x.test>\r\n" * 20)
        self.assertEqual(replies.count(b"452 4.5.3"), 17)
        self.assertFalse(conn.closed)

    def test_long_data_line_stays_in_data(self) -> None:
        """S4: a 1 MB line inside DATA is message text; what follows it is never taken as a command."""
        conn = self.ehlo(max_message_size=10_000_000)
        conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
        for _ in range(16):
            self.assertEqual(conn.send(b"z" * 65536), b"")
        self.assertEqual(conn.send(b"\r\nRSET\r\nQUIT\r\n.\r\n"), b"250 2.0.0 Ok: queued as QID1\r\n")
        body = self.backend.delivered[0][1]
        self.assertEqual(body, b"z" * 16 * 65536 + b"\nRSET\nQUIT\n")
        self.assertFalse(conn.closed)

    def test_endless_command_line_does_not_grow_memory(self) -> None:
        """S5: 10 MB without LF: one 500 Line too long, the buffer stays bounded, then commands work."""
        conn = self.ehlo()
        replies = b""
        for _ in range(160):
            replies += conn.send(b"A" * 65536)
            self.assertLessEqual(len(conn.protocol._inbox), SETTINGS.max_command_line + 1)
        self.assertEqual(replies, b"500 5.5.2 Line too long\r\n")
        self.assertEqual(conn.send(b"AAAA\r\nNOOP\r\n"), b"250 2.0.0 Ok\r\n")

    def test_long_line_in_one_segment(self) -> None:
        """A complete over-long line is refused; its neighbours in the segment are still served."""
        conn = self.ehlo()
        self.assertEqual(
            conn.send(b"NOOP\r\nNOOP " + b"x" * 600 + b"\r\nNOOP\r\n"),
            b"250 2.0.0 Ok\r\n500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n",
        )
        line = b"NOOP " + b"x" * (SETTINGS.max_command_line - 5)
        self.assertEqual(conn.send(line + b"\r\n"), b"250 2.0.0 Ok\r\n")
        self.assertEqual(conn.send(line + b"x\r\n"), b"500 5.5.2 Line too long\r\n")


# --- pipelining ----------------------------------------------------------------------------------


class PipeliningTests(SMTPServerTestCase):
    def test_replies_in_order_with_slow_backend(self) -> None:
        """S6: pipelined MAIL/RCPT/RCPT/DATA with held answers: one command at a time, replies in order."""
        conn = self.ehlo()
        self.backend.hold = True
        self.backend.refusals[("RCPT", "nobody@x.test")] = Refusal(550, "5.1.1", "User unknown")
        self.assertEqual(
            conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<nobody@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n"),
            b"",
        )
        self.assertEqual(self.backend.calls, [("MAIL", "a@x.test", {})])
        self.backend.release()
        self.assertEqual(conn.take(), b"250 2.1.0 Ok\r\n")
        self.assertEqual(self.backend.calls[-1], ("RCPT", "nobody@x.test"))
        self.backend.release()
        self.assertEqual(conn.take(), b"550 5.1.1 User unknown\r\n")
        self.backend.release()
        self.assertEqual(conn.take(), b"250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(conn.send(b"hi\r\n.\r\nNOOP\r\n"), b"")
        self.backend.release()
        self.assertEqual(conn.take(), b"250 2.0.0 Ok: queued as QID1\r\n250 2.0.0 Ok\r\n")
        self.assertEqual(list(self.backend.delivered[0][0].recipients), ["b@x.test"])

    def test_batch_is_written_at_once(self) -> None:
        """Replies to one pipelined segment leave in a single write (no Nagle/delayed-ACK stalls)."""
        conn = self.ehlo()
        conn.transport.writes = 0
        reply = conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\nDATA\r\n")
        self.assertEqual(reply.count(b"\r\n"), 4)
        self.assertEqual(conn.transport.writes, 1)

    def test_backlog_pauses_and_resumes_the_transport(self) -> None:
        """While a command waits, a backlog over BACKLOG_LIMIT pauses reading; it resumes once served."""
        conn = self.ehlo(max_errors=10**6)
        self.backend.hold = True
        conn.send(b"MAIL FROM:<a@x.test>\r\n")
        self.assertEqual(conn.transport.producerState, "producing")
        conn.send(b"NOOP\r\n" * (BACKLOG_LIMIT // 6 + 1))
        self.assertEqual(conn.transport.producerState, "paused")
        self.backend.release()
        self.assertEqual(conn.transport.producerState, "producing")
        self.assertEqual(conn.take(), b"250 2.1.0 Ok\r\n" + b"250 2.0.0 Ok\r\n" * (BACKLOG_LIMIT // 6 + 1))

    def test_commands_wait_for_a_client_that_does_not_read(self) -> None:
        """While the client's replies fill the transport's buffer no command runs (past
        BACKLOG_LIMIT reading pauses); a message's data, which makes no reply, still flows."""
        conn = self.ehlo(max_errors=10**6)
        conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        conn.protocol.pauseProducing()  # the transport's buffer is full
        self.assertEqual(conn.send(b"Subject: s\r\n\r\nbody\r\n"), b"")
        count = BACKLOG_LIMIT // 6 + 1
        self.assertEqual(conn.send(b".\r\n" + b"NOOP\r\n" * count), b"250 2.0.0 Ok: queued as QID1\r\n")
        self.assertEqual(conn.transport.producerState, "paused")
        conn.protocol.resumeProducing()
        self.assertEqual(conn.transport.producerState, "producing")
        self.assertEqual(conn.take(), b"250 2.0.0 Ok\r\n" * count)
        self.assertEqual(self.backend.delivered[0][1], b"Subject: s\n\nbody\n")

    def test_disconnect_while_waiting(self) -> None:
        """A late backend answer after the client left writes nothing and runs no buffered command."""
        conn = self.ehlo()
        self.backend.hold = True
        conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n")
        conn.protocol.connectionLost()
        self.backend.release()
        self.assertEqual(conn.take(), b"")
        self.assertEqual(len(self.backend.calls), 1)
        self.assertEqual(self.sessions[0].logouts, 1)


# --- timers and disconnects ----------------------------------------------------------------------


class TimeoutTests(SMTPServerTestCase):
    def test_command_timeout(self) -> None:
        """command_timeout of client silence gives 421 4.4.2 and a close; any input restarts it."""
        conn = self.ehlo()
        self.clock.advance(200)
        conn.send(b"NOOP\r\n")
        self.clock.advance(299)
        self.assertEqual(conn.take(), b"")
        self.clock.advance(1)
        self.assertEqual(conn.take(), b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n")
        self.assertTrue(conn.closed)

    def test_greeting_starts_the_clock(self) -> None:
        """A client that never says anything is dropped too."""
        conn = self.connect()
        self.clock.advance(300)
        self.assertEqual(conn.take(), b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n")

    def test_data_timeout(self) -> None:
        """In DATA the longer data_timeout applies; back in command mode the command timeout does."""
        conn = self.ehlo()
        conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
        self.clock.advance(599)
        self.assertEqual(conn.take(), b"")
        conn.send(b"text\r\n.\r\n")
        self.clock.advance(300)
        self.assertEqual(conn.take(), b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n")
        conn2 = self.ehlo()
        conn2.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
        self.clock.advance(600)
        self.assertEqual(conn2.take(), b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n")

    def test_no_timeout_while_the_server_is_busy(self) -> None:
        """While the backend has the turn the client is not blamed; its clock restarts afterwards."""
        conn = self.ehlo()
        self.backend.hold = True
        conn.send(b"MAIL FROM:<a@x.test>\r\n")
        self.clock.advance(10_000)
        self.assertEqual(conn.take(), b"")
        self.backend.release()
        self.assertEqual(conn.take(), b"250 2.1.0 Ok\r\n")
        self.clock.advance(300)
        self.assertEqual(conn.take(), b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n")

    def test_disconnect_mid_data_discards_the_spool(self) -> None:
        """A connection lost in DATA leaves nothing: spool discarded, no delivery, timers gone, logout."""
        conn = self.ehlo()
        conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\npartial body\r\n")
        conn.protocol.connectionLost()
        self.assertEqual(self.backend.spools[0].discarded, 1)
        self.assertEqual(self.backend.delivered, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.sessions[0].logouts, 1)
        self.assertEqual(self.logs.debugs[-1], ("smtp", "disconnect", {"errors": 0}))


# --- AUTH ----------------------------------------------------------------------------------------


class AuthTests(SMTPServerTestCase):
    def test_plain_with_initial_response(self) -> None:
        """AUTH PLAIN <b64> succeeds with 235; the identity is set; a second AUTH is 503."""
        conn = self.authenticated()
        self.assertEqual(conn.protocol.client.identity, "alice@example.test")
        self.assertEqual(self.logins, [("alice", "PLAIN")])
        self.assertEqual(
            conn.send(b"AUTH PLAIN " + PLAIN_OK + b"\r\n"), b"503 5.5.1 Already authenticated\r\n"
        )
        logged = repr(self.logs.debugs)
        self.assertNotIn(PLAIN_OK.decode(), logged)
        self.assertIn("'argument': 'PLAIN'", logged)

    def test_plain_with_challenge(self) -> None:
        """AUTH PLAIN without initial response gets an empty 334, then the credentials."""
        conn = self.ehlo()
        self.assertEqual(conn.send(b"auth plain\r\n"), b"334 \r\n")
        self.assertEqual(conn.send(PLAIN_OK + b"\r\n"), b"235 2.7.0 Authentication successful\r\n")

    def test_login_over_tls(self) -> None:
        """LOGIN, allowed over TLS, prompts Username: and Password: in base64."""
        conn = self.ehlo(implicit_tls=True)
        self.assertEqual(conn.send(b"AUTH LOGIN\r\n"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(conn.send(b64(b"alice") + b"\r\n"), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(conn.send(b64(b"secret") + b"\r\n"), b"235 2.7.0 Authentication successful\r\n")

    def test_bad_auth_commands(self) -> None:
        """S1 and friends: every malformed AUTH command gets a reply and the connection lives on."""
        conn = self.ehlo(max_errors=50)
        cases = [
            (b"AUTH\r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
            (b"AUTH \r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
            (b"AUTH PLAIN a b\r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
            (b"AUTH X-UNKNOWN\r\n", b"504 5.5.4 Unrecognized authentication mechanism\r\n"),
            (b"AUTH LOGIN\r\n", b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"),
            (b"AUTH PLAIN !!!\r\n", b"501 5.5.2 Cannot decode response\r\n"),
            (b"AUTH PLAIN \xc3\xa9\r\n", b"501 5.5.2 Cannot decode response\r\n"),
            (b"AUTH PLAIN *\r\n", b"501 5.0.0 Authentication cancelled\r\n"),
            (b"AUTH PLAIN =\r\n", b"501 5.5.2 Cannot decode response\r\n"),
            (b"AUTH PLAIN " + b64(b"no-nuls") + b"\r\n", b"501 5.5.2 Cannot decode response\r\n"),
            (
                b"AUTH PLAIN " + b64(b"\0alice\0wrong") + b"\r\n",
                b"535 5.7.8 Authentication credentials invalid\r\n",
            ),
            (
                b"AUTH PLAIN " + b64(b"\0alice\0") + b"\r\n",
                b"535 5.7.8 Authentication credentials invalid\r\n",
            ),
            (
                b"AUTH PLAIN " + b64(b"\0alice\0tempfail") + b"\r\n",
                b"454 4.7.0 Temporary authentication failure\r\n",
            ),
        ]
        for line, reply in cases:
            self.assertEqual(conn.send(line), reply, line)
        self.assertIsNone(conn.protocol.client.identity)
        self.assertEqual(conn.send(b"NOOP\r\n"), b"250 2.0.0 Ok\r\n")

    def test_bad_responses_in_an_exchange(self) -> None:
        """S2: cancel, bad base64 and empty answers after 334 end the exchange with a reply."""
        conn = self.ehlo(max_errors=50)
        for response, reply in [
            (b"*", b"501 5.0.0 Authentication cancelled\r\n"),
            (b"not base64!", b"501 5.5.2 Cannot decode response\r\n"),
            (b"", b"501 5.5.2 Cannot decode response\r\n"),
            (b"=", b"501 5.5.2 Cannot decode response\r\n"),
            (b64(b"\0alice\0nope"), b"535 5.7.8 Authentication credentials invalid\r\n"),
        ]:
            self.assertEqual(conn.send(b"AUTH PLAIN\r\n"), b"334 \r\n")
            self.assertEqual(conn.send(response + b"\r\n"), reply, response)
            self.assertEqual(conn.send(b"NOOP\r\n"), b"250 2.0.0 Ok\r\n")

    def test_over_long_response_ends_the_exchange(self) -> None:
        """A SASL line over max_command_line is 500 Line too long and the next line is a command again."""
        conn = self.ehlo()
        conn.send(b"AUTH PLAIN\r\n")
        self.assertEqual(
            conn.send(b"A" * 600 + b"\r\nNOOP\r\n"), b"500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n"
        )

    def test_unexpected_login_error_is_temporary(self) -> None:
        """A crash behind the session is 454 (never 535) and logged."""
        conn = self.ehlo()
        reply = conn.send(b"AUTH PLAIN " + b64(b"\0alice\0crash") + b"\r\n")
        self.assertEqual(reply, b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.logs.errors[0][0], "smtp-auth-error")

    def test_auth_sequence_rules(self) -> None:
        """AUTH needs EHLO (not HELO), and not inside a transaction."""
        conn = self.connect()
        self.assertEqual(conn.send(b"AUTH PLAIN\r\n"), b"503 5.5.1 Error: send EHLO first\r\n")
        conn.send(b"HELO c\r\n")
        self.assertEqual(conn.send(b"AUTH PLAIN\r\n"), b"503 5.5.1 Error: send EHLO first\r\n")
        conn.send(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n")
        self.assertEqual(conn.send(b"AUTH PLAIN\r\n"), b"503 5.5.1 Error: MAIL transaction in progress\r\n")

    def test_require_auth(self) -> None:
        """On submission MAIL needs AUTH (530 5.7.0); pipelined behind a slow login, it waits its turn."""
        conn = self.ehlo(listener="submission", require_auth=True)
        self.assertEqual(conn.send(b"MAIL FROM:<a@x.test>\r\n"), b"530 5.7.0 Authentication required\r\n")
        self.hold_logins = True
        self.assertEqual(conn.send(b"AUTH PLAIN " + PLAIN_OK + b"\r\nMAIL FROM:<a@x.test>\r\n"), b"")
        self.release_logins()
        self.assertEqual(conn.take(), b"235 2.7.0 Authentication successful\r\n250 2.1.0 Ok\r\n")


# --- STARTTLS ------------------------------------------------------------------------------------


class StartTLSTests(SMTPServerTestCase):
    def test_pipelined_commands_after_starttls_are_discarded(self) -> None:
        """S3: plaintext pipelined behind STARTTLS is dropped; the session restarts under TLS."""
        conn = self.ehlo()
        old_session = self.sessions[0]
        reply = conn.send(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@x.test>\r\n")
        self.assertEqual(reply, b"220 2.0.0 Ready to start TLS\r\n")
        self.assertEqual(conn.transport.before_tls, b"220 2.0.0 Ready to start TLS\r\n")
        self.assertIs(conn.transport.tls_context, CONTEXT)
        self.assertEqual(self.backend.calls, [])
        self.assertTrue(conn.protocol.client.tls)
        self.assertEqual(old_session.logouts, 1)
        self.assertEqual(len(self.sessions), 2)
        self.assertTrue(self.sessions[1].client.tls)
        # HELO is forgotten (RFC 3207 §4.2); the new EHLO has no STARTTLS and more mechanisms.
        self.assertEqual(conn.send(b"MAIL FROM:<a@x.test>\r\n"), b"503 5.5.1 Error: send HELO/EHLO first\r\n")
        self.assertEqual(conn.send(b"EHLO c\r\n"), EHLO_REPLY + b"250 AUTH PLAIN LOGIN\r\n")
        self.assertEqual(conn.send(b"STARTTLS\r\n"), b"503 5.5.1 Error: TLS already active\r\n")

    def test_starttls_forgets_authentication_and_transaction(self) -> None:
        """An identity or transaction from before TLS does not survive it."""
        conn = self.authenticated()
        conn.send(b"MAIL FROM:<a@x.test>\r\n")
        conn.send(b"STARTTLS\r\n")
        self.assertIsNone(conn.protocol.client.identity)
        conn.send(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n.\r\n")
        self.assertEqual(self.backend.delivered[0][0].protocol, "ESMTPS")

    def test_starttls_refusals(self) -> None:
        """Arguments: 501; no certificate: 454 4.7.0; on implicit TLS: 503."""
        self.assertEqual(self.ehlo().send(b"STARTTLS now\r\n"), b"501 5.5.4 Syntax: STARTTLS\r\n")
        self.assertEqual(
            self.ehlo(tls_context=None).send(b"STARTTLS\r\n"), b"454 4.7.0 TLS not available\r\n"
        )
        self.assertEqual(
            self.ehlo(implicit_tls=True).send(b"STARTTLS\r\n"), b"503 5.5.1 Error: TLS already active\r\n"
        )


# --- security policy (SPEC §5) -------------------------------------------------------------------


class SecurityPolicyTests(SMTPServerTestCase):
    """The real policy through the real engine: what EHLO offers, 538 or 534, and mail without AUTH."""

    policy = SecurityPolicy("encrypted", parse_group(["10.0.0.0/8"]))

    def session_factory(self, client: ClientInfo) -> FakeSession:
        session = super().session_factory(client)
        session._engine = SASLEngine(["CRAM-MD5", "LOGIN", "PLAIN"], engine_policy(self.policy))
        return session

    def test_plaintext_only_after_starttls(self) -> None:
        """Before TLS only CRAM-MD5 is offered and PLAIN is 538; after STARTTLS all, and PLAIN works."""
        conn = self.ehlo()
        self.assertEqual(conn.send(b"EHLO c\r\n"), EHLO_REPLY + b"250-STARTTLS\r\n250 AUTH CRAM-MD5\r\n")
        self.assertEqual(
            conn.send(b"AUTH PLAIN " + PLAIN_OK + b"\r\n"),
            b"538 5.7.11 Encryption required for requested authentication mechanism\r\n",
        )
        self.assertEqual(self.logins, [])
        conn.send(b"STARTTLS\r\n")
        self.assertEqual(conn.send(b"EHLO c\r\n"), EHLO_REPLY + b"250 AUTH CRAM-MD5 LOGIN PLAIN\r\n")
        self.assertEqual(
            conn.send(b"AUTH PLAIN " + PLAIN_OK + b"\r\n"), b"235 2.7.0 Authentication successful\r\n"
        )

    def test_too_weak_where_tls_is_unavailable(self) -> None:
        """Without STARTTLS on offer, TLS cannot help: 534 5.7.9 says to pick another mechanism."""
        conn = self.ehlo(tls_context=None)
        self.assertEqual(conn.send(b"AUTH LOGIN\r\n"), b"534 5.7.9 Authentication mechanism is too weak\r\n")

    def test_implicit_tls_and_exception_group(self) -> None:
        """smtps counts as TLS; a client of the exception group gets everything in clear text."""
        conn = self.connect(listener="smtps", implicit_tls=True)
        self.assertEqual(conn.send(b"EHLO c\r\n"), EHLO_REPLY + b"250 AUTH CRAM-MD5 LOGIN PLAIN\r\n")
        transport = Transport()
        transport.peerAddr = IPv4Address("TCP", "10.1.2.3", 40000)
        conn = self.connect(transport=transport)
        self.assertEqual(
            conn.send(b"EHLO c\r\n"), EHLO_REPLY + b"250-STARTTLS\r\n250 AUTH CRAM-MD5 LOGIN PLAIN\r\n"
        )

    def test_unencrypted_mail_is_still_accepted(self) -> None:
        """``encrypted`` never stops server-to-server mail: MAIL, RCPT and DATA without TLS or AUTH."""
        conn = self.ehlo()
        reply = conn.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\nhi\r\n.\r\n")
        self.assertEqual(
            reply,
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
            b"250 2.0.0 Ok: queued as QID1\r\n",
        )
