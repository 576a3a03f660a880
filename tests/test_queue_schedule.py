"""Tests for kms.queue.schedule: retry times, expiry, delay warnings, NOTIFY, per-recipient outcomes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kms.queue import schedule
from kms.queue.interfaces import (
    BOUNCED,
    DELIVERED,
    PENDING,
    DestinationError,
    HostFailure,
    QueuedRecipient,
    QueueEntry,
    Reply,
)

SCHEDULE = (300.0, 900.0, 1800.0, 3600.0)
T0 = 1_700_000_000.0


def entry(*recipients: QueuedRecipient, sender: str = "alice@example.test", attempts: int = 0) -> QueueEntry:
    return QueueEntry(
        id="ID1",
        sender=sender,
        recipients=list(recipients) or [QueuedRecipient("bob@example.org")],
        created=T0,
        next_attempt=T0,
        attempts=attempts,
    )


class NextAttemptTests(TestCase):
    def test_schedule_steps_then_last_repeats(self) -> None:
        """5 min, 15 min, 30 min after the first three failures, then hourly for ever."""
        delays = [schedule.next_attempt(n, T0, SCHEDULE) - T0 for n in range(0, 8)]
        self.assertEqual(delays, [0, 300, 900, 1800, 3600, 3600, 3600, 3600])

    def test_entry_attempts(self) -> None:
        self.assertEqual(schedule.next_attempt(entry(attempts=2), T0, SCHEDULE), T0 + 900)

    def test_capped_at_expiry(self) -> None:
        """The last retry is at the expiry time, not an hour after it; never in the past."""
        self.assertEqual(schedule.next_attempt(5, T0, SCHEDULE, until=T0 + 60), T0 + 60)
        self.assertEqual(schedule.next_attempt(5, T0, SCHEDULE, until=T0 - 60), T0)
        self.assertEqual(schedule.next_attempt(1, T0, SCHEDULE, until=T0 + 10_000), T0 + 300)

    def test_empty_schedule_refused(self) -> None:
        self.assertRaises(ValueError, schedule.next_attempt, 1, T0, ())

    @given(st.integers(-3, 1000), st.lists(st.floats(1, 1e6), min_size=1, max_size=6))
    def test_property_within_schedule(self, attempts: int, steps: list[float]) -> None:
        """Always now or now plus one of the steps; monotonic in the number of attempts for a
        non-decreasing schedule."""
        when = schedule.next_attempt(attempts, T0, steps)
        self.assertIn(when - T0, [0.0, *[T0 + s - T0 for s in steps]])
        ordered = sorted(steps)
        self.assertLessEqual(
            schedule.next_attempt(attempts, T0, ordered), schedule.next_attempt(attempts + 1, T0, ordered)
        )


class ExpiryTests(TestCase):
    def test_expired(self) -> None:
        e = entry()
        self.assertFalse(schedule.expired(e, T0 + 5 * 86400 - 1, 5 * 86400))
        self.assertTrue(schedule.expired(e, T0 + 5 * 86400, 5 * 86400))

    def test_expire_keeps_last_problem(self) -> None:
        """RFC 3463: the status of the real problem, not 4.4.7, when there was one."""
        r = QueuedRecipient("bob@example.org", status="4.7.1", last_reply="451 4.7.1 greylisted")
        schedule.expire(r, T0, 86400)
        self.assertEqual((r.state, r.status, r.final_time), (BOUNCED, "4.7.1", T0))
        self.assertEqual(r.last_reply, "451 4.7.1 greylisted")

    def test_expire_without_attempt(self) -> None:
        r = QueuedRecipient("bob@example.org")
        schedule.expire(r, T0, 5 * 86400)
        self.assertEqual((r.state, r.status), (BOUNCED, "4.4.7"))
        self.assertEqual(r.last_reply, "not delivered within 5 days")

    def test_expire_leaves_final_states(self) -> None:
        r = QueuedRecipient("bob@example.org", state=DELIVERED, status="2.0.0")
        schedule.expire(r, T0, 1)
        self.assertEqual((r.state, r.status), (DELIVERED, "2.0.0"))


class NotifyTests(TestCase):
    TABLE = [
        # notify, failure, delay, success
        ((), True, True, False),
        (("NEVER",), False, False, False),
        (("SUCCESS",), False, False, True),
        (("FAILURE",), True, False, False),
        (("DELAY",), False, True, False),
        (("SUCCESS", "FAILURE"), True, False, True),
        (("FAILURE", "DELAY"), True, True, False),
        (("SUCCESS", "FAILURE", "DELAY"), True, True, True),
    ]

    def test_table(self) -> None:
        for notify, failure, delay, success in self.TABLE:
            r = QueuedRecipient("bob@example.org", notify=notify)
            got = (schedule.wants_failure_dsn(r), schedule.wants_delay_dsn(r), schedule.wants_success_dsn(r))
            self.assertEqual(got, (failure, delay, success), notify)

    def test_null_sender_never_gets_a_failure_dsn(self) -> None:
        r = QueuedRecipient("bob@example.org", state=BOUNCED)
        self.assertEqual(schedule.unreported_failures(entry(r, sender="")), [])
        self.assertFalse(schedule.needs_failure_dsn(entry(r, sender=""), r))
        self.assertEqual(schedule.unreported_failures(entry(r)), [r])

    def test_unreported_failures(self) -> None:
        """Bounced, not yet reported, NOTIFY allowing it; pending, delivered and reported ones are not."""
        rs = [
            QueuedRecipient("a@x.org", state=BOUNCED),
            QueuedRecipient("b@x.org", state=BOUNCED, dsn_sent=True),
            QueuedRecipient("c@x.org", state=BOUNCED, notify=("NEVER",)),
            QueuedRecipient("d@x.org", state=BOUNCED, notify=("SUCCESS",)),
            QueuedRecipient("e@x.org", state=PENDING),
            QueuedRecipient("f@x.org", state=DELIVERED),
        ]
        self.assertEqual([r.address for r in schedule.unreported_failures(entry(*rs))], ["a@x.org"])

    def test_finished(self) -> None:
        self.assertFalse(schedule.finished(entry(QueuedRecipient("a@x.org"))))
        self.assertFalse(schedule.finished(entry(QueuedRecipient("a@x.org", state=BOUNCED))))
        self.assertTrue(schedule.finished(entry(QueuedRecipient("a@x.org", state=BOUNCED, dsn_sent=True))))
        self.assertTrue(schedule.finished(entry(QueuedRecipient("a@x.org", state=BOUNCED), sender="")))
        self.assertTrue(schedule.finished(entry(QueuedRecipient("a@x.org", state=DELIVERED))))


class DelayWarningTests(TestCase):
    FOUR_HOURS = 4 * 3600.0

    def test_after_four_hours_once(self) -> None:
        e = entry()
        self.assertFalse(schedule.needs_delay_warning(e, T0 + self.FOUR_HOURS - 1, self.FOUR_HOURS))
        self.assertTrue(schedule.needs_delay_warning(e, T0 + self.FOUR_HOURS, self.FOUR_HOURS))
        e.delay_warned = True
        self.assertFalse(schedule.needs_delay_warning(e, T0 + 2 * self.FOUR_HOURS, self.FOUR_HOURS))

    def test_never_for_null_sender(self) -> None:
        self.assertFalse(schedule.needs_delay_warning(entry(sender=""), T0 + 10**6, self.FOUR_HOURS))

    def test_zero_turns_it_off(self) -> None:
        self.assertFalse(schedule.needs_delay_warning(entry(), T0 + 10**6, 0))

    def test_only_recipients_allowing_delay(self) -> None:
        later = T0 + self.FOUR_HOURS
        no_delay = entry(
            QueuedRecipient("a@x.org", notify=("FAILURE",)), QueuedRecipient("b@x.org", notify=("NEVER",))
        )
        self.assertFalse(schedule.needs_delay_warning(no_delay, later, self.FOUR_HOURS))
        mixed = entry(
            QueuedRecipient("a@x.org", notify=("FAILURE",)),
            QueuedRecipient("b@x.org"),
            QueuedRecipient("c@x.org", notify=("DELAY",), state=DELIVERED),
        )
        self.assertTrue(schedule.needs_delay_warning(mixed, later, self.FOUR_HOURS))
        self.assertEqual([r.address for r in schedule.delay_recipients(mixed)], ["b@x.org"])

    def test_nothing_pending_nothing_to_warn(self) -> None:
        e = entry(QueuedRecipient("a@x.org", state=BOUNCED))
        self.assertFalse(schedule.needs_delay_warning(e, T0 + self.FOUR_HOURS, self.FOUR_HOURS))


class ApplyReplyTests(TestCase):
    HOST = "mx1.example.org [192.0.2.1]"

    def apply(self, reply: Reply, r: QueuedRecipient | None = None) -> QueuedRecipient:
        r = r or QueuedRecipient("bob@example.org")
        schedule.apply_reply(r, reply, self.HOST, T0)
        return r

    def test_2xx_delivered(self) -> None:
        r = self.apply(Reply(250, "2.1.5", "ok"))
        self.assertEqual((r.state, r.status, r.final_time, r.attempts), (DELIVERED, "2.1.5", T0, 1))
        self.assertEqual((r.last_reply, r.remote_mta, r.last_attempt), ("250 2.1.5 ok", self.HOST, T0))

    def test_5xx_bounced(self) -> None:
        r = self.apply(Reply(550, "5.1.1", "<bob@example.org>: no such user"))
        self.assertEqual((r.state, r.status, r.final_time), (BOUNCED, "5.1.1", T0))

    def test_4xx_pending(self) -> None:
        r = self.apply(Reply(451, "4.7.1", "greylisted"))
        self.assertEqual((r.state, r.status, r.final_time, r.attempts), (PENDING, "4.7.1", None, 1))
        self.apply(Reply(451, "4.7.1", "greylisted"), r)
        self.assertEqual(r.attempts, 2)

    def test_status_without_or_with_wrong_enhanced_code(self) -> None:
        """A missing or contradictory enhanced code falls back to the reply's class."""
        self.assertEqual(self.apply(Reply(550, "", "no")).status, "5.0.0")
        self.assertEqual(self.apply(Reply(550, "2.1.5", "odd")).status, "5.0.0")
        self.assertEqual(self.apply(Reply(452, "x.y.z", "full")).status, "4.0.0")

    def test_odd_codes_are_temporary(self) -> None:
        for code in (354, 199, 600, 0):
            r = self.apply(Reply(code, "", "??"))
            self.assertEqual((r.state, r.status), (PENDING, "4.0.0"), code)

    def test_final_states_stay(self) -> None:
        """A late answer never changes a delivered or bounced recipient."""
        for state in (DELIVERED, BOUNCED):
            r = QueuedRecipient("bob@example.org", state=state, last_reply="before", attempts=1)
            self.apply(Reply(451, "4.0.0", "later"), r)
            self.assertEqual((r.state, r.last_reply, r.attempts), (state, "before", 1))

    def test_hostile_reply_flattened_and_bounded(self) -> None:
        r = self.apply(Reply(550, "5.0.0", "no\r\nSubject: injected\x1b[31m" + "x" * 5000))
        self.assertNotIn("\n", r.last_reply)
        self.assertNotIn("\x1b", r.last_reply)
        self.assertLessEqual(len(r.last_reply), schedule.MAX_REPLY)


