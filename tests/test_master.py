"""Master authentication (SPEC §7): the pure decisions, the stored secret, and real clients.

The master group is 127.0.0.7; clients bind to it or to 127.0.0.2 (outside) on loopback.
"""

from __future__ import annotations

import base64
import hashlib
import imaplib
import io
import poplib
import smtplib
import socket
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from kms.auth import master
from kms.auth.passwords import StoreKey
from kms.config import load_config, runtime_problems
from kms.ctl import main as kmsctl
from tests.support.clients import IMAPFrom, POP3From
from tests.support.server import RunningServer, add_user, write_config
from tests.test_lockout_e2e import AUTH_FAILED

ALICE = "alice@example.test"
PASSWORD = "alice's pass phrase"
MASTER = "the master's pass phrase"
GROUP, OUTSIDE = "127.0.0.7", "127.0.0.2"


class PureTests(TestCase):
    def test_may_use_master(self) -> None:
        cases = [
            (True, True, "imap", True),
            (True, True, "pop3", True),
            (True, True, "smtp", False),
            (True, False, "imap", False),
            (False, True, "imap", False),
        ]
        for enabled, in_group, protocol, allowed in cases:
            self.assertEqual(master.may_use_master(enabled, in_group, protocol), allowed)

    def test_digest(self) -> None:
        answer = hashlib.md5(b"<c@h>" + MASTER.encode()).hexdigest()
        self.assertTrue(master.digest_matches("<c@h>", MASTER, answer))
        self.assertTrue(master.digest_matches("<c@h>", MASTER, answer.upper() + "\r\n"))
        self.assertFalse(master.digest_matches("<c@h>", MASTER + "x", answer))
        self.assertFalse(master.digest_matches("<other@h>", MASTER, answer))
        self.assertFalse(master.digest_matches("<c@h>", MASTER, "zz\u00e9"))

    def test_save_and_load(self) -> None:
        store = Path(self.mktemp())
        store.mkdir()
        path = store / "master.json"
        self.assertIsNone(master.load(path))
        key = StoreKey.load_or_create(store / "store.key")
        master.save(path, MASTER, key)
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)
        self.assertNotIn(MASTER.encode(), path.read_bytes())
        secret = master.load(path)
        assert secret is not None
        self.assertNotIn(secret.hash, repr(secret))
        self.assertEqual(key.decrypt(secret.token, "master"), MASTER)
        self.assertEqual(list(store.glob(".master.json.*")), [])


class ConfigTests(TestCase):
    def test_enabled_without_password_refuses_to_start(self) -> None:
        path = write_config(Path(self.mktemp()), extra='[master]\nenabled = true\ngroup = "local"\n')
        cfg = load_config(path)
        self.assertIn("master.enabled: no master password is set", "\n".join(runtime_problems(cfg)))
        with redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
            self.assertEqual(kmsctl(["--config", str(path), "check-config"]), 1)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "kms.ctl",
                "--config",
                str(path),
                "master",
                "set-password",
                "--password-stdin",
            ],
            input=MASTER + "\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(runtime_problems(cfg), [])
        self.assertIn("master-password-set", (cfg.store.path / "logs" / "security.log").read_text())


