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
(unknown user, directory user, ``des`` or ``sha`` storage), so response times do not tell which
accounts exist.  Only an empty password is refused at once: that says nothing about any account.
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

from kms.auth.credentials import IPlaintextCredentials
from kms.auth.errors import AuthenticationFailed, TemporaryAuthFailure, UnknownUser
from kms.auth.passwords import InvalidToken, StoreKey, dummy_verify
from kms.store.users import UserDB, check_password, normalize_address, normalize_domain


@implementer(ICredentialsChecker)
class LocalUserChecker:
    """Plaintext passwords of users in the embedded user DB (``des`` and ``sha`` storage).

    Directory users in the DB are `UnknownUser` here: the directory checker owns them.
    """

    credentialInterfaces = (IPlaintextCredentials,)

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
    def requestAvatarId(self, credentials: IPlaintextCredentials) -> defer.Deferred[str]:  # type: ignore[override]
        """The user's canonical address, or a failure from `kms.auth.errors` (see the module doc)."""
        if not credentials.password:
            return defer.fail(AuthenticationFailed("empty password"))
        try:
            address = self.qualify(credentials.username)
            authzid = None if not credentials.authzid else self.qualify(credentials.authzid)
        except ValueError:
            return defer.fail(UnknownUser("not a local address"))
        return threads.deferToThreadPool(
            self._reactor, self._threadpool, self._check, address, credentials.password, authzid
        )

    def _check(self, address: str, password: str, authzid: str | None) -> str:
        """Runs in the thread pool: look-up and verification, one PBKDF2's worth of work every time."""
        try:
            record = self._userdb.get(address)
        except sqlite3.Error as e:
            raise TemporaryAuthFailure(f"user database: {e}") from e
        if record is None or record.storage == "directory":
            dummy_verify(password)
            raise UnknownUser("no local user")
        try:
            ok = check_password(record, password, self._key)
        except InvalidToken as e:
            raise TemporaryAuthFailure(f"password of {address} does not decrypt (wrong store key?)") from e
        if record.storage != "sha":
            dummy_verify(password)
        if not record.enabled:
            raise AuthenticationFailed("account disabled")
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
