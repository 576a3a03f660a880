"""The login session: one per connection, and the only way any login reaches the portal.

Protocol -> mechanism -> `LoginSession.login` -> portal -> checker -> realm.  Because every
protocol and every mechanism ends here, the rules that must hold for all of them live here once:
the client learns nothing about why a login failed, failures are slowed down, temporary outages
are never reported as a wrong password, and each outcome is written to the security log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn, Protocol

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from kms.auth.credentials import IPlaintextCredentials
from kms.auth.errors import AuthenticationFailed, MechanismUnavailable, TemporaryAuthFailure
from kms.auth.realm import IMailUser
from kms.auth.sasl import Authenticated, ISASLMechanism, SASLEngine, plaintext_login
from kms.clientinfo import ClientInfo

_log = Logger()


class SecurityLog(Protocol):
    """The part of `kms.logs.Logs` the session writes to."""

    def security(self, event: str, client: ClientInfo | None = None, **fields: object) -> None: ...


def _refused() -> NoReturn:
    # A fresh exception without the internal reason: nothing about the cause may reach the client.
    raise AuthenticationFailed()


class LoginSession:
    """Login state and rules for one connection (SPEC §4–§7; DESIGN "The way a login travels")."""

    def __init__(
        self,
        portal: Portal,
        engine: SASLEngine,
        client: ClientInfo,
        logs: SecurityLog,
        clock: IReactorTime | None = None,
        failure_delay: float = 1.0,
        avatar_interface: type[Interface] = IMailUser,
    ) -> None:
        """``avatar_interface`` is what this protocol's logins ask the realm for (IMAP: an account)."""
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self._portal = portal
        self._engine = engine
        self._client = client
        self._logs = logs
        self._clock = clock
        self._failure_delay = failure_delay
        self._avatar_interface = avatar_interface
        self._logout: Callable[[], None] | None = None

    @property
    def client(self) -> ClientInfo:
        """The connection's client; protocols update ``tls`` in place after STARTTLS."""
        return self._client

    def mechanisms(self) -> list[str]:
        """The SASL mechanisms to advertise now; ask again after STARTTLS, the answer may change."""
        return self._engine.available(self._client)

    def begin(self, name: str) -> ISASLMechanism:
        """Start a SASL exchange; `MechanismUnavailable` (or `EncryptionRequired`) if refused here."""
        # The security policy (SPEC §5) decides inside the engine, before the mechanism exists.
        try:
            return self._engine.create(name, self)
        except MechanismUnavailable as e:
            self._logs.security("mechanism-refused", self._client, method=name, reason=str(e))
            raise

    def login_plaintext(self, username: str, password: str, method: str) -> Deferred[Authenticated]:
        """IMAP LOGIN and POP3 USER/PASS: the same gate and path as SASL PLAIN."""
        return plaintext_login(self, method, username, password)

    def login(
        self, credentials: IPlaintextCredentials, interface: type[Interface] | None = None
    ) -> Deferred[Authenticated]:
        """Check ``credentials`` through the portal.

        Fails with a bare `AuthenticationFailed` after ``failure_delay`` for every refusal alike
        (unknown user, wrong password...), or at once with `TemporaryAuthFailure`.
        """
        username, method = credentials.username, credentials.mechanism
        # Lockout (SPEC §6): refuse a locked account for this IP here, before any checker runs.
        # Master password (SPEC §7): tried here, for clients in [master] group only.
        d = self._portal.login(credentials, None, interface or self._avatar_interface)
        return d.addCallback(self._succeeded, method).addErrback(self._failed, username, method)

    def refuse(self, username: str, method: str, reason: str) -> Deferred[Authenticated]:
        """Fail a login decided before the checker, exactly as a wrong password fails.

        ``reason`` goes to the security log only.  The delay makes guessing slow without
        holding anything but a timer.
        """
        self._logs.security("login-failed", self._client, user=username, method=method, reason=reason)
        # Lockout (SPEC §6) counts the failure here.
        return deferLater(self._clock, self._failure_delay, _refused)

    def logout(self) -> None:
        """Release the avatar (on connection loss or re-login); safe to call any number of times."""
        logout, self._logout = self._logout, None
        self._client.identity = None
        if logout is not None:
            logout()

    def _succeeded(self, result: tuple[object, object, Callable[[], None]], method: str) -> Authenticated:
        _interface, avatar, logout = result
        identity: str = IMailUser(avatar).address
        self.logout()
        self._logout = logout
        self._client.identity = identity
        self._logs.security("login", self._client, user=identity, method=method)
        return Authenticated(identity, avatar)

    def _failed(self, failure: Failure, username: str, method: str) -> Deferred[Authenticated]:
        if failure.check(TemporaryAuthFailure):
            return self._unavailable(username, method, str(failure.value) or "temporary failure")
        if failure.check(UnauthorizedLogin):
            error = failure.value
            reason = error.reason if isinstance(error, AuthenticationFailed) else str(error) or "unauthorized"
            return self.refuse(username, method, reason)
        # A bug or an unforeseen error in a checker or the realm: an admin must see it, and the
        # client must be told to come back, not that its password is wrong.
        _log.failure("login of {user!r} by {method} failed", failure, user=username, method=method)
        return self._unavailable(username, method, "internal error")

    def _unavailable(self, username: str, method: str, reason: str) -> Deferred[Authenticated]:
        """A temporary failure: answered at once and never counted toward lockout."""
        self._logs.security("login-tempfail", self._client, user=username, method=method, reason=reason)
        return fail(TemporaryAuthFailure())
