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
import marshal
import os
import re
import secrets
import socket
import sqlite3
import struct
import sys
import threading
import time
import zlib
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple

from twisted.logger import Logger

from kms.fsutil import fsync_dir, replace_file, write_all
from kms.store.interfaces import (
    SYSTEM_FLAGS,
    Analyzer,
    DetailsNotLoaded,
    MailboxError,
    MessageDetails,
    MessageInfo,
    message_info,
)
from kms.store.maildir import ensure_maildir, maildir_name
from kms.wireform import header_section, wire_form

log = Logger()

UIDLIST = "kms-uidlist"
CACHE = "kms-index"
SNAPSHOT = "kms-snapshot"
SPARE = "kms-spare."  # tmp/kms-spare.<unique>: an empty file made for the next APPEND to write
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


_SETTLED_NS = 2_000_000_000  # a directory changed this recently may change again within its mtime's tick


def directory_stamp(st: os.stat_result, now_ns: int) -> tuple[int, int]:
    """(mtime in nanoseconds, inode) of a directory: they change whenever it gains, loses or
    renames an entry.  (0, 0), no promise, while the mtime is less than two seconds old: a
    change within the same timestamp tick (coarse clocks, file systems with second-resolution
    times) would leave the mtime as it is."""
    if st.st_mtime_ns > now_ns - _SETTLED_NS or st.st_mtime_ns <= 0:
        return (0, 0)
    return (st.st_mtime_ns, st.st_ino)


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


class _Unfrozen:
    """`MessageInfo`'s slot layout without the frozen ``__setattr__``: an instance is filled by
    plain (C-level) slot stores and then becomes a `MessageInfo` by ``__class__`` assignment,
    which Python allows between classes of identical layout."""

    __slots__ = MessageInfo.__slots__

    def __init__(
        self,
        uid: int,
        size: int,
        internal_date: float,
        flags: frozenset[str],
        details: MessageDetails,
    ) -> None:
        self.uid = uid
        self.size = size
        self.internal_date = internal_date
        self.flags = flags
        self.details = details


def _fast_info(
    uid: int,
    size: int,
    internal_date: float,
    flags: frozenset[str],
    details: MessageDetails,
) -> MessageInfo:
    """``MessageInfo(uid, size, internal_date, flags, details)``, the same object, made without
    the frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field): about 2.5 times
    cheaper, which a cold SELECT of 10,000 messages notices."""
    info = _Unfrozen(uid, size, internal_date, flags, details)
    info.__class__ = MessageInfo  # type: ignore[assignment]
    return info  # type: ignore[return-value]


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


# The cached ``meta`` as text: the analyzer's values in a flat form where one of them is found by
# `str.find` (no parse).  The text starts with NUL; then for each item ``k<key>`` NUL ``<value>``
# NUL, a value being ``s<text>``, ``i<integer>``, ``n`` (None), or ``d`` followed by ``\x01<key>
# \x01<text>`` pairs (a dict of texts).  NUL, \x01 and \x02 occur only as separators, and only key
# fields start with "k", so ``NUL k<key> NUL`` can only match a key.  A meta this cannot hold
# (lists, floats, separators inside a text) is kept as JSON, which starts with "{".
_FLAT, _PAIR = "\x00", "\x01"
_MISSING = object()
_SEPARATORS = re.compile("[\x00-\x02]")


def _flat_value(value: object) -> str | None:
    if isinstance(value, str):
        return None if _SEPARATORS.search(value) else "s" + value
    if type(value) is int:
        return f"i{value}"
    if value is None:
        return "n"
    if isinstance(value, Mapping):
        pairs = list(value.items())
        if all(isinstance(k, str) and isinstance(v, str) and not _SEPARATORS.search(k + v) for k, v in pairs):
            return "d" + "".join(f"\x01{k}\x01{v}" for k, v in pairs)
    return None


def meta_text(meta: Mapping[str, object]) -> str:
    """``meta`` as the cache stores it: the flat form when it can hold it, else JSON.  Texts go
    last, so the small items a SEARCH reads for every message (``search``, ``sent``) are found
    before the long wire-syntax strings, which FETCH reads far less often per message."""
    if isinstance(meta, LazyMeta):
        return meta.raw
    parts = []
    for key, value in meta.items():
        flat = _flat_value(value)
        if flat is None or not isinstance(key, str) or _SEPARATORS.search(key):
            return json.dumps(dict(meta), separators=(",", ":"))
        parts.append(f"k{key}\x00{flat}\x00")
    parts.sort(key=lambda part: part[part.index(_FLAT) + 1] == "s")
    return _FLAT + "".join(parts)


def _flat_decoded(raw: str, start: int, end: int) -> object:
    """The value in ``raw[start:end]`` (one field of the flat form)."""
    kind = raw[start : start + 1]
    if kind == "s":
        return raw[start + 1 : end]
    if kind == "i":
        return int(raw[start + 1 : end])
    if kind == "d":  # a fresh dict each time, made by C-level calls (SEARCH: one per message)
        parts = raw[start + 2 : end].split(_PAIR) if end > start + 1 else []
        return dict(zip(parts[0::2], parts[1::2], strict=False))
    return None


