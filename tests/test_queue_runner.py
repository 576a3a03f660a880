"""The queue runner with an injected clock, a real store, real DNS, real sinks and the real client.

Time (retries, expiry, delay warnings) runs on a `task.Clock`; everything else is real: entries are
fsync'd files, MX answers come from a twisted.names server on 127.0.0.1, and the remote hosts are
SMTP sinks listening on 127.0.0.2 / 127.0.0.3.
"""

from __future__ import annotations

import email
import email.policy
import errno
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import fail, inlineCallbacks, succeed
from twisted.internet.task import Clock, deferLater
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from kms.config import DNSConfig
from kms.dns import make_resolver
from kms.logs import Logs
from kms.queue.client import attempt
from kms.queue.interfaces import BOUNCED, DELIVERED, PENDING, Hop, QueuedRecipient, QueueEntry
from kms.queue.mx import resolve_hops
from kms.queue.runner import QueueRunner, RunnerSettings
from kms.queue.store import NoSuchEntry, QueueStore
from kms.store.spool import MessageSpool
from tests.support.dnsserver import DNSTestServer
from tests.support.server import free_port
from tests.support.smtpsink import SinkConfig, SMTPSink

BODY = b"Subject: hello\nFrom: alice@example.test\n\nline one\n.line with a dot\n"
T0 = 1_800_000_000.0


class RunnerTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir(parents=True)
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = QueueStore(self.dir / "queue")
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name="test-queue")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.logs = Logs(self.dir / "logs", ())
        self.addCleanup(self.logs.close)
        self.dns = DNSTestServer()
        self.dns.add_mx("elsewhere.test", 10, "mx1.elsewhere.test")
        self.dns.add_mx("elsewhere.test", 20, "mx2.elsewhere.test")
        self.dns.add_a("mx1.elsewhere.test", "127.0.0.2")
        self.dns.add_a("mx2.elsewhere.test", "127.0.0.3")
        self.dns.add_null_mx("nomail.test")
        self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.port = free_port()
        self.reports: list[tuple[str, bytes]] = []
        self.report_failures = 0  # reports to refuse (the sender's mailbox unavailable) before accepting
        self.broken_address = ""  # a hop whose attempt fails on our side (OSError), not the host's

    def sink(self, interface: str, **config: Any) -> SMTPSink:
        sink = SMTPSink(SinkConfig(**config))
        sink.start(reactor, interface, self.port)
        self.addCleanup(sink.stop)
        return sink

    def runner(self, **settings: Any) -> QueueRunner:
        resolver = make_resolver(DNSConfig(servers=(("127.0.0.1", self.dns.port),), timeout=2), reactor)
        settings.setdefault("retry_schedule", (300.0,))
        settings.setdefault("delay_warning", 0.0)

        def report(to: str, data: bytes) -> Any:
            if self.report_failures:
                self.report_failures -= 1
                return fail(OSError(errno.EIO, "mailbox unavailable"))
            self.reports.append((to, data))
            return succeed(None)

        def tried(reactor: Any, hop: Hop, message: Any, **options: Any) -> Any:
            if hop.address == self.broken_address:
                return fail(OSError(errno.EMFILE, "too many open files"))
            return attempt(reactor, hop, message, **options)

        runner = QueueRunner(
            self.store,
            self.pool,
            reactor,
            self.logs,
            RunnerSettings(hostname="mx.example.test", product=None, timeout=5, **settings),
            resolve=lambda domain: resolve_hops(resolver, domain, self.port, reactor=reactor),
            attempt=tried,
            inject_dsn=report,
            clock=self.clock,
        )
        runner.startService()
        self.addCleanup(runner.stopService)
        return runner

    @inlineCallbacks
    def enqueue(self, runner: QueueRunner, *recipients: Any, sender: str = "alice@example.test"):  # type: ignore[no-untyped-def]
        rcpts = [r if isinstance(r, QueuedRecipient) else QueuedRecipient(r) for r in recipients]
        now = self.clock.seconds()
        entry_id = f"E{len(self.store.entries())}"
        entry = QueueEntry(entry_id, sender, rcpts, created=now, next_attempt=now, size=len(BODY))
        spool = MessageSpool(self.dir)
        spool.write(BODY)
        yield runner.enqueue(entry, spool, b"Received: test\n")
        spool.discard()
        return entry.id

    def entry(self, entry_id: str) -> QueueEntry | None:
        try:
            return self.store.get(entry_id)
        except NoSuchEntry:
            return None

    @inlineCallbacks
    def settled(self, runner: QueueRunner, entry_id: str):  # type: ignore[no-untyped-def]
        """Fire the entry's timer on the fake clock, then wait (real time) until its pass is over."""
        self.clock.advance(0)
        for _ in range(400):
            if entry_id not in runner._active:
                return self.entry(entry_id)
            yield deferLater(reactor, 0.025, lambda: None)
        self.fail("the runner did not finish the entry")

    @inlineCallbacks
    def test_delivered_to_the_best_mx_and_removed(self):  # type: ignore[no-untyped-def]
        mx1, mx2 = self.sink("127.0.0.2"), self.sink("127.0.0.3")
        runner = self.runner()
        entry_id = yield self.enqueue(runner, "bob@elsewhere.test", "carol@elsewhere.test")
        self.assertIsNotNone(self.entry(entry_id))  # durable before anything was sent
        left = yield self.settled(runner, entry_id)
        self.assertIsNone(left)
        [(sender, rcpts, content)] = mx1.session.messages
        self.assertEqual(sender, "alice@example.test")
        self.assertEqual(rcpts, ["bob@elsewhere.test", "carol@elsewhere.test"])
        self.assertEqual(content, b"Received: test\r\n" + BODY.replace(b"\n", b"\r\n"))
        self.assertEqual(mx2.sessions, [])
        self.assertEqual(self.reports, [])
        self.assertIn("sent", (self.dir / "logs" / "mail.log").read_text())

    @inlineCallbacks
    def test_next_mx_when_the_first_refuses_connections(self):  # type: ignore[no-untyped-def]
        mx2 = self.sink("127.0.0.3")  # nothing listens on mx1 (127.0.0.2)
        runner = self.runner()
        entry_id = yield self.enqueue(runner, "bob@elsewhere.test")
        left = yield self.settled(runner, entry_id)
        self.assertIsNone(left)
        self.assertEqual(len(mx2.session.messages), 1)

    @inlineCallbacks
    def test_temporary_failure_then_success_on_retry(self):  # type: ignore[no-untyped-def]
        mx1 = self.sink("127.0.0.2", rcpt_replies={"bob@elsewhere.test": b"450 4.2.0 mailbox busy\r\n"})
        self.sink("127.0.0.3", rcpt_replies={"bob@elsewhere.test": b"450 4.2.0 mailbox busy\r\n"})
        runner = self.runner()
        entry_id = yield self.enqueue(runner, "bob@elsewhere.test")
        entry = yield self.settled(runner, entry_id)
        [r] = entry.recipients
        self.assertEqual((r.state, r.status, entry.attempts), (PENDING, "4.2.0", 1))
        self.assertEqual(entry.next_attempt, T0 + 300)
        mx1.config.rcpt_replies.clear()
        self.clock.advance(299)
        self.assertEqual(len(mx1.sessions), 1)  # not yet
        self.clock.advance(1)
        left = yield self.settled(runner, entry_id)
        self.assertIsNone(left)
        self.assertEqual(len(mx1.sessions), 2)
        self.assertEqual(len(mx1.sessions[1].messages), 1)
        self.assertEqual(self.reports, [])

    @inlineCallbacks
    def test_permanent_failure_bounces_with_a_dsn(self):  # type: ignore[no-untyped-def]
        self.sink("127.0.0.2", rcpt_replies={"nobody@elsewhere.test": b"550 5.1.1 no such user\r\n"})
        runner = self.runner()
        entry_id = yield self.enqueue(runner, "nobody@elsewhere.test", "bob@elsewhere.test")
        left = yield self.settled(runner, entry_id)
        self.assertIsNone(left)  # one delivered, one bounced and reported: nothing left to do
        [(to, data)] = self.reports
        self.assertEqual(to, "alice@example.test")
        report = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(report.get_content_type(), "multipart/report")
        status = report.get_payload()[1]
        text = status.as_string()
        self.assertIn("Final-Recipient: rfc822; nobody@elsewhere.test", text)
        self.assertIn("Status: 5.1.1", text)
        self.assertIn("Action: failed", text)
        self.assertNotIn("bob@elsewhere.test", text)

    @inlineCallbacks
    def test_a_report_that_cannot_be_sent_keeps_the_results_and_is_tried_again(self):  # type: ignore[no-untyped-def]
        mx1 = self.sink("127.0.0.2", rcpt_replies={"nobody@elsewhere.test": b"550 5.1.1 no such user\r\n"})
        runner = self.runner()
        self.report_failures = 1
        entry_id = yield self.enqueue(runner, "nobody@elsewhere.test", "bob@elsewhere.test")
        entry = yield self.settled(runner, entry_id)
        states = {r.address: (r.state, r.dsn_sent) for r in entry.recipients}
        expected = {"nobody@elsewhere.test": (BOUNCED, False), "bob@elsewhere.test": (DELIVERED, False)}
        self.assertEqual(states, expected)
        self.assertEqual(self.reports, [])
        self.clock.advance(300)
        self.assertIsNone((yield self.settled(runner, entry_id)))
        [(to, data)] = self.reports
        self.assertIn(b"Final-Recipient: rfc822; nobody@elsewhere.test", data)
        self.assertEqual(len(mx1.session.messages), 1)  # bob's copy was not sent again
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)  # the failed report, logged

    @inlineCallbacks
    def test_a_local_error_in_one_group_keeps_the_others_results(self):  # type: ignore[no-untyped-def]
        self.dns.add_mx("second.test", 10, "mx.second.test")
        self.dns.add_a("mx.second.test", "127.0.0.3")
        mx1 = self.sink("127.0.0.2")
        mx2 = self.sink("127.0.0.3")
        runner = self.runner()
        self.broken_address = "127.0.0.3"
        entry_id = yield self.enqueue(runner, "bob@elsewhere.test", "dan@second.test")
        entry = yield self.settled(runner, entry_id)
        states = {r.address: r.state for r in entry.recipients}
        self.assertEqual(states, {"bob@elsewhere.test": DELIVERED, "dan@second.test": PENDING})
        self.broken_address = ""
        self.clock.advance(300)
        self.assertIsNone((yield self.settled(runner, entry_id)))
        self.assertEqual(len(mx1.session.messages), 1)  # not sent to bob again
        self.assertEqual(len(mx2.session.messages), 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)  # the local error, logged

    @inlineCallbacks
    def test_null_mx_bounces_at_once(self):  # type: ignore[no-untyped-def]
        runner = self.runner()
        entry_id = yield self.enqueue(runner, "x@nomail.test")
        left = yield self.settled(runner, entry_id)
        self.assertIsNone(left)
        [(_, data)] = self.reports
        self.assertIn(b"Status: 5.1.10", data)

    @inlineCallbacks
    def test_notify_never_and_null_sender_get_no_dsn(self):  # type: ignore[no-untyped-def]
        self.sink("127.0.0.2", rcpt_replies={"nobody@elsewhere.test": b"550 5.1.1 no such user\r\n"})
        runner = self.runner()
        first = yield self.enqueue(runner, QueuedRecipient("nobody@elsewhere.test", notify=("NEVER",)))
        second = yield self.enqueue(runner, "nobody@elsewhere.test", sender="")
        self.assertIsNone((yield self.settled(runner, first)))
        self.assertIsNone((yield self.settled(runner, second)))
        self.assertEqual(self.reports, [])

    @inlineCallbacks
    def test_delay_warning_once_then_expiry_bounce(self):  # type: ignore[no-untyped-def]
        busy = {"bob@elsewhere.test": b"451 4.3.0 try later\r\n"}
        self.sink("127.0.0.2", rcpt_replies=busy)
        self.sink("127.0.0.3", rcpt_replies=busy)
        runner = self.runner(delay_warning=500.0, lifetime=1000.0)
        entry_id = yield self.enqueue(runner, "bob@elsewhere.test")
        entry = yield self.settled(runner, entry_id)  # attempt 1 at T0
        self.assertEqual(self.reports, [])
        self.clock.advance(300)
        entry = yield self.settled(runner, entry_id)  # attempt 2 at T0+300: no warning yet
        self.assertEqual(self.reports, [])
        self.clock.advance(300)
        entry = yield self.settled(runner, entry_id)  # attempt 3 at T0+600: the one delay warning
        [(_, delayed)] = self.reports
        self.assertIn(b"Action: delayed", delayed)
        self.assertTrue(entry.delay_warned)
        self.clock.advance(300)
        entry = yield self.settled(runner, entry_id)  # T0+900: still pending, no second warning
        self.assertEqual(len(self.reports), 1)
        self.assertEqual(entry.next_attempt, T0 + 1000)  # the retry is capped at the lifetime
        self.clock.advance(100)
        left = yield self.settled(runner, entry_id)  # T0+1000: expired
        self.assertIsNone(left)
        self.assertEqual(len(self.reports), 2)
        failed = self.reports[1][1]
        self.assertIn(b"Action: failed", failed)
        self.assertIn(b"Status: 4.3.0", failed)  # the last real problem, not a generic expiry code

    @inlineCallbacks
    def test_busy_entry_is_left_alone(self):  # type: ignore[no-untyped-def]
        """An entry that kmsctl holds is skipped, and delivered on a later pass once released."""
        mx1 = self.sink("127.0.0.2")
        runner = self.runner()
        entry_id = yield self.enqueue(runner, "bob@elsewhere.test")
        lock = self.store.try_lock(entry_id)
        entry = yield self.settled(runner, entry_id)
        self.assertEqual(entry.recipients[0].state, PENDING)
        self.assertEqual(mx1.sessions, [])
        lock.release()
        yield runner.process(entry_id)
        self.assertIsNone(self.entry(entry_id))

    @inlineCallbacks
    def test_admin_bounce_is_reported_by_the_runner(self):  # type: ignore[no-untyped-def]
        runner = self.runner()
        entry_id = yield self.enqueue(runner, "bob@elsewhere.test")
        with self.store.try_lock(entry_id):
            entry = self.store.get(entry_id)
            entry.recipients[0].state = BOUNCED
            entry.recipients[0].status = "5.0.0"
            entry.recipients[0].last_reply = "bounced by the administrator"
            self.store.save(entry)
        yield runner.process(entry_id)
        self.assertIsNone(self.entry(entry_id))
        [(_, data)] = self.reports
        self.assertIn(b"bounced by the administrator", data)

    @inlineCallbacks
    def test_success_report_when_the_host_cannot_pass_notify_on(self):  # type: ignore[no-untyped-def]
        """NOTIFY=SUCCESS to a host without DSN: we report "relayed"; with DSN it is the host's job."""
        self.sink("127.0.0.2")  # no DSN in its EHLO
        runner = self.runner()
        entry_id = yield self.enqueue(runner, QueuedRecipient("bob@elsewhere.test", notify=("SUCCESS",)))
        self.assertIsNone((yield self.settled(runner, entry_id)))
        [(to, data)] = self.reports
        self.assertEqual(to, "alice@example.test")
        self.assertIn(b"Action: relayed", data)

    @inlineCallbacks
    def test_no_success_report_when_the_host_offers_dsn(self):  # type: ignore[no-untyped-def]
        mx1 = self.sink("127.0.0.2", extensions=("PIPELINING", "DSN", "ENHANCEDSTATUSCODES"))
        runner = self.runner()
        entry_id = yield self.enqueue(runner, QueuedRecipient("bob@elsewhere.test", notify=("SUCCESS",)))
        self.assertIsNone((yield self.settled(runner, entry_id)))
        self.assertEqual(self.reports, [])
        self.assertIn("RCPT TO:<bob@elsewhere.test> NOTIFY=SUCCESS", mx1.session.commands)

    @inlineCallbacks
    def test_a_hanging_destination_holds_up_only_its_own_mail(self):  # type: ignore[no-untyped-def]
        """slow.test's MX accepts connections and never greets; elsewhere.test's mail still goes."""
        self.dns.add_mx("slow.test", 10, "mx.slow.test")
        self.dns.add_a("mx.slow.test", "127.0.0.4")
        slow = self.sink("127.0.0.4", greeting=None)
        mx1 = self.sink("127.0.0.2")
        runner = self.runner(max_per_domain=1, max_connections=2)
        stuck = yield self.enqueue(runner, "a@slow.test")
        waiting = yield self.enqueue(runner, "b@slow.test")
        self.clock.advance(0)
        for _ in range(400):  # the first slow.test attempt is connected and waiting for a greeting
            if slow.sessions:
                break
            yield deferLater(reactor, 0.025, lambda: None)
        fast = yield self.enqueue(runner, "bob@elsewhere.test")
        self.assertIsNone((yield self.settled(runner, fast)))
        self.assertEqual(len(mx1.session.messages), 1)
        self.assertEqual(len(slow.sessions), 1)  # b@slow.test waits for the one slow.test slot
        self.assertIn(stuck, runner._active)
        self.assertIn(waiting, runner._active)
