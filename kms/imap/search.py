# -*- test-case-name: tests.test_imap_search -*-
"""SEARCH (RFC 3501 §6.4.4, and RFC 5032 OLDER/YOUNGER) evaluated over the mailbox index.

`parse_search` turns the command's arguments, decoded by `kms.imap.parser.search_tokens` (which
settles the CHARSET), into a program of frozen dataclasses, or raises `ParseError`; `matches`
runs it against one `MessageInfo`.  Everything but BODY and TEXT is answered from the index:
header keys from the decoded header texts the analyzer cached (``meta["search"]``, see
`header_texts`), SENT* from ``meta["sent"]``, so SEARCH FROM over a large mailbox is a substring
test per message.  `needs_body` tells the server when it must read messages (off the reactor)
and hand them over through `SearchContext.body`.

Matching is case-insensitive substring search on decoded text: RFC 2047 words and body
charsets decoded (undecodable bytes replaced), both sides `str.casefold`-ed.  Header text is
the unfolded value; with several fields of one name, any may match.  A message without a Date
header (or with one that does not parse) is SENT on its internal date.  Dates compare as
calendar days: SENT* on the day written in the Date header, BEFORE/ON/SINCE on the UTC day of
the internal date.
"""

from __future__ import annotations

import binascii
import datetime
import email.utils
import re
import time
from bisect import bisect_right
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kms.imap.parser import ParseError, number, parse_date, parse_sequence_set, resolve_set
from kms.imap.sections import Entity, field_text, fields, header_fields, mime_tree
from kms.store.interfaces import MessageInfo, may_contain

MAX_DEPTH = 100  # nesting of NOT / OR / parentheses
MAX_NUMBER = 2**63 - 1  # LARGER, SMALLER, OLDER, YOUNGER (number64, as IMAP4rev2 has them)
SEARCH_HEADERS = ("from", "to", "cc", "bcc", "subject")  # the header keys cached in meta["search"]


# --- the program ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Key:
    """One search key: ``name`` upper-case as in RFC 3501; ``args`` already converted (see `parse_search`)."""

    name: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class And:
    keys: tuple[Program, ...]


@dataclass(frozen=True, slots=True)
class Or:
    left: Program
    right: Program


@dataclass(frozen=True, slots=True)
class Not:
    key: Program


@dataclass(frozen=True, slots=True)
class NumberSet:
    """A sequence set (``uid`` False) or ``UID`` set, as `kms.imap.parser.parse_sequence_set` gives it.

    ``*`` is the largest number in use, known only when matching (`SearchContext`): the set is
    resolved then, by `kms.imap.parser.resolve_set`.
    """

    ranges: tuple[tuple[int, int], ...]
    uid: bool


Program = Key | And | Or | Not | NumberSet


def _no_body(uid: int) -> bytes | None:
    return None


@dataclass
class SearchContext:
    """What one SEARCH command knows beyond the message: the mailbox's extent, the session's
    \\Recent UIDs, the clock (OLDER/YOUNGER), and the messages read for BODY/TEXT (by UID)."""

    max_seq: int
    max_uid: int
    now: float = 0.0
    recent: Container[int] = frozenset()
    body: Callable[[int], bytes | None] = _no_body
    _texts: tuple[int, tuple[str, str] | None] = field(default=(0, None), init=False, repr=False)
    _sets: dict[int, tuple[NumberSet, list[int], list[int]]] = field(
        default_factory=dict, init=False, repr=False
    )


# --- parsing -------------------------------------------------------------------------------------

_STRING_KEYS = frozenset({"BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"})
_DATE_KEYS = frozenset({"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"})
_NUMBER_KEYS = frozenset({"LARGER", "SMALLER", "OLDER", "YOUNGER"})
_FLAG_KEYS = {
    "ANSWERED": "\\Answered",
    "DELETED": "\\Deleted",
    "DRAFT": "\\Draft",
    "FLAGGED": "\\Flagged",
    "SEEN": "\\Seen",
}
_BARE_KEYS = frozenset({"ALL", "NEW", "OLD", "RECENT", *_FLAG_KEYS, *("UN" + key for key in _FLAG_KEYS)})


def _day_number(year: int, month: int, day: int) -> int:
    """A calendar day as the YYYYMMDD int that date keys compare."""
    return year * 10000 + month * 100 + day


def _date(text: str) -> int:
    day = parse_date(text)
    return _day_number(day.year, day.month, day.day)


