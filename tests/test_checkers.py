"""Tests for kms.auth.checkers: the local-user checker on a real DB and thread pool, and the chain."""

from __future__ import annotations

import hmac
import sqlite3
from pathlib import Path
from typing import Any, TypeVar

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from kms.auth import passwords
from kms.auth.checkers import CompositeChecker, LocalUserChecker
from kms.auth.credentials import IChallengeCredentials, IPlaintextCredentials, PlaintextCredentials
from kms.auth.errors import AuthenticationFailed, TemporaryAuthFailure, UnknownUser
from kms.auth.mechanisms import CramMD5Credentials
from kms.auth.passwords import DEFAULT_ITERATIONS, KEY_SIZE, StoreKey, parse_scram
from kms.clientinfo import ClientInfo
from kms.store.users import UserDB

E = TypeVar("E", bound=Exception)


def creds(username: str, password: str, authzid: str | None = None) -> PlaintextCredentials:
    client = ClientInfo("192.0.2.7", 40000, "127.0.0.1", 2143, "imap")
    return PlaintextCredentials(
        username=username, password=password, mechanism="PLAIN", client=client, authzid=authzid
    )


class CredentialsTests(TestCase):
    def test_provides_interface(self) -> None:
        verifyObject(IPlaintextCredentials, creds("a@example.test", "pw"))

    def test_repr_hides_password(self) -> None:
        c = creds("alice@example.test", "hunter2-secret")
        self.assertNotIn("hunter2-secret", repr(c))
        self.assertIn("alice@example.test", repr(c))


class LockedUserDB(UserDB):
    """A real DB whose look-ups fail as SQLite does when another process holds the lock too long.

    (In WAL mode a reader can't be locked out while the server keeps its connection open, so the
    error is raised here rather than provoked.)
    """

    def get(self, address: str) -> Any:
        raise sqlite3.OperationalError("database is locked")


class LocalUserFixture(TestCase):
    """A real user DB with des, sha, disabled and directory users, and a real thread pool."""

    def setUp(self) -> None:
        store = Path(self.mktemp())
        store.mkdir()
        self.key = StoreKey.load_or_create(store / "store.key")
        self.db = UserDB(store / "users.db", busy_timeout=0.05)
        self.addCleanup(self.db.close)
        self.db.add("des@example.test", "des-pw", "des", self.key)
        self.db.add("sha@example.test", "sha-pw", "sha", self.key)
        self.db.add("off@example.test", "off-pw", "sha", self.key)
        self.db.set_enabled("off@example.test", False)
        self.db.add("ad@example.test", None, "directory", self.key)
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name="test-auth")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.checker = LocalUserChecker(self.db, self.key, self.pool, reactor, default_domain="Example.TEST")

    async def fails(self, exc: type[E], c: Any, checker: Any = None) -> E:
        """The exception ``checker`` (default: self.checker) fails with, which must be an ``exc``."""
        d: defer.Deferred[Any] = (checker or self.checker).requestAvatarId(c)
        error: E = await self.assertFailure(d, exc)
        return error


