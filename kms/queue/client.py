# -*- test-case-name: tests.test_queue_client -*-
"""One delivery attempt: one SMTP connection to one hop for the pending recipients of one message.

`attempt` is what the queue runner calls.  It answers with an `AttemptResult` (a reply per
recipient) or fails with `HostFailure` when the host gave no per-recipient answer, so the runner
can try the next hop.  Twisted's SMTP client is not used: it dot-stuffs per 16 KiB chunk and can
pass a "." line to the next hop (audit S9), and its relay code is Python 2 (audit §4.2).

The conversation (RFC 5321, docs/outbound.md):

* Greeting, EHLO (HELO after a 5xx to EHLO, then no extensions).  A greeting or EHLO that is not
  2xx is a `HostFailure`; so are garbage, over-long replies, a timeout and a lost connection.
* TLS per `TLSPolicy`: STARTTLS then EHLO again; "required" verifies the certificate for
  ``verify_name`` (or the hop's name) with service-identity, "opportunistic" encrypts without
  checking and, when the handshake fails, tries once more on a fresh connection in plaintext;
  "implicit" is TLS from the first byte.  Bytes the server sent behind its 220 to STARTTLS are
  an injection attempt and end the connection.
* AUTH PLAIN (or LOGIN) with the credentials, only over TLS unless the mode is "none".
* MAIL with SIZE, BODY=8BITMIME, SMTPUTF8, RET/ENVID as offered; RCPT with NOTIFY/ORCPT when DSN
  is offered.  With PIPELINING, MAIL, every RCPT and DATA go in one write and the replies are
  matched in order; without, one command at a time.
* The body streams from the queue file through `DotStuffer`, read in the thread pool one chunk at
  a time while the transport wants data (a push producer), so memory stays at one chunk.
* Polite QUIT at the end; the Deferred fires once the connection is closed.

Replies to MAIL and RCPT are per-recipient answers (a 5xx to MAIL bounces every recipient, a
4xx defers them); a 421 anywhere before the end of the data is a `HostFailure`.  The reply to
the end of the data applies to every accepted recipient.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from kms.net import is_ip_address
from kms.queue.interfaces import (
    AttemptResult,
    Hop,
    HostFailure,
    OutboundMessage,
    QueuedRecipient,
    Reply,
    TLSPolicy,
)
from kms.queue.smtpwire import (
    NO_EXTENSIONS,
    DotStuffer,
    Extensions,
    ReplyError,
    ReplyParser,
    Response,
    mail_command,
    needs_smtputf8,
    parse_ehlo,
    rcpt_command,
    safe_path,
)

# Bytes of the body read (and dot-stuffed) at a time.
CHUNK_SIZE = 64 * 1024
TLS_MODES = ("none", "opportunistic", "required", "implicit")


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for each reply (RFC 5321 §4.5.3.2 values by default).

    ``command`` covers EHLO, HELO, STARTTLS (and the handshake after it) and AUTH; ``data_block``
    is how long the server may take no data from us while we send the body; ``quit`` bounds the
    polite end of a connection whose outcome is already known.
    """

    greeting: float = 300.0
    command: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    quit: float = 30.0


DEFAULT_TIMEOUTS = Timeouts()
ContextFactoryFor = Callable[[TLSPolicy, Hop], IOpenSSLClientConnectionCreator]


