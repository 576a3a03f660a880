"""The outbound SMTP client: pure wire pieces, the reply matcher on StringTransport, real sockets.

The remote servers are `tests.support.smtpsink` sinks on 127.0.0.2 / 127.0.0.3 / ::1 (configured
per test: extensions, replies per recipient, TLS, AUTH, misbehaviour) and, once, the real kms SMTP
listener.  Assertions read what the sink recorded byte for byte.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SkipTest, TestCase

from kms.queue.client import SMTPClientProtocol, Timeouts, _Lost, attempt, tls_name
from kms.queue.interfaces import Hop, HostFailure, OutboundMessage, QueuedRecipient, Reply, TLSPolicy
from kms.queue.smtpwire import (
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    DotStuffer,
    Extensions,
    ReplyError,
    ReplyParser,
    Response,
    mail_command,
    parse_ehlo,
    parse_reply_line,
    rcpt_command,
    xtext,
)
from kms.tls import generate_dev_certificate, server_context_factory
from tests.support.server import RunningServer, add_user, write_config
from tests.support.smtpsink import SinkConfig, SMTPSink, unstuff

# Generous: these only matter when something is wrong, and then the test fails anyway.
RELAXED = Timeouts(*[10.0] * 8)
SHORT = 0.3  # for the tests about timeouts: how long a silent server is waited for
BODY = b"Subject: test\r\nFrom: <s@example.test>\r\n\r\nline one\r\n.leading dot\r\nlast line\r\n"


def normalized(data: bytes) -> bytes:
    """What the client must deliver: every line break CRLF, a final CRLF."""
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") or not data else data + b"\r\n"


def stuffed(data: bytes, sizes: list[int]) -> bytes:
    stuffer = DotStuffer()
    out = []
    position = 0
    for size in sizes:
        out.append(stuffer.feed(data[position : position + size]))
        position += size
    out.append(stuffer.feed(data[position:]))
    return b"".join(out) + stuffer.finish()


# --- pure pieces ------------------------------------------------------------------------------------


class ReplyParsingTests(TestCase):
    def test_reply_lines(self) -> None:
        """Three digits (2-5, 0-5, any), then "-", " " or nothing; anything else is garbage."""
        self.assertEqual(parse_reply_line(b"250-SIZE 100"), (250, False, "SIZE 100"))
        self.assertEqual(parse_reply_line(b"250 ok"), (250, True, "ok"))
        self.assertEqual(parse_reply_line(b"354"), (354, True, ""))
        arabic_digits = "٢٥٠ x".encode()
        for bad in (b"", b"25", b"hello", b"650 no", b"290 no", b"250_x", b"25a ok", arabic_digits):
            self.assertRaises(ReplyError, parse_reply_line, bad)

    def test_parser_any_split(self) -> None:
        """A multi-line reply fed one byte at a time gives one Response, as fed whole."""
        data = b"250-mx.example.org hello\r\n250-PIPELINING\r\n250 SIZE 1000\r\n220 next\r\n"
        whole = ReplyParser().feed(data)
        parser = ReplyParser()
        pieces = [r for i in range(len(data)) for r in parser.feed(data[i : i + 1])]
        self.assertEqual(pieces, whole)
        ehlo = Response(250, ("mx.example.org hello", "PIPELINING", "SIZE 1000"))
        self.assertEqual(whole, [ehlo, Response(220, ("next",))])
        self.assertFalse(parser.buffered)
        parser.feed(b"250-partial\r\n")
        self.assertTrue(parser.buffered)

    def test_parser_bounds(self) -> None:
        """Over-long lines, too many lines, changing codes: ReplyError, never unbounded memory."""
        self.assertRaises(ReplyError, ReplyParser().feed, b"250 " + b"x" * MAX_REPLY_LINE + b"\r\n")
        parser = ReplyParser()
        self.assertRaises(ReplyError, parser.feed, b"2" * (MAX_REPLY_LINE + 10))  # no line end at all
        self.assertRaises(ReplyError, ReplyParser().feed, b"250-x\r\n" * MAX_REPLY_LINES + b"250 x\r\n")
        self.assertRaises(ReplyError, ReplyParser().feed, b"250-x\r\n550 y\r\n")
        self.assertEqual(len(ReplyParser().feed(b"250-x\r\n" * (MAX_REPLY_LINES - 1) + b"250 x\r\n")), 1)

    def test_reply_text(self) -> None:
        """Enhanced code from the first line when its class matches; text printable ASCII, joined."""
        self.assertEqual(
            Response(550, ("5.1.1 <bob@x>: no such user", "5.1.1 try another")).reply(),
            Reply(550, "5.1.1", "<bob@x>: no such user try another"),
        )
        self.assertEqual(Response(250, ("5.1.1 odd",)).reply(), Reply(250, "", "5.1.1 odd"))
        self.assertEqual(Response(451, ("",)).reply(), Reply(451, "", ""))
        [response] = ReplyParser().feed("550 5.7.1 nö\x1b[31m\r\n".encode())
        self.assertEqual(response.reply(), Reply(550, "5.7.1", "n???[31m"))

    def test_ehlo(self) -> None:
        [response] = ReplyParser().feed(
            b"250-mx.example.org\r\n250-pipelining\r\n250-SIZE 52428800\r\n250-AUTH PLAIN login\r\n"
            b"250-AUTH=LOGIN\r\n250-8BITMIME\r\n250-DSN\r\n250 SMTPUTF8\r\n"
        )
        ext = parse_ehlo(response)
        self.assertTrue(ext.pipelining and ext.eightbitmime and ext.dsn and ext.smtputf8)
        self.assertFalse(ext.starttls)
        self.assertEqual(ext.size, 52428800)
        self.assertEqual(ext.auth, frozenset({"PLAIN", "LOGIN"}))
        self.assertNotIn("AUTH=LOGIN", ext.keywords)
        self.assertEqual(parse_ehlo(Response(250, ("mx", "SIZE"))).size, 0)
        self.assertEqual(parse_ehlo(Response(250, ("mx", "SIZE lots"))).size, 0)
        self.assertIsNone(parse_ehlo(Response(250, ("mx PIPELINING",))).size)
        self.assertFalse(parse_ehlo(Response(250, ("mx PIPELINING",))).pipelining)  # the greeting line

    def test_commands(self) -> None:
        """Parameters only for what the server offers; DSN values filtered and xtext-encoded."""
        message = OutboundMessage(
            "Q", "s@x.test", (), Path("/nonexistent"), 1234, body_8bit=True, ret="hdrs", envid="a+b=c d"
        )
        self.assertEqual(mail_command(message, Extensions({})), b"MAIL FROM:<s@x.test>\r\n")
        everything = Extensions({"SIZE": "0", "8BITMIME": "", "SMTPUTF8": "", "DSN": ""})
        self.assertEqual(
            mail_command(message, everything),
            b"MAIL FROM:<s@x.test> SIZE=1234 BODY=8BITMIME RET=HDRS ENVID=a+2Bb+3Dc+20d\r\n",
        )
        bounce = OutboundMessage("Q", "", (), Path("/nonexistent"), 1, ret="bogus")
        self.assertEqual(mail_command(bounce, everything), b"MAIL FROM:<> SIZE=1\r\n")
        utf8 = OutboundMessage("Q", "jörg@x.test", (), Path("/nonexistent"), 1)
        expected = "MAIL FROM:<jörg@x.test> SIZE=1 SMTPUTF8\r\n".encode()
        self.assertEqual(mail_command(utf8, everything), expected)
        r = QueuedRecipient("bob@y.test", notify=("failure", "DELAY", "bogus"), orcpt="rfc822;Bob+1@y.test")
        self.assertEqual(rcpt_command(r, Extensions({})), b"RCPT TO:<bob@y.test>\r\n")
        self.assertEqual(
            rcpt_command(r, everything),
            b"RCPT TO:<bob@y.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;Bob+2B1@y.test\r\n",
        )
        never = QueuedRecipient("bob@y.test", notify=("NEVER", "SUCCESS"), orcpt="bad type;x")
        self.assertEqual(rcpt_command(never, everything), b"RCPT TO:<bob@y.test> NOTIFY=NEVER\r\n")
        self.assertEqual(xtext("ä=+\x00"), "+C3+A4+3D+2B+00")

    def test_tls_name(self) -> None:
        self.assertEqual(tls_name("mx.example.org."), "mx.example.org")
        self.assertEqual(tls_name("[192.0.2.1]"), "192.0.2.1")
        self.assertEqual(tls_name("[IPv6:2001:db8::1]"), "2001:db8::1")


class DotStufferTests(TestCase):
    def test_table(self) -> None:
        cases = {
            b"": b".\r\n",
            b".": b"..\r\n.\r\n",
            b".\r\n": b"..\r\n.\r\n",
            b"a\r\n.\r\nb": b"a\r\n..\r\nb\r\n.\r\n",
            b"a\n.b\n": b"a\r\n..b\r\n.\r\n",
            b"a\r.b\r": b"a\r\n..b\r\n.\r\n",
            b"a\r\r\nb": b"a\r\n\r\nb\r\n.\r\n",
            b"..x\n": b"...x\r\n.\r\n",
            b"x.\n": b"x.\r\n.\r\n",
        }
        for data, wire in cases.items():
            self.assertEqual(stuffed(data, []), wire, data)

    def test_chunk_edges(self) -> None:
        """A "." line start, a CRLF or a bare CR exactly at a chunk edge: same output as unsplit."""
        for data in (b"a\r\n.b\r\n", b"a\r\n.\r\nb", b"a\r.b", b"a\r\n\r\n.", b".a\r\n..\r\n"):
            for cut in range(len(data) + 1):
                self.assertEqual(stuffed(data, [cut]), stuffed(data, []), (data, cut))
        # a CR, its LF alone in the next chunk, then a bare LF: three chunks, two line breaks
        self.assertEqual(stuffed(b"a\r\n\nb", [2, 1, 0, 1]), b"a\r\n\r\nb\r\n.\r\n")

    @settings(max_examples=1500, deadline=None)
    @given(
        st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b"\r\n.\r\n", b"\x00", b"\xff"])),
        st.lists(st.integers(min_value=0, max_value=12), max_size=30),
    )
    def test_unstuffing_gives_back_the_input(self, parts: list[bytes], sizes: list[int]) -> None:
        """At any chunking: CRLF only, the end marker only at the end, and un-stuffing restores the body."""
        data = b"".join(parts)
        wire = stuffed(data, sizes)
        self.assertEqual(wire, stuffed(data, []))
        self.assertTrue(wire.endswith(b"\r\n.\r\n") or wire == b".\r\n")
        self.assertEqual(wire.count(b"\n"), wire.count(b"\r\n"))
        self.assertEqual(wire.count(b"\r"), wire.count(b"\r\n"))
        self.assertNotIn(b"\r\n.\r\n", wire[:-3])
        self.assertFalse(wire.startswith(b".\r\n") and data)
        self.assertEqual(unstuff(wire), normalized(data))


# --- the reply matcher on a StringTransport ------------------------------------------------------------


class _TLSCapableTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.tls: list[object] = []

    def startTLS(self, creator: object) -> None:
        self.tls.append(creator)


class ProtocolTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.protocol = SMTPClientProtocol(self.clock)
        self.transport = _TLSCapableTransport()
        self.protocol.makeConnection(self.transport)

    def test_pipelined_replies_in_order(self) -> None:
        """Replies go to the waiters in order, whatever the read boundaries."""
        got: list[Response] = []
        for what in ("MAIL", "RCPT", "DATA"):
            self.protocol.expect(what, 5).addCallback(got.append)
        self.protocol.dataReceived(b"250 ok\r\n550 5.1.1 no\r")
        self.assertEqual([r.code for r in got], [250])
        self.protocol.dataReceived(b"\n354 go\r\n")
        self.assertEqual([r.code for r in got], [250, 550, 354])
        self.assertFalse(self.transport.disconnecting)

    def test_each_reply_has_its_own_timeout(self) -> None:
        """The clock runs for the first waiting reply; a late second reply times out on its own."""
        first = self.protocol.expect("MAIL", 5)
        second = self.protocol.expect("RCPT", 5)
        self.clock.advance(4)
        self.protocol.dataReceived(b"250 ok\r\n")
        self.assertEqual(self.successResultOf(first).code, 250)
        self.clock.advance(4)
        self.assertNoResult(second)
        self.clock.advance(1)
        lost = self.failureResultOf(second, _Lost)
        self.assertIn("timeout after 5s waiting for the reply to RCPT", lost.value.problem)
        self.assertTrue(self.transport.disconnected)

    def test_unexpected_and_garbage_replies_end_the_connection(self) -> None:
        self.protocol.dataReceived(b"250 nobody asked\r\n")
        self.assertTrue(self.transport.disconnected)
        lost = self.failureResultOf(self.protocol.expect("x", 1), _Lost)
        self.assertIn("unexpected reply", lost.value.problem)
        other = SMTPClientProtocol(self.clock)
        transport = StringTransport()
        other.makeConnection(transport)
        waiting = other.expect("greeting", 5)
        other.dataReceived(b"HTTP/1.1 400 Bad Request\r\n")
        self.assertIn("not an SMTP reply", self.failureResultOf(waiting, _Lost).value.problem)
        self.assertTrue(transport.disconnected)

    def test_reply_injected_after_starttls(self) -> None:
        """A reply behind the 220 to STARTTLS (in the same read) is plaintext injection: refused."""
        results: list[Any] = []

        def started(response: Response) -> None:
            self.protocol.start_tls(object())  # type: ignore[arg-type]
            self.protocol.expect("EHLO", 5).addBoth(results.append)

        self.protocol.expect("STARTTLS", 5).addCallback(started)
        self.protocol.dataReceived(b"220 go ahead\r\n250 injected\r\n")
        [failure] = results
        self.assertIn("more after its reply to STARTTLS", failure.value.problem)
        self.assertTrue(self.transport.disconnected)

    def test_partial_reply_after_starttls(self) -> None:
        """Half a line behind the 220 is refused before the handshake even starts."""
        results: list[Any] = []
        self.protocol.expect("STARTTLS", 5).addCallback(lambda _: self.protocol.start_tls(object()))  # type: ignore[arg-type]
        self.protocol.dataReceived(b"220 go ahead\r\n250-inj")
        self.protocol.expect("EHLO", 5).addBoth(results.append)
        self.assertEqual(self.transport.tls, [])
        self.assertIn("more after its reply to STARTTLS", results[0].value.problem)

    def test_clean_starttls(self) -> None:
        """Nothing behind the 220: TLS starts, and later pipelined replies are fine."""
        self.protocol.expect("STARTTLS", 5).addCallback(lambda _: self.protocol.start_tls(object()))  # type: ignore[arg-type]
        self.protocol.dataReceived(b"220 go ahead\r\n")
        self.assertEqual(len(self.transport.tls), 1)
        got: list[Response] = []
        self.protocol.expect("MAIL", 5).addCallback(got.append)
        self.protocol.expect("RCPT", 5).addCallback(got.append)
        self.protocol.dataReceived(b"250 a\r\n250 b\r\n")
        self.assertEqual(len(got), 2)
        self.assertFalse(self.transport.disconnected)


# --- real sockets: a sink on 127.0.0.2 ---------------------------------------------------------------


def make_certificate(
    directory: Path, name: str, hostnames: tuple[str, ...], addresses: tuple[str, ...] = ("127.0.0.2",)
) -> Path:
    """A self-signed certificate (its own CA); returns the PEM path, the key beside it."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    generate_dev_certificate(cert, key, hostnames=hostnames, addresses=addresses)
    return cert


