# -*- test-case-name: tests.test_queue_mx -*-
"""Where a domain's mail goes: the hops (host name, IP address, port) to try, best first.

`resolve_hops` asks `twisted.names` (the resolver of `kms.dns.make_resolver`) for the MX records
(RFC 5321 §5.1) and each MX host's AAAA and A records; `smarthost_hops` resolves a configured
``host:port`` without MX.  The runner tries the hops in the order given until one answers.

Decisions (docs/outbound.md):

* MX hosts in preference order; hosts of equal preference shuffled (RFC 5321 §5.1), so load
  spreads and one dead host is not always tried first.
* Each host's addresses interleaved IPv6, IPv4, IPv6, ... (RFC 8305's order, without its racing:
  the runner tries one hop after the other).  A machine without an IPv6 route gets "network
  unreachable" for the IPv6 hop at once and moves on.
* At most `MAX_HOPS` hops; an address already listed under an earlier host is not repeated.
* Unspecified, multicast and broadcast addresses are never hops.  Loopback and private addresses
  are kept: tests use 127.0.0.2 as a "remote" server, and a site may route mail over a private
  network.
* A single MX "." is a null MX (RFC 7505): permanent.  A "." among other MX records is skipped.
* No MX records: the domain itself is the one MX (its A/AAAA, RFC 5321 §5.1).
* NXDOMAIN is permanent; timeouts, SERVFAIL and other DNS failures are temporary.  MX hosts that
  all have no address: permanent when every look-up gave a definite answer, else temporary.
* ``[192.0.2.1]`` and ``[IPv6:2001:db8::1]`` (address literals) are one hop, no DNS.
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, TimeoutError, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure

from kms.net import is_ip_address
from kms.queue.interfaces import DestinationError, Hop

# Hops handed to the runner for one destination, and MX hosts whose addresses are looked up.
MAX_HOPS = 10
MAX_MX_HOSTS = 10
# CNAME links followed inside one answer section.
MAX_CNAME_CHAIN = 8
# No look-up for one destination takes longer than this, whatever the resolver does (each query
# already has the [dns] timeout; MX, then AAAA and A of all hosts in parallel, is two rounds).
DEADLINE = 60.0

_Record = TypeVar("_Record")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


class _Unresolvable(Exception):
    """An address look-up without a usable answer; ``definite`` for NXDOMAIN (not for a timeout)."""

    def __init__(self, reason: str, definite: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.definite = definite


def address_literal(domain: str) -> str | None:
    """``[192.0.2.1]`` -> "192.0.2.1", ``[IPv6:2001:db8::1]`` -> "2001:db8::1"; None for a name.

    ValueError for a bracketed text that is not an address (RFC 5321 §4.1.3).
    """
    if not domain.startswith("["):
        return None
    if not domain.endswith("]"):
        raise ValueError(f"malformed address literal {domain}")
    inner = domain[1:-1]
    if inner[:5].upper() == "IPV6:":
        return str(ipaddress.IPv6Address(inner[5:]))
    return str(ipaddress.IPv4Address(inner))


def ascii_domain(domain: str) -> str:
    """The domain as DNS knows it: lower case, A-labels for an internationalized name, no final dot.

    ValueError for anything but RFC 5321 sub-domains: letters, digits and inner hyphens, labels of
    1 to 63 octets, 253 in all.
    """
    name = domain.rstrip(".").lower()
    try:
        encoded = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"invalid domain name {domain!r}") from None
    if len(encoded) > 253 or not all(_LABEL.match(label) for label in encoded.split(".")):
        raise ValueError(f"invalid domain name {domain!r}")
    return encoded


def _text(name: dns.Name | None) -> str:
    return name.name.decode("ascii", "replace").rstrip(".").lower() if name is not None else ""


def _chain_end(answers: Sequence[dns.RRHeader], name: str) -> str:
    """The name the records are for after the CNAMEs of this answer (bounded, loops stop)."""
    for _ in range(MAX_CNAME_CHAIN):
        targets = [p.name for r, p in _payloads(answers, dns.Record_CNAME) if _text(r.name) == name]
        if not targets:
            break
        name = _text(targets[0])
    return name


def _payloads(answers: Sequence[dns.RRHeader], kind: type[_Record]) -> list[tuple[dns.RRHeader, _Record]]:
    """The records of one type with their headers (the payload's class is the record's type)."""
    return [(r, r.payload) for r in answers if isinstance(r.payload, kind)]


def mx_records(answers: Sequence[dns.RRHeader], name: str) -> list[tuple[int, str]]:
    """(preference, exchange) of the MX records for ``name`` in an answer section; "" is a null MX."""
    owner = _chain_end(answers, name)
    records = _payloads(answers, dns.Record_MX)
    return [(p.preference, _text(p.name)) for r, p in records if _text(r.name) == owner]


def order_hosts(records: Sequence[tuple[int, str]], rng: random.Random) -> list[str]:
    """Exchanges by preference, equal preferences in random order, each host once, null MX left out."""
    shuffled = list(records)
    rng.shuffle(shuffled)
    shuffled.sort(key=lambda record: record[0])  # stable: keeps the shuffle within a preference
    hosts: list[str] = []
    for _, host in shuffled:
        if host and host not in hosts:
            hosts.append(host)
    return hosts


def usable(address: str) -> bool:
    """False for addresses nothing can connect to: unspecified, multicast, broadcast."""
    ip = ipaddress.ip_address(address)
    return not (ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"))


def interleave(ipv6: Sequence[str], ipv4: Sequence[str]) -> list[str]:
    """IPv6, IPv4, IPv6, IPv4, ... then the rest of the longer list."""
    merged: list[str] = []
    for index in range(max(len(ipv6), len(ipv4))):
        merged.extend(family[index] for family in (ipv6, ipv4) if index < len(family))
    return merged


def _addresses_in(answers: Sequence[dns.RRHeader], name: str) -> list[str]:
    """The A or AAAA addresses for ``name`` (after CNAMEs) in an answer section, as text."""
    owner = _chain_end(answers, name)
    found: list[str] = []
    for r in answers:
        if _text(r.name) != owner:
            continue
        if isinstance(r.payload, dns.Record_A):
            found.append(r.payload.dottedQuad())
        elif isinstance(r.payload, dns.Record_AAAA):
            found.append(str(ipaddress.IPv6Address(r.payload.address)))
    return found


def _dns_problem(error: BaseException) -> tuple[str, bool]:
    """(reason, permanent) for a failed query: only NXDOMAIN is definite."""
    if isinstance(error, DNSNameError):
        return "no such domain (NXDOMAIN)", True
    if isinstance(error, TimeoutError):
        return "DNS timeout", False
    return f"DNS failure ({type(error).__name__})", False


async def _family(resolver: Any, host: str, rtype: int) -> list[str]:
    """One family's addresses of ``host``; `_Unresolvable` when the look-up failed."""
    lookup = resolver.lookupAddress if rtype == dns.A else resolver.lookupIPV6Address
    try:
        answers, _, _ = await lookup(host)
    except Exception as error:
        reason, permanent = _dns_problem(error)
        raise _Unresolvable(f"{host}: {reason}", permanent) from None
    return [address for address in _addresses_in(answers, host) if usable(address)]