class _Lost(Exception):
    """The conversation cannot go on: timeout, lost connection, garbage, unexpected reply."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class _TLSFailed(HostFailure):
    """The TLS handshake (after STARTTLS) failed: opportunistic mode retries in plaintext."""


def tls_name(name: str) -> str:
    """The name a certificate must carry: a host name, or the IP of an address literal."""
    inner = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    if inner[:5].upper() == "IPV6:":
        inner = inner[5:]
    return inner.rstrip(".")


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """Opportunistic TLS: encrypted, certificate not checked, the host name sent as SNI."""

    def __init__(self, name: str) -> None:
        self._options = CertificateOptions()
        self._server_name: bytes | None = None
        if name and not is_ip_address(name):
            try:
                self._server_name = name.encode("idna")
            except UnicodeError:
                pass  # no SNI for a name IDNA cannot carry; nothing is verified anyway

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        if self._server_name:
            connection.set_tlsext_host_name(self._server_name)
        return connection


class ClientTLS:
    """Connection creators for outbound TLS; a ``ca_file`` is read once (small, at first use) and kept."""

    def __init__(self) -> None:
        self._roots: dict[Path, Any] = {}  # Path -> IOpenSSLTrustRoot

    def __call__(self, policy: TLSPolicy, hop: Hop) -> IOpenSSLClientConnectionCreator:
        name = tls_name(policy.verify_name or hop.name)
        if policy.mode == "opportunistic":
            return _Unverified(name)
        root = self._root(policy.ca_file, hop) if policy.ca_file else platformTrust()
        try:
            return optionsForClientTLS(name, trustRoot=root)
        except (ValueError, UnicodeError):
            raise HostFailure(hop.describe(), f"TLS: cannot verify a certificate for {name!r}") from None

    def _root(self, path: Path, hop: Hop) -> Any:
        if path not in self._roots:
            try:
                certificates = x509.load_pem_x509_certificates(path.read_bytes())
            except (OSError, ValueError) as error:
                raise HostFailure(hop.describe(), f"TLS: cannot load CA file {path}: {error}") from None
            self._roots[path] = trustRootFromCertificates(
                [Certificate(crypto.X509.from_cryptography(c)) for c in certificates]
            )
        return self._roots[path]


default_tls = ClientTLS()


@dataclass
class _Waiter:
    deferred: Deferred[Response]
    what: str
    timeout: float


class SMTPClientProtocol(Protocol):
    """Replies in, in order, to whoever waits for them; bounded; every problem ends the connection.

    The conversation itself lives in `_converse`; this class only matches replies to waiters,
    runs the reply timeouts, sends the body and closes.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._parser = ReplyParser()
        self._waiting: deque[_Waiter] = deque()
        self._timer: IDelayedCall | None = None
        self._problem: str | None = None
        self._tls_switch = False  # STARTTLS began inside the reply being handed out
        self._body: _BodySender | None = None
        self.tls_active = False
        self.closed: Deferred[None] = Deferred()

    # --- replies ------------------------------------------------------------------------------------

    def expect(self, what: str, timeout: float) -> Deferred[Response]:
        """The next reply not yet claimed; fails with `_Lost` after ``timeout`` seconds of waiting."""
        if self._problem is not None:
            return fail(_Lost(self._problem))
        waiter = _Waiter(Deferred(), what, timeout)
        self._waiting.append(waiter)
        if len(self._waiting) == 1:
            self._arm()
        return waiter.deferred

    def check(self) -> None:
        """Raise `_Lost` if the conversation is already over (before queueing several waiters)."""
        if self._problem is not None:
            raise _Lost(self._problem)

    def command(self, line: bytes, what: str, timeout: float) -> Deferred[Response]:
        reply = self.expect(what, timeout)
        self.send(line)
        return reply

    def send(self, data: bytes) -> None:
        if self._problem is None:
            self.transport.write(data)  # type: ignore[union-attr]

    def _arm(self) -> None:
        waiter = self._waiting[0]
        problem = f"timeout after {waiter.timeout:g}s waiting for the reply to {waiter.what}"
        self._timer = self._reactor.callLater(waiter.timeout, self.stop, problem)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def dataReceived(self, data: bytes) -> None:
        if self._problem is not None:
            return
        try:
            responses = self._parser.feed(data)
        except ReplyError as error:
            self.stop(str(error))
            return
        claimable = len(self._waiting)  # a reply cannot answer a command sent after it arrived
        for index, response in enumerate(responses):
            if index == claimable:
                self.stop(f"unexpected reply: {response}")
                return
            self._disarm()
            waiter = self._waiting.popleft()
            if self._waiting:
                self._arm()
            waiter.deferred.callback(response)
            if self._problem is not None:
                return
            if self._tls_switch:
                self._tls_switch = False
                if index < len(responses) - 1:
                    self.stop("the server sent more after its reply to STARTTLS")
                    return

    # --- TLS, body, end -----------------------------------------------------------------------------

    def start_tls(self, creator: IOpenSSLClientConnectionCreator) -> None:
        """Switch to TLS after the 220 to STARTTLS; plaintext already buffered is injected, not ours."""
        self._tls_switch = True
        if self._parser.buffered:
            self.stop("the server sent more after its reply to STARTTLS")
            return
        self.transport.startTLS(creator)  # type: ignore[union-attr]
        self.tls_active = True

    def send_body(
        self, body: IO[bytes], pool: ThreadPool, chunk_size: int, block_timeout: float
    ) -> Deferred[None]:
        """Stream ``body`` dot-stuffed, then the end marker; fails with `_Lost` if the connection ends."""
        self._body = _BodySender(self, body, pool, chunk_size, block_timeout)
        return Deferred.fromCoroutine(self._body.run())

    def stop(self, problem: str) -> None:
        """End the conversation: the waiting reply (or the body) fails with ``problem``."""
        if self._problem is not None:
            return
        self._problem = problem
        self._disarm()
        if self._body is not None:
            self._body.fail(problem)
        if self._waiting:
            waiter = self._waiting.popleft()
            self._waiting.clear()  # later waiters are never awaited once the first failed
            waiter.deferred.errback(_Lost(problem))
        if self.transport is not None and self.connected:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        what = f" waiting for the reply to {self._waiting[0].what}" if self._waiting else ""
        self.stop(f"connection lost{what}: {reason.getErrorMessage()}")
        self.closed.callback(None)

    async def quit(self, timeout: float) -> None:
        """QUIT when the conversation is still sane, then close; never fails, done when closed."""
        if self._problem is None:
            try:
                await self.command(b"QUIT\r\n", "QUIT", timeout)
            except _Lost:
                pass
        if self._problem is None:
            self.transport.loseConnection()  # type: ignore[union-attr]
            guard = self._reactor.callLater(timeout, self.stop, "closing took too long")
            await self.closed
            if guard.active():
                guard.cancel()
        else:
            await self.closed  # stop() aborted the connection, or it is already gone


