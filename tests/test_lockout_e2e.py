"""Account lockout (SPEC §6) end to end: real clients from several loopback addresses.

imaplib, poplib and smtplib sockets are bound to 127.0.0.2, 127.0.0.3, ... so the server sees
distinct client IPs; ``kmsctl`` runs as a separate process against the running server's store.
``attempts = 2`` keeps the failure delays (1 s each) short.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import subprocess
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support.clients import IMAPFrom, POP3From
from tests.support.server import RunningServer, add_user, write_config

ALICE = "alice@example.test"
PASSWORD = "alice's pass phrase"
AUTH_FAILED = "[AUTHENTICATIONFAILED] Authentication failed"






class _LockoutServer(TestCase):
    """A server with ``attempts = 2``, 127.0.0.9 in the exception group, and alice (des)."""

    timeout = 120
    unlock_after = "30m"

    async def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        listeners = {name: "tcp:0:interface=127.0.0.1" for name in ("submission", "pop3", "imap")}
        extra = (
            f'[security]\nexception_group = "local"\n'
            f'[lockout]\nattempts = 2\nunlock_after = "{self.unlock_after}"\n'
        )
        self.path = write_config(self.dir, listeners=listeners, local='["127.0.0.9"]', extra=extra)
        self.server = RunningServer(self.path)
        add_user(self.server.config, ALICE, PASSWORD, "des")
        await self.server.start()
        self.stopped = False

        async def stop() -> None:
            if not self.stopped:
                await self.server.stop()

        self.addCleanup(stop)

    def security_log(self) -> str:
        return (self.server.store / "logs" / "security.log").read_text()

    def imap(self, source: str, password: str, user: str = "alice") -> str:
        client = IMAPFrom(source, self.server.port("imap"))
        try:
            client.login(user, password)
        except imaplib.IMAP4.error as e:
            return str(e)
        finally:
            client.shutdown()
        return "OK"

    def pop3(self, source: str, password: str) -> str:
        client = POP3From(source, self.server.port("pop3"))
        try:
            client.user("alice")
            client.pass_(password)
        except poplib.error_proto as e:
            return str(e)
        finally:
            client.close()
        return "OK"

    def smtp(self, source: str, password: str) -> str:
        with smtplib.SMTP("127.0.0.1", self.server.port("submission"), source_address=(source, 0)) as client:
            client.ehlo()
            client.user, client.password = "alice", password
            try:
                client.auth("PLAIN", client.auth_plain)  # one attempt (login() tries every mechanism)
            except smtplib.SMTPAuthenticationError as e:
                return str(e.smtp_code)
        return "OK"

    def kmsctl(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "kms.ctl", "--config", str(self.path), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    async def lock(self, source: str) -> None:
        for wrong in ("wrong one", "wrong two"):
            self.assertIn(AUTH_FAILED, await deferToThread(self.imap, source, wrong))


class LockoutEndToEndTests(_LockoutServer):
    async def test_lock_refuse_and_unlock_all_while_running(self) -> None:
        wrong_pop3 = await deferToThread(self.pop3, "127.0.0.4", "wrong")
        wrong_smtp = await deferToThread(self.smtp, "127.0.0.4", "wrong")
        await self.lock("127.0.0.2")
        locked = "lockout-locked protocol=imap user=alice@example.test ip=127.0.0.2"
        self.assertIn(locked, self.security_log())
        # The right password, from the locking IP and from others, fails like a wrong one.
        self.assertIn(AUTH_FAILED, await deferToThread(self.imap, "127.0.0.2", PASSWORD))
        self.assertIn(AUTH_FAILED, await deferToThread(self.imap, "127.0.0.3", PASSWORD))
        self.assertEqual(await deferToThread(self.pop3, "127.0.0.3", PASSWORD), wrong_pop3)
        self.assertEqual(await deferToThread(self.smtp, "127.0.0.3", PASSWORD), wrong_smtp)
        # The exception group is not refused by a lock it did not cause.
        self.assertEqual(await deferToThread(self.imap, "127.0.0.9", PASSWORD), "OK")
        listing = await deferToThread(self.kmsctl, "lockout", "list")
        self.assertEqual(listing.splitlines()[1].split()[:2], [ALICE, "127.0.0.2"])
        self.assertIn(
            "unlocked alice@example.test", await deferToThread(self.kmsctl, "lockout", "unlock-all")
        )
        self.assertEqual(await deferToThread(self.imap, "127.0.0.2", PASSWORD), "OK")
        log = self.security_log()
        self.assertIn("login-refused-locked", log)
        self.assertIn("lockout-unlocked user=alice@example.test ip=127.0.0.2 reason=kmsctl", log)

    async def test_known_ip_is_exempt(self) -> None:
        self.assertEqual(await deferToThread(self.pop3, "127.0.0.5", PASSWORD), "OK")
        await self.lock("127.0.0.2")
        self.assertEqual(await deferToThread(self.pop3, "127.0.0.5", PASSWORD), "OK")
        self.assertEqual(await deferToThread(self.imap, "127.0.0.5", PASSWORD), "OK")
        self.assertIn(AUTH_FAILED, await deferToThread(self.imap, "127.0.0.6", PASSWORD))

    async def test_restart_keeps_the_lock(self) -> None:
        await self.lock("127.0.0.2")
        await self.server.stop()
        self.stopped = True
        self.server = RunningServer(self.path)
        await self.server.start()
        self.stopped = False
        self.assertIn(AUTH_FAILED, await deferToThread(self.imap, "127.0.0.2", PASSWORD))
        self.assertIn(AUTH_FAILED, await deferToThread(self.imap, "127.0.0.3", PASSWORD))


class LockoutExpiryEndToEndTests(_LockoutServer):
    unlock_after = "2s"

    async def test_unlocks_by_itself(self) -> None:
        await self.lock("127.0.0.2")
        self.assertIn(AUTH_FAILED, await deferToThread(self.imap, "127.0.0.2", PASSWORD))
        await deferLater(reactor, 2.1, lambda: None)
        self.assertEqual(await deferToThread(self.imap, "127.0.0.2", PASSWORD), "OK")
        self.assertIn("lockout-expired user=alice@example.test ip=127.0.0.2", self.security_log())
