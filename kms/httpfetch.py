"""One HTTP(S) GET, directly or through an HTTP proxy, with a deadline and a size cap (SPEC §11).

Twisted's `Agent` speaks HTTP; this module decides what carries it.  Every connection, direct or to
the proxy, gets one `_Guard` protocol first, which

* for an https URL through a proxy, sends ``CONNECT host:port`` (with ``Proxy-Authorization:
  Basic``) and waits for the proxy's 2xx: a 407 becomes "proxy refused the credentials";
* for https, starts TLS verifying the certificate against the feed's host name (service-identity,
  the configured CA file or the system store);
* counts every byte the server sends and aborts the connection past the cap, so no header flood or
  endless body can grow memory (Twisted's HTTP parser limits neither);
* then hands the connection to the HTTP protocol.

Plain http through a proxy uses Twisted's `ProxyAgent` (absolute URI in the request line).  Names
are resolved with `twisted.names` (A, then AAAA) and the whole fetch, from the look-up to the last
body byte, has one deadline; nothing blocks the reactor and nothing is downloaded beyond the one
document.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.python.failure import Failure
from twisted.web.client import Agent, PartialDownloadError, ProxyAgent, ResponseFailed, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IResponse
from zope.interface import implementer

HEADER_ALLOWANCE = 64 * 1024  # bytes a server may send besides the body (status line, headers)
MAX_PROXY_ANSWER = 16 * 1024  # the proxy's answer to CONNECT


class FetchError(Exception):
    """The document could not be fetched; the message says why in one line, without secrets."""


@dataclass(frozen=True)
class Target:
    """Where an http(s) URL points."""

    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        """``host:port`` as a request line or Host header writes it (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy; with a user name, every request carries ``Proxy-Authorization: Basic``."""

    host: str
    port: int
    username: str = ""
    password: str = field(default="", repr=False)

    def authorization(self) -> bytes | None:
        if not self.username:
            return None
        pair = f"{self.username}:{self.password}".encode()
        return b"Basic " + base64.b64encode(pair)


def parse_url(url: str) -> Target:
    """The scheme, host and port of an http:// or https:// URL; ValueError for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f'"{url}" is not a URL ({e})') from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f'"{url}" must start with http:// or https://')
    if not parts.hostname:
        raise ValueError(f'"{url}" has no host')
    if parts.username is not None or parts.password is not None:
        raise ValueError(f'"{url}" must not carry credentials')
    if any(ord(c) <= 32 or ord(c) >= 127 for c in url):
        raise ValueError(f'"{url}" contains spaces, control or non-ASCII characters')
    return Target(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80))


def connect_request(target: Target, authorization: bytes | None, user_agent: bytes) -> bytes:
    """The CONNECT request that asks a proxy for a tunnel to ``target``."""
    authority = target.authority.encode("ascii")
    lines = [b"CONNECT " + authority + b" HTTP/1.1", b"Host: " + authority, b"User-Agent: " + user_agent]
    if authorization is not None:
        lines.append(b"Proxy-Authorization: " + authorization)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def parse_status_line(head: bytes) -> tuple[int, str]:
    """``HTTP/1.1 200 Connection established`` -> (200, "Connection established"); ValueError if not."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    version, _, rest = line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ValueError(f"not an HTTP status line: {printable(line)}")
    return int(code), printable(reason)


def printable(data: bytes | str, limit: int = 100) -> str:
    """Text from the network cut to ``limit`` with only printable ASCII left, fit for a message."""
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


def trust_root(ca_pem: bytes | None) -> Any:
    """The certificates of a PEM file as trust anchors, or None for the platform's store."""
    if ca_pem is None:
        return None
    try:
        certificates = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise FetchError("update.ca_file holds no PEM certificate") from None
    return trustRootFromCertificates([Certificate(crypto.X509.from_cryptography(c)) for c in certificates])


