"""Update checks over real sockets on 127.0.0.1: a twisted.web feed (http and https), a proxy that
demands Basic authentication (absolute-URI GET and CONNECT), a DNS server, kmsctl as a subprocess,
and the periodic service on a task.Clock.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

import kms
from kms import __version__
from kms.config import DNSConfig, ProxyConfig, UpdateConfig, load_config
from kms.ctl import main as ctl_main
from kms.dns import make_resolver
from kms.logs import Logs
from kms.tls import generate_dev_certificate, server_context_factory
from kms.updatechecker import FIRST_CHECK_DELAY, STATE_FILE, Checker, UpdateChecker, read_state
from kms.updates import MAX_FEED_SIZE, UpdateState
from tests.support.dnsserver import DNSTestServer
from tests.support.server import TEST_STORE_LIMITS, RunningServer, free_port, write_config

PROJECT_ROOT = Path(kms.__file__).resolve().parent.parent
PROXY_USER = "proxyuser"
PROXY_PASSWORD = "s3cret:proxy pw"
FEED = {
    "info": {"version": "1.2.0"},
    "releases": {
        "0.1.0": [{"filename": "kms-0.1.0.tar.gz", "yanked": False}],
        "1.2.0": [{"filename": "kms-1.2.0.tar.gz", "yanked": False}],
        "1.3.0b1": [{"filename": "kms-1.3.0b1.tar.gz", "yanked": False}],
        "9.0.0": [{"filename": "kms-9.0.0.tar.gz", "yanked": True}],
    },
}


class _Tracked(Protocol):
    """A protocol whose connection the test can abort and wait for at clean-up."""

    def connectionMade(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.factory.connections.append(self)  # type: ignore[attr-defined]

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


def _cleanup(connections: list[Any]) -> Deferred[Any]:
    waits = []
    for c in connections:
        if not c.lost.called:
            c.transport.abortConnection()  # type: ignore[union-attr]
            waits.append(c.lost)
    return gatherResults(waits)


class _TrackedWrapper(ProtocolWrapper):
    def connectionMade(self) -> None:
        self.lost: Deferred[None] = Deferred()
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


class TrackedFactory(WrappingFactory):
    """A server factory whose connections clean-up can close and wait for (the feed's, here)."""

    protocol = _TrackedWrapper

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.connections: list[Any] = []

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.connections.append(p)


class FeedResource(Resource):
    """The release feed: serves ``body``, records each request (path, headers, TLS or not)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.body = json.dumps(FEED).encode()
        self.status = 200
        self.chunked = False
        self.requests: list[dict[str, Any]] = []

    def render_GET(self, request: Any) -> bytes:
        headers = {k.lower(): v[0] for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append({"uri": request.uri, "headers": headers, "secure": request.isSecure()})
        request.setResponseCode(self.status)
        if self.status in (301, 302):
            request.setHeader(b"location", b"https://elsewhere.example.test/feed")
        request.setHeader(b"content-type", b"application/json")
        if self.chunked:  # no Content-Length: the size shows only while it arrives
            request.write(self.body)
            request.finish()
            return NOT_DONE_YET  # type: ignore[no-any-return]
        return self.body


class Silent(_Tracked):
    """Accepts and never answers (a feed or a proxy that hangs); ``factory.arrived`` fires at connect."""

    def connectionMade(self) -> None:
        super().connectionMade()
        arrived = getattr(self.factory, "arrived", None)
        if arrived is not None and not arrived.called:
            arrived.callback(None)


class HeadersOnly(_Tracked):
    """Answers every request with the head of a 404 whose body never follows."""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 100\r\n\r\n")  # type: ignore[union-attr]


class _Pipe(Protocol):
    """One side of a spliced connection: whatever arrives goes to the other side."""

    other: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.other.transport.write(data)

    def connectionLost(self, reason: object = None) -> None:
        self.other.transport.loseConnection()


class TestProxy(_Tracked):
    """An HTTP proxy demanding Basic authentication: absolute-URI GET is forwarded, CONNECT tunnelled."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.buffer = b""
        self.upstream: _Pipe | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.transport.write(data)  # type: ignore[union-attr]
            return
        self.buffer += data
        head, end, rest = self.buffer.partition(b"\r\n\r\n")
        if not end:
            return
        self.buffer = b"#"  # nothing more is parsed
        request_line, *lines = head.split(b"\r\n")
        method, target, _ = request_line.split(b" ")
        headers = [line.split(b":", 1) for line in lines]
        auth = next((v.strip() for k, v in headers if k.lower() == b"proxy-authorization"), None)
        factory: ProxyFactory = self.factory  # type: ignore[assignment]
        factory.seen.append((method.decode(), target.decode(), auth))
        if auth != factory.expected:
            self.transport.write(  # type: ignore[union-attr]
                b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"t\"\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if method == b"CONNECT":
            host, _, port = target.decode().rpartition(":")
            opening = b"HTTP/1.1 200 Connection established\r\n\r\n"
            self._splice(host, int(port), opening, rest)
        else:
            url = urlsplit(target.decode())
            kept = b"".join(k + b":" + v + b"\r\n" for k, v in headers if k.lower() != b"proxy-authorization")
            path = (url.path or "/").encode()
            forwarded = b"GET " + path + b" HTTP/1.1\r\n" + kept + b"Connection: close\r\n\r\n"
            self._splice(url.hostname or "", url.port or 80, b"", forwarded)

    def _splice(self, host: str, port: int, to_client: bytes, to_server: bytes) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]

        def connected(pipe: _Pipe) -> None:
            pipe.other = self
            self.upstream = pipe
            self.transport.write(to_client)  # type: ignore[union-attr]
            pipe.transport.write(to_server)  # type: ignore[union-attr]
            self.transport.resumeProducing()  # type: ignore[union-attr]

        def failed(_: object) -> None:
            self.transport.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]

        connecting = TCP4ClientEndpoint(reactor, host, port).connect(Factory.forProtocol(_Pipe))
        connecting.addCallbacks(connected, failed)

    def connectionLost(self, reason: object = None) -> None:
        if self.upstream is not None:
            self.upstream.transport.loseConnection()  # type: ignore[union-attr]
        super().connectionLost(reason)


