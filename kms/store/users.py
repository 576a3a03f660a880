"""The embedded user database: one SQLite file, ``<store>/users.db``, shared by the server and kmsctl.

WAL mode and a busy timeout let kmsctl change users while the server reads them.  The schema is
versioned with ``PRAGMA user_version`` and created or upgraded on first use inside one immediate
transaction, so two processes opening a store at once do not both change it.  Version 2 added SCRAM
keys: users from before have none until their password is next set.  Calls block (disk, and the
password hashing in `add`/`set_password`): the server makes them from a thread pool.
"""

from __future__ import annotations

import hmac
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kms.auth.credentials import UserSecrets
from kms.auth.passwords import (
    ScramKeys,
    StoreKey,
    hash_password,
    parse_hash,
    parse_scram,
    scram_keys,
    scram_keys_from_salted,
    verify_password,
)
from kms.fsutil import create_private_file

STORAGES = ("des", "sha", "directory")
# Each entry takes the schema from its index to the next version, in one transaction.
_MIGRATIONS = (
    """
    CREATE TABLE users (
        address TEXT PRIMARY KEY NOT NULL,
        storage TEXT NOT NULL CHECK (storage IN ('des', 'sha', 'directory')),
        secret  TEXT NOT NULL,
        enabled INTEGER NOT NULL DEFAULT 1,
        created REAL NOT NULL,
        changed REAL NOT NULL
    ) WITHOUT ROWID
    """,
    "ALTER TABLE users ADD COLUMN scram TEXT",
)
SCHEMA_VERSION = len(_MIGRATIONS)
_COLUMNS = "address, storage, secret, enabled, created, changed, scram"

_MAX_ADDRESS = 254
_MAX_LOCAL = 64
_MAX_LABEL = 63
# Never in an address we store: path separators (addresses become maildir names), quoting.
_FORBIDDEN = frozenset('/\\"')


class DuplicateUser(Exception):
    """`UserDB.add` for an address that already has a user."""


class NoSuchUser(LookupError):
    """A change to an address that has no user."""


@dataclass(frozen=True)
class UserRecord:
    """One row of the user DB; ``secret`` (a des token or sha hash) and ``scram`` stay out of repr."""

    address: str
    storage: str
    secret: str = field(repr=False)
    enabled: bool
    created: float
    changed: float
    scram: str | None = field(default=None, repr=False)  # `ScramKeys.encode`; None before schema 2


def normalize_address(address: str) -> str:
    """The canonical lower-case ``local@domain``, or ValueError saying what is wrong with it."""
    address = address.lower()
    if len(address) > _MAX_ADDRESS:
        raise ValueError(f"address longer than {_MAX_ADDRESS} characters")
    if any(not c.isprintable() or c.isspace() for c in address):
        raise ValueError("address contains whitespace or control characters")
    if address.count("@") != 1:
        raise ValueError(f"address must be local@domain with exactly one '@': {address!r}")
    bad = _FORBIDDEN.intersection(address)
    if bad:
        raise ValueError(f"address contains forbidden character(s) {''.join(sorted(bad))!r}")
    local, domain = address.split("@")
    if not local or len(local) > _MAX_LOCAL:
        raise ValueError(f"local part must be 1-{_MAX_LOCAL} characters: {address!r}")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise ValueError(f"local part has a misplaced dot: {address!r}")
    return f"{local}@{normalize_domain(domain)}"


def normalize_domain(domain: str) -> str:
    """The lower-case domain name, or ValueError: labels of letters, digits and inner hyphens."""
    domain = domain.lower()
    labels = domain.split(".")
    for label in labels:
        if not label or len(label) > _MAX_LABEL:
            raise ValueError(f"domain has an empty or over-long label: {domain!r}")
        if label.startswith("-") or label.endswith("-") or not label.replace("-", "").isalnum():
            raise ValueError(f"domain label {label!r} is not letters, digits and inner hyphens")
    return domain


def make_secret(address: str, password: str | None, storage: str, key: StoreKey) -> tuple[str, str | None]:
    """What `UserDB` stores for ``password`` under ``storage``: the secret and the SCRAM keys.

    Slow (one PBKDF2): run it off the reactor.
    """
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}, not {storage!r}")
    if storage == "directory":
        if password is not None:
            raise ValueError("directory users have no local password")
        return "", None
    if not password:
        raise ValueError("password must not be empty")
    if storage == "des":
        return key.encrypt(password, address), scram_keys(password).encode()
    stored = hash_password(password)
    h = parse_hash(stored)
    return stored, scram_keys_from_salted(h.salted, h.salt, h.iterations).encode()


