"""Which login methods can work for which stored password (SPEC §3), as one pure table.

The checkers enforce this at login time (`kms.auth.credentials`); this module only *explains* it,
for ``kmsctl user show`` and the warnings of ``kmsctl check-config``, so an admin learns before a
user calls that a method cannot work for them.
"""

from __future__ import annotations

from collections.abc import Sequence

# Plaintext logins outside SASL, enabled together with the plaintext SASL mechanisms.
PLAINTEXT_SASL = ("PLAIN", "LOGIN")
PLAINTEXT_COMMANDS = ("IMAP-LOGIN", "USER/PASS")
# Need the password itself (HMAC-MD5 key, DIGEST-MD5's A1, the NT hash, MD5(timestamp + password)).
NEED_PLAINTEXT = frozenset({"CRAM-MD5", "DIGEST-MD5", "NTLM", "APOP"})
SCRAM = "SCRAM-SHA-256"


def offered_methods(enabled: Sequence[str]) -> list[str]:
    """Every way to log in that ``[security] methods`` switches on, in its order.

    The plaintext commands follow PLAIN/LOGIN; APOP is part of POP3 itself and always offered.
    """
    offered = list(enabled)
    if any(m in PLAINTEXT_SASL for m in enabled):
        offered.extend(PLAINTEXT_COMMANDS)
    offered.append("APOP")
    return offered


def why_not(method: str, storage: str, has_scram: bool, ntlm_for_directory: bool = False) -> str | None:
    """Why ``method`` cannot work for a user with this storage, or None when it can."""
    if storage == "directory":
        if method in PLAINTEXT_SASL or method in PLAINTEXT_COMMANDS:
            return None
        if method == "NTLM" and ntlm_for_directory:
            return None
        return "directory users log in with a password checked by the directory"
    if method == SCRAM and not has_scram:
        return "no SCRAM keys stored yet (set the password again)"
    if method in NEED_PLAINTEXT and storage != "des":
        return "password stored one-way"
    return None


def usable_methods(
    enabled: Sequence[str], storage: str, has_scram: bool, ntlm_for_directory: bool = False
) -> tuple[list[str], list[tuple[str, str]]]:
    """The offered methods this user can use, and those they cannot, each with the reason."""
    usable: list[str] = []
    unusable: list[tuple[str, str]] = []
    for method in offered_methods(enabled):
        reason = why_not(method, storage, has_scram, ntlm_for_directory)
        if reason is None:
            usable.append(method)
        else:
            unusable.append((method, reason))
    return usable, unusable


def method_warnings(methods: Sequence[str], storage: str, has_scram: bool, who: str) -> list[str]:
    """What an admin should hear when ``methods`` leave users of this storage class (``who``) short."""
    impossible = [m for m in methods if why_not(m, storage, has_scram) is not None]
    if not impossible:
        return []
    if len(impossible) == len(methods):
        return [f"security.methods: none of {', '.join(methods)} works for {who}: they cannot log in"]
    return [
        f"security.methods: {', '.join(impossible)} cannot work for {who}; "
        "clients choosing them will fail to log in"
    ]
