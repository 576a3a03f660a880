"""Outbound mail through the whole server: smtplib in, the queue, MX or smarthost out, DSNs back.

The remote world is on loopback: a twisted.names server on 127.0.0.1 answers MX/A queries and SMTP
sinks on 127.0.0.2 and 127.0.0.3 play the remote MX hosts or the smarthost (``[relay] mx_port``
points delivery at their port).  The last test runs ``twistd`` itself and kills it with SIGKILL in
the middle of a delivery.
"""

from __future__ import annotations

import email
import email.policy
import os
import signal
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.ssl import Certificate, CertificateOptions, KeyPair
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from kms.config import load_config
from kms.tls import generate_dev_certificate
from tests.support.dnsserver import DNSTestServer
from tests.support.server import RunningServer, TwistdProcess, add_user, free_port, write_config
from tests.support.smtpsink import SinkConfig, SMTPSink


def dotted_message(size: int = 40_000) -> bytes:
    """A message in which every body line starts with "." (so also those around each 16 KiB boundary)."""
    lines = [b"Subject: dots", b"From: alice@example.test", b""]
    total = 0
    while total < size:
        line = b"." * (1 + total % 3) + b"x" * (total % 97)  # every line starts with a dot
        lines.append(line)
        total += len(line) + 2
    lines.extend([b".", b"..", b". end"])
    return b"\r\n".join(lines) + b"\r\n"


class _QueueCase(TestCase):
    """A running kms that may relay for 127.0.0.1, a DNS server, and sinks on one shared port."""

    extra_relay = ""

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.dir = Path(self.mktemp()).absolute()
        self.port = free_port()
        self.dns = DNSTestServer()
        self.dns.add_mx("elsewhere.test", 10, "mx1.elsewhere.test")
        self.dns.add_mx("elsewhere.test", 20, "mx2.elsewhere.test")
        self.dns.add_a("mx1.elsewhere.test", "127.0.0.2")
        self.dns.add_a("mx2.elsewhere.test", "127.0.0.3")
        self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        path = self.config_path()
        add_user(load_config(path), "alice@example.test", "secret-Pass1")
        add_user(load_config(path), "bob@example.test", "secret-Pass2")
        self.server = yield RunningServer(path).start()
        self.addCleanup(self.server.stop)

    def config_path(self) -> Path:
        path = write_config(
            self.dir,
            local='["127.0.0.1"]',
            extra=f'[dns]\nservers = ["127.0.0.1:{self.dns.port}"]\ntimeout = "2s"\n'
            '[queue]\nretry_schedule = ["5m"]\n',
        )
        text = path.read_text().replace(
            '[relay]\nlocal_group = "local"\n',
            f'[relay]\nlocal_group = "local"\nmx_port = {self.port}\n{self.extra_relay}',
        )
        path.write_text(text)
        return path

    def sink(self, interface: str, **config: Any) -> SMTPSink:
        sink = SMTPSink(SinkConfig(**config))
        sink.start(reactor, interface, self.port)
        self.addCleanup(sink.stop)
        return sink

    def send(self, recipients: list[str], message: bytes, sender: str = "alice@example.test") -> Any:
        def client() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", self.server.port("smtp"), timeout=10) as s:
                return s.sendmail(sender, recipients, message)

        return deferToThread(client)

    @inlineCallbacks
    def queue_empty(self):  # type: ignore[no-untyped-def]
        """Wait until the runner has finished with every entry (the queue folder holds no envelope)."""
        queue = self.server.store / "queue"
        for _ in range(400):
            if not any(p.suffix == ".json" for p in queue.iterdir()):
                return
            yield deferLater(reactor, 0.025, lambda: None)
        self.fail(f"queue not empty: {sorted(p.name for p in queue.iterdir())}")


