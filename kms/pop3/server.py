# -*- test-case-name: tests.test_pop3 -*-
"""Our POP3 server protocol (RFC 1939) with CAPA (RFC 2449), STLS (RFC 2595), AUTH (RFC 5034) and
the response codes of RFC 2449/3206.

Twisted's ``twisted.mail.pop3`` is not usable (audit §2, bugs P1–P7), so this protocol does its
own buffering on a plain `Protocol`, the way `kms.smtp.server` does:

* One command at a time.  While a command waits for the login session or the store, while a
  message is being sent, or while the client does not read its replies, further input is only
  buffered (and reading paused once the backlog passes `BACKLOG_LIMIT`), so pipelined replies
  always come out in order.
* Memory is bounded whatever the client sends: a line over ``max_line`` is refused and the rest of
  it dropped as it arrives.  The protocol is its transport's streaming producer: while the
  transport's buffer is full (the client is not reading) no further command runs, and a message
  over one chunk is sent chunk by chunk as the transport takes it, so only the message itself and
  about one chunk are held (`kms.pop3.commands.dot_stuffed`).  A message of one chunk goes out
  with its ``+OK`` line in a single write (`kms.net.write_now`).
* Bytes pipelined after STLS are thrown away and the session starts afresh (RFC 2595 §4).
* Every command, however malformed, gets a reply from a fixed text: wrong arity (P2), numbers out
  of range or already deleted (P3), and exceptions never reach the client by name (P6).
* Logins go through the per-connection login session, which writes the security log; the debug
  log gets command names, never a PASS argument or AUTH data (P7).

UPDATE (RFC 1939 §6) happens only after QUIT in the TRANSACTION state: the messages marked by DELE
get ``\\Deleted`` and are expunged, nothing else.  A connection that ends any other way (drop,
timeout, too many errors) deletes nothing.  The maildrop view, and with it the store's exclusive
lock, is closed in every case.

Which replies count toward ``max_errors``: every ``-ERR`` except ``[SYS/TEMP]`` and ``[IN-USE]``,
which say "later", not "you did something wrong".

The idle timer runs while it is the client's turn: waiting for a command, and while a message is
being sent (a client that stops reading is as idle as one that stops writing).  While the login
session or the store has the turn, the client cannot be blamed for silence.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kms.auth.errors import (
    AuthenticationFailed,
    EncryptionRequired,
    MalformedResponse,
    MechanismUnavailable,
    TemporaryAuthFailure,
)
from kms.auth.policy import Decision, SecurityPolicy, may_authenticate, may_use_command
from kms.auth.sasl import Authenticated, Challenge, decode_response, encode_challenge
from kms.clientinfo import ClientInfo
from kms.limits import REFUSAL_TEXT, Verdict
from kms.lines import TOO_LONG, LineReader
from kms.net import set_tcp_nodelay, write_now
from kms.pop3.commands import (
    CHUNK_SIZE,
    TEMPORARY_CODES,
    POP3Error,
    dot_stuffed,
    parse_command,
    parse_line_count,
    parse_message_number,
    split_arguments,
    top,
)
from kms.store.interfaces import Account, FolderView, MailboxError, MaildropLocked, MessageInfo

# Pending input beyond this while a command waits: stop reading from the socket.
BACKLOG_LIMIT = 64 * 1024

_log = Logger()

_Handler = Callable[[str], "Deferred[None] | None"]
# RFC 3206 §4: [AUTH] belongs on -ERR to these commands, and covers "without encryption".
_LOGIN_COMMANDS = frozenset({"USER", "PASS", "APOP", "AUTH"})
PLAINTEXT_REFUSED = "[AUTH] Plaintext authentication disallowed without TLS"
PLAINTEXT_DISABLED = "[AUTH] Plaintext authentication is disabled"


def _plaintext_enabled(mechanisms: list[str]) -> bool:
    return bool({"PLAIN", "LOGIN"} & set(mechanisms))


@dataclass(frozen=True)
class POP3Settings:
    """What one listener's POP3 service looks like; built once from the config."""

    hostname: str
    listener: str  # "pop3" or "pop3s"
    implicit_tls: bool  # pop3s: the transport is TLS from the first byte
    banner_product: str | None  # "kms 0.1.0" in the greeting and CAPA; None with hide_version
    command_timeout: float = 600  # RFC 1939 §3: at least 10 minutes
    max_errors: int = 10
    max_line: int = 12288  # RFC 5034 §4 lets AUTH lines be long; same bound as SMTP's AUTH
    policy: SecurityPolicy = field(default_factory=SecurityPolicy)  # [security] policy (SPEC §5)


