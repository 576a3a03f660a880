"""SASL mechanisms as pure state machines, shared by SMTP AUTH, IMAP AUTHENTICATE and POP3 AUTH.

A protocol adapter decodes each client line with `decode_response`, feeds it to ``step`` and
answers with the `Challenge` (base64 via `encode_challenge`) or the `Authenticated` result.
Mechanisms never see a transport and never check a password themselves: once they hold
credentials they hand them to the per-connection login session, so lockout, policy, master
password and the security log apply to every method alike.  Twisted's ``IChallengeResponse``
can't do this (see the audit, §1.4): its factories get no connection context and it verifies only
once, at the end, which rules out DIGEST-MD5's ``rspauth`` and NTLM's three messages.
"""

from __future__ import annotations

import base64
import binascii
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Protocol

from twisted.internet.defer import Deferred, fail, maybeDeferred
from zope.interface import Attribute, Interface, implementer

from kms.auth.credentials import IPlaintextCredentials, PlaintextCredentials
from kms.auth.errors import EncryptionRequired, MalformedResponse, MechanismUnavailable
from kms.clientinfo import ClientInfo

# Far above any real exchange (an NTLM AUTHENTICATE message is a few KB) but bounded, so a
# client cannot make us decode megabytes.
MAX_RESPONSE_LENGTH = 12288
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


class StepOutOfOrder(Exception):
    """``step`` was called on a finished mechanism or while a step was pending: an adapter bug."""


def decode_response(line: bytes) -> bytes | None:
    """Decode one client SASL line; ``None`` means the client cancelled with ``*``.

    ``=`` is the RFC 4954/5034 spelling of an empty initial response.  Anything else must be
    strict base64: embedded whitespace or bad padding is a `MalformedResponse`, never guessed at.
    """
    text = line.strip()
    if text == b"*":
        return None
    if text == b"=":
        return b""
    if len(text) > MAX_RESPONSE_LENGTH:
        raise MalformedResponse(f"response longer than {MAX_RESPONSE_LENGTH} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise MalformedResponse(f"invalid base64: {e}") from None


def encode_challenge(data: bytes) -> bytes:
    """Base64 for a server challenge; empty data gives the empty line every protocol expects."""
    return base64.b64encode(data)


class MechanismSession(Protocol):
    """What a mechanism needs from the login session (`kms.auth.session.LoginSession`)."""

    @property
    def client(self) -> ClientInfo: ...

    def login(self, credentials: IPlaintextCredentials) -> Deferred[Authenticated]: ...

    def refuse(self, username: str, method: str, reason: str) -> Deferred[Authenticated]: ...


class ISASLMechanism(Interface):
    """One authentication exchange in progress; made fresh for every attempt."""

    name = Attribute("The IANA mechanism name, upper case, e.g. 'PLAIN'.")

    def step(response: bytes | None) -> Deferred[Challenge | Authenticated]:
        """Advance with the client's decoded data; ``None`` only as the first step (no initial response).

        Fails with `MalformedResponse` (syntax), `AuthenticationFailed`, `TemporaryAuthFailure`,
        or `StepOutOfOrder` once the exchange is over.
        """


@implementer(ISASLMechanism)
class _Mechanism(ABC):
    """Sequencing shared by every mechanism, so each one only describes its messages."""

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

    @abstractmethod
    def _advance(self, response: bytes | None) -> Challenge | Deferred[Authenticated]:
        """The mechanism's own logic; ``None`` only ever arrives as the first step."""


def _utf8(data: bytes, what: str, limit: int) -> str:
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
    # The master password issue honours an authzid here (SPEC §7); until then nobody may act as
    # someone else.
    if authzid and authzid != username:
        return session.refuse(username, method, "authorization identity not allowed")
    return session.login(PlaintextCredentials(username, password, method, session.client, authzid or None))


class Plain(_Mechanism):
    """RFC 4616: one message ``authzid NUL authcid NUL passwd``, UTF-8."""

    name = "PLAIN"

    def _advance(self, response: bytes | None) -> Challenge | Deferred[Authenticated]:
        if response is None:
            return Challenge(b"")
        fields = response.split(b"\0")
        if len(fields) != 3:
            raise MalformedResponse(f"PLAIN message has {len(fields) - 1} NULs, not 2")
        authzid = _utf8(fields[0], "authorization identity", MAX_IDENTITY_OCTETS)
        username = _utf8(fields[1], "user name", MAX_IDENTITY_OCTETS)
        password = _utf8(fields[2], "password", MAX_PASSWORD_OCTETS)
        return plaintext_login(self._session, self.name, username, password, authzid)


class Login(_Mechanism):
    """The de-facto LOGIN mechanism: ``Username:`` and ``Password:`` prompts, as Outlook expects.

    An initial response is taken as the user name (``AUTH LOGIN dXNlcg==``).
    """

    name = "LOGIN"

    def __init__(self, session: MechanismSession) -> None:
        super().__init__(session)
        self._username: str | None = None

    def _advance(self, response: bytes | None) -> Challenge | Deferred[Authenticated]:
        if response is None:
            return Challenge(b"Username:")
        if self._username is None:
            self._username = _utf8(response, "user name", MAX_IDENTITY_OCTETS)
            return Challenge(b"Password:")
        password = _utf8(response, "password", MAX_PASSWORD_OCTETS)
        return plaintext_login(self._session, self.name, self._username, password)


MechanismFactory = Callable[[MechanismSession], ISASLMechanism]
Policy = Callable[[str, ClientInfo], bool]

# Every mechanism kms implements; configuration chooses among these and their order.
IMPLEMENTED: Mapping[str, MechanismFactory] = {m.name: m for m in (Plain, Login)}


class SASLEngine:
    """Which mechanisms exist, are enabled, and are allowed for a given client; makes them."""

    def __init__(self, methods: Sequence[str], policy: Policy | None = None) -> None:
        """``methods`` is ``[security] methods``: names not implemented (yet) are skipped.

        ``policy(name, client)`` is the security policy's say (SPEC §5); without one, every
        enabled mechanism is allowed.
        """
        configured = dict.fromkeys(name.upper() for name in methods)
        self._enabled = [name for name in configured if name in IMPLEMENTED]
        self._policy = policy

    def _allowed(self, name: str, client: ClientInfo) -> bool:
        return self._policy is None or self._policy(name, client)

    def available(self, client: ClientInfo) -> list[str]:
        """The mechanisms to advertise to ``client`` now, in configured order."""
        return [name for name in self._enabled if self._allowed(name, client)]

    def create(self, name: str, session: MechanismSession) -> ISASLMechanism:
        """A fresh exchange for ``name`` (any case), or `MechanismUnavailable`.

        `EncryptionRequired` when the policy would allow it over TLS, so SMTP can answer 538.
        """
        key = name.upper()
        if key not in self._enabled:
            raise MechanismUnavailable(f"{key} is not enabled")
        client = session.client
        if not self._allowed(key, client):
            if not client.tls and self._allowed(key, replace(client, tls=True)):
                raise EncryptionRequired(f"{key} requires TLS")
            raise MechanismUnavailable(f"{key} is not allowed for this client")
        return IMPLEMENTED[key](session)
