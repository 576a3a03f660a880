"""One folder's index on disk: UIDs, flags in file names, and the metadata cache.

Three things describe a folder, each the authority for one part of the truth:

- the **files** in ``cur/`` (and ``new/``): which messages exist, and their system flags, in the
  ``:2,`` info of the name (D Draft, F Flagged, R Answered, S Seen, T Deleted; letters we do not
  know, such as P, are kept as they are);
- ``kms-uidlist``, an append-only text log: a ``V<uidvalidity> N<uidnext>`` header, then one
  ``<uid> <base name>`` line per UID ever given (fsync'd before the UID is reported).  Lines of
  expunged messages stay until the log is compacted, so the highest UID is never given again;
- ``kms-index``, a SQLite cache of what reading a file would tell (wire size, internal date, the
  header section, the analyzer's ``meta``) plus **keywords**, which live only here: losing the
  cache loses keywords, never messages, UIDs or system flags.  It is rebuilt from the files
  whenever it is missing, damaged, or disagrees with the uidlist.  It records how much of the
  uidlist it has absorbed, so opening a folder parses only the log lines written since.

The pure helpers come first; `FolderFiles` does the blocking work, only ever in the store's
thread pool and one call at a time per folder.
"""

from __future__ import annotations

import errno
import gc
import itertools
import json
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from twisted.logger import Logger

from kms.fsutil import fsync_dir, write_all
from kms.store.interfaces import SYSTEM_FLAGS, Analyzer, MailboxError, MessageInfo
from kms.store.maildir import ensure_maildir, maildir_name
from kms.wireform import header_section, wire_form

log = Logger()

UIDLIST = "kms-uidlist"
CACHE = "kms-index"
INFO = ":2,"
FLAG_LETTERS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}
_LETTER_FLAGS = {letter: flag for flag, letter in FLAG_LETTERS.items()}
_SYSTEM = {flag.lower(): flag for flag in SYSTEM_FLAGS}
_SIZE = re.compile(r",S=(\d+)")
_TIME_PARTS = re.compile(r"(\d{1,12})\.(?:M(\d{1,9}))?(?:[^.]*?Q(\d{1,12}))?")
_UIDLIST_HEADER = re.compile(r"V(\d{1,10}) N(\d{1,10})\n")
_UIDLIST_LINE = re.compile(r"^(\d{1,10}) ([!-~]+)$", re.M)
_COMPACT_AFTER = 1000  # dead uidlist lines tolerated before a rewrite (and at least as many as live)


# --- pure helpers -------------------------------------------------------------------------------


def split_name(name: str) -> tuple[str, str]:
    """A maildir file name → (base, info letters); the base never changes, the letters do."""
    base, sep, letters = name.rpartition(INFO)
    return (base, letters) if sep else (name, "")


def delivery_order(name: str) -> tuple[int, int, int, str]:
    """Sort key putting maildir names in the order they were made: ``<secs>.M<usec>…Q<n>`` carry
    numbers without padding, so plain string order would put ``M99`` after ``M100``."""
    found = _TIME_PARTS.match(name)
    if found is None:
        return (0, 0, 0, name)
    seconds, micro, counter = found.groups()
    return (int(seconds), int(micro or 0), int(counter or 0), name)


def acceptable_name(name: str) -> bool:
    """Names we index: printable ASCII without spaces and not hidden (a uidlist line must hold them)."""
    return bool(name) and name[0] != "." and name.isascii() and name.isprintable() and " " not in name


_flag_sets: dict[frozenset[str], frozenset[str]] = {}


def _interned(flags: frozenset[str]) -> frozenset[str]:
    """One shared object per distinct flag set: 100,000 messages have a handful of them."""
    if len(_flag_sets) > 4096:
        _flag_sets.clear()
    return _flag_sets.setdefault(flags, flags)


def normalize_flags(flags: Iterable[str]) -> frozenset[str]:
    """System flags in their canonical spelling, plus keywords; anything else (\\Recent, unknown
    backslash flags, names a space-separated cache column cannot hold) is dropped."""
    kept = set()
    for flag in flags:
        if flag.startswith("\\"):
            system = _SYSTEM.get(flag.lower())
            if system:
                kept.add(system)
        elif flag and flag.isprintable() and " " not in flag:
            kept.add(flag)
    return _interned(frozenset(kept))


_flags_of: dict[tuple[str, str], frozenset[str]] = {}