def _parse_keys(tokens: Sequence[object], depth: int) -> Program:
    keys = []
    pos = 0
    while pos < len(tokens):
        key, pos = _parse_key(tokens, pos, depth)
        keys.append(key)
    if not keys:
        raise ParseError("Missing search key")
    return keys[0] if len(keys) == 1 else And(tuple(keys))


def _parse_key(tokens: Sequence[object], pos: int, depth: int) -> tuple[Program, int]:
    if depth > MAX_DEPTH:
        raise ParseError("Search program nested too deeply")
    token = tokens[pos]
    pos += 1
    if isinstance(token, list):
        return _parse_keys(token, depth + 1), pos
    if not isinstance(token, str):
        raise ParseError("Invalid search key")
    name = token.upper() if token.isascii() else token

    def argument() -> str:
        nonlocal pos
        if pos >= len(tokens) or not isinstance(tokens[pos], str):
            raise ParseError(f"{name[:40]} needs an argument")
        pos += 1
        return str(tokens[pos - 1])

    if name in _BARE_KEYS:
        return Key(name), pos
    if name in _STRING_KEYS:
        return Key(name, (argument().casefold(),)), pos
    if name in _DATE_KEYS:
        return Key(name, (_date(argument()),)), pos
    if name in _NUMBER_KEYS:
        return Key(name, (number(argument(), "number", nonzero=False, maximum=MAX_NUMBER),)), pos
    if name in ("KEYWORD", "UNKEYWORD"):
        keyword = argument()
        return Key(name, (keyword, keyword.casefold())), pos
    if name == "HEADER":
        header = argument()
        return Key(name, (header, argument().casefold())), pos
    if name == "UID":
        return NumberSet(parse_sequence_set(argument()), uid=True), pos
    if name == "NOT":
        if pos >= len(tokens):
            raise ParseError("NOT needs a search key")
        key, pos = _parse_key(tokens, pos, depth + 1)
        return Not(key), pos
    if name == "OR":
        if pos + 1 >= len(tokens):
            raise ParseError("OR needs two search keys")
        left, pos = _parse_key(tokens, pos, depth + 1)
        if pos >= len(tokens):
            raise ParseError("OR needs two search keys")
        right, pos = _parse_key(tokens, pos, depth + 1)
        return Or(left, right), pos
    if token[:1].isdigit() or token[:1] == "*":
        return NumberSet(parse_sequence_set(token), uid=False), pos
    raise ParseError(f"Unknown search key {token[:40]}")


def parse_search(tokens: Sequence[object]) -> Program:
    """The program for SEARCH's keys as `kms.imap.parser.search_tokens` gives them: atoms and
    strings as decoded str (the CHARSET is settled there), parenthesized groups as lists.

    Arguments become: string keys the casefolded term; dates YYYYMMDD ints;
    LARGER/SMALLER/OLDER/YOUNGER ints; KEYWORD (keyword, casefolded keyword); HEADER (field
    name, casefolded term); sequence and UID sets `NumberSet` with the parser's ranges.
    """
    return _parse_keys(tokens, 0)


def _uses(program: Program, names: frozenset[str]) -> bool:
    """Whether any key of the program is one of ``names``."""
    if isinstance(program, Key):
        return program.name in names
    if isinstance(program, And):
        return any(_uses(key, names) for key in program.keys)
    if isinstance(program, Or):
        return _uses(program.left, names) or _uses(program.right, names)
    if isinstance(program, Not):
        return _uses(program.key, names)
    return False


_BODY_KEYS = frozenset(("BODY", "TEXT"))
_DETAIL_KEYS = frozenset("SENTBEFORE SENTON SENTSINCE HEADER FROM TO CC BCC SUBJECT".split())


def needs_body(program: Program) -> bool:
    """Whether matching reads message bodies (BODY, TEXT): only then must the server load them."""
    return _uses(program, _BODY_KEYS)


def needs_details(program: Program) -> bool:
    """Whether matching reads the cached header section or meta (header keys, SENT*): only then
    must the server make them readable (`FolderView.details`)."""
    return _uses(program, _DETAIL_KEYS)


# --- decoding ------------------------------------------------------------------------------------

_CTE = b"content-transfer-encoding"
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([BbQq])\?([^?\s]*)\?=")


def _decode_bytes(data: bytes, charset: str) -> str:
    charset = charset.partition("*")[0].strip().strip('"').lower()  # RFC 2231 "utf-8*en"
    if charset in ("", "us-ascii", "ascii"):
        charset = "utf-8"  # 8-bit text labelled US-ASCII is nearly always UTF-8
    try:
        return data.decode(charset, "replace")
    except (LookupError, ValueError):  # unknown charset, or a codec that is not a text encoding
        return data.decode("utf-8", "replace")