class ProxyFactory(Factory):
    protocol = TestProxy

    def __init__(self, expected: bytes) -> None:
        self.expected = expected
        self.seen: list[tuple[str, str, bytes | None]] = []
        self.connections: list[_Tracked] = []


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class UpdateCheckBase(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.logs = Logs(self.dir / "logs", ["update_checker"])
        self.addCleanup(self.logs.close)
        self.state_path = self.dir / STATE_FILE
        self.feed = FeedResource()
        site = TrackedFactory(Site(self.feed))
        self.addCleanup(lambda: _cleanup(site.connections))
        self.http = self.listen(reactor.listenTCP(0, site, interface="127.0.0.1"))
        generate_dev_certificate(
            self.dir / "feed.pem",
            self.dir / "feed.key",
            hostnames=["feed.example.test"],
            addresses=["127.0.0.1"],
        )
        tls = server_context_factory(self.dir / "feed.pem", self.dir / "feed.key")
        self.https = self.listen(reactor.listenSSL(0, site, tls, interface="127.0.0.1"))
        self.proxy_factory = ProxyFactory(basic(PROXY_USER, PROXY_PASSWORD))
        self.proxy_port = self.listen(reactor.listenTCP(0, self.proxy_factory, interface="127.0.0.1"))
        self.addCleanup(lambda: _cleanup(self.proxy_factory.connections))
        self.password_file = self.dir / "proxy.secret"
        self.write_password(PROXY_PASSWORD)

    def listen(self, port: Any) -> int:
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def write_password(self, password: str, mode: int = 0o600) -> None:
        self.password_file.write_text(password + "\n")
        self.password_file.chmod(mode)

    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http}/pypi/kms/json"

    def https_url(self, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.https}/pypi/kms/json"

    def proxy(self, username: str = PROXY_USER) -> ProxyConfig:
        return ProxyConfig("127.0.0.1", self.proxy_port, username, self.password_file if username else None)

    def checker(
        self,
        url: str,
        *,
        proxy: ProxyConfig | None = None,
        beta: bool = False,
        timeout: float = 10.0,
        ca_file: Path | None = None,
        resolver: Any = None,
        state_path: Path | None = None,
    ) -> Checker:
        update = UpdateConfig(True, beta, url, 86400.0, timeout=timeout, ca_file=ca_file)
        return Checker(
            update,
            proxy,
            state_path or self.state_path,
            self.logs,
            reactor,
            resolver or (lambda: self.fail("no host name to resolve")),
            partial(deferToThreadPool, reactor, reactor.getThreadPool()),
        )

    def check(self, *args: Any, **kwargs: Any) -> Deferred[UpdateState]:
        return Deferred.fromCoroutine(self.checker(*args, **kwargs).check())

    def log(self, name: str) -> str:
        path = self.dir / "logs" / f"{name}.log"
        return path.read_text() if path.exists() else ""


