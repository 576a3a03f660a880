"""Reverse-DNS names of clients for the logs (``[misc] resolve_client_names``, SPEC §10).

`ClientNamer.name` starts a PTR look-up of the client's address when it connects and returns at
once: the banner and the session never wait for DNS.  The PTR name counts only when it is
forward-confirmed (its A/AAAA records include the address), because whoever controls a reverse
zone can claim any name.  Once confirmed, ``client.reverse_name`` is set, so every later log line
(and the Received header of a message finished after that) shows ``name [ip]``.

Hostile input: a PTR answer may hold any bytes, so only a syntactically valid host name, lower-cased
and at most 253 characters, is ever kept.  Answers are cached (LRU, positive and negative TTL), one
look-up per address is in flight, and at most `MAX_IN_FLIGHT` run at once: a flood of connections
never becomes a flood of DNS sockets.  Failures and timeouts only mean "no name".
"""

from __future__ import annotations

import ipaddress
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.names import dns, error
from twisted.python.failure import Failure

from kms.clientinfo import ClientInfo

MAX_NAME_LENGTH = 253
CACHE_SIZE = 4096
POSITIVE_TTL = 3600.0
NEGATIVE_TTL = 300.0
MAX_IN_FLIGHT = 100
MAX_CNAMES = 8

# What DNS can answer instead of records: no such name, server failure, refused, timed out, no route.
_DNS_FAILURES = (
    error.DomainError,
    error.AuthoritativeDomainError,
    error.ResolverError,
    defer.TimeoutError,
    OSError,
    CannotListenError,
)
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

log = Logger()

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# --- pure parts ----------------------------------------------------------------------------------


def valid_host_name(raw: bytes | str) -> str | None:
    """``raw`` lower-cased without its final dot if it is a host name (RFC 1123 labels), else None.

    Anything else (spaces, brackets, control bytes, underscores, an all-numeric last label that
    would pass for an IP address) is refused whole rather than cleaned up: a name that needs
    cleaning is not one to show next to an address.
    """
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
    name = raw.lower().removesuffix(".")
    if not name or len(name) > MAX_NAME_LENGTH or not name.isascii():
        return None
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        return None
    return name