def message_flags(name: str, keywords: str) -> frozenset[str]:
    """Flags of a message: the system flags its file name carries, and its cached keywords."""
    _, sep, letters = name.rpartition(INFO)
    key = (letters if sep else "", keywords)
    found = _flags_of.get(key)
    if found is None:
        if len(_flags_of) > 4096:
            _flags_of.clear()
        flags = {_LETTER_FLAGS[c] for c in key[0] if c in _LETTER_FLAGS}
        flags.update(keywords.split())
        found = _flags_of[key] = _interned(frozenset(flags))
    return found


_new_object = object.__new__


def _fast_info(
    uid: int,
    size: int,
    internal_date: float,
    flags: frozenset[str],
    headers: bytes,
    meta: Mapping[str, object],
) -> MessageInfo:
    """``MessageInfo(uid, size, internal_date, flags, headers, meta)``, the same object, made
    without the frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field): about
    2.5 times cheaper, which a cold SELECT of 10,000 messages notices."""
    info = _new_object(MessageInfo)
    info.__dict__.update(
        uid=uid, size=size, internal_date=internal_date, flags=flags, headers=headers, meta=meta
    )
    return info


def keywords_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(f for f in flags if not f.startswith("\\")))


_letters_for: dict[tuple[str, frozenset[str]], str] = {}


def name_with_flags(name: str, flags: Iterable[str]) -> str:
    """``name`` renamed for ``flags``: the known letters replaced, unknown letters kept, ASCII order.
    The letters are cached per (old letters, flags): a STORE on 10,000 messages sees a handful."""
    base, letters = split_name(name)
    key = (letters, flags if isinstance(flags, frozenset) else frozenset(flags))
    found = _letters_for.get(key)
    if found is None:
        if len(_letters_for) > 4096:
            _letters_for.clear()
        kept = {c for c in letters if c not in _LETTER_FLAGS}
        kept.update(FLAG_LETTERS[f] for f in key[1] if f in FLAG_LETTERS)
        found = _letters_for[key] = "".join(sorted(kept))
    return base + INFO + found


@dataclass(frozen=True)
class UidList:
    """A parsed ``kms-uidlist``.  ``uids`` maps base names to UIDs for the lines parsed (all, or
    those from a given offset on); ``lines`` counts every line; ``length`` is the byte length of
    the complete lines (a torn last line, from a crash mid-append, is not part of it)."""

    uidvalidity: int
    uidnext: int
    uids: dict[str, int]
    lines: int
    length: int


def uidlist_header(uidvalidity: int, uidnext: int) -> bytes:
    return b"V%d N%d\n" % (uidvalidity, uidnext)


def uidlist_lines(entries: Iterable[tuple[int, str]]) -> bytes:
    return b"".join(b"%d %s\n" % (uid, base.encode("ascii")) for uid, base in entries)


def parse_uidlist(data: bytes, start: int = 0) -> UidList | None:
    """Parse the log, its lines only from byte offset ``start`` (a line start) when given.

    None when the log is unusable (no header, a malformed line, UIDs not increasing): the caller
    must then start a new UIDVALIDITY, since the old UIDs can no longer be trusted.  One regular
    expression over the text and C-level conversions: 100,000 lines in ~25 ms.
    """
    length = data.rfind(b"\n") + 1
    if not data.isascii():
        return None
    text = data[:length].decode("ascii")
    header = _UIDLIST_HEADER.match(text)
    if header is None:
        return None
    uidvalidity, uidnext = int(header.group(1)), int(header.group(2))
    if not 0 < uidvalidity < 1 << 32 or uidnext < 1:
        return None
    start = max(start, header.end())
    if start > length or text[start - 1] != "\n":
        return None
    previous = _UIDLIST_LINE.match(text, text.rfind("\n", 0, start - 1) + 1) if start > header.end() else None
    lines = _UIDLIST_LINE.findall(text, start)
    if len(lines) != text.count("\n", start):
        return None  # some line did not match
    numbers = [int(previous.group(1))] if previous else []
    numbers.extend(map(int, (number for number, _ in lines)))
    if any(map(int.__ge__, numbers, numbers[1:])) or (numbers and numbers[0] < 1):
        return None
    uids = dict(zip((base for _, base in lines), numbers[-len(lines) :] if lines else [], strict=True))
    last = numbers[-1] if numbers else 0
    return UidList(uidvalidity, max(uidnext, last + 1), uids, text.count("\n") - 1, length)


class LazyMeta(Mapping[str, object]):
    """The analyzer's ``meta`` kept as JSON text and decoded on first use: opening a folder of
    100,000 messages does not parse 100,000 ENVELOPE/BODYSTRUCTURE trees nobody asked for."""

    __slots__ = ("raw", "_value")

    def __init__(self, raw: str) -> None:
        self.raw = raw
        self._value: dict[str, object] | None = None

    def _decoded(self) -> dict[str, object]:
        if self._value is None:
            try:
                value = json.loads(self.raw)
            except ValueError:  # a damaged cache row: no meta rather than a failed FETCH
                value = {}
            self._value = value if isinstance(value, dict) else {}
        return self._value

    def __getitem__(self, key: str) -> object:
        return self._decoded()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())

    def __repr__(self) -> str:
        return f"LazyMeta({self.raw!r})"


