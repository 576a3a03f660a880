"""The login session over a real portal, realm, checker chain, user DB and security log.

Only the thread pool is synchronous and time is a `task.Clock`, so every outcome, including the
failure delay, is observed deterministically.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import Interface, implementer
from zope.interface.verify import verifyObject

from kms.auth.checkers import CompositeChecker, LocalUserChecker
from kms.auth.credentials import IPlaintextCredentials, PlaintextCredentials
from kms.auth.errors import (
    AuthenticationFailed,
    EncryptionRequired,
    MechanismUnavailable,
    TemporaryAuthFailure,
)
from kms.auth.passwords import StoreKey
from kms.auth.realm import IMailUser, MailUser, Realm
from kms.auth.sasl import Authenticated, SASLEngine, StepOutOfOrder
from kms.auth.session import LoginSession
from kms.clientinfo import ClientInfo
from kms.logs import Logs
from kms.store.users import UserDB

PASSWORD = "correct horse"


class ImmediateThreadPool:
    """Runs "threaded" work at once, on the calling thread, so tests need no real reactor."""

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, object], None], func: Callable[..., object], *args: object
    ) -> None:
        try:
            result = func(*args)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class ImmediateReactor:
    def callFromThread(self, f: Callable[..., object], *args: object) -> None:
        f(*args)


class IOtherAvatar(Interface):
    """An avatar kind the realm has no factory for."""


@implementer(ICredentialsChecker)
class BrokenChecker:
    """A checker with a bug: raises something that is not a cred error."""

    credentialInterfaces = (IPlaintextCredentials,)

    def requestAvatarId(self, credentials: IPlaintextCredentials) -> NoReturn:
        raise RuntimeError("bug in checker")


class LoginSessionTests(TestCase):
    def setUp(self) -> None:
        self.store = Path(self.mktemp())
        self.store.mkdir()
        self.key = StoreKey.load_or_create(self.store / "store.key")
        self.userdb = UserDB(self.store / "users.db")
        self.addCleanup(self.userdb.close)
        self.userdb.add("bob@example.test", PASSWORD, "des", self.key)
        self.userdb.add("carol@example.test", PASSWORD, "des", self.key)
        self.userdb.set_enabled("carol@example.test", False)
        self.logs = Logs(self.store / "logs")
        self.addCleanup(self.logs.close)
        self.clock = Clock()
        self.client = ClientInfo("192.0.2.7", 40000, "127.0.0.1", 587, "submission", tls=True)
        self.session = self._session()

    def _session(
        self,
        realm: Realm | None = None,
        checker: ICredentialsChecker | None = None,
        engine: SASLEngine | None = None,
    ) -> LoginSession:
        if checker is None:
            pool: Any = ImmediateThreadPool()
            local = LocalUserChecker(self.userdb, self.key, pool, ImmediateReactor(), "example.test")
            checker = CompositeChecker([local])
        portal = Portal(realm or Realm(), [checker])
        return LoginSession(
            portal, engine or SASLEngine(["PLAIN", "LOGIN"]), self.client, self.logs, clock=self.clock
        )

    def security_log(self) -> list[str]:
        """Each security.log line without timestamp, session id, listener, client address and protocol."""
        lines = (self.store / "logs" / "security.log").read_text().splitlines()
        connection = (self.client.session_id, "submission", "[192.0.2.7]", "protocol=smtp")
        tails = []
        for line in lines:
            _when, session_id, listener, peer, event, protocol, tail = line.split(" ", 6)
            self.assertEqual((session_id, listener, peer, protocol), connection)
            tails.append(f"{event} {tail}")
        return tails

    def refused(self, d: Deferred[Any]) -> AuthenticationFailed:
        """The failure of ``d``, which must come exactly after the failure delay and not before."""
        self.assertNoResult(d)
        self.clock.advance(0.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        error = self.failureResultOf(d, AuthenticationFailed).value
        self.assertIsInstance(error, AuthenticationFailed)
        return error

    def test_plain_success(self) -> None:
        """A SASL login sets the connection's identity, logs it, and hands out the realm's avatar."""
        mechanism = self.session.begin("plain")
        result = self.successResultOf(mechanism.step(f"\0Bob\0{PASSWORD}".encode()))
        self.assertEqual(result, Authenticated("bob@example.test", MailUser("bob@example.test")))
        self.assertEqual(self.client.identity, "bob@example.test")
        self.assertEqual(self.security_log(), ["login user=Bob identity=bob@example.test method=PLAIN"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_login_mechanism_success(self) -> None:
        mechanism = self.session.begin("LOGIN")
        self.successResultOf(mechanism.step(None))
        self.successResultOf(mechanism.step(b"bob@example.test"))
        result = self.successResultOf(mechanism.step(PASSWORD.encode()))
        self.assertEqual(result, Authenticated("bob@example.test", MailUser("bob@example.test")))
        self.assertEqual(
            self.security_log(), ["login user=bob@example.test identity=bob@example.test method=LOGIN"]
        )

    def test_login_plaintext_success(self) -> None:
        """IMAP LOGIN / POP3 USER+PASS take the same path, under their own method name."""
        result = self.successResultOf(self.session.login_plaintext("bob", PASSWORD, "IMAP-LOGIN"))
        self.assertEqual(result.identity, "bob@example.test")
        self.assertEqual(self.client.identity, "bob@example.test")
        self.assertEqual(self.security_log(), ["login user=bob identity=bob@example.test method=IMAP-LOGIN"])

    def test_failures_are_indistinguishable(self) -> None:
        """Unknown user, wrong password, disabled account and empty password look the same to the
        client, all after the same delay; only the security log says which it was."""
        attempts = [
            ("bob@example.test", "wrong horse", 'reason="wrong password"'),
            ("nobody@example.test", PASSWORD, 'reason="no checker knows this user"'),
            ("carol@example.test", PASSWORD, 'reason="account disabled"'),
            ("bob@example.test", "", 'reason="empty user name or password"'),
            ("not an address", PASSWORD, 'reason="no checker knows this user"'),
        ]
        seen = set()
        for username, password, _ in attempts:
            error = self.refused(self.session.login_plaintext(username, password, "USER/PASS"))
            seen.add((type(error), error.reason, error.args))
            self.assertIsNone(self.client.identity)
        self.assertEqual(seen, {(AuthenticationFailed, "invalid credentials", ("invalid credentials",))})
        expected = [
            f"login-failed user={format_user(username)} method=USER/PASS {reason}"
            for username, _, reason in attempts
        ]
        self.assertEqual(self.security_log(), expected)
        self.assertNotIn("horse", (self.store / "logs" / "security.log").read_text())

    def test_sasl_refusals_are_delayed_and_logged(self) -> None:
        """Refusals decided by the mechanism itself fail like a checker's refusal."""
        impersonation = f"alice@example.test\0bob@example.test\0{PASSWORD}".encode()
        self.refused(self.session.begin("PLAIN").step(impersonation))
        self.refused(self.session.begin("PLAIN").step(b"\0bob@example.test\0"))
        self.assertEqual(
            self.security_log(),
            [
                'login-failed user=bob@example.test method=PLAIN reason="authorization identity not allowed"',
                'login-failed user=bob@example.test method=PLAIN reason="empty user name or password"',
            ],
        )

    def test_temporary_failure(self) -> None:
        """An unreachable user DB is "try later" at once: no delay, no wrong-password failure."""
        self.userdb.close()
        d = self.session.begin("PLAIN").step(f"\0bob\0{PASSWORD}".encode())
        error = self.failureResultOf(d, TemporaryAuthFailure).value
        self.assertEqual(str(error), "")
        self.assertIsNone(self.client.identity)
        [line] = self.security_log()
        self.assertTrue(line.startswith('login-tempfail user=bob method=PLAIN reason="user database: '), line)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unexpected_checker_error(self) -> None:
        """A bug is logged with its traceback and reported as temporary, never as a wrong password."""
        session = self._session(checker=BrokenChecker())
        self.failureResultOf(session.login_plaintext("bob", PASSWORD, "IMAP-LOGIN"), TemporaryAuthFailure)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(
            self.security_log(), ['login-tempfail user=bob method=IMAP-LOGIN reason="internal error"']
        )
        self.assertIsNone(self.client.identity)

    def test_unknown_avatar_interface(self) -> None:
        """Asking the realm for an avatar it cannot make is a server fault, not a refusal."""
        credentials = PlaintextCredentials("bob", PASSWORD, "PLAIN", self.client)
        self.failureResultOf(self.session.login(credentials, IOtherAvatar), TemporaryAuthFailure)
        self.assertEqual(len(self.flushLoggedErrors(NotImplementedError)), 1)
        self.assertIsNone(self.client.identity)

    def test_logout_idempotent(self) -> None:
        """The realm's logout runs once however often the protocol calls logout; identity goes."""
        released: list[str] = []

        def tracked(address: str) -> tuple[object, Callable[[], None]]:
            return MailUser(address), lambda: released.append(address)

        session = self._session(realm=Realm({IMailUser: tracked}))
        session.logout()
        self.successResultOf(session.login_plaintext("bob", PASSWORD, "IMAP-LOGIN"))
        self.assertEqual(released, [])
        session.logout()
        session.logout()
        self.assertEqual(released, ["bob@example.test"])
        self.assertIsNone(self.client.identity)

    def test_relogin_releases_previous_avatar(self) -> None:
        released: list[str] = []
        session = self._session(realm=Realm({IMailUser: lambda a: (MailUser(a), lambda: released.append(a))}))
        self.successResultOf(session.login_plaintext("bob", PASSWORD, "IMAP-LOGIN"))
        self.successResultOf(session.login_plaintext("bob", PASSWORD, "IMAP-LOGIN"))
        self.assertEqual(released, ["bob@example.test"])
        self.assertEqual(self.client.identity, "bob@example.test")

    def test_verify_then_commit(self) -> None:
        """verify checks without logging in; commit logs in with exactly that result, once."""
        released: list[str] = []
        session = self._session(realm=Realm({IMailUser: lambda a: (MailUser(a), lambda: released.append(a))}))
        credentials = PlaintextCredentials("bob", PASSWORD, "PLAIN", self.client)
        verified = self.successResultOf(session.verify(credentials))
        self.assertIsNone(self.client.identity)
        self.assertEqual(self.security_log(), [])
        self.assertRaises(StepOutOfOrder, session.commit, Authenticated("bob@example.test"))
        verified = self.successResultOf(session.verify(credentials))  # the first one is abandoned
        self.assertEqual(released, ["bob@example.test"])
        self.assertIs(session.commit(verified), verified)
        self.assertEqual(self.client.identity, "bob@example.test")
        self.assertRaises(StepOutOfOrder, session.commit, verified)
        self.assertEqual(
            self.security_log(),
            [
                'login-abandoned user=bob method=PLAIN reason="client did not accept the server\'s proof"',
                "login user=bob identity=bob@example.test method=PLAIN",
            ],
        )

    def test_logout_releases_verified(self) -> None:
        released: list[str] = []
        session = self._session(realm=Realm({IMailUser: lambda a: (MailUser(a), lambda: released.append(a))}))
        self.successResultOf(session.verify(PlaintextCredentials("bob", PASSWORD, "PLAIN", self.client)))
        session.logout()
        session.logout()
        self.assertEqual(released, ["bob@example.test"])
        self.assertEqual(len(self.security_log()), 1)

    def test_scram_lookup_trouble_is_temporary(self) -> None:
        """No lookup, a temporary one or a bug: "try later", logged, never a wrong password."""
        self.failureResultOf(self.session.scram_parameters("bob", "SCRAM-SHA-256"), TemporaryAuthFailure)
        portal = Portal(Realm(), [])
        for error in (TemporaryAuthFailure("user database: locked"), ZeroDivisionError("bug")):
            session = LoginSession(
                portal,
                SASLEngine([]),
                self.client,
                self.logs,
                clock=self.clock,
                scram_lookup=lambda u, error=error: fail(error),
            )
            self.failureResultOf(session.scram_parameters("bob", "SCRAM-SHA-256"), TemporaryAuthFailure)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(
            self.security_log(),
            [
                'login-tempfail user=bob method=SCRAM-SHA-256 reason="no SCRAM lookup configured"',
                'login-tempfail user=bob method=SCRAM-SHA-256 reason="user database: locked"',
                "login-tempfail user=bob method=SCRAM-SHA-256 reason=bug",
            ],
        )

    def test_mechanisms_follow_tls(self) -> None:
        """What is offered is re-evaluated on each call, so STARTTLS can change it."""
        engine = SASLEngine(["LOGIN", "PLAIN"], policy=lambda name, client: client.tls)
        session = self._session(engine=engine)
        self.client.tls = False
        self.assertEqual(session.mechanisms(), [])
        self.assertRaises(EncryptionRequired, session.begin, "PLAIN")
        self.client.tls = True
        self.assertEqual(session.mechanisms(), ["LOGIN", "PLAIN"])
        self.assertEqual(session.begin("PLAIN").name, "PLAIN")
        self.assertEqual(self.security_log(), ['mechanism-refused method=PLAIN reason="PLAIN requires TLS"'])

    def test_an_exchange_ends_at_the_next_begin_and_at_logout(self) -> None:
        """What a mechanism holds for the client's next answer (an NTLM helper) is given back when
        the client starts over or leaves, and the old exchange takes no more steps."""
        first = self.session.begin("LOGIN")
        self.successResultOf(first.step(None))
        second = self.session.begin("LOGIN")
        self.failureResultOf(first.step(b"bob@example.test"), StepOutOfOrder)
        self.successResultOf(second.step(None))
        self.session.logout()
        self.failureResultOf(second.step(b"bob@example.test"), StepOutOfOrder)

    def test_begin_unknown(self) -> None:
        self.assertRaises(MechanismUnavailable, self.session.begin, "CRAM-MD5")
        self.assertEqual(
            self.security_log(), ['mechanism-refused method=CRAM-MD5 reason="CRAM-MD5 is not enabled"']
        )


def format_user(username: str) -> str:
    """How the log writes a user field: bare when it has no space or quote."""
    return f'"{username}"' if " " in username else username


class RealmTests(TestCase):
    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IRealm, Realm()))
        self.assertTrue(verifyObject(IMailUser, MailUser("bob@example.test")))

    def test_mail_user(self) -> None:
        interface, avatar, logout = Realm().requestAvatar("bob@example.test", None, IOtherAvatar, IMailUser)
        self.assertIs(interface, IMailUser)
        self.assertEqual(avatar, MailUser("bob@example.test"))
        self.assertIsNone(logout())

    def test_registered_factory(self) -> None:
        """Further avatar kinds are added by registering a factory for their interface."""
        other = object()
        realm = Realm({IOtherAvatar: lambda address: (other, lambda: None)})
        self.assertIs(realm.requestAvatar("bob@example.test", None, IOtherAvatar)[1], other)

    def test_unknown_interface(self) -> None:
        self.assertRaises(NotImplementedError, Realm().requestAvatar, "bob@example.test", None, IOtherAvatar)
