"""How a login can end other than in success, kept apart so each protocol can answer correctly.

Clients must not learn *why* a login failed (unknown user, wrong password, locked account and a
method the stored password cannot serve all look the same), but the security log must, so every
failure carries a ``reason`` for the log only.  A temporary failure (directory down) is a different
class altogether: it gets a "try again later" reply and never counts toward lockout.
"""

from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin


class AuthenticationFailed(UnauthorizedLogin):
    """Permanent failure of one attempt; ``reason`` is for the security log, never for the client."""

    def __init__(self, reason: str = "invalid credentials") -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownUser(AuthenticationFailed):
    """No such account in this checker: a composite checker moves on to the next one."""


class TemporaryAuthFailure(Exception):
    """The answer is unknown right now (directory unreachable, database busy): try again later."""


class MalformedResponse(Exception):
    """The client's SASL data is not valid for the mechanism (bad base64, missing NULs, ...)."""


class MechanismUnavailable(Exception):
    """The client asked for a mechanism that is unknown, disabled, or not allowed here and now."""


class EncryptionRequired(MechanismUnavailable):
    """The mechanism would be allowed over TLS, but this connection is not encrypted."""
