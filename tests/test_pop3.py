"""The POP3 server on a StringTransport: exact replies in every state, UPDATE, limits, timers, AUTH, STLS.

The store is a recording double of `kms.store.interfaces` (a maildrop view that can hold its
answers, to test pipelining) and the login session is a double around the real SASL mechanisms and
the real plaintext gate, so USER/PASS and AUTH are tested up to the password check.  Regression
tests for Twisted's POP3 bugs P2–P7 (audit §2) say so in their docstrings; the pure parsing and
dot-stuffing functions are tested by tables and a Hypothesis property at the end.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import poplib
import re
import time
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, gatherResults, inlineCallbacks, succeed
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from kms.auth.errors import (
    AuthenticationFailed,
    EncryptionRequired,
    MechanismUnavailable,
    TemporaryAuthFailure,
)
from kms.auth.policy import SecurityPolicy, engine_policy
from kms.auth.sasl import Authenticated, SASLEngine, plaintext_login
from kms.clientinfo import ClientInfo
from kms.ipgroups import parse_group
from kms.pop3.commands import (
    CHUNK_SIZE,
    POP3Error,
    dot_stuffed,
    parse_command,
    parse_line_count,
    parse_message_number,
    split_arguments,
    top,
)
from kms.pop3.server import BACKLOG_LIMIT, POP3Factory, POP3Server, POP3Settings
from kms.store.interfaces import MailboxError, MaildropLocked, MessageInfo, message_info
from kms.store.mailbox import MailStore
from kms.store.maildir import mailbox_path

HOST = "mail.example.test"
CONTEXT = object()  # stands in for an IOpenSSLServerConnectionCreator
SETTINGS = POP3Settings(
    hostname=HOST, listener="pop3", implicit_tls=False, banner_product=None, max_errors=5, max_line=512
)
UIDVALIDITY = 1700000000
MESSAGES = {
    3: b"Subject: one\r\nFrom: a@x.test\r\n\r\nfirst line\r\n.dotted\r\nlast\r\n",
    7: b"Subject: two\r\n\r\nbody\r\n",
    9: b"Subject: three\r\n\r\n1\r\n2\r\n3\r\n",
}
CAPA = b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nPIPELINING\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
PLAIN_OK = base64.b64encode(b"\0alice\0secret")
AUTH_FAILED = b"-ERR [AUTH] Authentication failed\r\n"
NOT_NOW = b"-ERR Command not valid in this state\r\n"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def info(uid: int, data: bytes, flags: frozenset[str] = frozenset()) -> MessageInfo:
    return message_info(uid=uid, size=len(data), internal_date=0.0, flags=flags, headers=b"", meta={})


# --- doubles -------------------------------------------------------------------------------------


class FakeView:
    """A maildrop view: answers at once or, with ``hold``, when the test calls `release`."""

    name = "INBOX"
    readonly = False

    def __init__(self, messages: dict[int, bytes]) -> None:
        self.uidvalidity = UIDVALIDITY
        self.uidnext = max(messages, default=0) + 1
        self.bodies = dict(messages)
        self.messages = [info(uid, data) for uid, data in sorted(messages.items())]
        self.flags: dict[int, set[str]] = {uid: set() for uid in messages}
        self.reads: list[int] = []
        self.stores: list[tuple[list[int], list[str], str]] = []
        self.expunges: list[list[int] | None] = []
        self.closes = 0
        self.hold = False
        self.pending: list[tuple[Deferred[Any], object]] = []
        self.read_error: Exception | None = None
        self.fail_expunge = False

    def _answer(self, result: object) -> Deferred[Any]:
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.pending.append((d, result))
            return d
        return fail(result) if isinstance(result, Exception) else succeed(result)

    def release(self) -> None:
        d, result = self.pending.pop(0)
        if isinstance(result, Exception):
            d.errback(result)
        else:
            d.callback(result)

    def open_message(self, uid: int) -> Deferred[bytes]:
        self.reads.append(uid)
        if self.read_error is not None:
            return self._answer(self.read_error)
        return self._answer(self.bodies[uid])

    def store(self, uids: list[int], flags: list[str], mode: str) -> Deferred[list[MessageInfo]]:
        self.stores.append((list(uids), list(flags), mode))
        for uid in uids:
            self.flags[uid].update(flags)
        return self._answer([])

    def expunge(self, uids: list[int] | None = None) -> Deferred[list[int]]:
        self.expunges.append(None if uids is None else list(uids))
        if self.fail_expunge:
            return self._answer(OSError(28, "No space left on device"))
        removed = [uid for uid in (uids or []) if "\\Deleted" in self.flags[uid]]
        for uid in removed:
            del self.bodies[uid]
        return self._answer(removed)

    def close(self) -> None:
        self.closes += 1


class FakeAccount:
    def __init__(self, address: str, view: FakeView, test: POP3TestCase) -> None:
        self.address = address
        self.view = view
        self.test = test

    def open_maildrop(self) -> Deferred[FakeView]:
        answer = self.test.maildrop_answer
        if answer is not None:
            return fail(answer)
        if self.test.hold_maildrop:
            d: Deferred[FakeView] = Deferred()
            self.test.held_maildrops.append((d, self.view))
            return d
        return succeed(self.view)


def _policy(name: str, client: ClientInfo) -> bool:
    """LOGIN only over TLS, so the post-STLS mechanism list and "encryption required" can be tested."""
    return name != "LOGIN" or client.tls


class FakeSession:
    """A login session around the real mechanisms and plaintext gate; alice/secret is the only login."""

    def __init__(self, client: ClientInfo, test: Any) -> None:
        """``test`` holds ``logins``, ``hold_logins`` and ``held_logins``."""
        self.client = client
        self.test = test
        self.logouts = 0
        self._engine = SASLEngine(["PLAIN", "LOGIN"], _policy)

    def mechanisms(self) -> list[str]:
        return self._engine.available(self.client)

    def begin(self, name: str) -> Any:
        return self._engine.create(name, self)

    def login_plaintext(self, username: str, password: str, method: str) -> Deferred[Authenticated]:
        return plaintext_login(self, method, username, password)

    def login(self, credentials: Any) -> Deferred[Authenticated]:
        password = credentials.password
        self.test.logins.append((credentials.username, password, credentials.mechanism))
        if password == "tempfail":
            result: Deferred[Authenticated] = fail(TemporaryAuthFailure("directory down"))
        elif password == "crash":
            result = fail(ZeroDivisionError("checker bug"))
        elif (credentials.username, password) in (("alice", "secret"), ("alice", " pass phrase ")):
            self.client.identity = "alice@example.test"
            result = succeed(Authenticated("alice@example.test"))
        elif credentials.username == "alice":
            result = fail(AuthenticationFailed("wrong password"))
        else:
            result = fail(AuthenticationFailed("unknown user"))
        if self.test.hold_logins:
            held: Deferred[Authenticated] = Deferred()
            self.test.held_logins.append((held, result))
            return held
        return result

    def refuse(self, username: str, method: str, reason: str) -> Deferred[Authenticated]:
        self.test.logins.append((username, "", method))
        return fail(AuthenticationFailed(reason))

    def login_apop(self, username: str, timestamp: str, digest: str) -> Deferred[Authenticated]:
        """alice's password is "secret"; "tls" needs TLS, "off" is refused, "down" is temporary."""
        if username == "tls":
            raise EncryptionRequired("APOP requires TLS")
        if username == "off":
            raise MechanismUnavailable("APOP is not allowed for this client")
        self.test.logins.append((username, digest, f"APOP {timestamp}"))
        if username == "down":
            return fail(TemporaryAuthFailure("directory down"))
        if username == "alice" and digest == hashlib.md5(f"{timestamp}secret".encode()).hexdigest():
            self.client.identity = "alice@example.test"
            return succeed(Authenticated("alice@example.test"))
        return fail(AuthenticationFailed("wrong password"))

    def logout(self) -> None:
        self.logouts += 1
        self.client.identity = None


class RecordingLogs:
    def __init__(self) -> None:
        self.debugs: list[tuple[str, str, dict[str, object]]] = []
        self.errors: list[tuple[str, dict[str, object]]] = []
        self.mails: list[tuple[str, dict[str, object]]] = []
        self.securities: list[tuple[str, dict[str, object]]] = []

    def debug(self, category: str, event: str, client: ClientInfo | None = None, **fields: object) -> None:
        self.debugs.append((category, event, fields))

    def error(self, event: str, client: ClientInfo | None = None, **fields: object) -> None:
        self.errors.append((event, fields))

    def mail(self, event: str, client: ClientInfo | None = None, **fields: object) -> None:
        self.mails.append((event, fields))

    def security(self, event: str, client: ClientInfo | None = None, **fields: object) -> None:
        self.securities.append((event, fields))


class Transport(StringTransport):
    """A TCP-like StringTransport: records NODELAY, writes, STARTTLS, and can fill up like a socket.

    With ``buffer_limit`` set, a registered streaming producer is paused once that many bytes have
    been written since the test last called `drain` (a client that reads slowly).
    """

    def __init__(self) -> None:
        super().__init__(
            hostAddress=IPv4Address("TCP", "192.0.2.1", 110),
            peerAddress=IPv4Address("TCP", "198.51.100.7", 40000),
        )
        self.nodelay: bool | None = None
        self.writes = 0
        self.tls_context: object = None
        self.before_tls = b""
        self.buffer_limit: int | None = None
        self.buffered = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)
        self.buffered += len(data)
        if self.buffer_limit is not None and self.buffered >= self.buffer_limit and self.producer:
            self.producer.pauseProducing()

    def drain(self) -> None:
        """The client read everything: the transport asks its producer for more."""
        self.buffered = 0
        if self.producer is not None:
            self.producer.resumeProducing()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def startTLS(self, context: object) -> None:
        self.tls_context = context
        self.before_tls = self.value()