class DirectTests(UpdateCheckBase):
    @inlineCallbacks
    def test_direct_http(self):  # type: ignore[no-untyped-def]
        state = yield self.check(self.http_url())
        outcome = (state.newest, state.newer, state.prerelease, state.error)
        self.assertEqual(outcome, ("1.2.0", True, False, None))
        self.assertEqual(read_state(self.state_path), state)
        self.assertEqual(len(self.feed.requests), 1)
        headers = self.feed.requests[0]["headers"]
        self.assertEqual(headers[b"user-agent"], f"kms-update-check/{__version__}".encode())
        self.assertNotIn(b"proxy-authorization", headers)
        self.assertIn("update_checker.checked", self.log("debug"))
        self.assertIn("newest=1.2.0 newer=True", self.log("debug"))
        self.assertEqual(self.log("error"), "")

    @inlineCallbacks
    def test_beta_chooses_differently(self):  # type: ignore[no-untyped-def]
        stable = yield self.check(self.http_url(), beta=False)
        beta = yield self.check(self.http_url(), beta=True)
        self.assertEqual((stable.newest, stable.prerelease), ("1.2.0", False))
        self.assertEqual((beta.newest, beta.prerelease, beta.beta), ("1.3.0b1", True, True))
        self.assertEqual(read_state(self.state_path), beta)

    @inlineCallbacks
    def test_direct_https_verified(self):  # type: ignore[no-untyped-def]
        state = yield self.check(self.https_url(), ca_file=self.dir / "feed.pem")
        self.assertEqual((state.newest, state.error), ("1.2.0", None))
        self.assertTrue(self.feed.requests[0]["secure"])

    @inlineCallbacks
    def test_https_untrusted(self):  # type: ignore[no-untyped-def]
        """Without ca_file the system store decides, and it does not know our test certificate."""
        state = yield self.check(self.https_url())
        self.assertEqual(state.error, "TLS with 127.0.0.1: certificate not trusted or not for this name")
        self.assertEqual(self.feed.requests, [])
        self.assertIn("update-check-failed", self.log("error"))

    @inlineCallbacks
    def test_https_wrong_name(self):  # type: ignore[no-untyped-def]
        """A trusted certificate for another name is refused: the name is verified, not only the chain."""
        generate_dev_certificate(
            self.dir / "o.pem", self.dir / "o.key", hostnames=["other.example.test"], addresses=[]
        )
        other = TrackedFactory(Site(self.feed))
        self.addCleanup(lambda: _cleanup(other.connections))
        port = self.listen(
            reactor.listenSSL(0, other, server_context_factory(self.dir / "o.pem", self.dir / "o.key"))
        )
        state = yield self.check(f"https://127.0.0.1:{port}/", ca_file=self.dir / "o.pem")
        self.assertIn("certificate not trusted or not for this name", state.error)
        self.assertEqual(self.feed.requests, [])

    @inlineCallbacks
    def test_garbage_json_keeps_last_result(self):  # type: ignore[no-untyped-def]
        good = yield self.check(self.http_url())
        self.feed.body = b"<html><body>502 Bad Gateway</body></html>"
        bad = yield self.check(self.http_url())
        self.assertEqual(bad.error, "feed: not valid JSON (JSONDecodeError)")
        self.assertEqual((bad.newest, bad.succeeded_at), ("1.2.0", good.checked_at))
        self.assertEqual(read_state(self.state_path), bad)
        self.assertEqual(self.log("error").count("update-check-failed"), 1)
        self.assertIn("feed: not valid JSON", self.log("error"))

    @inlineCallbacks
    def test_unreachable(self):  # type: ignore[no-untyped-def]
        port = free_port()
        state = yield self.check(f"http://127.0.0.1:{port}/feed")
        self.assertEqual(state.error, f"connection refused by 127.0.0.1:{port}")
        self.assertIn(f'error="connection refused by 127.0.0.1:{port}"', self.log("error"))

    @inlineCallbacks
    def test_feed_never_answers(self):  # type: ignore[no-untyped-def]
        """A feed that accepts and hangs costs the configured timeout and one connection, then is closed."""
        factory = Factory.forProtocol(Silent)
        factory.connections = []  # type: ignore[attr-defined]
        port = self.listen(reactor.listenTCP(0, factory, interface="127.0.0.1"))
        self.addCleanup(lambda: _cleanup(factory.connections))  # type: ignore[attr-defined]
        state = yield self.check(f"http://127.0.0.1:{port}/feed", timeout=0.5)
        self.assertEqual(state.error, "no complete answer within 0.5s")
        self.assertEqual(len(factory.connections), 1)  # type: ignore[attr-defined]
        yield factory.connections[0].lost  # type: ignore[attr-defined]  # the client hung up

    @inlineCallbacks
    def test_size_cap(self):  # type: ignore[no-untyped-def]
        """Too large with a Content-Length (refused before reading) and chunked (cut off while arriving)."""
        self.feed.body = b" " * (MAX_FEED_SIZE + 1)
        sized = yield self.check(self.http_url())
        self.feed.chunked = True
        chunked = yield self.check(self.http_url())
        for state in (sized, chunked):
            self.assertEqual(state.error, f"feed is larger than {MAX_FEED_SIZE} bytes")

    @inlineCallbacks
    def test_refused_answer_is_not_left_open(self):  # type: ignore[no-untyped-def]
        """A 404 whose body never comes: the check ends at once and hangs up (no connection left behind)."""
        factory = Factory.forProtocol(HeadersOnly)
        factory.connections = []  # type: ignore[attr-defined]
        port = self.listen(reactor.listenTCP(0, factory, interface="127.0.0.1"))
        self.addCleanup(lambda: _cleanup(factory.connections))  # type: ignore[attr-defined]
        state = yield self.check(f"http://127.0.0.1:{port}/feed", timeout=60)
        self.assertEqual(state.error, "feed answered 404 Not Found")
        yield factory.connections[0].lost  # type: ignore[attr-defined]

    test_refused_answer_is_not_left_open.timeout = 30  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_redirect_not_followed(self):  # type: ignore[no-untyped-def]
        self.feed.status = 301
        state = yield self.check(self.http_url())
        self.assertEqual(
            state.error,
            "feed answered 301 Moved Permanently "
            "(to https://elsewhere.example.test/feed; redirects are not followed)",
        )
        self.assertEqual(len(self.feed.requests), 1)

    @inlineCallbacks
    def test_state_file_not_writable(self):  # type: ignore[no-untyped-def]
        """A store that cannot take update.json costs an error.log line, not the check."""
        state = yield self.check(self.http_url(), state_path=self.dir / "missing" / STATE_FILE)
        self.assertEqual(state.newest, "1.2.0")
        self.assertIn("update-state-not-saved", self.log("error"))