@implementer(IPushProducer)
class _BodySender:
    """Reads the body in the pool one chunk at a time while the transport wants more."""

    def __init__(
        self,
        protocol: SMTPClientProtocol,
        body: IO[bytes],
        pool: ThreadPool,
        chunk_size: int,
        block_timeout: float,
    ) -> None:
        self._protocol = protocol
        self._body = body
        self._pool = pool
        self._chunk_size = chunk_size
        self._block_timeout = block_timeout
        self._paused = False
        self._resumed: Deferred[None] | None = None
        self._problem: str | None = None
        self._timer: IDelayedCall | None = None

    def pauseProducing(self) -> None:
        self._paused = True
        if self._timer is None:
            self._timer = self._protocol._reactor.callLater(
                self._block_timeout,
                self._protocol.stop,
                f"timeout after {self._block_timeout:g}s: the server took no data",
            )

    def resumeProducing(self) -> None:
        self._paused = False
        self._cancel_timer()
        if self._resumed is not None:
            resumed, self._resumed = self._resumed, None
            resumed.callback(None)

    def stopProducing(self) -> None:
        self._protocol.stop("connection lost while sending the message")

    def fail(self, problem: str) -> None:
        self._problem = problem
        self._cancel_timer()
        if self._resumed is not None:
            resumed, self._resumed = self._resumed, None
            resumed.errback(_Lost(problem))

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _check(self) -> None:
        if self._problem is not None:
            raise _Lost(self._problem)

    async def run(self) -> None:
        transport: Any = self._protocol.transport
        reactor = self._protocol._reactor
        transport.registerProducer(self, True)
        try:
            stuffer = DotStuffer()
            while True:
                if self._paused:
                    self._resumed = Deferred()
                    await self._resumed
                self._check()
                chunk = await deferToThreadPool(reactor, self._pool, self._body.read, self._chunk_size)
                self._check()
                if not chunk:
                    break
                transport.write(stuffer.feed(chunk))
            transport.write(stuffer.finish())
        finally:
            self._cancel_timer()
            if self._protocol.connected:
                transport.unregisterProducer()