def _encoded_word(match: re.Match[str]) -> str:
    payload = match[3].encode("ascii", "replace")
    try:
        if match[2] in "Bb":
            data = binascii.a2b_base64(payload + b"==")
        else:
            data = binascii.a2b_qp(payload, header=True)
    except binascii.Error:
        return match[0]
    return _decode_bytes(data, match[1])


def decode_words(text: str) -> str:
    """RFC 2047 encoded words decoded; blank space between two adjacent words dropped (§6.2)."""
    if "=?" not in text:
        return text
    out, pos, after_word = [], 0, False
    for match in _ENCODED_WORD.finditer(text):
        gap = text[pos : match.start()]
        if not (after_word and (gap.isspace() or not gap)):
            out.append(gap)
        out.append(_encoded_word(match))
        pos, after_word = match.end(), True
    out.append(text[pos:])
    return "".join(out)


def _searchable(raw: bytes) -> str:
    return decode_words(field_text(raw)).casefold()


def header_texts(header: bytes) -> dict[str, str]:
    """The decoded, casefolded From/To/Cc/Bcc/Subject of a header section (fields joined by LF).

    The analyzer caches this as ``meta["search"]``; a name is absent when the header has no such field.
    """
    found: dict[str, list[str]] = {}
    for name, raw in fields(header):
        key = name.decode("ascii")
        if key in SEARCH_HEADERS:
            found.setdefault(key, []).append(_searchable(raw))
    return {key: "\n".join(values) for key, values in found.items()}


def sent_date(header: bytes) -> int | None:
    """The day of the first Date field as YYYYMMDD, in its own time zone; None if absent or unparsable."""
    raw = next((raw for name, raw in fields(header) if name == b"date"), None)
    if raw is None:
        return None
    try:
        parsed = email.utils.parsedate_tz(field_text(raw))
        if parsed is None:
            return None
        day = datetime.date(*parsed[:3])
    except (ValueError, TypeError, IndexError, OverflowError):  # parsedate_tz's failure modes
        return None
    return _day_number(day.year, day.month, day.day)


def _text_parts(message: bytes, entity: Entity, out: list[str]) -> None:
    """The decoded text/* bodies and encapsulated headers under ``entity``, in order."""
    if entity.is_multipart:
        for child in entity.children:
            _text_parts(message, child, out)
    elif entity.is_message:
        inner = entity.children[0]
        out.extend(_searchable(raw) for _, raw in fields(message[inner.start : inner.body_start]))
        _text_parts(message, inner, out)
    elif entity.type.lower() == "text":
        data = message[entity.body_start : entity.end]
        header = fields(message[entity.start : entity.body_start])
        encoding = next((field_text(raw).lower() for name, raw in header if name == _CTE), "")
        try:
            if encoding == "base64":
                data = binascii.a2b_base64(data + b"==")
            elif encoding == "quoted-printable":
                data = binascii.a2b_qp(data)
        except binascii.Error:
            pass  # search the encoded text rather than nothing
        out.append(_decode_bytes(data, entity.param("charset") or "").casefold())


def message_texts(message: bytes) -> tuple[str, str]:
    """(header text, body text) of a message in wire form, decoded and casefolded, for TEXT and BODY."""
    root = mime_tree(message)
    parts: list[str] = []
    _text_parts(message, root, parts)
    header = fields(message[: root.body_start])
    return "\n".join(f"{name.decode('ascii')}: {_searchable(raw)}" for name, raw in header), "\n".join(parts)


# --- matching ------------------------------------------------------------------------------------

_Match = Callable[[tuple[Any, ...], MessageInfo, int, SearchContext], bool]


def _day(timestamp: float) -> int:
    day = time.gmtime(timestamp)
    return _day_number(day.tm_year, day.tm_mon, day.tm_mday)


def _sent(info: MessageInfo) -> int:
    sent = info.meta["sent"] if "sent" in info.meta else sent_date(info.headers)
    return sent if isinstance(sent, int) else _day(info.internal_date)


def _header_text(info: MessageInfo, name: str) -> str | None:
    cached = info.meta.get("search")
    texts = cached if isinstance(cached, Mapping) else header_texts(info.headers)
    return texts.get(name)


def _header_key(name: str) -> _Match:
    field_name = name.lower()

    def match(args: tuple[Any, ...], info: MessageInfo, seq: int, context: SearchContext) -> bool:
        if not may_contain(info.meta, "search", args[0]):  # most messages: their texts stay undecoded
            return False
        text = _header_text(info, field_name)
        return text is not None and args[0] in text

    return match