class ProxyTests(UpdateCheckBase):
    @inlineCallbacks
    def test_http_through_proxy(self):  # type: ignore[no-untyped-def]
        """Plain http: an absolute URI to the proxy, with credentials the feed never sees."""
        state = yield self.check(self.http_url(), proxy=self.proxy())
        self.assertEqual((state.newest, state.error), ("1.2.0", None))
        expected = ("GET", self.http_url(), basic(PROXY_USER, PROXY_PASSWORD))
        self.assertEqual(self.proxy_factory.seen, [expected])
        self.assertEqual(len(self.feed.requests), 1)
        self.assertNotIn(b"proxy-authorization", self.feed.requests[0]["headers"])
        self.assertIn(f"via=\"proxy 127.0.0.1:{self.proxy_port}\"", self.log("debug"))

    @inlineCallbacks
    def test_https_through_proxy(self):  # type: ignore[no-untyped-def]
        """https: CONNECT with credentials, then TLS end to end with the feed (verified by ca_file)."""
        state = yield self.check(self.https_url(), proxy=self.proxy(), ca_file=self.dir / "feed.pem")
        self.assertEqual((state.newest, state.error), ("1.2.0", None))
        expected = ("CONNECT", f"127.0.0.1:{self.https}", basic(PROXY_USER, PROXY_PASSWORD))
        self.assertEqual(self.proxy_factory.seen, [expected])
        self.assertTrue(self.feed.requests[0]["secure"])
        self.assertNotIn(b"proxy-authorization", self.feed.requests[0]["headers"])

    @inlineCallbacks
    def test_wrong_credentials(self):  # type: ignore[no-untyped-def]
        """407 is a clear error on both paths; nothing reaches the feed; the next good check works."""
        self.write_password("wrong")
        via_http = yield self.check(self.http_url(), proxy=self.proxy())
        via_connect = yield self.check(self.https_url(), proxy=self.proxy(), ca_file=self.dir / "feed.pem")
        message = "proxy refused the credentials (407 Proxy Authentication Required)"
        self.assertEqual((via_http.error, via_connect.error), (message, message))
        self.assertEqual(self.feed.requests, [])
        self.assertEqual(self.log("error").count(message), 2)
        self.assertNotIn("wrong", self.log("error") + self.log("debug"))
        self.write_password(PROXY_PASSWORD)
        again = yield self.check(self.https_url(), proxy=self.proxy(), ca_file=self.dir / "feed.pem")
        self.assertEqual((again.newest, again.error), ("1.2.0", None))

    @inlineCallbacks
    def test_no_username(self):  # type: ignore[no-untyped-def]
        state = yield self.check(self.http_url(), proxy=self.proxy(username=""))
        hint = "proxy demands authentication (407): set [proxy] username and password_file"
        self.assertEqual(state.error, hint)
        self.assertEqual(self.proxy_factory.seen[0][2], None)

    @inlineCallbacks
    def test_password_file_readable_by_others(self):  # type: ignore[no-untyped-def]
        self.write_password(PROXY_PASSWORD, mode=0o644)
        state = yield self.check(self.http_url(), proxy=self.proxy())
        self.assertIsNone(state.error)
        self.assertIn("update-check-warning", self.log("error"))
        self.assertIn("is open to group or others (mode 644; use 0600)", self.log("error"))

    @inlineCallbacks
    def test_password_file_missing(self):  # type: ignore[no-untyped-def]
        self.password_file.unlink()
        state = yield self.check(self.http_url(), proxy=self.proxy())
        self.assertIn("proxy.password_file: cannot read", state.error)
        self.assertEqual(self.proxy_factory.seen, [])

    @inlineCallbacks
    def test_proxy_never_answers_connect(self):  # type: ignore[no-untyped-def]
        factory = Factory.forProtocol(Silent)
        factory.connections = []  # type: ignore[attr-defined]
        port = self.listen(reactor.listenTCP(0, factory, interface="127.0.0.1"))
        self.addCleanup(lambda: _cleanup(factory.connections))  # type: ignore[attr-defined]
        proxy = ProxyConfig("127.0.0.1", port, PROXY_USER, self.password_file)
        state = yield self.check(self.https_url(), proxy=proxy, timeout=0.5, ca_file=self.dir / "feed.pem")
        self.assertEqual(state.error, "no complete answer within 0.5s")
        self.assertEqual(len(factory.connections), 1)  # type: ignore[attr-defined]
        yield factory.connections[0].lost  # type: ignore[attr-defined]