class LazyMeta(Mapping[str, object]):
    """The analyzer's ``meta`` as the cache holds it (`meta_text`), read item by item: opening a
    folder decodes nothing, and an item of the flat form is one `str.find` away.  Texts (the
    ENVELOPE, BODY, BODYSTRUCTURE strings: most of the bytes) are sliced out on each use and never
    kept twice; the small dicts and numbers SEARCH reads for every message are kept once read
    (``_items``).  A JSON text (a meta the flat form cannot hold, or a damaged row) is decoded
    once and kept."""

    __slots__ = ("raw", "_value", "_items")

    def __init__(self, raw: str) -> None:
        self.raw = raw
        self._value: dict[str, object] | None = None
        self._items: dict[str, object] | None = None

    def _decoded(self) -> dict[str, object]:
        if self._value is None:
            if self.raw.startswith(_FLAT):  # not kept: iterating a whole meta is rare
                fields = self.raw.split(_FLAT)[1:-1]
                keys = [key[1:] for key in fields[0::2]][: len(fields) // 2]  # a damaged odd tail: dropped
                return {key: value for key in keys if (value := self.get(key, _MISSING)) is not _MISSING}
            try:
                value = json.loads(self.raw)
            except ValueError:  # a damaged cache row: no meta rather than a failed FETCH
                value = {}
            self._value = value if isinstance(value, dict) else {}
        return self._value

    def get(self, key: str, default: object = None) -> object:
        raw = self.raw
        if not raw.startswith(_FLAT):
            return self._decoded().get(key, default)
        items = self._items
        if items is not None and key in items:
            return items[key]
        at = raw.find(f"\x00k{key}\x00")
        if at < 0:
            return default
        start = at + len(key) + 3
        end = raw.find(_FLAT, start)
        if end < 0:  # a damaged cache row: no such item rather than a failed FETCH
            return default
        if raw[start] == "s":
            return raw[start + 1 : end]
        if items is None:
            items = self._items = {}
        value = items[key] = _flat_decoded(raw, start, end)
        return value

    def may_contain(self, key: str, text: str) -> bool:
        """False only when item ``key`` is here and ``text`` is in none of its strings (a dict's
        keys and values included): the flat form holds them verbatim, so no decoding is needed
        to rule a message out.  A JSON text (escaped), a missing item or one already decoded (the
        caller's lookup is as quick as this test then) says True."""
        items = self._items
        if items is not None and key in items:
            return True
        raw = self.raw
        if not raw.startswith(_FLAT):
            return True
        at = raw.find(f"\x00k{key}\x00")
        end = raw.find(_FLAT, at + len(key) + 3)
        return at < 0 or end < 0 or raw.find(text, at + len(key) + 3, end) >= 0

    def __getitem__(self, key: str) -> object:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key, _MISSING) is not _MISSING

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())

    def __repr__(self) -> str:
        return f"LazyMeta({self.raw!r})"


_NO_HEADERS = b""
_NO_META = LazyMeta("{}")


class FolderDetails:
    """The header sections and metas of the messages a cold load took from the index (one object
    shared by all their infos), read from the cache only when a command needs them
    (`FolderFiles.read_details`, merged here on the reactor thread): a SELECT reads ~80 bytes a
    message instead of ~1 KiB, and a FETCH of the newest few messages reads just theirs.
    Headers and meta never change once a message is indexed, so reading them later is reading
    the same thing.  A message expunged before they were read (row and file gone) answers an
    empty header section and no meta, as a damaged row does."""

    __slots__ = ("_headers", "_metas", "complete")

    def __init__(self) -> None:
        self._headers: dict[int, bytes] = {}
        self._metas: dict[int, Mapping[str, object]] = {}
        self.complete = False  # every message's are here (a whole-folder read was merged)

    def missing(self, uids: Iterable[int]) -> list[int]:
        """Those of ``uids`` not read yet (none once `complete`)."""
        return [] if self.complete else list(itertools.filterfalse(self._metas.__contains__, uids))

    def add(self, found: tuple[Mapping[int, bytes], Mapping[int, Mapping[str, object]]], whole: bool) -> None:
        """Merge what `FolderFiles.read_details` read (``whole``: every message's)."""
        headers, metas = found
        self._headers.update(headers)
        self._metas.update(metas)
        self.complete = self.complete or whole

    def headers_of(self, uid: int) -> bytes:
        try:
            return self._headers[uid]
        except KeyError:
            if self.complete:
                return _NO_HEADERS
            raise DetailsNotLoaded(f"details of message {uid} read before FolderView.details()") from None

    def meta_of(self, uid: int) -> Mapping[str, object]:
        try:
            return self._metas[uid]
        except KeyError:
            if self.complete:
                return _NO_META
            raise DetailsNotLoaded(f"details of message {uid} read before FolderView.details()") from None


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


_new_entry = partial(tuple.__new__, Entry)  # Entry((info, name)) without the named tuple's Python __new__


def entries_of(pairs: Iterable[tuple[MessageInfo, str]]) -> list[Entry]:
    """Entries for (info, name) pairs, made at C speed: a ``STORE 1:*`` makes one per message."""
    return list(map(_new_entry, pairs))


def flag_tally(infos: Iterable[MessageInfo]) -> tuple[int, list[int]]:
    """How many of ``infos`` are unseen, and the UIDs flagged \\Deleted: kept up to date as a
    folder changes, so STATUS and EXPUNGE never walk the whole folder."""
    listed = infos if isinstance(infos, Sequence) else list(infos)
    counts = Counter(map(_flags_attr, listed))  # counted in C: a folder has a handful of flag sets
    unseen = sum(n for flags, n in counts.items() if "\\Seen" not in flags)
    doomed = {flags for flags in counts if "\\Deleted" in flags}
    return unseen, [info.uid for info in listed if info.flags in doomed] if doomed else []


_flags_attr = attrgetter("flags")
_uid_attr = attrgetter("uid")


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
    details: FolderDetails  # of the infos taken from the cache (not yet read)


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