async def _host_addresses(resolver: Any, host: str) -> list[str]:
    """AAAA and A of ``host`` (in parallel), interleaved; `_Unresolvable` when neither gave any.

    One family failing while the other answers is fine: the addresses found are enough.  A name
    that is not a host name (an MX target from a hostile DNS answer) is never looked up.
    """
    try:
        ascii_domain(host)
    except ValueError:
        raise _Unresolvable(f"{host!r}: not a host name", True) from None
    results = await gatherResults(
        [Deferred.fromCoroutine(_quiet(_family(resolver, host, rtype))) for rtype in (dns.AAAA, dns.A)]
    )
    found = [r for r in results if isinstance(r, list)]
    problems = [r for r in results if isinstance(r, _Unresolvable)]
    addresses = interleave(*found) if len(found) == 2 else (found[0] if found else [])
    if addresses:
        return addresses
    if problems and not all(p.definite for p in problems):
        raise next(p for p in problems if not p.definite)
    raise _Unresolvable(f"{host}: no address records", True)


async def _quiet(coroutine: Any) -> list[str] | _Unresolvable:
    """The coroutine's result, or its `_Unresolvable` as a value (so gatherResults sees no failure)."""
    try:
        result: list[str] = await coroutine
        return result
    except _Unresolvable as problem:
        return problem


