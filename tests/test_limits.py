"""Connection limits without sockets: the pure counter and log gate, and the wrapper on StringTransport.

The refusal lines are produced by the real SMTP, POP3 and IMAP factories; their login-session
factory fails the test if it is ever called, because a refused connection must build no session.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SkipTest, TestCase

from kms.clientinfo import ClientInfo
from kms.config import ConfigError, LimitsConfig, load_config
from kms.imap.server import IMAPFactory, IMAPSettings
from kms.ipgroups import parse_group
from kms.limits import (
    OK,
    REFUSAL_DEADLINE,
    SERVER_FULL,
    TOO_MANY_FROM_ADDRESS,
    ConnectionCounter,
    ConnectionLimits,
    LogGate,
    address_key,
    raise_descriptor_limit,
)
from kms.pop3.server import POP3Factory, POP3Settings
from kms.smtp.server import SMTPFactory, SMTPSettings

NOBODY = parse_group([]).contains
SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "kms.toml"
MINIMAL = """
[server]
hostname = "mail.example.test"
[domains]
local = ["example.test"]
[ip_groups]
trusted = ["192.0.2.0/24"]
[store]
path = "store"
"""


class ConfigTests(TestCase):
    def load(self, text: str) -> LimitsConfig:
        path = Path(self.mktemp())
        path.write_text(MINIMAL + text)
        return load_config(path).limits

    def problems(self, text: str) -> list[str]:
        return self.assertRaises(ConfigError, self.load, text).problems

    def test_defaults_and_values(self) -> None:
        self.assertEqual(self.load(""), LimitsConfig(2000, 50, ""))
        self.assertEqual(
            self.load(
                '[limits]\nmax_connections = 10\nmax_connections_per_ip = 2\nexempt_group = "trusted"\n'
            ),
            LimitsConfig(10, 2, "trusted"),
        )
        self.assertEqual(load_config(SAMPLE).limits, LimitsConfig(2000, 50, ""))

    def test_problems_named_by_key(self) -> None:
        problems = self.problems(
            '[limits]\nmax_connections = 0\nmax_connections_per_ip = "5"\n'
            'exempt_group = "nope"\nmax_per_ip = 3\n'
        )
        self.assertEqual(
            problems,
            [
                "limits.max_connections: must be at least 1, not 0",
                "limits.max_connections_per_ip: must be an integer, not '5'",
                "limits.max_per_ip: unknown key",
                'limits.exempt_group: names IP group "nope", which [ip_groups] does not define',
            ],
        )


class AddressKeyTests(TestCase):
    def test_forms(self) -> None:
        """IPv4-mapped IPv6 is the IPv4 client; IPv6 is normalized; zones dropped; non-IPs are None."""
        table = [
            ("192.0.2.7", "192.0.2.7"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
            ("::FFFF:c000:0207", "192.0.2.7"),
            ("2001:DB8:0::1", "2001:db8::1"),
            ("fe80::1%eth0", "fe80::1"),
            ("local", None),
            ("", None),
            ("192.0.2.300", None),
        ]
        for host, key in table:
            self.assertEqual(address_key(host), key, host)


class CounterTests(TestCase):
    def test_per_address_limit(self) -> None:
        """The 4th connection from one address is refused, another address still gets in, and a
        release lets the first address in again."""
        c = ConnectionCounter(100, 3, NOBODY)
        self.assertEqual([c.acquire("192.0.2.1") for _ in range(4)], [OK, OK, OK, TOO_MANY_FROM_ADDRESS])
        self.assertEqual(c.acquire("192.0.2.2"), OK)
        self.assertEqual((c.total, c.count("192.0.2.1"), c.count("192.0.2.2")), (4, 3, 1))
        c.release("192.0.2.1")
        self.assertEqual(c.acquire("192.0.2.1"), OK)

    def test_mapped_ipv6_is_the_same_client(self) -> None:
        c = ConnectionCounter(100, 2, NOBODY)
        self.assertEqual(c.acquire("192.0.2.1"), OK)
        self.assertEqual(c.acquire("::ffff:192.0.2.1"), OK)
        self.assertEqual(c.acquire("::ffff:c000:201"), TOO_MANY_FROM_ADDRESS)
        self.assertEqual(c.count("::ffff:192.0.2.1"), 2)
        c.release("::ffff:192.0.2.1")
        c.release("192.0.2.1")
        self.assertEqual((c.total, c.count("192.0.2.1")), (0, 0))

    def test_server_full(self) -> None:
        """The overall limit applies to every address, the exempt ones included."""
        c = ConnectionCounter(3, 2, parse_group(["10.0.0.0/8"]).contains)
        self.assertEqual([c.acquire("10.1.1.1") for _ in range(3)], [OK, OK, OK])
        self.assertEqual(c.acquire("10.1.1.1"), SERVER_FULL)
        self.assertEqual(c.acquire("192.0.2.9"), SERVER_FULL)
        c.release("10.1.1.1")
        self.assertEqual(c.acquire("192.0.2.9"), OK)

    def test_exempt_group(self) -> None:
        """An exempt address is never limited per address (in either spelling), others still are."""
        c = ConnectionCounter(100, 2, parse_group(["192.0.2.0/24"]).contains)
        self.assertEqual({c.acquire("::ffff:192.0.2.5") for _ in range(10)}, {OK})
        self.assertEqual(c.count("192.0.2.5"), 10)
        self.assertEqual([c.acquire("198.51.100.1") for _ in range(3)], [OK, OK, TOO_MANY_FROM_ADDRESS])

    def test_non_ip_peers_count_overall_only(self) -> None:
        """UNIX-socket peers have no address: no per-address limit, but they fill the server."""
        c = ConnectionCounter(3, 1, NOBODY)
        self.assertEqual([c.acquire("local") for _ in range(4)], [OK, OK, OK, SERVER_FULL])
        self.assertEqual(c.count("local"), 0)

    def test_release_without_acquire_refused(self) -> None:
        c = ConnectionCounter(10, 10, NOBODY)
        self.assertRaises(ValueError, c.release, "192.0.2.1")
        c.acquire("192.0.2.1")
        self.assertRaises(ValueError, c.release, "192.0.2.2")
        self.assertEqual((c.total, c.count("192.0.2.1")), (1, 1))

    def test_limits_at_least_one(self) -> None:
        self.assertRaises(ValueError, ConnectionCounter, 0, 1, NOBODY)
        self.assertRaises(ValueError, ConnectionCounter, 1, 0, NOBODY)


_HOSTS = st.sampled_from(["192.0.2.1", "::ffff:192.0.2.1", "192.0.2.2", "2001:db8::1", "10.0.0.1", "local"])


class CounterPropertyTests(TestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        st.integers(1, 6),
        st.integers(1, 4),
        st.lists(st.tuples(st.booleans(), _HOSTS), max_size=60),
    )
    def test_counts_never_negative_and_return_to_zero(
        self, max_total: int, max_per: int, steps: list[tuple[bool, str]]
    ) -> None:
        """Any interleaving of connects and closes: counts stay within 0..limit, match an independent
        tally, a stray release changes nothing, and closing what got in returns every count to zero."""
        exempt = parse_group(["10.0.0.0/8"]).contains
        c = ConnectionCounter(max_total, max_per, exempt)
        held: list[str] = []
        for connect, host in steps:
            if connect:
                if c.acquire(host) == OK:
                    held.append(host)
            elif any(address_key(h) == address_key(host) for h in held):
                match = next(h for h in held if address_key(h) == address_key(host))
                held.remove(match)
                c.release(host)
            elif address_key(host) is not None or not held:
                self.assertRaises(ValueError, c.release, host)
            self.assertEqual(c.total, len(held))
            self.assertLessEqual(c.total, max_total)
            for h in {"192.0.2.1", "192.0.2.2", "2001:db8::1", "10.0.0.1"}:
                n = c.count(h)
                self.assertEqual(n, sum(address_key(x) == h for x in held))
                self.assertGreaterEqual(n, 0)
                if not exempt(h):
                    self.assertLessEqual(n, max_per)
        for host in reversed(held):
            c.release(host)
        self.assertEqual(c.total, 0)
        self.assertEqual(c._per_address, {})


class LogGateTests(TestCase):
    def test_once_per_minute_per_address(self) -> None:
        gate = LogGate(interval=60)
        self.assertEqual(gate.admit("a", 0), 0)
        self.assertEqual([gate.admit("a", t) for t in (1, 30, 59.9)], [None, None, None])
        self.assertEqual(gate.admit("b", 10), 0)
        self.assertEqual(gate.admit("a", 60), 3)  # the line says how many were held back
        self.assertEqual(gate.admit("a", 61), None)
        self.assertEqual(gate.admit("a", 500), 1)

    def test_table_is_bounded(self) -> None:
        """A flood from more addresses than the table holds shares one entry instead of growing it;
        entries older than the interval make room again."""
        gate = LogGate(interval=60, size=3)
        self.assertEqual([gate.admit(k, 0) for k in "abc"], [0, 0, 0])
        self.assertEqual(gate.admit("d", 1), 0)  # the shared entry's first line
        self.assertEqual([gate.admit(k, 2) for k in "efg"], [None, None, None])
        self.assertLessEqual(len(gate._last), 4)
        self.assertEqual(gate.admit("h", 61), 0)  # a, b, c forgotten: h has its own entry
        self.assertNotIn("a", gate._last)


class DescriptorLimitTests(TestCase):
    def setUp(self) -> None:
        before = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, before)

    def test_raised_to_what_is_needed_never_lowered(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 600:
            raise SkipTest(f"hard open-file limit {hard} too low to test")
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
        self.assertIsNone(raise_descriptor_limit(300))
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (556, hard))
        self.assertIsNone(raise_descriptor_limit(10))
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (556, hard))

    def test_warning_when_the_hard_limit_is_too_low(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            raise SkipTest("no hard open-file limit")
        warning = raise_descriptor_limit(hard)
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (hard, hard))
        assert warning is not None
        self.assertIn(f"needs about {hard + 256} open files, but this process may open only {hard}", warning)


# --- the wrapper on StringTransport ---------------------------------------------------------------

HOSTNAME = "mx.example.test"


def _no_session(client: ClientInfo) -> Any:
    raise AssertionError(f"a login session was built for {client.peer_host}")


def _smtp() -> SMTPFactory:
    settings = SMTPSettings(
        hostname=HOSTNAME,
        listener="smtp",
        banner="ESMTP",
        implicit_tls=False,
        require_auth=False,
        max_message_size=10**6,
        max_recipients=10,
    )
    return SMTPFactory(settings, None, _no_session, None, clock=Clock())  # type: ignore[arg-type]


def _pop3() -> POP3Factory:
    settings = POP3Settings(hostname=HOSTNAME, listener="pop3", implicit_tls=False, banner_product=None)
    return POP3Factory(settings, _no_session, _no_session, None, clock=Clock())


def _imap() -> IMAPFactory:
    settings = IMAPSettings(
        hostname=HOSTNAME, listener="imap", implicit_tls=False, hide_version=True, append_limit=10**6
    )
    return IMAPFactory(settings, _no_session, _no_session, None, clock=Clock())


PER_ADDRESS = b"Too many connections from your address, try again later\r\n"
BUSY = b"Too many connections, server busy, try again later\r\n"
REFUSALS = [
    (_smtp, TOO_MANY_FROM_ADDRESS, b"421 4.7.0 mx.example.test " + PER_ADDRESS),
    (_smtp, SERVER_FULL, b"421 4.3.2 mx.example.test " + BUSY),
    (_pop3, TOO_MANY_FROM_ADDRESS, b"-ERR [SYS/TEMP] " + PER_ADDRESS),
    (_pop3, SERVER_FULL, b"-ERR [SYS/TEMP] " + BUSY),
    (_imap, TOO_MANY_FROM_ADDRESS, b"* BYE [UNAVAILABLE] " + PER_ADDRESS),
    (_imap, SERVER_FULL, b"* BYE [UNAVAILABLE] " + BUSY),
]


class RecordingLogs:
    def __init__(self) -> None:
        self.lines: list[tuple[str, ClientInfo | None, dict[str, object]]] = []

    def security(self, event: str, client: ClientInfo | None = None, **fields: object) -> None:
        self.lines.append((event, client, fields))


class _Echo(Protocol):
    """A stand-in real protocol for the wrapper's own bookkeeping (the real ones are tested e2e)."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def connectionMade(self) -> None:
        self.events.append("made")
        self.transport.write(b"hello\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.events.append(f"data {data!r}")

    def connectionLost(self, reason: object = None) -> None:
        self.events.append("lost")


class _EchoFactory(Factory):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.started = self.stopped = 0

    def buildProtocol(self, addr: object) -> Protocol:
        return _Echo(self.events)

    def refusal(self, verdict: str) -> bytes:
        return f"NO {verdict}\r\n".encode()

    def startFactory(self) -> None:
        self.started += 1

    def stopFactory(self) -> None:
        self.stopped += 1


def _addr(host: str) -> IPv4Address | IPv6Address:
    return IPv6Address("TCP", host, 40000) if ":" in host else IPv4Address("TCP", host, 40000)


class WrapperTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.logs = RecordingLogs()

    def limits(self, total: int = 100, per_address: int = 3) -> ConnectionLimits:
        counter = ConnectionCounter(total, per_address, NOBODY)
        return ConnectionLimits(counter, self.clock, self.logs)

    def connect(self, factory: Factory, host: str) -> tuple[Protocol, StringTransport]:
        protocol = factory.buildProtocol(_addr(host))
        assert protocol is not None
        transport = StringTransport(peerAddress=_addr(host), hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
        protocol.makeConnection(transport)
        return protocol, transport

    def test_refusal_lines(self) -> None:
        """Each protocol's own refusal, from the real factory, with no login session built; the
        connection is closed at once."""
        for make, verdict, line in REFUSALS:
            limits = self.limits(total=1 if verdict == SERVER_FULL else 100, per_address=1)
            factory = limits.wrap(make(), "x")
            limits.counter.acquire("192.0.2.200" if verdict == SERVER_FULL else "192.0.2.1")
            protocol, transport = self.connect(factory, "192.0.2.1")
            self.assertEqual(transport.value(), line)
            self.assertTrue(transport.disconnecting)
            protocol.dataReceived(b"EHLO x\r\nUSER a\r\na LOGIN a b\r\n")  # ignored, no session either
            self.assertEqual(transport.value(), line)
            self.assertEqual(limits.counter.total, 1)  # a refusal holds no slot
            protocol.connectionLost(None)  # type: ignore[arg-type]
            self.assertEqual(limits.counter.total, 1)

    def test_counted_connection_passes_through_and_releases_once(self) -> None:
        """The real protocol gets the transport itself and every byte; the slot is released on the
        first connectionLost only."""
        limits = self.limits(per_address=1)
        inner = _EchoFactory()
        factory = limits.wrap(inner, "imap")
        protocol, transport = self.connect(factory, "::ffff:192.0.2.1")
        self.assertEqual(transport.value(), b"hello\r\n")
        protocol.dataReceived(b"abc")
        self.assertEqual((limits.counter.total, limits.counter.count("192.0.2.1")), (1, 1))
        second, refused = self.connect(factory, "192.0.2.1")
        self.assertEqual(refused.value(), b"NO too many from this address\r\n")
        protocol.connectionLost(None)  # type: ignore[arg-type]
        protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(limits.counter.total, 0)
        self.assertEqual(inner.events, ["made", "data b'abc'", "lost", "lost"])
        _, transport = self.connect(factory, "192.0.2.1")
        self.assertEqual(transport.value(), b"hello\r\n")

    def test_factory_start_and_stop_reach_the_real_factory(self) -> None:
        inner = _EchoFactory()
        factory = self.limits().wrap(inner, "smtp")
        factory.doStart()
        factory.doStop()
        self.assertEqual((inner.started, inner.stopped), (1, 1))

    def test_unix_peer(self) -> None:
        """A peer without an IP address (UNIX socket) is counted overall, not per address."""
        limits = self.limits(total=2, per_address=1)
        factory = limits.wrap(_EchoFactory(), "smtp")
        for _ in range(2):
            self.assertIsNotNone(factory.buildProtocol(UNIXAddress(None)))
        refusal = factory.buildProtocol(UNIXAddress(None))
        transport = StringTransport()
        refusal.makeConnection(transport)  # type: ignore[union-attr]
        self.assertEqual(transport.value(), b"NO server full\r\n")

    def test_refused_client_cut_off_after_deadline(self) -> None:
        """A refused client that never lets the close finish (e.g. never completes TLS) is aborted."""
        limits = self.limits(per_address=1)
        factory = limits.wrap(_EchoFactory(), "imaps")
        self.connect(factory, "192.0.2.1")
        protocol, transport = self.connect(factory, "192.0.2.1")
        self.clock.advance(REFUSAL_DEADLINE - 1)
        self.assertFalse(transport.disconnected)
        self.clock.advance(1)
        self.assertTrue(transport.disconnected)
        # A refusal that closed in time leaves no timer behind.
        protocol, transport = self.connect(factory, "192.0.2.1")
        protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refusals_logged_once_per_address_per_minute(self) -> None:
        limits = self.limits(per_address=1)
        factory = limits.wrap(_EchoFactory(), "pop3")
        self.connect(factory, "192.0.2.1")
        self.connect(factory, "192.0.2.2")
        for _ in range(50):
            self.connect(factory, "192.0.2.1")
            self.connect(factory, "::ffff:192.0.2.2")
        self.assertEqual(len(self.logs.lines), 2)
        event, client, fields = self.logs.lines[0]
        self.assertEqual(event, "connection-refused")
        assert client is not None
        self.assertEqual((client.peer_host, client.listener), ("192.0.2.1", "pop3"))
        self.assertEqual(fields, {"reason": TOO_MANY_FROM_ADDRESS, "limit": 1, "held_back": 0})
        self.clock.advance(60)
        self.connect(factory, "192.0.2.1")
        self.assertEqual(len(self.logs.lines), 3)
        self.assertEqual(self.logs.lines[2][2]["held_back"], 49)
