"""Connection limits on every listener: overall and per client address (``[limits]``).

One client opening thousands of connections must not starve everyone else, so every listener's
factory is wrapped in a `LimitedFactory` that asks the server's one `ConnectionCounter` before it
builds the real protocol.  Over a limit the client gets one refusal line, written by the protocol's
own factory (``refusal(verdict)``: SMTP 421, IMAP ``* BYE [UNAVAILABLE]``, POP3 ``-ERR [SYS/TEMP]``),
and the connection closes; no session, login state or timer of the real protocol is ever made.

The wrapper sits *inside* the implicit-TLS wrapper (``TLSMemoryBIOFactory(LimitedFactory(...))``):
TLS builds exactly one inner protocol per TCP connection and tells it exactly once that the
connection is gone, so a slot is held from accept to close, also while a handshake never
completes (the real protocol's idle timeout closes such a connection).  The refusal line then goes
out inside TLS, where the client can read it.

The counter and the log gate are pure (no clock, no I/O); the wrappers only hand them addresses.
"""

from __future__ import annotations

import ipaddress
import resource
from collections.abc import Callable
from typing import Final, Literal
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from kms.clientinfo import ClientInfo

Verdict = Literal["ok", "too many from this address", "server full"]
OK: Final = "ok"
TOO_MANY_FROM_ADDRESS: Final = "too many from this address"
SERVER_FULL: Final = "server full"

# The human part of every protocol's refusal line.
REFUSAL_TEXT: Final[dict[str, str]] = {
    TOO_MANY_FROM_ADDRESS: "Too many connections from your address, try again later",
    SERVER_FULL: "Too many connections, server busy, try again later",
}

REFUSAL_DEADLINE = 30.0  # a refused client that never reads (or never finishes TLS) is cut off then
LOG_INTERVAL = 60.0  # at most one security.log line per address per minute
LOG_TABLE_SIZE = 4096  # addresses remembered by the log gate; beyond that they share one entry
DESCRIPTOR_MARGIN = 256  # open files beside client sockets: logs, listeners, SQLite, maildir, helpers


def raise_descriptor_limit(max_connections: int) -> str | None:
    """Raise this process's soft open-file limit to what ``max_connections`` needs (up to the hard limit).

    With the usual soft limit of 1024, accept() fails with EMFILE long before 2000 connections, for
    every client and without the refusal line.  Returns a warning when the hard limit is too low.
    """
    wanted = max_connections + DESCRIPTOR_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinity = resource.RLIM_INFINITY
    if soft != infinity and soft < wanted:
        soft = wanted if hard == infinity else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != infinity and soft < wanted:
        return (
            f"limits.max_connections = {max_connections} needs about {wanted} open files, but this "
            f"process may open only {soft} (raise LimitNOFILE / ulimit -n, or lower max_connections)"
        )
    return None


def address_key(host: str) -> str | None:
    """The per-address counting key: IPv4-mapped IPv6 as plain IPv4, zone ids dropped.

    None for what is not an IP address (a UNIX socket's peer): counted overall only.
    """
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class ConnectionCounter:
    """Open connections overall and per address; decides whether one more may come in.

    ``exempt(address)`` (an IP group's ``contains``) lifts the per-address limit, never the overall
    one.  Every ``acquire`` that returned ``"ok"`` must be matched by exactly one ``release``.
    """

    def __init__(self, max_total: int, max_per_address: int, exempt: Callable[[str], bool]) -> None:
        if max_total < 1 or max_per_address < 1:
            raise ValueError("connection limits must be at least 1")
        self.max_total = max_total
        self.max_per_address = max_per_address
        self._exempt = exempt
        self._total = 0
        self._per_address: dict[str, int] = {}

    @property
    def total(self) -> int:
        return self._total

    def count(self, host: str) -> int:
        """Open connections from ``host`` (in any spelling of the address)."""
        key = address_key(host)
        return self._per_address.get(key, 0) if key is not None else 0

    def acquire(self, host: str) -> Verdict:
        """Take a slot for a new connection from ``host``, or say which limit refuses it."""
        if self._total >= self.max_total:
            return SERVER_FULL
        key = address_key(host)
        if key is not None:
            held = self._per_address.get(key, 0)
            if held >= self.max_per_address and not self._exempt(key):
                return TOO_MANY_FROM_ADDRESS
            self._per_address[key] = held + 1
        self._total += 1
        return OK

    def release(self, host: str) -> None:
        """Give back the slot of a closed connection; ValueError if ``host`` holds none (a bug)."""
        key = address_key(host)
        if self._total == 0 or (key is not None and key not in self._per_address):
            raise ValueError(f"release without acquire for {host!r}")
        if key is not None:
            held = self._per_address[key] - 1
            if held:
                self._per_address[key] = held
            else:
                del self._per_address[key]  # the table holds only addresses with open connections
        self._total -= 1


