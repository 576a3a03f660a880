"""The pure parts of update checks: the feed, version choice, update.json, status lines, HTTP helpers.

The fetch's guard protocol (CONNECT answer, byte cap) is driven here on a StringTransport; the real
network paths are in tests/test_update_e2e.py.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from kms.config import Config, ConfigError, load_config
from kms.httpfetch import (
    FetchError,
    Proxy,
    Target,
    _Budget,
    _Guard,
    connect_request,
    parse_status_line,
    parse_url,
    printable,
)
from kms.updates import (
    MAX_FEED_SIZE,
    FeedError,
    FeedResult,
    UpdateState,
    after_failure,
    after_success,
    parse_feed,
    state_from_json,
    state_to_json,
    status_lines,
)


def feed(*versions: str, info: object = None, yanked: tuple[str, ...] = ()) -> bytes:
    releases = {v: [{"filename": f"kms-{v}.tar.gz", "yanked": v in yanked}] for v in versions}
    document: dict[str, object] = {"releases": releases}
    if info is not None:
        document["info"] = {"version": info}
    return json.dumps(document).encode()


class ParseFeedTests(TestCase):
    def test_newest_stable(self) -> None:
        """Versions compare by PEP 440, not as strings: 0.10.0 is newer than 0.9.0."""
        result = parse_feed(feed("0.1.0", "0.9.0", "0.10.0", "0.2.0"), "0.1.0", beta=False)
        self.assertEqual(result, FeedResult(newest="0.10.0", newer=True, prerelease=False))

    def test_prerelease_only_with_beta(self) -> None:
        data = feed("1.2.0", "1.3.0b1", "1.3.0.dev4")
        self.assertEqual(parse_feed(data, "1.0.0", beta=False), FeedResult("1.2.0", True, False))
        self.assertEqual(parse_feed(data, "1.0.0", beta=True), FeedResult("1.3.0b1", True, True))

    def test_final_beats_its_prerelease(self) -> None:
        result = parse_feed(feed("1.3.0b1", "1.3.0"), "1.0", beta=True)
        self.assertEqual(result, FeedResult("1.3.0", True, False))

    def test_not_newer(self) -> None:
        result = parse_feed(feed("0.1.0", "0.0.9"), "0.1.0", beta=False)
        self.assertEqual(result, FeedResult("0.1.0", False, False))
        self.assertEqual(parse_feed(feed("0.1"), "0.1.0", beta=False).newer, False)  # 0.1 == 0.1.0

    def test_running_a_newer_prerelease(self) -> None:
        """A server on 2.0.0rc1 without beta is told about nothing newer than its own release candidate."""
        self.assertEqual(parse_feed(feed("1.9.0"), "2.0.0rc1", beta=False), FeedResult("1.9.0", False, False))

    def test_only_prereleases_without_beta(self) -> None:
        result = parse_feed(feed("2.0.0a1", "2.0.0b2"), "0.1.0", beta=False)
        self.assertEqual(result, FeedResult(None, False, False))

    def test_info_version_counts(self) -> None:
        """A feed with only ``info.version`` works; info.version is also a candidate beside releases."""
        result = parse_feed(b'{"info": {"version": "3.1"}}', "0.1.0", False)
        self.assertEqual(result, FeedResult("3.1", True, False))
        self.assertEqual(parse_feed(feed("1.0", info="1.1"), "1.0", False).newest, "1.1")

    def test_yanked_releases_ignored(self) -> None:
        """A release counts unless every file of it is yanked; an empty file list is not yanked."""
        self.assertEqual(parse_feed(feed("1.0", "2.0", yanked=("2.0",)), "0.1", False).newest, "1.0")
        mixed = {
            "releases": {
                "1.0": [],
                "2.0": [{"yanked": True}, {"yanked": False}],
                "3.0": [{"yanked": True}, {"yanked": True}],
            },
            "info": {"version": "3.0"},
        }
        self.assertEqual(parse_feed(json.dumps(mixed).encode(), "0.1", False).newest, "2.0")

    def test_invalid_versions_skipped(self) -> None:
        document = {
            "releases": {"not a version": [], "1.0": [], "9" * 200: [], "2.0 ; rm -rf": [], "1.5": "files?"},
            "info": {"version": ["2.0"]},
        }
        self.assertEqual(parse_feed(json.dumps(document).encode(), "0.1", False).newest, "1.5")

    def test_garbage(self) -> None:
        """Everything unusable is a FeedError with a reason, never another exception."""
        cases = {
            b"": "not valid JSON",
            b"<html>502 Bad Gateway</html>": "not valid JSON",
            b"\xff\xfe\x00garbage": "not valid JSON",
            b"[" * 100_000: "not valid JSON",  # nesting beyond the recursion limit
            b"1" * 5000: "not valid JSON",  # an integer beyond int_max_str_digits
            b"[1, 2]": "not a JSON object",
            b'"1.0"': "not a JSON object",
            b'{"releases": ["1.0"]}': "releases is not an object",
            b'{"info": "1.0"}': "info is not an object",
            b"{}": "no valid version",
            b'{"releases": {"banana": []}}': "no valid version",
            b'{"releases": {"1.0": [{"yanked": true}]}}': "no valid version",
        }
        for data, reason in cases.items():
            with self.assertRaises(FeedError, msg=data[:40]) as caught:
                parse_feed(data, "0.1.0", beta=False)
            self.assertIn(reason, str(caught.exception))

    def test_size_cap(self) -> None:
        padding = b" " * (MAX_FEED_SIZE - len(feed("1.0")))
        self.assertEqual(parse_feed(feed("1.0") + padding, "0.1", False).newest, "1.0")
        with self.assertRaises(FeedError):
            parse_feed(feed("1.0") + padding + b" ", "0.1", False)

    @given(st.binary(max_size=300))
    def test_any_bytes(self, data: bytes) -> None:
        try:
            parse_feed(data, "0.1.0", beta=True)
        except FeedError:
            pass

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=20,
    )

    @settings(suppress_health_check=[HealthCheck.too_slow])  # generation is slow on a busy 2-CPU CI
    @given(
        st.dictionaries(
            st.sampled_from(["info", "releases", "x"]),
            json_values
            | st.dictionaries(st.sampled_from(["version", "1.0", "2.0b1", "x"]), json_values, max_size=4),
            max_size=3,
        )
    )
    def test_any_shape(self, document: dict[str, object]) -> None:
        """Any JSON document of roughly the right shape gives a result or a FeedError."""
        try:
            result = parse_feed(json.dumps(document).encode(), "0.1.0", beta=False)
        except FeedError:
            return
        self.assertIsInstance(result, FeedResult)


class StateTests(TestCase):
    def test_round_trip(self) -> None:
        state = after_success(1000.0, "0.1.0", True, FeedResult("0.2.0b1", True, True))
        self.assertEqual(state_from_json(state_to_json(state)), state)

    def test_failure_keeps_last_result(self) -> None:
        """One failed check does not hide a known update; the error and the time are the new check's."""
        ok = after_success(1000.0, "0.1.0", False, FeedResult("0.2.0", True, False))
        failed = after_failure(ok, 2000.0, "0.1.0", False, "connection refused by 127.0.0.1:1")
        self.assertEqual((failed.newest, failed.newer, failed.succeeded_at), ("0.2.0", True, 1000.0))
        self.assertEqual((failed.checked_at, failed.error), (2000.0, "connection refused by 127.0.0.1:1"))
        again = after_success(3000.0, "0.1.0", False, FeedResult("0.2.0", True, False))
        self.assertIsNone(again.error)
        first = after_failure(None, 5.0, "0.1.0", True, "x")
        self.assertEqual((first.newest, first.succeeded_at, first.beta), (None, None, True))

    def test_damaged_file(self) -> None:
        """A damaged or hand-edited update.json reads as no state (and is rewritten by the next check)."""
        good = json.loads(state_to_json(after_failure(None, 5.0, "0.1.0", False, "x")))
        for damaged in (
            b"",
            b"{",
            b"[]",
            json.dumps({**good, "checked_at": "yesterday"}).encode(),
            json.dumps({**good, "newer": 1}).encode(),
            json.dumps({**good, "checked_at": True}).encode(),
            json.dumps({k: v for k, v in good.items() if k != "current"}).encode(),
        ):
            self.assertIsNone(state_from_json(damaged), damaged)


