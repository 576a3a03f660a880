"""NTLM for directory users end to end: a running kms with ``[directory]`` against the Samba AD DC
(tests/support/samba.py), driven by curl (``--login-options AUTH=NTLM``) and by imaplib with
pyspnego as the NTLM client.

With ``allow_ntlm_for_directory_users`` the AD user logs in on IMAP, POP3 and SMTP through the real
``ntlm_auth`` helpers; without it the same login fails like a wrong password and security.log says
why.  A local ``des`` user's NTLM keeps working in the same server (checked locally against the
helper's CHALLENGE, key exchange and MIC included).
"""

from __future__ import annotations

import imaplib
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import spnego
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import samba
from tests.support.server import RunningServer, add_user, write_config

LOCAL = "alice@example.test"
LOCAL_PASSWORD = "local des phrase"
AD_USER = "wb-e2e"
AD_PASSWORD = "Wb-E2e-Pass1!"
CURL_LOGIN_DENIED = 67
MESSAGE = b"From: wb-e2e@kms.test\r\nTo: alice@example.test\r\nSubject: ntlm e2e\r\n\r\nhello\r\n"


def directory_config(dc: samba.SambaDC, directory: Path, allowed: bool, helper: str = "") -> str:
    helper = helper or f"/usr/bin/ntlm_auth --helper-protocol=squid-2.5-ntlmssp --configfile={dc.smb_conf}"
    security = (
        f'\n[security]\nmethods = ["LOGIN", "NTLM", "PLAIN"]\n'
        f"allow_ntlm_for_directory_users = {str(allowed).lower()}\n"
    )
    return security + samba.directory_section(dc, directory, f'ntlm_helper = "{helper}"\n')