class RelayTests(_QueueCase):
    @inlineCallbacks
    def test_relayed_mail_reaches_the_best_mx_intact(self):  # type: ignore[no-untyped-def]
        """Local and remote recipients in one transaction; dots at 16 KiB boundaries arrive intact."""
        mx1 = self.sink("127.0.0.2")
        message = dotted_message()
        refused = yield self.send(["bob@elsewhere.test", "alice@example.test"], message)
        self.assertEqual(refused, {})
        yield self.queue_empty()
        [(sender, rcpts, content)] = mx1.session.messages
        self.assertEqual((sender, rcpts), ("alice@example.test", ["bob@elsewhere.test"]))
        received, _, rest = content.partition(b"\r\n\t")
        self.assertTrue(received.startswith(b"Received: from "), received)
        self.assertEqual(content[content.index(b"Subject: dots") :], message)
        [local] = self.server.messages("alice@example.test")
        self.assertIn(b"X-Envelope-To: <alice@example.test>", local)
        log = (self.server.store / "logs" / "mail.log").read_text()
        self.assertIn("queued", log)
        self.assertIn("sent", log)

    @inlineCallbacks
    def test_bounce_comes_back_to_a_local_sender(self):  # type: ignore[no-untyped-def]
        """A 5xx from the remote host becomes an RFC 3464 report in the sender's own mailbox."""
        self.sink("127.0.0.2", rcpt_replies={"nobody@elsewhere.test": b"550 5.1.1 no such user here\r\n"})
        message = b"Subject: lost\r\nMessage-ID: <m1@example.test>\r\n\r\nbody\r\n"
        yield self.send(["nobody@elsewhere.test"], message)
        yield self.queue_empty()
        [raw] = self.server.messages("alice@example.test")
        report = email.message_from_bytes(raw, policy=email.policy.default)
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertEqual(report["To"], "alice@example.test")
        human, status, original = report.get_payload()
        self.assertIn("no such user here", human.get_content())
        fields = status.as_string()
        self.assertIn("Action: failed", fields)
        self.assertIn("Status: 5.1.1", fields)
        self.assertIn("Remote-MTA: dns; mx1.elsewhere.test", fields)
        self.assertIn(b"<m1@example.test>", original.as_bytes())

    @inlineCallbacks
    def test_success_report_for_local_delivery(self):  # type: ignore[no-untyped-def]
        """NOTIFY=SUCCESS and ENVID on a local recipient: a "delivered" report to the sender."""

        def client() -> None:
            with smtplib.SMTP("127.0.0.1", self.server.port("smtp"), timeout=10) as s:
                s.ehlo()
                self.assertTrue(s.has_extn("dsn"))
                s.sendmail(
                    "alice@example.test",
                    ["bob@example.test"],
                    b"Subject: tell me\r\n\r\nbody\r\n",
                    mail_options=["ENVID=QQ+2B314"],
                    rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;bob+2Bx@example.test"],
                )

        yield deferToThread(client)
        for _ in range(200):
            if self.server.messages("alice@example.test"):
                break
            yield deferLater(reactor, 0.025, lambda: None)
        [raw] = self.server.messages("alice@example.test")
        report = email.message_from_bytes(raw, policy=email.policy.default)
        fields = report.get_payload()[1].as_string()
        self.assertIn("Action: delivered", fields)
        self.assertIn("Final-Recipient: rfc822; bob@example.test", fields)
        self.assertIn("Original-Recipient: rfc822;bob+x@example.test", fields)
        self.assertIn("Original-Envelope-Id: QQ+314", fields)
        self.assertEqual(len(self.server.messages("bob@example.test")), 1)

    @inlineCallbacks
    def test_deferred_mail_is_listed_by_kmsctl(self):  # type: ignore[no-untyped-def]
        busy = {"bob@elsewhere.test": b"451 4.3.0 try again later\r\n"}
        self.sink("127.0.0.2", rcpt_replies=busy)
        self.sink("127.0.0.3", rcpt_replies=busy)
        yield self.send(["bob@elsewhere.test"], b"Subject: later\r\n\r\nbody\r\n")
        for _ in range(400):
            out = yield deferToThread(
                subprocess.run,
                [sys.executable, "-m", "kms.ctl", "--config", str(self.server.config.path), "queue", "list"],
                capture_output=True,
                text=True,
            )
            if "451 4.3.0" in out.stdout:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertIn("bob@elsewhere.test", out.stdout)
        self.assertIn("451 4.3.0 try again later", out.stdout)

    @inlineCallbacks
    def test_kmsctl_flush_retries_at_once(self):  # type: ignore[no-untyped-def]
        """A deferred message (next try in 5 minutes) goes out within seconds of `kmsctl queue flush`."""
        busy = {"bob@elsewhere.test": b"451 4.3.0 try again later\r\n"}
        mx1 = self.sink("127.0.0.2", rcpt_replies=dict(busy))
        mx2 = self.sink("127.0.0.3", rcpt_replies=dict(busy))
        yield self.send(["bob@elsewhere.test"], b"Subject: flush me\r\n\r\nbody\r\n")
        for _ in range(400):  # both hosts tried once, the entry saved for later
            sessions = mx1.sessions + mx2.sessions
            if mx1.sessions and mx2.sessions and all(s.closed.called for s in sessions):
                break
            yield deferLater(reactor, 0.025, lambda: None)
        mx1.config.rcpt_replies.clear()
        config = str(self.server.config.path)
        command = [sys.executable, "-m", "kms.ctl", "--config", config, "queue", "flush"]
        done = yield deferToThread(subprocess.run, command, capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stderr)
        yield self.queue_empty()
        self.assertEqual(len(mx1.sessions), 2)
        self.assertEqual(len(mx1.sessions[1].messages), 1)

    @inlineCallbacks
    def test_unauthenticated_outsiders_still_may_not_relay(self):  # type: ignore[no-untyped-def]
        def client() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", self.server.port("smtp"), source_address=("127.0.0.2", 0)) as s:
                s.ehlo()
                s.mail("x@outside.test")
                return s.rcpt("bob@elsewhere.test")

        code, text = yield deferToThread(client)
        self.assertEqual((code, text[:5]), (554, b"5.7.1"))


