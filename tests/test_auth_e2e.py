"""Every authentication method on SMTP, IMAP and POP3, end to end, for both storage classes.

The real service tree on 127.0.0.1 is driven by clients we did not write: curl (PLAIN, LOGIN,
CRAM-MD5, DIGEST-MD5 on smtp://, imap://, pop3://), swaks (CRAM-MD5, DIGEST-MD5), imaplib's
``login_cram_md5`` and poplib's ``apop``.  No stock client here speaks SCRAM-SHA-256 (this curl is
built without libgsasl, swaks and the standard library have none), so `ScramClient`
(tests/support/sasl_clients.py) is written from RFC 5802 only and plugged into imaplib's and smtplib's
``authenticate``/``auth`` hooks and a raw POP3 AUTH exchange.

Users: alice is ``des`` (every method), bob is ``sha`` (plaintext methods and SCRAM).  A method
bob's storage cannot serve must fail exactly like a wrong password; only security.log says why.
"""

from __future__ import annotations

import base64
import imaplib
import poplib
import re
import shutil
import smtplib
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.sasl_clients import ScramClient, digest_response
from tests.support.server import RunningServer, add_user, write_config

ALICE, BOB = "alice@example.test", "bob@example.test"
PASSWORDS = {ALICE: "alice's pass phrase", BOB: "bob-Pässwort"}
METHODS = '["SCRAM-SHA-256", "CRAM-MD5", "DIGEST-MD5", "LOGIN", "NTLM", "PLAIN"]'
MESSAGE = b"From: alice@example.test\r\nTo: alice@example.test\r\nSubject: auth e2e\r\n\r\nhello\r\n"
CURL_LOGIN_DENIED = 67