_VERSION = 3  # 3: ``meta`` in the flat form of `meta_text` (2 kept it as JSON)
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
# What a load reads per message; the header section and meta (~90 % of a row's bytes) are read
# later, and only if a command needs them (`FolderDetails`).
_SELECT_ROWS = (
    "SELECT m.uid, s.name, m.size, m.date, s.keywords FROM messages AS m JOIN state AS s ON s.uid = m.uid"
    " ORDER BY m.uid"
)
Row = tuple[int, str, int, float, str]
_DETAILS_PER_QUERY = 500  # UIDs per ``IN (...)``: well under SQLite's 32,766 variables
SET_FLAGS_BATCH = 1000  # renames per `FolderFiles.set_flags` progress report (a STORE 1:* answers as it goes)


@dataclass(frozen=True)
class CacheState:
    """What the cache has absorbed: every line of uidlist ``inode`` before byte ``absorbed`` whose
    message still exists has its row, and every row is such a line.  Opening then parses only the
    lines after ``absorbed`` and needs no per-message check against the log.

    ``cur`` is the `directory_stamp` of ``cur/`` when its listing last matched the rows' file
    names exactly ((0, 0): no such promise); while it is unchanged, opening needs no listing.
    ``generation`` changes with every write to the cache (`IndexCache`), so a snapshot written
    from the same content can tell that it is still current."""

    uidvalidity: int = 0
    inode: int = 0
    absorbed: int = 0
    cur: tuple[int, int] = (0, 0)
    generation: int = 0

    def snapshot_key(self) -> tuple[int, ...]:
        """What a snapshot of this content records and must find again (`encode_snapshot`)."""
        return (self.uidvalidity, self.inode, self.absorbed, *self.cur, self.generation)


class IndexCache:
    """``kms-index`` (SQLite, WAL, no fsync per commit: it is a cache the files can rebuild).

    Any error reading it resets it: a cache is never trusted over the files.  Except a full disk,
    where even an intact cache cannot be opened (WAL needs room for its ``-shm``): the file, and
    the keywords only it holds, stay; the folder works from a cache in memory until next opened.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # The generation this connection's own writes led to; None once another connection
        # wrote in between (or before `state` was read): its view is then not the file's.
        self.generation: int | None = None
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as e:
            if _disk_at_fault(e):
                log.warn("index cache {path} cannot be opened, using memory: {error}", path=path, error=e)
                self._db = self._connect(":memory:")
                return
            log.warn("index cache {path} unreadable, rebuilding: {error}", path=path, error=e)
            self._remove_files()
            self._db = self._connect()

    def _connect(self, location: str | None = None) -> sqlite3.Connection:
        db = sqlite3.connect(location or self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 1:
                _migrate(db, 1, _from_v1)
                version = 2
            if version == 2:
                _migrate(db, 2, _from_v2)
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
        for path in (f"{self.path}{suffix}" for suffix in ("", "-wal", "-shm")):
            _unlink(Path(path))
        _unlink(self.path.with_name(SNAPSHOT))  # it describes the cache that just went

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
        get = values.get
        cur = (get("cur_mtime", 0), get("cur_inode", 0))
        self.generation = get("generation", 0)
        return CacheState(get("uidvalidity", 0), get("inode", 0), get("absorbed", 0), cur, self.generation)

    def _bump(self, db: sqlite3.Connection) -> None:
        """Inside a write transaction: the next generation.  A fresh cache starts at a random
        one, so a snapshot left from a cache that was deleted and rebuilt cannot match by chance."""
        found = db.execute(
            "UPDATE info SET value = value + 1 WHERE key = 'generation' RETURNING value"
        ).fetchone()
        if found is None:
            found = (secrets.randbits(62),)
            db.execute("INSERT INTO info VALUES ('generation', ?)", found)
        expected = self.generation
        self.generation = found[0] if expected is not None and found[0] == expected + 1 else None

    def rows(self) -> list[Row] | None:
        """Every cached row in UID order (None, and a fresh cache, if it cannot be read)."""
        try:
            return self._db.execute(_SELECT_ROWS).fetchall()
        except sqlite3.DatabaseError as e:
            self._reopen(e)
            return None

    def details(self, uids: Sequence[int] | None = None) -> tuple[list[int], list[bytes], list[str]]:
        """The UIDs, header sections and meta texts of the rows of ``uids`` (None: every row), for
        `FolderDetails`; errors are the caller's: the folder is open, and a cache that fails now
        is not reset under it."""
        if uids is None:
            rows = self._db.execute("SELECT uid, headers, meta FROM messages").fetchall()
        elif uids and (low := min(uids)) + 2 * len(uids) > (high := max(uids)):
            # Dense (a FETCH batch of a sequence range): one walk of the primary key, not an IN
            # list; the few rows between that were not asked for are the folder's all the same.
            query = "SELECT uid, headers, meta FROM messages WHERE uid BETWEEN ? AND ?"
            rows = self._db.execute(query, (low, high)).fetchall()
        else:
            rows = []
            for at in range(0, len(uids), _DETAILS_PER_QUERY):
                chunk = uids[at : at + _DETAILS_PER_QUERY]
                query = f"SELECT uid, headers, meta FROM messages WHERE uid IN ({','.join('?' * len(chunk))})"
                rows.extend(self._db.execute(query, chunk).fetchall())
        if not rows:
            return [], [], []
        uids, headers, metas = zip(*rows, strict=True)
        return list(uids), list(headers), list(metas)

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
            db.execute("DELETE FROM info WHERE key != 'generation'")
            db.execute("INSERT INTO info VALUES ('uidvalidity', ?)", (uidvalidity,))
            self._bump(db)

    def insert(
        self,
        entries: Iterable[Entry],
        mark: tuple[int, int] | None = None,
        cur: tuple[int, int] | None = None,
    ) -> None:
        """Add rows; with ``mark`` = (inode, absorbed), record in the same transaction that the
        uidlist up to there is absorbed; with ``cur``, the stamp of ``cur/`` (`CacheState.cur`)."""
        fixed = []
        state = []
        for e in entries:
            info = e.info
            fixed.append((info.uid, info.size, info.internal_date, info.headers, meta_text(info.meta)))
            state.append((info.uid, e.name, keywords_text(info.flags)))
        with _Transaction(self._db) as db:
            db.executemany("INSERT OR REPLACE INTO messages VALUES (?,?,?,?,?)", fixed)
            db.executemany("INSERT OR REPLACE INTO state VALUES (?,?,?)", state)
            if mark is not None:
                db.executemany(
                    "INSERT OR REPLACE INTO info VALUES (?, ?)", zip(("inode", "absorbed"), mark, strict=True)
                )
            if cur is not None:
                pairs = zip(("cur_mtime", "cur_inode"), cur, strict=True)
                db.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)", pairs)
            self._bump(db)

    def update(self, changes: Iterable[tuple[str, str, int]]) -> None:
        """(file name, keywords, uid) per changed message."""
        with _Transaction(self._db) as db:
            db.executemany("UPDATE state SET name = ?, keywords = ? WHERE uid = ?", changes)
            self._bump(db)

    def delete(self, uids: Iterable[int]) -> None:
        with _Transaction(self._db) as db:
            rows = [(uid,) for uid in uids]
            db.executemany("DELETE FROM messages WHERE uid = ?", rows)
            db.executemany("DELETE FROM state WHERE uid = ?", rows)
            self._bump(db)

    def close(self) -> None:
        self._db.close()


def _disk_at_fault(error: sqlite3.Error) -> bool:
    """SQLITE_FULL or an I/O error (SQLITE_IOERR_SHMSIZE on a full disk): not a damaged file."""
    return (getattr(error, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)


def _from_v1(db: sqlite3.Connection) -> None:
    for statement in _FROM_V1.split(";"):
        if statement.strip():
            db.execute(statement)


def _flat_from_json(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return meta_text(value) if isinstance(value, dict) else text


def _from_v2(db: sqlite3.Connection) -> None:
    """Every ``meta`` from JSON into the flat form (~10 µs a row, once)."""
    db.create_function("kms_flat_meta", 1, _flat_from_json, deterministic=True)
    db.execute("UPDATE messages SET meta = kms_flat_meta(meta)")


def _migrate(db: sqlite3.Connection, version: int, step: Callable[[sqlite3.Connection], None]) -> None:
    """Version ``version`` → the next in one write transaction, checked again inside it (another
    connection may have converted the file meanwhile)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute("PRAGMA user_version").fetchone()[0] == version:
            step(db)
            db.execute(f"PRAGMA user_version={version + 1}")
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