class Conn:
    """One client connection; `send` returns exactly what the server wrote in response."""

    def __init__(self, protocol: POP3Server, transport: Transport) -> None:
        self.protocol = protocol
        self.transport = transport
        self.greeting = self.take()

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


class POP3TestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.logs = RecordingLogs()
        self.view = FakeView(MESSAGES)
        self.sessions: list[FakeSession] = []
        self.logins: list[tuple[str, str, str]] = []
        self.opened: list[str] = []
        self.hold_logins = False
        self.held_logins: list[tuple[Deferred[Authenticated], Deferred[Authenticated]]] = []
        self.maildrop_answer: Exception | None = None
        self.hold_maildrop = False
        self.held_maildrops: list[tuple[Deferred[FakeView], FakeView]] = []

    def accounts(self, address: str) -> Deferred[Any]:
        self.opened.append(address)
        return succeed(FakeAccount(address, self.view, self))

    def session_factory(self, client: ClientInfo) -> FakeSession:
        session = FakeSession(client, self)
        self.sessions.append(session)
        return session

    def factory(self, tls_context: object = CONTEXT, **changes: Any) -> POP3Factory:
        settings = dataclasses.replace(SETTINGS, **changes)
        return POP3Factory(settings, self.accounts, self.session_factory, tls_context, self.clock, self.logs)

    def connect(
        self, tls_context: object = CONTEXT, transport: Transport | None = None, **changes: Any
    ) -> Conn:
        protocol = self.factory(tls_context, **changes).buildProtocol(None)
        transport = transport or Transport()
        protocol.makeConnection(transport)
        return Conn(protocol, transport)

    def logged_in(self, **changes: Any) -> Conn:
        conn = self.connect(**changes)
        self.assertEqual(conn.send(b"USER alice\r\nPASS secret\r\n"), b"+OK Send PASS\r\n+OK Logged in\r\n")
        return conn

    def release_logins(self) -> None:
        while self.held_logins:
            held, result = self.held_logins.pop(0)
            result.chainDeferred(held)


# --- greeting and CAPA ---------------------------------------------------------------------------


class GreetingTests(POP3TestCase):
    def test_greeting_names_no_product(self) -> None:
        """``+OK``, no product name, an RFC 1939 msg-id timestamp last; NODELAY set; connect logged."""
        conn = self.connect()
        greeting = conn.greeting
        match = re.fullmatch(
            rb"\+OK POP3 server ready (<[0-9a-f]{16}\.1800000000@mail\.example\.test>)\r\n", greeting
        )
        self.assertIsNotNone(match, greeting)
        assert match is not None
        self.assertEqual(conn.protocol.timestamp.encode(), match.group(1))
        self.assertTrue(conn.transport.nodelay)
        self.assertEqual(conn.protocol.client.peer_host, "198.51.100.7")
        self.assertEqual(self.logs.debugs[0][:2], ("pop3", "connect"))

    def test_timestamps_are_unpredictable(self) -> None:
        """Two connections in the same second get different timestamps (APOP replay protection)."""
        first, second = self.connect(), self.connect()
        self.assertNotEqual(first.protocol.timestamp, second.protocol.timestamp)

    def test_product_when_not_hidden(self) -> None:
        """With a product name (hide_version = false) the greeting and CAPA IMPLEMENTATION name it."""
        conn = self.connect(banner_product="kms 0.1.0")
        self.assertTrue(conn.greeting.startswith(b"+OK kms 0.1.0 POP3 server ready <"))
        self.assertEqual(
            conn.send(b"CAPA\r\n"), CAPA + b"SASL PLAIN\r\nSTLS\r\nIMPLEMENTATION kms 0.1.0\r\n.\r\n"
        )


class CapaTests(POP3TestCase):
    def test_capa_before_login(self) -> None:
        """CAPA lists what we do (no joke capabilities), the allowed mechanisms and STLS."""
        self.assertEqual(self.connect().send(b"capa\r\n"), CAPA + b"SASL PLAIN\r\nSTLS\r\n.\r\n")

    def test_capa_without_tls_or_mechanisms(self) -> None:
        """No context: no STLS; no mechanism allowed: no SASL line, and no USER (it goes with
        PLAIN and LOGIN, like IMAP LOGIN), so USER and PASS are refused."""
        conn = self.connect(tls_context=None)
        self.sessions[0]._engine = SASLEngine([])
        self.assertEqual(conn.send(b"CAPA\r\n"), CAPA.replace(b"USER\r\n", b"") + b".\r\n")
        refused = b"-ERR [AUTH] Plaintext authentication is disabled\r\n"
        self.assertEqual(conn.send(b"USER alice\r\nPASS secret\r\n"), refused * 2)
        self.assertEqual(self.logins, [])

    def test_capa_under_tls_and_after_login(self) -> None:
        """On pop3s STLS is gone and LOGIN is allowed; after login the list is the same (RFC 2449 §5)."""
        conn = self.logged_in(implicit_tls=True, listener="pop3s")
        self.assertTrue(conn.protocol.client.tls)
        self.assertEqual(conn.send(b"CAPA\r\n"), CAPA + b"SASL PLAIN LOGIN\r\n.\r\n")

    def test_capa_with_an_argument(self) -> None:
        """P2: ``CAPA x`` crashed Twisted's server; here it is a syntax error and the session goes on."""
        conn = self.connect()
        self.assertEqual(conn.send(b"CAPA x\r\n"), b"-ERR Syntax: CAPA\r\n")
        self.assertFalse(conn.closed)
        self.assertEqual(conn.send(b"CAPA\r\n"), CAPA + b"SASL PLAIN\r\nSTLS\r\n.\r\n")


class ApopTests(POP3TestCase):
    """APOP (RFC 1939 §7) against the greeting's timestamp; the session decides (storage, policy)."""

    def apop(self, conn: Conn, user: str, password: str = "secret") -> bytes:
        digest = hashlib.md5(f"{conn.protocol.timestamp}{password}".encode()).hexdigest()
        return conn.send(f"APOP {user} {digest}\r\n".encode())

    def test_success(self) -> None:
        conn = self.connect()
        self.assertEqual(self.apop(conn, "alice"), b"+OK Logged in\r\n")
        self.assertEqual(self.opened, ["alice@example.test"])
        [(user, _digest, how)] = self.logins
        self.assertEqual((user, how), ("alice", f"APOP {conn.protocol.timestamp}"))
        self.assertEqual(conn.send(b"STAT\r\n")[:3], b"+OK")

    def test_failures(self) -> None:
        """Wrong digest: [AUTH]; trouble: [SYS/TEMP]; policy: plain refusals; the session goes on."""
        conn = self.connect(max_errors=100)
        self.assertEqual(self.apop(conn, "alice", "wrong"), b"-ERR [AUTH] Authentication failed\r\n")
        self.assertEqual(self.apop(conn, "down"), b"-ERR [SYS/TEMP] Temporary authentication failure\r\n")
        self.assertEqual(self.apop(conn, "tls"), b"-ERR Encryption required for APOP\r\n")
        self.assertEqual(self.apop(conn, "off"), b"-ERR APOP not available\r\n")
        self.assertFalse(conn.closed)
        self.assertEqual(self.apop(conn, "alice"), b"+OK Logged in\r\n")

    def test_name_with_spaces_and_no_digest_in_debug_log(self) -> None:
        """The digest is the last word; it never reaches the debug log (audit P7)."""
        conn = self.connect()
        self.assertEqual(
            conn.send(b"APOP alice smith 0123456789abcdef0123456789abcdef\r\n"),
            b"-ERR [AUTH] Authentication failed\r\n",
        )
        self.assertEqual(self.logins[0][0], "alice smith")
        self.assertNotIn("0123456789abcdef", repr(self.logs.debugs))


# --- commands in the wrong state, malformed lines ------------------------------------------------


