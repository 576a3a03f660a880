"""TNEF and uuencode conversion at delivery, end to end through SMTP (smtplib) to the maildir."""

from __future__ import annotations

import binascii
import os
import smtplib
from email import message_from_bytes
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import default
from pathlib import Path

import tnefparse
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.server import RunningServer, add_user, write_config

# The shared folder sits beside the checkout (as in CI); KMS_TNEF_SAMPLES overrides it.
SAMPLES = os.environ.get(
    "KMS_TNEF_SAMPLES", str(Path(__file__).resolve().parents[2] / "shared" / "testdata" / "tnef")
)


def sample(name: str) -> bytes:
    path = os.path.join(SAMPLES, name)
    if not os.path.exists(path):
        raise SkipTest(f"TNEF sample {path} not available")
    with open(path, "rb") as f:
        return f.read()


def tnef_message(raw: bytes) -> bytes:
    msg = MIMEMultipart()
    msg["From"] = "sender@remote.test"
    msg["Subject"] = "winmail"
    msg.attach(MIMEText("see attached\n"))
    part = MIMEApplication(raw, "ms-tnef")
    part.add_header("Content-Disposition", "attachment", filename="winmail.dat")
    msg.attach(part)
    return msg.as_bytes(policy=default.clone(linesep="\r\n"))


class ConversionEndToEndTests(TestCase):
    decode = "true"

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.dir = Path(self.mktemp())
        extra = f"decode_tnef = {self.decode}\ndecode_uuencode = {self.decode}\n"
        path = write_config(self.dir, max_size="5MB")
        text = path.read_text().replace("[misc]\n", "[misc]\n" + extra)
        path.write_text(text + '\n[logs]\ndebug = ["message_decoding"]\n')
        self.server = RunningServer(path)
        add_user(self.server.config, "alice@example.test", "pw pw pw pw", "des")
        yield self.server.start()
        self.addCleanup(self.server.stop)

    def send(self, *messages: bytes):  # type: ignore[no-untyped-def]
        def client() -> None:
            with smtplib.SMTP(
                "127.0.0.1", self.server.port("smtp"), local_hostname="c.remote.test", timeout=10
            ) as s:
                for m in messages:
                    s.sendmail("sender@remote.test", ["alice@example.test"], m)

        return deferToThread(client)

    def debug_log(self) -> str:
        logs = self.server.store / "logs"
        return "".join(p.read_text() for p in logs.iterdir() if p.is_file())

    @inlineCallbacks
    def test_tnef_samples(self):  # type: ignore[no-untyped-def]
        good = ["one-file.tnef", "two-files.tnef", "umlaut.tnef", "body.tnef"]
        bad = ["garbage-at-end.tnef", "multi-name-property.tnef"]
        yield self.send(*[tnef_message(sample(n)) for n in good + bad])
        stored = self.server.messages("alice@example.test")
        self.assertEqual(len(stored), len(good) + len(bad))
        msgs = [message_from_bytes(data, policy=default) for data in stored]
        converted = [
            m for m in msgs if not any(p.get_content_type() == "application/ms-tnef" for p in m.walk())
        ]
        kept = [m for m in msgs if m not in converted]
        self.assertEqual(len(converted), len(good))
        self.assertEqual(len(kept), len(bad))
        expected = {}
        for n in good:
            parsed = tnefparse.TNEF(sample(n))
            expected[n] = sorted((a.long_filename(), bytes(a.data)) for a in parsed.attachments)
        got = [
            sorted(
                (p.get_filename(), p.get_payload(decode=True))
                for p in m.walk()
                if not p.is_multipart() and p.get_filename()
            )
            for m in converted
        ]
        self.assertEqual(sorted(got), sorted(expected.values()))
        for m in kept:
            [t] = [p for p in m.walk() if p.get_content_type() == "application/ms-tnef"]
            self.assertIn(t.get_payload(decode=True), [sample(n) for n in bad])
        log = self.debug_log()
        self.assertIn("message_decoding.converted", log)
        self.assertIn("message_decoding.kept", log)
        self.assertIn("trailing garbage", log)

    @inlineCallbacks
    def test_uuencode(self):  # type: ignore[no-untyped-def]
        data = bytes(range(256)) * 4
        block = [b"begin 644 data.bin"]
        block += [
            binascii.b2a_uu(data[i : i + 45], backtick=True).rstrip(b"\n") for i in range(0, len(data), 45)
        ]
        block += [b"`", b"end"]
        body = (
            b"Subject: uu\r\nFrom: <sender@remote.test>\r\n\r\nhello\r\n"
            + b"\r\n".join(block)
            + b"\r\nbye\r\n"
        )
        yield self.send(body)
        [stored] = self.server.messages("alice@example.test")
        msg = message_from_bytes(stored, policy=default)
        parts = [p for p in msg.walk() if not p.is_multipart()]
        self.assertEqual([p.get_filename() for p in parts], [None, "data.bin"])
        self.assertEqual(parts[1].get_payload(decode=True), data)
        self.assertEqual(parts[0].get_content().replace("\r\n", "\n"), "hello\nbye\n")
        self.assertTrue(stored.startswith(b"Received: "))
        self.assertIn(b"X-Envelope-To: <alice@example.test>\n", stored)

    @inlineCallbacks
    def test_plain_message_untouched(self):  # type: ignore[no-untyped-def]
        body = b"Subject: plain\r\nFrom: <sender@remote.test>\r\n\r\nnothing to begin with\r\n"
        yield self.send(body)
        [stored] = self.server.messages("alice@example.test")
        self.assertTrue(stored.endswith(b"\n\nnothing to begin with\n"))


class ConversionDisabledTests(ConversionEndToEndTests):
    decode = "false"

    @inlineCallbacks
    def test_tnef_samples(self):  # type: ignore[no-untyped-def]
        raw = tnef_message(sample("one-file.tnef"))
        yield self.send(raw)
        [stored] = self.server.messages("alice@example.test")
        self.assertIn(b"application/ms-tnef", stored)

    @inlineCallbacks
    def test_uuencode(self):  # type: ignore[no-untyped-def]
        body = b"Subject: uu\r\n\r\nbegin 644 a\r\n!80``\r\n`\r\nend\r\n"
        yield self.send(body)
        [stored] = self.server.messages("alice@example.test")
        self.assertTrue(stored.endswith(b"\n\nbegin 644 a\n!80``\n`\nend\n"))
