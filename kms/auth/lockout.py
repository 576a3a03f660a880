"""Account lockout (SPEC §6): failed logins counted per (account, IP), locks that end by themselves.

The decisions are pure functions (`count_failure`, `refuses`), table-tested; `LockoutDB` keeps the
state in ``<store>/lockout.db`` (SQLite in WAL mode, like ``users.db``), so locks survive a restart
and ``kmsctl lockout unlock`` works while the server runs; `Lockout` is the server's asynchronous
face, running every database call in the auth thread pool.

Lockout is not meant to be turned against the owner of an account:

* a lock belongs to the IP that caused it; with ``exempt_known_ips`` an IP that logged in to the
  account in the last 30 days, and an IP of ``[security] exception_group``, is not refused by a
  lock some other IP caused;
* the same wrong password sent again counts once: a keyed hash (HMAC-SHA256 with a random key kept
  in the database) of the last wrong passwords per (account, IP) is kept, never the password;
* a success resets that IP's count; failures older than ``unlock_after`` are forgotten.

Temporary failures never reach this module (the login session does not count them).  A full
disk does not stop logins: what cannot be written is left out, and said in error.log now and then.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from kms.fsutil import create_private_file
from kms.logs import Logs
from kms.store.space import Throttle, sqlite_out_of_space

KNOWN_IP_PERIOD = 30 * 24 * 3600.0
UNSAVED_REPORT_INTERVAL = 300.0  # a full disk fails every login's record: one error.log line per 5 min
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE failures (
    account TEXT NOT NULL, ip TEXT NOT NULL, count INTEGER NOT NULL, digests TEXT NOT NULL,
    updated REAL NOT NULL, PRIMARY KEY (account, ip)
) WITHOUT ROWID;
CREATE TABLE locks (
    account TEXT NOT NULL, ip TEXT NOT NULL, since REAL NOT NULL, until REAL NOT NULL,
    PRIMARY KEY (account, ip)
) WITHOUT ROWID;
CREATE TABLE successes (
    account TEXT NOT NULL, ip TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (account, ip)
) WITHOUT ROWID;
CREATE TABLE meta (name TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL) WITHOUT ROWID;
"""
T = TypeVar("T")


@dataclass(frozen=True)
class Counter:
    """Failures of one account from one IP: how many, the keyed hashes of their passwords, when."""

    count: int
    digests: tuple[str, ...]
    updated: float


@dataclass(frozen=True)
class Lock:
    """A lock of ``account`` caused by ``ip``, from ``since`` to ``until`` (Unix times)."""

    account: str
    ip: str
    since: float
    until: float


def count_failure(
    counter: Counter | None, digest: str | None, now: float, window: float, attempts: int
) -> tuple[Counter, bool]:
    """The counter after one more failure, and whether it reaches ``attempts`` (lock now).

    ``digest`` is the keyed hash of the wrong password, or None when there is none to compare (a
    challenge answer differs every time): a digest already counted does not count again.  A
    counter not touched for ``window`` seconds starts over.
    """
    if counter is None or now - counter.updated >= window:
        counter = Counter(0, (), now)
    if digest is not None and digest in counter.digests:
        return Counter(counter.count, counter.digests, now), False
    digests = counter.digests if digest is None else (*counter.digests, digest)[-max(attempts, 1) :]
    updated = Counter(counter.count + 1, digests, now)
    return updated, updated.count >= attempts


def refuses(
    locks: list[Lock], ip: str, now: float, known: bool, excepted: bool, exempt_known_ips: bool
) -> bool:
    """Whether a login to an account with ``locks`` is refused for a client at ``ip``.

    ``known``: the IP logged in to this account in the last 30 days; ``excepted``: it is in
    ``[security] exception_group``.  Either exempts it, with ``exempt_known_ips``, from locks that
    other IPs caused, never from one it caused itself.
    """
    active = [lock for lock in locks if lock.until > now]
    if not active:
        return False
    if any(lock.ip == ip for lock in active):
        return True
    return not (exempt_known_ips and (known or excepted))