class StateTests(POP3TestCase):
    def test_transaction_commands_before_login(self) -> None:
        """Every TRANSACTION command is refused in AUTHORIZATION, with or without arguments."""
        conn = self.connect(max_errors=100)
        for line in (
            b"STAT",
            b"LIST",
            b"LIST 1",
            b"RETR 1",
            b"DELE 1",
            b"NOOP",
            b"RSET",
            b"TOP 1 0",
            b"UIDL",
            b"UIDL 1",
            b"retr",
        ):
            self.assertEqual(conn.send(line + b"\r\n"), NOT_NOW, line)
        self.assertEqual(self.view.reads, [])

    def test_authorization_commands_after_login(self) -> None:
        """USER, PASS, AUTH, APOP and STLS are refused in TRANSACTION; the session stays logged in."""
        conn = self.logged_in(max_errors=100)
        for line in (b"USER bob", b"PASS secret", b"AUTH PLAIN " + PLAIN_OK, b"AUTH", b"APOP a b", b"STLS"):
            self.assertEqual(conn.send(line + b"\r\n"), NOT_NOW, line)
        self.assertEqual(conn.protocol.client.identity, "alice@example.test")
        self.assertEqual(len(self.logins), 1)
        self.assertEqual(conn.send(b"NOOP\r\n"), b"+OK\r\n")

    def test_unknown_and_malformed_lines(self) -> None:
        """Unknown keywords (LAST, RPOP included), empty lines, NUL and bad UTF-8: -ERR, never a crash."""
        conn = self.logged_in(max_errors=100)
        for line, reply in [
            (b"XYZZY\r\n", b"-ERR Unknown command\r\n"),
            (b"LAST\r\n", b"-ERR Unknown command\r\n"),
            (b"RPOP x\r\n", b"-ERR Unknown command\r\n"),
            (b"\r\n", b"-ERR Unknown command\r\n"),
            (b" STAT\r\n", b"-ERR Unknown command\r\n"),
            (b"ST\0AT\r\n", b"-ERR NUL character in command\r\n"),
            (b"STAT \xff\r\n", b"-ERR Command is not valid UTF-8\r\n"),
            (b"stat\n", b"+OK 3 108\r\n"),
        ]:
            self.assertEqual(conn.send(line), reply, line)

    def test_wrong_arity_never_crashes(self) -> None:
        """P2: every command with too many or too few arguments gets its syntax, and the session goes on."""
        conn = self.logged_in(max_errors=100)
        for line, reply in [
            (b"STAT 1", b"-ERR Syntax: STAT"),
            (b"LIST 1 2", b"-ERR Syntax: LIST [message]"),
            (b"UIDL 1 2", b"-ERR Syntax: UIDL [message]"),
            (b"RETR", b"-ERR Syntax: RETR message"),
            (b"RETR 1 2", b"-ERR Syntax: RETR message"),
            (b"DELE", b"-ERR Syntax: DELE message"),
            (b"DELE 1 2", b"-ERR Syntax: DELE message"),
            (b"TOP", b"-ERR Syntax: TOP message lines"),
            (b"TOP 1", b"-ERR Syntax: TOP message lines"),
            (b"TOP 1 2 3", b"-ERR Syntax: TOP message lines"),
            (b"NOOP x", b"-ERR Syntax: NOOP"),
            (b"RSET x", b"-ERR Syntax: RSET"),
            (b"QUIT now", b"-ERR Syntax: QUIT"),
        ]:
            self.assertEqual(conn.send(line + b"\r\n"), reply + b"\r\n", line)
        conn2 = self.connect(max_errors=100)
        for line, reply in [
            (b"USER", b"-ERR Syntax: USER name"),
            (b"USER   ", b"-ERR Syntax: USER name"),
            (b"AUTH PLAIN a b", b"-ERR Syntax: AUTH [mechanism [initial-response]]"),
            (b"STLS x", b"-ERR Syntax: STLS"),
            (b"APOP", b"-ERR Syntax: APOP name digest"),
            (b"APOP alice", b"-ERR Syntax: APOP name digest"),
        ]:
            self.assertEqual(conn2.send(line + b"\r\n"), reply + b"\r\n", line)
        self.assertFalse(conn.closed or conn2.closed)

    def test_extra_spaces_are_forgiven(self) -> None:
        """Trailing blanks and doubled separators between arguments are not syntax errors."""
        conn = self.logged_in()
        self.assertEqual(conn.send(b"STAT \r\n"), b"+OK 3 108\r\n")
        self.assertEqual(conn.send(b"LIST  2 \r\n"), b"+OK 2 22\r\n")


# --- USER/PASS -----------------------------------------------------------------------------------


class UserPassTests(POP3TestCase):
    def test_login_opens_the_maildrop(self) -> None:
        """USER/PASS logs in through the session (method USER/PASS) and opens the identity's maildrop."""
        conn = self.logged_in()
        self.assertEqual(self.logins, [("alice", "secret", "USER/PASS")])
        self.assertEqual(self.opened, ["alice@example.test"])
        self.assertEqual(conn.protocol.client.identity, "alice@example.test")
        self.assertEqual(conn.send(b"STAT\r\n"), b"+OK 3 108\r\n")

    def test_password_is_the_rest_of_the_line(self) -> None:
        """Spaces inside, before and after a password are part of it."""
        conn = self.connect()
        conn.send(b"USER alice\r\n")
        self.assertEqual(conn.send(b"PASS  pass phrase \r\n"), b"+OK Logged in\r\n")
        self.assertEqual(self.logins, [("alice", " pass phrase ", "USER/PASS")])

    def test_failures_look_the_same(self) -> None:
        """Unknown user, wrong password and empty password all get the same [AUTH] reply."""
        conn = self.connect()
        replies = [
            conn.send(b"USER " + user + b"\r\nPASS " + password + b"\r\n")
            for user, password in [(b"nobody", b"secret"), (b"alice", b"wrong"), (b"alice", b"")]
        ]
        self.assertEqual(replies, [b"+OK Send PASS\r\n" + AUTH_FAILED] * 3)
        self.assertEqual([login[0] for login in self.logins], ["nobody", "alice", "alice"])
        self.assertIsNone(conn.protocol.client.identity)
        self.assertEqual(self.opened, [])

    def test_pass_needs_a_fresh_user(self) -> None:
        """PASS without USER, or after a failed PASS, is refused without asking the session."""
        conn = self.connect()
        self.assertEqual(conn.send(b"PASS secret\r\n"), b"-ERR Send USER first\r\n")
        conn.send(b"USER alice\r\nPASS wrong\r\n")
        self.assertEqual(conn.send(b"PASS secret\r\n"), b"-ERR Send USER first\r\n")
        self.assertEqual(len(self.logins), 1)

    def test_temporary_failures(self) -> None:
        """An outage is [SYS/TEMP], never [AUTH]; a crash behind the session too, and it is logged."""
        conn = self.connect()
        self.assertEqual(
            conn.send(b"USER alice\r\nPASS tempfail\r\n"),
            b"+OK Send PASS\r\n-ERR [SYS/TEMP] Temporary authentication failure\r\n",
        )
        self.assertEqual(self.logs.errors, [])
        self.assertEqual(
            conn.send(b"USER alice\r\nPASS crash\r\n"),
            b"+OK Send PASS\r\n-ERR [SYS/TEMP] Temporary authentication failure\r\n",
        )
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(
            self.logs.errors, [("pop3-auth-error", {"error": "checker bug", "type": "ZeroDivisionError"})]
        )

    def test_maildrop_locked(self) -> None:
        """A maildrop held by another session: [IN-USE], the login is undone, a later try works."""
        self.maildrop_answer = MaildropLocked()
        conn = self.connect()
        self.assertEqual(
            conn.send(b"USER alice\r\nPASS secret\r\n"),
            b"+OK Send PASS\r\n-ERR [IN-USE] Mailbox is locked by another POP3 session\r\n",
        )
        self.assertIsNone(conn.protocol.client.identity)
        self.assertEqual(self.sessions[0].logouts, 1)
        self.assertEqual(conn.send(b"STAT\r\n"), NOT_NOW)
        self.maildrop_answer = None
        self.assertEqual(conn.send(b"USER alice\r\nPASS secret\r\n"), b"+OK Send PASS\r\n+OK Logged in\r\n")

    def test_store_failure_on_open(self) -> None:
        """P6: a store error at login is [SYS/TEMP] with a fixed text (no class names) and logged."""
        self.maildrop_answer = RuntimeError("database is locked")
        conn = self.connect()
        reply = conn.send(b"USER alice\r\nPASS secret\r\n")
        self.assertEqual(reply, b"+OK Send PASS\r\n-ERR [SYS/TEMP] Mailbox unavailable\r\n")
        self.assertNotIn(b"RuntimeError", reply)
        self.assertNotIn(b"database", reply)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.logs.errors[0][0], "pop3-maildrop-error")
        self.assertIsNone(conn.protocol.client.identity)

    def test_commands_wait_for_the_login(self) -> None:
        """Commands pipelined behind PASS run after it, in the state it leads to."""
        self.hold_logins = True
        conn = self.connect()
        self.assertEqual(conn.send(b"USER alice\r\nPASS secret\r\nSTAT\r\nQUIT\r\n"), b"+OK Send PASS\r\n")
        self.release_logins()
        self.assertEqual(conn.take(), b"+OK Logged in\r\n+OK 3 108\r\n+OK Logging out\r\n")
        self.assertTrue(conn.closed)


# --- AUTH ----------------------------------------------------------------------------------------


