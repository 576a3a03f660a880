# -*- test-case-name: tests.test_smtp_server -*-
"""Our ESMTP server protocol (RFC 5321) with PIPELINING, SIZE, 8BITMIME, SMTPUTF8, DSN, STARTTLS, AUTH.

Twisted's own SMTP server is not usable (audit §1.3, bugs S1–S10), so this protocol does its own
buffering on a plain `Protocol`:

* One command at a time.  While a command waits for the backend or the login session, or while
  the client does not read its replies (the protocol is its transport's streaming producer),
  further commands are only buffered (and reading paused once the backlog passes
  `BACKLOG_LIMIT`), so pipelined replies always come out in order (S6) and what the server holds
  for a client stays bounded.
* Memory is bounded whatever the client sends: an over-long command line is refused and the rest
  of it dropped as it arrives (S5); DATA streams through `DataReader` straight into the spool and
  never returns to command mode before the end marker, whatever its line lengths (S4).
* Bytes pipelined after STARTTLS are thrown away and the session starts afresh (S3).
* Every AUTH input, however broken, gets a reply, never a dropped connection (S1, S2).

Which replies count toward ``max_errors``: every 5xx, whoever decided it (syntax, sequence,
unknown commands, failed logins, refused recipients).  4xx replies do not: they say "later", and a
client that sends more recipients than ``max_recipients`` is not misbehaving.

Timers run only while we wait for the client: while the backend or the login session has the
turn, the client cannot be blamed for silence, and the backend bounds its own work.
"""

from __future__ import annotations

from collections.abc import Callable
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
from kms.auth.sasl import Authenticated, Challenge, decode_response, encode_challenge
from kms.clientinfo import ClientInfo
from kms.limits import REFUSAL_TEXT, SERVER_FULL, Verdict
from kms.lines import TOO_LONG, LineReader
from kms.net import set_tcp_nodelay, write_now
from kms.smtp.commands import DataReader, parse_command, parse_helo, parse_mail, parse_rcpt
from kms.smtp.interfaces import Envelope, MailBackend, Refusal, Spool

# Pending input beyond this while a command waits: stop reading from the socket.
BACKLOG_LIMIT = 64 * 1024

_log = Logger()


def _too_big() -> Refusal:
    """A fresh one each time: a raised exception instance keeps its traceback."""
    return Refusal(552, "5.3.4", "Message size exceeds fixed maximum message size")


@dataclass(frozen=True)
class SMTPSettings:
    """What one listener's SMTP service looks like; built once from the config."""

    hostname: str
    listener: str  # "smtp", "submission" or "smtps"
    banner: str  # after the host name in the 220 greeting, e.g. "ESMTP"
    implicit_tls: bool  # smtps: the transport is TLS from the first byte
    require_auth: bool  # submission/smtps: no MAIL before AUTH
    max_message_size: int
    max_recipients: int
    max_errors: int = 10
    command_timeout: float = 300
    data_timeout: float = 600
    max_command_line: int = 12288  # RFC 4954 §4: AUTH lines need this much
    ehlo_greeting: str = ""  # after the host name on EHLO's first line: "kms <version>" unless hidden


class SASLExchange(TypingProtocol):
    """One SASL exchange in progress (`kms.auth.sasl.ISASLMechanism`)."""

    def step(self, response: bytes | None) -> Deferred[Challenge | Authenticated]: ...


class LoginSession(TypingProtocol):
    """The per-connection login session (`kms.auth.session.LoginSession`)."""

    def mechanisms(self) -> list[str]: ...

    def begin(self, name: str) -> SASLExchange: ...

    def logout(self) -> None: ...


class SMTPLogs(TypingProtocol):
    """The part of `kms.logs.Logs` this protocol writes to."""

    def debug(
        self, category: str, event: str, client: ClientInfo | None = None, **fields: object
    ) -> None: ...

    def error(self, event: str, client: ClientInfo | None = None, **fields: object) -> None: ...