def masterauth(port: int, source: str, digest_of: str | None, then: bytes) -> list[str]:
    """X-MASTERAUTH over a raw socket; ``digest_of`` is the password to answer with (None: garbage)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        f = s.makefile("rb")
        lines = [f.readline().decode().rstrip()]
        s.sendall(b"a X-MASTERAUTH\r\n")
        line = f.readline().decode().rstrip()
        lines.append(line)
        if not line.startswith("+ "):
            return lines
        challenge = line[2:]
        answer = "0" * 32 if digest_of is None else hashlib.md5((challenge + digest_of).encode()).hexdigest()
        s.sendall(answer.encode() + b"\r\n")
        lines.append(f.readline().decode().rstrip())
        s.sendall(then + b"c LOGOUT\r\n")
        while True:
            line = f.readline().decode().rstrip()
            if not line:
                break
            lines.append(line)
        return lines


class MasterEndToEndTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        listeners = {name: "tcp:0:interface=127.0.0.1" for name in ("submission", "pop3", "imap")}
        extra = '[master]\nenabled = true\ngroup = "local"\n[lockout]\nattempts = 2\n'
        path = write_config(self.dir, listeners=listeners, local=f'["{GROUP}"]', extra=extra)
        cfg = load_config(path)
        add_user(cfg, ALICE, PASSWORD, "sha")
        cfg.store.path.mkdir(exist_ok=True)
        master.save(
            cfg.store.path / "master.json", MASTER, StoreKey.load_or_create(cfg.store.path / "store.key")
        )
        self.server = RunningServer(path)
        await self.server.start()
        self.addCleanup(self.server.stop)

    def security_log(self) -> str:
        return (self.server.store / "logs" / "security.log").read_text()

    def imap(self, source: str, password: str, sasl: bool = False) -> str:
        client = IMAPFrom(source, self.server.port("imap"))
        try:
            if sasl:
                client.authenticate("PLAIN", lambda _: f"\0alice\0{password}".encode())
            else:
                client.login("alice", password)
            typ, data = client.select("INBOX")
            return typ
        except imaplib.IMAP4.error as e:
            return str(e)
        finally:
            client.shutdown()

    def pop3(self, source: str, password: str) -> str:
        client = POP3From(source, self.server.port("pop3"))
        try:
            client.user("alice")
            client.pass_(password)
            client.stat()
        except poplib.error_proto as e:
            return str(e)
        finally:
            client.close()
        return "OK"

    def smtp(self, source: str, password: str) -> int:
        with smtplib.SMTP("127.0.0.1", self.server.port("submission"), source_address=(source, 0)) as client:
            client.ehlo()
            client.user, client.password = "alice", password
            try:
                code, _ = client.auth("PLAIN", client.auth_plain)
            except smtplib.SMTPAuthenticationError as e:
                return e.smtp_code
        return code

    async def test_plaintext_master_login_from_the_group(self) -> None:
        self.assertEqual(await deferToThread(self.imap, GROUP, MASTER), "OK")
        self.assertEqual(await deferToThread(self.imap, GROUP, MASTER, True), "OK")
        self.assertEqual(await deferToThread(self.pop3, GROUP, MASTER), "OK")
        self.assertEqual(await deferToThread(self.imap, GROUP, PASSWORD), "OK")  # the user's own still works
        log = self.security_log()
        self.assertIn("master-login protocol=imap user=alice mailbox=alice@example.test form=password", log)
        self.assertIn("master-login protocol=pop3 user=alice mailbox=alice@example.test form=password", log)

    async def test_master_password_is_wrong_elsewhere_and_counts(self) -> None:
        self.assertEqual(await deferToThread(self.smtp, GROUP, MASTER), 535)
        self.assertIn(AUTH_FAILED, await deferToThread(self.imap, OUTSIDE, MASTER))
        self.assertIn("-ERR", await deferToThread(self.pop3, OUTSIDE, MASTER + "2"))
        # Two failures from OUTSIDE: alice is locked for it, even with her own password.
        self.assertIn(AUTH_FAILED, await deferToThread(self.imap, OUTSIDE, PASSWORD))
        self.assertNotIn("master-login", self.security_log())

    async def test_x_masterauth(self) -> None:
        port = self.server.port("imap")
        lines = await deferToThread(masterauth, port, GROUP, MASTER, b'b LOGIN alice "anything"\r\n')
        self.assertEqual(lines[2], "a OK X-MASTERAUTH Welcome to server, master")
        self.assertTrue(any(line.startswith("b OK") for line in lines), lines)
        log = self.security_log()
        self.assertIn("master-auth protocol=imap form=X-MASTERAUTH", log)
        self.assertIn(
            "master-login protocol=imap user=alice mailbox=alice@example.test form=X-MASTERAUTH", log
        )
        # A wrong digest fails like a wrong password, and the next LOGIN needs the real password.
        lines = await deferToThread(masterauth, port, GROUP, None, b'b LOGIN alice "anything"\r\n')
        self.assertTrue(lines[2].startswith("a NO [AUTHENTICATIONFAILED]"), lines)
        self.assertTrue(any(line.startswith("b NO [AUTHENTICATIONFAILED]") for line in lines), lines)
        # Outside the group the command does not exist.
        lines = await deferToThread(masterauth, port, OUTSIDE, MASTER, b"")
        self.assertTrue(lines[1].startswith("a BAD"), lines)

    async def test_disabled_or_unknown_user_is_not_opened(self) -> None:
        from kms.store.users import UserDB

        users = UserDB(self.server.store / "users.db")
        try:
            users.set_enabled(ALICE, False)
        finally:
            users.close()
        self.assertIn(AUTH_FAILED, await deferToThread(self.imap, GROUP, MASTER))
        lines = await deferToThread(
            masterauth, self.server.port("imap"), GROUP, MASTER, b'b LOGIN nobody "x"\r\n'
        )
        self.assertTrue(any(line.startswith("b NO [AUTHENTICATIONFAILED]") for line in lines), lines)
        self.assertNotIn("master-login", self.security_log())

    async def test_x_masterauth_then_authenticate_plain(self) -> None:
        response = base64.b64encode(b"\0alice\0x").decode()
        then = f"b AUTHENTICATE PLAIN {response}\r\n".encode()
        lines = await deferToThread(masterauth, self.server.port("imap"), GROUP, MASTER, then)
        self.assertTrue(any(line.startswith("b OK") for line in lines), lines)