def meta_json(meta: Mapping[str, object]) -> str:
    return meta.raw if isinstance(meta, LazyMeta) else json.dumps(dict(meta), separators=(",", ":"))


class _GcPaused:
    """``with`` block with the cyclic garbage collector off: a cold load makes ~40,000 objects for
    10,000 messages (none of them cycles), and each 700 allocations would otherwise start a
    collection, the later ones walking the whole heap of a busy server.  The collector is
    process-wide, so concurrent loads (pool threads) share one pause, counted under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._restore = False

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._restore = gc.isenabled()
                gc.disable()
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._restore:
                gc.enable()


_gc_paused = _GcPaused()


class UidValidities:
    """New UIDVALIDITY values: the clock in seconds, strictly increasing within the process, so a
    folder deleted and re-created in the same second still gets a different one (RFC 3501 §2.3.1.1)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._last = 0
        self._lock = threading.Lock()  # called from pool threads

    def __call__(self, above: int = 0) -> int:
        with self._lock:
            value = max(int(self._clock()), self._last + 1, above + 1)
            if value >= 1 << 32:
                value = max(int(self._clock()), 1) & 0xFFFFFFFF or 1
            self._last = value
            return value


class Entry(NamedTuple):
    """A message as a thread job hands it to the reactor: its index record and current file name.
    (A named tuple, not a frozen dataclass: a ``STORE 1:*`` makes two per message.)"""

    info: MessageInfo
    name: str  # in cur/


def flag_tally(infos: Iterable[MessageInfo]) -> tuple[int, list[int]]:
    """How many of ``infos`` are unseen, and the UIDs flagged \\Deleted: kept up to date as a
    folder changes, so STATUS and EXPUNGE never walk the whole folder."""
    unseen = 0
    deleted = []
    for info in infos:
        if "\\Seen" not in info.flags:
            unseen += 1
        if "\\Deleted" in info.flags:
            deleted.append(info.uid)
    return unseen, deleted


@dataclass(frozen=True)
class Counts:
    """What STATUS needs of a folder, read without loading it (`FolderFiles.counts`)."""

    uidvalidity: int
    uidnext: int  # the files in new/ counted in, numbered as the load that takes them in will
    messages: int
    unseen: int
    new: int  # files in new/: \\Recent once taken in


@dataclass(frozen=True)
class Loaded:
    uidvalidity: int
    uidnext: int
    infos: list[MessageInfo]  # UID order
    names: dict[int, str]  # UID -> file name in cur/
    recent: list[int]  # UIDs given by this load
    unseen: int  # `flag_tally` of ``infos``, worked out in the thread
    deleted: list[int]


# --- blocking side ------------------------------------------------------------------------------


class _Names:
    """Fresh maildir base names (with the ``,S=`` file size that Maildir++ readers use)."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._host = socket.gethostname()
        self._counter = itertools.count(1)

    def __call__(self, size: int) -> str:
        seconds, micro = divmod(time.time_ns() // 1000, 1_000_000)
        name = maildir_name(seconds, micro, self._pid, next(self._counter), secrets.token_hex(4), self._host)
        return f"{name},S={size}"


fresh_base = _Names()

_VERSION = 2
# ``messages`` holds what never changes once a message is indexed; ``state`` the two columns a
# STORE rewrites, so a flag change rewrites a ~20-byte row instead of the ~1 KiB one with the
# header section and meta (SQLite rewrites a whole row on UPDATE).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    uid INTEGER PRIMARY KEY, size INTEGER NOT NULL, date REAL NOT NULL,
    headers BLOB NOT NULL, meta TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS state (uid INTEGER PRIMARY KEY, name TEXT NOT NULL, keywords TEXT NOT NULL);
"""
# Version 1 kept name and keywords in ``messages``: its rows are moved over as they are (no
# message file is read again), in one transaction.
_FROM_V1 = """
CREATE TABLE state (uid INTEGER PRIMARY KEY, name TEXT NOT NULL, keywords TEXT NOT NULL);
INSERT INTO state SELECT uid, name, keywords FROM messages;
CREATE TABLE messages_v2 (
    uid INTEGER PRIMARY KEY, size INTEGER NOT NULL, date REAL NOT NULL,
    headers BLOB NOT NULL, meta TEXT NOT NULL);
INSERT INTO messages_v2 SELECT uid, size, date, headers, meta FROM messages;
DROP TABLE messages;
ALTER TABLE messages_v2 RENAME TO messages;
"""
_SELECT_ROWS = (
    "SELECT m.uid, s.name, m.size, m.date, s.keywords, m.headers, m.meta"
    " FROM messages AS m JOIN state AS s ON s.uid = m.uid ORDER BY m.uid"
)
Row = tuple[int, str, int, float, str, bytes, str]