@dataclass(frozen=True)
class _Settings:
    """One attempt's fixed inputs, passed down the conversation in one piece."""

    host: str
    helo: str
    tls: TLSPolicy
    credentials: tuple[str, str] | None
    connect_timeout: float
    timeouts: Timeouts
    context_factory_for: ContextFactoryFor
    pool: ThreadPool
    chunk_size: int


async def _hello(protocol: SMTPClientProtocol, s: _Settings) -> Extensions:
    """EHLO (HELO after a 5xx); the extensions offered.  A 4xx or a failed HELO is a `HostFailure`."""
    reply = await protocol.command(f"EHLO {s.helo}\r\n".encode(), "EHLO", s.timeouts.command)
    if reply.ok:
        return parse_ehlo(reply)
    if not 500 <= reply.code < 600:
        raise _session_failure(s, "EHLO refused", reply)
    reply = await protocol.command(f"HELO {s.helo}\r\n".encode(), "HELO", s.timeouts.command)
    if reply.ok:
        return NO_EXTENSIONS
    raise _session_failure(s, "HELO refused", reply)


async def _starttls(
    protocol: SMTPClientProtocol, hop: Hop, s: _Settings, extensions: Extensions
) -> Extensions:
    """STARTTLS per the policy; the extensions offered afterwards (or the same, in plaintext)."""
    required = s.tls.mode == "required"
    if not extensions.starttls:
        if required:
            raise HostFailure(s.host, "TLS required but the server does not offer STARTTLS")
        return extensions
    reply = await protocol.command(b"STARTTLS\r\n", "STARTTLS", s.timeouts.command)
    if reply.code != 220:
        if required:
            raise HostFailure(s.host, f"TLS required but STARTTLS refused: {reply}", reply.reply())
        return extensions
    protocol.start_tls(s.context_factory_for(s.tls, hop))
    try:
        return await _hello(protocol, s)
    except _Lost as lost:
        raise _TLSFailed(s.host, f"TLS handshake failed: {lost.problem}") from None


async def _authenticate(
    protocol: SMTPClientProtocol, s: _Settings, extensions: Extensions, credentials: tuple[str, str]
) -> None:
    """AUTH PLAIN, else LOGIN; never without TLS unless the policy is "none".  Secrets never logged."""
    user, password = (text.encode("utf-8") for text in credentials)
    if not protocol.tls_active and s.tls.mode != "none":
        raise HostFailure(s.host, "will not send credentials without TLS")
    timeout = s.timeouts.command
    if "PLAIN" in extensions.auth:
        token = base64.b64encode(b"\0" + user + b"\0" + password)
        reply = await protocol.command(b"AUTH PLAIN " + token + b"\r\n", "AUTH", timeout)
    elif "LOGIN" in extensions.auth:
        reply = await protocol.command(b"AUTH LOGIN\r\n", "AUTH", timeout)
        for secret in (user, password):
            if reply.code != 334:
                break
            reply = await protocol.command(base64.b64encode(secret) + b"\r\n", "AUTH", timeout)
    elif extensions.auth:
        raise HostFailure(s.host, f"no AUTH mechanism we can use among {' '.join(sorted(extensions.auth))}")
    else:
        raise HostFailure(s.host, "credentials configured but the server does not offer AUTH")
    if reply.code != 235:
        raise HostFailure(s.host, f"authentication refused: {reply}", reply.reply())


def _check_message(message: OutboundMessage, extensions: Extensions, s: _Settings) -> None:
    """Permanent refusals this host's extensions make certain: SIZE exceeded, SMTPUTF8 missing."""
    if extensions.size and message.size > extensions.size:
        reason = f"5.3.4 message size {message.size} exceeds the server's limit {extensions.size}"
        raise HostFailure(s.host, reason, permanent=True)
    if needs_smtputf8(message) and not extensions.smtputf8:
        envelope = [message.sender] + [r.address for r in message.recipients]
        code = "5.6.7" if not all(address.isascii() for address in envelope) else "5.6.9"
        raise HostFailure(
            s.host, f"{code} the message needs SMTPUTF8 and the server does not offer it", permanent=True
        )


