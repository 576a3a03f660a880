"""The outbound queue on disk: one envelope and one body per message, each entry under its own lock.

Layout of ``<store>/queue`` (folder 0700, files 0600)::

    <id>.msg          the message as it will be sent (our Received header first), written once
    <id>.json         the envelope: every `QueueEntry` field, per-recipient state, "version"
    <id>.lock         the entry's lock file (``flock``), removed with the entry
    <id>.msg.tmp      a body or envelope being written (gone after a clean write or a recovery)
    <id>.json.tmp
    .flush            touched by ``kmsctl queue flush``: the runner scans at once
    damaged/          envelopes we cannot use, moved aside with their body for the administrator

Why this shape: the body is written and fsync'd before its envelope is renamed into place, and the
envelope is what makes an entry exist, so a crash at any point leaves either no entry (at most a
``.tmp`` or a body without envelope, both removed when the store is opened) or a complete one.
`remove` unlinks the envelope first for the same reason.  An envelope without its body, or one we
cannot parse, is not something a crash of ours produces (damage, a manual edit, a newer format): it
is reported and moved to ``damaged/``, never silently dropped and never retried forever.

Two processes use the queue at once (the server and kmsctl).  Every change to an existing entry is
made under its lock, taken without waiting (`try_lock` raises `EntryBusy`), so kmsctl never edits an
entry the runner is delivering and the runner never sends one kmsctl is deleting.  Readers
(`entries`, `get`) take no lock: envelopes are replaced by rename, so a reader sees the old or the
new one, never half of one.  A holder must `get` the entry again once it has the lock.

Everything here is synchronous and blocking (fsync): the server calls it from a thread pool.
Envelopes are JSON, never pickle, and are read as hostile input: size, counts, types and characters
are checked, and anything else makes the entry "damaged".
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from twisted.logger import Logger

from kms.fsutil import fsync_dir, replace_file
from kms.queue.interfaces import STATES, QueuedRecipient, QueueEntry

FORMAT_VERSION = 1
MAX_ENVELOPE_BYTES = 16 << 20
MAX_RECIPIENTS = 50_000
MAX_ADDRESS = 1024  # generous: RFC 5321 paths stop at 256 octets, SMTPUTF8 ones are longer in characters
MAX_TEXT = 4096
FLUSH_MARKER = ".flush"
DAMAGED = "damaged"

_ID = re.compile(r"[A-Za-z0-9]{1,64}")
_NAME = re.compile(r"([A-Za-z0-9]{1,64})\.(json|msg|lock|json\.tmp|msg\.tmp)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_STATUS = re.compile(r"(?:[245]\.\d{1,3}\.\d{1,3})?")
_NOTIFY = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})
_CHUNK = 1 << 16

_log = Logger()


class EntryBusy(Exception):
    """Another process (or thread) holds the entry's lock: it is being delivered or edited."""


class NoSuchEntry(LookupError):
    """No envelope with that id (never queued, or already delivered, bounced or deleted)."""


class DamagedEntry(Exception):
    """The envelope exists but cannot be used; ``str()`` says why."""


def check_id(entry_id: str) -> str:
    """The id itself when it is safe as a file name (ASCII letters and digits, 1-64), else ValueError."""
    if not isinstance(entry_id, str) or not _ID.fullmatch(entry_id):
        raise ValueError(f"invalid queue id {entry_id!r}")
    return entry_id


# --- the envelope format (pure) -------------------------------------------------------------------