def client_address(peer_host: str) -> IPAddress | None:
    """The address to look up: IPv4-mapped IPv6 as plain IPv4; None for UNIX sockets and the like."""
    try:
        address = ipaddress.ip_address(peer_host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _owner(name: dns.Name) -> str:
    return name.name.decode("ascii", "replace").lower().removesuffix(".")


def records(answers: Sequence[Any], qname: str, rtype: int) -> list[Any]:
    """Payloads of type ``rtype`` that answer ``qname``, following CNAMEs within the answer.

    Classless reverse delegation (RFC 2317) puts a CNAME in front of the PTR; records owned by any
    other name are ignored, whatever a server put in its answer section.
    """
    owners = {qname.lower().removesuffix(".")}
    for _ in range(MAX_CNAMES):
        targets = {
            _owner(rr.payload.name) for rr in answers if rr.type == dns.CNAME and _owner(rr.name) in owners
        }
        if targets <= owners:
            break
        owners |= targets
    return [rr.payload for rr in answers if rr.type == rtype and _owner(rr.name) in owners]


class NameCache:
    """Address -> confirmed name (or None: no name), for ``positive_ttl`` / ``negative_ttl`` seconds.

    Least recently used entries go first once ``size`` is reached, so memory stays bounded however
    many addresses connect.  ``clock`` returns seconds (``reactor.seconds``).
    """

    def __init__(
        self,
        clock: Callable[[], float],
        size: int = CACHE_SIZE,
        positive_ttl: float = POSITIVE_TTL,
        negative_ttl: float = NEGATIVE_TTL,
    ) -> None:
        self._clock = clock
        self._size = size
        self._positive_ttl = positive_ttl
        self._negative_ttl = negative_ttl
        self._entries: OrderedDict[str, tuple[str | None, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, address: str) -> tuple[bool, str | None]:
        """``(True, name or None)`` for a live entry, ``(False, None)`` when DNS must be asked."""
        entry = self._entries.get(address)
        if entry is None:
            return False, None
        name, expires = entry
        if self._clock() >= expires:
            del self._entries[address]
            return False, None
        self._entries.move_to_end(address)
        return True, name

    def put(self, address: str, name: str | None) -> None:
        ttl = self._positive_ttl if name is not None else self._negative_ttl
        self._entries[address] = (name, self._clock() + ttl)
        self._entries.move_to_end(address)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


# --- the look-ups --------------------------------------------------------------------------------


class _Scope:
    """The reactor as one resolver sees it, remembering the timers and UDP ports it makes.

    `twisted.names` cannot cancel a query, so stopping the server would otherwise leave sockets and
    timers behind until each query times out.  `abort` ends them: timers are cancelled and every
    port still waiting for an answer is closed (ports whose query is over are the resolver's own to
    close).  A look-up that fell back to TCP (a truncated answer) keeps its own 10 s timeout.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._calls: weakref.WeakSet[IDelayedCall] = weakref.WeakSet()
        self._ports: weakref.WeakSet[Any] = weakref.WeakSet()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def callLater(self, delay: float, f: Callable[..., object], *args: object, **kw: object) -> IDelayedCall:
        call = self._reactor.callLater(delay, f, *args, **kw)
        self._calls.add(call)
        return call  # type: ignore[no-any-return]

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> Any:
        protocol.noisy = False  # a socket per query: no "Starting protocol" lines in twistd's log
        listening = self._reactor.listenUDP(port, protocol, interface=interface, maxPacketSize=maxPacketSize)
        self._ports.add(listening)
        return listening

    def abort(self) -> Deferred[None]:
        for call in list(self._calls):
            if call.active():
                call.cancel()
        waiting = [p for p in list(self._ports) if getattr(p.protocol, "liveMessages", None)]
        stops = [maybeDeferred(p.stopListening) for p in waiting]
        return gatherResults(stops).addCallback(lambda _: None)


class ClientNamer:
    """Sets ``client.reverse_name`` when a forward-confirmed PTR name for its address arrives.

    ``resolver_factory`` builds an ``IResolver`` on the reactor it is given (`kms.dns.make_resolver`
    with the ``[dns]`` settings); it is called by `start`, and `stop` ends what is still in flight.
    """

    def __init__(
        self,
        resolver_factory: Callable[[Any], Any],
        reactor: Any,
        cache: NameCache | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._resolver_factory = resolver_factory
        self._reactor = reactor
        self._cache = cache if cache is not None else NameCache(reactor.seconds)
        self._max_in_flight = max_in_flight
        self._scope: _Scope | None = None
        self._resolver: Any = None
        self._waiting: dict[str, list[tuple[ClientInfo, Deferred[str | None]]]] = {}

    def start(self) -> None:
        self._scope = _Scope(self._reactor)
        self._resolver = self._resolver_factory(self._scope)

    def stop(self) -> Deferred[None]:
        """Close the resolver's sockets and timers; clients still waiting get no name."""
        scope, self._scope, self._resolver = self._scope, None, None
        waiting, self._waiting = self._waiting, {}
        for waiters in waiting.values():
            for _, d in waiters:
                d.callback(None)
        return scope.abort() if scope is not None else succeed(None)

    @property
    def in_flight(self) -> int:
        """Addresses whose look-up has not finished."""
        return len(self._waiting)

    def name(self, client: ClientInfo) -> Deferred[str | None]:
        """Start naming ``client``; never fails, and nobody needs to wait for the result.

        Fires with the name set on the client, or None (no PTR, not confirmed, DNS failed or timed
        out, too many look-ups running, not started).  A cached answer is applied at once.
        """
        if client.reverse_name:
            return succeed(client.reverse_name)
        address = client_address(client.peer_host)
        if address is None or self._resolver is None:
            return succeed(None)
        key = str(address)
        known, cached = self._cache.get(key)
        if known:
            client.reverse_name = cached
            return succeed(cached)
        d: Deferred[str | None] = Deferred()
        waiters = self._waiting.get(key)
        if waiters is not None:
            waiters.append((client, d))
            return d
        if len(self._waiting) >= self._max_in_flight:
            return succeed(None)  # too busy: no name this time, and nothing remembered
        self._waiting[key] = [(client, d)]
        lookup = Deferred.fromCoroutine(self._confirmed_name(self._resolver, address))
        lookup.addErrback(self._failed, key)
        lookup.addCallback(self._answered, key)
        return d

    async def _confirmed_name(self, resolver: Any, address: IPAddress) -> str | None:
        ptr = address.reverse_pointer
        answers, _, _ = await resolver.lookupPointer(ptr)
        candidates = (valid_host_name(p.name.name) for p in records(answers, ptr, dns.PTR))
        name = next((c for c in candidates if c is not None), None)
        if name is None:
            return None
        if address.version == 4:
            answers, _, _ = await resolver.lookupAddress(name)
            found = records(answers, name, dns.A)
        else:
            answers, _, _ = await resolver.lookupIPV6Address(name)
            found = records(answers, name, dns.AAAA)
        return name if any(ipaddress.ip_address(r.address) == address for r in found) else None

    def _failed(self, failure: Failure, key: str) -> None:
        if not failure.check(*_DNS_FAILURES):
            log.failure("reverse DNS look-up of {address} failed", failure, address=key)
        return None

    def _answered(self, name: str | None, key: str) -> None:
        waiters = self._waiting.pop(key, None)
        if waiters is None:
            return  # stopped meanwhile
        self._cache.put(key, name)
        for client, d in waiters:
            if name is not None:
                client.reverse_name = name
            d.callback(name)


class ClientNamerService(Service):
    """Runs a `ClientNamer` with the server: its resolver lives from start to stop."""

    def __init__(self, namer: ClientNamer) -> None:
        self.setName("client-names")
        self.namer = namer

    def startService(self) -> None:
        super().startService()
        self.namer.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.namer.stop()
