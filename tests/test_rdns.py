"""Reverse-DNS client names: host-name validation, answer chains and the cache (pure, with a Clock),
then `ClientNamer` against a real twisted.names DNS server on 127.0.0.1 (tests/support/dnsserver.py).
"""

from __future__ import annotations

import ipaddress
import string

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.trial.unittest import TestCase

from kms.clientinfo import ClientInfo
from kms.config import DNSConfig
from kms.dns import make_resolver
from kms.rdns import ClientNamer, NameCache, client_address, records, valid_host_name
from tests.support.dnsserver import DNSTestServer

PTR = dns.PTR
A = dns.A


def client(ip: str) -> ClientInfo:
    return ClientInfo(ip, 40000, "127.0.0.1", 25, "smtp")


def rr(name: str, payload: dns.IEncodableRecord) -> dns.RRHeader:
    return dns.RRHeader(name=name.encode(), type=payload.TYPE, payload=payload)


class HostNameTests(TestCase):
    def test_table(self) -> None:
        good: dict[str | bytes, str] = {
            "mail.example.test": "mail.example.test",
            "MAIL.Example.TEST.": "mail.example.test",
            b"host-1-2-3-4.isp.example": "host-1-2-3-4.isp.example",
            "localhost": "localhost",
            "a" * 63 + ".test": "a" * 63 + ".test",
            "x1.123abc": "x1.123abc",
        }
        for raw, expected in good.items():
            self.assertEqual(valid_host_name(raw), expected, raw)
        bad: list[str | bytes] = [
            "",
            ".",
            "a..b",
            "-a.test",
            "a-.test",
            "under_score.test",
            "sp ace.test",
            "evil.test\r\n2026-01-01T00:00:00.000Z - - - forged",
            "evil\x00.test",
            "[127.0.0.1]",
            "a.test (x)",
            "127.0.0.1",
            "host.123",
            "a" * 64 + ".test",
            ".".join(["a" * 63] * 4),  # 255 characters
            "münchen.test",
            b"caf\xc3\xa9.test",
            b"\xff.test",
        ]
        for raw in bad:
            self.assertIsNone(valid_host_name(raw), repr(raw))

    @given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
    def test_only_host_name_characters(self, raw: str | bytes) -> None:
        """Whatever a PTR holds, what comes out cannot break a log line or a Received header."""
        name = valid_host_name(raw)
        if name is not None:
            self.assertLessEqual(len(name), 253)
            self.assertTrue(set(name) <= set(string.ascii_lowercase + string.digits + ".-"))
            self.assertEqual(valid_host_name(name), name)

    def test_client_address(self) -> None:
        self.assertEqual(client_address("127.0.0.2"), ipaddress.ip_address("127.0.0.2"))
        self.assertEqual(client_address("::ffff:192.0.2.7"), ipaddress.ip_address("192.0.2.7"))
        self.assertEqual(client_address("2001:db8::1"), ipaddress.ip_address("2001:db8::1"))
        self.assertIsNone(client_address("local"))
        self.assertIsNone(client_address(""))


class RecordsTests(TestCase):
    def test_direct(self) -> None:
        answers = [rr("2.0.0.127.in-addr.arpa", dns.Record_PTR(b"a.test"))]
        [ptr] = records(answers, "2.0.0.127.IN-ADDR.ARPA.", PTR)
        self.assertEqual(ptr.name.name, b"a.test")

    def test_classless_delegation_cname(self) -> None:
        """RFC 2317: 2.0.0.127.in-addr.arpa CNAME 2.0/25.0.0.127.in-addr.arpa, which holds the PTR."""
        answers = [
            rr("2.0.0.127.in-addr.arpa", dns.Record_CNAME(b"2.0/25.0.0.127.in-addr.arpa")),
            rr("2.0/25.0.0.127.in-addr.arpa", dns.Record_PTR(b"b.test")),
        ]
        self.assertEqual([p.name.name for p in records(answers, "2.0.0.127.in-addr.arpa", PTR)], [b"b.test"])

    def test_records_of_other_names_ignored(self) -> None:
        answers = [
            rr("other.test", dns.Record_A("127.0.0.2")),
            rr("a.test", dns.Record_A("192.0.2.1")),
            rr("a.test", dns.Record_PTR(b"x.test")),
        ]
        self.assertEqual([r.dottedQuad() for r in records(answers, "a.test", A)], ["192.0.2.1"])

    def test_cname_loop_ends(self) -> None:
        answers = [rr("a.test", dns.Record_CNAME(b"b.test")), rr("b.test", dns.Record_CNAME(b"a.test"))]
        self.assertEqual(records(answers, "a.test", A), [])


class NameCacheTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = NameCache(self.clock.seconds, size=3, positive_ttl=100, negative_ttl=10)

    def test_positive_and_negative_ttl(self) -> None:
        self.assertEqual(self.cache.get("192.0.2.1"), (False, None))
        self.cache.put("192.0.2.1", "a.test")
        self.cache.put("192.0.2.2", None)
        self.assertEqual(self.cache.get("192.0.2.1"), (True, "a.test"))
        self.assertEqual(self.cache.get("192.0.2.2"), (True, None))
        self.clock.advance(10)
        self.assertEqual(self.cache.get("192.0.2.2"), (False, None))
        self.assertEqual(self.cache.get("192.0.2.1"), (True, "a.test"))
        self.clock.advance(90)
        self.assertEqual(self.cache.get("192.0.2.1"), (False, None))
        self.assertEqual(len(self.cache), 0)

    def test_least_recently_used_goes_first(self) -> None:
        for n in (1, 2, 3):
            self.cache.put(f"192.0.2.{n}", f"h{n}.test")
        self.cache.get("192.0.2.1")  # now the most recently used
        self.cache.put("192.0.2.4", None)
        self.assertEqual(len(self.cache), 3)
        self.assertEqual(self.cache.get("192.0.2.2"), (False, None))
        self.assertEqual(self.cache.get("192.0.2.1"), (True, "h1.test"))
        self.assertEqual(self.cache.get("192.0.2.3"), (True, "h3.test"))

    def test_bounded(self) -> None:
        for n in range(1000):
            self.cache.put(str(ipaddress.ip_address(n)), None)
        self.assertEqual(len(self.cache), 3)


class ClientNamerTests(TestCase):
    """The namer with the real resolver, asking a real DNS server on 127.0.0.1."""

    silent = False
    timeout = 5.0

    def setUp(self) -> None:
        self.dns = DNSTestServer(silent=self.silent)
        self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.namer = self.make_namer()

    def make_namer(self, **kwargs: object) -> ClientNamer:
        cfg = DNSConfig(servers=(("127.0.0.1", self.dns.port),), timeout=self.timeout)
        namer = ClientNamer(lambda r: make_resolver(cfg, r), reactor, **kwargs)  # type: ignore[arg-type]
        namer.start()
        self.addCleanup(namer.stop)
        return namer

    def queries(self, rtype: int) -> list[str]:
        return [name for name, t in self.dns.resolver.queries if t == rtype]