def _text(value: object, name: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise DamagedEntry(f"{name}: not a string")
    if len(value) > limit:
        raise DamagedEntry(f"{name}: longer than {limit} characters")
    if _CONTROL.search(value):
        raise DamagedEntry(f"{name}: control character")
    return value


def _opt_text(value: object, name: str, limit: int = MAX_TEXT) -> str | None:
    return None if value is None else _text(value, name, limit)


def _address(value: object, name: str) -> str:
    return _text(value, name, MAX_ADDRESS)


def _recipient_address(value: object, name: str) -> str:
    if not _address(value, name):
        raise DamagedEntry(f"{name}: empty")
    return str(value)


def _count(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 53:
        raise DamagedEntry(f"{name}: not a count")
    return value


def _time(value: object, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise DamagedEntry(f"{name}: not a time")
    return float(value)


def _opt_time(value: object, name: str) -> float | None:
    return None if value is None else _time(value, name)


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise DamagedEntry(f"{name}: not true/false")
    return value


def _choice(value: object, name: str, allowed: frozenset[str] | tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise DamagedEntry(f"{name}: unknown value")
    return value


def _notify(value: object, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > len(_NOTIFY):
        raise DamagedEntry(f"{name}: not a NOTIFY list")
    items = tuple(_choice(v, name, _NOTIFY) for v in value)
    if len(set(items)) != len(items) or ("NEVER" in items and len(items) > 1):
        raise DamagedEntry(f"{name}: not a NOTIFY list")
    return items


def _status(value: object, name: str) -> str:
    if not isinstance(value, str) or not _STATUS.fullmatch(value):
        raise DamagedEntry(f"{name}: not a status code")
    return value


def _ret(value: object, name: str) -> str | None:
    return None if value is None else _choice(value, name, ("FULL", "HDRS"))


# One reader per field: the test suite checks that these tables name exactly the dataclass fields,
# so a field added to the interfaces cannot be silently left out of the envelope.
_RECIPIENT_FIELDS: dict[str, Callable[[object, str], object]] = {
    "address": _recipient_address,
    "state": lambda v, n: _choice(v, n, STATES),
    "notify": _notify,
    "orcpt": lambda v, n: _opt_text(v, n, MAX_ADDRESS + 32),
    "attempts": _count,
    "last_reply": _text,
    "remote_mta": _text,
    "final_time": _opt_time,
    "status": _status,
    "last_attempt": _opt_time,
    "dsn_sent": _flag,
}

_ENTRY_FIELDS: dict[str, Callable[[object, str], object]] = {
    "id": lambda v, n: _text(v, n, 64),
    "sender": _address,
    "recipients": lambda v, n: v,  # checked in decode_entry
    "created": _time,
    "next_attempt": _time,
    "size": _count,
    "attempts": _count,
    "ret": _ret,
    "envid": lambda v, n: _opt_text(v, n, 100),  # RFC 3461 §4.4: at most 100 characters
    "body_8bit": _flag,
    "smtputf8": _flag,
    "client": _text,
    "delay_warned": _flag,
}


def _fields(obj: object, table: dict[str, Callable[[object, str], object]], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DamagedEntry(f"{where}: not an object")
    if set(obj) != set(table):
        missing, extra = sorted(set(table) - set(obj)), sorted(set(obj) - set(table))
        raise DamagedEntry(f"{where}: missing {missing}, unknown {extra}")
    return {name: read(obj[name], f"{where}.{name}") for name, read in table.items()}


def _no_constants(name: str) -> object:
    raise DamagedEntry(f"{name} is not a number")


def decode_entry(data: bytes, expect_id: str | None = None) -> QueueEntry:
    """The entry an envelope file holds; `DamagedEntry` saying why for anything else."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise DamagedEntry(f"envelope larger than {MAX_ENVELOPE_BYTES} bytes")
    try:
        obj = json.loads(data, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DamagedEntry(f"not JSON: {e}") from None
    if not isinstance(obj, dict) or obj.get("version") != FORMAT_VERSION:
        version = obj.get("version") if isinstance(obj, dict) else None
        raise DamagedEntry(f"format version {version!r}, this kms reads {FORMAT_VERSION}")
    obj = {k: v for k, v in obj.items() if k != "version"}
    values = _fields(obj, _ENTRY_FIELDS, "envelope")
    raw = values["recipients"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_RECIPIENTS:
        raise DamagedEntry(f"recipients: not a list of 1 to {MAX_RECIPIENTS}")
    values["recipients"] = [
        QueuedRecipient(**_fields(r, _RECIPIENT_FIELDS, f"recipients[{i}]")) for i, r in enumerate(raw)
    ]
    entry = QueueEntry(**values)
    if not _ID.fullmatch(entry.id) or (expect_id is not None and entry.id != expect_id):
        raise DamagedEntry(f"id {entry.id!r} does not match the file name")
    return entry


def encode_entry(entry: QueueEntry) -> bytes:
    """The envelope file for ``entry``; ValueError when it could not be read back (so an entry that
    `decode_entry` would call damaged is never written)."""
    obj = {"version": FORMAT_VERSION, **asdict(entry)}
    data = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")
    try:
        decode_entry(data, entry.id)
    except DamagedEntry as e:
        raise ValueError(f"queue entry {entry.id!r}: {e}") from None
    return data + b"\n"


# --- the store -------------------------------------------------------------------------------------


class EntryLock:
    """An entry's lock held by this process; release it (or leave the ``with`` block) when done.

    The lock is an ``flock`` on ``<id>.lock``: it dies with the process, so a crash leaves no stale
    lock.  It may be released from another thread than the one that took it.
    """

    def __init__(self, store: QueueStore, entry_id: str, fd: int) -> None:
        self.store = store
        self.id = entry_id
        self._fd: int | None = fd

    def release(self) -> None:
        """Unlock; when the entry no longer exists, remove its lock file first (while still holding it)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        self.store._released(self.id)
        try:
            if not self.store._exists(self.id):
                try:
                    os.unlink(self.store._path(self.id, "lock"))
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)

    def __enter__(self) -> EntryLock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class QueueStore:
    """``<store>/queue``: add, read, change and remove entries (see the module docstring).

    Opening it creates the folder if needed and recovers from a crash (`recover`); ``report`` gets one
    line for each thing found and repaired or moved aside (default: the Twisted log).
    """

    def __init__(self, root: Path, report: Callable[[str], None] | None = None) -> None:
        self.root = root
        self._report = report or (lambda text: _log.warn("{text}", text=text))
        self._held: set[str] = set()
        self._mutex = threading.Lock()
        try:
            root.mkdir(mode=0o700)
        except FileExistsError:
            pass
        self.recover()

    # paths

    def _path(self, entry_id: str, kind: str) -> Path:
        return self.root / f"{entry_id}.{kind}"

    def body_path(self, entry_id: str) -> Path:
        """Where the body of ``entry_id`` is (the bytes to send, Received header first)."""
        return self._path(check_id(entry_id), "msg")

    def _exists(self, entry_id: str) -> bool:
        return self._path(entry_id, "json").exists() or self._path(entry_id, "msg").exists()

    # locks

    def try_lock(self, entry_id: str) -> EntryLock:
        """Take the entry's lock without waiting, or raise `EntryBusy`.  Works for an id with no entry
        (yet): `add` takes it for the id it creates."""
        check_id(entry_id)
        path = self._path(entry_id, "lock")
        for _ in range(3):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise EntryBusy(entry_id) from None
                raise
            # The holder before us may have removed the entry and unlinked this file: then our lock
            # is on a file nobody else will open, and we go again with the path as it is now.
            try:
                current = os.stat(path, follow_symlinks=False)
                ours = os.fstat(fd)
                same = (current.st_dev, current.st_ino) == (ours.st_dev, ours.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                with self._mutex:
                    self._held.add(entry_id)
                return EntryLock(self, entry_id, fd)
            os.close(fd)
        raise EntryBusy(entry_id)

    def _released(self, entry_id: str) -> None:
        with self._mutex:
            self._held.discard(entry_id)

    def _require_lock(self, entry_id: str) -> None:
        with self._mutex:
            if entry_id not in self._held:
                raise RuntimeError(f"queue entry {entry_id}: changed without holding its lock")

    # writing

    def _write_file(self, final: Path, chunks: Iterator[bytes]) -> int:
        """``chunks`` into ``final.tmp``, fsync'd, renamed to ``final``; the bytes written.

        The ``.tmp`` name is what crash recovery looks for (`recover`)."""
        return replace_file(final, chunks, 0o600, tmp=final.with_name(final.name + ".tmp"))

    def add(self, entry: QueueEntry, body_source: BinaryIO | bytes, header: bytes = b"") -> QueueEntry:
        """Queue a new message durably: ``header`` + ``body_source`` as the body, then the envelope,
        then the folder fsync'd.  Returns the entry as stored (``size`` is the body's).

        When this returns, the entry survives a crash; when it raises (disk full, an invalid entry,
        an id already queued), nothing of it is left.  A ``BinaryIO`` is read from where it stands.
        """
        with self.try_lock(entry.id):
            if self._exists(entry.id):
                raise FileExistsError(f"queue entry {entry.id} already exists")
            body, envelope = self._path(entry.id, "msg"), self._path(entry.id, "json")
            try:
                size = self._write_file(body, _chunks(header, body_source))
                stored = replace(entry, size=size)
                self._write_file(envelope, iter([encode_entry(stored)]))
                fsync_dir(self.root)
            except BaseException:
                _unlink(envelope)
                _unlink(body)
                raise
        return stored

    def save(self, entry: QueueEntry) -> None:
        """Replace the envelope of an existing entry atomically and durably; the caller holds its lock."""
        check_id(entry.id)
        self._require_lock(entry.id)
        if not self._path(entry.id, "json").exists():
            raise NoSuchEntry(entry.id)
        self._write_file(self._path(entry.id, "json"), iter([encode_entry(entry)]))
        fsync_dir(self.root)

    def remove(self, entry_id: str) -> None:
        """Delete an entry (envelope first, so a crash leaves at most a body to clean up); the caller
        holds its lock, whose file goes when the lock is released."""
        check_id(entry_id)
        self._require_lock(entry_id)
        envelope = self._path(entry_id, "json")
        if not envelope.exists():
            raise NoSuchEntry(entry_id)
        os.unlink(envelope)
        _unlink(self._path(entry_id, "msg"))
        fsync_dir(self.root)

    # reading

    def _read_envelope(self, entry_id: str) -> bytes:
        try:
            fd = os.open(self._path(entry_id, "json"), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise NoSuchEntry(entry_id) from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise DamagedEntry("envelope is a symbolic link") from None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise DamagedEntry("envelope is not a regular file")
            if info.st_size > MAX_ENVELOPE_BYTES:
                raise DamagedEntry(f"envelope larger than {MAX_ENVELOPE_BYTES} bytes")
            data = bytearray()
            while len(data) <= MAX_ENVELOPE_BYTES:  # the size may change under us: read at most one more
                chunk = os.read(fd, MAX_ENVELOPE_BYTES + 1 - len(data))
                if not chunk:
                    break
                data += chunk
            return bytes(data)
        finally:
            os.close(fd)

    def get(self, entry_id: str) -> QueueEntry:
        """The entry's envelope as stored now: `NoSuchEntry`, or `DamagedEntry` saying why."""
        check_id(entry_id)
        return decode_entry(self._read_envelope(entry_id), entry_id)

    def _inspect(self, entry_id: str) -> QueueEntry | str | None:
        """The entry, or why it is damaged, or None when it is gone."""
        try:
            entry = self.get(entry_id)
        except NoSuchEntry:
            return None
        except DamagedEntry as e:
            return str(e)
        try:
            body = os.lstat(self._path(entry_id, "msg"))
        except FileNotFoundError:
            return "envelope without its body"
        if not stat.S_ISREG(body.st_mode):  # a symbolic link could make us send any file
            return "body is not a regular file"
        return entry

    def entries(self) -> list[QueueEntry]:
        """Every usable entry, in id order; damaged ones are reported and moved aside, never fatal."""
        found = []
        for entry_id in sorted(self._ids(("json",))):
            result = self._inspect(entry_id)
            if isinstance(result, str):
                result = self._quarantine(entry_id)
            if isinstance(result, QueueEntry):
                found.append(result)
        return found

    def due(self, now: float) -> list[QueueEntry]:
        """Entries to work on now, earliest first: next attempt reached, or nothing pending (an entry
        left with only reports to send or removal to do, e.g. after a crash or ``kmsctl queue bounce``)."""
        ready = [e for e in self.entries() if e.next_attempt <= now or not e.pending()]
        return sorted(ready, key=lambda e: (e.next_attempt, e.created, e.id))

    def _ids(self, kinds: tuple[str, ...]) -> set[str]:
        ids = set()
        for name in os.listdir(self.root):
            match = _NAME.fullmatch(name)
            if match and match.group(2) in kinds:
                ids.add(match.group(1))
        return ids

    # the flush marker

    def request_flush(self) -> None:
        """Ask a running server to scan the queue now (``kmsctl queue flush``)."""
        marker = self.root / FLUSH_MARKER
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        os.utime(marker)

    def take_flush_request(self) -> bool:
        """True once after each `request_flush` (the runner polls this between its scans)."""
        try:
            os.unlink(self.root / FLUSH_MARKER)
        except FileNotFoundError:
            return False
        return True

    # crash recovery and damage

    def recover(self) -> None:
        """Finish what a crash interrupted: remove ``.tmp`` files, bodies without envelope (an `add` cut
        short, or a `remove`), lock files without entry; move envelopes without body aside.

        Entries whose lock is held are someone's work in progress and are left alone.
        """
        for entry_id in sorted(self._ids(("json", "msg", "lock", "json.tmp", "msg.tmp"))):
            if self._complete(entry_id):
                continue
            try:
                lock = self.try_lock(entry_id)
            except EntryBusy:
                continue
            with lock:
                self._repair(entry_id)

    def _complete(self, entry_id: str) -> bool:
        return (
            self._path(entry_id, "json").exists()
            and self._path(entry_id, "msg").exists()
            and not self._path(entry_id, "json.tmp").exists()
            and not self._path(entry_id, "msg.tmp").exists()
        )

    def _repair(self, entry_id: str) -> None:
        """Under the entry's lock: make it complete or absent (see `recover`)."""
        temporary = (self._path(entry_id, "json.tmp"), self._path(entry_id, "msg.tmp"))
        leftovers = [path for path in temporary if path.exists()]
        for path in leftovers:
            _unlink(path)
        envelope, body = self._path(entry_id, "json").exists(), self._path(entry_id, "msg").exists()
        if body and not envelope:
            _unlink(self._path(entry_id, "msg"))
            self._report(f"queue: removed {entry_id}.msg, a body without envelope (a queueing cut short)")
        elif envelope and not body:
            self._move_aside(entry_id, "envelope without its body")
        elif leftovers:
            self._report(f"queue: removed temporary files of {entry_id} (a write cut short)")
        if leftovers or envelope != body:
            fsync_dir(self.root)

    def _quarantine(self, entry_id: str) -> QueueEntry | None:
        """Look again under the lock (it may have been mid-change) and move it aside if still damaged."""
        try:
            lock = self.try_lock(entry_id)
        except EntryBusy:
            return None  # someone is working on it; the next scan looks again
        with lock:
            result = self._inspect(entry_id)
            if isinstance(result, str):
                self._move_aside(entry_id, result)
                fsync_dir(self.root)
                return None
            return result

    def _move_aside(self, entry_id: str, why: str) -> None:
        damaged = self.root / DAMAGED
        try:
            damaged.mkdir(mode=0o700)
        except FileExistsError:
            pass
        for kind in ("json", "msg"):
            source = self._path(entry_id, kind)
            if source.exists():
                os.rename(source, damaged / source.name)
        fsync_dir(damaged)
        self._report(f"queue: entry {entry_id} is damaged ({why}); moved to {damaged}")


def _chunks(header: bytes, source: BinaryIO | bytes) -> Iterator[bytes]:
    if header:
        yield header
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield bytes(source)
        return
    while chunk := source.read(_CHUNK):
        yield chunk


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

