"""Where outbound mail goes: the pure ordering rules, then `resolve_hops` / `smarthost_hops` against a
real twisted.names server on 127.0.0.1 (tests/support/dnsserver.py) through `kms.dns.make_resolver`.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults, inlineCallbacks
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.trial.unittest import TestCase

from kms.config import DNSConfig
from kms.dns import make_resolver
from kms.queue.interfaces import DestinationError, Hop
from kms.queue.mx import (
    MAX_HOPS,
    HopCache,
    address_literal,
    ascii_domain,
    interleave,
    mx_records,
    order_hosts,
    parse_smarthost,
    resolve_hops,
    smarthost_hops,
    usable,
)
from tests.support.dnsserver import DNSTestServer


def rr(name: str, payload: Any) -> dns.RRHeader:
    return dns.RRHeader(name=name.encode(), type=payload.TYPE, payload=payload)


class PureTests(TestCase):
    def test_address_literals(self) -> None:
        self.assertEqual(address_literal("[192.0.2.1]"), "192.0.2.1")
        self.assertEqual(address_literal("[IPv6:2001:DB8::1]"), "2001:db8::1")
        self.assertEqual(address_literal("[ipv6:::1]"), "::1")
        self.assertIsNone(address_literal("example.org"))
        for bad in ("[192.0.2.300]", "[2001:db8::1]", "[IPv6:192.0.2.1]", "[192.0.2.1", "[x.org]", "[]"):
            self.assertRaises(ValueError, address_literal, bad)

    def test_domain_names(self) -> None:
        self.assertEqual(ascii_domain("Example.ORG."), "example.org")
        self.assertEqual(ascii_domain("bücher.example"), "xn--bcher-kva.example")
        for bad in ("", ".", "a..b", "-a.test", "a_b.test", "a b.test", "evil.test\r\nX", "a" * 64 + ".test"):
            self.assertRaises(ValueError, ascii_domain, bad)

    def test_order_hosts(self) -> None:
        """Preference order; equal preferences shuffled (every order turns up); each host once; no "."."""
        records = [(20, "c"), (10, "a"), (10, "b"), (30, ""), (20, "a")]
        orders = {tuple(order_hosts(records, random.Random(seed))) for seed in range(40)}
        self.assertEqual(orders, {("a", "b", "c"), ("b", "a", "c")})
        self.assertEqual(order_hosts([(5, "x"), (1, "y"), (3, "z")], random.Random(1)), ["y", "z", "x"])

    def test_interleave(self) -> None:
        self.assertEqual(interleave(["6a", "6b", "6c"], ["4a"]), ["6a", "4a", "6b", "6c"])
        self.assertEqual(interleave([], ["4a", "4b"]), ["4a", "4b"])

    def test_usable(self) -> None:
        for good in ("127.0.0.2", "192.0.2.1", "::1", "10.0.0.1"):
            self.assertTrue(usable(good), good)
        for bad in ("0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255"):
            self.assertFalse(usable(bad), bad)

    def test_mx_records_follow_cnames_in_the_answer(self) -> None:
        answers = [
            rr("alias.test", dns.Record_CNAME(b"real.test")),
            rr("real.test", dns.Record_MX(10, b"mx.real.test")),
            rr("other.test", dns.Record_MX(5, b"mx.other.test")),
        ]
        self.assertEqual(mx_records(answers, "alias.test"), [(10, "mx.real.test")])
        loop = [rr("a.test", dns.Record_CNAME(b"b.test")), rr("b.test", dns.Record_CNAME(b"a.test"))]
        self.assertEqual(mx_records(loop, "a.test"), [])

    def test_parse_smarthost(self) -> None:
        self.assertEqual(parse_smarthost("relay.example.org:587"), ("relay.example.org", 587))
        self.assertEqual(parse_smarthost("[192.0.2.9]:25"), ("[192.0.2.9]", 25))
        self.assertEqual(parse_smarthost("[2001:db8::9]:465"), ("[IPv6:2001:db8::9]", 465))
        for bad in ("relay", "relay:", ":25", "relay:0", "relay:70000", "relay:x"):
            self.assertRaises(ValueError, parse_smarthost, bad)


class _DNSCase(TestCase):
    silent = False

    def setUp(self) -> None:
        self.dns = DNSTestServer(silent=self.silent)
        self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        config = DNSConfig(servers=(("127.0.0.1", self.dns.port),), timeout=0.5)
        self.resolver = make_resolver(config, reactor)

    def hops(self, domain: str, port: int = 25, seed: int = 1) -> Deferred[list[Hop]]:
        return resolve_hops(self.resolver, domain, port, reactor=reactor, rng=random.Random(seed))

    @inlineCallbacks
    def refused(self, d: Deferred[Any]) -> Any:
        try:
            result = yield d
        except DestinationError as error:
            return error
        self.fail(f"expected DestinationError, got {result!r}")


class ResolveTests(_DNSCase):
    @inlineCallbacks
    def test_preference_order_and_families(self) -> None:
        """MX by preference; each host's addresses IPv6 first, interleaved with IPv4."""
        self.dns.add_mx("example.test", 20, "mx2.example.test")
        self.dns.add_mx("example.test", 10, "mx1.example.test")
        self.dns.add_a("mx1.example.test", "127.0.0.2")
        self.dns.add_a("mx1.example.test", "127.0.0.5")
        self.dns.add_aaaa("mx1.example.test", "::1")
        self.dns.add_a("mx2.example.test", "127.0.0.3")
        hops = yield self.hops("Example.Test", 2525)
        self.assertEqual(
            hops,
            [
                Hop("mx1.example.test", "::1", 2525),
                Hop("mx1.example.test", "127.0.0.2", 2525),
                Hop("mx1.example.test", "127.0.0.5", 2525),
                Hop("mx2.example.test", "127.0.0.3", 2525),
            ],
        )

    @inlineCallbacks
    def test_equal_preferences_are_shuffled(self) -> None:
        self.dns.add_mx("example.test", 10, "a.example.test")
        self.dns.add_mx("example.test", 10, "b.example.test")
        self.dns.add_a("a.example.test", "127.0.0.2")
        self.dns.add_a("b.example.test", "127.0.0.3")
        firsts = set()
        for seed in range(12):
            hops = yield self.hops("example.test", seed=seed)
            self.assertEqual(len(hops), 2)
            firsts.add(hops[0].name)
        self.assertEqual(firsts, {"a.example.test", "b.example.test"})

    @inlineCallbacks
    def test_host_without_addresses_is_skipped(self) -> None:
        """An MX host with no address (NXDOMAIN or NODATA) is skipped; the same address is listed once."""
        self.dns.add_mx("example.test", 5, "gone.example.test")
        self.dns.add_mx("example.test", 6, "empty.example.test")
        self.dns.add_name("empty.example.test")
        self.dns.add_mx("example.test", 10, "mx.example.test")
        self.dns.add_mx("example.test", 20, "same.example.test")
        self.dns.add_a("mx.example.test", "127.0.0.2")
        self.dns.add_a("same.example.test", "127.0.0.2")
        hops = yield self.hops("example.test")
        self.assertEqual(hops, [Hop("mx.example.test", "127.0.0.2", 25)])

    @inlineCallbacks
    def test_no_mx_falls_back_to_the_domain(self) -> None:
        """RFC 5321 §5.1: no MX records, the domain's own A/AAAA is the implicit MX."""
        self.dns.add_a("plain.test", "127.0.0.2")
        hops = yield self.hops("plain.test")
        self.assertEqual(hops, [Hop("plain.test", "127.0.0.2", 25)])
        self.assertIn(("plain.test", dns.MX), self.dns.resolver.queries)

    @inlineCallbacks
    def test_null_mx(self) -> None:
        """RFC 7505: permanent, 5.1.10, and no address look-up at all."""
        self.dns.add_null_mx("nomail.test")
        self.dns.add_a("nomail.test", "127.0.0.2")
        error = yield self.refused(self.hops("nomail.test"))
        self.assertTrue(error.permanent)
        self.assertTrue(error.reason.startswith("5.1.10 "), error.reason)
        self.assertEqual(self.dns.resolver.queries, [("nomail.test", dns.MX)])

    @inlineCallbacks
    def test_null_mx_among_others_is_ignored(self) -> None:
        self.dns.add_null_mx("odd.test")
        self.dns.add_mx("odd.test", 10, "mx.odd.test")
        self.dns.add_a("mx.odd.test", "127.0.0.2")
        hops = yield self.hops("odd.test")
        self.assertEqual(hops, [Hop("mx.odd.test", "127.0.0.2", 25)])

    @inlineCallbacks
    def test_nxdomain_is_permanent(self) -> None:
        error = yield self.refused(self.hops("nowhere.test"))
        self.assertTrue(error.permanent)
        self.assertIn("NXDOMAIN", error.reason)

    @inlineCallbacks
    def test_no_address_anywhere_is_permanent(self) -> None:
        """Definite answers only (NODATA, NXDOMAIN for the MX host): nothing will ever work."""
        self.dns.add_name("bare.test")
        error = yield self.refused(self.hops("bare.test"))
        self.assertTrue(error.permanent)
        self.assertTrue(error.reason.startswith("5.4.4 no MX and no address for bare.test"), error.reason)
        self.dns.add_mx("dangling.test", 10, "missing.dangling.test")
        error = yield self.refused(self.hops("dangling.test"))
        self.assertTrue(error.permanent)
        self.assertIn("no MX host of dangling.test", error.reason)

    @inlineCallbacks
    def test_server_failure_is_temporary(self) -> None:
        """SERVFAIL for the MX query, or for every address query of the only MX host: retry later."""
        lookup = self.dns.resolver._lookup

        def failing(name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
            if name.decode().startswith("broken"):
                return fail(RuntimeError("server trouble"))
            return lookup(name, cls, type, timeout)

        self.dns.resolver._lookup = failing  # type: ignore[method-assign]
        self.dns.add_name("broken.test")
        error = yield self.refused(self.hops("broken.test"))
        self.assertFalse(error.permanent)
        self.assertIn("DNS failure (DNSServerError)", error.reason)
        self.dns.add_mx("half.test", 10, "broken-mx.half.test")
        error = yield self.refused(self.hops("half.test"))
        self.assertFalse(error.permanent)
        self.assertTrue(error.reason.startswith("4.4.3 no MX host of half.test"), error.reason)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)  # the server logs each SERVFAIL

    @inlineCallbacks
    def test_address_literals_need_no_dns(self) -> None:
        hops = yield self.hops("[127.0.0.2]", 2525)
        self.assertEqual(hops, [Hop("[127.0.0.2]", "127.0.0.2", 2525)])
        hops = yield self.hops("[IPv6:::1]")
        self.assertEqual(hops, [Hop("[IPv6:::1]", "::1", 25)])
        for bad in ("[0.0.0.0]", "[999.1.1.1]", "[224.0.0.1]"):
            error = yield self.refused(self.hops(bad))
            self.assertTrue(error.permanent)
        error = yield self.refused(self.hops("bad_name.test"))
        self.assertTrue(error.permanent)
        self.assertEqual(self.dns.resolver.queries, [])

    @inlineCallbacks
    def test_hops_are_bounded(self) -> None:
        for i in range(15):
            self.dns.add_mx("many.test", i, f"mx{i}.many.test")
            self.dns.add_a(f"mx{i}.many.test", f"127.0.1.{i + 1}")
            self.dns.add_a(f"mx{i}.many.test", f"127.0.2.{i + 1}")
        hops = yield self.hops("many.test")
        self.assertEqual(len(hops), MAX_HOPS)
        self.assertEqual([h.name for h in hops[:4]], ["mx0.many.test"] * 2 + ["mx1.many.test"] * 2)
        mx_hosts_asked = {name for name, rtype in self.dns.resolver.queries if rtype == dns.A}
        self.assertEqual(len(mx_hosts_asked), 10)

    @inlineCallbacks
    def test_mx_names_that_are_not_host_names_are_skipped(self) -> None:
        """A hostile answer's MX target with control characters is never looked up or used."""
        self.dns.resolver.add("evil.test", dns.MX, dns.Record_MX(5, b"bad\r\nname.evil.test"))
        self.dns.add_mx("evil.test", 10, "mx.evil.test")
        self.dns.add_a("mx.evil.test", "127.0.0.2")
        hops = yield self.hops("evil.test")
        self.assertEqual(hops, [Hop("mx.evil.test", "127.0.0.2", 25)])
        self.assertFalse(any("\r" in name for name, _ in self.dns.resolver.queries))

    @inlineCallbacks
    def test_unusable_addresses_dropped(self) -> None:
        self.dns.add_mx("weird.test", 10, "mx.weird.test")
        self.dns.add_a("mx.weird.test", "0.0.0.0")
        self.dns.add_a("mx.weird.test", "127.0.0.2")
        self.dns.add_aaaa("mx.weird.test", "ff02::1")
        hops = yield self.hops("weird.test")
        self.assertEqual(hops, [Hop("mx.weird.test", "127.0.0.2", 25)])