class LocalUserCheckerTests(LocalUserFixture):
    def test_interface(self) -> None:
        verifyObject(ICredentialsChecker, self.checker)
        self.assertEqual(self.checker.credentialInterfaces, (IPlaintextCredentials, IChallengeCredentials))

    async def test_right_password(self) -> None:
        """des and sha users log in; the avatar id is the canonical lower-case address."""
        for username, password, expected in (
            ("des@example.test", "des-pw", "des@example.test"),
            ("SHA@Example.Test", "sha-pw", "sha@example.test"),
        ):
            self.assertEqual(await self.checker.requestAvatarId(creds(username, password)), expected)

    async def test_bare_local_part(self) -> None:
        """``des`` alone means des@<default_domain>; without a default domain it is nobody."""
        self.assertEqual(await self.checker.requestAvatarId(creds("Des", "des-pw")), "des@example.test")
        plain = LocalUserChecker(self.db, self.key, self.pool, reactor)
        await self.fails(UnknownUser, creds("des", "des-pw"), plain)

    async def test_wrong_password(self) -> None:
        """A wrong password is AuthenticationFailed, not UnknownUser: the chain must stop there."""
        for user in ("des@example.test", "sha@example.test"):
            e = await self.fails(AuthenticationFailed, creds(user, "nope"))
            self.assertNotIsInstance(e, UnknownUser)
            self.assertEqual(e.reason, "wrong password")

    async def test_unknown_user(self) -> None:
        await self.fails(UnknownUser, creds("ghost@example.test", "des-pw"))
        await self.fails(UnknownUser, creds("not an address", "des-pw"))

    async def test_directory_user_is_unknown_here(self) -> None:
        await self.fails(UnknownUser, creds("ad@example.test", "whatever"))

    async def test_disabled(self) -> None:
        """A disabled account fails even with the right password, and the log reason says so."""
        e = await self.fails(AuthenticationFailed, creds("off@example.test", "off-pw"))
        self.assertEqual(e.reason, "account disabled")
        self.assertNotIsInstance(e, UnknownUser)

    async def test_empty_password_never_reaches_db(self) -> None:
        """Empty passwords are refused before any look-up (the DB is closed: a look-up would be temporary)."""
        self.db.close()
        e = await self.fails(AuthenticationFailed, creds("sha@example.test", ""))
        self.assertEqual(e.reason, "empty password")

    async def test_locked_database_is_temporary(self) -> None:
        """A DB locked by another process is 'try later', never 'wrong password'."""
        locked = LockedUserDB(self.db.path)
        self.addCleanup(locked.close)
        checker = LocalUserChecker(locked, self.key, self.pool, reactor)
        e = await self.fails(TemporaryAuthFailure, creds("sha@example.test", "sha-pw"), checker)
        self.assertIn("database is locked", str(e))

    async def test_unusable_database_is_temporary(self) -> None:
        """Any other sqlite error (here a closed connection) is temporary too."""
        self.db.close()
        await self.fails(TemporaryAuthFailure, creds("sha@example.test", "sha-pw"))

    async def test_wrong_store_key_is_temporary(self) -> None:
        """A des secret the key can't decrypt is a server fault, reported as temporary."""
        other = LocalUserChecker(self.db, StoreKey(bytes(KEY_SIZE)), self.pool, reactor)
        await self.fails(TemporaryAuthFailure, creds("des@example.test", "des-pw"), other)

    async def test_authzid(self) -> None:
        """Acting as oneself is fine; acting as someone else is refused."""
        c = creds("des", "des-pw", authzid="DES@example.test")
        self.assertEqual(await self.checker.requestAvatarId(c), "des@example.test")
        e = await self.fails(AuthenticationFailed, creds("des", "des-pw", authzid="sha@example.test"))
        self.assertNotIsInstance(e, UnknownUser)

    async def test_every_refusal_costs_one_pbkdf2(self) -> None:
        """Unknown user, directory user and wrong des/sha passwords each cost exactly one PBKDF2 at
        the default work factor, so timing cannot tell them apart (counted, not timed)."""
        for user in ("sha@example.test", "ghost@example.test", "ad@example.test", "des@example.test"):
            calls = count_pbkdf2(self)
            try:
                await self.checker.requestAvatarId(creds(user, "nope"))
            except AuthenticationFailed:
                pass
            self.assertEqual(calls, [DEFAULT_ITERATIONS], user)


def count_pbkdf2(test: TestCase) -> list[int]:
    """Record the work factor of every PBKDF2 computed from now on (the real one still runs)."""
    calls: list[int] = []
    real = passwords._pbkdf2

    def counting(password: str, salt: bytes, iterations: int) -> bytes:
        calls.append(iterations)
        return real(password, salt, iterations)

    test.patch(passwords, "_pbkdf2", counting)
    return calls


def cram(username: str, password: str, challenge: bytes = b"<1.2@mx.example.test>") -> CramMD5Credentials:
    """CRAM-MD5 credentials answering ``challenge`` with ``password``."""
    digest = hmac.new(password.encode(), challenge, "md5").hexdigest().encode()
    client = ClientInfo("192.0.2.7", 40000, "127.0.0.1", 2143, "imap")
    return CramMD5Credentials(username, challenge, digest, client)