class _SinkCase(TestCase):
    """A fresh directory, sinks that are stopped after the test, and one-call attempts."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir(parents=True)

    def sink(self, interface: str = "127.0.0.2", port: int = 0, **config: Any) -> SMTPSink:
        sink = SMTPSink(SinkConfig(**config))
        sink.start(reactor, interface, port)
        self.addCleanup(sink.stop)
        return sink

    def message(
        self, body: bytes = BODY, recipients: tuple[str, ...] = ("rcpt@remote.test",), **fields: Any
    ) -> OutboundMessage:
        path = self.dir / f"body-{len(os.listdir(self.dir))}"
        path.write_bytes(body)
        rcpts = tuple(r if isinstance(r, QueuedRecipient) else QueuedRecipient(r) for r in recipients)
        fields.setdefault("size", len(body))
        return OutboundMessage("Q1", fields.pop("sender", "sender@example.test"), rcpts, path, **fields)

    def attempt(
        self,
        sink: SMTPSink,
        message: OutboundMessage,
        *,
        tls: TLSPolicy | None = None,
        address: str = "127.0.0.2",
        name: str = "mx1.example.test",
        **kwargs: Any,
    ) -> Deferred[Any]:
        kwargs.setdefault("timeouts", RELAXED)
        kwargs.setdefault("credentials", None)
        return attempt(
            reactor,
            Hop(name, address, sink.port),
            message,
            helo="out.example.test",
            tls=tls or TLSPolicy("none"),
            timeout=10,
            **kwargs,
        )

    @inlineCallbacks
    def host_failure(self, d: Deferred[Any]) -> Any:
        """The HostFailure ``d`` fails with (the test fails if it succeeds)."""
        try:
            result = yield d
        except HostFailure as failure:
            return failure
        self.fail(f"expected HostFailure, got {result!r}")


MIX = ("ok@remote.test", "later@remote.test", "never@remote.test")
MIX_REPLIES = {
    "later@remote.test": b"450 4.2.1 mailbox busy\r\n",
    "never@remote.test": b"550 5.1.1 no such user\r\n",
}


class TransactionTests(_SinkCase):
    @inlineCallbacks
    def test_recipient_mix_pipelined(self) -> None:
        """PIPELINING: one write for MAIL, RCPTs and DATA (the sink answers nothing before DATA)."""
        sink = self.sink(rcpt_replies=MIX_REPLIES, hold_until_data=True)
        result = yield self.attempt(sink, self.message(recipients=MIX))
        self.assertEqual(result.host, "mx1.example.test [127.0.0.2]")
        self.assertEqual(result.replies["ok@remote.test"], Reply(250, "2.0.0", "Ok: queued as SINK1"))
        self.assertEqual(result.replies["later@remote.test"], Reply(450, "4.2.1", "mailbox busy"))
        self.assertEqual(result.replies["never@remote.test"], Reply(550, "5.1.1", "no such user"))
        session = sink.session
        self.assertEqual(session.verbs(), ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA", "QUIT"])
        self.assertGreaterEqual(session.pipelined, 4)
        self.assertEqual(session.messages, [("sender@example.test", ["ok@remote.test"], BODY)])
        self.assertEqual(session.commands[1], f"MAIL FROM:<sender@example.test> SIZE={len(BODY)}")

    @inlineCallbacks
    def test_recipient_mix_one_at_a_time(self) -> None:
        """Without PIPELINING each command waits for the previous reply."""
        sink = self.sink(rcpt_replies=MIX_REPLIES, extensions=("8BITMIME",))
        result = yield self.attempt(sink, self.message(recipients=MIX))
        self.assertEqual([r.code for r in result.replies.values()], [250, 450, 550])
        self.assertEqual(sink.session.pipelined, 0)
        self.assertEqual(sink.session.verbs(), ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA", "QUIT"])
        self.assertEqual(sink.session.messages[0][2], BODY)

    @inlineCallbacks
    def test_no_recipient_accepted(self) -> None:
        """Nothing accepted: no DATA without pipelining; with it, DATA's 554 and no body."""
        refused = {"a@remote.test": b"550 5.1.1 no\r\n", "b@remote.test": b"451 4.3.0 later\r\n"}
        for extensions in (("SIZE 1000000",), ("PIPELINING",)):
            sink = self.sink(rcpt_replies=refused, extensions=extensions)
            result = yield self.attempt(sink, self.message(recipients=("a@remote.test", "b@remote.test")))
            codes = {k: r.code for k, r in result.replies.items()}
            self.assertEqual(codes, {"a@remote.test": 550, "b@remote.test": 451})
            self.assertEqual(sink.session.data, [])
            data = ["DATA"] if "PIPELINING" in extensions else []
            expected = ["EHLO", "MAIL", "RCPT", "RCPT", *data, "QUIT"]
            self.assertEqual(sink.session.verbs(), expected)

    @inlineCallbacks
    def test_server_says_354_with_nothing_accepted(self) -> None:
        """A broken pipelining server that says 354 anyway gets an empty body, never the message."""
        sink = self.sink(rcpt_replies={"a@remote.test": b"550 5.1.1 no\r\n"}, replies={"DATA": b"354 go\r\n"})
        result = yield self.attempt(sink, self.message(recipients=("a@remote.test",)))
        self.assertEqual(result.replies["a@remote.test"].code, 550)
        self.assertEqual(sink.session.data, [b".\r\n"])

    @inlineCallbacks
    def test_mail_refused_applies_to_everyone(self) -> None:
        for reply, code in ((b"553 5.7.1 sender rejected\r\n", 553), (b"451 4.7.1 greylisted\r\n", 451)):
            sink = self.sink(replies={"MAIL": reply}, extensions=())
            result = yield self.attempt(sink, self.message(recipients=("a@remote.test", "b@remote.test")))
            self.assertEqual([r.code for r in result.replies.values()], [code, code])
            self.assertEqual(sink.session.verbs(), ["EHLO", "MAIL", "QUIT"])

    @inlineCallbacks
    def test_final_reply_applies_to_accepted_only(self) -> None:
        sink = self.sink(rcpt_replies=MIX_REPLIES, replies={"END": b"452 4.3.1 insufficient storage\r\n"})
        result = yield self.attempt(sink, self.message(recipients=MIX))
        self.assertEqual([r.code for r in result.replies.values()], [452, 450, 550])
        self.assertEqual(len(sink.session.data), 1)

    @inlineCallbacks
    def test_ehlo_refused_then_helo(self) -> None:
        """5xx to EHLO: HELO, no extensions (so no SIZE parameter, no pipelining)."""
        sink = self.sink(ehlo=b"502 5.5.1 what?\r\n")
        result = yield self.attempt(sink, self.message())
        self.assertEqual(result.replies["rcpt@remote.test"].code, 250)
        self.assertEqual(sink.session.verbs(), ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "QUIT"])
        self.assertEqual(sink.session.commands[2], "MAIL FROM:<sender@example.test>")

    @inlineCallbacks
    def test_refusals_before_mail_are_host_failures(self) -> None:
        """Greeting 554, EHLO 421/4xx, 421 at RCPT: no per-recipient answer, try the next host."""
        cases = [
            (dict(greeting=b"554 5.3.2 go away\r\n"), 554),
            (dict(ehlo=b"421 4.3.2 shutting down\r\n"), 421),
            (dict(rcpt_replies={"rcpt@remote.test": b"421 4.4.5 too busy\r\n"}), 421),
        ]
        for config, code in cases:
            sink = self.sink(**config)
            failure = yield self.host_failure(self.attempt(sink, self.message()))
            self.assertEqual(failure.reply.code, code)
            self.assertFalse(failure.permanent)
            self.assertEqual(sink.session.data, [])

    @inlineCallbacks
    def test_control_characters_never_reach_the_wire(self) -> None:
        """A recipient with CRLF in it is answered locally; the command stream stays intact."""
        sink = self.sink()
        evil = "x@remote.test>\r\nRCPT TO:<victim@remote.test"
        result = yield self.attempt(sink, self.message(recipients=("ok@remote.test", evil)))
        refused = Reply(553, "5.1.3", "recipient address contains control characters")
        self.assertEqual(result.replies[evil], refused)
        self.assertEqual(result.replies["ok@remote.test"].code, 250)
        self.assertNotIn("victim", "".join(sink.session.commands))

    @inlineCallbacks
    def test_duplicate_recipients_sent_once(self) -> None:
        sink = self.sink()
        result = yield self.attempt(sink, self.message(recipients=("a@remote.test", "a@remote.test")))
        self.assertEqual(list(result.replies), ["a@remote.test"])
        self.assertEqual(sink.session.verbs().count("RCPT"), 1)

    @inlineCallbacks
    def test_ipv6(self) -> None:
        try:
            probe = socket.socket(socket.AF_INET6)
            probe.bind(("::1", 0))
            probe.close()
        except OSError:
            raise SkipTest("no IPv6 loopback here") from None
        sink = self.sink(interface="::1")
        result = yield self.attempt(sink, self.message(), address="::1")
        self.assertEqual(result.host, "mx1.example.test [::1]")
        self.assertEqual(result.replies["rcpt@remote.test"].code, 250)

    @inlineCallbacks
    def test_refused_connection_then_next_hop(self) -> None:
        """The runner's loop in small: the first hop refuses the connection, the second delivers."""
        sink = self.sink(interface="127.0.0.3")
        message = self.message()
        hops = [
            Hop("mx1.example.test", "127.0.0.4", sink.port),
            Hop("mx2.example.test", "127.0.0.3", sink.port),
        ]
        outcomes = []
        for hop in hops:
            try:
                result = yield attempt(
                    reactor, hop, message, helo="out.test", tls=TLSPolicy("none"), credentials=None, timeout=9
                )
            except HostFailure as failure:
                outcomes.append(failure)
                continue
            outcomes.append(result)
            break
        self.assertIsInstance(outcomes[0], HostFailure)
        self.assertIn("cannot connect", outcomes[0].reason)
        self.assertEqual(outcomes[0].host, "mx1.example.test [127.0.0.4]")
        self.assertEqual(outcomes[1].replies["rcpt@remote.test"].code, 250)

    def test_unknown_tls_mode_refused(self) -> None:
        """A mode the client does not know is a programming error, never a silent plaintext attempt."""
        hop = Hop("mx", "127.0.0.2", 25)
        with self.assertRaises(ValueError):
            attempt(reactor, hop, self.message(), helo="h", tls=TLSPolicy("tls"), credentials=None, timeout=1)

    @inlineCallbacks
    def test_missing_body_file_is_a_local_error(self) -> None:
        sink = self.sink()
        message = self.message()
        message.body_path.unlink()
        yield self.assertFailure(self.attempt(sink, message), FileNotFoundError)
        self.assertEqual(sink.sessions, [])