class SmarthostTests(_DNSCase):
    def smarthost(self, spec: str) -> Deferred[list[Hop]]:
        return smarthost_hops(self.resolver, spec, reactor=reactor)

    @inlineCallbacks
    def test_name_resolves_without_mx(self) -> None:
        self.dns.add_mx("relay.test", 10, "elsewhere.test")
        self.dns.add_a("relay.test", "127.0.0.2")
        self.dns.add_aaaa("relay.test", "::1")
        hops = yield self.smarthost("relay.test:587")
        self.assertEqual(hops, [Hop("relay.test", "::1", 587), Hop("relay.test", "127.0.0.2", 587)])
        self.assertNotIn(dns.MX, [rtype for _, rtype in self.dns.resolver.queries])

    @inlineCallbacks
    def test_literals(self) -> None:
        self.assertEqual((yield self.smarthost("[127.0.0.2]:2525")), [Hop("[127.0.0.2]", "127.0.0.2", 2525)])
        self.assertEqual((yield self.smarthost("127.0.0.3:25")), [Hop("127.0.0.3", "127.0.0.3", 25)])
        self.assertEqual((yield self.smarthost("[::1]:465")), [Hop("[IPv6:::1]", "::1", 465)])
        self.assertEqual(self.dns.resolver.queries, [])

    @inlineCallbacks
    def test_failures_are_temporary(self) -> None:
        """A smarthost that cannot be found never bounces mail."""
        for spec in ("missing.test:25", "bad spec"):
            error = yield self.refused(self.smarthost(spec))
            self.assertFalse(error.permanent, spec)