class _Budget:
    """One fetch's connections and the bytes they may still bring; ``exceeded`` marks a size abort."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.exceeded = False
        self.transports: list[Any] = []

    def hang_up(self) -> None:
        """Close every connection: a refused answer is not read to its end, so its connection would
        otherwise stay open for as long as the server keeps it."""
        for transport in self.transports:
            transport.abortConnection()


class _Guard(Protocol):
    """The first protocol on every connection: CONNECT, TLS, the byte cap, then the HTTP protocol."""

    def __init__(
        self,
        factory: IProtocolFactory,
        tunnel: bytes | None,
        tls: Any,
        budget: _Budget,
        ready: Deferred[IProtocol],
    ) -> None:
        self._factory = factory
        self._tunnel = tunnel
        self._tls = tls
        self._budget = budget
        self._ready = ready
        self._inner: IProtocol | None = None
        self._answer = b""

    def connectionMade(self) -> None:
        self._budget.transports.append(self.transport)
        if self._tunnel is not None:
            self.transport.write(self._tunnel)  # type: ignore[union-attr]
        else:
            self._start()

    def _start(self) -> None:
        if self._tls is not None:
            self.transport.startTLS(self._tls)  # type: ignore[union-attr]
        inner = self._factory.buildProtocol(self.transport.getPeer())  # type: ignore[union-attr]
        assert inner is not None
        self._inner = inner
        inner.makeConnection(self.transport)  # type: ignore[arg-type]
        self._ready.callback(inner)

    def dataReceived(self, data: bytes) -> None:
        self._budget.left -= len(data)
        if self._budget.left < 0:
            self._budget.exceeded = True
            self.transport.abortConnection()  # type: ignore[union-attr]
        elif self._inner is not None:
            self._inner.dataReceived(data)
        else:
            self._tunnel_answer(data)

    def _tunnel_answer(self, data: bytes) -> None:
        """Collect the proxy's answer to CONNECT; on 2xx (and nothing after it) start the tunnel."""
        self._answer += data
        head, end, rest = self._answer.partition(b"\r\n\r\n")
        if not end:
            if len(self._answer) > MAX_PROXY_ANSWER:
                self._fail(FetchError("proxy: answer to CONNECT too long"))
            return
        try:
            code, reason = parse_status_line(head)
        except ValueError as e:
            self._fail(FetchError(f"proxy: {e}"))
            return
        if code == 407:
            self._fail(proxy_refused(b"\r\nProxy-Authorization:" in (self._tunnel or b"")))
        elif not 200 <= code < 300:
            self._fail(FetchError(f"proxy refused the tunnel: {code} {reason}"))
        elif rest:
            self._fail(FetchError("proxy: data before the TLS handshake"))
        else:
            self._start()

    def _fail(self, problem: FetchError) -> None:
        if not self._ready.called:
            self._ready.errback(problem)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._inner is not None:
            self._inner.connectionLost(reason)
        elif not self._ready.called:
            self._ready.errback(FetchError("proxy closed the connection before the tunnel was open"))


def proxy_refused(sent_credentials: bool) -> FetchError:
    if sent_credentials:
        return FetchError("proxy refused the credentials (407 Proxy Authentication Required)")
    return FetchError("proxy demands authentication (407): set [proxy] username and password_file")


@implementer(IStreamClientEndpoint)
class _GuardedEndpoint:
    """A TCP endpoint whose connections start with a `_Guard`; fires with the HTTP protocol."""

    def __init__(self, tcp: IStreamClientEndpoint, tunnel: bytes | None, tls: Any, budget: _Budget) -> None:
        self._tcp = tcp
        self._tunnel = tunnel
        self._tls = tls
        self._budget = budget

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        guards: list[_Guard] = []
        cancelled: list[bool] = []

        def cancel(_: Deferred[IProtocol]) -> None:
            """``ready`` then fails with CancelledError, whatever the connection attempt says."""
            cancelled.append(True)
            connecting.cancel()
            for guard in guards:
                if guard.transport is not None:
                    guard.transport.abortConnection()  # type: ignore[attr-defined]

        ready: Deferred[IProtocol] = Deferred(cancel)

        def guard() -> _Guard:
            guards.append(_Guard(protocolFactory, self._tunnel, self._tls, self._budget, ready))
            return guards[-1]

        def not_connected(failure: Failure) -> None:
            if not ready.called and not cancelled:
                ready.errback(failure)

        connecting = self._tcp.connect(Factory.forProtocol(guard))
        connecting.addErrback(not_connected)
        return ready