def check_password(record: UserRecord, password: str, key: StoreKey) -> bool:
    """Whether ``password`` is the user's local password; always False for directory users.

    Ignores ``enabled``: that is the checker's decision.  `InvalidToken` from a des secret that does
    not decrypt (a different store key) propagates, because it is a server fault, not a wrong password.
    """
    if record.storage == "sha":
        return verify_password(record.secret, password)
    if record.storage == "des":
        stored = key.decrypt(record.secret, record.address)
        return hmac.compare_digest(stored.encode("utf-8"), password.encode("utf-8"))
    return False


def reversible_password(record: UserRecord, key: StoreKey) -> str | None:
    """The plaintext password of a ``des`` user (CRAM-MD5, DIGEST-MD5, NTLM, APOP need it), else None."""
    if record.storage != "des":
        return None
    return key.decrypt(record.secret, record.address)


def user_secrets(record: UserRecord, key: StoreKey) -> UserSecrets:
    """What a challenge-response check can use for this user (`kms.auth.credentials`).

    `InvalidToken` (des secret from another key) and ValueError (corrupt SCRAM keys) propagate:
    both are server faults, never a wrong password.
    """
    scram: ScramKeys | None = None
    if record.scram is not None and record.storage != "directory":
        scram = parse_scram(record.scram)
    return UserSecrets(record.address, reversible_password(record, key), scram)


def _record(row: tuple[str, str, str, int, float, float, str | None]) -> UserRecord:
    address, storage, secret, enabled, created, changed, scram = row
    return UserRecord(address, storage, secret, bool(enabled), created, changed, scram)


class UserDB:
    """The users of ``path`` (created 0600 with its schema on first use).

    One connection guarded by a lock, so any thread of a pool may call any method; WAL keeps the
    lock short, because readers never wait for kmsctl's writes.  ``busy_timeout`` (seconds) is how
    long a call waits for another process's lock before failing with "database is locked".
    """

    def __init__(self, path: Path, now: Callable[[], float] = time.time, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._now = now
        self._lock = threading.Lock()
        create_private_file(path)
        self._conn = sqlite3.connect(
            path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def __repr__(self) -> str:
        return f"<UserDB {str(self.path)!r}>"

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"{self.path}: schema version {version} is newer than this kms")
            for step in _MIGRATIONS[version:]:
                db.execute(step)
            if version != SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def add(self, address: str, password: str | None, storage: str, key: StoreKey) -> UserRecord:
        """Create a user (``password`` None for directory users); `DuplicateUser` if the address is taken."""
        address = normalize_address(address)
        secret, scram = make_secret(address, password, storage, key)
        now = self._now()
        try:
            with self._transaction() as db:
                db.execute(
                    f"INSERT INTO users ({_COLUMNS}) VALUES (?, ?, ?, 1, ?, ?, ?)",
                    (address, storage, secret, now, now, scram),
                )
        except sqlite3.IntegrityError as e:
            raise DuplicateUser(address) from e
        return UserRecord(address, storage, secret, True, now, now, scram)

    def set_password(self, address: str, password: str | None, storage: str, key: StoreKey) -> UserRecord:
        """Replace a user's password, SCRAM keys and storage class; `NoSuchUser` if there is none."""
        address = normalize_address(address)
        secret, scram = make_secret(address, password, storage, key)
        return self._update(address, "storage = ?, secret = ?, scram = ?", (storage, secret, scram))

    def set_enabled(self, address: str, enabled: bool) -> UserRecord:
        """Enable or disable an account (a disabled one cannot log in, whatever the password)."""
        return self._update(normalize_address(address), "enabled = ?", (int(enabled),))

    def _update(self, address: str, assignments: str, values: tuple[object, ...]) -> UserRecord:
        with self._transaction() as db:
            rows = db.execute(
                f"UPDATE users SET {assignments}, changed = ? WHERE address = ? RETURNING {_COLUMNS}",
                (*values, self._now(), address),
            ).fetchall()
        if not rows:
            raise NoSuchUser(address)
        return _record(rows[0])

    def delete(self, address: str) -> bool:
        """Remove a user; False if there was none."""
        address = normalize_address(address)
        with self._transaction() as db:
            return db.execute("DELETE FROM users WHERE address = ?", (address,)).rowcount > 0

    def get(self, address: str) -> UserRecord | None:
        """The user with this address (any case), or None; ValueError for a malformed address."""
        address = normalize_address(address)
        with self._lock:
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM users WHERE address = ?", (address,)).fetchone()
        return None if row is None else _record(row)

    def list(self) -> list[UserRecord]:
        """Every user, sorted by address."""
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM users ORDER BY address").fetchall()
        return [_record(row) for row in rows]

    def close(self) -> None:
        """Close the connection; the object is unusable afterwards."""
        with self._lock:
            self._conn.close()