class BodyTests(_SinkCase):
    @inlineCallbacks
    def test_unreadable_body_mid_data(self) -> None:
        """A read error after DATA: the local error surfaces, the connection is cut (no QUIT sent as body)."""
        unreadable = Path("/proc/self/mem")  # opens, but reading offset 0 fails with EIO
        try:
            with unreadable.open("rb") as probe:
                probe.read(1)
        except OSError:
            pass
        else:
            raise SkipTest("no /proc/self/mem that fails to read here")
        sink = self.sink()
        message = OutboundMessage("Q1", "s@example.test", (QueuedRecipient("r@remote.test"),), unreadable, 10)
        yield self.assertFailure(self.attempt(sink, message), OSError)
        yield sink.session.closed
        self.assertEqual(sink.session.verbs()[-1], "DATA")
        self.assertEqual(sink.session.messages, [])
        self.assertNotIn(b"QUIT", sink.session.partial_data)

    @inlineCallbacks
    def test_dot_lines_at_every_offset_near_chunk_edges(self) -> None:
        """Lines starting with "." at 16 KiB boundaries, and a few bytes either side, arrive intact."""
        chunk = 16 * 1024
        body = bytearray(b"Subject: dots\r\n\r\n")
        for k in range(1, 9):
            for delta in range(-4, 5):
                target = k * chunk + delta
                filler = max(0, target - len(body) - 2)
                body += b"x" * filler + b"\r\n" + b".line at %d\r\n" % target
        body = bytes(body)
        sink = self.sink()
        for size in (chunk, chunk - 1, 4093):
            yield self.attempt(sink, self.message(body), chunk_size=size)
        self.assertEqual(len(sink.sessions), 3)
        for session in sink.sessions:
            [raw] = session.data
            self.assertEqual(session.messages[0][2], body)
            self.assertNotIn(b"\r\n.l", raw)
            self.assertEqual(raw.count(b"\r\n..line at"), body.count(b"\r\n.line at"))

    @inlineCallbacks
    def test_line_endings_normalized(self) -> None:
        """Bare LF and bare CR become CRLF; a body without a final line end gets one."""
        body = b"Subject: lf\n\n.first\nsecond\rthird\r\n.\nend"
        sink = self.sink()
        yield self.attempt(sink, self.message(body), chunk_size=3)
        [raw] = sink.session.data
        self.assertEqual(raw, b"Subject: lf\r\n\r\n..first\r\nsecond\r\nthird\r\n..\r\nend\r\n.\r\n")

    @inlineCallbacks
    def test_large_body_streams(self) -> None:
        """Four MiB with random dot lines (so the transport pauses us) arrive byte for byte."""
        rng = random.Random(9)
        lines = [
            b"." * rng.randrange(3) + bytes(rng.randrange(97, 123) for _ in range(rng.randrange(0, 200)))
            for _ in range(40000)
        ]
        body = b"\r\n".join(lines) + b"\r\n"
        sink = self.sink(extensions=("PIPELINING", "SIZE 0"))
        result = yield self.attempt(sink, self.message(body))
        self.assertEqual(result.replies["rcpt@remote.test"].code, 250)
        self.assertEqual(sink.session.messages[0][2], body)

    @inlineCallbacks
    def test_connection_dropped_mid_data(self) -> None:
        """The server vanishes halfway through the body: HostFailure, nothing reported delivered."""
        sink = self.sink(drop_after_data_bytes=100_000)
        big = self.message(b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 1000)
        failure = yield self.host_failure(self.attempt(sink, big))
        self.assertIn("connection lost", failure.reason)
        self.assertFalse(failure.permanent)
        self.assertEqual(sink.session.messages, [])
        self.assertGreaterEqual(len(sink.session.partial_data), 100_000)



