"""A real DNS server on 127.0.0.1 (UDP and TCP) serving records a test sets, built on twisted.names.

Tests that need MX, A, AAAA or PTR answers start one and point ``[dns] servers`` at it.  Unknown
names get NXDOMAIN; a known name without a record of the asked type gets an empty answer (NODATA).
``silent=True`` gives a server that reads queries (``resolver.queries`` lists them) and never answers,
for timeout tests.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.names import dns, error
from twisted.names.common import ResolverBase
from twisted.names.server import DNSServerFactory


class RecordResolver(ResolverBase):
    """Answers from an in-memory table: (lower-case name, type) -> [payload]."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[tuple[str, int], list[Any]] = {}
        self.names: set[str] = set()
        self.queries: list[tuple[str, int]] = []

    def add(self, name: str, rtype: int, payload: Any) -> None:
        name = name.rstrip(".").lower()
        self.names.add(name)
        self.records.setdefault((name, rtype), []).append(payload)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred[Any]:
        text = name.decode("ascii", "replace").rstrip(".").lower()
        self.queries.append((text, type))
        if text not in self.names:
            return defer.fail(error.DomainError(name))
        answers = [
            dns.RRHeader(name=name, type=type, cls=cls, ttl=60, payload=p)
            for p in self.records.get((text, type), [])
        ]
        return defer.succeed((answers, [], []))


class _Silent(DatagramProtocol):
    """Reads queries (recorded like the answering server's) and never answers."""

    def __init__(self, queries: list[tuple[str, int]]) -> None:
        self.queries = queries

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        message = dns.Message()
        try:
            message.fromStr(data)
        except Exception:
            return
        self.queries.extend((q.name.name.decode("ascii", "replace").lower(), q.type) for q in message.queries)


class DNSTestServer:
    """``start(reactor)`` listens on 127.0.0.1:<free port>; ``address`` is "127.0.0.1:port"."""

    def __init__(self, silent: bool = False) -> None:
        self.resolver = RecordResolver()
        self.silent = silent
        self._ports: list[Any] = []
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add_mx(self, domain: str, preference: int, host: str) -> None:
        self.resolver.add(domain, dns.MX, dns.Record_MX(preference, host.encode()))

    def add_null_mx(self, domain: str) -> None:
        self.resolver.add(domain, dns.MX, dns.Record_MX(0, b""))

    def add_a(self, name: str, ip: str) -> None:
        self.resolver.add(name, dns.A, dns.Record_A(ip))

    def add_aaaa(self, name: str, ip: str) -> None:
        self.resolver.add(name, dns.AAAA, dns.Record_AAAA(ip))

    def add_ptr(self, ip: str, name: str) -> None:
        self.resolver.add(ipaddress.ip_address(ip).reverse_pointer, dns.PTR, dns.Record_PTR(name.encode()))

    def add_name(self, name: str) -> None:
        """A name that exists but has no records (answers NODATA rather than NXDOMAIN)."""
        self.resolver.names.add(name.rstrip(".").lower())

    def start(self, reactor: Any) -> None:
        if self.silent:
            udp = reactor.listenUDP(0, _Silent(self.resolver.queries), interface="127.0.0.1")
            self._ports.append(udp)
            self.port = udp.getHost().port
            return
        factory = DNSServerFactory(clients=[self.resolver])
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self._ports.append(udp)
        self.port = udp.getHost().port
        try:
            self._ports.append(reactor.listenTCP(self.port, factory, interface="127.0.0.1"))
        except Exception:
            pass  # TCP on the same number is a nicety (truncated answers); UDP is what matters

    def stop(self) -> defer.Deferred[Any]:
        ports, self._ports = self._ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
