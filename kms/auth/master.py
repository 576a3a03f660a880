"""Master authentication (SPEC §7): an administrator's password that opens any user's mailbox.

Only clients whose address is in ``[master] group`` may use it, and only on IMAP and POP3
(`may_use_master`); from anywhere else the master password is simply a wrong password.  Two forms:

* a plaintext login (IMAP LOGIN/AUTHENTICATE PLAIN, POP3 USER/PASS or AUTH PLAIN) as the target
  user with the master password, checked against a PBKDF2 hash;
* Kerio's IMAP ``X-MASTERAUTH``: the server sends ``+ <challenge>``, the client answers the hex MD5
  of challenge + master password.  Checking that needs the password itself, so the file also keeps
  it encrypted with the store key (as ``des`` user passwords are), the only way to serve it.

``<store>/master.json`` (0600) holds both; `save` replaces it atomically, `load` reads it on every
attempt, so ``kmsctl master set-password`` takes effect without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from kms.auth.passwords import StoreKey, dummy_verify, hash_password, verify_password
from kms.fsutil import replace_file

MASTER_PROTOCOLS = frozenset({"imap", "pop3"})
_CONTEXT = "master"


@dataclass(frozen=True)
class MasterSecret:
    """What ``master.json`` holds: the PBKDF2 hash and the store-key token; never in repr."""

    hash: str = field(repr=False)
    token: str = field(repr=False)


def may_use_master(enabled: bool, in_group: bool, protocol: str) -> bool:
    """Whether a client may try the master password at all: enabled, in the group, IMAP or POP3."""
    return enabled and in_group and protocol in MASTER_PROTOCOLS


def digest_matches(challenge: str, password: str, answer: str) -> bool:
    """X-MASTERAUTH: is ``answer`` the hex MD5 of ``challenge`` followed by ``password``?"""
    expected = hashlib.md5((challenge + password).encode("utf-8")).hexdigest()
    return hmac.compare_digest(expected.encode(), answer.strip().lower().encode("ascii", "replace"))


def new_challenge(hostname: str) -> str:
    return f"<{secrets.token_hex(12)}@{hostname}>"


def save(path: Path, password: str, key: StoreKey) -> None:
    """Store ``password`` hashed (and encrypted, for X-MASTERAUTH); slow (PBKDF2)."""
    if not password:
        raise ValueError("empty master password")
    data = {"hash": hash_password(password), "token": key.encrypt(password, _CONTEXT)}
    replace_file(path, json.dumps(data).encode("utf-8"), 0o600)


def load(path: Path) -> MasterSecret | None:
    """The stored master secret, or None when no master password was ever set."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return MasterSecret(str(data["hash"]), str(data["token"]))


class Master:
    """The server's master password checks; file reads, PBKDF2 and decryption in the auth pool."""

    def __init__(
        self,
        path: Path,
        key: StoreKey,
        in_group: Callable[[str], bool],
        find_user: Callable[[str], str | None],
        pool: ThreadPool,
        reactor: Any,
    ) -> None:
        """``find_user`` (blocking) gives the address of an enabled local user for a login name."""
        self._path = path
        self._find_user = find_user
        self._key = key
        self.in_group = in_group
        self._pool = pool
        self._reactor = reactor

    def check_password(self, password: str) -> Deferred[bool]:
        def check() -> bool:
            secret = load(self._path)
            if secret is None:
                return dummy_verify(password)
            return verify_password(secret.hash, password)

        return deferToThreadPool(self._reactor, self._pool, check)

    def check_digest(self, challenge: str, answer: str) -> Deferred[bool]:
        def check() -> bool:
            secret = load(self._path)
            if secret is None:
                return False
            return digest_matches(challenge, self._key.decrypt(secret.token, _CONTEXT), answer)

        return deferToThreadPool(self._reactor, self._pool, check)

    def user(self, username: str) -> Deferred[str | None]:
        """The mailbox a master login as ``username`` opens, or None (unknown or disabled)."""
        return deferToThreadPool(self._reactor, self._pool, self._find_user, username)