class SilentServerTests(_DNSCase):
    silent = True

    @inlineCallbacks
    def test_timeout_is_temporary(self) -> None:
        """A DNS server that never answers: temporary, after one query per look-up."""
        error = yield self.refused(self.hops("example.test"))
        self.assertFalse(error.permanent)
        self.assertIn("DNS timeout", error.reason)
        self.assertEqual(self.dns.resolver.queries, [("example.test", dns.MX)])
        error = yield self.refused(smarthost_hops(self.resolver, "relay.test:25", reactor=reactor))
        self.assertFalse(error.permanent)
        self.assertIn("DNS timeout", error.reason)


class HopCacheTests(_DNSCase):
    """Counted against the real DNS server: what reaches it is what the cache did not answer."""

    @inlineCallbacks
    def test_answers_are_kept_for_ttl_and_shared_while_pending(self) -> None:
        self.dns.add_mx("example.test", 10, "mx1.example.test")
        self.dns.add_a("mx1.example.test", "127.0.0.2")
        clock = Clock()
        cache = HopCache(clock, ttl=60)

        def ask() -> Deferred[list[Hop]]:
            return cache.resolve("example.test", lambda: self.hops("example.test"))

        first, second = yield gatherResults([ask(), ask()])
        self.assertEqual(first, second)
        asked = len(self.dns.resolver.queries)
        self.assertGreater(asked, 0)
        clock.advance(59)
        self.assertEqual((yield ask()), first)
        self.assertEqual(len(self.dns.resolver.queries), asked)  # from the cache
        clock.advance(1)
        yield ask()
        self.assertEqual(len(self.dns.resolver.queries), 2 * asked)  # expired: asked again

    @inlineCallbacks
    def test_permanent_failures_are_kept_temporary_ones_are_not(self) -> None:
        self.dns.add_null_mx("nomail.test")
        cache = HopCache(Clock(), ttl=60)
        for _ in range(2):
            error = yield self.refused(cache.resolve("nomail.test", lambda: self.hops("nomail.test")))
            self.assertTrue(error.permanent)
        self.assertEqual(len([q for q in self.dns.resolver.queries if q[0] == "nomail.test"]), 1)
        calls = []

        def temporary() -> Deferred[list[Hop]]:
            calls.append(1)
            return fail(DestinationError("slow.test", "4.4.3 DNS timeout", permanent=False))

        for _ in range(2):
            error = yield self.refused(cache.resolve("slow.test", temporary))
            self.assertFalse(error.permanent)
        self.assertEqual(len(calls), 2)
