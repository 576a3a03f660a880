"""What a login attempt hands to the checkers: a password in clear, or a challenge answered.

Twisted's ``IUsernamePassword`` knows nothing about the connection, but our checkers and the
security log need the mechanism and the client, so every login arrives as one of two interfaces,
whichever protocol and command produced it:

`IPlaintextCredentials`
    PLAIN, LOGIN, IMAP LOGIN and POP3 USER/PASS: the checker compares the password itself.

`IChallengeCredentials`
    CRAM-MD5, DIGEST-MD5, SCRAM-SHA-256, APOP, NTLM: only the mechanism knows how to verify its
    client's answer, and only the user store holds what that takes.  The checker looks the user up
    and calls ``credentials.check(secrets)`` with a `UserSecrets` of what the storage holds:

    - ``plaintext``: the password, for reversible (``des``) users; None otherwise.
    - ``scram``: `ScramKeys` when the user has SCRAM-SHA-256 keys (set with every password).

    ``credentials.requires`` names the one it needs (`PLAINTEXT` or `SCRAM`).  When the user's
    storage lacks it, the checker never calls ``check``: it fails with ``AuthenticationFailed("NTLM
    impossible for bob@example.test: password stored one-way")`` after the same work a real check
    costs, so the client cannot tell it from a wrong password.

    ``check`` runs in a worker thread: it must be pure computation (no reactor, no I/O), compare
    with `hmac.compare_digest`, and may keep what the mechanism needs afterwards on the credentials
    object itself (DIGEST-MD5's ``rspauth``, SCRAM's server signature, an NTLM session key); the
    mechanism reads it once the login's Deferred has fired.

A mechanism that needs a secret (NTLM needs the NT hash, MD4 of the UTF-16LE plaintext) writes one
small class providing `IChallengeCredentials` and passes an instance to the login session, which
takes it through the portal exactly like a plaintext login (lockout, policy, security log).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.cred.credentials import ICredentials
from zope.interface import Attribute, implementer

from kms.auth.passwords import ScramKeys
from kms.clientinfo import ClientInfo

__all__ = [
    "PLAINTEXT",
    "SCRAM",
    "IChallengeCredentials",
    "ILoginAttempt",
    "IPlaintextCredentials",
    "PlaintextCredentials",
    "ScramKeys",
    "UserSecrets",
]

# The values of ``IChallengeCredentials.requires``.
PLAINTEXT = "plaintext"
SCRAM = "scram"


class ILoginAttempt(ICredentials):
    """What every login attempt says about itself, for checkers and the security log."""

    username = Attribute("str: the authentication identity as the client typed it (address or local part)")
    mechanism = Attribute('str: how it was sent, e.g. "PLAIN", "IMAP-LOGIN", "USER/PASS", "CRAM-MD5", "APOP"')
    authzid = Attribute("str | None: the identity to act as (SASL authzid), None when not given")
    client = Attribute("ClientInfo: the connection the login came over")


class IPlaintextCredentials(ILoginAttempt):
    """A user name and a clear-text password, with where and how they were sent."""

    password = Attribute("str: the password in clear; never logged")


class IChallengeCredentials(ILoginAttempt):
    """A challenge answered by the client; only ``check`` can tell whether the answer is right."""

    requires = Attribute("str: the secret ``check`` needs: PLAINTEXT or SCRAM")

    def check(secrets: UserSecrets) -> bool:
        """Whether the client's answer proves it knows the user's password.

        Called in a worker thread, only when ``secrets`` has what ``requires`` names; compares in
        constant time.  May store results for the mechanism (server proof, session key) on self.
        """


@implementer(IPlaintextCredentials)
@dataclass(frozen=True, eq=False)
class PlaintextCredentials:
    """One plaintext login attempt; the password stays out of repr, and equality is identity."""

    username: str
    password: str = field(repr=False)
    mechanism: str
    client: ClientInfo
    authzid: str | None = None


@dataclass(frozen=True)
class UserSecrets:
    """What the user's storage can give a challenge-response check; see the module docstring."""

    address: str
    plaintext: str | None = field(default=None, repr=False)
    scram: ScramKeys | None = None

    def provides(self, requirement: str) -> bool:
        """Whether a check that ``requires`` this can run for this user."""
        if requirement == PLAINTEXT:
            return self.plaintext is not None
        if requirement == SCRAM:
            return self.scram is not None
        raise ValueError(f"unknown secret requirement {requirement!r}")