@dataclass(frozen=True)
class CacheState:
    """What the cache has absorbed: every line of uidlist ``inode`` before byte ``absorbed`` whose
    message still exists has its row, and every row is such a line.  Opening then parses only the
    lines after ``absorbed`` and needs no per-message check against the log."""

    uidvalidity: int = 0
    inode: int = 0
    absorbed: int = 0


class IndexCache:
    """``kms-index`` (SQLite, WAL, no fsync per commit: it is a cache the files can rebuild).

    Any error reading it resets it: a cache is never trusted over the files.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as e:
            log.warn("index cache {path} unreadable, rebuilding: {error}", path=path, error=e)
            self._remove_files()
            self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 1:
                _migrate_v1(db)
            elif version != _VERSION:
                db.executescript(
                    "DROP TABLE IF EXISTS info; DROP TABLE IF EXISTS messages; DROP TABLE IF EXISTS state;"
                )
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version={_VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    def _remove_files(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(f"{self.path}{suffix}")
            except FileNotFoundError:
                pass

    def _reopen(self, error: sqlite3.Error) -> None:
        log.warn("index cache {path} unreadable, rebuilding: {error}", path=self.path, error=error)
        self._db.close()
        self._remove_files()
        self._db = self._connect()

    def state(self) -> CacheState:
        try:
            values = dict(self._db.execute("SELECT key, value FROM info").fetchall())
        except sqlite3.DatabaseError as e:
            self._reopen(e)
            return CacheState()
        return CacheState(values.get("uidvalidity", 0), values.get("inode", 0), values.get("absorbed", 0))

    def rows(self) -> list[Row] | None:
        """Every cached row in UID order (None, and a fresh cache, if it cannot be read)."""
        try:
            return self._db.execute(_SELECT_ROWS).fetchall()
        except sqlite3.DatabaseError as e:
            self._reopen(e)
            return None

    def names(self) -> list[str] | None:
        """Every cached file name (None, and a fresh cache, if it cannot be read)."""
        try:
            return [name for (name,) in self._db.execute("SELECT name FROM state")]
        except sqlite3.DatabaseError as e:
            self._reopen(e)
            return None

    def reset(self, uidvalidity: int) -> None:
        with _Transaction(self._db) as db:
            db.execute("DELETE FROM messages")
            db.execute("DELETE FROM state")
            db.execute("DELETE FROM info")
            db.execute("INSERT INTO info VALUES ('uidvalidity', ?)", (uidvalidity,))

    def insert(self, entries: Iterable[Entry], mark: tuple[int, int] | None = None) -> None:
        """Add rows; with ``mark`` = (inode, absorbed), record in the same transaction that the
        uidlist up to there is absorbed."""
        fixed = []
        state = []
        for e in entries:
            info = e.info
            fixed.append((info.uid, info.size, info.internal_date, info.headers, meta_json(info.meta)))
            state.append((info.uid, e.name, keywords_text(info.flags)))
        with _Transaction(self._db) as db:
            db.executemany("INSERT OR REPLACE INTO messages VALUES (?,?,?,?,?)", fixed)
            db.executemany("INSERT OR REPLACE INTO state VALUES (?,?,?)", state)
            if mark is not None:
                db.executemany(
                    "INSERT OR REPLACE INTO info VALUES (?, ?)", zip(("inode", "absorbed"), mark, strict=True)
                )

    def update(self, changes: Iterable[tuple[str, str, int]]) -> None:
        """(file name, keywords, uid) per changed message."""
        with _Transaction(self._db) as db:
            db.executemany("UPDATE state SET name = ?, keywords = ? WHERE uid = ?", changes)

    def delete(self, uids: Iterable[int]) -> None:
        with _Transaction(self._db) as db:
            rows = [(uid,) for uid in uids]
            db.executemany("DELETE FROM messages WHERE uid = ?", rows)
            db.executemany("DELETE FROM state WHERE uid = ?", rows)

    def close(self) -> None:
        self._db.close()


def _migrate_v1(db: sqlite3.Connection) -> None:
    """Version 1 → 2 in one write transaction, checked again inside it (another connection may
    have converted the file meanwhile)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute("PRAGMA user_version").fetchone()[0] == 1:
            for statement in _FROM_V1.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class _Transaction:
    """``with`` block = one BEGIN … COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN")
        return self.db

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


class FolderFiles:
    """The blocking operations on one folder: called only in the thread pool, one at a time (the
    reactor side holds the folder's lock), so this object's state needs no lock of its own.

    Durability: a message is reported only once its file and its directory entry are fsync'd and
    its UID line is in the fsync'd uidlist.
    """

    def __init__(self, path: Path, analyzer: Analyzer, uidvalidities: UidValidities) -> None:
        self.path = path  # changes when the folder is renamed (under the lock)
        self._analyzer = analyzer
        self._uidvalidities = uidvalidities
        self._cache: IndexCache | None = None
        self._cache_ok = True  # False after a failed cache write: stop marking lines absorbed
        self._uidlist_fd = -1
        self._uidlist_inode = 0
        self._uidlist_size = 0
        self.uidvalidity = 0
        self.uidnext = 1

    # -- reading and verifying

    def load(self) -> Loaded:
        """`_load` with the cyclic garbage collector paused (`_GcPaused`)."""
        with _gc_paused:
            return self._load()

    def _load(self) -> Loaded:
        """Open the folder: the cache checked against one listdir of cur/ and new/, files it does
        not know analysed, new/ files moved to cur/, new UIDs given in delivery order.

        Opening with an intact cache reads no message file and parses only the uidlist lines the
        cache has not absorbed; without one, every file is read once and UIDs come from the log.
        A file whose log line is absorbed but which has no row (it vanished and came back) gets
        a new UID.
        """
        if not self.path.is_dir():
            raise MailboxError("no such mailbox", "NONEXISTENT")
        ensure_maildir(self.path)
        self.close()
        self._cache = cache = IndexCache(self.path / CACHE)
        self._cache_ok = True
        state = cache.state()
        rows = cache.rows() if state.uidvalidity else []
        if rows is None:  # unreadable: nothing absorbed, every UID must come from the log
            state, rows = CacheState(), []
        uidlist, trusted = self._read_uidlist(state)
        if uidlist is None:  # the cache cannot vouch for UIDs without the log: start afresh
            uidlist, trusted = self._new_uidlist(above=state.uidvalidity), False
        self.uidvalidity, self.uidnext = uidlist.uidvalidity, uidlist.uidnext
        if state.uidvalidity != self.uidvalidity:
            self._cache_do(lambda: cache.reset(self.uidvalidity))
            rows = []

        listed = os.listdir(self.path / "cur")
        new = [n for n in os.listdir(self.path / "new") if acceptable_name(n)]
        present = set(listed)
        uids = uidlist.uids
        infos: list[MessageInfo] = []
        names: dict[int, str] = {}
        stale: list[Row] = []
        # The common case, kept cheap (it runs once per message of a cold SELECT): the cached name
        # is still there (and the log agrees).  Flags come from `message_flags`'s table when it
        # has them, and the infos are made by `_fast_info`.
        flags_of = _flags_of
        make = _fast_info
        for row in rows:
            uid, name, size, date, keywords, headers, meta = row
            if name in present and (trusted or uids.get(split_name(name)[0]) == uid):
                present.discard(name)
                _, sep, letters = name.rpartition(INFO)
                flags = flags_of.get((letters if sep else "", keywords))
                if flags is None:
                    flags = message_flags(name, keywords)
                infos.append(make(uid, size, date, flags, headers, LazyMeta(meta)))
                names[uid] = name
            else:
                stale.append(row)
        # Files the cache does not name exactly: renamed behind our back, or unknown to it.
        cur = {split_name(n)[0]: n for n in present if acceptable_name(n)}
        dead: list[int] = []
        found: list[Entry] = []
        for uid, name, size, date, keywords, headers, meta in stale:
            base = split_name(name)[0]
            current = cur.pop(base, None)
            if current is None or not (trusted or uids.get(base) == uid):
                dead.append(uid)
            else:
                flags = message_flags(current, keywords)
                found.append(Entry(MessageInfo(uid, size, date, flags, headers, LazyMeta(meta)), current))
        if dead:
            self._cache_do(lambda: cache.delete(dead))
        if found:
            self._cache_do(
                lambda: cache.update([(e.name, keywords_text(e.info.flags), e.info.uid) for e in found])
            )
        missing = [self._analysed(uids[b], "cur", n) for b, n in cur.items() if b in uids]
        analysed = [e for e in missing if e is not None]
        if analysed:
            self._cache_do(lambda: cache.insert(analysed))
        found.extend(analysed)
        if found:
            for entry in found:
                infos.append(entry.info)
                names[entry.info.uid] = entry.name
            infos.sort(key=uid_of)

        taken = {split_name(n)[0] for n in listed} if new else set()
        unknown = [("cur", n) for b, n in cur.items() if b not in uids]
        fresh = self._take_in(unknown + [("new", n) for n in new], taken)
        for entry in fresh:
            infos.append(entry.info)
            names[entry.info.uid] = entry.name
        if uidlist.lines - len(infos) > max(_COMPACT_AFTER, len(infos)):
            self._rewrite_uidlist(self.uidvalidity, self.uidnext, [(i.uid, names[i.uid]) for i in infos])
        if self._cache_ok:
            self._cache_do(lambda: cache.insert([], mark=(self._uidlist_inode, self._uidlist_size)))
        recent = [e.info.uid for e in fresh]
        return Loaded(self.uidvalidity, self.uidnext, infos, names, recent, *flag_tally(infos))

    def counts(self) -> Counts | None:
        """STATUS of a folder nobody has open, without reading its messages or the cache's rows:
        the cached file names checked against one listdir of cur/ and new/ (flags come from the
        names, as everywhere).  No message is read, moved or numbered.  None when the cache
        cannot vouch for the UIDs (it is missing, has not absorbed the whole uidlist, or its names
        differ from cur/'s): only `load` can tell then."""
        if not self.path.is_dir():
            raise MailboxError("no such mailbox", "NONEXISTENT")
        if not (self.path / CACHE).exists():
            return None
        cache = IndexCache(self.path / CACHE)
        try:
            state, names = cache.state(), cache.names()
        finally:
            cache.close()
        try:
            with open(self.path / UIDLIST, "rb") as f:
                data = f.read()
                inode = os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            return None
        if names is None or inode != state.inode or state.absorbed != len(data):
            return None
        uidlist = parse_uidlist(data, state.absorbed)
        if uidlist is None or uidlist.uidvalidity != state.uidvalidity:
            return None
        try:
            cur = {n for n in os.listdir(self.path / "cur") if acceptable_name(n)}
            new = [n for n in os.listdir(self.path / "new") if acceptable_name(n)]
        except FileNotFoundError:  # a maildir missing its subdirectories: `load` repairs it
            return None
        if cur != set(names):
            return None
        unseen = sum(1 for n in itertools.chain(cur, new) if "\\Seen" not in message_flags(n, ""))
        return Counts(uidlist.uidvalidity, uidlist.uidnext + len(new), len(cur) + len(new), unseen, len(new))

    def ingest(self) -> list[Entry]:
        """Take in what SMTP delivered to new/ since the last look (a listdir of new/ only).

        Maildir names are unique by construction, so a new/ name is not checked against cur/ here
        (`load` does check, for files put there by hand)."""
        new = [n for n in os.listdir(self.path / "new") if acceptable_name(n)]
        return self._take_in([("new", n) for n in new], set())

    def _take_in(self, files: Sequence[tuple[str, str]], taken: set[str]) -> list[Entry]:
        """Give UIDs to files not in the uidlist (in delivery order), moving new/ ones to cur/.
        Each file is analysed as it is read, so only one message is in memory at a time."""
        entries: list[Entry] = []
        bases: list[str] = []
        for sub, name in sorted(files, key=lambda f: delivery_order(f[1])):
            raw_date = self._read(self.path / sub / name)
            if raw_date is None:
                continue
            base, letters = split_name(name)
            if sub == "new":
                if base in taken:  # a second file with a base already in cur/: never overwrite it
                    base = fresh_base(len(raw_date[0]))
                final = base + INFO + letters
                os.rename(self.path / "new" / name, self.path / "cur" / final)
                name = final
            taken.add(base)
            bases.append(base)
            entries.append(self._entry(self.uidnext + len(entries), name, *raw_date))
        if entries:
            self._append_uids([(e.info.uid, base) for e, base in zip(entries, bases, strict=True)])
            self._cache_absorb(entries)
        return entries

    def _analysed(self, uid: int, sub: str, name: str) -> Entry | None:
        raw_date = self._read(self.path / sub / name)
        return None if raw_date is None else self._entry(uid, name, *raw_date)

    def _read(self, path: Path) -> tuple[bytes, float] | None:
        """The file's bytes and mtime; None when it vanished or is not a readable file."""
        try:
            with open(path, "rb") as f:
                return f.read(), os.fstat(f.fileno()).st_mtime
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EISDIR, errno.EACCES):
                raise
            log.warn("skipping unreadable message file {path}: {error}", path=path, error=e)
            return None

    def _entry(self, uid: int, name: str, raw: bytes, date: float, keywords: str = "") -> Entry:
        wire = wire_form(raw)
        try:
            meta = meta_json(self._analyzer(wire))
        except Exception:
            log.failure("analyzer failed on {path}; indexed without meta", path=self.path / "cur" / name)
            meta = "{}"
        flags = message_flags(name, keywords)
        return Entry(MessageInfo(uid, len(wire), date, flags, header_section(wire), LazyMeta(meta)), name)

    # -- changes

    def append(self, data: bytes, flags: frozenset[str], internal_date: float | None) -> Entry:
        """APPEND: tmp/ write, fsync, rename into cur/ with its flags, fsync cur/, uidlist line."""
        base = fresh_base(len(data))
        tmp = self.path / "tmp" / base
        final = name_with_flags(base, flags)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
            date = time.time() if internal_date is None else internal_date
            os.utime(fd, (date, date))
            date = os.fstat(fd).st_mtime  # what a rebuild will read back
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, self.path / "cur" / final)
        try:
            fsync_dir(self.path / "cur")
            entry = self._entry(self.uidnext, final, data, date, keywords_text(flags))
            self._append_uids([(entry.info.uid, base)])
        except BaseException:
            _unlink(self.path / "cur" / final)
            raise
        self._cache_absorb([entry])
        return entry

    def import_files(self, sources: Sequence[tuple[Path, Entry]], move: bool) -> list[tuple[int, Entry]]:
        """COPY (hard links; a real copy where links are impossible) or, with ``move``, renames
        (RENAME INBOX).  Flags, internal date and cached metadata come along; sources that vanished
        meanwhile are skipped.  Returns (source uid, new entry) pairs."""
        placed: list[tuple[Entry, str, str]] = []  # (source entry, base, file name)
        try:
            for source, old in sources:
                size = _SIZE.search(split_name(old.name)[0])
                base = fresh_base(int(size.group(1)) if size else source.stat().st_size)
                final = name_with_flags(base, old.info.flags)
                try:
                    self._place(source, self.path / "cur" / final, move)
                except FileNotFoundError:
                    continue
                placed.append((old, base, final))
            if not placed:
                return []
            fsync_dir(self.path / "cur")
            made = [
                (old.info.uid, Entry(replace(old.info, uid=self.uidnext + i), final))
                for i, (old, _, final) in enumerate(placed)
            ]
            self._append_uids([(e.info.uid, base) for (_, e), (_, base, _) in zip(made, placed, strict=True)])
        except BaseException:
            if not move:
                for _, _, final in placed:
                    _unlink(self.path / "cur" / final)
            raise
        self._cache_absorb([e for _, e in made])
        return made

    def _place(self, source: Path, target: Path, move: bool) -> None:
        if move:
            os.rename(source, target)
            return
        try:
            os.link(source, target)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            _copy_file(source, target, self.path / "tmp" / target.name)

    def set_flags(self, changes: Sequence[tuple[Entry, frozenset[str]]]) -> list[Entry]:
        """STORE: rename each file for its new flags (keywords: the cache only); fsync cur/ once.
        Messages whose file vanished are left out of the result.  The loop runs once per message
        of a ``STORE 1:*``, so it joins ``str`` paths (not `Path`) and makes each info directly."""
        cur = os.path.join(self.path, "cur", "")
        done: list[Entry] = []
        keywords: dict[frozenset[str], str] = {}  # few distinct flag sets per request
        changed: list[tuple[str, str, int]] = []
        for old, flags in changes:
            name = name_with_flags(old.name, flags)
            if name != old.name:
                try:
                    os.rename(cur + old.name, cur + name)
                except FileNotFoundError:
                    continue
            info = old.info
            info = _fast_info(info.uid, info.size, info.internal_date, flags, info.headers, info.meta)
            done.append(Entry(info, name))
            text = keywords.get(flags)
            if text is None:
                text = keywords[flags] = keywords_text(flags)
            changed.append((name, text, info.uid))
        if done:
            fsync_dir(self.path / "cur")
            self._cache_do(lambda: self._db().update(changed))
        return done

    def remove(self, entries: Sequence[Entry], unlink: bool = True) -> None:
        """EXPUNGE: unlink the files, fsync cur/, drop the cache rows (``unlink=False``: the files
        were moved away already, only forget them)."""
        if unlink:
            for entry in entries:
                _unlink(self.path / "cur" / entry.name)
            fsync_dir(self.path / "cur")
        if entries:
            self._cache_do(lambda: self._db().delete([e.info.uid for e in entries]))

    def read(self, name: str) -> bytes:
        """The message in wire form (FileNotFoundError if it was renamed or removed meanwhile)."""
        with open(self.path / "cur" / name, "rb") as f:
            return wire_form(f.read())

    def read_many(self, names: Mapping[int, str]) -> tuple[dict[int, bytes], list[int]]:
        """Several messages (UID → file name) in wire form, in one pool job: a thread hop costs
        more than reading a 4 KiB file.  Returns those read, and the UIDs whose file was renamed or
        removed meanwhile."""
        cur = os.path.join(self.path, "cur", "")
        found: dict[int, bytes] = {}
        vanished: list[int] = []
        for uid, name in names.items():
            try:
                with open(cur + name, "rb") as f:
                    found[uid] = wire_form(f.read())
            except FileNotFoundError:
                vanished.append(uid)
        return found, vanished

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        if self._uidlist_fd >= 0:
            os.close(self._uidlist_fd)
            self._uidlist_fd = -1

    # -- the uidlist

    def _read_uidlist(self, state: CacheState) -> tuple[UidList | None, bool]:
        """The log (its torn tail cut off) and whether the cache's absorbed part may be trusted."""
        path = self.path / UIDLIST
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, False
        try:
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            inode = os.fstat(fd).st_ino
            trusted = inode == state.inode and 0 < state.absorbed <= len(data)
            uidlist = parse_uidlist(data, state.absorbed) if trusted else None
            if uidlist is None or uidlist.uidvalidity != state.uidvalidity:
                trusted = False
                uidlist = parse_uidlist(data)
            if uidlist is None:
                log.warn("uidlist {path} unusable: new UIDVALIDITY", path=path)
                os.close(fd)
                return None, False
            if uidlist.length != len(data):  # torn last line from a crash: cut it before appending
                os.ftruncate(fd, uidlist.length)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._uidlist_fd, self._uidlist_inode, self._uidlist_size = fd, inode, uidlist.length
        return uidlist, trusted

    def _new_uidlist(self, above: int) -> UidList:
        uidvalidity = self._uidvalidities(above)
        self._rewrite_uidlist(uidvalidity, 1, [])
        return UidList(uidvalidity, 1, {}, 0, self._uidlist_size)

    def _rewrite_uidlist(self, uidvalidity: int, uidnext: int, lines: Iterable[tuple[int, str]]) -> None:
        """Atomically replace the log with these lines (tmp, fsync, rename, fsync the folder)."""
        data = uidlist_header(uidvalidity, uidnext) + uidlist_lines(
            (uid, split_name(n)[0]) for uid, n in lines
        )
        tmp = self.path / (UIDLIST + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path / UIDLIST)
        fsync_dir(self.path)
        if self._uidlist_fd >= 0:
            os.close(self._uidlist_fd)
        self._uidlist_fd = os.open(self.path / UIDLIST, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        self._uidlist_inode = os.fstat(self._uidlist_fd).st_ino
        self._uidlist_size = len(data)

    def _append_uids(self, lines: Sequence[tuple[int, str]]) -> None:
        """Append and fsync; on failure the log is cut back, so no half line stays behind."""
        data = uidlist_lines(lines)
        try:
            write_all(self._uidlist_fd, data)
            os.fdatasync(self._uidlist_fd)
        except BaseException:
            try:
                os.ftruncate(self._uidlist_fd, self._uidlist_size)
            except OSError:
                pass
            raise
        self._uidlist_size += len(data)
        self.uidnext = lines[-1][0] + 1

    # -- the cache

    def _db(self) -> IndexCache:
        if self._cache is None:
            raise RuntimeError("folder used before load()")
        return self._cache

    def _cache_absorb(self, entries: Sequence[Entry]) -> None:
        """Rows for messages whose log lines were just appended, and the new absorbed mark."""
        mark = (self._uidlist_inode, self._uidlist_size) if self._cache_ok else None
        self._cache_do(lambda: self._db().insert(entries, mark=mark))

    def _cache_do(self, operation: Callable[[], None]) -> None:
        """Cache writes are best effort: a failed one is repaired by the next load, not reported
        (and no later write may claim the log absorbed, so that load re-reads the lines)."""
        try:
            operation()
        except sqlite3.Error as e:
            self._cache_ok = False
            log.warn("index cache {path} write failed: {error}", path=self.path / CACHE, error=e)


def uid_of(info: MessageInfo) -> int:
    return info.uid


def _copy_file(source: Path, target: Path, tmp: Path) -> None:
    """A durable copy through ``tmp`` keeping the mtime (the internal date)."""
    with open(source, "rb") as f:
        data = f.read()
        mtime = os.fstat(f.fileno()).st_mtime
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data)
        os.utime(fd, (mtime, mtime))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, target)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
