"""The security policy end to end: the real service tree, and clients we did not write (smtplib,
imaplib, poplib, curl) connecting from 127.0.0.1, which is in the exception group, and from
127.0.0.2, which is not (Linux routes all of 127/8 to the loopback interface).
"""

from __future__ import annotations

import base64
import imaplib
import poplib
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support.clients import IMAPFrom, POP3From
from tests.support.server import RunningServer, add_user, write_config

TRUSTED, OUTSIDER = "127.0.0.1", "127.0.0.2"
USER = "alice@example.test"
PASSWORD = "correct horse battery"
PLAIN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
MESSAGE = b"From: joerg@remote.test\r\nTo: alice@example.test\r\nSubject: policy\r\n\r\nHello.\r\n"






class _PolicyServer(TestCase):
    """The service with ``[security] policy = level`` and 127.0.0.1 as the exception group."""

    level = "none"
    timeout = 60

    @inlineCallbacks
    def setUp(self):  # type: ignore[override]
        self.dir = Path(self.mktemp()).absolute()
        listeners = {name: "tcp:0:interface=127.0.0.1" for name in ("smtp", "pop3", "imap")}
        extra = (
            f'\n[security]\npolicy = "{self.level}"\nexception_group = "local"\n'
            'methods = ["CRAM-MD5", "LOGIN", "PLAIN"]\n'
        )
        path = write_config(self.dir, local=f'["{TRUSTED}"]', listeners=listeners, extra=extra)
        self.server = RunningServer(path)
        add_user(self.server.config, USER, PASSWORD, "des")
        yield self.server.start()
        self.addCleanup(self.server.stop)
        self.tls = ssl.create_default_context(cafile=str(self.dir / "tls" / "server.pem"))

    def smtp(self, source: str) -> smtplib.SMTP:
        s = smtplib.SMTP("127.0.0.1", self.server.port("smtp"), timeout=10, source_address=(source, 0))
        s.ehlo()
        return s

    def imap(self, source: str) -> IMAPFrom:
        return IMAPFrom(source, self.server.port("imap"))

    def pop3(self, source: str) -> POP3From:
        return POP3From(source, self.server.port("pop3"))

    def security_log(self, source: str) -> list[str]:
        """The security log's lines about clients from ``source``."""
        text = (self.server.store / "logs" / "security.log").read_text()
        return [line for line in text.splitlines() if f"[{source}]" in line]


