"""Tests for kms.queue.dsn: the RFC 3464 report, parsed back with the stdlib ``email`` package."""

from __future__ import annotations

import email
import email.policy
import secrets
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from email.utils import parsedate_to_datetime

from twisted.trial.unittest import TestCase

from kms.queue import dsn
from kms.queue.interfaces import BOUNCED, DELIVERED, PENDING, QueuedRecipient, QueueEntry

T0 = 1_700_000_000.0
ORIGINAL = (
    b"Received: from client by mx.example.test\nSubject: Quarterly numbers\nFrom: alice@example.test\n"
    b"\nHello Bob,\n.\nsee you\n"
)


def bounced(address: str = "bob@example.org", **changes: object) -> QueuedRecipient:
    values: dict[str, object] = {
        "address": address,
        "state": BOUNCED,
        "last_reply": f"550 5.1.1 <{address}>: Recipient address rejected: User unknown",
        "remote_mta": "mx1.example.org [192.0.2.1]",
        "status": "5.1.1",
        "attempts": 1,
        "last_attempt": T0 + 60,
        "final_time": T0 + 60,
    }
    values.update(changes)
    return QueuedRecipient(**values)  # type: ignore[arg-type]


def make_entry(*recipients: QueuedRecipient, body: bytes = ORIGINAL, **changes: object) -> QueueEntry:
    values: dict[str, object] = {
        "id": "Q1",
        "sender": "alice@example.test",
        "recipients": list(recipients) or [bounced()],
        "created": T0,
        "next_attempt": T0,
        "size": len(body),
    }
    values.update(changes)
    return QueueEntry(**values)  # type: ignore[arg-type]


def build(
    entry: QueueEntry, kind: str = dsn.FAILED, body: bytes | None = ORIGINAL, **kwargs: object
) -> bytes:
    options: dict[str, object] = {"reporting_mta": "mail.example.test", "now": T0 + 120, "body": body}
    options.update(kwargs)
    return dsn.build_dsn(entry, entry.recipients, kind, **options)  # type: ignore[arg-type]


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def raw_parts(data: bytes) -> list[tuple[Message, bytes]]:
    """Each MIME part as (its header, its content bytes), cut by the boundary by hand so that every
    part type (also message/global-delivery-status) is read the same way."""
    boundary = parse(data).get_boundary()
    assert boundary is not None
    chunks = data.split(b"\n--" + boundary.encode())
    parts = []
    for chunk in chunks[1:-1]:
        head, _, content = chunk.lstrip(b"\n").partition(b"\n\n")
        parts.append((BytesHeaderParser(policy=email.policy.default).parsebytes(head + b"\n\n"), content))
    return parts


def status_blocks(data: bytes) -> list[Message]:
    """The per-message block and the per-recipient blocks of the delivery-status part."""
    _, content = raw_parts(data)[1]
    blocks = [b for b in content.split(b"\n\n") if b.strip()]
    return [BytesHeaderParser(policy=email.policy.default).parsebytes(b + b"\n\n") for b in blocks]


