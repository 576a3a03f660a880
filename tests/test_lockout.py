"""Account lockout (SPEC §6): the pure decisions, the database, and the login session using them.

Time is a `task.Clock` and the thread pool runs work at once, so locks, expiry and the failure
delay are observed deterministically.
"""

from __future__ import annotations

import io
import sqlite3
import threading
from contextlib import redirect_stdout
from functools import partial
from pathlib import Path
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from kms.auth.checkers import CompositeChecker, LocalUserChecker
from kms.auth.directory import DirectorySettings, lockout_account
from kms.auth.errors import TemporaryAuthFailure
from kms.auth.lockout import (
    KNOWN_IP_PERIOD,
    Counter,
    Lock,
    Lockout,
    LockoutDB,
    LockoutSettings,
    account_name,
    count_failure,
    refuses,
)
from kms.auth.passwords import StoreKey
from kms.auth.realm import Realm
from kms.auth.sasl import SASLEngine
from kms.auth.session import LoginSession
from kms.clientinfo import ClientInfo
from kms.ctl import main as kmsctl
from kms.logs import Logs
from kms.store.users import UserDB
from tests.support.server import write_config
from tests.test_session import ImmediateReactor, ImmediateThreadPool

PASSWORD = "correct horse"
WINDOW = 1800.0


class CountFailureTests(TestCase):
    def test_table(self) -> None:
        """(counter before, digest, now) -> (count, digests, lock now), with attempts=3."""
        c = Counter
        cases = [
            (None, "a", 100.0, (1, ("a",), False)),
            (None, None, 100.0, (1, (), False)),
            (c(1, ("a",), 100.0), "a", 110.0, (1, ("a",), False)),  # the same wrong password: once
            (c(1, ("a",), 100.0), "b", 110.0, (2, ("a", "b"), False)),
            (c(2, ("a", "b"), 100.0), "c", 110.0, (3, ("a", "b", "c"), True)),
            (c(2, (), 100.0), None, 110.0, (3, (), True)),  # challenge answers always count
            (c(2, ("a", "b"), 100.0), "c", 100.0 + WINDOW, (1, ("c",), False)),  # old failures forgotten
            (c(2, ("a", "b"), 100.0), "b", 100.0 + WINDOW, (1, ("b",), False)),
        ]
        for before, digest, now, (count, digests, lock) in cases:
            after, locked = count_failure(before, digest, now, WINDOW, 3)
            self.assertEqual((after.count, after.digests, locked), (count, digests, lock), (before, digest))
            self.assertEqual(after.updated, now)

    def test_digests_are_bounded(self) -> None:
        counter = None
        for i in range(10):
            counter, _ = count_failure(counter, str(i), 1.0, WINDOW, 3)
        assert counter is not None
        self.assertEqual(counter.digests, ("7", "8", "9"))


class RefusesTests(TestCase):
    def test_table(self) -> None:
        """(locks, ip, known, excepted, exempt_known_ips) -> refused, at now=100."""
        by_a = [Lock("u@x", "10.0.0.1", 50.0, 200.0)]
        ended = [Lock("u@x", "10.0.0.1", 50.0, 100.0)]
        two = [*by_a, Lock("u@x", "10.0.0.2", 60.0, 200.0)]
        cases = [
            ([], "10.0.0.1", False, False, True, False),
            (ended, "10.0.0.1", False, False, True, False),  # unlock_after has passed
            (by_a, "10.0.0.1", False, False, True, True),  # the IP that caused the lock
            (by_a, "10.0.0.1", True, True, True, True),  # ... even when known or excepted
            (by_a, "10.0.0.9", False, False, True, True),  # a stranger
            (by_a, "10.0.0.9", True, False, True, False),  # a known IP
            (by_a, "10.0.0.9", False, True, True, False),  # the exception group
            (by_a, "10.0.0.9", True, True, False, True),  # exempt_known_ips = false
            (two, "10.0.0.2", True, False, True, True),
        ]
        for locks, ip, known, excepted, exempt, refused in cases:
            self.assertEqual(refuses(locks, ip, 100.0, known, excepted, exempt), refused, (locks, ip, known))

    def test_account_name(self) -> None:
        self.assertEqual(account_name(" Bob ", "Example.Test"), "bob@example.test")
        self.assertEqual(account_name("Bob@Example.ORG", "example.test"), "bob@example.org")