class SASLExchange(TypingProtocol):
    """One SASL exchange in progress (`kms.auth.sasl.ISASLMechanism`)."""

    def step(self, response: bytes | None) -> Deferred[Challenge | Authenticated]: ...


class LoginSession(TypingProtocol):
    """The per-connection login session (`kms.auth.session.LoginSession`)."""

    def mechanisms(self) -> list[str]: ...

    def begin(self, name: str) -> SASLExchange: ...

    def login_plaintext(self, username: str, password: str, method: str) -> Deferred[Authenticated]: ...

    def login_apop(self, username: str, timestamp: str, digest: str) -> Deferred[Authenticated]: ...

    def logout(self) -> None: ...


class POP3Logs(TypingProtocol):
    """The part of `kms.logs.Logs` this protocol writes to."""

    def mail(self, event: str, client: ClientInfo | None = None, **fields: object) -> None: ...

    def security(self, event: str, client: ClientInfo | None = None, **fields: object) -> None: ...

    def debug(
        self, category: str, event: str, client: ClientInfo | None = None, **fields: object
    ) -> None: ...

    def error(self, event: str, client: ClientInfo | None = None, **fields: object) -> None: ...


@dataclass
class _Maildrop:
    """The TRANSACTION state: the snapshot taken at login, numbered 1..n, and what DELE marked."""

    user: str
    view: FolderView
    uidvalidity: int
    messages: Sequence[MessageInfo]
    deleted: set[int] = field(default_factory=set)  # message numbers
    retrieved: int = 0
    retrieved_bytes: int = 0

    def live(self) -> Iterator[tuple[int, MessageInfo]]:
        """Numbered messages not marked as deleted: all LIST, UIDL and STAT ever show."""
        return ((n, info) for n, info in enumerate(self.messages, 1) if n not in self.deleted)

    def totals(self) -> tuple[int, int]:
        count = size = 0
        for _, info in self.live():
            count += 1
            size += info.size
        return count, size

    def unique_id(self, info: MessageInfo) -> str:
        """Stable across sessions and the same message IMAP sees: UIDVALIDITY and UID together."""
        return f"{self.uidvalidity}.{info.uid}"


@dataclass
class _Sending:
    """A multi-line response larger than one chunk, being written as the transport takes it."""

    chunks: Iterator[bytes]
    done: Deferred[None] = field(default_factory=Deferred)


