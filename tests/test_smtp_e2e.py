"""The SMTP listeners end to end: the real service on 127.0.0.1, driven by clients we did not write.

smtplib (plain, STARTTLS, SMTPS, AUTH), swaks (pipelining, TLS, AUTH) and ``openssl s_client``
(certificate verification) talk to the service tree that ``twistd kms`` runs; the assertions read
the maildir files on disk.  Blocking clients run in threads (or child processes) so the trial
reactor keeps serving them.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.server import RunningServer, add_user, write_config

PASSWORD = "correct horse battery"
MESSAGE = b"Subject: hello\r\nFrom: <sender@remote.test>\r\n\r\nline one\r\n.leading dot\r\nlast line\r\n"


def tls_client_context(cafile: Path) -> ssl.SSLContext:
    """A client that verifies our self-signed certificate and the name "localhost"."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.check_hostname = True
    return ctx


class _ServerCase(TestCase):
    """Starts a server with two users: alice (reversible password) and bob (one-way hash)."""

    local_group = '["10.9.9.9"]'
    hide_local_ip = False

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.dir = Path(self.mktemp())
        path = write_config(
            self.dir, local=self.local_group, hide_local_ip=self.hide_local_ip, max_size="3MB"
        )
        self.server = RunningServer(path)
        add_user(self.server.config, "alice@example.test", PASSWORD, "des")
        add_user(self.server.config, "bob@example.test", PASSWORD, "sha")
        yield self.server.start()
        self.addCleanup(self.server.stop)
        self.cafile = self.dir / "tls" / "server.pem"

    def smtp(self, name: str = "smtp") -> smtplib.SMTP:
        return smtplib.SMTP(
            "127.0.0.1", self.server.port(name), local_hostname="client.remote.test", timeout=10
        )

    def run_client(self, func):  # type: ignore[no-untyped-def]
        return deferToThread(func)