class HostFailureTests(TestCase):
    def test_temporary_without_reply(self) -> None:
        r = QueuedRecipient("bob@example.org")
        schedule.apply_host_failure(r, HostFailure("mx1.example.org [192.0.2.1]", "connection refused"), T0)
        self.assertEqual((r.state, r.status, r.attempts), (PENDING, "4.4.1", 1))
        self.assertEqual(r.last_reply, "mx1.example.org [192.0.2.1]: connection refused")
        self.assertEqual(r.remote_mta, "mx1.example.org [192.0.2.1]")

    def test_5xx_greeting_is_not_the_recipients_fault(self) -> None:
        r = QueuedRecipient("bob@example.org")
        failure = HostFailure("mx [192.0.2.1]", "greeting", Reply(554, "5.7.1", "go away"))
        schedule.apply_host_failure(r, failure, T0)
        self.assertEqual((r.state, r.status, r.last_reply), (PENDING, "4.7.1", "554 5.7.1 go away"))

    def test_permanent(self) -> None:
        r = QueuedRecipient("bob@example.org")
        schedule.apply_host_failure(r, HostFailure("mx [192.0.2.1]", "no SMTPUTF8", permanent=True), T0)
        self.assertEqual((r.state, r.status, r.final_time), (BOUNCED, "5.0.0", T0))
        r = QueuedRecipient("bob@example.org")
        failure = HostFailure("mx [192.0.2.1]", "too big", Reply(452, "4.3.4", "size"), permanent=True)
        schedule.apply_host_failure(r, failure, T0)
        self.assertEqual((r.state, r.status), (BOUNCED, "5.3.4"))

    def test_status_taken_from_the_reason(self) -> None:
        """The client starts reasons with their RFC 3463 code; a code of the wrong class is ignored."""
        r = QueuedRecipient("bob@example.org")
        failure = HostFailure("mx [192.0.2.1]", "5.6.9 needs SMTPUTF8, not offered", permanent=True)
        schedule.apply_host_failure(r, failure, T0)
        self.assertEqual((r.state, r.status), (BOUNCED, "5.6.9"))
        r = QueuedRecipient("bob@example.org")
        schedule.apply_host_failure(r, HostFailure("mx [192.0.2.1]", "5.3.4 too big"), T0)
        self.assertEqual((r.state, r.status), (PENDING, "4.4.1"))