class HostNameTests(UpdateCheckBase):
    """Host names are looked up with twisted.names, here against a DNS server on 127.0.0.1."""

    def setUp(self) -> None:
        super().setUp()
        self.dns = DNSTestServer()
        self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.dns.add_a("feed.example.test", "127.0.0.1")
        cfg = DNSConfig(servers=(("127.0.0.1", self.dns.port),), timeout=2.0)
        self.resolvers: list[Any] = []
        def resolver_factory() -> Any:
            self.resolvers.append(make_resolver(cfg, reactor))
            return self.resolvers[-1]

        self.resolver_factory = resolver_factory

    @inlineCallbacks
    def test_https_by_name(self):  # type: ignore[no-untyped-def]
        """The feed's name is resolved, sent as SNI and matched against its certificate."""
        checker = self.checker(
            self.https_url("feed.example.test"), ca_file=self.dir / "feed.pem", resolver=self.resolver_factory
        )
        first = yield Deferred.fromCoroutine(checker.check())
        second = yield Deferred.fromCoroutine(checker.check())
        self.assertEqual((first.newest, first.error, second.error), ("1.2.0", None, None))
        self.assertEqual(len(self.resolvers), 1)  # one resolver for the checker's life
        self.assertIn(("feed.example.test", 1), self.dns.resolver.queries)

    @inlineCallbacks
    def test_unknown_name(self):  # type: ignore[no-untyped-def]
        state = yield self.check("http://nowhere.example.test/feed", resolver=self.resolver_factory)
        self.assertEqual(state.error, "cannot resolve nowhere.example.test: DNSNameError")
        self.assertEqual(self.feed.requests, [])