class ChallengeCheckTests(LocalUserFixture):
    """Challenge-response credentials through the same checker (CRAM-MD5 as the example)."""

    async def test_right_answer(self) -> None:
        self.assertEqual(await self.checker.requestAvatarId(cram("DES", "des-pw")), "des@example.test")

    async def test_refusals(self) -> None:
        """Each refusal carries the reason for the log; only the unknown moves the chain on."""
        for c, reason in [
            (cram("des@example.test", "nope"), "wrong password"),
            (
                cram("sha@example.test", "sha-pw"),
                "CRAM-MD5 impossible for sha@example.test: password stored one-way",
            ),
            (cram("off@example.test", "off-pw"), "account disabled"),
        ]:
            e = await self.fails(AuthenticationFailed, c)
            self.assertNotIsInstance(e, UnknownUser)
            self.assertEqual(e.reason, reason)
        for user in ("ghost@example.test", "ad@example.test", "not an address"):
            await self.fails(UnknownUser, cram(user, "des-pw"))

    async def test_server_faults_are_temporary(self) -> None:
        """A des secret the key can't decrypt, corrupt SCRAM keys or a locked DB: try later."""
        other = LocalUserChecker(self.db, StoreKey(bytes(KEY_SIZE)), self.pool, reactor)
        await self.fails(TemporaryAuthFailure, cram("des@example.test", "des-pw"), other)
        locked = LockedUserDB(self.db.path)
        self.addCleanup(locked.close)
        checker = LocalUserChecker(locked, self.key, self.pool, reactor)
        await self.fails(TemporaryAuthFailure, cram("des@example.test", "des-pw"), checker)
        raw = sqlite3.connect(self.db.path)
        raw.execute("UPDATE users SET scram = 'SCRAM-SHA-256$1:AA==$bad' WHERE address = 'des@example.test'")
        raw.commit()
        raw.close()
        e = await self.fails(TemporaryAuthFailure, cram("des@example.test", "des-pw"))
        self.assertIn("SCRAM keys of des@example.test are corrupt", str(e))

    async def test_every_challenge_refusal_costs_one_pbkdf2(self) -> None:
        """A challenge answer costs what a password does: unknown user, impossible method and a
        wrong answer each cost exactly one PBKDF2 at the default work factor (counted, not timed)."""
        for c in (
            cram("ghost@example.test", "x"),
            cram("sha@example.test", "x"),
            cram("des@example.test", "x"),
        ):
            calls = count_pbkdf2(self)
            try:
                await self.checker.requestAvatarId(c)
            except AuthenticationFailed:
                pass
            self.assertEqual(calls, [DEFAULT_ITERATIONS], c.username)

    async def test_scram_parameters(self) -> None:
        """Real users get their stored salt; everyone else a stable made-up one, same iterations."""
        stored = self.db.get("sha@example.test")
        assert stored is not None and stored.scram is not None
        real = await self.checker.scram_parameters("SHA")
        self.assertEqual(real, (parse_scram(stored.scram).salt, parse_scram(stored.scram).iterations))
        ghost = await self.checker.scram_parameters("ghost@example.test")
        self.assertEqual(ghost, await self.checker.scram_parameters("Ghost@Example.Test"))
        self.assertNotEqual(ghost[0], (await self.checker.scram_parameters("ghost2@example.test"))[0])
        self.assertEqual(ghost[1], real[1])
        for name in ("ad@example.test", "not an address", ""):
            salt, iterations = await self.checker.scram_parameters(name)
            self.assertEqual((len(salt), iterations), (len(real[0]), real[1]))
        locked = LockedUserDB(self.db.path)
        self.addCleanup(locked.close)
        checker = LocalUserChecker(locked, self.key, self.pool, reactor)
        await self.assertFailure(checker.scram_parameters("sha@example.test"), TemporaryAuthFailure)


@implementer(ICredentialsChecker)
class Scripted:
    """A checker that answers with a fixed result or exception and records that it was asked."""

    def __init__(self, outcome: Any, interfaces: tuple[Any, ...] = (IPlaintextCredentials,)) -> None:
        self.outcome = outcome
        self.credentialInterfaces = interfaces
        self.calls = 0

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        self.calls += 1
        if isinstance(self.outcome, BaseException):
            return defer.fail(self.outcome)
        return defer.succeed(self.outcome)


class Broken(Exception):
    pass