def _session_failure(s: _Settings, what: str, response: Response) -> HostFailure:
    return HostFailure(s.host, f"{what}: {response}", response.reply())


async def _transaction(
    protocol: SMTPClientProtocol,
    message: OutboundMessage,
    recipients: Sequence[QueuedRecipient],
    body: IO[bytes],
    extensions: Extensions,
    s: _Settings,
) -> dict[str, Reply]:
    """MAIL, RCPT..., DATA and the body; a reply per recipient."""
    t = s.timeouts
    mail = mail_command(message, extensions)
    rcpts = [rcpt_command(r, extensions) for r in recipients]
    if extensions.pipelining:
        protocol.check()  # then only the first waiter can fail; the others are dropped with it
        pending = [protocol.expect("MAIL", t.mail)]
        pending += [protocol.expect("RCPT", t.rcpt) for _ in rcpts]
        pending.append(protocol.expect("DATA", t.data_init))
        protocol.send(b"".join([mail, *rcpts, b"DATA\r\n"]))
        mail_reply = await pending[0]
        rcpt_replies = [await d for d in pending[1:-1]]
        data_reply: Response | None = await pending[-1]
    else:
        mail_reply = await protocol.command(mail, "MAIL", t.mail)
        rcpt_replies = []
        data_reply = None
        if mail_reply.ok:
            for line in rcpts:
                rcpt_replies.append(await protocol.command(line, "RCPT", t.rcpt))
            if any(r.ok for r in rcpt_replies):
                data_reply = await protocol.command(b"DATA\r\n", "DATA", t.data_init)
    for what, response in [("MAIL", mail_reply), *(("RCPT", r) for r in rcpt_replies), ("DATA", data_reply)]:
        if response is not None and response.code == 421:
            raise _session_failure(s, f"server closing at {what}", response)
    if not mail_reply.ok:
        await _abandon(protocol, data_reply, t)
        return {r.address: mail_reply.reply() for r in recipients}
    replies = {r.address: response.reply() for r, response in zip(recipients, rcpt_replies, strict=True)}
    accepted = [r.address for r, response in zip(recipients, rcpt_replies, strict=True) if response.ok]
    if not accepted:
        await _abandon(protocol, data_reply, t)
        return replies
    assert data_reply is not None
    if data_reply.code != 354:
        final = data_reply
    else:
        await protocol.send_body(body, s.pool, s.chunk_size, t.data_block)
        final = await protocol.expect("end of data", t.data_end)
    for address in accepted:
        replies[address] = final.reply()
    return replies


async def _abandon(protocol: SMTPClientProtocol, data_reply: Response | None, t: Timeouts) -> None:
    """A server that said 354 although nothing was accepted gets an empty body (RFC 2920 §3.1)."""
    if data_reply is not None and data_reply.code == 354:
        try:
            await protocol.command(b".\r\n", "end of data", t.data_end)
        except _Lost:
            pass


async def _converse(
    protocol: SMTPClientProtocol,
    hop: Hop,
    message: OutboundMessage,
    recipients: Sequence[QueuedRecipient],
    body: IO[bytes],
    s: _Settings,
    starttls: bool,
) -> tuple[dict[str, Reply], bool]:
    """The replies, and whether the host offered DSN (so NOTIFY went on with the recipients)."""
    try:
        greeting = await protocol.expect("greeting", s.timeouts.greeting)
    except _Lost as lost:
        if s.tls.mode == "implicit":
            raise HostFailure(s.host, f"TLS handshake failed or no greeting: {lost.problem}") from None
        raise
    if greeting.code != 220:
        raise _session_failure(s, "greeting", greeting)
    extensions = await _hello(protocol, s)
    if starttls:
        extensions = await _starttls(protocol, hop, s, extensions)
    if s.credentials is not None:
        await _authenticate(protocol, s, extensions, s.credentials)
    _check_message(message, extensions, s)
    replies = await _transaction(protocol, message, recipients, body, extensions, s)
    return replies, "DSN" in extensions.keywords