class WinbindEndToEndTests(TestCase):
    timeout = 300

    async def setUp(self) -> None:
        self.dc = samba.start_dc()
        self.addCleanup(self.dc.close)
        self.dc.add_user(AD_USER, AD_PASSWORD)

    async def server(self, allowed: bool, extra: str = "", helper: str = "") -> RunningServer:
        directory = Path(self.mktemp()).absolute()
        listeners = {name: "tcp:0:interface=127.0.0.1" for name in ("submission", "pop3", "imap")}
        extra = directory_config(self.dc, directory, allowed, helper) + extra
        server = RunningServer(write_config(directory, listeners=listeners, extra=extra))
        add_user(server.config, LOCAL, LOCAL_PASSWORD, "des")
        await server.start()
        self.addCleanup(server.stop)
        return server

    def curl(
        self, server: RunningServer, protocol: str, user: str, password: str
    ) -> subprocess.CompletedProcess[str]:
        if protocol == "smtp":
            mail = Path(self.mktemp())
            mail.write_bytes(MESSAGE)
            url = f"smtp://127.0.0.1:{server.port('submission')}"
            extra = ["--mail-from", f"{AD_USER}@{samba.MAIL_DOMAIN}", "--mail-rcpt", LOCAL, "-T", str(mail)]
        elif protocol == "imap":
            url, extra = f"imap://127.0.0.1:{server.port('imap')}/INBOX", ["-X", "NOOP"]
        else:
            url, extra = f"pop3://127.0.0.1:{server.port('pop3')}/", []
        command = ["curl", "-sSv", "--user", f"{user}:{password}", "--login-options", "AUTH=NTLM"]
        return subprocess.run([*command, url, *extra], capture_output=True, text=True, timeout=60)

    @staticmethod
    def security_log(server: RunningServer) -> str:
        return (server.store / "logs" / "security.log").read_text()

    async def test_allowed(self) -> None:
        """The AD user logs in with NTLM on SMTP, IMAP and POP3 (every name form); local users too."""
        server = await self.server(allowed=True)
        for protocol in ("imap", "pop3", "smtp"):
            for user in (f"{samba.DOMAIN}\\{AD_USER}", f"{AD_USER}@{samba.MAIL_DOMAIN}", AD_USER):
                result = await deferToThread(self.curl, server, protocol, user, AD_PASSWORD)
                self.assertEqual(result.returncode, 0, f"{protocol} {user}: {result.stderr[-1500:]}")
            local = await deferToThread(self.curl, server, protocol, LOCAL, LOCAL_PASSWORD)
            self.assertEqual(local.returncode, 0, f"{protocol} local: {local.stderr[-1500:]}")
        wrong = await deferToThread(self.curl, server, "imap", f"{samba.DOMAIN}\\{AD_USER}", "wrong")
        self.assertEqual(wrong.returncode, CURL_LOGIN_DENIED, wrong.stderr[-1500:])
        log = self.security_log(server)
        ad = f"{AD_USER}@{samba.MAIL_DOMAIN}"
        for protocol in ("imap", "pop3", "smtp"):
            self.assertEqual(log.count(f"login protocol={protocol} user={ad} identity={ad} method=NTLM"), 2)
            self.assertIn(f"login protocol={protocol} user={AD_USER} identity={ad} method=NTLM", log)
            self.assertIn(f"login protocol={protocol} user={LOCAL} identity={LOCAL} method=NTLM", log)
        self.assertIn(
            f'login-failed protocol=imap user={ad} method=NTLM '
            f'reason="wrong password or unknown user (NT_STATUS_LOGON_FAILURE)"',
            log,
        )
        self.assertEqual(len(server.messages(LOCAL)), 4)  # SMTP: the AD user in 3 forms, the local one
        self.assertTrue(server.maildir(ad).is_dir())  # the AD user's mailbox, made at her IMAP login
        self.assertNotIn(AD_PASSWORD, log)

    async def test_not_allowed(self) -> None:
        """Without allow_ntlm_for_directory_users: refused like a wrong password, the reason logged."""
        server = await self.server(allowed=False)
        refused = await deferToThread(self.curl, server, "imap", f"{samba.DOMAIN}\\{AD_USER}", AD_PASSWORD)
        wrong = await deferToThread(self.curl, server, "imap", LOCAL, "wrong")
        self.assertEqual(refused.returncode, CURL_LOGIN_DENIED, refused.stderr[-1500:])
        self.assertEqual(verdict(refused), verdict(wrong))
        local = await deferToThread(self.curl, server, "pop3", LOCAL, LOCAL_PASSWORD)
        self.assertEqual(local.returncode, 0, local.stderr[-1500:])
        self.assertIn(
            f'login-failed protocol=imap user={AD_USER}@{samba.MAIL_DOMAIN} method=NTLM '
            f'reason="NTLM not allowed for directory user {AD_USER}@{samba.MAIL_DOMAIN} '
            f'(allow_ntlm_for_directory_users is off)"',
            self.security_log(server),
        )
        self.assertIsNone(server.service.namedServices.get("ntlm-helpers"))

    async def test_lockout_applies(self) -> None:
        """kms's own lockout counts directory users' NTLM failures and then refuses the right password."""
        server = await self.server(allowed=True, extra="[lockout]\nattempts = 2\n")
        name = f"{samba.DOMAIN}\\{AD_USER}"
        for _ in range(2):  # below the DC's own threshold of 3
            wrong = await deferToThread(self.curl, server, "imap", name, "wrong")
            self.assertEqual(wrong.returncode, CURL_LOGIN_DENIED, wrong.stderr[-1500:])
        right = await deferToThread(self.curl, server, "imap", name, AD_PASSWORD)
        self.assertEqual(right.returncode, CURL_LOGIN_DENIED, right.stderr[-1500:])
        log = self.security_log(server)
        ad = f"{AD_USER}@{samba.MAIL_DOMAIN}"
        self.assertIn(f"lockout-locked protocol=imap user={ad} ip=127.0.0.1", log)
        self.assertIn(f"login-refused-locked protocol=imap user={ad} method=NTLM", log)

    async def test_helper_broken(self) -> None:
        """A helper that cannot run: local users' NTLM is unaffected, directory users fail temporarily."""
        server = await self.server(allowed=True, helper="/bin/false --helper-protocol=squid-2.5-ntlmssp")
        local = await deferToThread(self.curl, server, "imap", LOCAL, LOCAL_PASSWORD)
        self.assertEqual(local.returncode, 0, local.stderr[-1500:])
        ad = await deferToThread(self.curl, server, "imap", f"{samba.DOMAIN}\\{AD_USER}", AD_PASSWORD)
        self.assertNotEqual(ad.returncode, 0)
        self.assertIn("[UNAVAILABLE]", verdict(ad))
        self.assertIn(
            f'login-tempfail protocol=imap user={AD_USER}@{samba.MAIL_DOMAIN} method=NTLM '
            'reason="NTLM helper unavailable: NTLM helper exited',
            self.security_log(server),
        )
        errors = (server.store / "logs" / "error.log").read_text()
        self.assertIn("ntlm-helper-exited", errors)

    async def test_imaplib_with_pyspnego(self) -> None:
        """A client that asks for key exchange and sends a MIC (as Windows does): AD and local users."""
        server = await self.server(allowed=True)
        self.dc.add_user("wb-locked", AD_PASSWORD)
        self.dc.lock_out("wb-locked")

        def attempt(user: str, password: str) -> str:
            client = spnego.client(user, password, protocol="ntlm")
            m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
            step: Callable[[bytes], bytes] = lambda data: client.step(data or None) or b""  # noqa: E731
            try:
                return m.authenticate("NTLM", step)[0]
            except imaplib.IMAP4.error as e:
                return str(e)
            finally:
                m.shutdown()

        self.assertEqual(await deferToThread(attempt, f"{samba.DOMAIN}\\{AD_USER}", AD_PASSWORD), "OK")
        self.assertEqual(await deferToThread(attempt, LOCAL, LOCAL_PASSWORD), "OK")
        locked = await deferToThread(attempt, f"{samba.DOMAIN}\\wb-locked", AD_PASSWORD)
        self.assertIn("[AUTHENTICATIONFAILED]", locked)
        self.assertIn(
            'user=wb-locked@kms.test method=NTLM reason="account locked out in the directory '
            '(NT_STATUS_ACCOUNT_LOCKED_OUT)"',
            self.security_log(server),
        )


def verdict(result: subprocess.CompletedProcess[str]) -> str:
    """The server's answer to the AUTHENTICATE, as curl -v shows it, without the IMAP tag."""
    answers = [line[2:] for line in result.stderr.splitlines() if re.match(r"< \S+ (OK|NO|BAD) ", line)]
    return re.sub(r"^\S+ ", "", answers[-1]) if answers else result.stderr[-500:]