class CompositeCheckerTests(TestCase):
    def test_interface_union_in_order(self) -> None:
        a = Scripted("a", (IPlaintextCredentials,))
        b = Scripted("b", (IUsernamePassword, IPlaintextCredentials))
        composite = CompositeChecker([a, b])
        verifyObject(ICredentialsChecker, composite)
        self.assertEqual(composite.credentialInterfaces, (IPlaintextCredentials, IUsernamePassword))

    async def test_unknown_moves_on(self) -> None:
        first, second = Scripted(UnknownUser()), Scripted("bob@example.test")
        self.assertEqual(
            await CompositeChecker([first, second]).requestAvatarId(creds("bob", "pw")), "bob@example.test"
        )
        self.assertEqual((first.calls, second.calls), (1, 1))

    async def test_first_success_wins(self) -> None:
        first, second = Scripted("a@example.test"), Scripted("b@example.test")
        avatar = await CompositeChecker([first, second]).requestAvatarId(creds("x", "pw"))
        self.assertEqual(avatar, "a@example.test")
        self.assertEqual(second.calls, 0)

    async def test_failure_stops(self) -> None:
        """A wrong password ends the chain: a later checker can't be used to guess around it."""
        for error in (AuthenticationFailed("wrong password"), TemporaryAuthFailure("ldap down")):
            later = Scripted("x@example.test")
            d = CompositeChecker([Scripted(error), later]).requestAvatarId(creds("x", "pw"))
            self.assertIs(await self.assertFailure(d, type(error)), error)
            self.assertEqual(later.calls, 0)

    async def test_stock_unauthorized_login_is_a_failure(self) -> None:
        later = Scripted("x@example.test")
        d = CompositeChecker([Scripted(UnauthorizedLogin("nope")), later]).requestAvatarId(creds("x", "pw"))
        e = await self.assertFailure(d, AuthenticationFailed)
        self.assertNotIsInstance(e, UnknownUser)
        self.assertEqual(later.calls, 0)

    async def test_unexpected_error_is_temporary_and_logged(self) -> None:
        """A crashing checker is an outage, not a wrong password, and its traceback is logged."""
        later = Scripted("x@example.test")
        d = CompositeChecker([Scripted(Broken("bug")), later]).requestAvatarId(creds("x", "pw"))
        await self.assertFailure(d, TemporaryAuthFailure)
        self.assertEqual(len(self.flushLoggedErrors(Broken)), 1)
        self.assertEqual(later.calls, 0)

    async def test_all_unknown(self) -> None:
        checkers = [Scripted(UnknownUser()), Scripted(UnknownUser())]
        await self.assertFailure(CompositeChecker(checkers).requestAvatarId(creds("x", "pw")), UnknownUser)
        await self.assertFailure(CompositeChecker([]).requestAvatarId(creds("x", "pw")), UnknownUser)

    async def test_skips_checkers_for_other_credentials(self) -> None:
        """A checker is asked only about credentials it declares it understands."""
        other = Scripted("wrong@example.test", (IUsernamePassword,))
        mine = Scripted("right@example.test")
        self.assertEqual(
            await CompositeChecker([other, mine]).requestAvatarId(creds("x", "pw")), "right@example.test"
        )
        self.assertEqual(other.calls, 0)
        d = CompositeChecker([other, mine]).requestAvatarId(UsernamePassword(b"x", b"pw"))
        self.assertEqual(await d, "wrong@example.test")
        self.assertEqual(mine.calls, 1)


class CompositeOfLocalCheckersTests(TestCase):
    """Two real user DBs in a chain: ordering decides, and a wrong password in the first stops."""

    def setUp(self) -> None:
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name="test-auth")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        checkers = []
        for name, users in (
            ("first", [("both@example.test", "first-pw")]),
            ("second", [("both@example.test", "second-pw"), ("only2@example.test", "pw2")]),
        ):
            store = Path(self.mktemp())
            store.mkdir()
            key = StoreKey.load_or_create(store / "store.key")
            db = UserDB(store / "users.db")
            self.addCleanup(db.close)
            for address, password in users:
                db.add(address, password, "sha" if name == "first" else "des", key)
            checkers.append(LocalUserChecker(db, key, self.pool, reactor))
        self.composite = CompositeChecker(checkers)

    async def test_order(self) -> None:
        self.assertEqual(
            await self.composite.requestAvatarId(creds("both@example.test", "first-pw")), "both@example.test"
        )
        self.assertEqual(
            await self.composite.requestAvatarId(creds("only2@example.test", "pw2")), "only2@example.test"
        )

    async def test_wrong_password_in_first_stops(self) -> None:
        d = self.composite.requestAvatarId(creds("both@example.test", "second-pw"))
        e = await self.assertFailure(d, AuthenticationFailed)
        self.assertEqual(e.reason, "wrong password")

    async def test_unknown_everywhere(self) -> None:
        d = self.composite.requestAvatarId(creds("nobody@example.test", "pw"))
        await self.assertFailure(d, UnknownUser)