class LockoutDBTests(TestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = LockoutDB(self.path)
        self.addCleanup(self.db.close)

    def test_lock_survives_reopen_and_file_is_private(self) -> None:
        for i in range(3):
            lock = self.db.fail("u@x", "10.0.0.1", f"pw{i}", 100.0, WINDOW, 3)
        self.assertEqual(lock, Lock("u@x", "10.0.0.1", 100.0, 100.0 + WINDOW))
        self.db.close()
        again = LockoutDB(self.path)
        self.addCleanup(again.close)
        self.assertEqual(again.locks(), [lock])
        self.assertEqual(self.path.stat().st_mode & 0o777, 0o600)

    def test_passwords_are_not_stored(self) -> None:
        self.db.fail("u@x", "10.0.0.1", "hunter2-secret", 100.0, WINDOW, 3)
        self.db.close()
        for name in (self.path, Path(f"{self.path}-wal")):
            if name.exists():
                self.assertNotIn(b"hunter2-secret", name.read_bytes())
        digest = LockoutDB(self.path).digest("u@x", "hunter2-secret")
        self.assertNotEqual(digest, LockoutDB(Path(self.mktemp())).digest("u@x", "hunter2-secret"))

    def test_success_resets_and_is_known_for_30_days(self) -> None:
        self.db.fail("u@x", "10.0.0.1", "a", 100.0, WINDOW, 3)
        self.db.fail("u@x", "10.0.0.1", "b", 100.0, WINDOW, 3)
        self.db.succeed("u@x", "10.0.0.1", 101.0)
        self.assertIsNone(self.db.fail("u@x", "10.0.0.1", "c", 102.0, WINDOW, 3))
        self.assertIsNone(self.db.fail("u@x", "10.0.0.1", "d", 102.0, WINDOW, 3))
        self.assertTrue(self.db.known("u@x", "10.0.0.1", 101.0 + KNOWN_IP_PERIOD - 1))
        self.assertFalse(self.db.known("u@x", "10.0.0.1", 101.0 + KNOWN_IP_PERIOD))
        self.assertFalse(self.db.known("u@x", "10.0.0.2", 102.0))

    def test_unlock_one_and_all_and_expire(self) -> None:
        for account in ("a@x", "b@x", "c@x"):
            self.db.fail(account, "10.0.0.1", None, 100.0, WINDOW, 1)
        self.assertEqual([lock.account for lock in self.db.unlock("b@x")], ["b@x"])
        self.assertEqual(self.db.unlock("b@x"), [])
        self.assertEqual([lock.account for lock in self.db.expire(100.0 + WINDOW)], ["a@x", "c@x"])
        self.db.fail("a@x", "10.0.0.1", None, 200.0, WINDOW, 1)
        self.assertEqual(len(self.db.unlock()), 1)
        self.assertEqual(self.db.locks(), [])

    def test_two_processes_at_once(self) -> None:
        """Another connection (kmsctl) and threads counting at once lose no failure."""
        other = LockoutDB(self.path)
        self.addCleanup(other.close)

        def fail_many(db: LockoutDB, ip: str) -> None:
            for i in range(20):
                db.fail("u@x", ip, f"p{i}", 100.0, WINDOW, 100)

        threads = [threading.Thread(target=fail_many, args=(db, "10.0.0.1")) for db in (self.db, other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Each thread sent p0..p19: the same 20 passwords, so 20 counted failures, not 40.
        count = sqlite3.connect(self.path).execute("SELECT count FROM failures").fetchone()[0]
        self.assertEqual(count, 20)


class SessionLockoutTests(TestCase):
    """The login session with lockout on: attempts=3, unlock_after=30m."""

    def setUp(self) -> None:
        self.store = Path(self.mktemp())
        self.store.mkdir()
        self.key = StoreKey.load_or_create(self.store / "store.key")
        self.userdb = UserDB(self.store / "users.db")
        self.addCleanup(self.userdb.close)
        self.userdb.add("bob@example.test", PASSWORD, "des", self.key)
        self.logs = Logs(self.store / "logs")
        self.addCleanup(self.logs.close)
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.db = LockoutDB(self.store / "lockout.db")
        self.addCleanup(self.db.close)
        self.checker: Any = None
        self.lockout = self._lockout(exempt=True)

    def _lockout(self, exempt: bool) -> Lockout:
        settings = LockoutSettings(3, WINDOW, exempt, lambda ip: ip == "192.0.2.99", "example.test")
        pool: Any = ImmediateThreadPool()
        return Lockout(self.db, settings, pool, ImmediateReactor(), self.clock)

    def session(self, ip: str) -> LoginSession:
        pool: Any = ImmediateThreadPool()
        checker = self.checker or LocalUserChecker(
            self.userdb, self.key, pool, ImmediateReactor(), "example.test"
        )
        portal = Portal(Realm(), [CompositeChecker([checker])])
        client = ClientInfo(ip, 40000, "127.0.0.1", 993, "imaps", tls=True)
        return LoginSession(
            portal, SASLEngine(["PLAIN"]), client, self.logs, clock=self.clock, lockout=self.lockout
        )

    def attempt(self, ip: str, password: str, user: str = "bob") -> bool:
        """True for a login, False for a refusal, which must come exactly after the delay."""
        d = self.session(ip).login_plaintext(user, password, "IMAP-LOGIN")
        outcome: list[object] = []
        d.addBoth(lambda r: outcome.append(r) or r)
        if outcome:
            self.successResultOf(d)
            return True
        self.clock.advance(0.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.failureResultOf(d)
        return False

    def events(self) -> list[str]:
        lines = (self.store / "logs" / "security.log").read_text().splitlines()
        return [line.split(" ")[4] for line in lines]

    def lock_from(self, ip: str) -> None:
        for i in range(3):
            self.assertFalse(self.attempt(ip, f"wrong{i}"))

    def test_locks_after_attempts_and_refuses_like_a_wrong_password(self) -> None:
        self.assertFalse(self.attempt("192.0.2.1", "wrong0"))
        self.assertFalse(self.attempt("192.0.2.1", "wrong1"))
        self.assertTrue(self.attempt("192.0.2.1", PASSWORD))  # resets the count
        self.lock_from("192.0.2.1")
        self.assertIn("lockout-locked", self.events())
        self.assertFalse(self.attempt("192.0.2.1", PASSWORD))  # right password, same delay
        self.assertFalse(self.attempt("192.0.2.2", PASSWORD))  # a stranger: refused too
        self.assertFalse(self.attempt("192.0.2.2", PASSWORD, user="BOB@example.test"))
        self.assertEqual(self.events().count("login-refused-locked"), 3)
        self.assertEqual(self.events().count("login"), 1)
        # Not counted while locked, and the lock ends by itself.
        self.clock.advance(WINDOW)
        self.assertTrue(self.attempt("192.0.2.1", PASSWORD))
        self.assertIn("lockout-expired", self.events())

    def test_directory_name_forms_count_as_one_account(self) -> None:
        """With a directory, ``KMS\\bob``, ``bob@<realm>`` and ``bob@<mail domain>`` are one account:
        another form buys no more attempts."""
        directory = DirectorySettings(
            uri="ldaps://dc.kms.test", start_tls=False, base_dn="DC=kms,DC=test", domain="KMS",
            mail_domain="example.test", bind_dn="CN=svc", bind_password="x",
        )  # fmt: skip
        settings = LockoutSettings(
            3, WINDOW, True, lambda ip: False, "example.test", partial(lockout_account, settings=directory)
        )
        pool: Any = ImmediateThreadPool()
        self.lockout = Lockout(self.db, settings, pool, ImmediateReactor(), self.clock)
        for i, name in enumerate(("KMS\\bob", "bob@kms.test", "bob@example.test")):
            self.assertFalse(self.attempt("192.0.2.1", f"wrong{i}", user=name))
        self.assertIn("lockout-locked", self.events())
        self.assertFalse(self.attempt("192.0.2.1", PASSWORD))

    def test_same_wrong_password_counts_once(self) -> None:
        for _ in range(5):
            self.assertFalse(self.attempt("192.0.2.1", "same wrong"))
        self.assertTrue(self.attempt("192.0.2.1", PASSWORD))
        self.assertNotIn("lockout-locked", self.events())

    def test_counts_per_ip(self) -> None:
        for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            self.assertFalse(self.attempt(ip, "wrong0"))
            self.assertFalse(self.attempt(ip, "wrong1"))
        self.assertTrue(self.attempt("192.0.2.4", PASSWORD))

    def test_known_ip_and_exception_group_are_exempt(self) -> None:
        self.assertTrue(self.attempt("192.0.2.5", PASSWORD))  # now a known IP
        self.lock_from("192.0.2.1")
        self.assertTrue(self.attempt("192.0.2.5", PASSWORD))
        self.assertTrue(self.attempt("192.0.2.99", PASSWORD))
        self.assertFalse(self.attempt("192.0.2.6", PASSWORD))
        # A known IP that fails `attempts` times is locked out by its own lock.
        self.lock_from("192.0.2.5")
        self.assertFalse(self.attempt("192.0.2.5", PASSWORD))

    def test_exemption_off(self) -> None:
        self.lockout = self._lockout(exempt=False)
        self.assertTrue(self.attempt("192.0.2.5", PASSWORD))
        self.lock_from("192.0.2.1")
        self.assertFalse(self.attempt("192.0.2.5", PASSWORD))
        self.assertFalse(self.attempt("192.0.2.99", PASSWORD))

    def test_unknown_user_counts_and_locks(self) -> None:
        """Refusals must look alike: an unknown account locks like a real one."""
        for i in range(3):
            self.assertFalse(self.attempt("192.0.2.1", f"w{i}", user="nobody"))
        self.assertEqual([lock.account for lock in self.db.locks()], ["nobody@example.test"])

    def test_temporary_failures_never_count(self) -> None:
        class Down:
            credentialInterfaces = LocalUserChecker.credentialInterfaces

            def requestAvatarId(self, credentials: object) -> object:
                raise TemporaryAuthFailure("user database: locked")

        self.checker = Down()
        for _ in range(5):
            d = self.session("192.0.2.1").login_plaintext("bob", "whatever", "IMAP-LOGIN")
            self.failureResultOf(d, TemporaryAuthFailure)
        self.assertEqual(self.db.locks(), [])
        self.assertEqual(
            sqlite3.connect(self.store / "lockout.db").execute("SELECT * FROM failures").fetchall(), []
        )

    def test_unlock_by_another_connection_takes_effect(self) -> None:
        self.lock_from("192.0.2.1")
        other = LockoutDB(self.store / "lockout.db")
        self.addCleanup(other.close)
        other.unlock("bob@example.test")
        self.assertTrue(self.attempt("192.0.2.1", PASSWORD))


class CtlLockoutTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.config = write_config(self.dir)
        (self.dir / "store").mkdir()
        self.db = LockoutDB(self.dir / "store" / "lockout.db")
        self.addCleanup(self.db.close)

    def ctl(self, *args: str) -> tuple[int, str]:
        out = io.StringIO()
        with redirect_stdout(out):
            code = kmsctl(["--config", str(self.config), *args])
        return code, out.getvalue()

    def test_list_unlock_unlock_all(self) -> None:
        import time

        now = time.time()
        self.db.fail("alice@example.test", "192.0.2.1", None, now, WINDOW, 1)
        self.db.fail("bob@example.test", "192.0.2.2", None, now, WINDOW, 1)
        self.db.fail("old@example.test", "192.0.2.3", None, now - 2 * WINDOW, WINDOW, 1)
        code, out = self.ctl("lockout", "list")
        self.assertEqual(code, 0)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["ACCOUNT", "IP", "SINCE", "UNTIL"])
        self.assertEqual(
            [line.split()[:2] for line in lines[1:]],
            [
                ["alice@example.test", "192.0.2.1"],
                ["bob@example.test", "192.0.2.2"],
            ],
        )
        self.assertEqual(
            self.ctl("lockout", "unlock", "Alice"), (0, "unlocked alice@example.test (locked by 192.0.2.1)\n")
        )
        self.assertEqual(
            self.ctl("lockout", "unlock", "alice@example.test"), (0, "alice@example.test was not locked\n")
        )
        code, out = self.ctl("lockout", "unlock-all")
        self.assertEqual(code, 0)
        self.assertIn("unlocked bob@example.test", out)
        self.assertEqual(self.db.locks(), [])
        log = (self.dir / "store" / "logs" / "security.log").read_text()
        self.assertIn("lockout-unlocked user=alice@example.test ip=192.0.2.1 reason=kmsctl", log)
        self.assertIn("lockout-unlocked user=bob@example.test", log)

