"""kms.dns: which servers the resolver asks, and that it leaves nothing running on the reactor."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial import unittest

from kms.config import DNSConfig
from kms.dns import make_resolver, nameservers
from tests.support.dnsserver import DNSTestServer


class NameserversTests(unittest.TestCase):
    def test_nameserver_lines_in_order(self) -> None:
        text = "# comment\nsearch example.test\nnameserver 10.0.0.1\nnameserver ::1\nnameserver junk\n"
        self.assertEqual(nameservers(text), [("10.0.0.1", 53), ("::1", 53)])

    def test_nothing_configured(self) -> None:
        self.assertEqual(nameservers("options ndots:2\n"), [])


class ResolverTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_resolv_conf_servers_are_asked(self) -> None:
        """With no [dns] servers, resolv.conf's are used, read once: a re-read timer left on the
        reactor would fail this test as a dirty reactor."""
        server = DNSTestServer()
        server.add_a("mx.example.test", "127.0.0.9")
        server.start(reactor)
        self.addCleanup(server.stop)
        conf = Path(self.mktemp())
        conf.write_text("nameserver 127.0.0.1\n")
        resolver = make_resolver(DNSConfig(timeout=2), reactor, conf)
        # resolv.conf has no port syntax: point the parsed server at the test server's port
        self.assertEqual(resolver.servers, [("127.0.0.1", 53)])
        resolver.servers = [("127.0.0.1", server.port)]
        answers, _, _ = yield resolver.lookupAddress("mx.example.test")
        self.assertEqual(answers[0].payload.dottedQuad(), "127.0.0.9")

    def test_missing_resolv_conf_means_localhost(self) -> None:
        resolver = make_resolver(DNSConfig(), reactor, Path(self.mktemp()))
        self.assertEqual(resolver.servers, [("127.0.0.1", 53)])
