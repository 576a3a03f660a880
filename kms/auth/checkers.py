"""twisted.cred checkers for local users, and the one chain that composes all checkers.

`CompositeChecker` semantics, in order of the checkers given, trying only those whose
``credentialInterfaces`` the credentials provide:

- `UnknownUser`: this checker has no such account; ask the next one.
- `AuthenticationFailed` (any other): the account exists and the attempt failed; stop, fail with it.
  A plain ``UnauthorizedLogin`` from a stock Twisted checker counts as this too.
- `TemporaryAuthFailure`: the answer is unknown now (database locked, directory down); stop, fail
  with it.  It gets a "try again later" reply and never counts toward lockout.
- anything else is a bug or an outage: it is logged with its traceback and becomes
  `TemporaryAuthFailure`, never "wrong password".
- every checker said unknown (or none applies): `UnknownUser`.

`LocalUserChecker` makes every attempt cost one PBKDF2 at the default cost, whatever the outcome
(unknown user, directory user, ``des`` or ``sha`` storage, a challenge answered or a method the
storage cannot serve), so response times do not tell which accounts exist.  Only an empty password
is refused at once: that says nothing about any account.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from kms.auth.credentials import PLAINTEXT, IChallengeCredentials, ILoginAttempt, IPlaintextCredentials
from kms.auth.errors import AuthenticationFailed, TemporaryAuthFailure, UnknownUser
from kms.auth.passwords import DEFAULT_ITERATIONS, InvalidToken, StoreKey, dummy_verify, parse_scram
from kms.store.users import (
    UserDB,
    UserRecord,
    check_password,
    normalize_address,
    normalize_domain,
    user_secrets,
)

# What `dummy_verify` hashes when there is no password to hash: the cost, not the input, matters.
_NO_PASSWORD = "kms: no password in this attempt"
_NO_SCRAM_KEYS = "no SCRAM keys stored (set the password again)"


@implementer(ICredentialsChecker)
class LocalUserChecker:
    """Users of the embedded user DB (``des`` and ``sha`` storage), plaintext or challenge-response.

    Directory users in the DB are `UnknownUser` here: the directory checker owns them.
    """

    credentialInterfaces = (IPlaintextCredentials, IChallengeCredentials)

    def __init__(
        self,
        userdb: UserDB,
        key: StoreKey,
        threadpool: ThreadPool,
        reactor: Any,
        default_domain: str | None = None,
    ) -> None:
        self._userdb = userdb
        self._key = key
        self._threadpool = threadpool
        self._reactor = reactor
        self._default_domain = None if default_domain is None else normalize_domain(default_domain)

    def qualify(self, username: str) -> str:
        """The canonical address for a login name: ``alice`` means ``alice@<default_domain>``."""
        if "@" not in username and self._default_domain is not None:
            username = f"{username}@{self._default_domain}"
        return normalize_address(username)

    # Avatar ids in kms are str addresses; Twisted's stubs say bytes.
    def requestAvatarId(self, credentials: ILoginAttempt) -> defer.Deferred[str]:  # type: ignore[override]
        """The user's canonical address, or a failure from `kms.auth.errors` (see the module doc)."""
        plaintext = IPlaintextCredentials(credentials, None)
        if plaintext is not None and not plaintext.password:
            return defer.fail(AuthenticationFailed("empty password"))
        try:
            address = self.qualify(credentials.username)
            authzid = None if not credentials.authzid else self.qualify(credentials.authzid)
        except ValueError:
            return defer.fail(UnknownUser("not a local address"))
        return threads.deferToThreadPool(
            self._reactor, self._threadpool, self._check, address, credentials, authzid
        )

    def _check(self, address: str, credentials: ILoginAttempt, authzid: str | None) -> str:
        """Runs in the thread pool: the check for this kind of credentials."""
        plaintext = IPlaintextCredentials(credentials, None)
        if plaintext is not None:
            return self._check_password(address, plaintext, authzid)
        return self._check_challenge(address, IChallengeCredentials(credentials), authzid)

    def scram_parameters(self, username: str) -> defer.Deferred[tuple[bytes, int]]:
        """SCRAM's salt and iteration count for ``username``, made up when the user has none.

        Unknown users, directory users and users without SCRAM keys get a salt derived from the
        store key and the name, and the default iteration count: the same answer every time, as a
        real user's would be, so the server's first message does not reveal whether they exist.
        """
        return threads.deferToThreadPool(self._reactor, self._threadpool, self._scram_parameters, username)

    def _scram_parameters(self, username: str) -> tuple[bytes, int]:
        try:
            record = self._userdb.get(self.qualify(username))
        except ValueError:
            record = None
        except sqlite3.Error as e:
            raise TemporaryAuthFailure(f"user database: {e}") from e
        if record is not None and record.storage != "directory" and record.scram is not None:
            try:
                keys = parse_scram(record.scram)
            except ValueError as e:
                raise TemporaryAuthFailure(f"SCRAM keys of {record.address} are corrupt") from e
            return keys.salt, keys.iterations
        return self._key.fake_salt(username.lower()), DEFAULT_ITERATIONS

    def _record(self, address: str) -> UserRecord | None:
        """The local user with a password at ``address``, or None (directory users included)."""
        try:
            record = self._userdb.get(address)
        except sqlite3.Error as e:
            raise TemporaryAuthFailure(f"user database: {e}") from e
        return None if record is None or record.storage == "directory" else record

    def _check_password(self, address: str, credentials: IPlaintextCredentials, authzid: str | None) -> str:
        """Runs in the thread pool: look-up and verification, one PBKDF2's worth of work every time."""
        password = credentials.password
        record = self._record(address)
        if record is None:
            dummy_verify(password)
            raise UnknownUser("no local user")
        try:
            ok = check_password(record, password, self._key)
        except InvalidToken as e:
            raise TemporaryAuthFailure(f"password of {address} does not decrypt (wrong store key?)") from e
        if record.storage != "sha":
            dummy_verify(password)
        return self._verdict(record, ok, None, authzid)

    def _check_challenge(self, address: str, credentials: IChallengeCredentials, authzid: str | None) -> str:
        """Runs in the thread pool: the mechanism's check, plus one PBKDF2 to cost what a password does.

        No challenge check hashes with PBKDF2 (SCRAM's was paid by the client), so the dummy one is
        always spent, and a method the storage cannot serve costs the same as a wrong answer.
        """
        record = self._record(address)
        dummy_verify(_NO_PASSWORD)
        if record is None:
            raise UnknownUser("no local user")
        try:
            secrets = user_secrets(record, self._key)
        except InvalidToken as e:
            raise TemporaryAuthFailure(f"password of {address} does not decrypt (wrong store key?)") from e
        except ValueError as e:
            raise TemporaryAuthFailure(f"SCRAM keys of {address} are corrupt") from e
        impossible = None
        if not secrets.provides(credentials.requires):
            why = "password stored one-way" if credentials.requires == PLAINTEXT else _NO_SCRAM_KEYS
            impossible = f"{credentials.mechanism} impossible for {address}: {why}"
        ok = impossible is None and credentials.check(secrets)
        return self._verdict(record, ok, impossible, authzid)

    @staticmethod
    def _verdict(record: UserRecord, ok: bool, impossible: str | None, authzid: str | None) -> str:
        """The address, or the one reason the security log should see (the client sees none)."""
        if not record.enabled:
            raise AuthenticationFailed("account disabled")
        if impossible is not None:
            raise AuthenticationFailed(impossible)
        if not ok:
            raise AuthenticationFailed("wrong password")
        if authzid is not None and authzid != record.address:
            raise AuthenticationFailed(f"may not act as {authzid}")
        return record.address


