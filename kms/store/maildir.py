"""Maildir layout and durable delivery.

Twisted's maildir code is unusable (no fsync, broken on Python 3; see the audit §4.1), so this is
our own.  A user's maildir is ``<store>/mail/<domain>/<localpart>/`` with ``tmp/ new/ cur/``
(Maildir++: sub-folders are ``.Name`` directories inside it).

Delivery is what "250 OK" promises: each copy is written in ``tmp/``, fsync'd, renamed into
``new/``, and ``new/`` is fsync'd, all before the Deferred fires.  Creating an inode costs about
1 ms here, so the work runs on dedicated threads that group-commit: each takes its share of the
pending jobs (up to a batch), and a directory shared by the batch is fsync'd once, not per file.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

from kms.fsutil import fsync_dir, write_all

_MAX_PART = 255  # bytes: the usual file-name limit
_CHUNK = 1 << 16
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def mailbox_path(mail_root: Path, address: str) -> Path:
    """The maildir root of ``address`` under ``mail_root``; the only place an address becomes a path.

    Refuses (ValueError) anything that could name another directory: separators, NUL and control
    characters, leading dots (``.x`` would look like a Maildir++ folder), ``..``, over-long parts,
    and any result that resolves (through symlinks too) outside ``mail_root``.
    """
    lowered = address.lower()
    if lowered.count("@") != 1:
        raise ValueError(f"address must contain exactly one '@': {address!r}")
    local, domain = lowered.split("@")
    for part in (local, domain):
        _check_part(part, address)
    path = mail_root / domain / local
    root = mail_root.resolve()
    resolved = path.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise ValueError(f"address leaves the mail root: {address!r}")
    return path


def _check_part(part: str, address: str) -> None:
    if not part:
        raise ValueError(f"empty local part or domain: {address!r}")
    if part.startswith(".") or ".." in part:
        raise ValueError(f"dot not allowed there: {address!r}")
    if any(c in "/\\" or unicodedata.category(c) in ("Cc", "Cs") for c in part):
        raise ValueError(f"forbidden character: {address!r}")
    if len(part.encode("utf-8")) > _MAX_PART:
        raise ValueError(f"part longer than {_MAX_PART} bytes: {address!r}")


def ensure_maildir(root: Path) -> None:
    """Create ``root`` and its ``tmp/ new/ cur/`` (0700) if missing; idempotent and race-safe.

    Blocking (mkdir, fsync): call it from a thread, not the reactor.  Each directory it creates is
    made durable by fsyncing its parent, so a delivery acknowledged later cannot lose its folder.
    """
    missing: list[Path] = []
    current = root
    while not current.is_dir():
        missing.append(current)
        current = current.parent
    for directory in [*reversed(missing), root / "tmp", root / "new", root / "cur"]:
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue
        fsync_dir(directory.parent)


def sanitize_hostname(hostname: str) -> str:
    """Escape the characters that would break a maildir name (``/``, ``:`` and the ``,`` of ``,S=``)."""
    return hostname.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


def maildir_name(
    seconds: int, microseconds: int, pid: int, counter: int, random_hex: str, hostname: str
) -> str:
    """A unique maildir base name: ``<secs>.M<usec>P<pid>Q<counter>R<random>.<host>``."""
    return f"{seconds}.M{microseconds}P{pid}Q{counter}R{random_hex}.{sanitize_hostname(hostname)}"


class _NameSource:
    """Fresh names for this process; the counter and random part keep threads and restarts apart."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._host = socket.gethostname()
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        seconds, microseconds = divmod(time.time_ns() // 1000, 1_000_000)
        return maildir_name(
            seconds, microseconds, self._pid, next(self._counter), secrets.token_hex(4), self._host
        )


class SpoolSource(Protocol):
    """Anything that can hand out a reader of the message body from its start (a `MessageSpool`)."""

    def open(self) -> BinaryIO: ...


@dataclass(frozen=True)
class Copy:
    """One copy to deliver: ``header`` (e.g. Received, X-Envelope-To) then the spool's body."""

    maildir: Path
    header: bytes
    spool: SpoolSource


@dataclass(eq=False)
class _Job:
    copies: Sequence[Copy]
    deferred: Deferred[list[Path]] = field(default_factory=Deferred)


class MaildirWriter(Service):
    """Durable group-commit delivery on ``workers`` dedicated threads (not the reactor's pool).

    Dedicated threads keep slow disks from starving DNS and other users of the shared pool.
    Also a Twisted `Service`: ``startService``/``stopService`` call `start`/`stop`.
    """

    def __init__(self, reactor: IReactorFromThreads, workers: int = 4, max_batch: int = 64) -> None:
        if workers < 1 or max_batch < 1:
            raise ValueError("workers and max_batch must be at least 1")
        self._call_from_thread = reactor.callFromThread  # type: ignore[misc]  # zope interface, no plugin
        self._workers = workers
        self._max_batch = max_batch
        self._names = _NameSource()
        self._cond = threading.Condition()
        self._pending: deque[_Job] = deque()
        self._stopping = False
        self._live = 0
        self._idle = 0  # workers waiting for work; guarded by _cond
        self._stop_waiters: list[Deferred[None]] = []

    def start(self) -> None:
        """Start the worker threads."""
        if self._live:
            raise RuntimeError("MaildirWriter already running")
        self._stopping = False
        self._idle = 0
        self._live = self._workers
        for i in range(self._workers):
            threading.Thread(target=self._work, name=f"kms-maildir-{i}", daemon=True).start()

    def stop(self) -> Deferred[None]:
        """Refuse new work; fire once every accepted delivery has fired and the threads have ended."""
        if not self._live:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        return waiter

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.stop()

    def deliver(self, copies: Sequence[Copy]) -> Deferred[list[Path]]:
        """Fire with the final ``new/`` paths (in order) once all copies and their directories are
        fsync'd.  On failure nothing of this call stays in ``tmp/`` or ``new/``."""
        if not self._live or self._stopping:
            return fail(RuntimeError("MaildirWriter is not running"))
        if not copies:
            return succeed([])
        job = _Job(list(copies))
        with self._cond:
            self._pending.append(job)
            self._cond.notify()
        return job.deferred

    def _work(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    break
                # Share the backlog with the other idle workers: fsyncs running in parallel threads
                # join one journal commit, while fsyncs in one thread's batch are paid one by one.
                share = min(-(-len(self._pending) // self._idle), self._max_batch)
                self._idle -= 1
                batch = [self._pending.popleft() for _ in range(share)]
            self._call_from_thread(self._finish, _commit_batch(batch, self._names))
        self._call_from_thread(self._worker_ended)

    def _finish(self, outcomes: list[tuple[_Job, list[Path] | Failure]]) -> None:
        for job, outcome in outcomes:
            if isinstance(outcome, Failure):
                job.deferred.errback(outcome)
            else:
                job.deferred.callback(outcome)

    def _worker_ended(self) -> None:
        self._live -= 1
        if not self._live:
            waiters, self._stop_waiters = self._stop_waiters, []
            for waiter in waiters:
                waiter.callback(None)


# A batch keeps at most this many written-but-not-yet-fsync'd files open before syncing them.
_MAX_UNSYNCED = 256


@dataclass
class _Staged:
    """One job's copies in ``tmp/``: written, then fsync'd together with the rest of the batch."""

    job: _Job
    files: list[tuple[Path, Path]] = field(default_factory=list)  # (tmp, final)
    fds: list[int] = field(default_factory=list)  # written, not yet fsync'd and closed
    failure: Failure | None = None

    def fail(self) -> None:
        """Record the current exception; close and remove everything of this job (tmp and new/)."""
        self.failure = Failure()
        _close_all(self.fds)
        self.fds = []
        _unlink_all(tmp for tmp, _ in self.files)
        _unlink_all(final for _, final in self.files)


def _commit_batch(jobs: Sequence[_Job], names: Callable[[], str]) -> list[tuple[_Job, list[Path] | Failure]]:
    """Blocking: write every copy, fsync them all, rename them all, fsync each distinct ``new/`` once.

    Writing the whole batch before the first fsync lets the file system commit the batch in one
    journal transaction: the first fsync pays for it, the others find their data already on disk.
    A failing job is rolled back alone (its tmp files and already-renamed copies removed), so a
    client retry after the error reply does not duplicate the message.
    """
    staged: list[_Staged] = []
    unsynced = 0
    for job in jobs:
        entry = _Staged(job)
        staged.append(entry)
        try:
            for copy in job.copies:
                name = names()
                tmp = copy.maildir / "tmp" / name
                fd, size = _write_file(tmp, copy)
                entry.fds.append(fd)
                entry.files.append((tmp, copy.maildir / "new" / f"{name},S={size}"))
        except Exception:  # noqa: BLE001 - any error fails its own job only, carried in the Failure
            entry.fail()
        unsynced += len(entry.fds)
        if unsynced >= _MAX_UNSYNCED:
            _sync(staged)
            unsynced = 0
    _sync(staged)
    for entry in staged:
        if entry.failure is None:
            try:
                for tmp, final in entry.files:
                    os.rename(tmp, final)
            except Exception:  # noqa: BLE001
                entry.fail()
    published = [e for e in staged if e.failure is None]
    broken: dict[Path, Failure] = {}
    for directory in {final.parent for e in published for _, final in e.files}:
        try:
            fsync_dir(directory)
        except OSError:
            broken[directory] = Failure()
    outcomes: list[tuple[_Job, list[Path] | Failure]] = []
    for entry in staged:
        if entry.failure is None:
            failure = next((broken[f.parent] for _, f in entry.files if f.parent in broken), None)
            if failure is not None:
                _unlink_all(final for _, final in entry.files)
                entry.failure = failure
        if entry.failure is None:
            outcomes.append((entry.job, [final for _, final in entry.files]))
        else:
            outcomes.append((entry.job, entry.failure))
    return outcomes


def _sync(staged: Sequence[_Staged]) -> None:
    """fsync and close every file still open; a failed fsync fails (and rolls back) its job."""
    for entry in staged:
        if not entry.fds:
            continue
        try:
            for fd in entry.fds:
                os.fsync(fd)
        except OSError:
            entry.fail()
        else:
            _close_all(entry.fds)
            entry.fds = []


def _write_file(path: Path, copy: Copy) -> tuple[int, int]:
    """Create ``path`` exclusively and write header+body; the open fd (for a later fsync) and size.

    A missing maildir (new mailbox, or folders removed under us) is created and the write retried.
    On any error the file is closed and removed.
    """
    try:
        fd = os.open(path, _CREATE, 0o600)
    except FileNotFoundError:
        ensure_maildir(copy.maildir)
        fd = os.open(path, _CREATE, 0o600)
    try:
        with copy.spool.open() as body:
            chunk = copy.header + body.read(_CHUNK)  # one write for the common small message
            size = 0
            while chunk:
                write_all(fd, chunk)
                size += len(chunk)
                chunk = body.read(_CHUNK)
    except BaseException:
        os.close(fd)
        _unlink_all([path])
        raise
    return fd, size


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _unlink_all(paths: Iterable[Path]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass  # best effort: the error that brought us here is the one to report
