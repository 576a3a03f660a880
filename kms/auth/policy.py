"""The security policy (SPEC §5): how a client may authenticate, and what it may do before TLS.

One pure decision for all three protocols, so SMTP, IMAP and POP3 cannot drift apart and a single
table test covers every case.  Callers only ask: the SASL engine through `engine_policy`, the
front-ends for IMAP LOGIN, POP3 USER/PASS and the ``encrypted`` command restrictions.  They word
the refusal for their protocol and write it to the security log.

The levels, each including the one before:

* ``none``: every enabled method, with or without TLS.
* ``secure_auth``: without TLS only the challenge methods, which never put the password on the
  wire; plaintext ones (PLAIN, LOGIN, IMAP LOGIN, POP3 USER/PASS) need TLS.
* ``encrypted``: IMAP and POP3 need TLS for everything but finding out about it, starting it and
  leaving.  SMTP must still take mail from servers that cannot encrypt, so there it is
  ``secure_auth``: unencrypted mail yes, unencrypted plaintext passwords no.

TLS allows everything: implicit-TLS listeners (smtps, imaps, pop3s) start with ``client.tls`` set,
STARTTLS sets it.  Clients in the exception group are exempt from all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from kms.auth.session import PROTOCOLS
from kms.clientinfo import ClientInfo
from kms.ipgroups import IPGroup, parse_group

NONE, SECURE_AUTH, ENCRYPTED = "none", "secure_auth", "encrypted"
LEVELS = (NONE, SECURE_AUTH, ENCRYPTED)

# Methods that keep the password off the wire.  Everything else counts as plaintext, including any
# method added later until it is listed here: an omission must refuse, not expose a password.
CHALLENGE_METHODS = frozenset({"CRAM-MD5", "DIGEST-MD5", "NTLM", "SCRAM-SHA-256", "APOP"})

# What ``encrypted`` leaves IMAP and POP3 before TLS: enough to learn about TLS, start it, or leave.
PRE_TLS_COMMANDS = {
    "imap": frozenset({"CAPABILITY", "STARTTLS", "NOOP", "LOGOUT"}),
    "pop3": frozenset({"CAPA", "STLS", "NOOP", "QUIT"}),
}


class Decision(Enum):
    """The policy's answer to an authentication method; TLS always turns a refusal into ALLOWED."""

    ALLOWED = "allowed"
    NEEDS_TLS = "needs-tls"


@dataclass(frozen=True)
class SecurityPolicy:
    """``[security] policy`` and the compiled ``exception_group``; the default enforces nothing."""

    level: str = NONE
    exception_group: IPGroup = field(default_factory=lambda: parse_group([]))

    def __post_init__(self) -> None:
        # The config validates the level; this catches a misspelt level in code, which would
        # otherwise silently fall through to the strictest or loosest branch.
        if self.level not in LEVELS:
            raise ValueError(f"security policy {self.level!r} is not one of {', '.join(LEVELS)}")


def _unrestricted(policy: SecurityPolicy, client: ClientInfo) -> bool:
    """Nothing to enforce: no policy, an encrypted connection, or a client of the exception group."""
    return policy.level == NONE or client.tls or policy.exception_group.contains(client.peer_host)


def may_authenticate(policy: SecurityPolicy, client: ClientInfo, method: str, protocol: str) -> Decision:
    """Whether ``client`` may use ``method`` (a SASL name, ``APOP``, ``IMAP-LOGIN``, ``USER/PASS``)
    on ``protocol`` (``smtp``, ``imap``, ``pop3``) now; any other protocol is held to IMAP's rules."""
    if _unrestricted(policy, client):
        return Decision.ALLOWED
    if policy.level == ENCRYPTED and protocol != "smtp":
        return Decision.NEEDS_TLS
    return Decision.ALLOWED if method.upper() in CHALLENGE_METHODS else Decision.NEEDS_TLS


def may_use_command(policy: SecurityPolicy, client: ClientInfo, protocol: str, command: str) -> bool:
    """Whether ``command`` may run now: only ``encrypted`` restricts commands, and never SMTP's."""
    if policy.level != ENCRYPTED or protocol == "smtp" or _unrestricted(policy, client):
        return True
    return command.upper() in PRE_TLS_COMMANDS.get(protocol, frozenset())


def engine_policy(policy: SecurityPolicy) -> Callable[[str, ClientInfo], bool]:
    """The ``policy(name, client)`` the shared `SASLEngine` asks about each mechanism.

    One engine serves every listener, so the protocol comes from the client's listener (unknown
    listeners get IMAP's stricter rules through `may_authenticate`).
    """

    def allowed(method: str, client: ClientInfo) -> bool:
        protocol = PROTOCOLS.get(client.listener, client.listener)
        return may_authenticate(policy, client, method, protocol) is Decision.ALLOWED

    return allowed