class TLSTests(_SinkCase):
    def setUp(self) -> None:
        super().setUp()
        self.cert = make_certificate(self.dir, "mx1", ("mx1.example.test",))
        self.server_tls = server_context_factory(self.cert, self.dir / "mx1.key")
        self.rogue = make_certificate(self.dir, "rogue", ("mx1.example.test",))

    def required(
        self, name: str = "mx1.example.test", ca: Path | None = None, mode: str = "required"
    ) -> TLSPolicy:
        return TLSPolicy(mode, verify_name=name, ca_file=ca or self.cert)

    @inlineCallbacks
    def test_opportunistic(self) -> None:
        """STARTTLS, EHLO again, the transaction over TLS; the certificate is not checked."""
        sink = self.sink(tls=self.server_tls)
        result = yield self.attempt(sink, self.message(), tls=TLSPolicy("opportunistic", "nobody.test"))
        self.assertEqual(result.replies["rcpt@remote.test"].code, 250)
        session = sink.session
        self.assertEqual(session.verbs(), ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"])
        over_tls = [c.split(" ")[0] for c in session.tls_commands]
        self.assertEqual(over_tls, ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"])

    @inlineCallbacks
    def test_required_verified(self) -> None:
        """The certificate verifies against ca_file for the MX name, or for the IP of a literal."""
        sink = self.sink(tls=self.server_tls)
        result = yield self.attempt(sink, self.message(), tls=self.required())
        self.assertEqual(result.replies["rcpt@remote.test"].code, 250)
        literal = yield self.attempt(sink, self.message(), tls=self.required(name=""), name="[127.0.0.2]")
        self.assertEqual(literal.replies["rcpt@remote.test"].code, 250)
        self.assertEqual([len(s.messages) for s in sink.sessions], [1, 1])

    @inlineCallbacks
    def test_required_refuses_what_does_not_verify(self) -> None:
        """Wrong name, untrusted CA: HostFailure, and the sink never sees MAIL."""
        sink = self.sink(tls=self.server_tls)
        for policy in (self.required(name="mx9.example.test"), self.required(ca=self.rogue)):
            failure = yield self.host_failure(self.attempt(sink, self.message(), tls=policy))
            self.assertIn("TLS handshake failed", failure.reason)
            self.assertFalse(failure.permanent)
        self.assertEqual(len(sink.sessions), 2)
        for session in sink.sessions:
            self.assertNotIn("MAIL", session.verbs())

    @inlineCallbacks
    def test_required_without_starttls(self) -> None:
        """Not offered, or offered and refused: HostFailure after a polite QUIT; opportunistic goes on."""
        sink = self.sink()
        failure = yield self.host_failure(self.attempt(sink, self.message(), tls=self.required()))
        self.assertIn("does not offer STARTTLS", failure.reason)
        self.assertEqual(sink.session.verbs(), ["EHLO", "QUIT"])
        refusing = self.sink(
            interface="127.0.0.3",
            extensions=("PIPELINING", "STARTTLS"),
            replies={"STARTTLS": b"454 4.7.0 TLS not available\r\n"},
        )
        failure = yield self.host_failure(
            self.attempt(refusing, self.message(), tls=self.required(), address="127.0.0.3")
        )
        self.assertEqual(failure.reply, Reply(454, "4.7.0", "TLS not available"))
        policy = TLSPolicy("opportunistic")
        result = yield self.attempt(refusing, self.message(), tls=policy, address="127.0.0.3")
        self.assertEqual(result.replies["rcpt@remote.test"].code, 250)

    @inlineCallbacks
    def test_failed_handshake(self) -> None:
        """Opportunistic: a second connection in plaintext.  Required: HostFailure, one connection."""
        sink = self.sink(tls=self.server_tls, starttls_broken=True)
        result = yield self.attempt(sink, self.message(), tls=TLSPolicy("opportunistic"))
        self.assertEqual(result.replies["rcpt@remote.test"].code, 250)
        first, second = sink.sessions
        self.assertEqual(first.verbs(), ["EHLO", "STARTTLS"])
        self.assertEqual(second.verbs(), ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"])
        strict = self.sink(interface="127.0.0.3", tls=self.server_tls, starttls_broken=True)
        failure = yield self.host_failure(
            self.attempt(strict, self.message(), tls=self.required(), address="127.0.0.3")
        )
        self.assertIn("TLS handshake failed", failure.reason)
        self.assertEqual(len(strict.sessions), 1)

    @inlineCallbacks
    def test_implicit(self) -> None:
        """TLS from the first byte (smarthost on 465), verified; a rogue CA fails before the greeting."""
        sink = self.sink(tls=self.server_tls, implicit_tls=True)
        result = yield self.attempt(sink, self.message(), tls=self.required(mode="implicit"))
        self.assertEqual(result.replies["rcpt@remote.test"].code, 250)
        self.assertEqual(sink.session.tls_commands[0].split(" ")[0], "EHLO")
        self.assertNotIn("STARTTLS", sink.session.verbs())
        rogue = self.required(ca=self.rogue, mode="implicit")
        failure = yield self.host_failure(self.attempt(sink, self.message(), tls=rogue))
        self.assertIn("TLS handshake failed or no greeting", failure.reason)
        self.assertEqual(sink.sessions[1].commands, [])


PASSWORD = "s3cret pass:word"
CREDENTIALS = ("relay-user", PASSWORD)


class AuthTests(_SinkCase):
    def setUp(self) -> None:
        super().setUp()
        cert = make_certificate(self.dir, "relay", ("relay.example.test",))
        self.tls = server_context_factory(cert, self.dir / "relay.key")
        self.policy = TLSPolicy("required", verify_name="relay.example.test", ca_file=cert)

    def smarthost(self, **config: Any) -> SMTPSink:
        config.setdefault("tls", self.tls)
        return self.sink(users={"relay-user": PASSWORD}, **config)

    @inlineCallbacks
    def test_auth_after_starttls(self) -> None:
        """AUTH is offered only over TLS here, and we authenticate there (PLAIN, then LOGIN)."""
        for mechanisms in ("PLAIN LOGIN", "LOGIN"):
            sink = self.smarthost(auth_mechanisms=mechanisms)
            result = yield self.attempt(sink, self.message(), tls=self.policy, credentials=CREDENTIALS)
            self.assertEqual(result.replies["rcpt@remote.test"].code, 250)
            self.assertEqual(sink.session.auth, ["relay-user"])
            self.assertEqual(sink.session.tls_commands[1].split(" ")[:2], ["AUTH", mechanisms.split(" ")[0]])
            self.assertNotIn("AUTH", [c.split(" ")[0] for c in sink.session.commands[:2]])
            yield sink.stop()

    @inlineCallbacks
    def test_wrong_password(self) -> None:
        """535: HostFailure with the reply; the password appears nowhere in it."""
        sink = self.smarthost()
        failure = yield self.host_failure(
            self.attempt(sink, self.message(), tls=self.policy, credentials=("relay-user", "x" + PASSWORD))
        )
        self.assertEqual(failure.reply.code, 535)
        self.assertNotIn(PASSWORD, str(failure))
        self.assertNotIn("MAIL", sink.session.verbs())

    @inlineCallbacks
    def test_never_in_clear(self) -> None:
        """Opportunistic without STARTTLS: credentials are not sent; mode "none" sends them."""
        sink = self.smarthost(tls=None, auth_needs_tls=False)
        failure = yield self.host_failure(
            self.attempt(sink, self.message(), tls=TLSPolicy("opportunistic"), credentials=CREDENTIALS)
        )
        self.assertIn("without TLS", failure.reason)
        self.assertEqual(sink.sessions[0].verbs(), ["EHLO", "QUIT"])
        result = yield self.attempt(sink, self.message(), tls=TLSPolicy("none"), credentials=CREDENTIALS)
        self.assertEqual(result.replies["rcpt@remote.test"].code, 250)
        self.assertEqual(sink.sessions[1].auth, ["relay-user"])

    @inlineCallbacks
    def test_no_auth_offered(self) -> None:
        sink = self.sink()
        failure = yield self.host_failure(
            self.attempt(sink, self.message(), tls=TLSPolicy("none"), credentials=CREDENTIALS)
        )
        self.assertIn("does not offer AUTH", failure.reason)
        mechanisms = self.smarthost(
            interface="127.0.0.3", tls=None, auth_needs_tls=False, auth_mechanisms="CRAM-MD5"
        )
        failure = yield self.host_failure(
            self.attempt(mechanisms, self.message(), address="127.0.0.3", credentials=CREDENTIALS)
        )
        self.assertIn("no AUTH mechanism we can use among CRAM-MD5", failure.reason)


class ExtensionTests(_SinkCase):
    @inlineCallbacks
    def test_size_exceeded_is_permanent(self) -> None:
        sink = self.sink(extensions=("PIPELINING", "SIZE 100"))
        failure = yield self.host_failure(self.attempt(sink, self.message(b"x" * 500 + b"\r\n")))
        self.assertTrue(failure.permanent)
        self.assertTrue(failure.reason.startswith("5.3.4 "), failure.reason)
        self.assertEqual(sink.session.verbs(), ["EHLO", "QUIT"])

    @inlineCallbacks
    def test_smtputf8_missing_is_permanent(self) -> None:
        """RFC 6531 §3.2: a message that needs SMTPUTF8 bounces when the server lacks it."""
        sink = self.sink()
        failure = yield self.host_failure(self.attempt(sink, self.message(smtputf8=True)))
        self.assertTrue(failure.permanent)
        self.assertIn("5.6.9", failure.reason)
        failure = yield self.host_failure(self.attempt(sink, self.message(recipients=("jörg@remote.test",))))
        self.assertTrue(failure.permanent)
        self.assertIn("5.6.7", failure.reason)
        self.assertEqual([s.verbs() for s in sink.sessions], [["EHLO", "QUIT"]] * 2)
        offering = self.sink(interface="127.0.0.3", extensions=("PIPELINING", "SMTPUTF8"))
        body = "Subject: Grüße\r\n\r\nÄpfel\r\n".encode()
        message = self.message(body, recipients=("jörg@remote.test",), smtputf8=True)
        result = yield self.attempt(offering, message, address="127.0.0.3")
        self.assertEqual(result.replies["jörg@remote.test"].code, 250)
        self.assertEqual(offering.session.commands[1], "MAIL FROM:<sender@example.test> SMTPUTF8")
        self.assertEqual(offering.session.messages[0][2], body)

    @inlineCallbacks
    def test_eight_bit(self) -> None:
        """BODY=8BITMIME when offered; without 8BITMIME the bytes go anyway (docs/outbound.md)."""
        body = "Subject: 8bit\r\n\r\nÄpfel\r\n".encode("latin-1")
        with_8bit = self.sink()
        yield self.attempt(with_8bit, self.message(body, body_8bit=True))
        self.assertIn("BODY=8BITMIME", with_8bit.session.commands[1])
        without = self.sink(interface="127.0.0.3", extensions=("PIPELINING",))
        result = yield self.attempt(without, self.message(body, body_8bit=True), address="127.0.0.3")
        self.assertEqual(result.replies["rcpt@remote.test"].code, 250)
        self.assertEqual(without.session.commands[1], "MAIL FROM:<sender@example.test>")
        self.assertEqual(without.session.messages[0][2], body)

    @inlineCallbacks
    def test_dsn_parameters_only_when_offered(self) -> None:
        recipient = QueuedRecipient(
            "bob@remote.test", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;Bob@Remote.Test"
        )
        fields = {"recipients": (recipient,), "ret": "HDRS", "envid": "QUEUE+1"}
        dsn = self.sink(extensions=("PIPELINING", "DSN"))
        yield self.attempt(dsn, self.message(**fields))
        self.assertEqual(dsn.session.commands[1:3], [
            "MAIL FROM:<sender@example.test> RET=HDRS ENVID=QUEUE+2B1",
            "RCPT TO:<bob@remote.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob@Remote.Test",
        ])
        plain = self.sink(interface="127.0.0.3", extensions=("PIPELINING",))
        yield self.attempt(plain, self.message(**fields), address="127.0.0.3")
        self.assertEqual(
            plain.session.commands[1:3], ["MAIL FROM:<sender@example.test>", "RCPT TO:<bob@remote.test>"]
        )


class HostileServerTests(_SinkCase):
    @inlineCallbacks
    def test_garbage_and_overlong_replies(self) -> None:
        """Each is a HostFailure naming the problem, never a crash, never a delivery."""
        cases = [
            ({"greeting": b"hello there\r\n"}, "not an SMTP reply"),
            ({"ehlo": b"250 " + b"x" * 5000 + b"\r\n"}, "reply line longer than"),
            ({"ehlo": b"250-x\r\n" * 500 + b"250 x\r\n"}, "reply longer than 100 lines"),
            ({"ehlo": b"250-mx\r\nPIPELINING\r\n250 SIZE\r\n"}, "not an SMTP reply"),
            ({"ehlo": b"250-mx\r\n550 5.0.0 changed my mind\r\n"}, "reply code changes"),
            ({"replies": {"MAIL": b"250 ok\r\n250 and another\r\n"}, "extensions": ()}, "unexpected reply"),
            ({"greeting": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"}, "not an SMTP reply"),
        ]
        for index, (config, problem) in enumerate(cases):
            sink = self.sink(**config)
            failure = yield self.host_failure(self.attempt(sink, self.message()))
            self.assertIn(problem, failure.reason, index)
            self.assertEqual(sink.session.data, [])

    @inlineCallbacks
    def test_silence_times_out(self) -> None:
        """A silent greeting, RCPT, end of data or a server that stops reading: one timeout each."""
        short = Timeouts(greeting=SHORT, rcpt=SHORT, data_end=SHORT, data_block=SHORT, quit=SHORT)
        cases = [
            ({"greeting": None}, "waiting for the reply to greeting"),
            ({"silent_from": "RCPT", "extensions": ()}, "waiting for the reply to RCPT"),
            ({"silent_from": "END"}, "waiting for the reply to end of data"),
        ]
        for config, problem in cases:
            sink = self.sink(**config)
            failure = yield self.host_failure(self.attempt(sink, self.message(), timeouts=short))
            self.assertIn(f"timeout after {SHORT:g}s {problem}", failure.reason)
            self.assertFalse(failure.permanent)
        stalled = self.sink(interface="127.0.0.3", stop_reading_in_data=True, extensions=("SIZE 0",))
        body = (b"w" * 998 + b"\r\n") * 16 * 1024  # 16 MB: more than the kernel buffers hold
        failure = yield self.host_failure(
            self.attempt(stalled, self.message(body), timeouts=short, address="127.0.0.3")
        )
        self.assertIn("the server took no data", failure.reason)


class RealServerTests(TestCase):
    """Our client against an SMTP server it was not written with: the kms listener itself."""

    @inlineCallbacks
    def test_delivery_to_kms_over_verified_starttls(self) -> None:
        directory = Path(self.mktemp())
        server = RunningServer(write_config(directory))
        yield server.start()
        self.addCleanup(server.stop)
        body = b"Subject: from the queue\r\n\r\n.dot first\r\n" + b"a" * 16382 + b"\r\n.at the edge\r\n"
        path = directory / "body"
        path.write_bytes(body)
        recipients = (QueuedRecipient("alice@example.test"),)
        message = OutboundMessage("Q1", "sender@remote.test", recipients, path, len(body))
        add_user(server.config, "alice@example.test", "pw")
        hop = Hop("localhost", "127.0.0.1", server.port("smtp"))
        policy = TLSPolicy("required", ca_file=directory / "tls" / "server.pem")
        result = yield attempt(
            reactor,
            hop,
            message,
            helo="out.remote.test",
            tls=policy,
            credentials=None,
            timeout=10,
            timeouts=RELAXED,
            chunk_size=16 * 1024,
        )
        reply = result.replies["alice@example.test"]
        self.assertEqual((reply.code, reply.enhanced), (250, "2.0.0"))
        [stored] = server.messages("alice@example.test")
        self.assertIn(b"with ESMTPS", stored)
        self.assertTrue(stored.endswith(body.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]))