class AuthTests(POP3TestCase):
    def test_list_mechanisms(self) -> None:
        """AUTH without an argument lists the mechanisms allowed now."""
        self.assertEqual(
            self.connect().send(b"AUTH\r\n"), b"+OK Supported mechanisms follow\r\nPLAIN\r\n.\r\n"
        )

    def test_plain_with_initial_response(self) -> None:
        """AUTH PLAIN <b64> (RFC 5034 initial response) logs in and opens the maildrop."""
        conn = self.connect()
        self.assertEqual(conn.send(b"AUTH PLAIN " + PLAIN_OK + b"\r\n"), b"+OK Logged in\r\n")
        self.assertEqual(self.logins, [("alice", "secret", "PLAIN")])
        self.assertEqual(self.opened, ["alice@example.test"])

    def test_plain_with_challenge(self) -> None:
        """Without an initial response the server sends an empty "+ " challenge first."""
        conn = self.connect()
        self.assertEqual(conn.send(b"auth plain\r\n"), b"+ \r\n")
        self.assertEqual(conn.send(PLAIN_OK + b"\r\n"), b"+OK Logged in\r\n")

    def test_login_over_tls(self) -> None:
        """LOGIN, allowed over TLS only, prompts Username: and Password: in base64."""
        conn = self.connect(implicit_tls=True)
        self.assertEqual(conn.send(b"AUTH LOGIN\r\n"), b"+ VXNlcm5hbWU6\r\n")
        self.assertEqual(conn.send(b64(b"alice") + b"\r\n"), b"+ UGFzc3dvcmQ6\r\n")
        self.assertEqual(conn.send(b64(b"secret") + b"\r\n"), b"+OK Logged in\r\n")

    def test_bad_auth_commands(self) -> None:
        """Every malformed AUTH gets a fixed reply and the connection lives on, still unauthenticated."""
        conn = self.connect(max_errors=100)
        for line, reply in [
            (b"AUTH X-UNKNOWN", b"-ERR Unrecognized authentication mechanism"),
            (b"AUTH LOGIN", b"-ERR [AUTH] Plaintext authentication disallowed without TLS"),
            (b"AUTH PLAIN !!!", b"-ERR Cannot decode response"),
            (b"AUTH PLAIN \xc3\xa9", b"-ERR Cannot decode response"),
            (b"AUTH PLAIN *", b"-ERR Authentication cancelled"),
            (b"AUTH PLAIN =", b"-ERR Cannot decode response"),
            (b"AUTH PLAIN " + b64(b"no-nuls"), b"-ERR Cannot decode response"),
            (b"AUTH PLAIN " + b64(b"\0alice\0wrong"), AUTH_FAILED.rstrip()),
            (b"AUTH PLAIN " + b64(b"\0nobody\0secret"), AUTH_FAILED.rstrip()),
            (b"AUTH PLAIN " + b64(b"\0alice\0"), AUTH_FAILED.rstrip()),
            (b"AUTH PLAIN " + b64(b"\0alice\0tempfail"), b"-ERR [SYS/TEMP] Temporary authentication failure"),
        ]:
            self.assertEqual(conn.send(line + b"\r\n"), reply + b"\r\n", line)
        self.assertIsNone(conn.protocol.client.identity)
        self.assertEqual(self.opened, [])

    def test_bad_responses_in_an_exchange(self) -> None:
        """Cancel, bad base64 and wrong credentials after "+ " end the exchange with a reply."""
        conn = self.connect(max_errors=100)
        for response, reply in [
            (b"*", b"-ERR Authentication cancelled\r\n"),
            (b"not base64!", b"-ERR Cannot decode response\r\n"),
            (b"", b"-ERR Cannot decode response\r\n"),
            (b64(b"\0alice\0nope"), AUTH_FAILED),
        ]:
            self.assertEqual(conn.send(b"AUTH PLAIN\r\n"), b"+ \r\n")
            self.assertEqual(conn.send(response + b"\r\n"), reply, response)
            self.assertEqual(conn.send(b"CAPA\r\n")[:4], b"+OK ")

    def test_over_long_response_ends_the_exchange(self) -> None:
        """A SASL line over max_line is "Line too long" and the next line is a command again."""
        conn = self.connect()
        conn.send(b"AUTH PLAIN\r\n")
        self.assertEqual(
            conn.send(b"A" * 600 + b"\r\nAUTH\r\n"),
            b"-ERR Line too long\r\n+OK Supported mechanisms follow\r\nPLAIN\r\n.\r\n",
        )

    def test_auth_forgets_user(self) -> None:
        """A USER name does not survive an AUTH attempt."""
        conn = self.connect()
        conn.send(b"USER alice\r\nAUTH PLAIN *\r\n")
        self.assertEqual(conn.send(b"PASS secret\r\n"), b"-ERR Send USER first\r\n")


# --- STLS ----------------------------------------------------------------------------------------


class STLSTests(POP3TestCase):
    def test_pipelined_commands_after_stls_are_discarded(self) -> None:
        """Plaintext pipelined behind STLS is dropped (RFC 2595 §4); the session restarts under TLS."""
        conn = self.connect()
        conn.send(b"USER alice\r\n")
        old_session = self.sessions[0]
        reply = conn.send(b"STLS\r\nPASS secret\r\nRETR 1\r\n")
        self.assertEqual(reply, b"+OK Begin TLS negotiation\r\n")
        self.assertEqual(conn.transport.before_tls, b"+OK Begin TLS negotiation\r\n")
        self.assertIs(conn.transport.tls_context, CONTEXT)
        self.assertEqual(self.logins, [])
        self.assertTrue(conn.protocol.client.tls)
        self.assertEqual(old_session.logouts, 1)
        self.assertEqual(len(self.sessions), 2)
        self.assertTrue(self.sessions[1].client.tls)
        # USER is forgotten; the new CAPA has no STLS and more mechanisms.
        self.assertEqual(conn.send(b"PASS secret\r\n"), b"-ERR Send USER first\r\n")
        self.assertEqual(conn.send(b"CAPA\r\n"), CAPA + b"SASL PLAIN LOGIN\r\n.\r\n")
        self.assertEqual(conn.send(b"STLS\r\n"), b"-ERR Command not permitted when TLS active\r\n")

    def test_stls_refusals(self) -> None:
        """No certificate: -ERR; on pop3s: -ERR; arguments: syntax; after login: wrong state."""
        self.assertEqual(self.connect(tls_context=None).send(b"STLS\r\n"), b"-ERR TLS not available\r\n")
        self.assertEqual(
            self.connect(implicit_tls=True).send(b"STLS\r\n"),
            b"-ERR Command not permitted when TLS active\r\n",
        )
        self.assertEqual(self.logged_in().send(b"STLS\r\n"), NOT_NOW)


# --- security policy (SPEC §5) -------------------------------------------------------------------


class SecurityPolicyTests(POP3TestCase):
    """The real policy: in the settings for USER/PASS and the ``encrypted`` command restrictions,
    and through the real engine for AUTH (as `kms.service` wires it)."""

    engine_policy: SecurityPolicy | None = None  # set: sessions use the real engine with it

    def session_factory(self, client: ClientInfo) -> FakeSession:
        session = super().session_factory(client)
        if self.engine_policy is not None:
            session._engine = SASLEngine(["CRAM-MD5", "PLAIN", "LOGIN"], engine_policy(self.engine_policy))
        return session

    def policy_connect(self, level: str, peer: str = "198.51.100.7", **changes: Any) -> Conn:
        self.engine_policy = SecurityPolicy(level, parse_group(["10.0.0.0/8"]))
        transport = Transport()
        transport.peerAddr = IPv4Address("TCP", peer, 40000)
        return self.connect(transport=transport, policy=self.engine_policy, max_errors=50, **changes)

    def test_secure_auth_plaintext_needs_tls(self) -> None:
        """Before STLS: no USER, only CRAM-MD5, USER/PASS/AUTH PLAIN refused with [AUTH]; after: all."""
        conn = self.policy_connect("secure_auth")
        without_user = CAPA.replace(b"USER\r\n", b"")
        self.assertEqual(conn.send(b"CAPA\r\n"), without_user + b"SASL CRAM-MD5\r\nSTLS\r\n.\r\n")
        refused = b"-ERR [AUTH] Plaintext authentication disallowed without TLS\r\n"
        for line in (b"USER alice", b"PASS secret", b"AUTH PLAIN " + PLAIN_OK):
            self.assertEqual(conn.send(line + b"\r\n"), refused, line)
        self.assertEqual(self.logins, [])
        self.assertEqual(
            self.logs.securities,
            [
                (
                    "mechanism-refused",
                    {"protocol": "pop3", "method": "USER/PASS", "reason": "USER/PASS requires TLS"},
                )
            ]
            * 2,
        )
        conn.send(b"STLS\r\n")
        self.assertEqual(conn.send(b"CAPA\r\n"), CAPA + b"SASL CRAM-MD5 PLAIN LOGIN\r\n.\r\n")
        self.assertEqual(conn.send(b"USER alice\r\nPASS secret\r\n"), b"+OK Send PASS\r\n+OK Logged in\r\n")

    def test_user_pass_asks_the_policy_itself(self) -> None:
        """USER/PASS is not SASL: refused by the policy even if the session's engine would allow PLAIN."""
        conn = self.connect(policy=SecurityPolicy("secure_auth"))
        self.assertEqual(
            conn.send(b"USER alice\r\n"), b"-ERR [AUTH] Plaintext authentication disallowed without TLS\r\n"
        )

    def test_encrypted_allows_only_tls_setup_before_tls(self) -> None:
        """CAPA, STLS, QUIT (and NOOP, though not before login); login commands [AUTH], others -ERR."""
        conn = self.policy_connect("encrypted")
        without_user = CAPA.replace(b"USER\r\n", b"")
        self.assertEqual(conn.send(b"CAPA\r\n"), without_user + b"STLS\r\n.\r\n")
        for line, reply in [
            (b"USER alice", b"-ERR [AUTH] Encryption required by security policy"),
            (b"PASS secret", b"-ERR [AUTH] Encryption required by security policy"),
            (b"AUTH CRAM-MD5", b"-ERR [AUTH] Encryption required by security policy"),
            (
                b"APOP alice c4c9334bac560ecc979e58001b3e22fb",
                b"-ERR [AUTH] Encryption required by security policy",
            ),
            (b"STAT", b"-ERR Encryption required by security policy"),
            (b"NOOP", NOT_NOW.rstrip()),
            (b"XYZZY", b"-ERR Unknown command"),
        ]:
            self.assertEqual(conn.send(line + b"\r\n"), reply + b"\r\n", line)
        self.assertEqual(self.logins, [])
        self.assertEqual(
            [fields["command"] for event, fields in self.logs.securities if event == "command-refused"],
            ["USER", "PASS", "AUTH", "APOP", "STAT"],
        )
        self.assertEqual(conn.send(b"STLS\r\n"), b"+OK Begin TLS negotiation\r\n")
        self.assertEqual(conn.send(b"USER alice\r\nPASS secret\r\n"), b"+OK Send PASS\r\n+OK Logged in\r\n")
        self.assertEqual(conn.send(b"STAT\r\n"), b"+OK 3 108\r\n")

    def test_quit_before_tls(self) -> None:
        conn = self.policy_connect("encrypted")
        self.assertEqual(conn.send(b"QUIT\r\n"), b"+OK Logging out\r\n")
        self.assertTrue(conn.closed)

    def test_exempt_and_implicit_tls(self) -> None:
        """A client of the exception group, or one on pop3s, logs in as if there were no policy."""
        conn = self.policy_connect("encrypted", peer="10.0.0.7")
        self.assertEqual(conn.send(b"CAPA\r\n"), CAPA + b"SASL CRAM-MD5 PLAIN LOGIN\r\nSTLS\r\n.\r\n")
        self.assertEqual(conn.send(b"USER alice\r\nPASS secret\r\n"), b"+OK Send PASS\r\n+OK Logged in\r\n")
        conn = self.policy_connect("encrypted", listener="pop3s", implicit_tls=True)
        self.assertEqual(conn.send(b"USER alice\r\nPASS secret\r\n"), b"+OK Send PASS\r\n+OK Logged in\r\n")
        self.assertEqual(self.logs.securities, [])