class SecureAuthTests(_PolicyServer):
    level = "secure_auth"

    @inlineCallbacks
    def test_smtp(self):  # type: ignore[no-untyped-def]
        """Outside the group: PLAIN neither offered nor accepted before STARTTLS (538), CRAM-MD5 is;
        after STARTTLS PLAIN works.  From the group PLAIN works in clear text."""

        def client() -> dict[str, Any]:
            seen: dict[str, Any] = {}
            with self.smtp(OUTSIDER) as s:
                seen["offered"] = s.esmtp_features["auth"].split()
                seen["plain"] = s.docmd("AUTH", "PLAIN " + PLAIN)[0]
                seen["cram"] = s.login(USER, PASSWORD)[0]  # smtplib picks CRAM-MD5, the one offered
            with self.smtp(OUTSIDER) as s:
                s.starttls(context=self.tls)
                s.ehlo()
                seen["offered_tls"] = s.esmtp_features["auth"].split()
                seen["plain_tls"] = s.docmd("AUTH", "PLAIN " + PLAIN)[0]
            with self.smtp(TRUSTED) as s:
                seen["offered_trusted"] = s.esmtp_features["auth"].split()
                seen["plain_trusted"] = s.docmd("AUTH", "PLAIN " + PLAIN)[0]
            return seen

        seen = yield deferToThread(client)
        self.assertEqual(seen["offered"], ["CRAM-MD5"])
        self.assertEqual(seen["plain"], 538)
        self.assertEqual(seen["cram"], 235)
        self.assertEqual(seen["offered_tls"], ["CRAM-MD5", "LOGIN", "PLAIN"])
        self.assertEqual(seen["plain_tls"], 235)
        self.assertEqual(seen["offered_trusted"], ["CRAM-MD5", "LOGIN", "PLAIN"])
        self.assertEqual(seen["plain_trusted"], 235)
        [refused] = [line for line in self.security_log(OUTSIDER) if "mechanism-refused" in line]
        self.assertIn("method=PLAIN", refused)

    @inlineCallbacks
    def test_imap(self):  # type: ignore[no-untyped-def]
        """Outside the group: LOGINDISABLED and LOGIN refused with [PRIVACYREQUIRED] until STARTTLS."""

        def client() -> dict[str, Any]:
            seen: dict[str, Any] = {}
            m = self.imap(OUTSIDER)
            seen["caps"] = m.capabilities
            try:
                m.login(USER, PASSWORD)
            except imaplib.IMAP4.error as e:
                seen["refused"] = str(e)
            m.starttls(ssl_context=self.tls)
            seen["caps_tls"] = m.capabilities
            seen["login_tls"] = m.login(USER, PASSWORD)[0]
            m.logout()
            m = self.imap(TRUSTED)
            seen["login_trusted"] = m.login(USER, PASSWORD)[0]
            seen["select_trusted"] = m.select("INBOX")[0]
            m.logout()
            return seen

        seen = yield deferToThread(client)
        self.assertIn("LOGINDISABLED", seen["caps"])
        self.assertIn("AUTH=CRAM-MD5", seen["caps"])
        self.assertNotIn("AUTH=PLAIN", seen["caps"])
        self.assertIn("[PRIVACYREQUIRED]", seen["refused"])
        self.assertNotIn("LOGINDISABLED", seen["caps_tls"])
        self.assertIn("AUTH=PLAIN", seen["caps_tls"])
        self.assertEqual((seen["login_tls"], seen["login_trusted"], seen["select_trusted"]), ("OK",) * 3)
        refused = [line for line in self.security_log(OUTSIDER) if "mechanism-refused" in line]
        self.assertEqual(len(refused), 1)
        self.assertIn("method=IMAP-LOGIN", refused[0])
        self.assertFalse([line for line in self.security_log(TRUSTED) if "refused" in line])

    @inlineCallbacks
    def test_pop3(self):  # type: ignore[no-untyped-def]
        """Outside the group: no USER in CAPA and USER answered [AUTH] until STLS."""

        def client() -> dict[str, Any]:
            seen: dict[str, Any] = {}
            p = self.pop3(OUTSIDER)
            seen["capa"] = p.capa()
            try:
                p.user(USER)
            except poplib.error_proto as e:
                seen["refused"] = e.args[0]
            p.stls(context=self.tls)
            seen["capa_tls"] = p.capa()
            p.user(USER)
            seen["pass_tls"] = p.pass_(PASSWORD)
            p.quit()
            p = self.pop3(TRUSTED)
            p.user(USER)
            seen["pass_trusted"] = p.pass_(PASSWORD)
            p.quit()
            return seen

        seen = yield deferToThread(client)
        self.assertNotIn("USER", seen["capa"])
        self.assertEqual(seen["capa"]["SASL"], ["CRAM-MD5"])
        self.assertEqual(seen["refused"], b"-ERR [AUTH] Plaintext authentication disallowed without TLS")
        self.assertIn("USER", seen["capa_tls"])
        self.assertEqual(seen["capa_tls"]["SASL"], ["CRAM-MD5", "LOGIN", "PLAIN"])
        self.assertTrue(seen["pass_tls"].startswith(b"+OK"))
        self.assertTrue(seen["pass_trusted"].startswith(b"+OK"))

    @inlineCallbacks
    def test_curl(self):  # type: ignore[no-untyped-def]
        """curl --login-options AUTH=PLAIN on IMAP and POP3: refused from 127.0.0.2 in clear text, fine
        over STARTTLS/STLS (--ssl-reqd) and from 127.0.0.1 in clear text.  (Left to choose, curl
        takes CRAM-MD5 and succeeds in clear text: that is what secure_auth is for.)"""
        user = f"{USER}:{PASSWORD}"
        tls = ["--ssl-reqd", "--cacert", str(self.dir / "tls" / "server.pem")]
        results = {}
        for name in ("imap", "pop3"):
            url = f"{name}://127.0.0.1:{self.server.port(name)}/"
            for source, extra in [(OUTSIDER, []), (OUTSIDER, tls), (TRUSTED, [])]:
                command = ["curl", "-sS", "--max-time", "20", "--interface", source, "--user", user]
                options = ["--login-options", "AUTH=PLAIN", *extra, url]
                result = yield deferToThread(
                    subprocess.run, [*command, *options], capture_output=True, timeout=30
                )
                results[name, source, bool(extra)] = result.returncode
        self.assertEqual(
            results,
            {
                ("imap", OUTSIDER, False): 67,  # CURLE_LOGIN_DENIED
                ("imap", OUTSIDER, True): 0,
                ("imap", TRUSTED, False): 0,
                ("pop3", OUTSIDER, False): 67,
                ("pop3", OUTSIDER, True): 0,
                ("pop3", TRUSTED, False): 0,
            },
        )


