"""The login session: one per connection, and the only way any login reaches the portal.

Protocol -> mechanism -> `LoginSession.login` -> portal -> checker -> realm.  Because every
protocol and every mechanism ends here, the rules that must hold for all of them live here once:
the client learns nothing about why a login failed, failures are slowed down, temporary outages
are never reported as a wrong password, and each outcome is written to the security log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn, Protocol

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from kms.auth.credentials import ILoginAttempt, IPlaintextCredentials
from kms.auth.errors import AuthenticationFailed, MechanismUnavailable, TemporaryAuthFailure
from kms.auth.exchange import Authenticated, ISASLMechanism, StepOutOfOrder, challenge_gate, plaintext_login
from kms.auth.lockout import Lock, Lockout
from kms.auth.master import Master, may_use_master, new_challenge
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


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


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
        lockout: Lockout | None = None,
        master: Master | None = None,
    ) -> None:
        """``avatar_interface`` is what this protocol's logins ask the realm for (IMAP: an account).

        ``hostname`` is the server's name (``[server] hostname``) for challenges and realms;
        ``scram_lookup`` gives SCRAM's salt and iterations for a user name (`LocalUserChecker`);
        ``lockout`` counts failures and refuses locked accounts (None: ``[lockout]`` is off);
        ``master`` checks the master password (None: ``[master]`` is off).
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
        self._lockout = lockout
        self._master = master
        self._master_challenge: str | None = None
        self._master_proven = False  # X-MASTERAUTH succeeded: the next login needs no password
        self._logout: Callable[[], None] | None = None
        self._verified: _Verified | None = None
        self._exchange: ISASLMechanism | None = None  # the last one begun, until the next or logout
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
        self._abort_exchange()
        # The security policy (SPEC §5) decides inside the engine, before the mechanism exists.
        try:
            exchange = self._exchange = self._engine.create(name, self)
        except MechanismUnavailable as e:
            self._security("mechanism-refused", method=name, reason=str(e))
            raise
        return exchange

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
        password = credentials.password if IPlaintextCredentials.providedBy(credentials) else None
        interface = interface or self._avatar_interface
        if self._master_proven and password is not None:
            # After X-MASTERAUTH (SPEC §7), a plaintext login opens the named mailbox as it is.
            opened = self._master_open(username, method, "X-MASTERAUTH", interface)
            return opened.addErrback(self._failed, username, method, password)
        if self._lockout is None:
            d = self._portal.login(credentials, None, interface).addCallback(self._checked, username, method)
            d.addErrback(self._try_master, username, method, password, interface)
            return d.addErrback(self._failed, username, method, password)
        # Lockout (SPEC §6): is the account locked for this IP?  The checker runs all the same, so a
        # locked account costs the same work and gets the same reply as a wrong password.
        lockout = self._lockout
        account = lockout.account(username)
        checked = lockout.check(account, self._client.peer_host)

        def decided(decision: tuple[bool, list[Lock]]) -> Deferred[Authenticated]:
            refused, expired = decision
            for lock in expired:
                self._logs.security(
                    "lockout-expired", user=lock.account, ip=lock.ip, reason="unlock_after passed"
                )
            d = self._portal.login(credentials, None, interface)
            if refused:
                return d.addBoth(self._locked, username, method)
            verified = d.addCallback(self._checked, username, method)
            verified.addCallback(self._succeeded, account)
            verified.addErrback(self._try_master, username, method, password, interface)
            return verified.addErrback(self._failed, username, method, password)

        checked.addErrback(self._lookup_failed, username, method)
        return checked.addCallback(decided)

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

    def refuse(
        self, username: str, method: str, reason: str, password: str | None = None, count: bool = True
    ) -> Deferred[Authenticated]:
        """Fail a login decided before the checker, exactly as a wrong password fails.

        ``reason`` goes to the security log only.  The delay makes guessing slow without
        holding anything but a timer.
        """
        self._security("login-failed", user=username, method=method, reason=reason)
        if self._lockout is None or not count or not username:
            return deferLater(self._clock, self._failure_delay, _refused)
        # Lockout (SPEC §6) counts the failure here; ``password`` only to recognise a repeated one.
        account = self._lockout.account(username)
        d = self._lockout.failed(account, self._client.peer_host, password)
        d.addCallbacks(self._maybe_locked, self._count_failed, errbackArgs=(account,))
        return d.addCallback(lambda _: deferLater(self._clock, self._failure_delay, _refused))

    def logout(self) -> None:
        """Release the avatar (on connection loss or re-login); safe to call any number of times."""
        self._abandon()
        self._abort_exchange()
        logout, self._logout = self._logout, None
        self._client.identity = None
        if logout is not None:
            logout()

    def _security(self, event: str, **fields: object) -> None:
        self._logs.security(event, self._client, protocol=self.protocol, **fields)

    def _abort_exchange(self) -> None:
        """The last SASL exchange `begin` made is over for this connection, finished or not."""
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.abort()

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

    # --- master authentication (SPEC §7) ---------------------------------------------------------

    def _master_allowed(self) -> bool:
        master = self._master
        return master is not None and may_use_master(
            True, master.in_group(self._client.peer_host), self.protocol
        )

    def master_challenge(self) -> str | None:
        """IMAP X-MASTERAUTH's challenge, or None when this client may not use the master password."""
        if self.protocol != "imap" or not self._master_allowed():
            return None
        self._master_challenge = new_challenge(self._hostname)
        return self._master_challenge

    def master_answer(self, answer: str) -> Deferred[None]:
        """Check the client's answer to `master_challenge`; fails like a wrong password."""
        challenge, self._master_challenge = self._master_challenge, None
        if challenge is None or self._master is None:
            raise StepOutOfOrder("X-MASTERAUTH answer without a challenge")

        def checked(ok: bool) -> Deferred[None] | None:
            if not ok:
                d: Deferred[Any] = self.refuse("(master)", "X-MASTERAUTH", "wrong master digest", count=False)
                return d
            self._master_proven = True
            self._security("master-auth", form="X-MASTERAUTH")
            return None

        d = self._master.check_digest(challenge, answer)
        d.addErrback(self._lookup_failed, "(master)", "X-MASTERAUTH")
        return d.addCallback(checked)

    def _try_master(
        self, failure: Failure, username: str, method: str, password: str | None, interface: type[Interface]
    ) -> Deferred[Authenticated] | Failure:
        """After a refusal: the master password, from a client of the group, on IMAP or POP3."""
        if password is None or not failure.check(UnauthorizedLogin) or not self._master_allowed():
            return failure
        assert self._master is not None

        def checked(ok: bool) -> Deferred[Authenticated] | Failure:
            return self._master_open(username, method, "password", interface) if ok else failure

        return self._master.check_password(password).addCallback(checked)

    def _master_open(
        self, username: str, method: str, form: str, interface: type[Interface]
    ) -> Deferred[Authenticated]:
        assert self._master is not None

        def found(address: str | None) -> Deferred[Authenticated]:
            if address is None:
                raise AuthenticationFailed("master login: no enabled local user of that name")
            request: Callable[..., Any] = self._portal.realm.requestAvatar
            d: Deferred[Any] = maybeDeferred(request, address, None, interface)
            return d.addCallback(opened, address)

        def opened(result: tuple[object, object, Callable[[], None]], address: str) -> Authenticated:
            self._security("master-login", user=username, mailbox=address, form=form, method=method)
            return self._checked(result, username, f"{method}+master")

        return self._master.user(username).addCallback(found)

    def _succeeded(self, result: Authenticated, account: str) -> Deferred[Authenticated]:
        assert self._lockout is not None
        d = self._lockout.succeeded(account, self._client.peer_host)
        d.addErrback(self._count_failed, account)
        return d.addCallback(lambda _: result)

    def _locked(self, outcome: object, username: str, method: str) -> Deferred[Authenticated]:
        """The end of a login refused by a lock: released if the password was right, never counted."""
        if isinstance(outcome, Failure):
            if outcome.check(TemporaryAuthFailure):
                return self._unavailable(username, method, str(outcome.value) or "temporary failure")
        elif isinstance(outcome, tuple):
            outcome[2]()
        self._security("login-refused-locked", user=username, method=method)
        return self.refuse(username, method, "account locked", count=False)

    def _maybe_locked(self, lock: Lock | None) -> None:
        if lock is not None:
            self._security("lockout-locked", user=lock.account, ip=lock.ip, until=_iso(lock.until))

    def _count_failed(self, failure: Failure, account: str) -> None:
        # The login's answer must not change because the counters could not be written.
        _log.failure("lockout bookkeeping for {user!r} failed", failure, user=account)

    def _lookup_failed(self, failure: Failure, username: str, method: str) -> Deferred[tuple[bytes, int]]:
        if not failure.check(TemporaryAuthFailure):
            _log.failure("SCRAM lookup of {user!r} failed", failure, user=username)
        return self._unavailable(username, method, str(failure.value) or "SCRAM lookup failed")

    def _failed(
        self, failure: Failure, username: str, method: str, password: str | None = None
    ) -> Deferred[Authenticated]:
        if failure.check(TemporaryAuthFailure):
            return self._unavailable(username, method, str(failure.value) or "temporary failure")
        if failure.check(UnauthorizedLogin):
            error = failure.value
            reason = error.reason if isinstance(error, AuthenticationFailed) else str(error) or "unauthorized"
            return self.refuse(username, method, reason, password)
        # A bug or an unforeseen error in a checker or the realm: an admin must see it, and the
        # client must be told to come back, not that its password is wrong.
        _log.failure("login of {user!r} by {method} failed", failure, user=username, method=method)
        return self._unavailable(username, method, "internal error")

    def _unavailable(self, username: str, method: str, reason: str) -> Deferred[Any]:
        """A temporary failure: answered at once and never counted toward lockout."""
        self._security("login-tempfail", user=username, method=method, reason=reason)
        return fail(TemporaryAuthFailure())
