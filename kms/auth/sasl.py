"""The SASL engine shared by SMTP AUTH, IMAP AUTHENTICATE and POP3 AUTH: which mechanisms exist,
which are enabled and allowed for a client, and the wire encoding of their messages.

A protocol adapter decodes each client line with `decode_response`, feeds it to the mechanism's
``step`` and answers with the `Challenge` (base64 via `encode_challenge`) or the `Authenticated`
result.  The mechanisms themselves are in `kms.auth.mechanisms` (built on `kms.auth.exchange`);
Twisted's ``IChallengeResponse`` can't do this (see the audit, §1.4): its factories get no
connection context and it verifies only once, at the end, which rules out DIGEST-MD5's ``rspauth``,
SCRAM's server signature and NTLM's three messages.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from kms.auth.errors import EncryptionRequired, MalformedResponse, MechanismUnavailable
from kms.auth.exchange import (
    Authenticated,
    Challenge,
    ISASLMechanism,
    MechanismSession,
    StepOutOfOrder,
    plaintext_login,
)
from kms.auth.mechanisms import CramMD5, DigestMD5, Login, Plain, ScramSHA256
from kms.clientinfo import ClientInfo

# What protocol adapters and tests take from here; the definitions live in kms.auth.exchange.
__all__ = [
    "IMPLEMENTED",
    "MAX_RESPONSE_LENGTH",
    "Authenticated",
    "Challenge",
    "ISASLMechanism",
    "Login",
    "MechanismSession",
    "Plain",
    "SASLEngine",
    "StepOutOfOrder",
    "decode_response",
    "encode_challenge",
    "plaintext_login",
]

# Far above any real exchange (an NTLM AUTHENTICATE message is a few KB) but bounded, so a
# client cannot make us decode megabytes.
MAX_RESPONSE_LENGTH = 12288


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


MechanismFactory = Callable[[MechanismSession], ISASLMechanism]
Policy = Callable[[str, ClientInfo], bool]

# Every mechanism kms implements; configuration chooses among these and their order.
IMPLEMENTED: Mapping[str, MechanismFactory] = {
    m.name: m for m in (ScramSHA256, CramMD5, DigestMD5, Login, Plain)
}


class SASLEngine:
    """Which mechanisms exist, are enabled, and are allowed for a given client; makes them."""

    def __init__(
        self,
        methods: Sequence[str],
        policy: Policy | None = None,
        factories: Mapping[str, MechanismFactory] | None = None,
    ) -> None:
        """``methods`` is ``[security] methods``: names not implemented (yet) are skipped.

        They are advertised in that order, except that SCRAM-SHA-256, when enabled, comes first:
        a client that takes the first mechanism it knows should take the one that keeps the
        password off the wire and proves the server too.  ``policy(name, client)`` is the security
        policy's say (SPEC §5); without one, every enabled mechanism is allowed.  ``factories``
        adds to or replaces entries of `IMPLEMENTED`, for mechanisms that take options from the
        configuration (e.g. ``functools.partial(NTLM, allow_v1=True)``).
        """
        self._factories = {**IMPLEMENTED, **(factories or {})}
        configured = dict.fromkeys(name.upper() for name in methods)
        enabled = [name for name in configured if name in self._factories]
        self._enabled = sorted(enabled, key=lambda name: name != ScramSHA256.name)
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
        self.check_allowed(key, session.client)
        return self._factories[key](session)

    def check_allowed(self, name: str, client: ClientInfo) -> None:
        """The policy's verdict on a method outside SASL too (APOP): raises like `create`."""
        if not self._allowed(name, client):
            if not client.tls and self._allowed(name, replace(client, tls=True)):
                raise EncryptionRequired(f"{name} requires TLS")
            raise MechanismUnavailable(f"{name} is not allowed for this client")