@implementer(IAgentEndpointFactory)
class _Always:
    """Every URI goes to the one endpoint (the feed host, or the proxy's tunnel to it)."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return self._endpoint


def resolve(resolver_factory: Callable[[], Any], host: str) -> Deferred[str]:
    """An address for ``host``: itself when it is one, else its first A record, else its first AAAA.

    ``resolver_factory`` gives the `twisted.names` resolver, only when there is a name to look up.
    """
    if isIPAddress(host) or isIPv6Address(host):
        return defer.succeed(host)
    resolver = resolver_factory()

    def first(result: Any, kind: int) -> str:
        for record in result[0]:
            if record.type == kind == dns.A:
                return str(record.payload.dottedQuad())
            if record.type == kind == dns.AAAA:
                return socket.inet_ntop(socket.AF_INET6, record.payload.address)
        raise dns_error.DomainError(host)

    def no_a_record(failure: Failure) -> Deferred[str]:
        failure.trap(dns_error.DomainError, dns_error.DNSNameError)
        d: Deferred[str] = resolver.lookupIPV6Address(host).addCallback(first, dns.AAAA)
        return d

    def unresolved(failure: Failure) -> str:
        if failure.check(FetchError, defer.CancelledError):
            failure.raiseException()
        if failure.check(dns_error.DNSQueryTimeoutError):
            raise FetchError(f"DNS: no answer about {printable(host)}")
        raise FetchError(f"cannot resolve {printable(host)}: {failure.value.__class__.__name__}")

    d: Deferred[str] = resolver.lookupAddress(host).addCallback(first, dns.A)
    d.addErrback(no_a_record)
    d.addErrback(unresolved)
    return d


def _tcp(reactor: Any, address: str, port: int, timeout: float) -> IStreamClientEndpoint:
    kind = TCP6ClientEndpoint if isIPv6Address(address) else TCP4ClientEndpoint
    return kind(reactor, address, port, timeout=timeout)  # type: ignore[no-any-return]


def fetch(
    url: str,
    *,
    reactor: Any,
    resolver_factory: Callable[[], Any],
    proxy: Proxy | None,
    ca_pem: bytes | None,
    timeout: float,
    max_size: int,
    user_agent: str,
) -> Deferred[bytes]:
    """GET ``url`` and fire with its body (status 200 only); FetchError with the reason otherwise.

    ``ca_pem`` (PEM certificates) replaces the system store for https; ``timeout`` covers
    everything from the name look-up to the last byte.
    """
    try:
        target = parse_url(url)
    except ValueError as e:
        return defer.fail(FetchError(str(e)))
    budget = _Budget(max_size + HEADER_ALLOWANCE)
    host, port = (proxy.host, proxy.port) if proxy else (target.host, target.port)

    async def get() -> bytes:
        tcp = _tcp(reactor, await resolve(resolver_factory, host), port, timeout)
        agent_name = user_agent.encode("ascii", "replace")
        headers = Headers({b"User-Agent": [agent_name], b"Accept": [b"application/json"]})
        authorization = proxy.authorization() if proxy else None
        agent: Any
        if proxy is not None and target.scheme == "http":
            if authorization is not None:
                headers.addRawHeader(b"Proxy-Authorization", authorization)
            agent = ProxyAgent(_GuardedEndpoint(tcp, None, None, budget), reactor)
        else:
            tls = None
            if target.scheme == "https":
                tls = optionsForClientTLS(target.host, trustRoot=trust_root(ca_pem))
            tunnel = connect_request(target, authorization, agent_name) if proxy else None
            agent = Agent.usingEndpointFactory(reactor, _Always(_GuardedEndpoint(tcp, tunnel, tls, budget)))
        response: IResponse = await agent.request(b"GET", url.encode("ascii"), headers)
        if response.code == 407 and proxy is not None and target.scheme == "http":
            raise proxy_refused(authorization is not None)
        if response.code != 200:
            where = response.headers.getRawHeaders(b"location", [b""])[0]
            hint = f" (to {printable(where)}; redirects are not followed)" if where else ""
            raise FetchError(f"feed answered {response.code} {printable(response.phrase)}{hint}")
        if response.length is not UNKNOWN_LENGTH and response.length > max_size:  # type: ignore[operator]
            raise FetchError(f"feed is larger than {max_size} bytes")
        try:
            body = await readBody(response)
        except PartialDownloadError as e:  # a body that ends with the connection, as HTTP/1.0 sends it
            body = e.response or b""
        if len(body) > max_size:
            raise FetchError(f"feed is larger than {max_size} bytes")
        return body

    def timed_out(result: object, seconds: float) -> bytes:
        raise FetchError(f"no complete answer within {seconds:g}s")

    def explain(failure: Failure) -> Failure:
        budget.hang_up()
        if _cancelled(failure):  # by the caller (the server stops): no error of the fetch
            return Failure(defer.CancelledError())
        raise _explanation(failure, budget, max_size, host, port, target)

    d = Deferred.fromCoroutine(get())
    d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)
    d.addErrback(explain)
    return d


def _cancelled(failure: Failure) -> bool:
    """Whether ``failure`` is a cancellation, also as Twisted's HTTP client wraps one."""
    if failure.check(defer.CancelledError):
        return True
    reasons: list[Failure] = getattr(failure.value, "reasons", [])
    return failure.check(ResponseFailed) is not None and any(r.check(defer.CancelledError) for r in reasons)


def _explanation(
    failure: Failure, budget: _Budget, max_size: int, host: str, port: int, target: Target
) -> FetchError:
    """One line that says what went wrong, from whatever layer failed."""
    if budget.exceeded:
        return FetchError(f"feed is larger than {max_size} bytes")
    if failure.check(FetchError):
        return failure.value  # type: ignore[return-value]
    if failure.check(error.TimeoutError):  # the TCP connect; the whole fetch's deadline is `timed_out`
        return FetchError(f"cannot connect to {host}:{port}: no answer")
    if failure.check(error.ConnectionRefusedError):
        return FetchError(f"connection refused by {host}:{port}")
    if failure.check(error.ConnectError):
        return FetchError(f"cannot connect to {host}:{port}: {failure.getErrorMessage()}")
    if failure.check(ResponseFailed):  # also ResponseNeverReceived
        reasons: list[Failure] = failure.value.reasons  # type: ignore[union-attr]
        if any(reason.check(SSL.Error, VerificationError) for reason in reasons):
            return FetchError(f"TLS with {target.host}: certificate not trusted or not for this name")
        return FetchError(f"{target.host} closed the connection before the answer was complete")
    return FetchError(f"{failure.value.__class__.__name__}: {printable(failure.getErrorMessage())}")