def pop3_sasl(port: int, mechanism: str, respond: Callable[[bytes | None], bytes]) -> list[str]:
    """A POP3 AUTH exchange (RFC 5034) over a raw socket; the server's lines, last one the verdict."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        lines = [f.readline().decode().rstrip()]
        s.sendall(f"AUTH {mechanism}\r\n".encode())
        challenge: bytes | None = None
        while True:
            line = f.readline().decode().rstrip("\r\n")
            lines.append(line)
            if line != "+" and not line.startswith("+ "):
                s.sendall(b"QUIT\r\n")
                f.readline()
                return lines
            challenge = base64.b64decode(line[2:])
            s.sendall(base64.b64encode(respond(challenge)) + b"\r\n")


class AuthEndToEndTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        listeners = {name: "tcp:0:interface=127.0.0.1" for name in ("submission", "pop3", "imap")}
        path = write_config(self.dir, listeners=listeners, extra=f"[security]\nmethods = {METHODS}\n")
        self.server = RunningServer(path)
        add_user(self.server.config, ALICE, PASSWORDS[ALICE], "des")
        add_user(self.server.config, BOB, PASSWORDS[BOB], "sha")
        await self.server.start()
        self.addCleanup(self.server.stop)

    def security_log(self) -> str:
        return (self.server.store / "logs" / "security.log").read_text()

    def port(self, name: str) -> int:
        return self.server.port(name)

    # --- curl: PLAIN, LOGIN, CRAM-MD5, DIGEST-MD5 on all three protocols -----------------------

    def curl(
        self, protocol: str, mechanism: str, user: str, password: str
    ) -> subprocess.CompletedProcess[str]:
        if protocol == "smtp":
            mail = self.dir / "message.eml"
            mail.write_bytes(MESSAGE)
            url = f"smtp://127.0.0.1:{self.port('submission')}"
            extra = ["--mail-from", user, "--mail-rcpt", ALICE, "-T", str(mail)]
        elif protocol == "imap":
            url, extra = f"imap://127.0.0.1:{self.port('imap')}/INBOX", ["-X", "NOOP"]
        else:
            url, extra = f"pop3://127.0.0.1:{self.port('pop3')}/", []
        command = ["curl", "-sSv", "--user", f"{user}:{password}", "--login-options", f"AUTH={mechanism}"]
        return subprocess.run([*command, url, *extra], capture_output=True, text=True, timeout=30)

    @staticmethod
    def verdict(result: subprocess.CompletedProcess[str]) -> str:
        """The server's final answer to the AUTH exchange, as curl -v shows it, without IMAP tags."""
        answers = [
            line[2:]
            for line in result.stderr.splitlines()
            if re.match(r"< (\S+ (OK|NO|BAD) |\+OK|-ERR|235 |535 |454 |501 )", line)
        ]
        assert answers, result.stderr
        auth = [a for a in answers if re.search(r"AUTHENTICATIONFAILED|\[AUTH\]|^535|^235|Logged in", a)]
        return re.sub(r"^\S+ (OK|NO)", r"\1", (auth or answers)[-1])

    async def test_curl_every_method_protocol_and_storage(self) -> None:
        """des users log in with every method; sha users with PLAIN and LOGIN, and their CRAM-MD5 and
        DIGEST-MD5 attempts fail with the same reply as a wrong password, the log saying why."""
        for protocol in ("smtp", "imap", "pop3"):
            for mechanism in ("PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "NTLM"):
                for user in (ALICE, BOB):
                    result = await deferToThread(self.curl, protocol, mechanism, user, PASSWORDS[user])
                    works = user == ALICE or mechanism in ("PLAIN", "LOGIN")
                    where = f"{protocol} {mechanism} {user}: {result.stderr[-1500:]}"
                    self.assertEqual(result.returncode, 0 if works else CURL_LOGIN_DENIED, where)
                    if not works:
                        wrong = await deferToThread(self.curl, protocol, mechanism, ALICE, "wrong")
                        self.assertEqual(wrong.returncode, CURL_LOGIN_DENIED, where)
                        self.assertEqual(self.verdict(result), self.verdict(wrong), where)
        log = self.security_log()
        for protocol in ("smtp", "imap", "pop3"):
            for mechanism in ("CRAM-MD5", "DIGEST-MD5", "NTLM"):
                self.assertIn(
                    f"login-failed protocol={protocol} user={BOB} method={mechanism} "
                    f'reason="{mechanism} impossible for {BOB}: password stored one-way"',
                    log,
                )
                wrong = f'user={ALICE} method={mechanism} reason="wrong password"'
                self.assertIn(f"login-failed protocol={protocol} {wrong}", log)
                self.assertIn(
                    f"login protocol={protocol} user={ALICE} identity={ALICE} method={mechanism}", log
                )
        self.assertNotIn(PASSWORDS[ALICE], log)
        # SMTP: alice with 5 methods, bob with 2; IMAP's SELECT has moved them from new/ to cur/.
        inbox = self.server.maildir(ALICE)
        self.assertEqual(len([*(inbox / "new").iterdir(), *(inbox / "cur").iterdir()]), 5 + 2)

    # --- swaks ----------------------------------------------------------------------------------

    def swaks(self, mechanism: str, user: str, password: str) -> subprocess.CompletedProcess[str]:
        if not shutil.which("swaks"):
            raise SkipTest("swaks is not installed (.ci/run installs it)")
        module = {"CRAM-MD5": "Digest::HMAC_MD5", "DIGEST-MD5": "Authen::SASL", "NTLM": "Authen::NTLM"}[
            mechanism
        ]
        if subprocess.run(["perl", f"-M{module}", "-e1"], capture_output=True).returncode:
            raise SkipTest(f"swaks needs {module} for {mechanism} (libauthen-sasl-perl, libauthen-ntlm-perl)")
        command = ["swaks", "--server", f"127.0.0.1:{self.port('submission')}", "--helo", "swaks.test"]
        command += ["--auth", mechanism, "--auth-user", user, "--auth-password", password]
        command += ["--from", user, "--to", ALICE]
        return subprocess.run(command, capture_output=True, text=True, timeout=30)

    async def test_swaks_cram_digest_and_ntlm(self) -> None:
        """swaks speaks NTLMv1 (Authen::NTLM): refused as a wrong password unless allow_ntlmv1."""
        for mechanism in ("CRAM-MD5", "DIGEST-MD5"):
            ok = await deferToThread(self.swaks, mechanism, ALICE, PASSWORDS[ALICE])
            self.assertEqual(ok.returncode, 0, ok.stdout + ok.stderr)
            self.assertIn("235 2.7.0", ok.stdout)
            sha = await deferToThread(self.swaks, mechanism, BOB, PASSWORDS[BOB])
            wrong = await deferToThread(self.swaks, mechanism, ALICE, "wrong")
            for failed in (sha, wrong):
                self.assertNotEqual(failed.returncode, 0)
                self.assertIn("535 5.7.8 Authentication credentials invalid", failed.stdout)
        self.assertEqual(len(self.server.messages(ALICE)), 2)
        v1 = await deferToThread(self.swaks, "NTLM", ALICE, PASSWORDS[ALICE])
        self.assertIn("535 5.7.8 Authentication credentials invalid", v1.stdout)
        self.assertIn("NTLMv1 refused", self.security_log())

    # --- Python's own clients -------------------------------------------------------------------

    async def test_imaplib_cram_md5(self) -> None:
        def attempt(user: str, password: str) -> str:
            m = imaplib.IMAP4("127.0.0.1", self.port("imap"))
            try:
                return m.login_cram_md5(user, password)[0]
            except imaplib.IMAP4.error as e:
                return str(e)
            finally:
                m.shutdown()

        self.assertEqual(await deferToThread(attempt, ALICE, PASSWORDS[ALICE]), "OK")
        sha = await deferToThread(attempt, BOB, PASSWORDS[BOB])
        wrong = await deferToThread(attempt, ALICE, "wrong")
        unknown = await deferToThread(attempt, "nobody@example.test", "wrong")
        self.assertIn("[AUTHENTICATIONFAILED]", sha)
        self.assertEqual({sha, wrong, unknown}, {sha})

    async def test_kmsctl_changes_reach_the_running_server(self) -> None:
        """``kmsctl user disable`` / ``passwd`` while the server runs take effect at the next login."""

        def login(user: str, password: str) -> str:
            m = imaplib.IMAP4("127.0.0.1", self.port("imap"))
            try:
                return m.login(user, password)[0]
            except imaplib.IMAP4.error as e:
                return str(e)
            finally:
                m.shutdown()

        def kmsctl(*args: str, stdin: str = "") -> None:
            command = [str(Path(sys.executable).parent / "kmsctl"), "--config", str(self.server.config.path)]
            subprocess.run([*command, *args], input=stdin, check=True, capture_output=True, text=True)

        self.assertEqual(await deferToThread(login, ALICE, PASSWORDS[ALICE]), "OK")
        await deferToThread(kmsctl, "user", "disable", ALICE)
        self.assertIn("[AUTHENTICATIONFAILED]", await deferToThread(login, ALICE, PASSWORDS[ALICE]))
        await deferToThread(kmsctl, "user", "enable", ALICE)
        self.assertEqual(await deferToThread(login, ALICE, PASSWORDS[ALICE]), "OK")
        await deferToThread(kmsctl, "user", "passwd", ALICE, "--password-stdin", stdin="a new One-9\n")
        self.assertIn("[AUTHENTICATIONFAILED]", await deferToThread(login, ALICE, PASSWORDS[ALICE]))
        self.assertEqual(await deferToThread(login, ALICE, "a new One-9"), "OK")

    async def test_poplib_apop(self) -> None:
        """APOP works for des users; for sha users it fails like a wrong password or unknown user."""

        def attempt(user: str, password: str) -> str:
            p = poplib.POP3("127.0.0.1", self.port("pop3"), timeout=10)
            try:
                return p.apop(user, password).decode()
            except poplib.error_proto as e:
                return e.args[0].decode()
            finally:
                p.close()

        self.assertTrue((await deferToThread(attempt, ALICE, PASSWORDS[ALICE])).startswith("+OK"))
        sha = await deferToThread(attempt, BOB, PASSWORDS[BOB])
        wrong = await deferToThread(attempt, ALICE, "wrong")
        unknown = await deferToThread(attempt, "nobody@example.test", "wrong")
        self.assertEqual((sha, wrong, unknown), ("-ERR [AUTH] Authentication failed",) * 3)
        log = self.security_log()
        self.assertIn(f"login protocol=pop3 user={ALICE} identity={ALICE} method=APOP", log)
        self.assertIn(f'reason="APOP impossible for {BOB}: password stored one-way"', log)

    # --- SCRAM-SHA-256, with the RFC-only client -----------------------------------------------

    async def test_scram_on_every_protocol_and_storage(self) -> None:
        """SCRAM works for des and sha users on SMTP, IMAP and POP3; the client checks the server's
        signature each time; a wrong password fails like any other."""

        def imap(user: str, password: str) -> str:
            m = imaplib.IMAP4("127.0.0.1", self.port("imap"))
            try:
                return m.authenticate("SCRAM-SHA-256", ScramClient(user, password))[0]
            except imaplib.IMAP4.error as e:
                return str(e)
            finally:
                m.shutdown()

        def smtp(user: str, password: str) -> str:
            with smtplib.SMTP("127.0.0.1", self.port("submission"), timeout=10) as s:
                s.ehlo()
                try:
                    client = ScramClient(user, password)
                    code, _ = s.auth(
                        "SCRAM-SHA-256", lambda c=None: client(c).decode(), initial_response_ok=False
                    )
                except smtplib.SMTPAuthenticationError as e:
                    return str(e.smtp_code)
                return str(code)

        def pop3(user: str, password: str) -> str:
            return pop3_sasl(self.port("pop3"), "SCRAM-SHA-256", ScramClient(user, password))[-1]

        for user in (ALICE, BOB):
            self.assertEqual(await deferToThread(imap, user, PASSWORDS[user]), "OK")
            self.assertEqual(await deferToThread(smtp, user, PASSWORDS[user]), "235")
            self.assertEqual(await deferToThread(pop3, user, PASSWORDS[user]), "+OK Logged in")
        self.assertIn("[AUTHENTICATIONFAILED]", await deferToThread(imap, BOB, "wrong"))
        self.assertEqual(await deferToThread(smtp, BOB, "wrong"), "535")
        self.assertEqual(await deferToThread(pop3, BOB, "wrong"), "-ERR [AUTH] Authentication failed")
        log = self.security_log()
        for protocol in ("smtp", "imap", "pop3"):
            self.assertIn(f"login protocol={protocol} user={BOB} identity={BOB} method=SCRAM-SHA-256", log)

    async def test_scram_first_message_does_not_reveal_users(self) -> None:
        """An unknown user gets a salt that is the same every time and the same iteration count as a
        real user; a user from before SCRAM keys existed gets made-up values too and fails with
        the reason in the log."""
        db = sqlite3.connect(self.server.store / "users.db")
        db.execute("UPDATE users SET scram = NULL WHERE address = ?", (BOB,))
        db.commit()
        db.close()

        def server_first(user: str) -> dict[str, str]:
            client = ScramClient(user, "x")
            seen: list[bytes] = []

            def respond(challenge: bytes | None) -> bytes:
                if client.steps == 1:
                    seen.append(challenge or b"")
                return client(challenge)

            pop3_sasl(self.port("pop3"), "SCRAM-SHA-256", respond)
            return dict(part.split("=", 1) for part in seen[0].decode().split(","))

        real = await deferToThread(server_first, ALICE)
        ghost1 = await deferToThread(server_first, "ghost@example.test")
        ghost2 = await deferToThread(server_first, "ghost@example.test")
        other = await deferToThread(server_first, "other-ghost@example.test")
        old = await deferToThread(server_first, BOB)
        self.assertEqual(ghost1["s"], ghost2["s"])
        self.assertNotEqual(ghost1["s"], other["s"])
        self.assertEqual({real["i"], ghost1["i"], old["i"]}, {real["i"]})
        self.assertEqual(len(base64.b64decode(ghost1["s"])), len(base64.b64decode(real["s"])))
        self.assertIn(
            f'reason="SCRAM-SHA-256 impossible for {BOB}: no SCRAM keys stored', self.security_log()
        )

    # --- cancelling and garbage at every step ---------------------------------------------------

    async def test_cancel_and_garbage_at_every_step(self) -> None:
        """``*`` after each challenge of CRAM-MD5, DIGEST-MD5 (rspauth included) and SCRAM, bad
        base64 and a response before the challenge: each gets a clean reply, nobody is logged in,
        and the same connection then logs in with USER/PASS."""

        def client() -> list[str]:
            with socket.create_connection(("127.0.0.1", self.port("pop3")), timeout=10) as s:
                f = s.makefile("rb")

                def send(line: bytes) -> str:
                    s.sendall(line + b"\r\n")
                    return f.readline().decode().rstrip("\r\n")

                def data(reply: str) -> bytes:
                    assert reply.startswith("+ "), reply
                    return base64.b64decode(reply[2:])

                f.readline()
                replies = []
                for mechanism, answers in [
                    ("CRAM-MD5", 0),
                    ("DIGEST-MD5", 0),
                    ("DIGEST-MD5", 1),  # cancel the rspauth
                    ("SCRAM-SHA-256", 0),
                    ("SCRAM-SHA-256", 1),
                    ("SCRAM-SHA-256", 2),  # cancel the server signature
                ]:
                    reply = send(f"AUTH {mechanism}".encode())
                    scram = ScramClient(ALICE, PASSWORDS[ALICE])
                    for _ in range(answers):
                        if mechanism == "DIGEST-MD5":
                            response, _ = digest_response(
                                data(reply), ALICE, PASSWORDS[ALICE], "pop/127.0.0.1"
                            )
                        else:
                            response = scram(data(reply))
                        reply = send(base64.b64encode(response))
                    replies.append(send(b"*"))
                reply = send(b"AUTH CRAM-MD5")
                replies.append(send(b"not base64!"))
                replies.append(send(b"AUTH CRAM-MD5 " + base64.b64encode(b"alice early")))
                replies.append(send(b"AUTH DIGEST-MD5 ="))
                replies.append(send(b"USER " + ALICE.encode()))
                replies.append(send(b"PASS " + PASSWORDS[ALICE].encode()))
                send(b"QUIT")
                return replies

        replies = await deferToThread(client)
        self.assertEqual(replies[:6], ["-ERR Authentication cancelled"] * 6)
        self.assertEqual(
            replies[6:], ["-ERR Cannot decode response"] * 3 + ["+OK Send PASS", "+OK Logged in"]
        )
        log = self.security_log()
        abandoned = f"login-abandoned protocol=pop3 user={ALICE} method="
        self.assertEqual(log.count(abandoned), 2, log)
        self.assertIn(abandoned + "DIGEST-MD5", log)
        self.assertIn(abandoned + "SCRAM-SHA-256", log)
        self.assertEqual(log.count(f"login protocol=pop3 user={ALICE}"), 1)