class StatusLinesTests(TestCase):
    def test_never_checked(self) -> None:
        lines = status_lines(None, "0.1.0", 0.0)
        self.assertEqual(lines, ["current version:  0.1.0", "last check:       never"])

    def test_newer_beta(self) -> None:
        state = after_success(1000.0, "0.1.0", True, FeedResult("0.2.0b1", True, True))
        text = "\n".join(status_lines(state, "0.1.0", 1000.0 + 3 * 3600 + 125))
        self.assertIn("newest available: 0.2.0b1 (newer, an update is available)", text)
        self.assertIn("beta:             yes, a pre-release", text)
        self.assertIn("last check:       1970-01-01T00:16:40+00:00 (3h 2m ago)", text)
        self.assertIn("last error:       none", text)

    def test_after_upgrade(self) -> None:
        """'newer' is judged against the running version, not the one that made the check."""
        state = after_success(1000.0, "0.1.0", False, FeedResult("0.2.0", True, False))
        self.assertIn("newest available: 0.2.0 (not newer)", "\n".join(status_lines(state, "0.2.0", 1000.0)))

    def test_failed_check(self) -> None:
        ok = after_success(1000.0, "0.1.0", False, FeedResult("0.2.0", True, False))
        failed = after_failure(ok, 1000.0 + 2 * 86400, "0.1.0", False, "no complete answer within 30s")
        text = "\n".join(status_lines(failed, "0.1.0", 1000.0 + 2 * 86400 + 10))
        self.assertIn("last error:       no complete answer within 30s", text)
        self.assertIn("(10s ago)", text)
        self.assertIn("last success:     1970-01-01T00:16:40+00:00 (2d 10s ago)", text)
        never = after_failure(None, 50.0, "0.1.0", False, "x")
        self.assertIn("newest available: unknown", "\n".join(status_lines(never, "0.1.0", 50.0)))

    def test_odd_newest_in_file(self) -> None:
        state = UpdateState(checked_at=1.0, current="0.1.0", beta=False, newest="banana", succeeded_at=1.0)
        self.assertIn("newest available: banana (not newer)", "\n".join(status_lines(state, "0.1.0", 1.0)))