_INFO_SLOTS = [MessageInfo.__dict__[name] for name in MessageInfo.__slots__]
_META_SLOTS = [LazyMeta.__dict__[name] for name in LazyMeta.__slots__]


def _lazy_metas(texts: Sequence[str]) -> list[LazyMeta]:
    """`LazyMeta`s of meta texts, made with C-level calls only (as `_made_infos`)."""
    lazy = list(map(object.__new__, itertools.repeat(LazyMeta, len(texts))))
    nothing = itertools.repeat(None)
    meta_columns: tuple[Iterable[object], ...] = (texts, nothing, nothing)
    for slot, column in zip(_META_SLOTS, meta_columns, strict=True):
        deque(map(slot.__set__, lazy, column), maxlen=0)
    return lazy


def _with_flags(
    infos: Sequence[MessageInfo], outcome: Mapping[frozenset[str], frozenset[str]]
) -> list[MessageInfo]:
    """``infos`` with their flags replaced by ``outcome[old flags]`` (`_made_infos`: no frame each)."""
    flags = list(map(outcome.__getitem__, map(_flags_attr, infos)))
    columns = (flags if s == "flags" else map(attrgetter(s), infos) for s in MessageInfo.__slots__)
    return _made_infos(len(infos), tuple(columns))


def _made_infos(count: int, columns: tuple[Iterable[object], ...]) -> list[MessageInfo]:
    """``count`` `MessageInfo`s from one column per slot, in slot order, made column by column
    with C-level calls only (``object.__new__`` and the slots' own setters, which a frozen
    class's ``__setattr__`` does not see): no Python frame per message, which is most of a cold
    SELECT's object cost."""
    infos = list(map(object.__new__, itertools.repeat(MessageInfo, count)))
    for slot, column in zip(_INFO_SLOTS, columns, strict=True):
        deque(map(slot.__set__, infos, column), maxlen=0)
    return infos


def _as_cached(rows: list[Row], details: FolderDetails) -> tuple[list[MessageInfo], dict[int, str]]:
    """The infos (UID order) and file names of cached rows taken as they are: a cold SELECT of
    a folder whose ``cur/`` has not changed (and has no current snapshot) comes down to this."""
    if not rows:
        return [], {}
    uids, names, sizes, dates, keywords = zip(*rows, strict=True)
    flags = list(map(message_flags, names, keywords))
    infos = _made_infos(len(uids), (uids, sizes, dates, flags, itertools.repeat(details)))
    return infos, dict(zip(uids, names, strict=True))