class EncryptedTests(_PolicyServer):
    level = "encrypted"

    @inlineCallbacks
    def test_imap_commands_before_starttls(self):  # type: ignore[no-untyped-def]
        """Outside the group SELECT and LOGIN before STARTTLS are NO [PRIVACYREQUIRED] (imaplib would
        not even send SELECT unauthenticated, so a raw socket does); after STARTTLS all works."""

        def client() -> dict[str, Any]:
            seen: dict[str, Any] = {}
            address = ("127.0.0.1", self.server.port("imap"))
            with socket.create_connection(address, 10, source_address=(OUTSIDER, 0)) as raw:
                lines = raw.makefile("rb")
                lines.readline()  # greeting
                for tag, command in [(b"s", b"SELECT INBOX"), (b"l", b"LOGIN alice x"), (b"n", b"NOOP")]:
                    raw.sendall(tag + b" " + command + b"\r\n")
                    seen[command.split()[0].decode()] = lines.readline()
            m = self.imap(OUTSIDER)
            m.starttls(ssl_context=self.tls)
            m.login(USER, PASSWORD)
            seen["select_tls"] = m.select("INBOX")[0]
            m.logout()
            m = self.imap(TRUSTED)
            m.login(USER, PASSWORD)
            seen["select_trusted"] = m.select("INBOX")[0]
            m.logout()
            return seen

        seen = yield deferToThread(client)
        refused = b" NO [PRIVACYREQUIRED] Encryption required by security policy\r\n"
        self.assertEqual(seen["SELECT"], b"s" + refused)
        self.assertEqual(seen["LOGIN"], b"l" + refused)
        self.assertEqual(seen["NOOP"], b"n OK NOOP completed\r\n")
        self.assertEqual((seen["select_tls"], seen["select_trusted"]), ("OK", "OK"))
        refusals = [line for line in self.security_log(OUTSIDER) if "command-refused" in line]
        self.assertEqual(len(refusals), 2)
        self.assertIn("command=SELECT", refusals[0])

    @inlineCallbacks
    def test_pop3_user_before_stls(self):  # type: ignore[no-untyped-def]
        """Outside the group USER before STLS is -ERR [AUTH]; CAPA offers neither USER nor SASL."""

        def client() -> dict[str, Any]:
            seen: dict[str, Any] = {}
            p = self.pop3(OUTSIDER)
            seen["capa"] = p.capa()
            try:
                p.user(USER)
            except poplib.error_proto as e:
                seen["refused"] = e.args[0]
            p.stls(context=self.tls)
            p.user(USER)
            seen["pass_tls"] = p.pass_(PASSWORD)
            p.quit()
            p = self.pop3(TRUSTED)
            p.user(USER)
            seen["pass_trusted"] = p.pass_(PASSWORD)
            p.quit()
            return seen

        seen = yield deferToThread(client)
        self.assertEqual(
            sorted(seen["capa"]), ["AUTH-RESP-CODE", "PIPELINING", "RESP-CODES", "STLS", "TOP", "UIDL"]
        )
        self.assertEqual(seen["refused"], b"-ERR [AUTH] Encryption required by security policy")
        self.assertTrue(seen["pass_tls"].startswith(b"+OK"))
        self.assertTrue(seen["pass_trusted"].startswith(b"+OK"))

    @inlineCallbacks
    def test_smtp_still_takes_unencrypted_mail(self):  # type: ignore[no-untyped-def]
        """Mail from a server that cannot encrypt is accepted; AUTH in clear text only with CRAM-MD5."""

        def client() -> dict[str, Any]:
            seen: dict[str, Any] = {}
            with self.smtp(OUTSIDER) as s:
                seen["refused"] = s.sendmail("joerg@remote.test", [USER], MESSAGE)
                seen["offered"] = s.esmtp_features["auth"].split()
                seen["plain"] = s.docmd("AUTH", "PLAIN " + PLAIN)[0]
                seen["cram"] = s.login(USER, PASSWORD)[0]
            return seen

        seen = yield deferToThread(client)
        self.assertEqual(seen["refused"], {})
        self.assertEqual(seen["offered"], ["CRAM-MD5"])
        self.assertEqual(seen["plain"], 538)
        self.assertEqual(seen["cram"], 235)
        [stored] = self.server.messages(USER)
        self.assertTrue(stored.replace(b"\r\n", b"\n").endswith(b"Subject: policy\n\nHello.\n"), stored)
