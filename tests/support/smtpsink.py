"""A configurable SMTP server for tests of the outbound client, recording what it receives byte for byte.

It plays the remote MX or smarthost on 127.0.0.2, 127.0.0.3, ... (or ::1): what it offers in EHLO,
how it answers each command and each recipient, STARTTLS or implicit TLS with a test certificate,
AUTH PLAIN/LOGIN against a table of passwords, and misbehaviour (silence, garbage, a dropped
connection mid-DATA, a server that stops reading).  Each connection becomes a `SinkSession` with
every command line, the raw DATA stream (dot-stuffing and terminator included) and the message
as a reader sees it after un-stuffing.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure


@dataclass
class SinkConfig:
    """What the sink offers and answers.  Raw replies are bytes with their CRLF."""

    hostname: str = "sink.test"
    greeting: bytes | None = b"220 sink.test ESMTP test sink\r\n"  # None: never greets
    extensions: tuple[str, ...] = ("PIPELINING", "SIZE 10485760", "8BITMIME", "ENHANCEDSTATUSCODES")
    ehlo: bytes | None = None  # replaces the whole EHLO reply
    replies: dict[str, bytes] = field(default_factory=dict)  # verb ("MAIL", "DATA", "END", ...) -> reply
    rcpt_replies: dict[str, bytes] = field(default_factory=dict)  # address (lower case) -> reply
    tls: CertificateOptions | None = None  # STARTTLS offered (before TLS) when set
    implicit_tls: bool = False  # TLS from the first byte (needs ``tls``)
    starttls_broken: bool = False  # 220 to STARTTLS, then garbage as the answer to the ClientHello
    starttls_inject: bytes = b""  # sent in the same write right after the 220 to STARTTLS
    users: dict[str, str] = field(default_factory=dict)  # AUTH offered when not empty
    auth_mechanisms: str = "PLAIN LOGIN"
    auth_needs_tls: bool = True  # AUTH offered only over TLS
    hold_until_data: bool = False  # MAIL/RCPT replies held back until DATA arrives (needs pipelining)
    silent_from: str | None = None  # from this verb ("RCPT", "END", ...) on, nothing is answered
    drop_after_data_bytes: int | None = None  # abort the connection once this much DATA arrived
    stop_reading_in_data: bool = False  # stop reading the socket once DATA begins


@dataclass
class SinkSession:
    """One connection as the sink saw it."""

    commands: list[str] = field(default_factory=list)
    tls_commands: list[str] = field(default_factory=list)  # the commands that came over TLS
    pipelined: int = 0  # command lines that came in the same read as an earlier command line
    data: list[bytes] = field(default_factory=list)  # raw DATA streams, terminator included
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)  # sender, rcpts, content
    partial_data: bytes = b""  # what arrived of a DATA stream that never ended
    auth: list[str] = field(default_factory=list)  # users that authenticated
    tls: bool = False
    closed: Deferred[None] = field(default_factory=Deferred)

    def verbs(self) -> list[str]:
        return [command.split(" ")[0].split(":")[0].upper() for command in self.commands]


def unstuff(raw: bytes) -> bytes:
    """A DATA stream (terminator included) as the message it carries (RFC 5321 §4.5.2)."""
    body = raw[:-3] if raw != b".\r\n" else b""
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


class SinkProtocol(Protocol):
    def __init__(self, config: SinkConfig, sessions: list[SinkSession], open_: set[SinkProtocol]) -> None:
        self.config = config
        self.session = SinkSession(tls=config.implicit_tls)
        sessions.append(self.session)
        self._open = open_
        self._buffer = bytearray()
        self._in_data = False
        self._data = bytearray()
        self._silent = False
        self._held: list[bytes] = []
        self._sender = ""
        self._recipients: list[str] = []
        self._auth_step: str | None = None  # "plain", "login-user", "login-password"
        self._login_user = ""
        self._gone = False  # we closed or aborted: read nothing more
        self._broken_tls = False

    def connectionMade(self) -> None:
        self._open.add(self)
        if self.config.greeting is not None:
            self.transport.write(self.config.greeting)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._open.discard(self)
        if self._in_data:
            self.session.partial_data = bytes(self._data)
        self.session.closed.callback(None)

    def dataReceived(self, data: bytes) -> None:
        if self._broken_tls:  # the ClientHello: answered with garbage
            self.transport.write(b"this is not a TLS handshake\r\n" * 20)  # type: ignore[union-attr]
            self._close()
            return
        self._buffer += data
        lines = 0
        while self._buffer and not self._gone:
            if self._in_data:
                if not self._take_data():
                    return
                continue
            newline = self._buffer.find(b"\n")
            if newline < 0:
                return
            line = bytes(self._buffer[:newline]).rstrip(b"\r")
            del self._buffer[: newline + 1]
            lines += 1
            if lines > 1:
                self.session.pipelined += 1
            self._line(line.decode("utf-8", "replace"))

    # --- replies -----------------------------------------------------------------------------------

    def _send(self, verb: str, default: bytes) -> None:
        if self.config.silent_from == verb:
            self._silent = True
        if self._silent:
            return
        reply = self.config.replies.get(verb, default)
        if self.config.hold_until_data and verb in ("MAIL", "RCPT"):
            self._held.append(reply)
            return
        self.transport.write(reply)  # type: ignore[union-attr]

    def _line(self, line: str) -> None:
        if self._auth_step is not None:
            self._auth_continue(line)
            return
        self.session.commands.append(line)
        if self.session.tls:
            self.session.tls_commands.append(line)
        verb = line.split(" ")[0].split(":")[0].upper()
        handler = getattr(self, f"_do_{verb}", None)
        if handler is None:
            self._send(verb, b"502 5.5.1 unknown command\r\n")
        else:
            handler(line)

    def _do_EHLO(self, line: str) -> None:
        if self.config.ehlo is not None:
            self._send("EHLO", self.config.ehlo)
            return
        keywords = list(self.config.extensions)
        if self.config.tls is not None and not self.session.tls:
            keywords.append("STARTTLS")
        if self.config.users and (self.session.tls or not self.config.auth_needs_tls):
            keywords.append(f"AUTH {self.config.auth_mechanisms}")
        lines = [self.config.hostname, *keywords]
        reply = b"".join(
            f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n".encode() for i, text in enumerate(lines)
        )
        self._send("EHLO", reply)

    def _do_HELO(self, line: str) -> None:
        self._send("HELO", f"250 {self.config.hostname}\r\n".encode())

    def _do_STARTTLS(self, line: str) -> None:
        if self.config.tls is None or self.session.tls:
            self._send("STARTTLS", b"502 5.5.1 no TLS here\r\n")
            return
        self.transport.write(b"220 2.0.0 go ahead\r\n" + self.config.starttls_inject)  # type: ignore[union-attr]
        self._buffer.clear()
        if self.config.starttls_broken:
            self._broken_tls = True
            return
        self.transport.startTLS(self.config.tls)  # type: ignore[union-attr]
        self.session.tls = True
        self._sender, self._recipients = "", []

    def _do_AUTH(self, line: str) -> None:
        words = line.split(" ")
        mechanism = words[1].upper() if len(words) > 1 else ""
        if mechanism == "PLAIN" and len(words) > 2:
            self._check_plain(words[2])
        elif mechanism == "PLAIN":
            self._auth_step = "plain"
            self.transport.write(b"334 \r\n")  # type: ignore[union-attr]
        elif mechanism == "LOGIN":
            self._auth_step = "login-user"
            self.transport.write(b"334 VXNlcm5hbWU6\r\n")  # type: ignore[union-attr]
        else:
            self._send("AUTH", b"504 5.5.4 unknown mechanism\r\n")

    def _auth_continue(self, line: str) -> None:
        step, self._auth_step = self._auth_step, None
        if step == "plain":
            self._check_plain(line)
        elif step == "login-user":
            self._login_user = base64.b64decode(line).decode()
            self._auth_step = "login-password"
            self.transport.write(b"334 UGFzc3dvcmQ6\r\n")  # type: ignore[union-attr]
        else:
            self._verdict(self._login_user, base64.b64decode(line).decode())

    def _check_plain(self, token: str) -> None:
        _, user, password = base64.b64decode(token).decode().split("\0")
        self._verdict(user, password)

    def _verdict(self, user: str, password: str) -> None:
        if self.config.users.get(user) == password:
            self.session.auth.append(user)
            self._send("AUTH", b"235 2.7.0 Authentication successful\r\n")
        else:
            self._send("AUTH", b"535 5.7.8 Authentication credentials invalid\r\n")

    def _do_MAIL(self, line: str) -> None:
        self._sender = line[line.index("<") + 1 : line.index(">")]
        self._recipients = []
        self._send("MAIL", b"250 2.1.0 Ok\r\n")

    def _do_RCPT(self, line: str) -> None:
        address = line[line.index("<") + 1 : line.index(">")]
        reply = self.config.rcpt_replies.get(address.lower(), b"250 2.1.5 Ok\r\n")
        if reply.startswith(b"2"):
            self._recipients.append(address)
        self._send("RCPT", reply)

    def _do_DATA(self, line: str) -> None:
        held, self._held = self._held, []
        if held and not self._silent:
            self.transport.write(b"".join(held))  # type: ignore[union-attr]
        if not self._recipients and "DATA" not in self.config.replies:
            self._send("DATA", b"554 5.5.1 Error: no valid recipients\r\n")
            return
        self._send("DATA", b"354 End data with <CR><LF>.<CR><LF>\r\n")
        if self.config.replies.get("DATA", b"354").startswith(b"354"):
            self._in_data = True
            self._data = bytearray()
            if self.config.stop_reading_in_data:
                self.transport.pauseProducing()  # type: ignore[union-attr]

    def _do_RSET(self, line: str) -> None:
        self._sender, self._recipients = "", []
        self._send("RSET", b"250 2.0.0 Ok\r\n")

    def _do_NOOP(self, line: str) -> None:
        self._send("NOOP", b"250 2.0.0 Ok\r\n")

    def _do_QUIT(self, line: str) -> None:
        self._send("QUIT", b"221 2.0.0 Bye\r\n")
        self._close()

    def _close(self, abort: bool = False) -> None:
        self._gone = True
        if abort:
            self.transport.abortConnection()  # type: ignore[union-attr]
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    # --- DATA ----------------------------------------------------------------------------------------

    def _take_data(self) -> bool:
        """Move DATA bytes out of the buffer; True once the terminator was seen."""
        start = max(0, len(self._data) - 4)
        self._data += self._buffer
        self._buffer.clear()
        limit = self.config.drop_after_data_bytes
        if limit is not None and len(self._data) >= limit:
            self._close(abort=True)
            return False
        if self._data.startswith(b".\r\n"):
            end = 3
        else:
            found = self._data.find(b"\r\n.\r\n", start)
            if found < 0:
                return False
            end = found + 5
        raw = bytes(self._data[:end])
        self._buffer[:0] = self._data[end:]
        self._in_data = False
        self._data = bytearray()
        self.session.data.append(raw)
        self.session.messages.append((self._sender, list(self._recipients), unstuff(raw)))
        self._send("END", b"250 2.0.0 Ok: queued as SINK1\r\n")
        return True


class SMTPSink:
    """``start(reactor, "127.0.0.2")`` listens on a free port; ``stop()`` closes every connection too."""

    def __init__(self, config: SinkConfig | None = None) -> None:
        self.config = config or SinkConfig()
        self.sessions: list[SinkSession] = []
        self._open: set[SinkProtocol] = set()
        self._port: Any = None
        self.port = 0

    @property
    def session(self) -> SinkSession:
        """The one session a test expects (fails the test when there were more or none)."""
        assert len(self.sessions) == 1, f"{len(self.sessions)} sessions"
        return self.sessions[0]

    def start(self, reactor: Any, interface: str = "127.0.0.2", port: int = 0) -> int:
        factory: Any = Factory.forProtocol(lambda: SinkProtocol(self.config, self.sessions, self._open))
        if self.config.implicit_tls:
            factory = TLSMemoryBIOFactory(self.config.tls, False, factory)
        self._port = reactor.listenTCP(port, factory, interface=interface)
        self.port = self._port.getHost().port
        return self.port

    def stop(self) -> Deferred[Any]:
        waits = [session.closed for session in self.sessions if not session.closed.called]
        for protocol in list(self._open):
            protocol.transport.abortConnection()  # type: ignore[union-attr]
        port, self._port = self._port, None
        stopped = port.stopListening() if port is not None else None
        return gatherResults([*waits, *([stopped] if stopped is not None else [])])