@implementer(ICredentialsChecker)
class CompositeChecker:
    """Several checkers behind one, with the chain semantics of the module docstring."""

    log = Logger()

    def __init__(self, checkers: Sequence[ICredentialsChecker]) -> None:
        self._checkers = tuple(checkers)
        interfaces: list[type[Interface]] = []
        for checker in self._checkers:
            interfaces.extend(i for i in checker.credentialInterfaces if i not in interfaces)
        self.credentialInterfaces = tuple(interfaces)

    def requestAvatarId(self, credentials: ICredentials) -> defer.Deferred[Any]:
        """The first avatar id a checker grants, or the failure that ends the chain."""
        return defer.ensureDeferred(self._chain(credentials))

    async def _chain(self, credentials: ICredentials) -> Any:
        for checker in self._checkers:
            if not any(i.providedBy(credentials) for i in checker.credentialInterfaces):
                continue
            try:
                return await defer.maybeDeferred(checker.requestAvatarId, credentials)
            except UnknownUser:
                continue
            except (AuthenticationFailed, TemporaryAuthFailure):
                raise
            except UnauthorizedLogin as e:
                raise AuthenticationFailed(str(e) or "unauthorized") from e
            except Exception as e:
                self.log.failure("credentials checker {checker!r} failed", checker=checker)
                raise TemporaryAuthFailure(f"{type(checker).__name__} failed: {type(e).__name__}") from e
        raise UnknownUser("no checker knows this user")


@implementer(ICredentialsChecker)
class UnlessDisabledHere:
    """A directory checker (LDAP bind, winbind NTLM) whose users kms itself may switch off.

    The directory decides the password; ``kmsctl user disable`` on a directory user's record
    (``user add --source directory``) stops their mail access without touching AD.  A disabled
    user fails like a wrong password, with the reason logged.
    """

    def __init__(self, inner: Any, is_disabled: Any) -> None:
        self._inner = inner
        self._is_disabled = is_disabled  # address -> Deferred[bool]
        self.credentialInterfaces = inner.credentialInterfaces

    def requestAvatarId(self, credentials: ICredentials) -> defer.Deferred[str]:  # type: ignore[override]
        d = defer.maybeDeferred(self._inner.requestAvatarId, credentials)

        def check(address: str) -> defer.Deferred[str]:
            def decided(disabled: bool) -> str:
                if disabled:
                    raise AuthenticationFailed(f"{address} is disabled in kms (kmsctl user enable)")
                return address

            return self._is_disabled(address).addCallback(decided)  # type: ignore[no-any-return]

        return d.addCallback(check)
