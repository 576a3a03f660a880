"""Active Directory users end to end: a running kms with ``[directory]`` against the Samba AD DC of
tests/support/samba.py, driven by smtplib, imaplib, poplib, curl and the real ``kmsctl``.

AD users log in with LOGIN and PLAIN on SMTP, IMAP and POP3 under each of their names; every refused
account state gets the very reply a wrong password gets, and security.log says which it was; mail to
an AD user's address or alias lands in her mailbox; with the DC stopped, logins and RCPT fail
temporarily, local users keep working, and nothing counts toward lockout.
"""

from __future__ import annotations

import imaplib
import poplib
import re
import smtplib
import subprocess
import sys
from pathlib import Path

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import samba
from tests.support.server import RunningServer, add_user, write_config

LOCAL = "local@example.test"
LOCAL_PASSWORD = "local des phrase"
AD_PASSWORD = "De-Alice pass 1"
OTHER_PASSWORD = "De-Other pass 1"
ALICE = "alice.de@kms.test"  # de-alice's mail; her alias is de-al@kms.test
LISTENERS = ("smtp", "submission", "pop3", "imap")
KMSCTL = Path(sys.executable).parent / "kmsctl"

_USERS_MADE_IN: set[Path] = set()


def ensure_users(dc: samba.SambaDC) -> None:
    """This module's read-only AD users, once per DC clone."""
    if dc.directory in _USERS_MADE_IN:
        return
    dc.add_group("de-mail")
    dc.add_user("de-alice", AD_PASSWORD, mail="Alice.De@kms.test", proxy_addresses=["smtp:de-al@kms.test"],
                groups=["de-mail"])
    dc.add_user("de-bob", OTHER_PASSWORD, groups=["de-mail"])
    dc.add_user("de-dis", OTHER_PASSWORD, disabled=True, groups=["de-mail"])
    dc.add_user("de-exp", OTHER_PASSWORD, expired=True, groups=["de-mail"])
    dc.add_user("de-mc", OTHER_PASSWORD, must_change=True, groups=["de-mail"])
    dc.add_user("de-outsider", OTHER_PASSWORD)
    _USERS_MADE_IN.add(dc.directory)


def directory_config(dc: samba.SambaDC, directory: Path) -> str:
    security = '\n[security]\nmethods = ["CRAM-MD5", "LOGIN", "PLAIN"]\n[lockout]\nattempts = 3\n'
    return security + samba.directory_section(dc, directory, 'require_group = "de-mail"\n')


# --- clients (blocking: called in threads while the reactor serves) -------------------------------


def smtp_auth(port: int, mechanism: str, user: str, password: str) -> str:
    """``code text`` of the final AUTH reply on SMTP submission."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo()
        s.user, s.password = user, password
        method = {"PLAIN": s.auth_plain, "LOGIN": s.auth_login, "CRAM-MD5": s.auth_cram_md5}[mechanism]
        try:
            code, text = s.auth(mechanism, method)
        except smtplib.SMTPAuthenticationError as e:
            code, text = e.smtp_code, e.smtp_error
        return f"{code} {text.decode()}"


def imap_login(port: int, mechanism: str, user: str, password: str) -> str:
    """``OK`` or the server's NO text, for IMAP LOGIN or AUTHENTICATE PLAIN."""
    m = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    try:
        if mechanism == "LOGIN":
            m.login(user, password)
        else:
            m.authenticate("PLAIN", lambda _: f"\0{user}\0{password}".encode())
        return m.select("INBOX")[0]
    except imaplib.IMAP4.error as e:
        text = e.args[0]
        return text.decode() if isinstance(text, bytes) else str(text)
    finally:
        m.shutdown()