class SmarthostTests(_QueueCase):
    """All outbound mail through one host, with STARTTLS verified against ca_file and AUTH."""

    def config_path(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert = self.dir / "smarthost.pem"
        self.key = self.dir / "smarthost.key"
        generate_dev_certificate(self.cert, self.key, hostnames=("smarthost.test",), addresses=("127.0.0.2",))
        secret = self.dir / "smarthost.secret"
        secret.write_text("relayuser:relay-Pass:word\n")
        os.chmod(secret, 0o600)
        self.extra_relay = (
            f'smarthost = "127.0.0.2:{self.port}"\nsmarthost_credentials_file = "{secret}"\n'
            f'smarthost_tls = "starttls"\nca_file = "{self.cert}"\n'
        )
        return super().config_path()

    def tls_options(self) -> CertificateOptions:
        cert = Certificate.loadPEM(self.cert.read_bytes())
        key = KeyPair.load(self.key.read_bytes(), 1)  # FILETYPE_PEM
        return CertificateOptions(privateKey=key.original, certificate=cert.original)

    @inlineCallbacks
    def test_smarthost_with_starttls_and_auth(self):  # type: ignore[no-untyped-def]
        host = self.sink("127.0.0.2", tls=self.tls_options(), users={"relayuser": "relay-Pass:word"})
        yield self.send(["bob@elsewhere.test", "carol@far.test"], b"Subject: via smarthost\r\n\r\nbody\r\n")
        yield self.queue_empty()
        [session] = host.sessions
        self.assertTrue(session.tls)
        self.assertEqual(session.auth, ["relayuser"])
        self.assertIn("STARTTLS", session.verbs())
        self.assertLess(session.verbs().index("STARTTLS"), session.verbs().index("AUTH"))
        [(_, rcpts, _)] = session.messages
        self.assertEqual(sorted(rcpts), ["bob@elsewhere.test", "carol@far.test"])

    @inlineCallbacks
    def test_smarthost_without_tls_gets_nothing(self):  # type: ignore[no-untyped-def]
        """TLS is required by default: a smarthost that does not offer STARTTLS never sees the password."""
        host = self.sink("127.0.0.2", users={"relayuser": "relay-Pass:word"}, auth_needs_tls=False)
        yield self.send(["bob@elsewhere.test"], b"Subject: x\r\n\r\nbody\r\n")
        for _ in range(200):
            if host.sessions and host.sessions[0].closed.called:
                break
            yield deferLater(reactor, 0.025, lambda: None)
        self.assertEqual([s.auth for s in host.sessions], [[]])
        self.assertNotIn("AUTH", host.sessions[0].verbs())
        self.assertEqual(host.sessions[0].messages, [])


class CrashTests(TestCase):
    """kill -9 in the middle of a delivery, then a restart: the recipient gets the message."""

    @inlineCallbacks
    def test_sigkill_during_delivery_then_restart(self):  # type: ignore[no-untyped-def]
        directory = Path(self.mktemp()).absolute()
        port, mx_port = free_port(), free_port()
        dns = DNSTestServer()
        dns.add_mx("elsewhere.test", 10, "mx1.elsewhere.test")
        dns.add_a("mx1.elsewhere.test", "127.0.0.2")
        dns.start(reactor)
        self.addCleanup(dns.stop)
        path = write_config(
            directory,
            local='["127.0.0.1"]',
            listeners={"smtp": f"tcp:{port}:interface=127.0.0.1"},
            extra=f'[dns]\nservers = ["127.0.0.1:{dns.port}"]\n',
        )
        path.write_text(path.read_text().replace("[relay]\n", f"[relay]\nmx_port = {mx_port}\n"))
        # The first remote session swallows the end of data and never answers it.
        sink = SMTPSink(SinkConfig(silent_from="END"))
        sink.start(reactor, "127.0.0.2", mx_port)
        self.addCleanup(sink.stop)

        server = TwistdProcess(path, port)
        self.addCleanup(lambda: server.proc.poll() is None and server.stop(signal.SIGKILL))
        yield deferToThread(server.wait_listening)

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.sendmail("alice@example.test", ["bob@elsewhere.test"], b"Subject: crash\r\n\r\nbody\r\n")

        yield deferToThread(send)
        for _ in range(400):  # until the whole message reached the sink, unanswered
            if sink.sessions and sink.sessions[0].data:
                break
            yield deferLater(reactor, 0.025, lambda: None)
        self.assertTrue(sink.sessions and sink.sessions[0].data, "the delivery never started")
        yield deferToThread(server.stop, signal.SIGKILL)

        sink.config.silent_from = None  # the remote host behaves now
        restarted = TwistdProcess(path, port)
        self.addCleanup(lambda: restarted.proc.poll() is None and restarted.stop())
        yield deferToThread(restarted.wait_listening)
        for _ in range(400):
            if any(s.messages for s in sink.sessions[1:]):
                break
            yield deferLater(reactor, 0.025, lambda: None)
        # At least once: the sink kept the first, unanswered copy (as a real server may), and the
        # restarted server, which never heard "250", sent it again in a new session.
        first, *later = sink.sessions
        self.assertEqual(len(first.messages), 1)
        [again] = [m for s in later for m in s.messages]
        self.assertEqual(again, first.messages[0])
        self.assertIn(b"Subject: crash", again[2])
        queue = directory / "store" / "queue"
        for _ in range(200):
            if not any(p.suffix == ".json" for p in queue.iterdir()):
                break
            yield deferLater(reactor, 0.025, lambda: None)
        self.assertEqual([p.name for p in queue.iterdir() if p.suffix == ".json"], [])