@implementer(IPushProducer)
class POP3Server(Protocol):
    """One POP3 connection: bytes in, calls on the login session and the store out, replies back.

    The state is which handler table applies: ``_drop`` set means TRANSACTION, else AUTHORIZATION;
    ``_sasl`` set means the next line answers a ``+`` challenge.
    """

    client: ClientInfo
    timestamp: str  # the greeting's RFC 1939 msg-id, which APOP digests

    def __init__(
        self,
        settings: POP3Settings,
        accounts: Callable[[str], Deferred[Account]],
        session_factory: Callable[[ClientInfo], LoginSession],
        tls_context: object | None,
        clock: IReactorTime,
        logs: POP3Logs | None = None,
    ) -> None:
        self.settings = settings
        self._accounts = accounts
        self._session_factory = session_factory
        self._tls_context = tls_context
        self._clock = clock
        self._logs = logs
        self._user: str | None = None  # USER was accepted; PASS comes next
        self._sasl: SASLExchange | None = None
        self._drop: _Maildrop | None = None
        self._sending: _Sending | None = None
        self._output_paused = False  # the transport's write buffer is full
        self._inbox = bytearray()
        self._lines = LineReader(settings.max_line)
        self._waiting = False  # a command's Deferred (or a message being sent) has the turn
        self._pumping = False
        self._paused = False
        self._closing = False  # the last reply is queued: no more input is read
        self._gone = False  # the transport is closed: nothing more is written
        self._out: list[bytes] = []
        self._errors = 0
        self._timer: IDelayedCall | None = None
        self._authorization: dict[str, _Handler] = {
            "CAPA": self._do_CAPA,
            "STLS": self._do_STLS,
            "USER": self._do_USER,
            "PASS": self._do_PASS,
            "AUTH": self._do_AUTH,
            "APOP": self._do_APOP,
            "QUIT": self._do_QUIT,
        }
        self._transaction: dict[str, _Handler] = {
            "CAPA": self._do_CAPA,
            "STAT": self._do_STAT,
            "LIST": self._do_LIST,
            "RETR": self._do_RETR,
            "DELE": self._do_DELE,
            "NOOP": self._do_NOOP,
            "RSET": self._do_RSET,
            "TOP": self._do_TOP,
            "UIDL": self._do_UIDL,
            "QUIT": self._do_QUIT,
        }

    # --- Twisted's side ---------------------------------------------------------------------------

    def connectionMade(self) -> None:
        settings = self.settings
        self.client = ClientInfo.from_transport(self.transport, settings.listener, settings.implicit_tls)
        self._session = self._session_factory(self.client)
        set_tcp_nodelay(self.transport)
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self.timestamp = f"<{secrets.token_hex(8)}.{int(self._clock.seconds())}@{settings.hostname}>"
        self._debug("connect")
        product = f"{settings.banner_product} " if settings.banner_product else ""
        # The timestamp goes last: clients (curl) look for APOP's msg-id at the end of the line.
        self._ok(f"{product}POP3 server ready {self.timestamp}")
        self._arm_timer()
        self._flush()

    def dataReceived(self, data: bytes) -> None:
        self._pump(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = self._closing = True
        self._arm_timer()
        self._inbox.clear()
        self._sending = None  # its Deferred never fires: the connection is gone
        drop, self._drop = self._drop, None
        if drop is not None:
            self._end_session(drop, "disconnect", 0)  # no QUIT, no UPDATE (RFC 1939 §6)
        self._session.logout()
        self._debug("disconnect", errors=self._errors)

    # IPushProducer: the transport's write buffer is full (or drained again).

    def pauseProducing(self) -> None:
        self._output_paused = True

    def resumeProducing(self) -> None:
        self._output_paused = False
        self._arm_timer()  # the client is reading
        if self._sending is not None:
            self._send_chunks()
        elif not self._waiting:
            self._pump()

    def stopProducing(self) -> None:
        """The connection is going away; `connectionLost` cleans up."""

    # --- input ------------------------------------------------------------------------------------

    def _pump(self, data: bytes = b"") -> None:
        """Process input until it runs out, a command waits, or the connection closes; then write."""
        if self._pumping:
            self._inbox += data
            return
        self._pumping = True
        try:
            if not self._closing:
                self._inbox += data
                while self._inbox and not (self._waiting or self._closing or self._output_paused):
                    if not self._step():
                        break
        except Exception:
            # Somewhere between states: nothing sensible can follow.
            self._internal_error("pop3-internal-error", Failure())
            self._shutdown("-ERR [SYS/TEMP] Internal error")
        finally:
            self._pumping = False
        self._backpressure()
        self._arm_timer()
        self._flush()

    def _step(self) -> bool:
        """Consume one line (or one dropped piece of an over-long one); False: need more input."""
        inbox = self._inbox
        line = self._lines.take(inbox)
        if line is None:
            return False
        if line is TOO_LONG:
            self._line_too_long()
        elif self._sasl is not None:
            self._auth_response(self._sasl, line)
        else:
            self._dispatch(line)
        return True

    def _line_too_long(self) -> None:
        self._sasl = None  # an over-long SASL response ends the exchange too
        self._error("Line too long")

    def _backpressure(self) -> None:
        """Pause reading while a large backlog waits behind a command or a client that does not read."""
        want_pause = (self._waiting or self._output_paused) and len(self._inbox) > BACKLOG_LIMIT
        if self._gone or want_pause == self._paused:
            return
        self._paused = want_pause
        if want_pause:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        else:
            self.transport.resumeProducing()  # type: ignore[union-attr]

    # --- output -----------------------------------------------------------------------------------

    def _line(self, text: str) -> None:
        self._out.append(text.encode("utf-8") + b"\r\n")

    def _ok(self, text: str = "") -> None:
        self._line(f"+OK {text}" if text else "+OK")

    def _error(self, text: str) -> None:
        """Queue ``-ERR text``; all but the temporary codes count toward ``max_errors``."""
        if self._closing:
            return
        self._line(f"-ERR {text}")
        if not text.startswith(TEMPORARY_CODES):
            self._errors += 1
            if self._errors > self.settings.max_errors:
                self._debug("too-many-errors", errors=self._errors)
                self._shutdown("-ERR Too many errors, closing connection")

    def _multiline(self, first: str, lines: Iterable[str]) -> None:
        """A multi-line response of our own lines (none starts with "."), terminator included."""
        self._ok(first)
        for text in lines:
            self._line(text)
        self._line(".")

    def _shutdown(self, text: str) -> None:
        """Queue a last reply; the connection closes once it is written."""
        if not self._closing:
            self._line(text)
            self._closing = True

    def _write_out(self) -> None:
        if self._out and not self._gone:
            data, self._out = b"".join(self._out), []
            write_now(self.transport, data)

    def _flush(self) -> None:
        self._write_out()
        if self._closing and not self._gone:
            self._gone = True
            # A registered producer would hold the close back until it unregisters (Twisted).
            self.transport.unregisterProducer()  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _send(self, first: str, body: bytes) -> Deferred[None] | None:
        """``+OK first``, then ``body`` dot-stuffed; the Deferred fires once all is written.

        A body of one chunk goes out with the replies queued before it in one write; a larger one
        chunk by chunk as the transport takes them, so only one stuffed chunk is in memory.
        """
        if self._gone:
            return None
        self._ok(first)
        chunks = dot_stuffed(body)
        if len(body) <= CHUNK_SIZE:
            self._out.extend(chunks)
            self._write_out()  # a pipelined RETR waits if this one filled the buffer
            return None
        self._write_out()  # replies queued before this one go first
        sending = self._sending = _Sending(chunks)
        self._send_chunks()
        return sending.done

    def _send_chunks(self) -> None:
        """Write the large response's next chunks until the transport is full or all is written."""
        sending = self._sending
        while sending is not None and not self._output_paused:
            chunk = next(sending.chunks, None)
            if chunk is None:
                self._sending = None
                sending.done.callback(None)
                return
            write_now(self.transport, chunk)

    # --- waiting on Deferreds ---------------------------------------------------------------------

    def _wait(self, d: Deferred[None]) -> None:
        """Hold further input until ``d`` (whose callbacks write the reply) fires."""
        self._waiting = True
        d.addErrback(self._internal_error_reply)
        d.addBoth(self._resume)

    def _resume(self, _: object) -> None:
        self._waiting = False
        self._pump()

    def _internal_error(self, event: str, failure: Failure) -> None:
        """A bug or a broken store: the error log gets a line, twistd's log the traceback."""
        if self._logs is not None:
            kind = type(failure.value).__name__
            self._logs.error(event, self.client, error=failure.getErrorMessage(), type=kind)
        _log.failure("POP3 {event} for {client}", failure, event=event, client=self.client.describe())

    def _internal_error_reply(self, failure: Failure) -> None:
        self._internal_error("pop3-internal-error", failure)
        self._error("[SYS/TEMP] Local error in processing")

    # --- timers -----------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        """Restart the client's clock, or stop it while the server has the turn."""
        if self._closing or (self._waiting and self._sending is None):
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.settings.command_timeout)
        else:
            self._timer = self._clock.callLater(self.settings.command_timeout, self._timed_out)

    def _timed_out(self) -> None:
        """RFC 1939 §3 autologout: the session ends without UPDATE."""
        self._timer = None
        sending = self._sending is not None or self._output_paused
        self._debug("timeout", sending=sending)
        if sending:
            # The client stopped reading mid-message: a reply could never be read, and a graceful
            # close would wait for a buffer that never drains.
            self._closing = self._gone = True
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._shutdown("-ERR Disconnected for inactivity")
        self._flush()

    # --- commands ---------------------------------------------------------------------------------

    def _dispatch(self, line: bytes) -> None:
        try:
            keyword, argument = parse_command(line)
        except POP3Error as error:
            self._error(error.text)
            return
        handlers, others = self._authorization, self._transaction
        if self._drop is not None:
            handlers, others = others, handlers
        if (keyword in handlers or keyword in others) and not self._command_allowed(keyword):
            return
        handler = handlers.get(keyword)
        if handler is None:
            known = keyword in others
            self._debug("command", command=keyword if known else "unknown")
            self._error("Command not valid in this state" if known else "Unknown command")
            return
        self._debug("command", command=keyword, **_loggable_argument(keyword, argument))
        try:
            d = handler(argument)
        except POP3Error as error:
            self._error(error.text)
        except Exception:
            self._internal_error_reply(Failure())
        else:
            if d is not None:
                self._wait(d)

    def _do_CAPA(self, argument: str) -> None:
        split_arguments(argument, "CAPA")
        lines = ["TOP", "UIDL", "PIPELINING", "RESP-CODES", "AUTH-RESP-CODE"]
        mechanisms = self._session.mechanisms()
        if not self._user_pass_needs_tls() and _plaintext_enabled(mechanisms):
            lines.insert(2, "USER")
        if mechanisms:
            lines.append("SASL " + " ".join(mechanisms))
        if self._tls_context is not None and not self.client.tls:
            lines.append("STLS")
        if self.settings.banner_product:
            lines.append(f"IMPLEMENTATION {self.settings.banner_product}")
        self._multiline("Capability list follows", lines)

    def _do_QUIT(self, argument: str) -> Deferred[None] | None:
        split_arguments(argument, "QUIT")
        drop, self._drop = self._drop, None
        if drop is None:
            self._shutdown("+OK Logging out")
            return None
        uids = [info.uid for n, info in enumerate(drop.messages, 1) if n in drop.deleted]
        if not uids:
            self._end_session(drop, "quit", 0)
            self._shutdown("+OK Logging out")
            return None
        # UPDATE: the store expunges only \Deleted messages, so mark exactly ours first; messages
        # someone else marked stay for their owner to expunge.
        d: Deferred[Any] = maybeDeferred(drop.view.store, uids, ["\\Deleted"], "+")
        d.addCallback(lambda _: drop.view.expunge(uids))

        def updated(removed: Sequence[int]) -> None:
            self._end_session(drop, "quit", len(removed))
            self._shutdown(f"+OK Logging out, messages deleted: {len(removed)}")

        def failed(failure: Failure) -> None:
            self._internal_error("pop3-update-error", failure)
            self._end_session(drop, "quit", 0)
            self._shutdown("-ERR [SYS/TEMP] Some deleted messages not removed")

        return d.addCallbacks(updated, failed)

    def _end_session(self, drop: _Maildrop, ended: str, deleted: int) -> None:
        """Close the view (the store's lock goes with it) and write the mail log line."""
        drop.view.close()
        if self._logs is not None:
            self._logs.mail(
                "pop3-logout",
                self.client,
                user=drop.user,
                retrieved=drop.retrieved,
                retrieved_bytes=drop.retrieved_bytes,
                deleted=deleted,
                ended=ended,
            )

    # --- STLS (RFC 2595) --------------------------------------------------------------------------

    def _do_STLS(self, argument: str) -> None:
        split_arguments(argument, "STLS")
        if self.client.tls:
            raise POP3Error("Command not permitted when TLS active")
        if self._tls_context is None:
            raise POP3Error("TLS not available")
        self._ok("Begin TLS negotiation")
        # Anything pipelined after STLS was sent in clear text: it must not be obeyed as if it had
        # arrived over TLS (the CVE-2011-0411 class).
        self._inbox.clear()
        self._write_out()
        self.transport.startTLS(self._tls_context)  # type: ignore[union-attr]
        self._debug("stls")
        # RFC 2595 §4: forget everything learnt from the client before TLS, USER included.
        self.client.tls = True
        self._user = None
        self._session.logout()
        self._session = self._session_factory(self.client)

    # --- USER/PASS, APOP, AUTH (RFC 1939, RFC 5034) -----------------------------------------------

    def _user_pass_needs_tls(self) -> bool:
        """USER/PASS is not SASL, so the engine's policy never sees it: ask the policy directly."""
        decision = may_authenticate(self.settings.policy, self.client, "USER/PASS", "pop3")
        return decision is Decision.NEEDS_TLS

    def _plaintext_refused(self) -> POP3Error:
        self._security("mechanism-refused", method="USER/PASS", reason="USER/PASS requires TLS")
        return POP3Error(PLAINTEXT_REFUSED)

    def _check_user_pass(self) -> None:
        """USER/PASS is refused before TLS by the policy, and always when [security] methods
        enables neither PLAIN nor LOGIN (the cleartext methods it belongs with, as IMAP LOGIN)."""
        if self._user_pass_needs_tls():
            raise self._plaintext_refused()
        if not _plaintext_enabled(self._session.mechanisms()):
            self._security("mechanism-refused", method="USER/PASS", reason="PLAIN and LOGIN are disabled")
            raise POP3Error(PLAINTEXT_DISABLED)

    def _do_USER(self, argument: str) -> None:
        self._check_user_pass()
        name = argument.strip(" ")
        if not name:
            raise POP3Error("Syntax: USER name")
        self._user = name
        # Always +OK: whether the mailbox exists is only ever revealed by a successful PASS.
        self._ok("Send PASS")

    def _do_PASS(self, argument: str) -> Deferred[None]:
        user, self._user = self._user, None
        self._check_user_pass()
        if user is None:
            raise POP3Error("Send USER first")
        # The whole rest of the line is the password: spaces are allowed in it.
        d: Deferred[Any] = maybeDeferred(self._session.login_plaintext, user, argument, "USER/PASS")
        return self._authenticated(d, None)

    def _do_APOP(self, argument: str) -> Deferred[None]:
        # RFC 1939 §7: the digest is the last word; the name is everything before it.
        name, _, digest = argument.strip(" ").rpartition(" ")
        if not name.strip(" ") or not digest:
            raise POP3Error("Syntax: APOP name digest")
        self._user = None
        try:
            d: Deferred[Any] = self._session.login_apop(name.strip(" "), self.timestamp, digest)
        except EncryptionRequired:
            raise POP3Error("Encryption required for APOP") from None
        except MechanismUnavailable:
            raise POP3Error("APOP not available") from None
        return self._authenticated(d, None)

    def _do_AUTH(self, argument: str) -> Deferred[None] | None:
        words = split_arguments(argument, "AUTH [mechanism [initial-response]]", 0, 2)
        if not words:
            self._multiline("Supported mechanisms follow", self._session.mechanisms())
            return None
        self._user = None
        try:
            exchange = self._session.begin(words[0])
        except EncryptionRequired:  # logged by the session
            raise POP3Error(PLAINTEXT_REFUSED) from None
        except MechanismUnavailable:
            raise POP3Error("Unrecognized authentication mechanism") from None
        if len(words) == 1:
            return self._auth_step(exchange, None)
        initial = self._decode_sasl(words[1].encode("ascii", "replace"))
        return None if initial is None else self._auth_step(exchange, initial)

    def _auth_response(self, exchange: SASLExchange, line: bytes) -> None:
        """The client's line after a ``+`` challenge: the next step, or the end of the exchange."""
        self._sasl = None
        data = self._decode_sasl(line)
        if data is not None:
            self._wait(self._auth_step(exchange, data))

    def _decode_sasl(self, line: bytes) -> bytes | None:
        """The client's SASL data, or None after replying to a cancel or undecodable data."""
        try:
            data = decode_response(line)
        except MalformedResponse:
            self._error("Cannot decode response")
            return None
        if data is None:
            self._error("Authentication cancelled")
        return data

    def _auth_step(self, exchange: SASLExchange, data: bytes | None) -> Deferred[None]:
        d: Deferred[Any] = maybeDeferred(exchange.step, data)
        return self._authenticated(d, exchange)

    def _authenticated(
        self, d: Deferred[Challenge | Authenticated], exchange: SASLExchange | None
    ) -> Deferred[None]:
        """Answer a login step: a challenge, the maildrop once open, or why not."""

        def answered(result: Challenge | Authenticated) -> Deferred[None] | None:
            if isinstance(result, Challenge):
                self._sasl = exchange
                self._out.append(b"+ " + encode_challenge(result.data) + b"\r\n")
                return None
            if self._gone:
                self._session.logout()  # the login finished after the client left
                return None
            return self._open_maildrop(result.identity)

        def failed(failure: Failure) -> None:
            if failure.check(AuthenticationFailed):
                # The same for an unknown user, a wrong password, a locked account (SPEC §4).
                self._error("[AUTH] Authentication failed")
            elif failure.check(MalformedResponse):
                self._error("Cannot decode response")
            else:
                # Never "wrong password" for what may be an outage or a bug.
                if not failure.check(TemporaryAuthFailure):
                    self._internal_error("pop3-auth-error", failure)
                self._error("[SYS/TEMP] Temporary authentication failure")

        return d.addCallbacks(answered, failed)

    def _open_maildrop(self, identity: str) -> Deferred[None]:
        """TRANSACTION begins once the store hands over the locked maildrop; until then, nothing."""
        d: Deferred[Any] = maybeDeferred(self._accounts, identity)
        d.addCallback(lambda account: account.open_maildrop())

        def opened(view: FolderView) -> None:
            if self._gone:
                view.close()  # the client left while the store worked
                return
            self._drop = _Maildrop(identity, view, view.uidvalidity, tuple(view.messages))
            self._ok("Logged in")

        def failed(failure: Failure) -> None:
            self._session.logout()  # back to AUTHORIZATION, identity forgotten
            if failure.check(MaildropLocked):
                self._error("[IN-USE] Mailbox is locked by another POP3 session")
            else:
                self._internal_error("pop3-maildrop-error", failure)
                self._error("[SYS/TEMP] Mailbox unavailable")

        return d.addCallbacks(opened, failed)

    # --- TRANSACTION (RFC 1939 §5) ----------------------------------------------------------------

    def _message(self, word: str) -> tuple[int, MessageInfo]:
        """The message a client's number names, unless it is out of range or deleted (audit P3)."""
        drop = self._current()
        number = parse_message_number(word, len(drop.messages))
        if number in drop.deleted:
            raise POP3Error("Message already deleted")
        return number, drop.messages[number - 1]

    def _current(self) -> _Maildrop:
        drop = self._drop
        if drop is None:  # the handler tables make this impossible
            raise RuntimeError("TRANSACTION command without a maildrop")
        return drop

    def _do_STAT(self, argument: str) -> None:
        split_arguments(argument, "STAT")
        count, size = self._current().totals()
        self._ok(f"{count} {size}")

    def _do_LIST(self, argument: str) -> None:
        words = split_arguments(argument, "LIST [message]", 0, 1)
        if words:
            number, info = self._message(words[0])
            self._ok(f"{number} {info.size}")
            return
        drop = self._current()
        count, size = drop.totals()
        self._multiline(f"{count} messages ({size} octets)", (f"{n} {info.size}" for n, info in drop.live()))

    def _do_UIDL(self, argument: str) -> None:
        words = split_arguments(argument, "UIDL [message]", 0, 1)
        drop = self._current()
        if words:
            number, info = self._message(words[0])
            self._ok(f"{number} {drop.unique_id(info)}")
            return
        listing = (f"{n} {drop.unique_id(info)}" for n, info in drop.live())
        self._multiline("Unique-ID listing follows", listing)

    def _do_RETR(self, argument: str) -> Deferred[None]:
        [word] = split_arguments(argument, "RETR message", 1, 1)
        _, info = self._message(word)
        drop = self._current()

        def send(data: bytes) -> Deferred[None] | None:
            if self._gone:
                return None
            drop.retrieved += 1
            drop.retrieved_bytes += len(data)
            return self._send(f"{len(data)} octets", data)

        return self._retrieve(drop, info, send)

    def _do_TOP(self, argument: str) -> Deferred[None]:
        number_word, lines_word = split_arguments(argument, "TOP message lines", 2, 2)
        _, info = self._message(number_word)
        lines = parse_line_count(lines_word)

        def send(data: bytes) -> Deferred[None] | None:
            return self._send("Top of message follows", top(data, lines))

        return self._retrieve(self._current(), info, send)

    def _retrieve(
        self, drop: _Maildrop, info: MessageInfo, send: Callable[[bytes], Deferred[None] | None]
    ) -> Deferred[None]:
        """Read the message (wire form) from the store and ``send`` it, or say it can't be read."""

        def failed(failure: Failure) -> None:
            if failure.check(MailboxError):  # the store's refusal, e.g. expunged by an IMAP session
                self._error("Message is no longer available")
                return
            self._internal_error("pop3-read-error", failure)
            self._error("[SYS/TEMP] Unable to read message")

        d: Deferred[Any] = maybeDeferred(drop.view.open_message, info.uid)
        return d.addCallbacks(send, failed)

    def _do_DELE(self, argument: str) -> None:
        [word] = split_arguments(argument, "DELE message", 1, 1)
        number, _ = self._message(word)
        self._current().deleted.add(number)
        self._ok(f"Message {number} deleted")

    def _do_NOOP(self, argument: str) -> None:
        split_arguments(argument, "NOOP")
        self._ok()

    def _do_RSET(self, argument: str) -> None:
        split_arguments(argument, "RSET")
        drop = self._current()
        drop.deleted.clear()
        count, size = drop.totals()
        self._ok(f"{count} messages ({size} octets)")

    # --- logging ----------------------------------------------------------------------------------

    def _command_allowed(self, keyword: str) -> bool:
        """The ``encrypted`` policy's say on a known command; a refusal is answered and logged."""
        if may_use_command(self.settings.policy, self.client, "pop3", keyword):
            return True
        self._debug("command", command=keyword)
        self._security("command-refused", command=keyword, reason="security policy requires TLS")
        code = "[AUTH] " if keyword in _LOGIN_COMMANDS else ""
        self._error(f"{code}Encryption required by security policy")
        return False

    def _security(self, event: str, **fields: object) -> None:
        """A policy refusal for the security log, in the fields `kms.auth.session` uses."""
        if self._logs is not None:
            self._logs.security(event, self.client, protocol="pop3", **fields)

    def _debug(self, event: str, **fields: object) -> None:
        if self._logs is not None:
            self._logs.debug("pop3", event, self.client, **fields)