# The snapshot (``kms-snapshot``): one folder's rows as columns, for a cold load in a few C-level
# calls instead of a row tuple per message from SQLite.  A header (magic, format, the Python
# minor version whose `marshal` wrote it, the `CacheState.snapshot_key` of the content, the
# count, a CRC-32 of the rest), then one `marshal`ed tuple: UIDs, sizes, dates and flag-set
# numbers as machine arrays, the flag sets, and the file names joined by newlines (format 1
# also held the header sections and metas, which a load no longer reads).  It is only ever a
# faster copy of the cache: any doubt means the rows.
_SNAPSHOT_MAGIC = b"kms-snap"
_SNAPSHOT_FORMAT = 2
_SNAPSHOT_HEAD = struct.Struct("<8sHH6QQI")


def encode_snapshot(key: Sequence[int], infos: Sequence[MessageInfo], names: Mapping[int, str]) -> bytes:
    """The snapshot of ``infos`` (UID order) and their file names, for cache content ``key``."""
    sets: dict[frozenset[str], int] = {}
    numbers = array("I", [sets.setdefault(info.flags, len(sets)) for info in infos])
    columns = (
        array("Q", [info.uid for info in infos]).tobytes(),
        array("Q", [info.size for info in infos]).tobytes(),
        array("d", [info.internal_date for info in infos]).tobytes(),
        numbers.tobytes(),
        [sorted(flags) for flags in sets],
        "\n".join([names[info.uid] for info in infos]),
    )
    payload = marshal.dumps(columns, 4)
    head = _SNAPSHOT_HEAD.pack(
        _SNAPSHOT_MAGIC, _SNAPSHOT_FORMAT, sys.version_info.minor, *key, len(infos), zlib.crc32(payload)
    )
    return head + payload