def _header(args: tuple[Any, ...], info: MessageInfo, seq: int, context: SearchContext) -> bool:
    name, term = args
    return any(term in _searchable(raw) for _, raw in fields(header_fields(info.headers, (name,))))


def _texts(info: MessageInfo, context: SearchContext) -> tuple[str, str] | None:
    """The message's decoded texts, kept while its keys are matched (one message at a time)."""
    if context._texts[0] != info.uid:
        message = context.body(info.uid)
        context._texts = (info.uid, None if message is None else message_texts(message))
    return context._texts[1]


def _body(args: tuple[Any, ...], info: MessageInfo, seq: int, context: SearchContext) -> bool:
    texts = _texts(info, context)
    return texts is not None and args[0] in texts[1]


def _text(args: tuple[Any, ...], info: MessageInfo, seq: int, context: SearchContext) -> bool:
    texts = _texts(info, context)
    return texts is not None and (args[0] in texts[0] or args[0] in texts[1])


def _keyword(args: tuple[Any, ...], info: MessageInfo, seq: int, context: SearchContext) -> bool:
    keyword, folded = args
    return keyword in info.flags or any(flag.casefold() == folded for flag in info.flags)


def _flag(flag: str, present: bool) -> _Match:
    def match(args: tuple[Any, ...], info: MessageInfo, seq: int, context: SearchContext) -> bool:
        return (flag in info.flags) is present

    return match


_KEYS: dict[str, _Match] = {
    "ALL": lambda args, info, seq, context: True,
    "NEW": lambda args, info, seq, context: info.uid in context.recent and "\\Seen" not in info.flags,
    "OLD": lambda args, info, seq, context: info.uid not in context.recent,
    "RECENT": lambda args, info, seq, context: info.uid in context.recent,
    "KEYWORD": _keyword,
    "UNKEYWORD": lambda args, info, seq, context: not _keyword(args, info, seq, context),
    "LARGER": lambda args, info, seq, context: info.size > args[0],
    "SMALLER": lambda args, info, seq, context: info.size < args[0],
    "BEFORE": lambda args, info, seq, context: _day(info.internal_date) < args[0],
    "ON": lambda args, info, seq, context: _day(info.internal_date) == args[0],
    "SINCE": lambda args, info, seq, context: _day(info.internal_date) >= args[0],
    "SENTBEFORE": lambda args, info, seq, context: _sent(info) < args[0],
    "SENTON": lambda args, info, seq, context: _sent(info) == args[0],
    "SENTSINCE": lambda args, info, seq, context: _sent(info) >= args[0],
    "OLDER": lambda args, info, seq, context: context.now - info.internal_date > args[0],
    "YOUNGER": lambda args, info, seq, context: context.now - info.internal_date <= args[0],
    "HEADER": _header,
    "BODY": _body,
    "TEXT": _text,
    **{key: _header_key(key) for key in ("FROM", "TO", "CC", "BCC", "SUBJECT")},
    **{key: _flag(flag, True) for key, flag in _FLAG_KEYS.items()},
    **{"UN" + key: _flag(flag, False) for key, flag in _FLAG_KEYS.items()},
}


def _bounds(numbers: NumberSet, context: SearchContext) -> tuple[list[int], list[int]]:
    """The set with ``*`` resolved, as merged (lows, highs), worked out once per SEARCH."""
    cached = context._sets.get(id(numbers))
    if cached is None or cached[0] is not numbers:
        spans = resolve_set(numbers.ranges, context.max_uid if numbers.uid else context.max_seq)
        cached = context._sets[id(numbers)] = (
            numbers,
            [low for low, _ in spans],
            [high for _, high in spans],
        )
    return cached[1], cached[2]


def matches(program: Program, info: MessageInfo, seq: int, context: SearchContext) -> bool:
    """Whether the message with sequence number ``seq`` satisfies the program."""
    if isinstance(program, Key):
        return _KEYS[program.name](program.args, info, seq, context)
    if isinstance(program, And):
        for key in program.keys:
            if not matches(key, info, seq, context):
                return False
        return True
    if isinstance(program, Or):
        return matches(program.left, info, seq, context) or matches(program.right, info, seq, context)
    if isinstance(program, Not):
        return not matches(program.key, info, seq, context)
    lows, highs = _bounds(program, context)
    number = info.uid if program.uid else seq
    index = bisect_right(lows, number) - 1
    return index >= 0 and number <= highs[index]