async def _session(
    reactor: Any,
    hop: Hop,
    message: OutboundMessage,
    recipients: Sequence[QueuedRecipient],
    body: IO[bytes],
    s: _Settings,
    starttls: bool,
) -> tuple[dict[str, Reply], bool]:
    """One connection: connect, converse, QUIT; the connection is closed when this returns."""
    endpoint_class = TCP6ClientEndpoint if ":" in hop.address else TCP4ClientEndpoint
    endpoint: Any = endpoint_class(reactor, hop.address, hop.port, timeout=s.connect_timeout)
    if s.tls.mode == "implicit":
        endpoint = wrapClientTLS(s.context_factory_for(s.tls, hop), endpoint, clock=reactor)
    try:
        protocol = await endpoint.connect(Factory.forProtocol(partial(SMTPClientProtocol, reactor)))
    except Exception as error:
        raise HostFailure(s.host, f"cannot connect: {error}") from None
    if s.tls.mode == "implicit":
        protocol.tls_active = True
    try:
        return await _converse(protocol, hop, message, recipients, body, s, starttls)
    except _Lost as lost:
        raise HostFailure(s.host, lost.problem) from None
    except HostFailure:
        raise
    except BaseException:
        protocol.stop("local error")  # e.g. the body file unreadable mid-DATA: no QUIT into the data
        raise
    finally:
        await protocol.quit(s.timeouts.quit)


def _refused_locally(message: OutboundMessage) -> tuple[list[QueuedRecipient], dict[str, Reply]]:
    """The recipients to send (each address once) and answers for addresses no command may carry."""
    if not safe_path(message.sender):
        bad = Reply(553, "5.1.7", "sender address contains control characters")
        return [], {r.address: bad for r in message.recipients}
    send: dict[str, QueuedRecipient] = {}
    refused: dict[str, Reply] = {}
    for r in message.recipients:
        if not safe_path(r.address):
            refused[r.address] = Reply(553, "5.1.3", "recipient address contains control characters")
        else:
            send.setdefault(r.address, r)
    return list(send.values()), refused


async def _attempt(reactor: Any, hop: Hop, message: OutboundMessage, s: _Settings) -> AttemptResult:
    recipients, replies = _refused_locally(message)
    if not recipients:
        return AttemptResult(s.host, replies)
    body = await deferToThreadPool(reactor, s.pool, open, message.body_path, "rb")
    try:
        starttls = s.tls.mode in ("opportunistic", "required")
        try:
            got, dsn = await _session(reactor, hop, message, recipients, body, s, starttls)
        except _TLSFailed:
            if s.tls.mode != "opportunistic":
                raise
            got, dsn = await _session(reactor, hop, message, recipients, body, s, starttls=False)
    finally:
        body.close()
    replies.update(got)
    return AttemptResult(s.host, replies, dsn=dsn)


def attempt(
    reactor: Any,
    hop: Hop,
    message: OutboundMessage,
    *,
    helo: str,
    tls: TLSPolicy,
    credentials: tuple[str, str] | None,
    timeout: float,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    context_factory_for: ContextFactoryFor = default_tls,
    pool: ThreadPool | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> Deferred[AttemptResult]:
    """Deliver ``message`` to the recipients it lists through one connection to ``hop``.

    ``timeout`` bounds the TCP connect; ``timeouts`` each reply.  The body file is read in ``pool``
    (the reactor's pool by default).  Fails with `HostFailure` when the host gave no answer per
    recipient; with OSError when the body file cannot be opened (a local problem, no connection made).
    ValueError for a TLS mode this client does not know (never silently plaintext).
    """
    if tls.mode not in TLS_MODES:
        raise ValueError(f"unknown TLS mode {tls.mode!r}; expected one of {', '.join(TLS_MODES)}")
    settings = _Settings(
        host=hop.describe(),
        helo=helo,
        tls=tls,
        credentials=credentials,
        connect_timeout=timeout,
        timeouts=timeouts,
        context_factory_for=context_factory_for,
        pool=pool if pool is not None else reactor.getThreadPool(),
        chunk_size=chunk_size,
    )
    return Deferred.fromCoroutine(_attempt(reactor, hop, message, settings))