class SMTPEndToEndTests(_ServerCase):
    # --- plain delivery ----------------------------------------------------------------------

    @inlineCallbacks
    def test_mail_loop_is_refused(self):  # type: ignore[no-untyped-def]
        """50 Received headers: 554 5.4.6 at the end of DATA, nothing stored; 49 still pass."""

        def client(hops: int) -> tuple[int, bytes]:
            trace = b"".join(b"Received: from hop%d by hop%d\r\n" % (i, i + 1) for i in range(hops))
            with self.smtp() as s:
                s.ehlo()
                s.mail("sender@remote.test")
                s.rcpt("alice@example.test")
                return s.data(trace + b"Subject: loop\r\n\r\nbody\r\n")

        code, text = yield self.run_client(lambda: client(50))
        self.assertEqual((code, text[:5]), (554, b"5.4.6"))
        self.assertEqual(self.server.messages("alice@example.test"), [])
        code, _ = yield self.run_client(lambda: client(49))
        self.assertEqual(code, 250)
        self.assertEqual(len(self.server.messages("alice@example.test")), 1)

    @inlineCallbacks
    def test_plain_delivery(self):  # type: ignore[no-untyped-def]
        """A message from anyone to a local user is stored in new/ with our trace headers first."""

        def client() -> tuple[bytes, tuple[int, bytes]]:
            with smtplib.SMTP(local_hostname="client.remote.test", timeout=10) as s:
                _, banner = s.connect("127.0.0.1", self.server.port("smtp"))
                s.ehlo()
                s.sendmail("sender@remote.test", ["alice@example.test"], MESSAGE)
                return banner, s.noop()

        banner, noop = yield self.run_client(client)
        self.assertEqual(banner, b"mx.example.test ESMTP")
        self.assertEqual(noop[0], 250)
        [stored] = self.server.messages("alice@example.test")
        self.assertTrue(stored.startswith(b"Received: from client.remote.test (unknown [127.0.0.1])\n"))
        self.assertIn(b"\tby mx.example.test with ESMTP id ", stored)
        self.assertIn(b"\tfor <alice@example.test>;", stored)
        self.assertIn(b"X-Envelope-To: <alice@example.test>\n", stored)
        self.assertTrue(stored.endswith(b"\n\nline one\n.leading dot\nlast line\n"), stored)
        self.assertNotIn(b"\r", stored)
        self.assertNotIn(b"kms", stored.split(b"\n\n")[0].lower().replace(b"mx.example", b""))
        self.assertEqual(list((self.server.maildir("alice@example.test") / "tmp").iterdir()), [])
        mail_log = (self.server.store / "logs" / "mail.log").read_text()
        self.assertIn("delivered", mail_log)
        self.assertIn("alice@example.test", mail_log)

    @inlineCallbacks
    def test_recipient_checks(self):  # type: ignore[no-untyped-def]
        """Unknown local users get 550 5.1.1; other domains from outside get 554 5.7.1; nothing stored."""

        def client() -> dict[str, tuple[int, bytes]]:
            with self.smtp() as s:
                s.ehlo()
                s.mail("sender@remote.test")
                return {
                    "unknown": s.rcpt("nobody@example.test"),
                    "relay": s.rcpt("victim@elsewhere.test"),
                    "ok": s.rcpt("ALICE@Example.Test"),
                }

        replies = yield self.run_client(client)
        self.assertEqual(replies["unknown"][0], 550)
        self.assertTrue(replies["unknown"][1].startswith(b"5.1.1"))
        self.assertEqual(replies["relay"][0], 554)
        self.assertTrue(replies["relay"][1].startswith(b"5.7.1"))
        self.assertEqual(replies["ok"][0], 250)

    @inlineCallbacks
    def test_size_refused_at_mail(self):  # type: ignore[no-untyped-def]
        """smtplib announces SIZE; a message over max_message_size is refused with 552 5.3.4."""
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 3100

        def client() -> BaseException | None:
            with self.smtp() as s:
                try:
                    s.sendmail("sender@remote.test", ["alice@example.test"], big)
                except smtplib.SMTPSenderRefused as e:
                    return e
            return None

        error = yield self.run_client(client)
        self.assertIsNotNone(error)
        self.assertEqual(error.smtp_code, 552)
        self.assertEqual(self.server.messages("alice@example.test"), [])

    @inlineCallbacks
    def test_eight_bit_and_smtputf8(self):  # type: ignore[no-untyped-def]
        """8BITMIME bodies and SMTPUTF8 addresses arrive byte for byte."""
        body = "Subject: Grüße\r\nFrom: jörg@example.org\r\n\r\nÄpfel und Öl\r\n".encode()

        def client() -> None:
            with self.smtp() as s:
                s.ehlo()
                self.assertTrue(s.has_extn("smtputf8"))
                self.assertTrue(s.has_extn("8bitmime"))
                s.sendmail(
                    "jörg@example.org",
                    ["alice@example.test"],
                    body,
                    mail_options=["SMTPUTF8", "BODY=8BITMIME"],
                )

        yield self.run_client(client)
        [stored] = self.server.messages("alice@example.test")
        self.assertIn("Subject: Grüße\nFrom: jörg@example.org\n\nÄpfel und Öl\n".encode(), stored)

    # --- TLS and AUTH ------------------------------------------------------------------------

    @inlineCallbacks
    def test_starttls_auth_plain(self):  # type: ignore[no-untyped-def]
        """STARTTLS with a verified certificate, then AUTH PLAIN: the Received says ESMTPSA."""

        def client() -> list[str]:
            with self.smtp("submission") as s:
                s.ehlo()
                s.starttls(context=tls_client_context(self.cafile))
                s.ehlo()
                mechs = s.esmtp_features["auth"].split()
                s.login("alice@example.test", PASSWORD)
                s.sendmail("alice@example.test", ["bob@example.test"], MESSAGE)
                return mechs

        mechs = yield self.run_client(client)
        self.assertIn("PLAIN", mechs)
        self.assertIn("LOGIN", mechs)
        [stored] = self.server.messages("bob@example.test")
        self.assertIn(b" with ESMTPSA id ", stored)
        security = (self.server.store / "logs" / "security.log").read_text()
        self.assertIn("alice@example.test", security)
        self.assertNotIn(PASSWORD, security)

    @inlineCallbacks
    def test_submission_requires_auth(self):  # type: ignore[no-untyped-def]
        """On the submission port MAIL without AUTH gets 530 5.7.0; AUTH LOGIN then works."""

        def client() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
            with self.smtp("submission") as s:
                s.ehlo()
                s.starttls(context=tls_client_context(self.cafile))
                s.ehlo()
                refused = s.mail("alice@example.test")
                s.rset()
                s.user, s.password = "bob@example.test", PASSWORD
                auth = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
                return refused, auth

        refused, auth = yield self.run_client(client)
        self.assertEqual(refused[0], 530)
        self.assertTrue(refused[1].startswith(b"5.7.0"))
        self.assertEqual(auth[0], 235)

    @inlineCallbacks
    def test_smtps_implicit_tls(self):  # type: ignore[no-untyped-def]
        """The smtps listener speaks TLS from the first byte (RFC 8314) and offers no STARTTLS."""

        def client() -> dict[str, str]:
            with smtplib.SMTP_SSL(
                "127.0.0.1", self.server.port("smtps"), context=tls_client_context(self.cafile), timeout=10
            ) as s:
                s.ehlo()
                features = dict(s.esmtp_features)
                s.login("bob@example.test", PASSWORD)
                s.sendmail("bob@example.test", ["alice@example.test"], MESSAGE)
                return features

        features = yield self.run_client(client)
        self.assertNotIn("starttls", features)
        [stored] = self.server.messages("alice@example.test")
        self.assertIn(b" with ESMTPSA id ", stored)

    @inlineCallbacks
    def test_wrong_password(self):  # type: ignore[no-untyped-def]
        """Wrong password and unknown user both get 535 5.7.8, and the log says why, without the password."""

        def client(user: str) -> smtplib.SMTPAuthenticationError | None:
            with smtplib.SMTP_SSL(
                "127.0.0.1", self.server.port("smtps"), context=tls_client_context(self.cafile), timeout=10
            ) as s:
                try:
                    s.login(user, "wrong password!")
                except smtplib.SMTPAuthenticationError as e:
                    return e
            return None

        wrong = yield self.run_client(lambda: client("alice@example.test"))
        unknown = yield self.run_client(lambda: client("nobody@example.test"))
        self.assertEqual((wrong.smtp_code, wrong.smtp_error), (unknown.smtp_code, unknown.smtp_error))
        self.assertEqual(wrong.smtp_code, 535)
        self.assertTrue(wrong.smtp_error.startswith(b"5.7.8"))
        security = (self.server.store / "logs" / "security.log").read_text()
        self.assertIn("login-failed", security)
        self.assertNotIn("wrong password!", security)

    # --- real third-party clients ---------------------------------------------------------------

    def swaks(self, *args: str) -> subprocess.CompletedProcess[str]:
        if not shutil.which("swaks"):
            raise SkipTest("swaks is not installed (.ci/run installs it)")
        return subprocess.run(
            ["swaks", "--helo", "swaks.remote.test", *args], capture_output=True, text=True, timeout=30
        )

    @inlineCallbacks
    def test_swaks_pipelining_multiple_recipients(self):  # type: ignore[no-untyped-def]
        """swaks --pipeline: MAIL, three RCPTs (one unknown) and DATA in one go; replies in order."""
        result = yield deferToThread(
            self.swaks,
            "--server",
            f"127.0.0.1:{self.server.port('smtp')}",
            "--pipeline",
            "--from",
            "sender@remote.test",
            "--to",
            "alice@example.test,nobody@example.test,bob@example.test",
        )
        self.assertIn("<** 550 5.1.1", result.stdout)
        self.assertIn("250 2.0.0 Ok: queued as", result.stdout)
        self.assertEqual(len(self.server.messages("alice@example.test")), 1)
        self.assertEqual(len(self.server.messages("bob@example.test")), 1)

    @inlineCallbacks
    def test_swaks_starttls_auth_login(self):  # type: ignore[no-untyped-def]
        """swaks with STARTTLS and AUTH LOGIN on the submission port."""
        result = yield deferToThread(
            self.swaks,
            "--server",
            f"127.0.0.1:{self.server.port('submission')}",
            "--tls",
            "--auth",
            "LOGIN",
            "--auth-user",
            "alice@example.test",
            "--auth-password",
            PASSWORD,
            "--from",
            "alice@example.test",
            "--to",
            "bob@example.test",
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("235 2.7.0", result.stdout)
        self.assertEqual(len(self.server.messages("bob@example.test")), 1)

    @inlineCallbacks
    def test_openssl_starttls_verifies(self):  # type: ignore[no-untyped-def]
        """openssl s_client -starttls smtp verifies the chain and host name, then EHLO works over TLS."""
        if not shutil.which("openssl"):
            raise SkipTest("openssl is not installed")

        def client() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    "openssl",
                    "s_client",
                    "-starttls",
                    "smtp",
                    "-connect",
                    f"127.0.0.1:{self.server.port('smtp')}",
                    "-CAfile",
                    str(self.cafile),
                    "-verify_return_error",
                    "-verify_hostname",
                    "localhost",
                    "-servername",
                    "localhost",
                    "-quiet",
                ],
                input="EHLO openssl.test\r\nQUIT\r\n",
                capture_output=True,
                text=True,
                timeout=30,
            )

        result = yield deferToThread(client)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("250-mx.example.test", result.stdout)
        self.assertIn("221 2.0.0", result.stdout)
        self.assertNotIn("STARTTLS", result.stdout)

    # --- hostile clients, raw bytes ---------------------------------------------------------------

    def raw_session(self, payload: bytes, port_name: str = "smtp", wait: float = 1.0) -> bytes:
        """Send bytes exactly as given (that is the point) and collect every reply until quiet."""
        with socket.create_connection(("127.0.0.1", self.server.port(port_name)), timeout=10) as sock:
            sock.recv(1024)
            sock.sendall(payload)
            sock.settimeout(wait)
            chunks = []
            try:
                while data := sock.recv(65536):
                    chunks.append(data)
            except TimeoutError:
                pass
            return b"".join(chunks)

    @inlineCallbacks
    def test_smuggling_variants_stay_in_one_message(self):  # type: ignore[no-untyped-def]
        """Bare-LF and bare-CR end markers never end DATA: the smuggled MAIL stays body text."""
        smuggle = b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nsmuggled\r\n"
        for marker in (b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"):
            payload = (
                b"EHLO x.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
                b"Subject: s\r\n\r\nbody" + marker + smuggle + b".\r\nQUIT\r\n"
            )
            replies = yield deferToThread(self.raw_session, payload)
            self.assertEqual(replies.count(b"queued as"), 1, (marker, replies))
        self.assertEqual(len(self.server.messages("alice@example.test")), 5)
        self.assertEqual(self.server.messages("bob@example.test"), [])

    @inlineCallbacks
    def test_starttls_pipelined_injection_discarded(self):  # type: ignore[no-untyped-def]
        """Commands pipelined after STARTTLS in the same packet are discarded, not run over TLS (S3)."""

        def client() -> tuple[bytes, bytes]:
            with socket.create_connection(("127.0.0.1", self.server.port("smtp")), timeout=10) as raw:
                raw.recv(1024)
                raw.sendall(b"EHLO x.test\r\n")
                time.sleep(0.2)
                raw.recv(4096)
                raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@remote.test>\r\n")
                ready = raw.recv(1024)
                ctx = tls_client_context(self.cafile)
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"RCPT TO:<alice@example.test>\r\n")
                    after = tls.recv(1024)
                    return ready, after

        ready, after = yield deferToThread(client)
        self.assertEqual(ready, b"220 2.0.0 Ready to start TLS\r\n")
        self.assertTrue(after.startswith(b"503 5.5.1"), after)

    @inlineCallbacks
    def test_disconnect_mid_data_leaves_nothing(self):  # type: ignore[no-untyped-def]
        """A client that vanishes mid-DATA leaves nothing in new/, and its spool file (past 1 MiB) is gone."""

        def client() -> None:
            with socket.create_connection(("127.0.0.1", self.server.port("smtp")), timeout=10) as sock:
                sock.recv(1024)
                sock.sendall(
                    b"HELO x.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
                )
                sock.sendall(b"Subject: cut\r\n\r\n" + (b"y" * 998 + b"\r\n") * 2000)
                time.sleep(0.3)
                spilled = list((self.server.store / "tmp").iterdir())
                self.assertEqual(len(spilled), 1, "a 2 MB message in progress should have spilled to disk")

        yield deferToThread(client)
        yield deferToThread(time.sleep, 0.3)
        self.assertEqual(self.server.messages("alice@example.test"), [])
        self.assertEqual(list((self.server.store / "tmp").iterdir()), [])

    @inlineCallbacks
    def test_hostile_commands_keep_session_usable(self):  # type: ignore[no-untyped-def]
        """Bad AUTH, NUL bytes, CR/LF games and junk get replies; the same session then delivers mail."""
        payload = (
            b"EHLO x.test\r\nAUTH\r\nAUTH PLAIN !!!notbase64\r\nAUTH XYZZY\r\n"
            b"MAIL FROM:<a\x00b@remote.test>\r\n"
            b"MAIL FROM:<a@remote.test> SIZE=abc\r\nRCPT TO:<alice@example.test>\r\n\x00\xff\xfe\r\n"
            b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
            b"Subject: ok\r\n\r\nfine\r\n.\r\n"
            b"QUIT\r\n"
        )
        replies = yield deferToThread(self.raw_session, payload)
        codes = [line[:3] for line in replies.split(b"\r\n") if line and line[3:4] == b" "]
        self.assertEqual(
            codes,
            [
                b"250",
                b"501",
                b"501",
                b"504",
                b"500",
                b"555",
                b"503",
                b"500",
                b"250",
                b"250",
                b"354",
                b"250",
                b"221",
            ],
            replies,
        )
        [stored] = self.server.messages("alice@example.test")
        self.assertTrue(stored.endswith(b"\n\nfine\n"))


class LocalNetworkTests(_ServerCase):
    """127.0.0.1 in relay.local_group with hide_local_ip: relaying allowed (queue later), IP hidden."""

    local_group = '["127.0.0.1"]'
    hide_local_ip = True

    @inlineCallbacks
    def test_local_client_hidden_in_received(self):  # type: ignore[no-untyped-def]
        """A local-network client's address and name do not appear in the Received header."""

        def client() -> None:
            with self.smtp() as s:
                s.sendmail("sender@example.test", ["alice@example.test"], MESSAGE)

        yield self.run_client(client)
        [stored] = self.server.messages("alice@example.test")
        first = stored.split(b"\n")[0]
        self.assertEqual(first, b"Received: from client.remote.test")
        self.assertNotIn(b"127.0.0.1", stored)