class HTTPHelperTests(TestCase):
    def test_parse_url(self) -> None:
        self.assertEqual(parse_url("https://pypi.org/pypi/kms/json"), Target("https", "pypi.org", 443))
        self.assertEqual(parse_url("http://127.0.0.1:8080/f"), Target("http", "127.0.0.1", 8080))
        self.assertEqual(parse_url("https://[::1]:8443/f").authority, "[::1]:8443")
        for bad in (
            "ftp://example.test/feed",
            "file:///etc/passwd",
            "https:///nohost",
            "https://user:pw@example.test/",
            "https://example.test:99999/",
            "https://example.test/a b",
            "https://example.test/\r\nX-Injected: 1",
            "https://exämple.test/",
        ):
            with self.assertRaises(ValueError, msg=bad):
                parse_url(bad)

    def test_connect_request(self) -> None:
        proxy = Proxy("127.0.0.1", 3128, "proxyuser", "pä:ss")
        authorization = proxy.authorization()
        assert authorization is not None
        self.assertEqual(base64.b64decode(authorization.removeprefix(b"Basic ")), "proxyuser:pä:ss".encode())
        request = connect_request(Target("https", "feed.example.test", 443), authorization, b"ua/1")
        self.assertTrue(request.startswith(b"CONNECT feed.example.test:443 HTTP/1.1\r\n"))
        self.assertIn(b"\r\nProxy-Authorization: Basic ", request)
        self.assertTrue(request.endswith(b"\r\n\r\n"))
        self.assertIsNone(Proxy("127.0.0.1", 3128).authorization())
        self.assertNotIn("pä:ss", repr(proxy))

    def test_parse_status_line(self) -> None:
        status = parse_status_line(b"HTTP/1.1 200 Connection established\r\nVia: x")
        self.assertEqual(status, (200, "Connection established"))
        self.assertEqual(parse_status_line(b"HTTP/1.0 407 \x1b[31mred"), (407, "?[31mred"))
        for bad in (b"", b"SSH-2.0-OpenSSH", b"HTTP/1.1 20 OK", b"HTTP/2 200 OK", b"HTTP/1.1 abc OK"):
            with self.assertRaises(ValueError, msg=bad):
                parse_status_line(bad)

    def test_printable(self) -> None:
        self.assertEqual(printable(b"ok\r\nX: y\x00"), "ok??X: y?")
        self.assertEqual(printable("x" * 150, limit=10), "xxxxxxxxxx...")


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class GuardTests(TestCase):
    """The guard on a StringTransport: the CONNECT exchange and the byte cap."""

    def guard(
        self, tunnel: bytes | None, limit: int = 1000
    ) -> tuple[_Guard, StringTransport, Deferred, _Budget]:
        ready: Deferred = Deferred()
        budget = _Budget(limit)
        guard = _Guard(Factory.forProtocol(_Recorder), tunnel, None, budget, ready)
        transport = StringTransport()
        guard.makeConnection(transport)
        return guard, transport, ready, budget

    def test_tunnel_opens_on_200(self) -> None:
        guard, transport, ready, _ = self.guard(b"CONNECT h:443 HTTP/1.1\r\n\r\n")
        self.assertEqual(transport.value(), b"CONNECT h:443 HTTP/1.1\r\n\r\n")
        guard.dataReceived(b"HTTP/1.1 200 Connection est")
        self.assertFalse(ready.called)
        guard.dataReceived(b"ablished\r\nVia: proxy\r\n\r\n")
        inner = self.successResultOf(ready)
        guard.dataReceived(b"payload")
        self.assertEqual(inner.received, b"payload")

    def test_407(self) -> None:
        """With credentials sent: 'refused the credentials'; without: a hint at the config keys."""
        with_credentials = b"CONNECT h:443 HTTP/1.1\r\nProxy-Authorization: Basic eDp5\r\n\r\n"
        for tunnel, message in (
            (with_credentials, "proxy refused the credentials"),
            (b"CONNECT h:443 HTTP/1.1\r\n\r\n", "set [proxy] username and password_file"),
        ):
            guard, transport, ready, _ = self.guard(tunnel)
            guard.dataReceived(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
            guard.dataReceived(b"Proxy-Authenticate: Basic\r\n\r\n")
            self.assertIn(message, str(self.failureResultOf(ready, FetchError).value))
            self.assertTrue(transport.disconnecting)

    def test_other_refusals(self) -> None:
        for answer, message in (
            (b"HTTP/1.1 403 Forbidden\r\n\r\n", "proxy refused the tunnel: 403 Forbidden"),
            (b"garbage\r\n\r\n", "not an HTTP status line"),
            (b"HTTP/1.1 200 OK\r\n\r\nearly bytes", "data before the TLS handshake"),
            (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 3000, "answer to CONNECT too long"),
        ):
            guard, transport, ready, _ = self.guard(b"CONNECT h:443 HTTP/1.1\r\n\r\n", limit=10**6)
            guard.dataReceived(answer)
            self.assertIn(message, str(self.failureResultOf(ready, FetchError).value))

    def test_closed_before_answer(self) -> None:
        guard, transport, ready, _ = self.guard(b"CONNECT h:443 HTTP/1.1\r\n\r\n")
        guard.connectionLost()
        self.failureResultOf(ready, FetchError)

    def test_byte_cap(self) -> None:
        """Past the budget the connection is aborted and the budget says why."""
        guard, transport, ready, budget = self.guard(None, limit=100)
        inner = self.successResultOf(ready)
        guard.dataReceived(b"x" * 100)
        self.assertEqual((len(inner.received), budget.exceeded, transport.disconnecting), (100, False, False))
        guard.dataReceived(b"y")
        self.assertEqual((len(inner.received), budget.exceeded), (100, True))


CONFIG = """\
[server]
hostname = "mail.example.test"
[domains]
local = ["example.test"]
[store]
path = "store"
"""


class ConfigTests(TestCase):
    """The [proxy] and [update] keys as the loader checks them."""

    def load(self, extra: str) -> Config:
        path = Path(self.mktemp())
        path.write_text(CONFIG + extra)
        return load_config(path)

    def problems(self, extra: str) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            self.load(extra)
        return caught.exception.problems

    def test_defaults(self) -> None:
        cfg = self.load("")
        self.assertEqual((cfg.update.timeout, cfg.update.ca_file, cfg.update.interval), (30.0, None, 86400.0))
        self.assertIsNone(cfg.proxy)

    def test_keys(self) -> None:
        cfg = self.load(
            '[update]\nfeed_url = "https://pypi.org/pypi/kms/json"\ntimeout = "10s"\nca_file = "ca.pem"\n'
            'interval = "1h"\n[proxy]\naddress = "proxy.example.test"\nport = 8080\nusername = "u"\n'
            'password_file = "proxy.secret"\n'
        )
        assert cfg.proxy is not None
        self.assertEqual((cfg.update.timeout, cfg.update.interval), (10.0, 3600.0))
        self.assertEqual(cfg.update.ca_file, cfg.path.parent / "ca.pem")
        self.assertEqual(cfg.proxy.password_file, cfg.path.parent / "proxy.secret")

    def test_empty_proxy_table_is_direct(self) -> None:
        """SPEC §2 shows [proxy] with address = "": that means no proxy."""
        cfg = self.load('[proxy]\naddress = ""\nport = 3128\nusername = ""\npassword_file = ""\n')
        self.assertIsNone(cfg.proxy)

    def test_problems(self) -> None:
        problems = self.problems(
            '[update]\nfeed_url = "ftp://example.test/feed"\ninterval = "10s"\ntimeout = 0\n'
            '[proxy]\naddress = "p"\nport = 70000\nusername = "a:b"\n'
        )
        self.assertEqual(
            problems,
            [
                "proxy.port: must be at most 65535, not 70000",
                "proxy.username: must not contain ':' (Basic authentication)",
                'update.feed_url: "ftp://example.test/feed" must start with http:// or https://',
                "update.interval: must be at least 1m (a feed is not to be hammered)",
                "update.timeout: must be more than 0",
            ],
        )
        bad_port = self.problems('[update]\nfeed_url = "https://feed.test:99999/x"\n')
        self.assertEqual(len(bad_port), 1)  # what the checker itself would refuse at every run
        self.assertIn('"https://feed.test:99999/x" is not a URL', bad_port[0])
        self.assertEqual(
            self.problems('[proxy]\nusername = "u"\n'),
            ["proxy.address: is required when username or password_file is set"],
        )