# --- TRANSACTION ---------------------------------------------------------------------------------


class TransactionTests(POP3TestCase):
    def test_stat_list_uidl(self) -> None:
        """STAT, LIST and UIDL number the maildrop from 1; UIDL is "<uidvalidity>.<uid>"."""
        conn = self.logged_in()
        self.assertEqual(conn.send(b"STAT\r\n"), b"+OK 3 108\r\n")
        self.assertEqual(
            conn.send(b"LIST\r\n"), b"+OK 3 messages (108 octets)\r\n1 59\r\n2 22\r\n3 27\r\n.\r\n"
        )
        self.assertEqual(conn.send(b"LIST 3\r\n"), b"+OK 3 27\r\n")
        self.assertEqual(
            conn.send(b"UIDL\r\n"),
            b"+OK Unique-ID listing follows\r\n1 1700000000.3\r\n2 1700000000.7\r\n3 1700000000.9\r\n.\r\n",
        )
        self.assertEqual(conn.send(b"UIDL 2\r\n"), b"+OK 2 1700000000.7\r\n")
        self.assertEqual(conn.send(b"NOOP\r\n"), b"+OK\r\n")

    def test_empty_maildrop(self) -> None:
        """An empty maildrop lists nothing and every message number is out of range."""
        self.view = FakeView({})
        conn = self.logged_in()
        self.assertEqual(conn.send(b"STAT\r\n"), b"+OK 0 0\r\n")
        self.assertEqual(conn.send(b"LIST\r\n"), b"+OK 0 messages (0 octets)\r\n.\r\n")
        self.assertEqual(conn.send(b"UIDL\r\n"), b"+OK Unique-ID listing follows\r\n.\r\n")
        self.assertEqual(conn.send(b"RETR 1\r\n"), b"-ERR No such message\r\n")

    def test_snapshot_is_taken_at_login(self) -> None:
        """Messages that arrive during the session do not renumber it (RFC 1939 §5)."""
        conn = self.logged_in()
        self.view.messages.insert(0, info(1, b"x\r\n"))
        self.assertEqual(conn.send(b"STAT\r\n"), b"+OK 3 108\r\n")

    def test_dele_and_rset(self) -> None:
        """DELE hides a message from STAT/LIST/UIDL/RETR/TOP; RSET brings every one back."""
        conn = self.logged_in()
        self.assertEqual(conn.send(b"DELE 2\r\n"), b"+OK Message 2 deleted\r\n")
        self.assertEqual(conn.send(b"STAT\r\n"), b"+OK 2 86\r\n")
        self.assertEqual(conn.send(b"LIST\r\n"), b"+OK 2 messages (86 octets)\r\n1 59\r\n3 27\r\n.\r\n")
        self.assertEqual(
            conn.send(b"UIDL\r\n"),
            b"+OK Unique-ID listing follows\r\n1 1700000000.3\r\n3 1700000000.9\r\n.\r\n",
        )
        for line in (b"LIST 2", b"UIDL 2", b"RETR 2", b"TOP 2 0", b"DELE 2"):
            self.assertEqual(conn.send(line + b"\r\n"), b"-ERR Message already deleted\r\n", line)
        self.assertEqual(conn.send(b"RSET\r\n"), b"+OK 3 messages (108 octets)\r\n")
        self.assertEqual(conn.send(b"LIST 2\r\n"), b"+OK 2 22\r\n")
        self.assertEqual(self.view.stores, [])

    def test_message_numbers_out_of_range(self) -> None:
        """P3: zero, too large, negative, non-numeric, non-ASCII digits, huge: -ERR, never a crash."""
        conn = self.logged_in(max_errors=100)
        for word, reply in [
            (b"0", b"-ERR No such message"),
            (b"4", b"-ERR No such message"),
            (b"99", b"-ERR No such message"),
            (b"9999999999", b"-ERR No such message"),
            (b"-1", b"-ERR Invalid message number"),
            (b"+1", b"-ERR Invalid message number"),
            (b"1.0", b"-ERR Invalid message number"),
            (b"abc", b"-ERR Invalid message number"),
            ("\u0661".encode(), b"-ERR Invalid message number"),  # ARABIC-INDIC DIGIT ONE
            (b"1" * 500, b"-ERR Invalid message number"),
        ]:
            for command in (b"DELE ", b"RETR ", b"LIST ", b"UIDL "):
                self.assertEqual(conn.send(command + word + b"\r\n"), reply + b"\r\n", command + word[:20])
            self.assertEqual(conn.send(b"TOP " + word + b" 1\r\n"), reply + b"\r\n")
        self.assertEqual(conn.send(b"TOP 1 x\r\n"), b"-ERR Invalid line count\r\n")
        self.assertEqual(conn.send(b"TOP 1 -1\r\n"), b"-ERR Invalid line count\r\n")
        self.assertFalse(conn.closed)
        self.assertEqual(self.view.reads, [])

    def test_retr_sends_the_wire_form_as_is(self) -> None:
        """P5: stored CRLF goes out unchanged (no CR added); P4: the dotted line is stuffed."""
        conn = self.logged_in()
        conn.transport.writes = 0
        self.assertEqual(
            conn.send(b"RETR 1\r\n"),
            b"+OK 59 octets\r\nSubject: one\r\nFrom: a@x.test\r\n\r\nfirst line\r\n..dotted\r\nlast\r\n.\r\n",
        )
        self.assertEqual(self.view.reads, [3])
        self.assertEqual(conn.transport.writes, 1)  # a small message goes out with its +OK line

    def test_retr_stuffs_the_first_line(self) -> None:
        """P4: Twisted never stuffed the first line; a message starting with "." must be."""
        self.view = FakeView({1: b".\r\n", 2: b".hidden: x\r\n\r\n.\r\n.."})
        conn = self.logged_in()
        self.assertEqual(conn.send(b"RETR 1\r\n"), b"+OK 3 octets\r\n..\r\n.\r\n")
        self.assertEqual(conn.send(b"RETR 2\r\n"), b"+OK 19 octets\r\n..hidden: x\r\n\r\n..\r\n...\r\n.\r\n")

    def test_retr_adds_a_final_line_end(self) -> None:
        """A message without a final CRLF gets one before the terminator; an empty one is just "."."""
        self.view = FakeView({1: b"Subject: x\r\n\r\nno newline", 2: b""})
        conn = self.logged_in()
        self.assertEqual(conn.send(b"RETR 1\r\n"), b"+OK 24 octets\r\nSubject: x\r\n\r\nno newline\r\n.\r\n")
        self.assertEqual(conn.send(b"RETR 2\r\n"), b"+OK 0 octets\r\n.\r\n")

    def test_dot_line_at_a_chunk_boundary(self) -> None:
        """P4: Twisted ended the response early when a "." line began exactly at its 16 KiB boundary."""
        first = b"Subject: big\r\n\r\n" + b"x" * (CHUNK_SIZE - 16 - 2) + b"\r\n"
        self.assertEqual(len(first), CHUNK_SIZE)
        message = first + b".\r\nQUIT\r\n" + b"y" * CHUNK_SIZE + b"\r\n.end\r\n"
        self.view = FakeView({1: message})
        conn = self.logged_in()
        reply = conn.send(b"RETR 1\r\n")
        self.assertEqual(
            reply,
            b"+OK %d octets\r\n" % len(message)
            + first
            + b"..\r\nQUIT\r\n"
            + b"y" * CHUNK_SIZE
            + b"\r\n..end\r\n.\r\n",
        )
        self.assertEqual(reply.count(b"\r\n.\r\n"), 1)

    def test_top(self) -> None:
        """TOP sends the header, the empty line and n body lines, stuffed; more than exist: all."""
        conn = self.logged_in()
        self.assertEqual(
            conn.send(b"TOP 1 0\r\n"),
            b"+OK Top of message follows\r\nSubject: one\r\nFrom: a@x.test\r\n\r\n.\r\n",
        )
        self.assertEqual(
            conn.send(b"TOP 1 2\r\n"),
            b"+OK Top of message follows\r\nSubject: one\r\nFrom: a@x.test\r\n\r\n"
            b"first line\r\n..dotted\r\n.\r\n",
        )
        self.assertEqual(
            conn.send(b"TOP 3 100\r\n"),
            b"+OK Top of message follows\r\nSubject: three\r\n\r\n1\r\n2\r\n3\r\n.\r\n",
        )

    def test_read_failure(self) -> None:
        """P6: a store error while reading is [SYS/TEMP] with a fixed text, logged; the session goes on."""
        self.view.read_error = OSError(5, "I/O error")
        conn = self.logged_in()
        reply = conn.send(b"RETR 1\r\nNOOP\r\n")
        self.assertEqual(reply, b"-ERR [SYS/TEMP] Unable to read message\r\n+OK\r\n")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.logs.errors[0][0], "pop3-read-error")

    def test_message_expunged_by_another_session(self) -> None:
        """A message another session expunged meanwhile is -ERR (no traceback, no [SYS/TEMP])."""
        conn = self.logged_in()
        self.view.read_error = MailboxError("message 3 has been expunged", "EXPUNGEISSUED")
        self.assertEqual(conn.send(b"RETR 1\r\n"), b"-ERR Message is no longer available\r\n")
        self.assertEqual(self.logs.errors, [])

    def test_pipelined_transaction_in_order(self) -> None:
        """Pipelined commands behind a slow RETR wait their turn; the replies come out in order."""
        conn = self.logged_in()
        self.view.hold = True
        self.assertEqual(conn.send(b"STAT\r\nRETR 2\r\nLIST 1\r\nRETR 3\r\nDELE 1\r\n"), b"+OK 3 108\r\n")
        self.assertEqual(self.view.reads, [7])
        self.view.release()
        self.assertEqual(conn.take(), b"+OK 22 octets\r\nSubject: two\r\n\r\nbody\r\n.\r\n+OK 1 59\r\n")
        self.view.release()
        self.assertEqual(
            conn.take(),
            b"+OK 27 octets\r\nSubject: three\r\n\r\n1\r\n2\r\n3\r\n.\r\n+OK Message 1 deleted\r\n",
        )