class NotifyingChecker(Checker):
    """The real checker, telling the test when each check has ended."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ended: list[UpdateState] = []
        self._waiters: list[Deferred[UpdateState]] = []

    async def check(self) -> UpdateState:
        state = await super().check()
        self.ended.append(state)
        waiters, self._waiters = self._waiters, []
        for w in waiters:  # on the next turn: after the service has scheduled what comes next
            reactor.callLater(0, w.callback, state)
        return state

    def next_end(self) -> Deferred[UpdateState]:
        self._waiters.append(Deferred())
        return self._waiters[-1]


class PeriodicServiceTests(UpdateCheckBase):
    """`UpdateChecker` on a task.Clock: when checks run; the checks themselves go over real sockets."""

    def service(self, url: str, timeout: float = 10.0) -> tuple[UpdateChecker, NotifyingChecker, Clock]:
        update = UpdateConfig(True, False, url, 3600.0, timeout=timeout)
        checker = NotifyingChecker(
            update,
            None,
            self.state_path,
            self.logs,
            reactor,
            lambda: self.fail("no host name to resolve"),
            partial(deferToThreadPool, reactor, reactor.getThreadPool()),
        )
        clock = Clock()
        service = UpdateChecker(checker, clock, interval=3600.0)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service, checker, clock

    @inlineCallbacks
    def test_schedule(self):  # type: ignore[no-untyped-def]
        service, checker, clock = self.service(self.http_url())
        clock.advance(FIRST_CHECK_DELAY - 1)
        self.assertEqual(len(self.feed.requests), 0)
        ended = checker.next_end()
        clock.advance(1)
        yield ended
        self.assertEqual(len(self.feed.requests), 1)
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls()], [FIRST_CHECK_DELAY + 3600.0])
        clock.advance(3599)
        self.assertEqual(len(self.feed.requests), 1)
        ended = checker.next_end()
        clock.advance(1)
        yield ended
        self.assertEqual(len(self.feed.requests), 2)
        service.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_failures_do_not_stop_the_schedule(self):  # type: ignore[no-untyped-def]
        service, checker, clock = self.service(self.http_url())
        self.feed.body = b"\x00garbage"
        ended = checker.next_end()
        clock.advance(FIRST_CHECK_DELAY)
        failed = yield ended
        self.assertIn("not valid JSON", failed.error)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.feed.body = json.dumps(FEED).encode()
        ended = checker.next_end()
        clock.advance(3600)
        ok = yield ended
        self.assertEqual((ok.newest, ok.error), ("1.2.0", None))
        self.assertEqual(len(checker.ended), 2)

    @inlineCallbacks
    def test_stop_during_a_check(self):  # type: ignore[no-untyped-def]
        """Stopping the server abandons a check in flight: connection closed, nothing written or logged."""
        factory = Factory.forProtocol(Silent)
        factory.connections = []  # type: ignore[attr-defined]
        arrived: Deferred[None] = Deferred()
        factory.arrived = arrived  # type: ignore[attr-defined]
        port = self.listen(reactor.listenTCP(0, factory, interface="127.0.0.1"))
        self.addCleanup(lambda: _cleanup(factory.connections))  # type: ignore[attr-defined]
        service, checker, clock = self.service(f"http://127.0.0.1:{port}/feed")
        clock.advance(FIRST_CHECK_DELAY)
        yield arrived
        service.stopService()
        yield factory.connections[0].lost  # type: ignore[attr-defined]
        self.assertEqual((checker.ended, clock.getDelayedCalls()), ([], []))
        self.assertFalse(self.state_path.exists())
        self.assertEqual(self.log("error"), "")


class WiringTests(TestCase):
    def test_service_only_with_a_feed(self) -> None:
        """build_service adds the checker when check = true and feed_url is set, and only then."""
        base = Path(self.mktemp()).absolute()
        for extra, present in (
            ('[update]\nfeed_url = "http://127.0.0.1:9/feed"\n', True),
            ('[update]\ncheck = false\nfeed_url = "http://127.0.0.1:9/feed"\n', False),
            ("", False),
        ):
            directory = base / str(len(extra))
            server = RunningServer(write_config(directory, extra=extra, listeners={}))
            names = {s.name for s in server.service}
            self.assertEqual("update-checker" in names, present, extra)


MINIMAL = """\
[server]
hostname = "mail.example.test"
[domains]
local = ["example.test"]
[store]
path = "store"
""" + TEST_STORE_LIMITS + """[logs]
debug = ["update_checker"]
"""


class KmsctlTests(UpdateCheckBase):
    def write_kms_config(self, update: str, proxy: str = "") -> Path:
        path = self.dir / "kms.toml"
        path.write_text(MINIMAL + update + proxy)
        return path

    def kmsctl(self, config: Path, *argv: str) -> Deferred[tuple[bytes, bytes, int]]:
        """kmsctl as the admin runs it, in its own process (it runs its own reactor for the check)."""
        args = ["-m", "kms.ctl", "--config", str(config), *argv]
        return getProcessOutputAndValue(sys.executable, args, env=dict(os.environ), path=str(PROJECT_ROOT))

    def ctl_in_process(self, config: Path, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = ctl_main(["--config", str(config), *argv])
        return code, out.getvalue(), err.getvalue()

    @inlineCallbacks
    def test_check_and_status(self):  # type: ignore[no-untyped-def]
        ca = self.dir / "feed.pem"
        proxy = f'[proxy]\naddress = "127.0.0.1"\nport = {self.proxy_port}\nusername = "{PROXY_USER}"\n'
        proxy += f'password_file = "{self.password_file}"\n'
        update = f'[update]\nfeed_url = "{self.https_url()}"\nca_file = "{ca}"\n'
        config = self.write_kms_config(update, proxy)
        out, err, code = yield self.kmsctl(config, "update", "check")
        self.assertEqual((code, err), (0, b""), out)
        self.assertEqual(out.decode(), f"kms {__version__}: 1.2.0 is available (a release)\n")
        self.assertEqual(self.proxy_factory.seen[0][:2], ("CONNECT", f"127.0.0.1:{self.https}"))
        cfg = load_config(config)
        state = read_state(cfg.store.path / STATE_FILE)
        assert state is not None
        self.assertEqual((state.newest, state.error), ("1.2.0", None))
        self.assertIn("update_checker.checked", (cfg.store.path / "logs" / "debug.log").read_text())

        code, text, err = self.ctl_in_process(config, "update", "status")
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"current version:  {__version__}\n", text)
        self.assertIn("newest available: 1.2.0 (newer, an update is available)\n", text)
        self.assertIn("beta:             no\n", text)
        self.assertRegex(text, r"last check:       \S+ \(\d+s ago\)\n")
        self.assertIn("last error:       none\n", text)
        self.assertIn(f"periodic checks:  every 86400s, {self.https_url()}", text)

    @inlineCallbacks
    def test_check_fails(self):  # type: ignore[no-untyped-def]
        self.write_password("wrong")
        proxy = f'[proxy]\naddress = "127.0.0.1"\nport = {self.proxy_port}\nusername = "{PROXY_USER}"\n'
        proxy += f'password_file = "{self.password_file}"\n'
        config = self.write_kms_config(f'[update]\nfeed_url = "{self.http_url()}"\n', proxy)
        out, err, code = yield self.kmsctl(config, "update", "check")
        self.assertEqual((code, out), (1, b""))
        refused = b"proxy refused the credentials (407 Proxy Authentication Required)"
        self.assertEqual(err, b"kmsctl: update check failed: " + refused + b"\n")
        code, text, _ = self.ctl_in_process(config, "update", "status")
        self.assertIn("newest available: unknown (no check has succeeded)\n", text)
        self.assertIn("last error:       proxy refused the credentials", text)

    def test_without_feed(self) -> None:
        config = self.write_kms_config("")
        code, out, err = self.ctl_in_process(config, "update", "check")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "kmsctl: update.feed_url is empty: there is nothing to check\n")
        code, out, err = self.ctl_in_process(config, "update", "status")
        self.assertEqual(code, 0)
        self.assertIn("last check:       never\n", out)
        self.assertIn("periodic checks:  off (update.feed_url is empty)\n", out)