def _loggable_argument(keyword: str, argument: str) -> dict[str, str]:
    """What of a command may reach the debug log: never PASS, AUTH data or APOP digests (audit P7)."""
    if keyword == "PASS":
        return {}
    if keyword in ("AUTH", "APOP"):
        argument = argument.strip(" ").partition(" ")[0]  # the mechanism or the user name
    return {"argument": argument} if argument else {}


class POP3Factory(Factory):
    """Builds `POP3Server` for one listener; everything it needs is injected here."""

    noisy = False

    def __init__(
        self,
        settings: POP3Settings,
        accounts: Callable[[str], Deferred[Account]],
        session_factory: Callable[[ClientInfo], LoginSession],
        tls_context: object | None,
        clock: IReactorTime | None = None,
        logs: POP3Logs | None = None,
    ) -> None:
        """``accounts(address)`` opens a user's `Account`; ``tls_context`` enables STLS (None: no STLS)."""
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.settings = settings
        self.accounts = accounts
        self.session_factory = session_factory
        self.tls_context = tls_context
        self.clock: IReactorTime = clock  # type: ignore[assignment]
        self.logs = logs

    def buildProtocol(self, addr: object) -> POP3Server:
        protocol = POP3Server(
            self.settings, self.accounts, self.session_factory, self.tls_context, self.clock, self.logs
        )
        protocol.factory = self
        return protocol

    def refusal(self, verdict: Verdict) -> bytes:
        """The greeting of a connection over a limit (kms/limits.py): a temporary failure, RFC 3206."""
        return f"-ERR [SYS/TEMP] {REFUSAL_TEXT[verdict]}\r\n".encode()