class DestinationErrorTests(TestCase):
    def test_status_taken_from_the_reason(self) -> None:
        r = QueuedRecipient("bob@nomail.example")
        schedule.apply_destination_error(r, DestinationError("nomail.example", "5.1.10 null MX", True), T0)
        self.assertEqual((r.state, r.status), (BOUNCED, "5.1.10"))

    def test_permanent_and_temporary(self) -> None:
        r = QueuedRecipient("bob@nowhere.example")
        schedule.apply_destination_error(r, DestinationError("nowhere.example", "null MX", True), T0)
        self.assertEqual((r.state, r.status, r.remote_mta), (BOUNCED, "5.1.2", ""))
        self.assertEqual(r.last_reply, "nowhere.example: null MX")
        r = QueuedRecipient("bob@slow.example")
        schedule.apply_destination_error(r, DestinationError("slow.example", "DNS timeout", False), T0)
        self.assertEqual((r.state, r.status, r.attempts), (PENDING, "4.4.3", 1))


class AdminBounceTests(TestCase):
    def test_pending_only(self) -> None:
        pending = QueuedRecipient("a@x.org", last_reply="451 4.7.1 later", remote_mta="mx [192.0.2.1]")
        done = QueuedRecipient("b@x.org", state=DELIVERED, status="2.0.0")
        for r in (pending, done):
            schedule.apply_admin_bounce(r, T0)
        self.assertEqual((pending.state, pending.status), (BOUNCED, "5.0.0"))
        self.assertEqual(pending.last_reply, "bounced by the administrator")
        self.assertEqual((pending.remote_mta, pending.final_time), ("", T0))
        self.assertEqual((done.state, done.status), (DELIVERED, "2.0.0"))


class OutcomeProperties(TestCase):
    @given(st.integers(0, 999), st.text(max_size=40), st.text(max_size=200))
    def test_any_reply_gives_a_consistent_state(self, code: int, enhanced: str, text: str) -> None:
        """Whatever a server answers: the state follows the status class, and the status is a valid
        RFC 3463 code of class 2, 4 or 5."""
        r = QueuedRecipient("bob@example.org")
        schedule.apply_reply(r, Reply(code, enhanced, text), "mx", T0)
        self.assertRegex(r.status, r"^[245]\.\d{1,3}\.\d{1,3}$")
        self.assertEqual(r.state, {"2": DELIVERED, "4": PENDING, "5": BOUNCED}[r.status[0]])
        self.assertNotRegex(r.last_reply, r"[\x00-\x1f\x7f]")
