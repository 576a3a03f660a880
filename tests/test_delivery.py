"""The pure decisions of the SMTP backend: relay control, the Received header, queue ids."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from kms.clientinfo import ClientInfo
from kms.ipgroups import parse_group
from kms.smtp.delivery import (
    RelayRules,
    new_queue_id,
    received_header,
    recipient_decision,
    split_address,
    trace_hops,
)
from kms.smtp.interfaces import Envelope

RULES = RelayRules(("example.test", "example.org"), parse_group(["192.168.0.0/16", "::1"]), True)


def client(ip: str = "192.0.2.7", identity: str | None = None, reverse: str | None = None) -> ClientInfo:
    info = ClientInfo(ip, 40000, "127.0.0.1", 25, "smtp", reverse_name=reverse)
    info.identity = identity
    return info


def envelope(
    helo: str = "client.remote.test",
    recipients: tuple[str, ...] = ("a@example.test",),
    info: ClientInfo | None = None,
    protocol: str = "ESMTP",
) -> Envelope:
    return Envelope(info or client(), helo, protocol, "s@remote.test", recipients)


class RelayDecisionTests(TestCase):
    def test_table(self) -> None:
        """Local domains from anyone; elsewhere only from the local group or an authenticated client."""
        cases = [
            (client(), "bob@example.test", "local"),
            (client(), "Bob@EXAMPLE.ORG", "local"),
            (client(), "postmaster", "local"),  # RFC 5321 bare postmaster
            (client(), "x@elsewhere.test", "deny"),
            (client(), "x@example.test.evil", "deny"),
            (client(), "x@sub.example.test", "deny"),  # subdomains are not local
            (client("192.168.4.4"), "x@elsewhere.test", "relay"),
            (client("::ffff:192.168.4.4"), "x@elsewhere.test", "relay"),
            (client("::1"), "x@elsewhere.test", "relay"),
            (client(identity="alice@example.test"), "x@elsewhere.test", "relay"),
            (client("local"), "x@elsewhere.test", "deny"),
        ]
        for info, recipient, verdict in cases:
            self.assertEqual(recipient_decision(RULES, info, recipient), verdict, (info, recipient))

    def test_authenticated_relay_can_be_switched_off(self) -> None:
        rules = RelayRules(RULES.local_domains, RULES.local_group, allow_authenticated=False)
        self.assertEqual(recipient_decision(rules, client(identity="a@example.test"), "x@else.test"), "deny")

    def test_split_address(self) -> None:
        self.assertEqual(split_address("Local@Example.Test"), ("Local", "example.test"))
        self.assertEqual(split_address('"a@b"@example.test'), ('"a@b"', "example.test"))
        self.assertEqual(split_address("postmaster"), ("postmaster", ""))


class ReceivedHeaderTests(TestCase):
    def test_standard_form(self) -> None:
        """RFC 5321 §4.4 form, folded, LF endings, one recipient named, UTC date."""
        header = received_header(envelope(), "mx.example.test", "QID", 1_700_000_000.0)
        self.assertEqual(
            header,
            b"Received: from client.remote.test (unknown [192.0.2.7])\n"
            b"\tby mx.example.test with ESMTP id QID\n"
            b"\tfor <a@example.test>;\n"
            b"\tTue, 14 Nov 2023 22:13:20 +0000\n",
        )

    def test_version_ipv6_reverse_name_and_several_recipients(self) -> None:
        info = client("2001:db8::7", reverse="host.remote.test")
        header = received_header(
            envelope(recipients=("a@example.test", "b@example.test"), info=info, protocol="ESMTPSA"),
            "mx.example.test",
            "QID",
            0.0,
            version="kms 0.1.0",
        ).decode()
        self.assertIn("from client.remote.test (host.remote.test [IPv6:2001:db8::7])", header)
        self.assertIn("\tby mx.example.test (kms 0.1.0) with ESMTPSA id QID;\n", header)
        self.assertNotIn("for <", header)

    def test_hidden_client(self) -> None:
        """hide_local_ip: neither the address nor the reverse name appears."""
        info = client("192.168.1.20", reverse="pc17.lan.example.test")
        header = received_header(envelope(info=info), "mx.example.test", "QID", 0.0, hide_client=True)
        self.assertTrue(header.startswith(b"Received: from client.remote.test\n\tby mx.example.test"))
        self.assertNotIn(b"192.168", header)
        self.assertNotIn(b"pc17", header)

    def test_hostile_helo_and_reverse_name(self) -> None:
        """Comment syntax, header text or non-ASCII in HELO or PTR names never reach the header."""
        for helo in ("x) (y", "a\nX-Evil: 1", "", "hé.test", "a" * 300, "x;y"):
            info = client(reverse="evil) (x")
            header = received_header(envelope(helo=helo, info=info), "mx.example.test", "QID", 0.0)
            self.assertTrue(header.startswith(b"Received: from unknown (unknown [192.0.2.7])\n"), helo)
            self.assertEqual(header.count(b"\n"), 4)


class QueueIdTests(TestCase):
    def test_unique_and_time_ordered(self) -> None:
        ids = [new_queue_id(1000.0) for _ in range(5000)]
        self.assertEqual(len(set(ids)), 5000)
        self.assertLess(new_queue_id(1000.0), new_queue_id(1001.0))
        self.assertTrue(all(i.isalnum() and i.isupper() for i in ids[:10]))


class TraceHopsTests(TestCase):
    def test_counts_received_in_the_header_section_only(self) -> None:
        message = b"Received: a\n\tfolded\nRECEIVED: b\nSubject: x\nX-Received: no\n\nReceived: in the body\n"
        self.assertEqual(trace_hops(message), 2)
        self.assertEqual(trace_hops(b"Subject: none\n\nbody\n"), 0)
        self.assertEqual(trace_hops(b"Received: cut short"), 1)