class ConfirmedNameTests(ClientNamerTests):
    @inlineCallbacks
    def test_confirmed_name(self):  # type: ignore[no-untyped-def]
        self.dns.add_ptr("127.0.0.2", "Good.Example.Test")
        self.dns.add_a("good.example.test", "192.0.2.9")
        self.dns.add_a("good.example.test", "127.0.0.2")
        c = client("127.0.0.2")
        d = self.namer.name(c)
        self.assertIsNone(c.reverse_name)  # nothing waits: the answer comes later
        self.assertEqual((yield d), "good.example.test")
        self.assertEqual(c.reverse_name, "good.example.test")
        self.assertEqual(c.describe(), "good.example.test [127.0.0.2]")
        self.assertEqual(self.queries(PTR), ["2.0.0.127.in-addr.arpa"])
        self.assertEqual(self.queries(A), ["good.example.test"])
        # cached: the next client is named at once, without asking DNS again
        again = client("127.0.0.2")
        d = self.namer.name(again)
        self.assertEqual(again.reverse_name, "good.example.test")
        self.assertEqual(self.successResultOf(d), "good.example.test")
        self.assertEqual(len(self.dns.resolver.queries), 2)

    @inlineCallbacks
    def test_ipv6_and_ipv4_mapped(self):  # type: ignore[no-untyped-def]
        self.dns.add_ptr("2001:db8::7", "six.example.test")
        self.dns.add_aaaa("six.example.test", "2001:db8::7")
        self.dns.add_ptr("192.0.2.7", "four.example.test")
        self.dns.add_a("four.example.test", "192.0.2.7")
        self.assertEqual((yield self.namer.name(client("2001:db8::7"))), "six.example.test")
        mapped = client("::ffff:192.0.2.7")
        self.assertEqual((yield self.namer.name(mapped)), "four.example.test")
        self.assertEqual(mapped.describe(), "four.example.test [::ffff:192.0.2.7]")
        self.assertIn(("six.example.test", dns.AAAA), self.dns.resolver.queries)

    @inlineCallbacks
    def test_one_query_for_concurrent_clients(self):  # type: ignore[no-untyped-def]
        self.dns.add_ptr("127.0.0.2", "good.example.test")
        self.dns.add_a("good.example.test", "127.0.0.2")
        clients = [client("127.0.0.2") for _ in range(5)]
        results = yield gatherResults([self.namer.name(c) for c in clients])
        self.assertEqual(results, ["good.example.test"] * 5)
        self.assertEqual([c.reverse_name for c in clients], ["good.example.test"] * 5)
        self.assertEqual(len(self.queries(PTR)), 1)
        self.assertEqual(len(self.queries(A)), 1)

    @inlineCallbacks
    def test_unconfirmed_name_not_used(self):  # type: ignore[no-untyped-def]
        """Whoever runs a reverse zone can claim any name: without a matching A record, no name."""
        self.dns.add_ptr("127.0.0.3", "mail.bank.example")
        self.dns.add_a("mail.bank.example", "192.0.2.1")
        c = client("127.0.0.3")
        self.assertIsNone((yield self.namer.name(c)))
        self.assertIsNone(c.reverse_name)
        self.assertEqual(self.queries(A), ["mail.bank.example"])
        # remembered as "no name": no second query
        self.assertIsNone(self.successResultOf(self.namer.name(client("127.0.0.3"))))
        self.assertEqual(len(self.dns.resolver.queries), 2)

    @inlineCallbacks
    def test_no_ptr_and_no_address(self):  # type: ignore[no-untyped-def]
        self.dns.add_ptr("127.0.0.4", "noaddress.example.test")
        self.dns.add_name("noaddress.example.test")  # exists, but no A record (NODATA)
        self.assertIsNone((yield self.namer.name(client("127.0.0.4"))))
        self.assertIsNone((yield self.namer.name(client("127.0.0.5"))))  # NXDOMAIN
        self.assertEqual(self.queries(PTR), ["4.0.0.127.in-addr.arpa", "5.0.0.127.in-addr.arpa"])
        self.assertIsNone(self.successResultOf(self.namer.name(client("127.0.0.5"))))
        self.assertEqual(len(self.queries(PTR)), 2)

    @inlineCallbacks
    def test_hostile_ptr_names_never_used(self):  # type: ignore[no-untyped-def]
        """A PTR that could forge a log line or a Received comment is dropped before any A query."""
        hostile = {
            "127.0.0.6": "evil.test\r\nx",
            "127.0.0.7": "a b.test",
            "127.0.0.8": "x.test)",
            "127.0.0.9": "10.0.0.1",
        }
        for ip, name in hostile.items():
            self.dns.add_ptr(ip, name)
            self.dns.add_a(name, ip)
            c = client(ip)
            self.assertIsNone((yield self.namer.name(c)), name)
            self.assertIsNone(c.reverse_name)
        self.assertEqual(self.queries(A), [])

    @inlineCallbacks
    def test_busy_namer_skips(self):  # type: ignore[no-untyped-def]
        """Past max_in_flight look-ups, a new address gets no name (and nothing cached)."""
        namer = self.make_namer(max_in_flight=1)
        self.dns.add_ptr("127.0.0.2", "good.example.test")
        self.dns.add_a("good.example.test", "127.0.0.2")
        first = namer.name(client("127.0.0.2"))
        self.assertIsNone(self.successResultOf(namer.name(client("127.0.0.3"))))
        self.assertEqual((yield first), "good.example.test")
        self.assertEqual(self.queries(PTR), ["2.0.0.127.in-addr.arpa"])

    def test_not_an_address_or_not_started(self) -> None:
        self.assertIsNone(self.successResultOf(self.namer.name(client("local"))))
        stopped = ClientNamer(lambda r: None, reactor)
        self.assertIsNone(self.successResultOf(stopped.name(client("127.0.0.2"))))
        self.assertEqual(self.dns.resolver.queries, [])

    def test_named_client_left_alone(self) -> None:
        c = client("127.0.0.2")
        c.reverse_name = "known.test"
        self.assertEqual(self.successResultOf(self.namer.name(c)), "known.test")
        self.assertEqual(self.dns.resolver.queries, [])


class SilentServerTests(ClientNamerTests):
    silent = True
    timeout = 0.2

    @inlineCallbacks
    def test_timeout_means_no_name_and_is_remembered(self):  # type: ignore[no-untyped-def]
        c = client("127.0.0.2")
        d = self.namer.name(c)
        self.assertEqual(self.namer.in_flight, 1)
        self.assertIsNone((yield d))
        self.assertIsNone(c.reverse_name)
        self.assertEqual(self.namer.in_flight, 0)
        self.assertEqual(self.queries(PTR), ["2.0.0.127.in-addr.arpa"])
        self.assertIsNone(self.successResultOf(self.namer.name(client("127.0.0.2"))))
        self.assertEqual(len(self.queries(PTR)), 1)


class StopTests(ClientNamerTests):
    silent = True
    timeout = 600.0

    @inlineCallbacks
    def test_stop_ends_outstanding_lookups(self):  # type: ignore[no-untyped-def]
        """Stopping the server does not wait for DNS: waiting clients get no name, the resolver's
        socket and timer are gone (trial fails a test that leaves either behind)."""
        waiting = [self.namer.name(client("127.0.0.2")), self.namer.name(client("127.0.0.3"))]
        self.assertEqual(self.namer.in_flight, 2)
        yield self.namer.stop()
        self.assertEqual([self.successResultOf(d) for d in waiting], [None, None])
        self.assertEqual(self.namer.in_flight, 0)
        self.assertIsNone(self.successResultOf(self.namer.name(client("127.0.0.2"))))