# --- sending large messages ----------------------------------------------------------------------


class ProducerTests(POP3TestCase):
    def big(self) -> bytes:
        return b"Subject: big\r\n\r\n" + (b"." + b"z" * 98 + b"\r\n") * (CHUNK_SIZE // 50)  # ~2 chunks

    def test_sending_follows_the_transport(self) -> None:
        """A message goes out a chunk at a time while the client reads; later commands wait for it."""
        message = self.big()
        self.view = FakeView({1: message})
        conn = self.logged_in()
        conn.transport.buffer_limit = 1
        conn.transport.writes = 0
        out = conn.send(b"RETR 1\r\nNOOP\r\n")
        self.assertEqual(conn.transport.writes, 1)  # the +OK line filled the buffer
        for writes in (2, 3, 4, 5):  # a chunk per drain (three), then the NOOP reply
            conn.transport.drain()
            chunk = conn.take()
            self.assertLess(len(chunk), CHUNK_SIZE * 1.1)
            out += chunk
            self.assertEqual(conn.transport.writes, writes)
        self.assertEqual(
            out,
            b"+OK %d octets\r\n" % len(message) + message.replace(b"\r\n.", b"\r\n..") + b".\r\n+OK\r\n",
        )

    def test_pipelined_commands_wait_while_the_buffer_is_full(self) -> None:
        """Small messages go out in one write each, but a client that pipelines RETRs without
        reading gets no more than the transport holds: the next command waits for a drain."""
        conn = self.logged_in()
        conn.transport.buffer_limit = 30  # each reply fills it
        conn.transport.writes = 0
        out = conn.send(b"RETR 1\r\nRETR 2\r\nSTAT\r\n")
        self.assertEqual(out, b"+OK 59 octets\r\n" + MESSAGES[3].replace(b"\r\n.", b"\r\n..") + b".\r\n")
        self.assertEqual((conn.transport.writes, self.view.reads), (1, [3]))
        conn.transport.drain()
        self.assertEqual(conn.take(), b"+OK 22 octets\r\nSubject: two\r\n\r\nbody\r\n.\r\n")
        conn.transport.buffer_limit = None
        conn.transport.drain()
        self.assertEqual(conn.take(), b"+OK 3 108\r\n")

    def test_client_that_stops_reading_times_out(self) -> None:
        """A client that stops reading mid-message is aborted after command_timeout; no UPDATE."""
        self.view = FakeView({1: self.big()})
        conn = self.logged_in()
        conn.send(b"DELE 1\r\n")
        conn.transport.buffer_limit = 1
        conn.send(b"RSET\r\nRETR 1\r\n")
        self.clock.advance(500)
        conn.transport.drain()  # progress restarts the clock
        self.clock.advance(599)
        self.assertFalse(conn.transport.disconnected)
        self.clock.advance(1)
        self.assertTrue(conn.transport.disconnected)  # aborted, not closed gracefully
        conn.protocol.connectionLost()
        self.assertEqual((self.view.stores, self.view.expunges, self.view.closes), ([], [], 1))

    def test_disconnect_while_sending(self) -> None:
        """A connection lost mid-message stops the producer; nothing more is written."""
        self.view = FakeView({1: self.big()})
        conn = self.logged_in()
        conn.transport.buffer_limit = 1
        conn.send(b"RETR 1\r\nNOOP\r\n")
        producer = conn.transport.producer
        assert producer is not None
        conn.protocol.connectionLost()
        conn.take()
        producer.resumeProducing()
        self.assertEqual(conn.take(), b"")
        self.assertEqual(self.view.closes, 1)


# --- UPDATE --------------------------------------------------------------------------------------


class UpdateTests(POP3TestCase):
    def test_quit_expunges_exactly_the_deleted(self) -> None:
        """QUIT marks the DELE'd UIDs \\Deleted, expunges those only, closes the view, says +OK."""
        conn = self.logged_in()
        conn.send(b"DELE 1\r\nDELE 3\r\n")
        self.assertEqual(conn.send(b"QUIT\r\nNOOP\r\n"), b"+OK Logging out, messages deleted: 2\r\n")
        self.assertTrue(conn.closed)
        self.assertEqual(self.view.stores, [([3, 9], ["\\Deleted"], "+")])
        self.assertEqual(self.view.expunges, [[3, 9]])
        self.assertEqual(sorted(self.view.bodies), [7])
        self.assertEqual(self.view.closes, 1)
        conn.protocol.connectionLost()
        self.assertEqual(self.view.closes, 1)
        self.assertEqual(
            self.logs.mails,
            [
                (
                    "pop3-logout",
                    {
                        "user": "alice@example.test",
                        "retrieved": 0,
                        "retrieved_bytes": 0,
                        "deleted": 2,
                        "ended": "quit",
                    },
                )
            ],
        )

    def test_quit_without_dele_touches_nothing(self) -> None:
        """No DELE (or DELE undone by RSET): QUIT writes nothing to the store and closes the view."""
        conn = self.logged_in()
        conn.send(b"DELE 1\r\nRSET\r\nRETR 2\r\n")
        self.assertEqual(conn.send(b"QUIT\r\n"), b"+OK Logging out\r\n")
        self.assertEqual((self.view.stores, self.view.expunges, self.view.closes), ([], [], 1))
        self.assertEqual(self.logs.mails[0][1]["retrieved"], 1)
        self.assertEqual(self.logs.mails[0][1]["retrieved_bytes"], 22)

    def test_drop_without_quit_deletes_nothing(self) -> None:
        """RFC 1939 §6: a connection that ends without QUIT never enters UPDATE; the view is closed."""
        conn = self.logged_in()
        conn.send(b"DELE 1\r\nDELE 2\r\n")
        conn.protocol.connectionLost()
        self.assertEqual((self.view.stores, self.view.expunges, self.view.closes), ([], [], 1))
        self.assertEqual(self.logs.mails[0][1]["ended"], "disconnect")
        self.assertEqual(self.sessions[0].logouts, 1)
        self.assertEqual(self.logs.debugs[-1], ("pop3", "disconnect", {"errors": 0}))

    def test_update_failure(self) -> None:
        """A store failure in UPDATE: -ERR [SYS/TEMP] (RFC 1939 "some deleted messages not removed")."""
        self.view.fail_expunge = True
        conn = self.logged_in()
        conn.send(b"DELE 1\r\n")
        self.assertEqual(conn.send(b"QUIT\r\n"), b"-ERR [SYS/TEMP] Some deleted messages not removed\r\n")
        self.assertTrue(conn.closed)
        self.assertEqual(self.view.closes, 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.logs.errors[0][0], "pop3-update-error")

    def test_drop_during_update(self) -> None:
        """A QUIT that was received is carried out even if the client leaves before the reply."""
        conn = self.logged_in()
        conn.send(b"DELE 2\r\n")
        self.view.hold = True
        conn.send(b"QUIT\r\n")
        conn.protocol.connectionLost()
        self.assertEqual(self.view.closes, 0)  # the lock is held until UPDATE is over
        self.view.release()
        self.view.release()
        self.assertEqual(self.view.expunges, [[7]])
        self.assertEqual(self.view.closes, 1)
        self.assertEqual(conn.take(), b"")

    def test_quit_before_login(self) -> None:
        """QUIT in AUTHORIZATION says goodbye and closes; nothing was opened."""
        conn = self.connect()
        self.assertEqual(conn.send(b"QUIT\r\n"), b"+OK Logging out\r\n")
        self.assertTrue(conn.closed)
        self.assertEqual(self.logs.mails, [])

    def test_drop_while_logging_in(self) -> None:
        """A maildrop opened after the client left is closed at once; a late login is logged out."""
        self.hold_maildrop = True
        conn = self.connect()
        conn.send(b"USER alice\r\nPASS secret\r\n")
        conn.protocol.connectionLost()
        d, view = self.held_maildrops.pop()
        d.callback(view)
        self.assertEqual(view.closes, 1)
        self.assertEqual(conn.take(), b"")
        self.hold_maildrop, self.hold_logins = False, True
        conn2 = self.connect()
        conn2.send(b"USER alice\r\nPASS secret\r\n")
        conn2.protocol.connectionLost()
        self.release_logins()
        self.assertEqual(self.sessions[1].logouts, 2)
        self.assertEqual(self.opened, ["alice@example.test"])


# --- limits, timers, pipelining, logs ------------------------------------------------------------


class LimitTests(POP3TestCase):
    def test_long_line_across_segments(self) -> None:
        """A line over max_line is refused once and dropped as it arrives; the next line is served."""
        conn = self.connect()
        self.assertEqual(conn.send(b"USER " + b"x" * 300), b"")
        self.assertEqual(conn.send(b"x" * 300), b"-ERR Line too long\r\n")
        self.assertEqual(len(conn.protocol._inbox), 0)
        self.assertEqual(conn.send(b"x" * 10_000), b"")
        self.assertEqual(len(conn.protocol._inbox), 0)
        self.assertEqual(conn.send(b"xx\r\nCAPA\r\n")[:4], b"+OK ")

    def test_long_line_in_one_segment(self) -> None:
        """A complete over-long line is refused; its neighbours in the segment are served."""
        conn = self.logged_in()
        self.assertEqual(
            conn.send(b"NOOP\r\nPASS " + b"x" * 600 + b"\r\nNOOP\r\n"),
            b"+OK\r\n-ERR Line too long\r\n+OK\r\n",
        )
        password = b"PASS " + b"x" * (SETTINGS.max_line - 5)
        self.assertEqual(conn.send(password + b"\r\n"), NOT_NOW)

    def test_too_many_errors(self) -> None:
        """More than max_errors -ERR replies close the connection; [SYS/TEMP] replies do not count."""
        self.view.read_error = OSError(5, "I/O error")
        conn = self.logged_in()
        for _ in range(6):
            conn.send(b"RETR 1\r\n")
        self.flushLoggedErrors(OSError)
        self.assertEqual(conn.send(b"XYZZY\r\n" * 5), b"-ERR Unknown command\r\n" * 5)
        self.assertEqual(
            conn.send(b"XYZZY\r\nNOOP\r\n"),
            b"-ERR Unknown command\r\n-ERR Too many errors, closing connection\r\n",
        )
        self.assertTrue(conn.closed)
        self.assertEqual(self.view.expunges, [])

    def test_failed_logins_count(self) -> None:
        """Password guessing on one connection runs into max_errors."""
        conn = self.connect()
        for _ in range(5):
            conn.send(b"USER alice\r\nPASS wrong\r\n")
        self.assertEqual(
            conn.send(b"USER alice\r\nPASS wrong\r\n"),
            b"+OK Send PASS\r\n" + AUTH_FAILED + b"-ERR Too many errors, closing connection\r\n",
        )
        self.assertTrue(conn.closed)

    def test_backlog_pauses_and_resumes_the_transport(self) -> None:
        """While a command waits, a backlog over BACKLOG_LIMIT pauses reading; it resumes once served."""
        conn = self.logged_in()
        self.view.hold = True
        conn.send(b"RETR 2\r\n")
        self.assertEqual(conn.transport.producerState, "producing")
        count = BACKLOG_LIMIT // 6 + 1
        conn.send(b"NOOP\r\n" * count)
        self.assertEqual(conn.transport.producerState, "paused")
        self.view.release()
        self.assertEqual(conn.transport.producerState, "producing")
        self.assertTrue(conn.take().endswith(b".\r\n" + b"+OK\r\n" * count))


    def test_backlog_behind_a_client_that_does_not_read(self) -> None:
        """Commands from a client that does not read its replies wait, and reading pauses once
        they pass BACKLOG_LIMIT: memory stays bounded either way."""
        conn = self.logged_in()
        conn.transport.buffer_limit = 1
        conn.send(b"NOOP\r\n")  # its reply fills the buffer
        count = BACKLOG_LIMIT // 6 + 1
        self.assertEqual(conn.send(b"NOOP\r\n" * count), b"")
        self.assertEqual(conn.transport.producerState, "paused")
        conn.transport.buffer_limit = None
        conn.transport.drain()
        self.assertEqual(conn.transport.producerState, "producing")
        self.assertEqual(conn.take(), b"+OK\r\n" * count)


class TimeoutTests(POP3TestCase):
    def test_idle_timeout(self) -> None:
        """command_timeout (10 minutes) of silence: -ERR, closed, no UPDATE; any input restarts it."""
        conn = self.logged_in()
        conn.send(b"DELE 1\r\n")
        self.clock.advance(599)
        conn.send(b"NOOP\r\n")
        self.clock.advance(599)
        self.assertEqual(conn.take(), b"")
        self.clock.advance(1)
        self.assertEqual(conn.take(), b"-ERR Disconnected for inactivity\r\n")
        self.assertTrue(conn.closed)
        conn.protocol.connectionLost()
        self.assertEqual((self.view.expunges, self.view.closes), ([], 1))

    def test_greeting_starts_the_clock(self) -> None:
        """A client that never says anything is dropped too."""
        conn = self.connect()
        self.clock.advance(600)
        self.assertEqual(conn.take(), b"-ERR Disconnected for inactivity\r\n")

    def test_no_timeout_while_the_server_is_busy(self) -> None:
        """While the session or the store has the turn the client is not blamed; then its clock restarts."""
        self.hold_logins = True
        conn = self.connect()
        conn.send(b"USER alice\r\nPASS secret\r\n")
        self.clock.advance(10_000)
        self.assertEqual(conn.take(), b"")
        self.release_logins()
        self.assertEqual(conn.take(), b"+OK Logged in\r\n")
        self.clock.advance(600)
        self.assertEqual(conn.take(), b"-ERR Disconnected for inactivity\r\n")

    def test_disconnect_cancels_the_timer(self) -> None:
        """Nothing is left scheduled after the connection is gone."""
        conn = self.logged_in()
        conn.protocol.connectionLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LogTests(POP3TestCase):
    def test_no_secrets_in_the_debug_log(self) -> None:
        """P7: the debug log has command names, never a PASS argument, AUTH data or SASL responses."""
        conn = self.connect()
        conn.send(b"USER alice\r\nPASS hunter2-wrong\r\n")
        conn.send(b"AUTH PLAIN " + b64(b"\0alice\0hunter3") + b"\r\n")
        conn.send(b"AUTH PLAIN\r\n" + b64(b"\0alice\0hunter4") + b"\r\n")
        conn.send(b"USER alice\r\nPASS secret\r\nPASS hunter5\r\n")
        logged = repr(self.logs.debugs) + repr(self.logs.mails) + repr(self.logs.errors)
        for secret in (
            "hunter",
            "secret",
            b64(b"\0alice\0hunter3").decode(),
            b64(b"\0alice\0hunter4").decode(),
        ):
            self.assertNotIn(secret, logged)
        commands = [fields for _, event, fields in self.logs.debugs if event == "command"]
        self.assertEqual(
            commands,
            [
                {"command": "USER", "argument": "alice"},
                {"command": "PASS"},
                {"command": "AUTH", "argument": "PLAIN"},
                {"command": "AUTH", "argument": "PLAIN"},
                {"command": "USER", "argument": "alice"},
                {"command": "PASS"},
                {"command": "PASS"},
            ],
        )

    def test_unknown_commands_are_not_logged_verbatim(self) -> None:
        """A line that is not a command (a password typed at the wrong time) is logged as "unknown"."""
        conn = self.connect()
        conn.send(b"correct-horse-battery\r\n")
        self.assertEqual(self.logs.debugs[-1], ("pop3", "command", {"command": "unknown"}))

    def test_factory_without_logs(self) -> None:
        """Logs are optional: a whole session runs without them."""
        self.logs = None  # type: ignore[assignment]
        conn = self.logged_in()
        conn.send(b"DELE 1\r\nRETR 2\r\n")
        self.assertEqual(conn.send(b"QUIT\r\n"), b"+OK Logging out, messages deleted: 1\r\n")


# --- with the real mailbox store, over TCP ----------------------------------------------------------


class _TrackingFactory(POP3Factory):
    """Knows when each server-side connection is gone, so a test can end with a clean reactor."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost: list[Deferred[None]] = []

    def buildProtocol(self, addr: object) -> POP3Server:
        protocol = super().buildProtocol(addr)
        lost: Deferred[None] = Deferred()
        self.lost.append(lost)
        original = protocol.connectionLost

        def connection_lost(reason: Failure = connectionDone) -> None:
            original(reason)
            lost.callback(None)

        protocol.connectionLost = connection_lost  # type: ignore[method-assign]
        return protocol


class MailStoreTests(TestCase):
    """poplib against our server and the real `MailStore` on disk (SMTP-style LF files and APPEND)."""

    ADDRESS = "alice@example.test"

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def,override]
        self.logins: list[tuple[str, str, str]] = []
        self.hold_logins = False
        self.held_logins: list[Any] = []
        pool = ThreadPool(1, 4, "test-store")
        pool.start()
        self.addCleanup(pool.stop)
        self.root = Path(self.mktemp())
        self.store = MailStore(self.root, pool, reactor, lambda data: {})
        account = yield self.store.account(self.ADDRESS)
        # Two messages as SMTP delivers them (LF, straight into new/), one APPENDed in CRLF.
        new = mailbox_path(self.root, self.ADDRESS) / "new"
        self.big = b"Subject: big\n\n" + b"".join(b".%d\n" % i + b"x" * 70 + b"\n" for i in range(4000))
        (new / "1000.a.host").write_bytes(b"Subject: one\nFrom: a@x.test\n\n.leading dot\n.\nlast\n")
        (new / "1001.b.host").write_bytes(self.big)
        yield account.append("INBOX", b"Subject: three\r\n\r\nbody\r\n")
        self.factory = _TrackingFactory(
            SETTINGS, self.store.account, lambda client: FakeSession(client, self), None, reactor
        )
        port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")  # type: ignore[arg-type]
        self.port = port.getHost().port  # type: ignore[attr-defined]
        self.addCleanup(self.store.close)
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: gatherResults(self.factory.lost))

    def pop(self) -> poplib.POP3:
        """A logged-in client (blocking: call it in a thread); a refused login closes the socket."""
        client = poplib.POP3("127.0.0.1", self.port, timeout=10)
        try:
            client.user("alice")
            client.pass_("secret")
        except poplib.error_proto:
            client.close()
            raise
        return client

    @inlineCallbacks
    def test_retrieve_delete_and_stable_uidl(self):  # type: ignore[no-untyped-def]
        """Messages come out in CRLF wire form, dot-stuffing undone by poplib; QUIT deletes exactly
        the DELE'd one; the remaining unique ids are the same in the next session."""

        def first() -> tuple[Any, ...]:
            client = self.pop()
            stat = client.stat()
            listing = client.list()[1]
            uidl = client.uidl()[1]
            bodies = [b"\r\n".join(client.retr(n)[1]) + b"\r\n" for n in (1, 2, 3)]
            top = client.top(2, 1)[1]
            client.dele(1)
            return stat, listing, uidl, bodies, top, client.quit()

        def second() -> tuple[Any, ...]:
            client = self.pop()
            result = client.stat(), client.uidl()[1]
            client.quit()
            return result

        stat, listing, uidl, bodies, top, quit = yield deferToThread(first)
        wire = [
            b"Subject: one\r\nFrom: a@x.test\r\n\r\n.leading dot\r\n.\r\nlast\r\n",
            self.big.replace(b"\n", b"\r\n"),
            b"Subject: three\r\n\r\nbody\r\n",
        ]
        self.assertEqual(bodies, wire)
        self.assertEqual(stat, (3, sum(map(len, wire))))
        self.assertEqual(listing, [b"%d %d" % (n, len(data)) for n, data in enumerate(wire, 1)])
        self.assertEqual(top, [b"Subject: big", b"", b".0"])
        self.assertEqual(quit, b"+OK Logging out, messages deleted: 1")
        stat2, uidl2 = yield deferToThread(second)
        self.assertEqual(stat2, (2, len(wire[1]) + len(wire[2])))
        self.assertEqual([line.split()[1] for line in uidl2], [line.split()[1] for line in uidl[1:]])

    @inlineCallbacks
    def test_maildrop_lock_and_drop_without_quit(self):  # type: ignore[no-untyped-def]
        """A second session is refused [IN-USE] while the first holds the maildrop; the first drops
        without QUIT, so its DELE is forgotten and the lock released."""

        def sessions() -> tuple[bytes, int]:
            holder = self.pop()
            holder.dele(1)
            try:
                self.pop()
            except poplib.error_proto as e:
                refusal = e.args[0]
            else:
                raise AssertionError("a second session got the maildrop")
            holder.close()  # no QUIT
            for _ in range(100):  # the server notices the close a moment later
                try:
                    later = self.pop()
                except poplib.error_proto:
                    time.sleep(0.05)
                    continue
                count = later.stat()[0]
                later.quit()
                return refusal, count
            raise AssertionError("the maildrop lock was never released")

        refusal, count = yield deferToThread(sessions)
        self.assertEqual(refusal, b"-ERR [IN-USE] Mailbox is locked by another POP3 session")
        self.assertEqual(count, 3)


# --- pure functions ------------------------------------------------------------------------------


class ParsingTests(SynchronousTestCase):
    def test_parse_command(self) -> None:
        """The keyword is upper-cased, the rest kept exactly (a password may hold spaces)."""
        self.assertEqual(parse_command(b"retr 1"), ("RETR", "1"))
        self.assertEqual(parse_command(b"PASS  a b "), ("PASS", " a b "))
        self.assertEqual(parse_command(b"QUIT"), ("QUIT", ""))
        self.assertEqual(parse_command("USER j\u00f6".encode()), ("USER", "j\u00f6"))
        for line, text in [(b"a\0b", "NUL character in command"), (b"\xc3", "Command is not valid UTF-8")]:
            with self.assertRaises(POP3Error) as caught:
                parse_command(line)
            self.assertEqual(caught.exception.text, text)

    def test_split_arguments(self) -> None:
        """Words between any number of spaces; a count outside the range is the command's syntax."""
        self.assertEqual(split_arguments(" 1  2 ", "TOP message lines", 2, 2), ["1", "2"])
        self.assertEqual(split_arguments("", "LIST [message]", 0, 1), [])
        with self.assertRaises(POP3Error) as caught:
            split_arguments("1 2", "LIST [message]", 0, 1)
        self.assertEqual(caught.exception.text, "Syntax: LIST [message]")

    def test_numbers(self) -> None:
        """Plain ASCII decimals only, within range, at most ten digits; leading zeros are fine."""
        self.assertEqual(parse_message_number("007", 7), 7)
        self.assertEqual(parse_line_count("0"), 0)
        for word, count, text in [
            ("0", 3, "No such message"),
            ("4", 3, "No such message"),
            ("x", 3, "Invalid message number"),
            ("1" * 11, 3, "Invalid message number"),
            ("\u00b2", 3, "Invalid message number"),
        ]:
            with self.assertRaises(POP3Error) as caught:
                parse_message_number(word, count)
            self.assertEqual(caught.exception.text, text)

    def test_top(self) -> None:
        """Header, empty line, n body lines; headerless and separator-less messages are handled."""
        message = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3"
        self.assertEqual(top(message, 0), b"A: 1\r\nB: 2\r\n\r\n")
        self.assertEqual(top(message, 2), b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n")
        self.assertEqual(top(message, 3), message)
        self.assertEqual(top(message, 10**9), message)
        self.assertEqual(top(b"\r\nbody\r\nmore\r\n", 1), b"\r\nbody\r\n")
        self.assertEqual(top(b"A: 1\r\nno body", 5), b"A: 1\r\nno body")
        self.assertEqual(top(b"", 5), b"")


def unstuff(response: bytes) -> tuple[bytes, bytes]:
    """A client's reading of a multi-line body (RFC 1939 §3, as poplib does): (data, what follows)."""
    lines: list[bytes] = []
    position = 0
    while True:
        end = response.index(b"\r\n", position)
        line = response[position:end]
        position = end + 2
        if line == b".":
            return b"".join(line + b"\r\n" for line in lines), response[position:]
        lines.append(line[1:] if line.startswith(b".") else line)


_LINE = st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")) | st.sampled_from(
    [b".", b"..", b".x", b""]
)


class DotStuffingTests(SynchronousTestCase):
    def test_chunk_boundaries(self) -> None:
        """P4: a "." that starts a line at any chunk boundary is stuffed, first line included."""
        data = b".a\r\n.\r\n..\r\nb.\r\n.\r\n"
        expected = b"..a\r\n..\r\n...\r\nb.\r\n..\r\n.\r\n"
        for size in range(1, len(data) + 2):
            self.assertEqual(b"".join(dot_stuffed(data, size)), expected, size)

    def test_endings(self) -> None:
        """An empty body is only the terminator; a missing final CRLF is added, a present one is not."""
        self.assertEqual(list(dot_stuffed(b"")), [b".\r\n"])
        self.assertEqual(b"".join(dot_stuffed(b"x")), b"x\r\n.\r\n")
        self.assertEqual(b"".join(dot_stuffed(b"x\r")), b"x\r\r\n.\r\n")
        self.assertEqual(b"".join(dot_stuffed(b"x\r\n", 2)), b"x\r\n.\r\n")

    @given(st.lists(_LINE, max_size=30), st.booleans(), st.integers(min_value=1, max_value=40))
    def test_unstuffing_gives_the_original(self, lines: list[bytes], final: bool, size: int) -> None:
        """Whatever the CRLF-form message and chunk size, a client reads back exactly the message."""
        data = b"\r\n".join(lines) + (b"\r\n" if final and lines else b"")
        sent = b"".join(dot_stuffed(data, size)) + b"+OK next reply\r\n"
        body, rest = unstuff(sent)
        expected = data if not data or data.endswith(b"\r\n") else data + b"\r\n"
        self.assertEqual(body, expected)
        self.assertEqual(rest, b"+OK next reply\r\n")

    @given(st.binary(max_size=200), st.integers(min_value=1, max_value=64))
    def test_no_early_terminator_for_any_bytes(self, data: bytes, size: int) -> None:
        """Whatever the bytes (bare CR or LF included), the terminator appears once, at the very end."""
        sent = b"".join(dot_stuffed(data, size))
        for reader_line_end in (b"\r\n", b"\n"):
            lines = sent.split(reader_line_end)
            self.assertEqual(lines[-1], b"")
            terminators = [i for i, line in enumerate(lines) if line.rstrip(b"\r") == b"."]
            self.assertEqual(terminators, [len(lines) - 2], (data, size))