@dataclass
class _Transaction:
    """From an accepted MAIL to the end of DATA (or RSET)."""

    sender: str
    params: dict[str, str | None]
    recipients: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    rcpt_params: list[dict[str, str | None]] = field(default_factory=list)


def _sanitize(text: str) -> str:
    """Reply text may come from a backend quoting client input: no line breaks or controls."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else " " for char in text)


@dataclass
class _DataPhase:
    """Between 354 and the end marker: where the body goes and whether it is still wanted."""

    tx: _Transaction
    spool: Spool
    reader: DataReader = field(default_factory=DataReader)
    size: int = 0
    problem: Refusal | None = None  # set once the body is refused; the spool is then discarded


@implementer(IPushProducer)
class SMTPServer(Protocol):
    """One SMTP connection: bytes in, calls on the backend and login session out, replies back.

    The input mode is the state: ``_data`` set means DATA, ``_sasl`` set means the next line
    answers a 334 challenge, neither means commands.
    """

    client: ClientInfo
    _session: LoginSession

    def __init__(
        self,
        settings: SMTPSettings,
        backend: MailBackend,
        session_factory: Callable[[ClientInfo], LoginSession],
        tls_context: object | None,
        clock: IReactorTime,
        logs: SMTPLogs | None = None,
    ) -> None:
        self.settings = settings
        self._backend = backend
        self._session_factory = session_factory
        self._tls_context = tls_context
        self._clock = clock
        self._logs = logs
        self._helo: str | None = None
        self._extended = False
        self._tx: _Transaction | None = None
        self._data: _DataPhase | None = None
        self._sasl: SASLExchange | None = None
        self._inbox = bytearray()
        self._lines = LineReader(settings.max_command_line)
        self._waiting = False  # a command's Deferred has the turn
        self._pumping = False
        self._paused = False
        self._output_paused = False  # the transport's write buffer is full
        self._closing = False  # the last reply is queued: no more input is read
        self._gone = False  # the transport is closed: nothing more is written
        self._out: list[bytes] = []
        self._errors = 0
        self._timer: IDelayedCall | None = None
        self._handlers: dict[str, Callable[[str], Deferred[None] | None]] = {
            "EHLO": self._do_EHLO,
            "HELO": self._do_HELO,
            "MAIL": self._do_MAIL,
            "RCPT": self._do_RCPT,
            "DATA": self._do_DATA,
            "RSET": self._do_RSET,
            "NOOP": self._do_NOOP,
            "QUIT": self._do_QUIT,
            "VRFY": self._do_VRFY,
            "EXPN": self._do_EXPN,
            "HELP": self._do_HELP,
            "STARTTLS": self._do_STARTTLS,
            "AUTH": self._do_AUTH,
            "BDAT": self._do_BDAT,
        }

    # --- Twisted's side ---------------------------------------------------------------------------

    def connectionMade(self) -> None:
        settings = self.settings
        self.client = ClientInfo.from_transport(self.transport, settings.listener, settings.implicit_tls)
        self._session = self._session_factory(self.client)
        set_tcp_nodelay(self.transport)
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self._debug("connect")
        self._line(f"220 {settings.hostname} {settings.banner}".rstrip())
        self._arm_timer()
        self._flush()

    def dataReceived(self, data: bytes) -> None:
        self._pump(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = self._closing = True
        self._arm_timer()
        self._inbox.clear()
        if self._data is not None:
            self._drop_body(self._data)  # a message cut off mid-DATA leaves nothing behind
            self._data = None
        self._session.logout()
        self._debug("disconnect", errors=self._errors)

    # IPushProducer: the transport's write buffer is full (or drained again).

    def pauseProducing(self) -> None:
        self._output_paused = True

    def resumeProducing(self) -> None:
        self._output_paused = False
        if not self._waiting:
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
                if data and self._data is not None and not self._waiting and not self._inbox:
                    data = self._feed_data(self._data, data)  # the common case: no copy into the inbox
                self._inbox += data
                # A message's data goes on while replies wait to be read: it makes none of its own.
                while self._inbox and not (self._waiting or self._closing):
                    if (self._output_paused and self._data is None) or not self._step():
                        break
        except Exception:
            # Somewhere between states: nothing sensible can follow.
            self._internal_error("smtp-internal-error", Failure())
            self._shutdown(421, "4.3.0", f"{self.settings.hostname} Error: internal error")
        finally:
            self._pumping = False
        self._backpressure()
        self._arm_timer()
        self._flush()

    def _step(self) -> bool:
        """Consume one unit of input (a DATA chunk, a dropped piece, one line); False: need more."""
        inbox = self._inbox
        if self._data is not None:
            chunk = bytes(inbox)
            inbox.clear()
            inbox += self._feed_data(self._data, chunk)
            return True
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
        self._reply(500, "5.5.2", "Line too long")

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

    def _reply(self, code: int, enhanced: str, text: str) -> None:
        """Queue one reply; every 5xx counts toward ``max_errors``."""
        if self._closing:
            return
        self._line(f"{code} {enhanced} {_sanitize(text)}")
        if code >= 500:
            self._errors += 1
            if self._errors > self.settings.max_errors:
                self._debug("too-many-errors", errors=self._errors)
                self._shutdown(421, "4.7.0", f"{self.settings.hostname} Too many errors")

    def _refused(self, refusal: Refusal) -> None:
        self._reply(refusal.code, refusal.enhanced, refusal.text)

    def _shutdown(self, code: int, enhanced: str, text: str) -> None:
        """Queue a last reply; the connection closes once it is written."""
        if not self._closing:
            self._line(f"{code} {enhanced} {text}")
            self._closing = True

    def _flush(self) -> None:
        if self._gone:
            return
        if self._out:
            data, self._out = b"".join(self._out), []
            write_now(self.transport, data)
        if self._closing:
            self._gone = True
            # A registered producer would hold the close back until it unregisters (Twisted).
            self.transport.unregisterProducer()  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]

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
        """A bug or a broken backend: the error log gets a line, twistd's log the traceback."""
        if self._logs is not None:
            kind = type(failure.value).__name__
            self._logs.error(event, self.client, error=failure.getErrorMessage(), type=kind)
        _log.failure("SMTP {event} for {client}", failure, event=event, client=self.client.describe())

    def _internal_error_reply(self, failure: Failure) -> None:
        self._internal_error("smtp-internal-error", failure)
        self._reply(451, "4.3.0", "Local error in processing")

    # --- timers -----------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        """Restart the client's clock (``data_timeout`` in DATA), or stop it while it is not its turn."""
        if self._closing or self._waiting:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            return
        timeout = self.settings.data_timeout if self._data is not None else self.settings.command_timeout
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self._clock.callLater(timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self._debug("timeout", in_data=self._data is not None)
        self._shutdown(421, "4.4.2", f"{self.settings.hostname} Error: timeout exceeded")
        self._flush()

    # --- commands ---------------------------------------------------------------------------------

    def _dispatch(self, line: bytes) -> None:
        try:
            verb, argument = parse_command(line)
        except Refusal as refusal:
            self._refused(refusal)
            return
        # Never log SASL data: of AUTH only the mechanism name.
        self._debug("command", verb=verb, argument=argument.partition(" ")[0] if verb == "AUTH" else argument)
        handler = self._handlers.get(verb)
        if handler is None:
            self._reply(500, "5.5.2", "Command unrecognized")
            return
        try:
            d = handler(argument)
        except Refusal as refusal:
            self._refused(refusal)
        except Exception:
            self._internal_error_reply(Failure())
        else:
            if d is not None:
                self._wait(d)

    def _greet(self, verb: str, argument: str, extended: bool) -> None:
        self._helo = parse_helo(verb, argument)
        self._extended = extended
        self._tx = None

    def _do_HELO(self, argument: str) -> None:
        self._greet("HELO", argument, extended=False)
        self._line(f"250 {self.settings.hostname}")

    def _do_EHLO(self, argument: str) -> None:
        self._greet("EHLO", argument, extended=True)
        lines = [
            f"{self.settings.hostname} {self.settings.ehlo_greeting}".rstrip(),
            "PIPELINING",
            f"SIZE {self.settings.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "DSN",
            "ENHANCEDSTATUSCODES",
        ]
        if self._tls_context is not None and not self.client.tls:
            lines.append("STARTTLS")
        mechanisms = self._session.mechanisms()
        if mechanisms:
            lines.append("AUTH " + " ".join(mechanisms))
        for text in lines[:-1]:
            self._line(f"250-{text}")
        self._line(f"250 {lines[-1]}")

    def _do_MAIL(self, argument: str) -> Deferred[None]:
        if self._helo is None:
            raise Refusal(503, "5.5.1", "Error: send HELO/EHLO first")
        if self._tx is not None:
            raise Refusal(503, "5.5.1", "Error: nested MAIL command")
        if self.settings.require_auth and self.client.identity is None:
            raise Refusal(530, "5.7.0", "Authentication required")
        command = parse_mail(argument, extended=self._extended)
        size = command.params.get("SIZE")
        if size is not None and int(size) > self.settings.max_message_size:
            raise _too_big()
        params = dict(command.params)

        def accepted(_: object) -> None:
            self._tx = _Transaction(command.sender, params)
            self._reply(250, "2.1.0", "Ok")

        d = maybeDeferred(self._backend.check_sender, self.client, command.sender, params)
        return d.addCallbacks(accepted, self._backend_refused)

    def _do_RCPT(self, argument: str) -> Deferred[None]:
        tx = self._tx
        if tx is None:
            raise Refusal(503, "5.5.1", "Error: need MAIL command")
        command = parse_rcpt(argument, extended=self._extended, utf8="SMTPUTF8" in tx.params)
        if len(tx.recipients) >= self.settings.max_recipients:
            raise Refusal(452, "4.5.3", "Too many recipients")

        def accepted(route: str) -> None:
            tx.recipients.append(command.recipient)
            tx.routes.append(route)
            tx.rcpt_params.append(dict(command.params))
            self._reply(250, "2.1.5", "Ok")

        d = maybeDeferred(self._backend.check_recipient, self.client, tx.sender, command.recipient)
        return d.addCallbacks(accepted, self._backend_refused)

    def _backend_refused(self, failure: Failure) -> None:
        """A Refusal is the backend's answer; anything else is our problem, not the client's."""
        if isinstance(failure.value, Refusal):
            self._refused(failure.value)
        else:
            self._internal_error_reply(failure)

    def _do_DATA(self, argument: str) -> None:
        if argument:
            raise Refusal(501, "5.5.4", "Syntax: DATA")
        if self._tx is None:
            raise Refusal(503, "5.5.1", "Error: need MAIL command")
        if not self._tx.recipients:
            raise Refusal(554, "5.5.1", "No valid recipients")
        self._data = _DataPhase(self._tx, self._backend.new_spool())
        self._line("354 End data with <CR><LF>.<CR><LF>")

    def _feed_data(self, phase: _DataPhase, chunk: bytes) -> bytes:
        """Pass DATA bytes through the reader into the spool; returns what follows the end marker."""
        body, done, leftover = phase.reader.feed(chunk)
        if body and phase.problem is None:
            # Counted as sent (CRLF line ends): the form SIZE declares and clients measure.
            phase.size += len(body) + body.count(b"\n")
            if phase.size > self.settings.max_message_size:
                self._drop_body(phase, _too_big())
            else:
                try:
                    phase.spool.write(body)
                except Exception:
                    self._internal_error("smtp-spool-error", Failure())
                    self._drop_body(phase, Refusal(451, "4.3.0", "Local error in processing"))
        if done:
            self._data = None
            self._end_of_data(phase)
            return leftover
        return b""

    def _drop_body(self, phase: _DataPhase, problem: Refusal | None = None) -> None:
        """Discard the spool (once); DATA goes on to the end marker and then ``problem`` is the reply."""
        if phase.problem is None:
            phase.problem = problem or Refusal(451, "4.3.0", "Connection lost")
            try:
                phase.spool.discard()
            except Exception:
                self._internal_error("smtp-spool-error", Failure())

    def _end_of_data(self, phase: _DataPhase) -> None:
        self._tx = None  # whatever the outcome, the next message starts with MAIL
        if phase.problem is not None:
            self._debug("data-refused", size=phase.size, code=phase.problem.code)
            self._refused(phase.problem)
            return
        tx = phase.tx
        envelope = Envelope(
            client=self.client,
            helo=self._helo or "",
            protocol=self._protocol_name(),
            sender=tx.sender,
            recipients=tuple(tx.recipients),
            routes=tuple(tx.routes),
            mail_params=tx.params,
            rcpt_params=tuple(tx.rcpt_params),
        )

        def queued(queue_id: str) -> None:
            self._reply(250, "2.0.0", f"Ok: queued as {queue_id}")

        d = maybeDeferred(self._backend.deliver, envelope, phase.spool)
        self._wait(d.addCallbacks(queued, self._backend_refused))

    def _protocol_name(self) -> str:
        """RFC 3848 "with" keyword: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA."""
        if not self._extended:
            return "SMTP"
        return "ESMTP" + ("S" if self.client.tls else "") + ("A" if self.client.identity else "")

    def _do_RSET(self, argument: str) -> None:
        if argument:
            raise Refusal(501, "5.5.4", "Syntax: RSET")
        self._tx = None
        self._reply(250, "2.0.0", "Ok")

    def _do_NOOP(self, argument: str) -> None:
        self._reply(250, "2.0.0", "Ok")

    def _do_QUIT(self, argument: str) -> None:
        self._shutdown(221, "2.0.0", "Bye")

    def _do_VRFY(self, argument: str) -> None:
        if not argument:
            raise Refusal(501, "5.5.4", "Syntax: VRFY address")
        self._reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def _do_EXPN(self, argument: str) -> None:
        self._reply(502, "5.5.1", "EXPN not available")

    def _do_BDAT(self, argument: str) -> None:
        self._reply(502, "5.5.1", "BDAT not available: CHUNKING is not offered")

    def _do_HELP(self, argument: str) -> None:
        self._reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY STARTTLS AUTH")

    # --- STARTTLS (RFC 3207) ----------------------------------------------------------------------

    def _do_STARTTLS(self, argument: str) -> None:
        if argument:
            raise Refusal(501, "5.5.4", "Syntax: STARTTLS")
        if self.client.tls:
            raise Refusal(503, "5.5.1", "Error: TLS already active")
        if self._tls_context is None:
            raise Refusal(454, "4.7.0", "TLS not available")
        self._reply(220, "2.0.0", "Ready to start TLS")
        # Anything pipelined after STARTTLS was sent in clear text: it must not be obeyed as if it
        # had arrived over TLS (CVE-2011-0411, audit S3).
        self._inbox.clear()
        self._flush()
        self.transport.startTLS(self._tls_context)  # type: ignore[union-attr]
        self._debug("starttls")
        # RFC 3207 §4.2: forget everything learnt from the client before TLS.
        self.client.tls = True
        self._helo, self._extended, self._tx = None, False, None
        self._session.logout()
        self.client.identity = None
        self._session = self._session_factory(self.client)

    # --- AUTH (RFC 4954) --------------------------------------------------------------------------

    def _do_AUTH(self, argument: str) -> Deferred[None] | None:
        if not self._extended:
            raise Refusal(503, "5.5.1", "Error: send EHLO first")
        if self.client.identity is not None:
            raise Refusal(503, "5.5.1", "Already authenticated")
        if self._tx is not None:
            raise Refusal(503, "5.5.1", "Error: MAIL transaction in progress")
        words = argument.split(" ")
        if not argument or len(words) > 2:
            raise Refusal(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        try:
            exchange = self._session.begin(words[0])
        except EncryptionRequired:
            if self._tls_context is None:
                # This connection can never be encrypted, so 538 would point to a dead end; 534
                # tells the client to retry with another mechanism (RFC 4954 §6).
                raise Refusal(534, "5.7.9", "Authentication mechanism is too weak") from None
            text = "Encryption required for requested authentication mechanism"
            raise Refusal(538, "5.7.11", text) from None
        except MechanismUnavailable:
            raise Refusal(504, "5.5.4", "Unrecognized authentication mechanism") from None
        if len(words) == 1:
            return self._auth_step(exchange, None)
        initial = self._decode_sasl(words[1].encode("ascii", "replace"))
        return None if initial is None else self._auth_step(exchange, initial)

    def _auth_response(self, exchange: SASLExchange, line: bytes) -> None:
        """The client's line after a 334: the next step, or the end of the exchange."""
        self._sasl = None
        data = self._decode_sasl(line)
        if data is not None:
            self._wait(self._auth_step(exchange, data))

    def _decode_sasl(self, line: bytes) -> bytes | None:
        """The client's SASL data, or None after replying to a cancel or undecodable data."""
        try:
            data = decode_response(line)
        except MalformedResponse:
            self._reply(501, "5.5.2", "Cannot decode response")
            return None
        if data is None:
            self._reply(501, "5.0.0", "Authentication cancelled")
        return data

    def _auth_step(self, exchange: SASLExchange, data: bytes | None) -> Deferred[None]:
        def answered(result: Challenge | Authenticated) -> None:
            if isinstance(result, Challenge):
                self._sasl = exchange
                self._out.append(b"334 " + encode_challenge(result.data) + b"\r\n")
            else:
                self.client.identity = result.identity
                self._reply(235, "2.7.0", "Authentication successful")

        def failed(failure: Failure) -> None:
            if failure.check(AuthenticationFailed):
                self._reply(535, "5.7.8", "Authentication credentials invalid")
            elif failure.check(MalformedResponse):
                self._reply(501, "5.5.2", "Cannot decode response")
            else:
                # Never "wrong password" for what may be an outage or a bug (STYLE: rejected vs broken).
                if not failure.check(TemporaryAuthFailure):
                    self._internal_error("smtp-auth-error", failure)
                self._reply(454, "4.7.0", "Temporary authentication failure")

        d: Deferred[Any] = maybeDeferred(exchange.step, data)
        return d.addCallbacks(answered, failed)

    # --- logging ----------------------------------------------------------------------------------

    def _debug(self, event: str, **fields: object) -> None:
        if self._logs is not None:
            self._logs.debug("smtp", event, self.client, **fields)


class SMTPFactory(Factory):
    """Builds `SMTPServer` for one listener; everything it needs is injected here."""

    noisy = False

    def __init__(
        self,
        settings: SMTPSettings,
        backend: MailBackend,
        session_factory: Callable[[ClientInfo], LoginSession],
        tls_context: object | None,
        clock: IReactorTime | None = None,
        logs: SMTPLogs | None = None,
    ) -> None:
        """``tls_context`` (an ``IOpenSSLServerConnectionCreator``) enables STARTTLS; None: no STARTTLS."""
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.settings = settings
        self.backend = backend
        self.session_factory = session_factory
        self.tls_context = tls_context
        self.clock: IReactorTime = clock  # type: ignore[assignment]
        self.logs = logs

    def buildProtocol(self, addr: object) -> SMTPServer:
        protocol = SMTPServer(
            self.settings, self.backend, self.session_factory, self.tls_context, self.clock, self.logs
        )
        protocol.factory = self
        return protocol

    def refusal(self, verdict: Verdict) -> bytes:
        """The greeting of a connection over a limit (kms/limits.py); 4.3.2 as Postfix's "ports busy"."""
        code = "4.3.2" if verdict == SERVER_FULL else "4.7.0"
        return f"421 {code} {self.settings.hostname} {REFUSAL_TEXT[verdict]}\r\n".encode()