class LogGate:
    """At most one log line per key per ``interval``; counts what it held back in between.

    The table is bounded: when it is full of keys seen within the interval, new keys share one
    entry, so a flood from many addresses costs neither memory nor more than a line a minute each.
    """

    SHARED = "*"

    def __init__(self, interval: float = LOG_INTERVAL, size: int = LOG_TABLE_SIZE) -> None:
        self._interval = interval
        self._size = size
        self._last: dict[str, tuple[float, int]] = {}  # key -> (when last logged, held back since)

    def admit(self, key: str, now: float) -> int | None:
        """None: don't log this one.  A number: log it, saying that many were held back before."""
        entry = self._last.get(key)
        if entry is None and len(self._last) >= self._size:
            self._forget(now)
            if len(self._last) >= self._size:
                key = self.SHARED
                entry = self._last.get(key)
        if entry is not None and now - entry[0] < self._interval:
            self._last[key] = (entry[0], entry[1] + 1)
            return None
        self._last[key] = (now, 0)
        return entry[1] if entry is not None else 0

    def _forget(self, now: float) -> None:
        for key in [k for k, (when, _) in self._last.items() if now - when >= self._interval]:
            del self._last[key]


class RefusingFactory(TypingProtocol):
    """A protocol factory that can say, in its own protocol, that a connection is over a limit."""

    def buildProtocol(self, addr: object) -> Protocol | None: ...

    def refusal(self, verdict: Verdict) -> bytes: ...

    def doStart(self) -> None: ...

    def doStop(self) -> None: ...


class RefusalLog(TypingProtocol):
    """The part of `kms.logs.Logs` refusals are written to."""

    def security(self, event: str, client: ClientInfo | None = None, **fields: object) -> None: ...


class ConnectionLimits:
    """The server's one counter and log gate, shared by every listener's `LimitedFactory`."""

    def __init__(self, counter: ConnectionCounter, clock: IReactorTime, logs: RefusalLog | None) -> None:
        self.counter = counter
        self.clock = clock
        self.logs = logs
        self.gate = LogGate()

    def wrap(self, factory: RefusingFactory, listener: str) -> LimitedFactory:
        return LimitedFactory(factory, self, listener)

    def refused(self, transport: ITransport, listener: str, verdict: Verdict) -> None:
        """Log a refusal, unless this address was logged less than a minute ago."""
        if self.logs is None:
            return
        host = str(getattr(transport.getPeer(), "host", "local"))
        held_back = self.gate.admit(address_key(host) or host, self.clock.seconds())
        if held_back is None:
            return
        limit = self.counter.max_total if verdict == SERVER_FULL else self.counter.max_per_address
        client = ClientInfo.from_transport(transport, listener)
        self.logs.security("connection-refused", client, reason=verdict, limit=limit, held_back=held_back)


class _Counted(Protocol):
    """The real protocol's stand-in toward the transport: passes everything on, releases the slot once.

    The real protocol gets the transport itself (not this object), so its writes, STARTTLS and
    producer calls cost nothing extra; only ``dataReceived`` and ``connectionLost`` come through here.
    """

    def __init__(self, inner: Protocol, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release

    def logPrefix(self) -> str:
        return self._inner.logPrefix()

    def makeConnection(self, transport: ITransport) -> None:
        self.connected = 1
        self.transport = transport
        self._inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self._inner.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = 0
        release, self._release = self._release, None
        if release is not None:
            release()
        self._inner.connectionLost(reason)


class _Refusal(Protocol):
    """Writes the refusal line and closes; input is ignored.  Holds no slot."""

    def __init__(self, line: bytes, on_connect: Callable[[ITransport], None], clock: IReactorTime) -> None:
        self._line = line
        self._on_connect = on_connect
        self._clock = clock
        self._deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._deadline = self._clock.callLater(REFUSAL_DEADLINE, self.transport.abortConnection)  # type: ignore[union-attr]
        self.transport.write(self._line)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]
        self._on_connect(self.transport)  # type: ignore[arg-type]

    def dataReceived(self, data: bytes) -> None:
        pass  # whatever a refused client sends (a pipelined EHLO, a flood) is dropped unread

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None


class LimitedFactory(Factory):
    """Wraps one listener's factory: a counted real protocol, or a refusal in that protocol's words."""

    noisy = False

    def __init__(self, wrapped: RefusingFactory, limits: ConnectionLimits, listener: str) -> None:
        self.wrappedFactory = wrapped
        self.limits = limits
        self.listener = listener

    @property
    def counter(self) -> ConnectionCounter:
        return self.limits.counter

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def buildProtocol(self, addr: object) -> Protocol | None:
        host = str(getattr(addr, "host", "local"))
        counter = self.limits.counter
        verdict = counter.acquire(host)
        if verdict != OK:
            refusal = _Refusal(
                self.wrappedFactory.refusal(verdict),
                lambda transport: self.limits.refused(transport, self.listener, verdict),
                self.limits.clock,
            )
            refusal.factory = self
            return refusal
        try:
            inner = self.wrappedFactory.buildProtocol(addr)
        except BaseException:
            counter.release(host)
            raise
        if inner is None:
            counter.release(host)
            return None
        return _Counted(inner, lambda: counter.release(host))
