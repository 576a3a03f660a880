"""The login session: one per connection, and the only way any login reaches the portal.

Protocol -> mechanism -> `LoginSession.login` -> portal -> checker -> realm.  Because every
protocol and every mechanism ends here, the rules that must hold for all of them live here once:
the client learns nothing about why a login failed, failures are slowed down, temporary outages
are never reported as a wrong password, and each outcome is written to the security log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from kms.auth.credentials import ILoginAttempt
from kms.auth.errors import AuthenticationFailed, MechanismUnavailable, TemporaryAuthFailure
from kms.auth.exchange import Authenticated, ISASLMechanism, StepOutOfOrder, challenge_gate, plaintext_login
from kms.auth.mechanisms import ApopCredentials, hex_digest
from kms.auth.realm import IMailUser
from kms.auth.sasl import SASLEngine
from kms.clientinfo import ClientInfo

_log = Logger()

# Listener -> protocol, as the security log names it; the SASL service name differs only for POP3.
PROTOCOLS = {
    "smtp": "smtp",
    "submission": "smtp",
    "smtps": "smtp",
    "pop3": "pop3",
    "pop3s": "pop3",
    "imap": "imap",
    "imaps": "imap",
}
_SASL_SERVICES = {"pop3": "pop"}

ScramLookup = Callable[[str], Deferred[tuple[bytes, int]]]


class SecurityLog(Protocol):
    """The part of `kms.logs.Logs` the session writes to."""

    def security(self, event: str, client: ClientInfo | None = None, **fields: object) -> None: ...


def _refused() -> NoReturn:
    # A fresh exception without the internal reason: nothing about the cause may reach the client.
    raise AuthenticationFailed()


@dataclass(frozen=True)
class _Verified:
    """Credentials checked by `LoginSession.verify`, waiting for the exchange to end."""

    result: Authenticated
    logout: Callable[[], None]
    username: str
    method: str


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
        hostname: str = "localhost",
        scram_lookup: ScramLookup | None = None,
    ) -> None:
        """``avatar_interface`` is what this protocol's logins ask the realm for (IMAP: an account).

        ``hostname`` is the server's name (``[server] hostname``) for challenges and realms;
        ``scram_lookup`` gives SCRAM's salt and iterations for a user name (`LocalUserChecker`).
        """
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
        self._hostname = hostname
        self._scram_lookup = scram_lookup
        self._logout: Callable[[], None] | None = None
        self._verified: _Verified | None = None
        self.protocol = PROTOCOLS.get(client.listener, client.listener)

    @property
    def client(self) -> ClientInfo:
        """The connection's client; protocols update ``tls`` in place after STARTTLS."""
        return self._client

    @property
    def hostname(self) -> str:
        """The server's name, as challenges and DIGEST-MD5's realm carry it."""
        return self._hostname

    @property
    def service(self) -> str:
        """The SASL service name (RFC 4954 ``smtp``, RFC 3501 ``imap``, RFC 5034 ``pop``)."""
        return _SASL_SERVICES.get(self.protocol, self.protocol)

    def mechanisms(self) -> list[str]:
        """The SASL mechanisms to advertise now; ask again after STARTTLS, the answer may change."""
        return self._engine.available(self._client)

    def begin(self, name: str) -> ISASLMechanism:
        """Start a SASL exchange; `MechanismUnavailable` (or `EncryptionRequired`) if refused here."""
        self._abandon()
        # The security policy (SPEC §5) decides inside the engine, before the mechanism exists.
        try:
            return self._engine.create(name, self)
        except MechanismUnavailable as e:
            self._security("mechanism-refused", method=name, reason=str(e))
            raise

    def login_plaintext(self, username: str, password: str, method: str) -> Deferred[Authenticated]:
        """IMAP LOGIN and POP3 USER/PASS: the same gate and path as SASL PLAIN."""
        return plaintext_login(self, method, username, password)

    def login_apop(self, username: str, timestamp: str, digest: str) -> Deferred[Authenticated]:
        """POP3 APOP (RFC 1939 §7) for the greeting's ``timestamp``; the policy may refuse it first.

        Raises `MechanismUnavailable` or `EncryptionRequired` like `begin`.
        """
        try:
            self._engine.check_allowed("APOP", self._client)
        except MechanismUnavailable as e:
            self._security("mechanism-refused", method="APOP", reason=str(e))
            raise
        value = hex_digest(digest)
        if value is None:
            return self.refuse(username, "APOP", "APOP digest is not 32 hex digits")
        credentials = ApopCredentials(username, timestamp, value, self._client)
        return challenge_gate(credentials, self) or self.login(credentials)

    def login(
        self, credentials: ILoginAttempt, interface: type[Interface] | None = None
    ) -> Deferred[Authenticated]:
        """Check ``credentials`` through the portal and log the connection in.

        Fails with a bare `AuthenticationFailed` after ``failure_delay`` for every refusal alike
        (unknown user, wrong password...), or at once with `TemporaryAuthFailure`.
        """
        return self.verify(credentials, interface).addCallback(self.commit)

    def verify(
        self, credentials: ILoginAttempt, interface: type[Interface] | None = None
    ) -> Deferred[Authenticated]:
        """Check ``credentials`` like `login`, but log in only when `commit` is called.

        For mechanisms that still owe the client the server's proof (DIGEST-MD5, SCRAM).  An
        exchange abandoned in between is released and logged by the next `begin` or `logout`.
        """
        self._abandon()
        username, method = credentials.username, credentials.mechanism
        # Lockout (SPEC §6): refuse a locked account for this IP here, before any checker runs.
        # Master password (SPEC §7): tried here, for clients in [master] group only.
        d = self._portal.login(credentials, None, interface or self._avatar_interface)
        return d.addCallback(self._checked, username, method).addErrback(self._failed, username, method)

    def commit(self, result: Authenticated) -> Authenticated:
        """Log in with what `verify` returned; `StepOutOfOrder` if it is not the pending one."""
        verified = self._verified
        if verified is None or verified.result is not result:
            raise StepOutOfOrder("commit without a matching verify")
        self._verified = None
        self.logout()
        self._logout = verified.logout
        self._client.identity = result.identity
        self._security("login", user=verified.username, identity=result.identity, method=verified.method)
        return result

    def scram_parameters(self, username: str, method: str) -> Deferred[tuple[bytes, int]]:
        """SCRAM's salt and iterations for ``username``; a lookup failure is a temporary one."""
        if self._scram_lookup is None:
            return self._unavailable(username, method, "no SCRAM lookup configured")
        d = self._scram_lookup(username)
        return d.addErrback(self._lookup_failed, username, method)

    def refuse(self, username: str, method: str, reason: str) -> Deferred[Authenticated]:
        """Fail a login decided before the checker, exactly as a wrong password fails.

        ``reason`` goes to the security log only.  The delay makes guessing slow without
        holding anything but a timer.
        """
        self._security("login-failed", user=username, method=method, reason=reason)
        # Lockout (SPEC §6) counts the failure here.
        return deferLater(self._clock, self._failure_delay, _refused)

    def logout(self) -> None:
        """Release the avatar (on connection loss or re-login); safe to call any number of times."""
        self._abandon()
        logout, self._logout = self._logout, None
        self._client.identity = None
        if logout is not None:
            logout()

    def _security(self, event: str, **fields: object) -> None:
        self._logs.security(event, self._client, protocol=self.protocol, **fields)

    def _abandon(self) -> None:
        """Release credentials verified for an exchange the client never finished."""
        verified, self._verified = self._verified, None
        if verified is not None:
            self._security(
                "login-abandoned",
                user=verified.username,
                method=verified.method,
                reason="client did not accept the server's proof",
            )
            verified.logout()

    def _checked(
        self, result: tuple[object, object, Callable[[], None]], username: str, method: str
    ) -> Authenticated:
        _interface, avatar, logout = result
        authenticated = Authenticated(IMailUser(avatar).address, avatar)
        self._verified = _Verified(authenticated, logout, username, method)
        return authenticated

    def _lookup_failed(self, failure: Failure, username: str, method: str) -> Deferred[tuple[bytes, int]]:
        if not failure.check(TemporaryAuthFailure):
            _log.failure("SCRAM lookup of {user!r} failed", failure, user=username)
        return self._unavailable(username, method, str(failure.value) or "SCRAM lookup failed")

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

    def _unavailable(self, username: str, method: str, reason: str) -> Deferred[Any]:
        """A temporary failure: answered at once and never counted toward lockout."""
        self._security("login-tempfail", user=username, method=method, reason=reason)
        return fail(TemporaryAuthFailure())