class FailureTests(TestCase):
    def test_headers(self) -> None:
        message = parse(build(make_entry()))
        self.assertEqual(message["From"], "Mail Delivery System <MAILER-DAEMON@mail.example.test>")
        self.assertEqual([a.addr_spec for a in message["To"].addresses], ["alice@example.test"])
        self.assertEqual(message["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(message["Auto-Submitted"], "auto-replied")
        self.assertEqual(message["MIME-Version"], "1.0")
        self.assertEqual(parsedate_to_datetime(message["Date"]).timestamp(), T0 + 120)
        self.assertRegex(message["Message-ID"], r"^<Q1\.[0-9a-f]+@mail\.example\.test>$")
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "delivery-status")
        self.assertEqual(
            [p.get_content_type() for p in message.iter_parts()],
            ["text/plain", "message/delivery-status", "message/rfc822"],
        )

    def test_message_ids_differ(self) -> None:
        first, second = parse(build(make_entry())), parse(build(make_entry()))
        self.assertNotEqual(first["Message-ID"], second["Message-ID"])

    def test_delivery_status_fields(self) -> None:
        """Every RFC 3464 field, read by the email package's own message/delivery-status parser."""
        entry = make_entry(bounced(orcpt="rfc822;Bob@Example.ORG"), envid="QQ314159")
        message = parse(build(entry))
        status = list(message.iter_parts())[1].get_payload()
        assert isinstance(status, list)
        per_message, per_recipient = status
        self.assertEqual(per_message["Reporting-MTA"], "dns; mail.example.test")
        self.assertEqual(per_message["Original-Envelope-Id"], "QQ314159")
        self.assertEqual(parsedate_to_datetime(per_message["Arrival-Date"]).timestamp(), T0)
        self.assertEqual(per_recipient["Original-Recipient"], "rfc822;Bob@Example.ORG")
        self.assertEqual(per_recipient["Final-Recipient"], "rfc822; bob@example.org")
        self.assertEqual(per_recipient["Action"], "failed")
        self.assertEqual(per_recipient["Status"], "5.1.1")
        self.assertEqual(per_recipient["Remote-MTA"], "dns; mx1.example.org")
        self.assertEqual(
            per_recipient["Diagnostic-Code"],
            "smtp; 550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown",
        )
        self.assertEqual(parsedate_to_datetime(per_recipient["Last-Attempt-Date"]).timestamp(), T0 + 60)
        self.assertIsNone(per_recipient["Will-Retry-Until"])

    def test_optional_fields_absent(self) -> None:
        """No ENVID, no ORCPT, no attempt yet, no remote host: those fields are left out."""
        r = bounced(remote_mta="", last_attempt=None, last_reply="bounced by the administrator")
        r.status = "5.0.0"
        per_message, per_recipient = status_blocks(build(make_entry(r)))
        self.assertIsNone(per_message["Original-Envelope-Id"])
        for name in ("Original-Recipient", "Remote-MTA", "Last-Attempt-Date", "Diagnostic-Code"):
            self.assertIsNone(per_recipient[name], name)
        self.assertEqual(per_recipient["Status"], "5.0.0")

    def test_malformed_orcpt_left_out(self) -> None:
        for orcpt in ("no-type-here", ";x@y", "rfc822;", "bad type;x@y"):
            _, per_recipient = status_blocks(build(make_entry(bounced(orcpt=orcpt))))
            self.assertIsNone(per_recipient["Original-Recipient"], orcpt)

    def test_several_recipients(self) -> None:
        rs = [bounced("a@example.org"), bounced("b@example.net", status="5.7.1", last_reply="554 5.7.1 no")]
        blocks = status_blocks(build(make_entry(*rs)))
        self.assertEqual(len(blocks), 3)
        finals = [b["Final-Recipient"] for b in blocks[1:]]
        self.assertEqual(finals, ["rfc822; a@example.org", "rfc822; b@example.net"])
        self.assertEqual([b["Status"] for b in blocks[1:]], ["5.1.1", "5.7.1"])

    def test_human_part(self) -> None:
        text = list(parse(build(make_entry())).iter_parts())[0].get_content()
        self.assertIn("could not be delivered", text)
        self.assertIn("<bob@example.org>: host mx1.example.org [192.0.2.1] said: 550 5.1.1", text)
        self.assertIn("User unknown", text)

    def test_expired_temporary_failure_explained(self) -> None:
        r = bounced(status="4.4.1", last_reply="mx1.example.org [192.0.2.1]: connection refused")
        message = parse(build(make_entry(r)))
        text = " ".join(list(message.iter_parts())[0].get_content().split())
        self.assertIn("mx1.example.org [192.0.2.1]: connection refused", text)
        self.assertIn("longer than a message may stay in the queue", text)
        _, per_recipient = status_blocks(build(make_entry(r)))
        self.assertEqual((per_recipient["Action"], per_recipient["Status"]), ("failed", "4.4.1"))
        self.assertIsNone(per_recipient["Diagnostic-Code"])  # not an SMTP reply

    def test_null_sender_refused(self) -> None:
        self.assertRaises(ValueError, build, make_entry(sender=""))

    def test_bad_kind_or_no_recipients_refused(self) -> None:
        self.assertRaises(ValueError, build, make_entry(), "expanded")
        self.assertRaises(ValueError, dsn.build_dsn, make_entry(), [], dsn.FAILED, reporting_mta="m", now=T0)


class ReturnedContentTests(TestCase):
    def returned(self, data: bytes) -> tuple[str, bytes]:
        header, content = raw_parts(data)[2]
        return header.get_content_type(), content

    def test_ret_absent_returns_the_whole_message(self) -> None:
        """RFC 3461 §4.3 leaves it to us; we return everything, the sender may have no copy."""
        kind, content = self.returned(build(make_entry()))
        self.assertEqual((kind, content), ("message/rfc822", ORIGINAL))
        inner = list(parse(build(make_entry())).iter_parts())[2].get_payload()[0]  # type: ignore[index]
        self.assertEqual(inner["Subject"], "Quarterly numbers")

    def test_ret_full(self) -> None:
        self.assertEqual(self.returned(build(make_entry(ret="FULL"))), ("message/rfc822", ORIGINAL))

    def test_ret_hdrs(self) -> None:
        kind, content = self.returned(build(make_entry(ret="HDRS")))
        self.assertEqual(kind, "text/rfc822-headers")
        self.assertEqual(content, ORIGINAL.split(b"\n\n")[0] + b"\n")
        self.assertNotIn(b"Hello Bob", build(make_entry(ret="HDRS")))

    def test_large_message_returns_the_header_only(self) -> None:
        body = ORIGINAL + b"x" * dsn.RETURN_LIMIT
        data = build(make_entry(body=body), body=body)
        kind, content = self.returned(data)
        self.assertEqual(kind, "text/rfc822-headers")
        self.assertNotIn(b"Hello Bob", data)
        self.assertIn("only its header is returned", list(parse(data).iter_parts())[0].get_content())

    def test_truncated_body_given_returns_the_header_only(self) -> None:
        """The runner may pass only the first bytes: entry.size shows it was not all of it."""
        body = ORIGINAL + b"y" * 5000
        kind, content = self.returned(build(make_entry(body=body), body=body[:200]))
        self.assertEqual(kind, "text/rfc822-headers")
        self.assertTrue(content.startswith(b"Received: "))

    def test_no_body_no_third_part(self) -> None:
        self.assertEqual(len(list(parse(build(make_entry(), body=None)).iter_parts())), 2)

    def test_headerless_garbage(self) -> None:
        """A body without a blank line, cut in a line: only whole lines come back."""
        body = b"X-One: 1\nX-Two: 2\nX-Thr"
        entry = make_entry(body=body + b"ee: 3\n\nbody\n")
        kind, content = self.returned(build(entry, dsn.DELAYED, body=body))
        self.assertEqual((kind, content), ("text/rfc822-headers", b"X-One: 1\nX-Two: 2\n"))

    def test_eight_bit_message(self) -> None:
        body = "Subject: caf\u00e9\nContent-Type: text/plain; charset=utf-8\n\nna\u00efve\n".encode()
        data = build(make_entry(body=body, body_8bit=True), body=body)
        header, content = raw_parts(data)[2]
        self.assertEqual(header.get_content_type(), "message/global")
        self.assertEqual(header["Content-Transfer-Encoding"], "8bit")
        self.assertEqual(content, body)
        self.assertFalse(data.isascii())

    def test_eight_bit_body_ascii_header(self) -> None:
        body = b"Subject: x\n\n\xe9t\xe9\n"
        header, content = raw_parts(build(make_entry(body=body), body=body))[2]
        self.assertEqual(header.get_content_type(), "message/rfc822")
        self.assertEqual(header["Content-Transfer-Encoding"], "8bit")
        self.assertEqual(content, body)

    def test_boundary_never_inside_the_original(self) -> None:
        """A returned message that contains the first boundary drawn makes us draw another."""
        drawn = iter(["aaaa", "aaaa", "bbbb", "cccc"])
        self.patch(secrets, "token_hex", lambda n=None: next(drawn))
        body = ORIGINAL + b"--=_kms-dsn-aaaa\nContent-Type: text/plain\n\nfake part\n"
        data = build(make_entry(body=body), body=body)
        message = parse(data)
        self.assertEqual(message.get_boundary(), "=_kms-dsn-bbbb")
        self.assertEqual(len(list(message.iter_parts())), 3)
        self.assertEqual(raw_parts(data)[2][1], body)


class DelayAndSuccessTests(TestCase):
    def test_delay(self) -> None:
        r = QueuedRecipient(
            "bob@example.org",
            state=PENDING,
            last_reply="451 4.7.1 greylisted",
            remote_mta="mx1.example.org [192.0.2.1]",
            status="4.7.1",
            last_attempt=T0 + 7200,
        )
        data = build(make_entry(r), dsn.DELAYED, will_retry_until=T0 + 5 * 86400)
        message = parse(data)
        self.assertEqual(message["Subject"], "Delayed Mail (still being retried)")
        _, per_recipient = status_blocks(data)
        self.assertEqual((per_recipient["Action"], per_recipient["Status"]), ("delayed", "4.7.1"))
        self.assertEqual(parsedate_to_datetime(per_recipient["Will-Retry-Until"]).timestamp(), T0 + 5 * 86400)
        self.assertEqual(raw_parts(data)[2][0].get_content_type(), "text/rfc822-headers")  # never the body
        self.assertNotIn(b"Hello Bob", data)
        text = list(message.iter_parts())[0].get_content()
        self.assertIn("do not need to send the message again", text)

    def test_status_agrees_with_the_action(self) -> None:
        """A delay is never reported with a permanent code, a success never with a failure code."""
        for kind, status, expected in [
            (dsn.DELAYED, "", "4.0.0"),
            (dsn.DELAYED, "5.1.1", "4.0.0"),
            (dsn.DELAYED, "4.4.1", "4.4.1"),
            (dsn.DELIVERED, "4.4.1", "2.0.0"),
            (dsn.FAILED, "", "5.0.0"),
        ]:
            r = QueuedRecipient("bob@example.org", status=status)
            _, per_recipient = status_blocks(build(make_entry(r), kind))
            self.assertEqual(per_recipient["Status"], expected, (kind, status))

    def test_delivered_and_relayed(self) -> None:
        r = QueuedRecipient("bob@example.org", state=DELIVERED, status="2.0.0", remote_mta="mx [192.0.2.1]")
        for kind in (dsn.DELIVERED, dsn.RELAYED):
            data = build(make_entry(r, ret="FULL"), kind)
            self.assertEqual(parse(data)["Subject"], "Successful Mail Delivery Report")
            _, per_recipient = status_blocks(data)
            self.assertEqual((per_recipient["Action"], per_recipient["Status"]), (kind, "2.0.0"))
            self.assertEqual(raw_parts(data)[2][0].get_content_type(), "text/rfc822-headers")


class VersionTests(TestCase):
    def test_product_named_only_when_given(self) -> None:
        hidden = build(make_entry(), product=None)
        shown = build(make_entry(), product="kms 0.1.0")
        self.assertNotIn(b"kms 0.1", hidden)
        self.assertNotIn(b"kms 0", hidden.split(b"\n--")[0] + hidden.split(b"\n--")[1])
        self.assertIn("mail.example.test (kms 0.1.0)", list(parse(shown).iter_parts())[0].get_content())


class InternationalTests(TestCase):
    def test_utf8_recipient(self) -> None:
        """RFC 6533: message/global-delivery-status, the utf-8 address type, raw UTF-8."""
        r = bounced("b\u00f8b@ex\u00e4mple.org", orcpt="utf-8;b\u00f8b@ex\u00e4mple.org")
        data = build(make_entry(r, smtputf8=True))
        header, _ = raw_parts(data)[1]
        self.assertEqual(header.get_content_type(), "message/global-delivery-status")
        self.assertEqual(header["Content-Transfer-Encoding"], "8bit")
        _, per_recipient = status_blocks(data)
        self.assertEqual(per_recipient["Final-Recipient"], "utf-8; b\u00f8b@ex\u00e4mple.org")
        self.assertEqual(per_recipient["Original-Recipient"], "utf-8;b\u00f8b@ex\u00e4mple.org")
        text_header, text = raw_parts(data)[0]
        self.assertEqual(text_header.get_content_charset(), "utf-8")
        self.assertIn("b\u00f8b@ex\u00e4mple.org", text.decode("utf-8"))

    def test_utf8_sender(self) -> None:
        data = build(make_entry(sender="\u00e4lice@example.test", smtputf8=True))
        message = email.message_from_string(data.decode("utf-8"), policy=email.policy.default)  # RFC 6532
        self.assertEqual([a.addr_spec for a in message["To"].addresses], ["\u00e4lice@example.test"])

    def test_ascii_stays_seven_bit(self) -> None:
        data = build(make_entry())
        self.assertTrue(data.isascii())
        for header, _ in raw_parts(data):
            self.assertEqual(header["Content-Transfer-Encoding"], "7bit")


class HostileInputTests(TestCase):
    def test_reply_cannot_add_fields_or_parts(self) -> None:
        """A remote reply with CR/LF, a fake field and a fake boundary stays one Diagnostic-Code line."""
        evil = "550 5.1.1 no\r\nAction: delivered\r\n\r\n--x\r\nContent-Type: text/html\x1b[2J"
        data = build(make_entry(bounced(last_reply=evil, remote_mta="mx\r\nX-Evil: 1 [192.0.2.1]")))
        blocks = status_blocks(data)
        self.assertEqual(len(blocks), 2)
        self.assertEqual(blocks[1].get_all("Action"), ["failed"])
        self.assertNotIn(b"\x1b", data)
        self.assertNotIn(b"\r", data)
        self.assertEqual(len(list(parse(data).iter_parts())), 3)
        self.assertIsNone(blocks[1]["X-Evil"])

    def test_lines_stay_within_smtp_limits(self) -> None:
        long_reply = "550 5.1.1 " + "x" * 2000
        data = build(make_entry(bounced(last_reply=long_reply, orcpt="rfc822;" + "y" * 2000)))
        self.assertLessEqual(max(len(line) for line in data.split(b"\n")), 998)

    def test_envid_is_printable(self) -> None:
        per_message, _ = status_blocks(build(make_entry(envid="id\u00e9\nX-Evil: 1")))
        self.assertEqual(per_message["Original-Envelope-Id"], "id\\xe9 X-Evil: 1")
        self.assertIsNone(per_message["X-Evil"])
