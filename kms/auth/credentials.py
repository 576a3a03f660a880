"""Credentials that carry a password in clear: PLAIN, LOGIN, IMAP LOGIN and POP3 USER/PASS.

Twisted's ``IUsernamePassword`` knows nothing about the connection, but our checkers and the
security log need the mechanism and the client, so every plaintext login arrives as one
`IPlaintextCredentials`, whichever protocol and command produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.cred.credentials import ICredentials
from zope.interface import Attribute, implementer

from kms.clientinfo import ClientInfo


class IPlaintextCredentials(ICredentials):
    """A user name and a clear-text password, with where and how they were sent."""

    username = Attribute("str: the authentication identity as the client typed it (address or local part)")
    password = Attribute("str: the password in clear; never logged")
    mechanism = Attribute('str: how it was sent, e.g. "PLAIN", "LOGIN", "IMAP-LOGIN", "USER/PASS"')
    authzid = Attribute("str | None: the identity to act as (SASL PLAIN), None when not given")
    client = Attribute("ClientInfo: the connection the login came over")


@implementer(IPlaintextCredentials)
@dataclass(frozen=True, eq=False)
class PlaintextCredentials:
    """One plaintext login attempt; the password stays out of repr, and equality is identity."""

    username: str
    password: str = field(repr=False)
    mechanism: str
    client: ClientInfo
    authzid: str | None = None