class LockoutDB:
    """The lockout state in one SQLite file, shared by the server and kmsctl.  Calls block."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO meta VALUES ('hmac', ?)", (os.urandom(32),))
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._hmac_key: bytes = db.execute("SELECT value FROM meta WHERE name = 'hmac'").fetchone()[0]

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            create_private_file(self.path)
            connection = sqlite3.connect(
                self.path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA busy_timeout = 10000")
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back itself (a full disk)
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        self._local = threading.local()

    def digest(self, account: str, password: str) -> str:
        """The keyed hash that recognises a repeated wrong password without keeping it."""
        message = f"{account}\0{password}".encode("utf-8", "surrogatepass")
        return hmac.new(self._hmac_key, message, hashlib.sha256).hexdigest()

    def locks(self, account: str | None = None) -> list[Lock]:
        db = self._connection()
        if account is None:
            rows = db.execute(
                "SELECT account, ip, since, until FROM locks ORDER BY account, since"
            ).fetchall()
        else:
            rows = db.execute(
                "SELECT account, ip, since, until FROM locks WHERE account = ? ORDER BY since", (account,)
            ).fetchall()
        return [Lock(*row) for row in rows]

    def known(self, account: str, ip: str, now: float) -> bool:
        row = (
            self._connection()
            .execute("SELECT at FROM successes WHERE account = ? AND ip = ?", (account, ip))
            .fetchone()
        )
        return row is not None and now - row[0] < KNOWN_IP_PERIOD

    def expire(self, now: float) -> list[Lock]:
        """Remove the locks that have ended; returns them (for the security log)."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT account, ip, since, until FROM locks WHERE until <= ?", (now,)
            ).fetchall()
            db.execute("DELETE FROM locks WHERE until <= ?", (now,))
        return [Lock(*row) for row in rows]

    def fail(
        self, account: str, ip: str, password: str | None, now: float, window: float, attempts: int
    ) -> Lock | None:
        """Count one failure; the new lock if it locks the account, else None."""
        digest = None if password is None else self.digest(account, password)
        with self._transaction() as db:
            row = db.execute(
                "SELECT count, digests, updated FROM failures WHERE account = ? AND ip = ?", (account, ip)
            ).fetchone()
            counter = None if row is None else Counter(row[0], tuple(filter(None, row[1].split(","))), row[2])
            counter, lock_now = count_failure(counter, digest, now, window, attempts)
            if lock_now:
                db.execute("DELETE FROM failures WHERE account = ? AND ip = ?", (account, ip))
                lock = Lock(account, ip, now, now + window)
                db.execute("INSERT OR REPLACE INTO locks VALUES (?, ?, ?, ?)", (account, ip, now, lock.until))
                return lock
            db.execute(
                "INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?)",
                (account, ip, counter.count, ",".join(counter.digests), counter.updated),
            )
        return None

    def succeed(self, account: str, ip: str, now: float) -> None:
        """A success: that IP's count starts over, and the IP is known to the account for 30 days."""
        with self._transaction() as db:
            db.execute("DELETE FROM failures WHERE account = ? AND ip = ?", (account, ip))
            db.execute("INSERT OR REPLACE INTO successes VALUES (?, ?, ?)", (account, ip, now))
            db.execute("DELETE FROM successes WHERE at < ?", (now - KNOWN_IP_PERIOD,))

    def unlock(self, account: str | None = None) -> list[Lock]:
        """Remove the locks of ``account`` (all accounts for None) and their counters."""
        with self._transaction() as db:
            if account is None:
                rows = db.execute("SELECT account, ip, since, until FROM locks").fetchall()
                db.execute("DELETE FROM locks")
                db.execute("DELETE FROM failures")
            else:
                rows = db.execute(
                    "SELECT account, ip, since, until FROM locks WHERE account = ?", (account,)
                ).fetchall()
                db.execute("DELETE FROM locks WHERE account = ?", (account,))
                db.execute("DELETE FROM failures WHERE account = ?", (account,))
        return [Lock(*row) for row in rows]


