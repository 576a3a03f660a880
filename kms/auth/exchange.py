"""The building blocks of one SASL exchange: results, the mechanism base class, the login gates.

A mechanism is a pure state machine: it gets the client's decoded bytes through ``step``, answers
with a `Challenge` or, at the end, an `Authenticated`, and never touches a transport or checks a
password itself.  Once it holds credentials it hands them to the per-connection login session
(`MechanismSession`), so lockout, policy, master password and the security log apply to every
method alike.  To add one: subclass `Mechanism`, implement ``_advance``, and list the class in
`kms.auth.sasl.IMPLEMENTED`.

Mechanisms that must still prove the *server* to the client after checking it (DIGEST-MD5's
``rspauth``, SCRAM's server signature) call ``session.verify`` instead of ``session.login``, send
their proof as one more `Challenge`, and finish with ``session.commit`` once the client answers:
only then is the connection logged in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeAlias

from twisted.internet.defer import Deferred, fail, maybeDeferred
from zope.interface import Attribute, Interface, implementer

from kms.auth.credentials import ILoginAttempt, PlaintextCredentials
from kms.auth.errors import MalformedResponse
from kms.clientinfo import ClientInfo

# RFC 4616 requires accepting 255 octets for each field; passwords get more room because
# generated passphrases and tokens are longer.
MAX_IDENTITY_OCTETS = 255
MAX_PASSWORD_OCTETS = 1024


@dataclass(frozen=True)
class Challenge:
    """The exchange goes on: send ``data`` to the client and step again with its answer."""

    data: bytes


@dataclass(frozen=True)
class Authenticated:
    """The exchange succeeded for ``identity`` (the canonical address); ``avatar`` is the realm's."""

    identity: str
    avatar: object = None


# What a mechanism's step may produce: at once, or once the session has answered.
StepResult: TypeAlias = (
    Challenge
    | Authenticated
    | Deferred[Authenticated]
    | Deferred[Challenge]
    | Deferred[Challenge | Authenticated]
)


class StepOutOfOrder(Exception):
    """``step`` was called on a finished mechanism or while a step was pending: an adapter bug."""


class MechanismSession(Protocol):
    """What a mechanism needs from the login session (`kms.auth.session.LoginSession`)."""

    @property
    def client(self) -> ClientInfo: ...

    @property
    def hostname(self) -> str:
        """The server's name: CRAM-MD5's challenge, DIGEST-MD5's realm and digest-uri host."""

    @property
    def service(self) -> str:
        """The SASL service name of this protocol: ``smtp``, ``imap`` or ``pop``."""

    def login(self, credentials: ILoginAttempt) -> Deferred[Authenticated]:
        """Check ``credentials`` and log the connection in: the usual end of an exchange."""

    def verify(self, credentials: ILoginAttempt) -> Deferred[Authenticated]:
        """Check ``credentials`` but log in only at `commit`; failures are those of `login`."""

    def commit(self, result: Authenticated) -> Authenticated:
        """Log in with what `verify` returned, once the client accepted the server's proof."""

    def refuse(self, username: str, method: str, reason: str) -> Deferred[Authenticated]:
        """Fail like a wrong password, with ``reason`` for the security log only."""

    def scram_parameters(self, username: str, method: str) -> Deferred[tuple[bytes, int]]:
        """SCRAM's salt and iteration count for ``username`` (made up for unknown users)."""


class ISASLMechanism(Interface):
    """One authentication exchange in progress; made fresh for every attempt."""

    name = Attribute("The IANA mechanism name, upper case, e.g. 'PLAIN'.")

    def step(response: bytes | None) -> Deferred[Challenge | Authenticated]:
        """Advance with the client's decoded data; ``None`` only as the first step (no initial response).

        Fails with `MalformedResponse` (syntax), `AuthenticationFailed`, `TemporaryAuthFailure`,
        or `StepOutOfOrder` once the exchange is over.
        """

    def abort() -> None:
        """The exchange is over for the connection (a new one began, it logged out or left):
        give back what it holds for the client's next answer.  Safe at any time, repeatedly."""


@implementer(ISASLMechanism)
class Mechanism(ABC):
    """Sequencing shared by every mechanism, so each one only describes its messages.

    A failed step ends the exchange: a client that sent garbage starts again with a new AUTH.
    """

    name: ClassVar[str]

    def __init__(self, session: MechanismSession) -> None:
        self._session = session
        self._started = False
        self._busy = False
        self._finished = False

    def step(self, response: bytes | None) -> Deferred[Challenge | Authenticated]:
        if self._finished or self._busy:
            return fail(StepOutOfOrder(f"{self.name} exchange is not waiting for a response"))
        if response is None and self._started:
            self._finished = True
            return fail(MalformedResponse(f"{self.name} needs a response"))
        self._started = True
        self._busy = True
        d: Deferred[Challenge | Authenticated] = maybeDeferred(self._advance, response)  # type: ignore[call-overload]
        d.addBoth(self._settle)
        return d

    def _settle(self, result: object) -> object:
        self._busy = False
        self._finished = not isinstance(result, Challenge)
        return result

    def abort(self) -> None:
        """No further step; a mechanism holding more than its own state gives it back too."""
        self._finished = True

    @abstractmethod
    def _advance(self, response: bytes | None) -> StepResult:
        """The mechanism's own logic; ``None`` only ever arrives as the first step."""


def utf8(data: bytes, what: str, limit: int) -> str:
    """``data`` as UTF-8 text of at most ``limit`` bytes, or `MalformedResponse` naming ``what``."""
    if len(data) > limit:
        raise MalformedResponse(f"{what} longer than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedResponse(f"{what} is not UTF-8") from None


def plaintext_login(
    session: MechanismSession, method: str, username: str, password: str, authzid: str | None = None
) -> Deferred[Authenticated]:
    """The one gate for every plaintext login (PLAIN, LOGIN, IMAP LOGIN, POP3 USER/PASS).

    Empty names and passwords are refused before any checker: an LDAP bind with an empty password
    is an anonymous bind that *succeeds*.  They fail like a wrong password, through the session,
    so they are logged and delayed like one.
    """
    if not username or not password:
        return session.refuse(username, method, "empty user name or password")
    refused = _authzid_refused(session, method, username, authzid)
    if refused is not None:
        return refused
    return session.login(PlaintextCredentials(username, password, method, session.client, authzid or None))


def challenge_gate(credentials: ILoginAttempt, session: MechanismSession) -> Deferred[Authenticated] | None:
    """The refusal every challenge-response login gets before any checker, or None to go on.

    The same rules as `plaintext_login`: no empty user name, nobody acting as someone else.
    """
    method, username = credentials.mechanism, credentials.username
    if not username:
        return session.refuse(username, method, "empty user name")
    return _authzid_refused(session, method, username, credentials.authzid)


def _authzid_refused(
    session: MechanismSession, method: str, username: str, authzid: str | None
) -> Deferred[Authenticated] | None:
    # The master password issue honours an authzid here (SPEC §7); until then nobody may act as
    # someone else.
    if authzid and authzid != username:
        return session.refuse(username, method, "authorization identity not allowed")
    return None