def decode_snapshot(
    data: bytes, key: Sequence[int], details: FolderDetails
) -> tuple[list[MessageInfo], dict[int, str]] | None:
    """The infos (their details from ``details``) and file names of a snapshot written for cache
    content ``key``; None when it is for other content, another format or Python, or damaged."""
    if len(data) < _SNAPSHOT_HEAD.size:
        return None
    magic, version, minor, *found, count, crc = _SNAPSHOT_HEAD.unpack_from(data)
    if (magic, version, minor) != (_SNAPSHOT_MAGIC, _SNAPSHOT_FORMAT, sys.version_info.minor):
        return None
    payload = memoryview(data)[_SNAPSHOT_HEAD.size :]
    if found != list(key) or zlib.crc32(payload) != crc:
        return None
    try:
        uid_bytes, size_bytes, date_bytes, number_bytes, sets, joined = marshal.loads(payload)
        uids, sizes, numbers = array("Q", uid_bytes), array("Q", size_bytes), array("I", number_bytes)
        dates = array("d", date_bytes)
        flag_sets = [_interned(frozenset(flags)) for flags in sets]
        names = joined.split("\n") if count else []
        if not all(len(c) == count for c in (uids, sizes, dates, numbers, names)):
            return None
        flags = list(map(flag_sets.__getitem__, numbers))
    except (ValueError, EOFError, TypeError, IndexError, AttributeError):
        return None  # cannot happen past the CRC unless written by something else: the rows then
    infos = _made_infos(count, (uids, sizes, dates, flags, itertools.repeat(details)))
    return infos, dict(zip(uids, names, strict=True))


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
        self._spare: tuple[int, str] | None = None  # (fd, name in tmp/) from `prepare_append`
        self._snapshot_key: tuple[int, ...] = ()  # of the SNAPSHOT on disk, when this load read it
        self._details = FolderDetails()  # of the last load's infos from the cache
        self.uidvalidity = 0
        self.uidnext = 1

    # -- reading and verifying

    def load(self) -> Loaded:
        """`_load` with the cyclic garbage collector paused (`_GcPaused`)."""
        with _gc_paused:
            return self._load(snapshot=True)

    def _load(self, snapshot: bool) -> Loaded:
        """Open the folder: the cache checked against one listdir of cur/ and new/, files it does
        not know analysed, new/ files moved to cur/, new UIDs given in delivery order.

        Opening with an intact cache reads no message file and parses only the uidlist lines the
        cache has not absorbed; without one, every file is read once and UIDs come from the log.
        A file whose log line is absorbed but which has no row (it vanished and came back) gets
        a new UID.  With ``snapshot``, a current `SNAPSHOT` stands in for the rows.
        """
        if not self.path.is_dir():
            raise MailboxError("no such mailbox", "NONEXISTENT")
        ensure_maildir(self.path)
        self.close()
        self._cache = cache = IndexCache(self.path / CACHE)
        self._cache_ok = True
        self._details = FolderDetails()
        state = cache.state()
        stamp = directory_stamp(os.stat(self.path / "cur"), time.time_ns())
        cached = self._read_snapshot(state, stamp) if snapshot and state.uidvalidity else None
        rows = [] if cached is not None or not state.uidvalidity else cache.rows()
        if rows is None:  # unreadable: nothing absorbed, every UID must come from the log
            state, rows = CacheState(), []
        uidlist, trusted = self._read_uidlist(state)
        if uidlist is None:  # the cache cannot vouch for UIDs without the log: start afresh
            uidlist, trusted = self._new_uidlist(above=state.uidvalidity), False
        self.uidvalidity, self.uidnext = uidlist.uidvalidity, uidlist.uidnext
        if state.uidvalidity != self.uidvalidity:
            self._cache_do(lambda: cache.reset(self.uidvalidity))
            rows = []

        uids = uidlist.uids
        new = [n for n in os.listdir(self.path / "new") if acceptable_name(n)]
        # cur/ unchanged since its listing matched the rows (and no log line unabsorbed): the rows
        # are its files, and the listing can be skipped.
        shortcut = trusted and not uids and stamp != (0, 0) and stamp == state.cur
        if cached is not None and not shortcut:  # the uidlist moved meanwhile: start again, on rows
            self.close()
            return self._load(snapshot=False)
        unknown: dict[str, str] = {}
        if shortcut:
            infos, names = cached if cached is not None else _as_cached(rows, self._details)
            self._snapshot_key = state.snapshot_key() if cached is not None else ()
            listed = list(names.values())
        else:
            self._snapshot_key = ()
            listed = [n for n in os.listdir(self.path / "cur") if acceptable_name(n)]
            infos, names, unknown = self._reconcile(rows, uids, trusted, listed)
        taken = {split_name(n)[0] for n in listed} if new else set()
        fresh = self._take_in([("cur", n) for n in unknown.values()] + [("new", n) for n in new], taken)
        for entry in fresh:
            infos.append(entry.info)
            names[entry.info.uid] = entry.name
        # A listing matches the rows once every listed file is indexed and none was moved in.
        record = None if shortcut else stamp if len(infos) == len(listed) and not new else (0, 0)
        if uidlist.lines - len(infos) > max(_COMPACT_AFTER, len(infos)):
            self._rewrite_uidlist(self.uidvalidity, self.uidnext, [(i.uid, names[i.uid]) for i in infos])
        mark = (self._uidlist_inode, self._uidlist_size)
        if self._cache_ok and (not shortcut or mark != (state.inode, state.absorbed)):
            self._cache_do(lambda: cache.insert([], mark=mark, cur=record))
        recent = [e.info.uid for e in fresh]
        return Loaded(self.uidvalidity, self.uidnext, infos, names, recent, *flag_tally(infos), self._details)

    def _reconcile(
        self, rows: list[Row], uids: dict[str, int], trusted: bool, listed: list[str]
    ) -> tuple[list[MessageInfo], dict[int, str], dict[str, str]]:
        """The cached rows checked against a listing of cur/ (acceptable names only): rows whose
        file was renamed behind our back follow it, rows without a file go, files with a log line
        but no row are analysed.  Returns the infos (UID order), their names, and the files the
        uidlist does not know (base → name), which the caller numbers."""
        cache = self._db()
        present = set(listed)
        infos: list[MessageInfo] = []
        names: dict[int, str] = {}
        stale: list[Row] = []
        # The common case, kept cheap (it runs once per message of a cold SELECT): the cached name
        # is still there (and the log agrees).
        flags_of = _flags_of
        make = _fast_info
        details = self._details
        for row in rows:
            uid, name, size, date, keywords = row
            if name in present and (trusted or uids.get(split_name(name)[0]) == uid):
                present.discard(name)
                _, sep, letters = name.rpartition(INFO)
                flags = flags_of.get((letters if sep else "", keywords))
                if flags is None:
                    flags = message_flags(name, keywords)
                infos.append(make(uid, size, date, flags, details))
                names[uid] = name
            else:
                stale.append(row)
        # Files the cache does not name exactly: renamed behind our back, or unknown to it.
        cur = {split_name(n)[0]: n for n in present}
        dead: list[int] = []
        found: list[Entry] = []
        for uid, name, size, date, keywords in stale:
            base = split_name(name)[0]
            current = cur.pop(base, None)
            if current is None or not (trusted or uids.get(base) == uid):
                dead.append(uid)
            else:
                flags = message_flags(current, keywords)
                found.append(Entry(MessageInfo(uid, size, date, flags, details), current))
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
        return infos, names, {b: n for b, n in cur.items() if b not in uids}

    def read_details(
        self, uids: Sequence[int] | None, names: Mapping[int, str]
    ) -> tuple[dict[int, bytes], dict[int, Mapping[str, object]]]:
        """The header sections and metas of messages ``uids`` (None: all) from the cache, for
        `FolderDetails.add`.  A message of the folder (``names``: UID → file, the folder's, which
        does not change while its lock is held) without a row, after a failed cache write, is
        read and analysed again; a message in neither (expunged) gets an empty section."""
        with _gc_paused:
            try:
                found, headers, texts = self._db().details(uids)
            except sqlite3.DatabaseError as e:
                log.warn("index cache {path} unreadable, reading messages: {error}", path=self.path, error=e)
                found, headers, texts = [], [], []
            by_uid = dict(zip(found, headers, strict=True))
            metas: dict[int, Mapping[str, object]] = dict(zip(found, _lazy_metas(texts), strict=True))
            for uid in [uid for uid in (names if uids is None else uids) if uid not in by_uid]:
                name = names.get(uid)
                entry = None if name is None else self._analysed(uid, "cur", name)
                by_uid[uid] = _NO_HEADERS if entry is None else entry.info.headers
                metas[uid] = _NO_META if entry is None else entry.info.meta
            return by_uid, metas

    def _read_snapshot(
        self, state: CacheState, stamp: tuple[int, int]
    ) -> tuple[list[MessageInfo], dict[int, str]] | None:
        """The folder from its snapshot, if one was written from exactly the cache's content
        (`CacheState.snapshot_key`), ``cur/`` is as that content's listing left it and the
        uidlist holds no line the cache has not absorbed; else None (the rows then)."""
        if stamp == (0, 0) or stamp != state.cur:
            return None
        try:
            log_file = os.stat(self.path / UIDLIST)
            if (log_file.st_ino, log_file.st_size) != (state.inode, state.absorbed):
                return None
            data = read_large_file(os.path.join(self.path, SNAPSHOT))
        except FileNotFoundError:
            return None
        return decode_snapshot(data, state.snapshot_key(), self._details)

    def retire(self, infos: Sequence[MessageInfo], names: Mapping[int, str]) -> None:
        """Close, first leaving a `SNAPSHOT` of the folder as the reactor holds it (``infos`` in
        UID order, their file names) for the next cold load, when it is worth one: the cache
        must vouch for exactly this content (every write of ours succeeded, none by anyone else
        since, ``cur/`` listed) and the snapshot on disk must not be current already.

        When this process changed ``cur/`` since its stamp was recorded, ``cur/`` is listed here
        and, if it holds exactly ``names``, its new stamp recorded (`_listed_stamp`): the listing
        a cold load would otherwise do (a third of its time) is done as the folder leaves."""
        try:
            cache = self._cache
            if cache is not None and self._cache_ok and infos:
                ours = cache.generation  # None once another connection wrote in between
                state = cache.state()
                if ours is None or ours != state.generation:
                    return  # the cache holds changes this memory has not seen: no snapshot of it
                stamp = self._listed_stamp(names, state.cur)
                if stamp is not None:
                    cache.insert([], cur=stamp)
                    if cache.generation is None:  # someone wrote just before our insert
                        return
                    state = cache.state()
                key = state.snapshot_key()
                if state.cur != (0, 0) and key != self._snapshot_key:
                    self._write_snapshot(encode_snapshot(key, infos, names))
                    self._snapshot_key = key
        except (OSError, sqlite3.Error) as e:  # a cache: the next load reads the rows instead
            log.warn("snapshot of {path} not written: {error}", path=self.path, error=e)
        finally:
            self.close()

    def _listed_stamp(self, names: Mapping[int, str], recorded: tuple[int, int]) -> tuple[int, int] | None:
        """``cur/``'s stamp if it moved since ``recorded`` and a listing holds exactly the files of
        ``names`` (the folder as this process leaves it), unchanged while listed; else None.

        Unlike a load's listing, a fresh mtime is accepted: the reactor's names are the authority
        here (one process writes the maildirs), and a later change within the same timestamp
        tick needs a reopen, whose load lists ``cur/`` while the mtime is fresh and so clears
        this stamp before anything can change (`_load`: ``record``)."""
        cur = self.path / "cur"
        before = os.stat(cur)
        stamp = (before.st_mtime_ns, before.st_ino)
        if stamp == recorded or before.st_mtime_ns <= 0:
            return None
        listed = [n for n in os.listdir(cur) if acceptable_name(n)]
        after = os.stat(cur)
        if (after.st_mtime_ns, after.st_ino) != stamp or len(listed) != len(names):
            return None
        return stamp if set(listed) == set(names.values()) else None

    def _write_snapshot(self, data: bytes) -> None:
        """Replace the snapshot atomically: a crash leaves the old one or the new one, whole."""
        replace_file(self.path / SNAPSHOT, data, 0o600, tmp=self.path / (SNAPSHOT + ".tmp"))

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
            stamp = directory_stamp(os.stat(self.path / "cur"), time.time_ns())
            if stamp != (0, 0) and stamp == state.cur:  # unchanged since a listing matched the names
                cur = set(names)
            else:
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
            meta = meta_text(self._analyzer(wire))
        except Exception:
            log.failure("analyzer failed on {path}; indexed without meta", path=self.path / "cur" / name)
            meta = "{}"
        flags = message_flags(name, keywords)
        return Entry(message_info(uid, len(wire), date, flags, header_section(wire), LazyMeta(meta)), name)

    # -- changes

    def prepare_append(self) -> None:
        """Make the empty file the next APPEND writes, between one APPEND's reply and the next:
        creating an inode can cost as much as an fsync (ext4 without a journal scans past recently
        freed inodes; docs/performance.md, fourth round), and made here it overlaps the client's
        round trips instead of adding to the next APPEND.  A fresh name and ``O_EXCL`` each time,
        so no two processes or folders ever share it; `close` removes an unused one."""
        if self._spare is None:
            name = SPARE + fresh_base(0)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            self._spare = os.open(self.path / "tmp" / name, flags, 0o600), name

    def append(self, data: bytes, flags: frozenset[str], internal_date: float | None) -> Entry:
        """APPEND: tmp/ write (into the spare file if there is one), fsync, rename into cur/ with
        its flags, fsync cur/, uidlist line."""
        base = fresh_base(len(data))
        final = name_with_flags(base, flags)
        if self._spare is not None:
            (fd, spare), self._spare = self._spare, None
            tmp = self.path / "tmp" / spare
        else:
            tmp = self.path / "tmp" / base
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
        (RENAME INBOX).  Flags, internal date and cached metadata come along (the sources' details
        must be readable: `_Folder.load_details`); sources that vanished meanwhile are skipped.  Returns
        (source uid, new entry) pairs."""
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
                (old.info.uid, Entry(_copied(old.info, self.uidnext + i), final))
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

    def set_flags(
        self,
        infos: Sequence[MessageInfo],
        names: Sequence[str],
        outcome: Mapping[frozenset[str], frozenset[str]],
        progress: Callable[[list[MessageInfo]], None] | None = None,
    ) -> tuple[list[MessageInfo], list[str]]:
        """STORE: rename each file (``names[i]`` is the file of ``infos[i]``) for its new flags,
        ``outcome[old flags]`` (keywords: the cache only); fsync cur/ once.  Returns the new infos
        and file names of those done, in order: a message whose file vanished is left out.
        ``progress`` gets the new infos every `SET_FLAGS_BATCH` renames (and the last few), as
        they are made, before the fsync.

        The loop runs once per message of a ``STORE 1:*``: names relative to one ``cur/``
        descriptor (``renameat``: no path walk per message, ~10 % of the loop), and the new infos
        are made column by column per batch (`_made_infos`), no tuple per message."""
        suffixes: dict[tuple[str, frozenset[str]], str] = {}  # (old letters, old flags) -> ":2,<letters>"
        done: list[MessageInfo] = []
        new_names: list[str] = []
        made: list[MessageInfo] = []

        def make_done() -> None:
            fresh = _with_flags(done[len(made) :], outcome)
            made.extend(fresh)
            if progress is not None and fresh:
                progress(fresh)

        cur = _open_directory(self.path / "cur")
        rename = partial(os.rename, src_dir_fd=cur, dst_dir_fd=cur)
        try:
            for info, old_name in zip(infos, names, strict=True):
                base, sep, letters = old_name.rpartition(INFO)
                if not sep:
                    base, letters = old_name, ""
                suffix = suffixes.get((letters, info.flags))
                if suffix is None:
                    wanted = outcome[info.flags]
                    suffix = suffixes[letters, info.flags] = name_with_flags(old_name, wanted)[len(base) :]
                name = base + suffix
                if name != old_name:
                    try:
                        rename(old_name, name)
                    except FileNotFoundError:
                        continue
                done.append(info)
                new_names.append(name)
                if len(done) - len(made) == SET_FLAGS_BATCH:
                    make_done()
        finally:
            os.close(cur)
        make_done()
        if not made:
            return [], []
        fsync_dir(self.path / "cur")
        flags = list(map(_flags_attr, made))
        texts = {new: keywords_text(new) for new in set(flags)}
        changed = list(zip(new_names, map(texts.__getitem__, flags), map(_uid_attr, made), strict=True))
        self._cache_do(lambda: self._db().update(changed))
        return made, new_names

    def remove(self, entries: Sequence[Entry], unlink: bool = True) -> None:
        """EXPUNGE: unlink the files, fsync cur/, drop the cache rows (``unlink=False``: the files
        were moved away already, only forget them)."""
        if unlink:
            for entry in entries:
                _unlink(self.path / "cur" / entry.name)
            fsync_dir(self.path / "cur")
        if entries:
            self._cache_do(lambda: self._db().delete([e.info.uid for e in entries]))

    def read_many(self, files: Mapping[int, tuple[str, int]]) -> tuple[dict[int, bytes], list[int]]:
        """Several messages (UID → file name and indexed wire size) in wire form, in one pool job:
        a thread hop costs more than reading a 4 KiB file.  Returns those read, and the UIDs whose
        file was renamed or removed meanwhile.

        A file as long as its wire size has no bare LF (each one makes the wire form a byte
        longer), so it is returned as read: the conversion's scans cost more than the read."""
        found: dict[int, bytes] = {}
        vanished: list[int] = []
        cur = _open_directory(self.path / "cur")
        try:
            for uid, (name, size) in files.items():
                try:
                    raw = read_sized(cur, name, size)
                except FileNotFoundError:
                    vanished.append(uid)
                    continue
                found[uid] = raw if len(raw) == size else wire_form(raw)
        finally:
            os.close(cur)
        return found, vanished

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        if self._uidlist_fd >= 0:
            os.close(self._uidlist_fd)
            self._uidlist_fd = -1
        if self._spare is not None:
            (fd, name), self._spare = self._spare, None
            os.close(fd)
            try:
                os.unlink(self.path / "tmp" / name)
            except OSError:  # the folder was deleted or renamed away meanwhile: nothing to tidy
                pass

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
        replace_file(self.path / UIDLIST, data, 0o600, tmp=self.path / (UIDLIST + ".tmp"), sync_dir=True)
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