def pop3_login(port: int, mechanism: str, user: str, password: str) -> str:
    """``+OK`` or the server's -ERR line, for USER/PASS (poplib) or AUTH PLAIN/LOGIN (curl)."""
    if mechanism == "USER":
        p = poplib.POP3("127.0.0.1", port, timeout=30)
        try:
            p.user(user)
            p.pass_(password)
            return "+OK"
        except poplib.error_proto as e:
            return e.args[0].decode()
        finally:
            p.close()
    command = ["curl", "-sSv", "--user", f"{user}:{password}", "--login-options", f"AUTH={mechanism}",
               f"pop3://127.0.0.1:{port}/"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    replies = [line[2:] for line in result.stderr.splitlines() if re.match(r"< [+-]", line)]
    return "+OK" if result.returncode == 0 else replies[-1] if replies else result.stderr[-300:]


def deliver(port: int, recipients: list[str]) -> dict[str, tuple[int, bytes]]:
    """RCPT every recipient on the smtp listener; the refused ones and their replies."""
    message = b"From: someone@remote.test\r\nSubject: to AD\r\n\r\nhello AD\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        try:
            return s.sendmail("someone@remote.test", recipients, message)
        except smtplib.SMTPRecipientsRefused as e:
            return e.recipients


class _DirectoryServer(TestCase):
    """A running kms whose kms.test users are the DC's, plus one local user of example.test."""

    timeout = 300
    extra = ""

    async def setUp(self) -> None:
        self.dc = samba.start_dc()
        self.addCleanup(self.dc.close)
        ensure_users(self.dc)
        self.dir = Path(self.mktemp()).absolute()
        listeners = {name: "tcp:0:interface=127.0.0.1" for name in LISTENERS}
        extra = directory_config(self.dc, self.dir) + self.extra
        path = write_config(self.dir, listeners=listeners, extra=extra, domains=("kms.test", "example.test"))
        self.config_path = path
        self.server = RunningServer(path)
        add_user(self.server.config, LOCAL, LOCAL_PASSWORD, "des")
        add_user(self.server.config, "postmaster@kms.test", LOCAL_PASSWORD, "sha")
        await self.server.start()
        self.addCleanup(self.server.stop)

    def security_log(self) -> str:
        return (self.server.store / "logs" / "security.log").read_text()


class DirectoryCatchAllTests(_DirectoryServer):
    extra = '[domains.catch_all]\n"kms.test" = "postmaster"\n'

    async def test_directory_before_catch_all(self) -> None:
        """The DC's users keep their mail; only addresses nobody has go to the catch-all mailbox."""
        for recipient in ("de-al@kms.test", "de-nobody@kms.test", "de-dis@kms.test"):
            self.assertEqual(await deferToThread(deliver, self.server.port("smtp"), [recipient]), {})
        self.assertEqual(len(self.server.messages(ALICE)), 1)
        self.assertEqual(len(self.server.messages("postmaster@kms.test")), 2)
        self.dc.stop()
        try:  # the DC cannot say whether de-bob exists: try later, not the catch-all
            refused = await deferToThread(deliver, self.server.port("smtp"), ["de-bob@kms.test"])
        finally:
            self.dc.start()
        self.assertEqual(refused["de-bob@kms.test"][0], 451)
        self.assertEqual(len(self.server.messages("postmaster@kms.test")), 2)


class DirectoryEndToEndTests(_DirectoryServer):
    def attempt(self, protocol: str, mechanism: str, user: str, password: str) -> Deferred[str]:
        """One login by a real client in a thread, while the reactor serves it."""
        port = self.server.port({"smtp": "submission"}.get(protocol, protocol))
        client = {"smtp": smtp_auth, "imap": imap_login, "pop3": pop3_login}[protocol]
        return deferToThread(client, port, mechanism, user, password)

    async def test_logins(self) -> None:
        """LOGIN and PLAIN on all three protocols, under every name; the mailbox appears at first login."""
        self.assertFalse(self.server.maildir(ALICE).exists())
        cases = [
            ("smtp", "PLAIN", "de-alice"), ("smtp", "LOGIN", "KMS\\de-alice"),
            ("smtp", "PLAIN", "de-al@kms.test"),
            ("imap", "LOGIN", "de-alice@kms.test"), ("imap", "PLAIN", "Alice.De@kms.test"),
            ("pop3", "USER", "KMS\\de-alice"), ("pop3", "PLAIN", "de-alice"), ("pop3", "LOGIN", ALICE),
        ]
        for protocol, mechanism, user in cases:
            result = await self.attempt(protocol, mechanism, user, AD_PASSWORD)
            self.assertIn(result.split()[0], ("235", "OK", "+OK"), f"{protocol} {mechanism} {user}: {result}")
        self.assertTrue((self.server.maildir(ALICE) / "new").is_dir())
        log = self.security_log()
        self.assertIn(f"login protocol=imap user=de-alice@kms.test identity={ALICE} method=IMAP-LOGIN", log)
        self.assertIn(f"login protocol=imap user=Alice.De@kms.test identity={ALICE} method=PLAIN", log)
        self.assertIn(f'login protocol=pop3 user="KMS\\\\de-alice" identity={ALICE} method=USER/PASS', log)
        self.assertEqual(log.count(f"identity={ALICE}"), len(cases))
        self.assertNotIn(AD_PASSWORD, log)
        self.assertNotIn(samba.SERVICE_PASSWORD, log)

    async def test_refusals_look_like_wrong_passwords(self) -> None:
        """Disabled, expired, must-change, locked, outside require_group, unknown, wrong password:
        one reply per protocol for all of them; security.log has each reason."""
        self.dc.add_user("de-wrong", OTHER_PASSWORD, groups=["de-mail"])
        self.dc.add_user("de-locked", OTHER_PASSWORD, groups=["de-mail"])
        self.dc.lock_out("de-locked")
        cases = {
            ("de-dis", OTHER_PASSWORD): "account disabled in the directory",
            ("de-exp", OTHER_PASSWORD): "account expired in the directory",
            ("de-mc", OTHER_PASSWORD): "password must be changed (directory)",
            ("de-locked", OTHER_PASSWORD): "account locked out in the directory",
            ("de-outsider", OTHER_PASSWORD): "not a member of de-mail",
            ("de-wrong", "not the password"): "wrong password",
            ("de-nobody", OTHER_PASSWORD): "no checker knows this user",
            ("de-al*@kms.test", AD_PASSWORD): "no checker knows this user",
        }
        protocols = (("smtp", "PLAIN"), ("imap", "LOGIN"), ("pop3", "USER"))
        for (user, password), reason in cases.items():
            replies = await gatherResults(
                [self.attempt(protocol, mechanism, user, password) for protocol, mechanism in protocols]
            )
            self.assertEqual(
                replies,
                [
                    "535 5.7.8 Authentication credentials invalid",
                    "[AUTHENTICATIONFAILED] Authentication failed",
                    "-ERR [AUTH] Authentication failed",
                ],
                user,
            )
            log = self.security_log()
            for protocol, _ in protocols:
                self.assertRegex(log, rf"login-failed protocol={protocol} user={re.escape(user)}.*"
                                      rf'reason="?{re.escape(reason)}')

    async def test_challenge_method_refused(self) -> None:
        """CRAM-MD5 for an AD user fails like a wrong password; the log says it cannot work for her."""
        refused = await self.attempt("smtp", "CRAM-MD5", "de-alice@kms.test", AD_PASSWORD)
        wrong = await self.attempt("smtp", "CRAM-MD5", LOCAL, "wrong")
        self.assertEqual(refused, wrong)
        self.assertTrue(refused.startswith("535 "), refused)
        self.assertIn(f'reason="CRAM-MD5 impossible for {ALICE}: directory user"', self.security_log())
        local = await self.attempt("smtp", "CRAM-MD5", LOCAL, LOCAL_PASSWORD)
        self.assertTrue(local.startswith("235 "), local)

    async def test_mail_to_directory_users(self) -> None:
        """RCPT to her mail address, her alias and her account name: all reach alice.de@kms.test
        (one message each); unknown and disabled users are refused."""
        port = self.server.port("smtp")
        aliases = [ALICE, "de-al@kms.test", "DE-ALICE@kms.test"]
        for recipient in [*aliases, "de-bob@kms.test"]:
            self.assertEqual(await deferToThread(deliver, port, [recipient]), {})
        refused = await deferToThread(deliver, port, ["de-nobody@kms.test", "de-dis@kms.test", LOCAL])
        self.assertEqual(sorted(refused), ["de-dis@kms.test", "de-nobody@kms.test"])
        self.assertEqual({code for code, _ in refused.values()}, {550})
        messages = self.server.messages(ALICE)
        envelope_to = sorted(re.findall(rb"X-Envelope-To: <([^>]+)>", b"".join(messages)))
        self.assertEqual(envelope_to, sorted(a.encode() for a in aliases))
        self.assertEqual(len(messages), 3)
        self.assertEqual(len(self.server.messages("de-bob@kms.test")), 1)

    async def test_lockout_counts_every_name_form_as_one_account(self) -> None:
        """attempts = 3: one wrong password under each of three forms of one name locks the account;
        the right password under a fourth form is then refused as locked."""
        self.dc.add_user("de-forms", OTHER_PASSWORD, groups=["de-mail"])
        for i, user in enumerate(("KMS\\de-forms", "kms.test\\de-forms", "de-forms@kms.test")):
            self.assertEqual(await self.attempt("imap", "LOGIN", user, f"wrong {i}"),
                             "[AUTHENTICATIONFAILED] Authentication failed")  # fmt: skip
        self.assertIn("lockout-locked", self.security_log())
        refused = await self.attempt("pop3", "USER", "de-forms", OTHER_PASSWORD)
        self.assertEqual(refused, "-ERR [AUTH] Authentication failed")
        self.assertIn("login-refused-locked protocol=pop3 user=de-forms", self.security_log())

    async def test_dc_down(self) -> None:
        """DC stopped: temporary failures, never counted (attempts = 3, four tries); local users work."""
        self.dc.stop()
        try:
            for _ in range(4):
                replies = await gatherResults([
                    self.attempt("smtp", "PLAIN", "de-alice", AD_PASSWORD),
                    self.attempt("imap", "LOGIN", "de-alice", AD_PASSWORD),
                    self.attempt("pop3", "USER", "de-alice", AD_PASSWORD),
                ])
                self.assertEqual(replies, [
                    "454 4.7.0 Temporary authentication failure",
                    "[UNAVAILABLE] Temporary authentication failure",
                    "-ERR [SYS/TEMP] Temporary authentication failure",
                ])
            refused = await deferToThread(deliver, self.server.port("smtp"), ["de-bob@kms.test", LOCAL])
            self.assertEqual(list(refused), ["de-bob@kms.test"])
            self.assertEqual(refused["de-bob@kms.test"][0], 451)
            self.assertIn(b"4.4.3", refused["de-bob@kms.test"][1])
            self.assertEqual(await self.attempt("imap", "LOGIN", LOCAL, LOCAL_PASSWORD), "OK")
        finally:
            self.dc.start()
        self.assertEqual(await self.attempt("imap", "LOGIN", "de-alice", AD_PASSWORD), "OK")
        log = self.security_log()
        self.assertEqual(log.count("login-tempfail protocol=imap user=de-alice"), 4)
        self.assertIn("directory unreachable", log)
        self.assertNotIn("login-failed", log)
        self.assertNotIn("lockout-locked", log)

    def kmsctl(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        command = [str(KMSCTL), "--config", str(self.config_path), *args]
        return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120)

    async def test_kmsctl(self) -> None:
        """``directory test`` step by step, and ``user list --directory``."""
        ok = await deferToThread(self.kmsctl, "directory", "test", "KMS\\de-alice", "--password-stdin",
                                 stdin=AD_PASSWORD + "\n")
        self.assertEqual(ok.returncode, 0, ok.stderr)
        steps = [line.split(":")[0] for line in ok.stdout.splitlines()]
        self.assertEqual(steps, ["connect", "TLS", "service bind", "search", "user bind", "state", "groups"])
        self.assertIn("CN=de-mail,CN=Users,DC=kms,DC=test", ok.stdout)
        wrong = await deferToThread(self.kmsctl, "directory", "test", "de-bob", "--password-stdin",
                                    stdin="wrong\n")
        self.assertEqual(wrong.returncode, 1)
        self.assertEqual(wrong.stdout.splitlines()[-1].split(":")[0], "search")
        self.assertEqual(wrong.stderr.strip(), "FAILED:       wrong password")
        listed = await deferToThread(self.kmsctl, "user", "list", "--directory")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        rows = {line.split()[0]: line.split(None, 2)[1:] for line in listed.stdout.splitlines()[1:]}
        self.assertEqual(rows[ALICE], ["de-alice", "ok"])
        self.assertEqual(rows["de-dis@kms.test"], ["de-dis", "account disabled in the directory"])
        self.assertEqual(rows["de-outsider@kms.test"], ["de-outsider", "not in require_group"])
        self.assertNotIn(AD_PASSWORD, ok.stdout + ok.stderr + wrong.stdout + wrong.stderr)

    async def test_disabled_in_kms(self) -> None:
        """``kmsctl user disable`` on a directory user's record stops her logins (LDAP and the same
        reply as a wrong password); ``user enable`` lets her in again; AD is never touched."""
        added = await deferToThread(self.kmsctl, "user", "add", ALICE, "--source", "directory")
        self.assertEqual(added.returncode, 0, added.stderr)
        self.assertEqual((await self.attempt("imap", "LOGIN", "de-alice", AD_PASSWORD)).split()[0], "OK")
        off = await deferToThread(self.kmsctl, "user", "disable", ALICE)
        self.assertEqual(off.returncode, 0, off.stderr)
        refused = await self.attempt("imap", "LOGIN", "de-alice", AD_PASSWORD)
        wrong = await self.attempt("imap", "LOGIN", "de-alice", "not her password")
        self.assertEqual(refused, wrong)
        self.assertIn(f"{ALICE} is disabled in kms", self.security_log())
        on = await deferToThread(self.kmsctl, "user", "enable", ALICE)
        self.assertEqual(on.returncode, 0, on.stderr)
        self.assertEqual((await self.attempt("imap", "LOGIN", "de-alice", AD_PASSWORD)).split()[0], "OK")