@dataclass(frozen=True)
class LockoutSettings:
    """``[lockout]``, and whether an IP is in ``[security] exception_group``."""

    attempts: int
    unlock_after: float
    exempt_known_ips: bool
    excepted: Callable[[str], bool]
    default_domain: str = ""
    # The directory's one account for a login name in another of its forms (None: not one).
    directory_account: Callable[[str], str | None] | None = None


def account_name(username: str, default_domain: str) -> str:
    """The account a login names, as the counters key it: lower case, with the default domain."""
    name = username.strip().lower()
    if "@" not in name and default_domain:
        name = f"{name}@{default_domain.lower()}"
    return name


class Lockout:
    """The server's lockout: `LockoutDB` calls in the auth pool, time from ``clock``.

    With ``logs``, a record that a full disk keeps from being written does not fail the login:
    it is left out (a failure then goes uncounted, an ended lock stays until it can be removed,
    which refuses no one) and error.log gets one ``lockout-not-saved`` line per 5 minutes.
    """

    def __init__(
        self,
        db: LockoutDB,
        settings: LockoutSettings,
        pool: ThreadPool,
        reactor: Any,
        clock: IReactorTime,
        logs: Logs | None = None,
    ) -> None:
        self._db = db
        self._settings = settings
        self._pool = pool
        self._reactor = reactor
        self._clock = clock
        self._logs = logs
        self._unsaved = Throttle(clock, UNSAVED_REPORT_INTERVAL)

    def account(self, username: str) -> str:
        """The key a login's failures are counted under: one per account, whatever name form."""
        settings = self._settings
        if settings.directory_account is not None:
            account = settings.directory_account(username)
            if account is not None:
                return account
        return account_name(username, settings.default_domain)

    def _run(self, func: Callable[..., T], *args: object) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, func, *args)

    def check(self, account: str, ip: str) -> Deferred[tuple[bool, list[Lock]]]:
        """Whether ``ip`` is refused for ``account`` now, and the locks that ended meanwhile."""
        now = self._clock.seconds()
        settings = self._settings

        def decide() -> tuple[bool, list[Lock], Exception | None]:
            unsaved = None
            try:
                expired = self._db.expire(now)
            except sqlite3.Error as e:  # ended locks are ignored by `refuses` all the same
                if self._logs is None or not sqlite_out_of_space(e):
                    raise
                expired, unsaved = [], e
            locks = self._db.locks(account)
            if not locks:
                return False, expired, unsaved
            known = settings.exempt_known_ips and self._db.known(account, ip, now)
            refused = refuses(locks, ip, now, known, settings.excepted(ip), settings.exempt_known_ips)
            return refused, expired, unsaved

        def decided(result: tuple[bool, list[Lock], Exception | None]) -> tuple[bool, list[Lock]]:
            refused, expired, unsaved = result
            if unsaved is not None:
                self._not_saved(Failure(unsaved), "expired locks")
            return refused, expired

        return self._run(decide).addCallback(decided)

    def failed(self, account: str, ip: str, password: str | None) -> Deferred[Lock | None]:
        s = self._settings
        d = self._run(self._db.fail, account, ip, password, self._clock.seconds(), s.unlock_after, s.attempts)
        return d.addErrback(self._not_saved, "failed login")

    def succeeded(self, account: str, ip: str) -> Deferred[None]:
        d = self._run(self._db.succeed, account, ip, self._clock.seconds())
        return d.addErrback(self._not_saved, "successful login")

    def _not_saved(self, failure: Failure, record: str) -> None:
        """A full disk: go on without the record, in one error.log line (no traceback) per interval."""
        if self._logs is None or failure.value is None or not sqlite_out_of_space(failure.value):
            failure.raiseException()
        held = self._unsaved.due()
        if held is not None:
            self._logs.error(
                "lockout-not-saved",
                level="error",
                record=record,
                error=failure.getErrorMessage(),
                left_out=held,
                detail=f"{self._db.path}: the disk is full; logins go on, lockout records are left out",
            )