def _hops(hosts: Sequence[str], addresses: Sequence[list[str] | _Unresolvable], port: int) -> list[Hop]:
    hops: list[Hop] = []
    seen: set[str] = set()
    for host, found in zip(hosts, addresses, strict=True):
        if isinstance(found, _Unresolvable):
            continue
        for address in found:
            if address not in seen and len(hops) < MAX_HOPS:
                seen.add(address)
                hops.append(Hop(host, address, port))
    return hops


async def _resolve(resolver: Any, domain: str, port: int, rng: random.Random) -> list[Hop]:
    try:
        literal = address_literal(domain)
        name = "" if literal else ascii_domain(domain)
    except ValueError as error:
        raise DestinationError(domain, f"5.1.2 {error}", permanent=True) from None
    if literal is not None:
        if not usable(literal):
            raise DestinationError(domain, f"5.1.2 address literal {domain} is not a usable address", True)
        return [Hop(domain, literal, port)]
    try:
        answers, _, _ = await resolver.lookupMailExchange(name)
    except Exception as error:
        reason, permanent = _dns_problem(error)
        code = "5.1.2" if permanent else "4.4.3"
        raise DestinationError(domain, f"{code} MX look-up for {name}: {reason}", permanent) from None
    records = mx_records(answers, name)
    if len(records) == 1 and records[0][1] == "":
        raise DestinationError(domain, f"5.1.10 {name} accepts no mail (null MX)", permanent=True)
    hosts = order_hosts(records, rng)[:MAX_MX_HOSTS] if records else [name]
    found = await gatherResults([Deferred.fromCoroutine(_quiet(_host_addresses(resolver, h))) for h in hosts])
    hops = _hops(hosts, found, port)
    if hops:
        return hops
    problems = [f for f in found if isinstance(f, _Unresolvable)]
    permanent = all(p.definite for p in problems)
    what = "MX host of" if records else "MX and no address for"
    summary = "; ".join(p.reason for p in problems[:3])
    code = "5.4.4" if permanent else "4.4.3"
    raise DestinationError(domain, f"{code} no {what} {name} ({summary})", permanent)


def resolve_hops(
    resolver: Any, domain: str, port: int, *, reactor: IReactorTime, rng: random.Random | None = None
) -> Deferred[list[Hop]]:
    """The hops for mail to ``domain`` on ``port``, best first; fails with `DestinationError`.

    ``rng`` orders MX hosts of equal preference (tests pass a seeded one).
    """
    d = Deferred.fromCoroutine(_resolve(resolver, domain, port, rng or random.Random()))
    return _bounded(d, domain, reactor)


def parse_smarthost(spec: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[ip]:port"`` -> (host, port); ValueError otherwise."""
    host, separator, port_text = spec.rpartition(":")
    if not separator or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f'smarthost "{spec}" is not host:port')
    if host.startswith("[") and not host.upper().startswith("[IPV6:") and ":" in host:
        host = "[IPv6:" + host[1:]  # "[2001:db8::1]:25" as the config allows it
    return host, int(port_text)


