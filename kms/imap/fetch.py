# -*- test-case-name: tests.test_imap_server -*-
"""FETCH responses built from the in-memory index, and the small response formatters.

Everything but body sections comes from `MessageInfo`: flags, UID, size and date directly,
ENVELOPE/BODYSTRUCTURE/BODY from the analyzer's ``meta`` (cached in wire syntax), and top-level HEADER and
HEADER.FIELDS from the cached header section, so ``FETCH 1:* (FLAGS UID ENVELOPE)`` over
100,000 messages never touches the disk.  Only sections of the body need the message itself.

Every header or body byte goes out as a literal (counted, never re-encoded), so a non-ASCII or
otherwise broken header can never break a response (Twisted bug I4).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from operator import attrgetter

from kms.imap.parser import MONTHS, BodyFetch, FetchItem
from kms.imap.sections import fetch_section, from_headers, partial, section_label
from kms.store.interfaces import MessageInfo

MAX_QUOTED = 1000  # longer strings are sent as literals
_SPECIALS = frozenset('"\\')


def quote(text: str) -> str:
    """An IMAP string: quoted when it can be one (printable ASCII, not long), else a literal of its
    UTF-8, NUL removed (not even a literal may carry NUL, RFC 3501 §4.3)."""
    if len(text) <= MAX_QUOTED and text.isascii() and text.isprintable():
        if _SPECIALS.isdisjoint(text):
            return f'"{text}"'
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    text = text.replace("\x00", "")
    return f"{{{len(text.encode('utf-8', 'replace'))}}}\r\n{text}"


_flag_text: dict[frozenset[str], bytes] = {}


def format_flags(flags: frozenset[str]) -> bytes:
    """``(\\Flagged \\Seen)``; cached per flag set (the store shares one object per distinct set)."""
    text = _flag_text.get(flags)
    if text is None:
        if len(_flag_text) > 4096:
            _flag_text.clear()
        text = _flag_text[flags] = ("(" + " ".join(sorted(flags)) + ")").encode("utf-8")
    return text


def format_date(stamp: float) -> bytes:
    """INTERNALDATE in UTC: ``"17-Jul-1996 09:44:25 +0000"``."""
    t = time.gmtime(stamp)
    return b'"%02d-%s-%04d %02d:%02d:%02d +0000"' % (
        t.tm_mday,
        MONTHS[t.tm_mon - 1].encode("ascii"),
        t.tm_year,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
    )


def _from_header(item: BodyFetch) -> bool:
    """Top-level HEADER and HEADER.FIELDS[.NOT] come from the cached header section."""
    return not item.section.part and item.section.text.startswith("HEADER")


_NIL_ENVELOPE = "(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"


def _meta_item(name: str) -> Callable[[MessageInfo, bytes | None], bytes]:
    """ENVELOPE, BODY, BODYSTRUCTURE: the analyzer cached them in wire syntax under these names."""
    prefix = name.encode("ascii") + b" "

    def item(info: MessageInfo, message: bytes | None) -> bytes:
        value = info.meta.get(name)
        if value is None:  # a damaged index row: a valid if uninformative answer, never a crash
            value = (
                _NIL_ENVELOPE if name == "ENVELOPE" else f'("TEXT" "PLAIN" NIL NIL NIL "7BIT" {info.size} 0)'
            )
        return prefix + str(value).encode("utf-8")

    return item


def _body_item(item: BodyFetch) -> Callable[[MessageInfo, bytes | None], bytes]:
    section = item.section
    origin = item.partial[0] if item.partial else None
    if item.name:
        label = item.name.encode("ascii")
    else:
        label = section_label(section, origin).encode("utf-8")
    cached = _from_header(item)

    def body(info: MessageInfo, message: bytes | None) -> bytes:
        data = from_headers(info.headers, section) if cached else None
        if data is None:
            assert message is not None  # the plan asked for it
            data = fetch_section(message, section)
        if item.partial is not None:
            data = partial(data, item.partial[0], item.partial[1])
        return b"%b {%d}\r\n%b" % (label, len(data), data)

    return body


class FetchPlan:
    """The attributes of one FETCH, compiled once and applied to every message it names."""

    def __init__(self, items: Sequence[FetchItem], uid: bool, sets_seen: bool) -> None:
        """``uid``: UID FETCH (UID always reported); ``sets_seen``: non-PEEK body items in a
        writable mailbox, so FLAGS is reported with the \\Seen just set (RFC 3501 §6.4.5)."""
        names = [item for item in items if isinstance(item, str)]
        bodies = list(dict.fromkeys(item for item in items if isinstance(item, BodyFetch)))
        self.needs_body = any(not _from_header(item) for item in bodies)
        # the cached header section or meta: readable once `FolderView.details` completed
        self.needs_details = any(map(_from_header, bodies)) or any(
            name in ("ENVELOPE", "BODY", "BODYSTRUCTURE") for name in names
        )
        self._uid = uid or "UID" in names
        self._flags = sets_seen or "FLAGS" in names
        self._items: list[Callable[[MessageInfo, bytes | None], bytes]] = []
        for name in dict.fromkeys(names):
            if name == "INTERNALDATE":
                self._items.append(lambda info, message: b"INTERNALDATE " + format_date(info.internal_date))
            elif name == "RFC822.SIZE":
                self._items.append(lambda info, message: b"RFC822.SIZE %d" % info.size)
            elif name in ("ENVELOPE", "BODY", "BODYSTRUCTURE"):
                self._items.append(_meta_item(name))
        self._items.extend(_body_item(item) for item in bodies)

    def render(self, seq: int, info: MessageInfo, message: bytes | None = None) -> bytes:
        """``* seq FETCH (...)`` with its CRLF; ``message`` (wire form) when `needs_body`."""
        parts = []
        if self._uid:
            parts.append(b"UID %d" % info.uid)
        if self._flags:
            parts.append(b"FLAGS " + format_flags(info.flags))
        for item in self._items:
            parts.append(item(info, message))
        return b"* %d FETCH (%b)\r\n" % (seq, b" ".join(parts))


_uid = attrgetter("uid")
_flags = attrgetter("flags")


def flags_responses(seqs: Iterable[int], infos: Sequence[MessageInfo], uid: bool) -> list[bytes]:
    """`flags_response` for many messages (``seqs[k]`` is the number of ``infos[k]``): a STORE 1:*
    reports 10,000, formatted here by C-level ``map`` calls, one flag text per distinct set."""
    texts = {flags: format_flags(flags) for flags in set(map(_flags, infos))}
    flag_texts = map(texts.__getitem__, map(_flags, infos))
    if uid:
        rows = zip(seqs, map(_uid, infos), flag_texts, strict=True)
        return list(map(b"* %d FETCH (UID %d FLAGS %b)\r\n".__mod__, rows))
    return list(map(b"* %d FETCH (FLAGS %b)\r\n".__mod__, zip(seqs, flag_texts, strict=True)))


def flags_response(seq: int, info: MessageInfo, uid: bool) -> bytes:
    """The untagged FETCH that reports a flag change (STORE, or another session's)."""
    if uid:
        return b"* %d FETCH (UID %d FLAGS %b)\r\n" % (seq, info.uid, format_flags(info.flags))
    return b"* %d FETCH (FLAGS %b)\r\n" % (seq, format_flags(info.flags))