def _copied(info: MessageInfo, uid: int) -> MessageInfo:
    """``info`` as message ``uid`` of another folder: its details travel with it, read out."""
    return message_info(uid, info.size, info.internal_date, info.flags, info.headers, info.meta)


def uid_of(info: MessageInfo) -> int:
    return info.uid


def _open_directory(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def read_sized(directory: int, name: str, size: int) -> bytes:
    """File ``name`` of open ``directory``, expected to be at most ``size`` bytes: one ``read``
    of ``size + 1`` (a regular file reads short only at its end), more only if it is longer."""
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory)
    try:
        data = os.read(fd, size + 1)
        if len(data) > size:  # not the file that was indexed: the rest too
            parts = [data]
            while chunk := os.read(fd, 1 << 16):
                parts.append(chunk)
            data = b"".join(parts)
    finally:
        os.close(fd)
    return data


def read_large_file(path: str) -> bytes:
    """A whole large file (a snapshot: megabytes) in one read of its size: no chunks to join."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = [os.read(fd, os.fstat(fd).st_size + 1)]
        while parts[-1]:  # it grew meanwhile (or a short read): the rest
            parts.append(os.read(fd, 1 << 20))
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 2 else b"".join(parts)


def _copy_file(source: Path, target: Path, tmp: Path) -> None:
    """A durable copy through ``tmp`` keeping the mtime (the internal date); on any failure (a
    full disk) ``tmp`` is removed, so nothing half-written stays behind."""
    with open(source, "rb") as f:
        data = f.read()
        mtime = os.fstat(f.fileno()).st_mtime
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            write_all(fd, data)
            os.utime(fd, (mtime, mtime))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