async def _smarthost(resolver: Any, spec: str) -> list[Hop]:
    try:
        host, port = parse_smarthost(spec)
        literal = address_literal(host)
        if literal is None and is_ip_address(host):
            literal = host
        name = "" if literal else ascii_domain(host)
    except ValueError as error:
        raise DestinationError(spec, str(error), permanent=False) from None
    if literal is not None:
        return [Hop(host, literal, port)]
    try:
        addresses = await _host_addresses(resolver, name)
    except _Unresolvable as problem:
        raise DestinationError(spec, f"4.4.3 smarthost {problem.reason}", permanent=False) from None
    return [Hop(host, address, port) for address in addresses[:MAX_HOPS]]


def smarthost_hops(resolver: Any, spec: str, *, reactor: IReactorTime) -> Deferred[list[Hop]]:
    """The hops of the configured smarthost: its A/AAAA (no MX), or the literal address.

    Every failure is temporary (`DestinationError` with ``permanent=False``): a smarthost that
    cannot be found is a local problem, never a reason to bounce a message.
    """
    return _bounded(Deferred.fromCoroutine(_smarthost(resolver, spec)), spec, reactor)


def _bounded(d: Deferred[list[Hop]], destination: str, reactor: IReactorTime) -> Deferred[list[Hop]]:
    """``d``'s result, or a temporary `DestinationError` after `DEADLINE` seconds.

    Late look-ups are left to finish (each has its own timeout) and their result is dropped.
    """
    result: Deferred[list[Hop]] = Deferred()

    def late() -> None:
        result.errback(DestinationError(destination, "4.4.3 DNS look-up took too long", permanent=False))

    timer = reactor.callLater(DEADLINE, late)

    def done(outcome: Any) -> None:
        if timer.active():
            timer.cancel()
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

    d.addBoth(done)
    return result


class HopCache:
    """Hops per destination, remembered for ``ttl`` seconds; concurrent asks share one look-up.

    Without it every delivery asks DNS three times (MX, A, AAAA), each on a new UDP port: most of
    the reactor's time in `bench/queue_load.py`.  Permanent answers (NXDOMAIN, null MX) are kept
    as long as hops; temporary failures are never kept.  Record TTLs are not read: ``ttl`` caps how
    long a changed MX goes unnoticed (a minute by default).
    """

    def __init__(self, clock: IReactorTime, ttl: float = 60.0, size: int = 10_000) -> None:
        self._clock = clock
        self._ttl = ttl
        self._size = size
        self._answers: dict[str, tuple[float, list[Hop] | DestinationError]] = {}
        self._pending: dict[str, list[Deferred[list[Hop]]]] = {}

    def resolve(self, key: str, look_up: Callable[[], Deferred[list[Hop]]]) -> Deferred[list[Hop]]:
        """The hops for ``key`` (a domain or the smarthost), from the cache or from ``look_up()``."""
        now = self._clock.seconds()
        known = self._answers.get(key)
        if known is not None and known[0] > now:
            answer = known[1]
            return fail(answer) if isinstance(answer, DestinationError) else succeed(list(answer))
        waiter: Deferred[list[Hop]] = Deferred()
        waiting = self._pending.get(key)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._pending[key] = [waiter]
        look_up().addCallbacks(self._answered, self._failed, callbackArgs=(key,), errbackArgs=(key,))
        return waiter

    def _answered(self, hops: list[Hop], key: str) -> None:
        self._remember(key, hops)
        for waiter in self._pending.pop(key, []):
            waiter.callback(list(hops))

    def _failed(self, failure: Failure, key: str) -> None:
        error = failure.value
        if isinstance(error, DestinationError) and error.permanent:
            self._remember(key, error)
        for waiter in self._pending.pop(key, []):
            waiter.errback(failure)

    def _remember(self, key: str, answer: list[Hop] | DestinationError) -> None:
        if len(self._answers) >= self._size:
            now = self._clock.seconds()
            self._answers = {k: v for k, v in self._answers.items() if v[0] > now}
            if len(self._answers) >= self._size:
                self._answers.clear()  # bounded: a flood of destinations must not grow it forever
        self._answers[key] = (self._clock.seconds() + self._ttl, answer)
