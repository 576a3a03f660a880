# -*- test-case-name: tests.test_imap_sections -*-
"""FETCH body sections (RFC 3501 §6.4.5) cut out of a message in wire form, and the MIME walk behind them.

`mime_tree` is the one place that decides where a part starts and what a part's type is (where a
header ends is `kms.wireform.body_start`, the rule the store indexes headers by); `kms.imap.message`
builds BODYSTRUCTURE from the same tree, so the part numbers a client reads in BODYSTRUCTURE are
exactly the bytes ``BODY[n]`` returns.  It works on offsets into the message and never decodes a
body, so it is linear in the message size.

Hostile input has defined meanings rather than errors:

* The header ends at the first empty line; with none, the whole entity is header and the body empty.
* A multipart whose boundary is missing or never occurs, or a multipart or message/rfc822 nested
  deeper than `MAX_DEPTH` or past `MAX_PARTS`, is taken as text/plain (so BODY[1] is its body), as
  is any part with an unparsable Content-Type.
* A delimiter is ``--boundary`` at the start of a line followed only by ``--``, blanks and the line
  end; a missing close delimiter ends the last part at the end of its parent.
* A part number that does not exist, or HEADER/TEXT on a part that is not message/rfc822, is "".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

from kms.wireform import body_start, header_section

MAX_DEPTH = 50  # multipart / message/rfc822 nesting beyond which a part is a plain leaf
MAX_PARTS = 1000  # entities in one message; the part that reaches it runs to its multipart's end
MAX_FIELD = 64 * 1024  # characters of a header field value that are interpreted

_Type = tuple[str, str, tuple[tuple[str, str], ...]]
TEXT_PLAIN: _Type = ("TEXT", "PLAIN", (("CHARSET", "US-ASCII"),))  # RFC 2045 §5.2 default
_SECTION_TEXTS = frozenset({"", "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"})

# A header field with its continuation lines, found after the LF that ends the line before it (the
# caller puts one in front of the header): a leading literal lets the regex engine skip from line to
# line.  Names are RFC 5322 ftext; a line without a colon or starting with a blank starts no field.
_FIELD = re.compile(rb"\n([\x21-\x39\x3b-\x7e]++)[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)")
FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`{|}~0-9A-Za-z]+")  # RFC 2045 token
_PARAM = re.compile(r';\s*([^\s;=]+)\s*(?:=\s*(?:"((?:[^"\\]|\\.)*)(?:"|\Z)|([^;]*)))?', re.S)
_UNESCAPE = re.compile(r"\\(.)", re.S)
_ATOM = re.compile(r"[^\x00-\x20\x7f-\U0010ffff(){%*\"\\\]]+")


# --- header fields -------------------------------------------------------------------------------


def _framed(header: bytes) -> bytes:
    """A header section with a LF before it and after its last line, as the field regexes want."""
    return b"\n" + header if header.endswith(b"\n") else b"\n" + header + b"\r\n"


def fields(header: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(lower-case name, raw value with its folding) for each field of a header section."""
    for match in _FIELD.finditer(_framed(header)):
        yield match[1].lower(), match[2]


def field_text(raw: bytes) -> str:
    """A raw field value unfolded and stripped, as text: UTF-8 when valid, else Latin-1 (never fails).

    Cut at `MAX_FIELD` characters, so a hostile field cannot blow up what is derived from it.
    """
    value = _FOLD.sub(b"", raw).strip()
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = value.decode("latin-1")
    return text[:MAX_FIELD]


@lru_cache(maxsize=256)
def _fields_pattern(names: tuple[str, ...], negate: bool) -> re.Pattern[bytes]:
    """One regex per requested name list: a client asks the same list for every message in a FETCH."""
    wanted = sorted({re.escape(name.encode("ascii")) for name in names if FIELD_NAME.fullmatch(name)})
    alternatives = b"|".join(wanted) or b"(?!)"
    name = rb"(?!(?:%s)[ \t]*:)[\x21-\x39\x3b-\x7e]++" % alternatives if negate else rb"(?:%s)" % alternatives
    return re.compile(rb"\n(%s[ \t]*:[^\n]*(?:\n[ \t][^\n]*)*)" % name, re.I)


def header_fields(headers: bytes, names: Iterable[str], negate: bool = False) -> bytes:
    """``HEADER.FIELDS`` (or ``.NOT`` when ``negate``) of a header section, e.g. `MessageInfo.headers`.

    The matching fields come out as the raw bytes they were (continuation lines, 8-bit text and
    all) in their original order, then the empty line RFC 3501 includes even when nothing matched.
    ``headers`` must stop at the header's end (`header_section`): it is not searched for one,
    which would cost as much as the match itself.
    """
    found = _fields_pattern(tuple(names), negate).findall(_framed(headers))
    return b"\n".join(found) + b"\n\r\n" if found else b"\r\n"


# --- the MIME tree -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entity:
    """A message or body part at ``message[start:end]``; its body starts at ``body_start``.

    ``type``/``subtype``/``params`` are as written, as Latin-1 views of the raw bytes (the defaults
    when absent or unusable); ``children`` are a multipart's parts, or the one encapsulated message
    of a message/rfc822.
    """

    start: int
    body_start: int
    end: int
    type: str
    subtype: str
    params: tuple[tuple[str, str], ...]
    children: tuple[Entity, ...] = ()

    @property
    def is_multipart(self) -> bool:
        return bool(self.children) and self.type.lower() == "multipart"

    @property
    def is_message(self) -> bool:
        return bool(self.children) and self.type.lower() == "message"

    def param(self, name: str) -> str | None:
        """The first parameter called ``name`` (case-insensitive), or None."""
        return next((value for key, value in self.params if key.lower() == name.lower()), None)


def parse_params(value: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``type/subtype; a=b; c="q;\\"x"`` -> ("type/subtype", (("a", "b"), ("c", 'q;"x'))).

    Values lose their quoting; parameters without a name or a value are dropped, RFC 2231
    ``name*0*=`` parameters are kept as written (IMAP returns them raw).
    """
    main, semicolon, _ = value.partition(";")
    params = []
    if semicolon:
        for match in _PARAM.finditer(value, len(main)):
            if match[2] is not None:
                params.append((match[1], _UNESCAPE.sub(r"\1", match[2])))
            elif match[3] is not None and match[3].strip():
                params.append((match[1], match[3].strip()))
    return main.strip(), tuple(params)


def _content_type(message: bytes, start: int, end: int, in_digest: bool) -> _Type:
    for name, raw in fields(message[start:end]):
        if name == b"content-type":
            main, params = parse_params(_FOLD.sub(b"", raw).decode("latin-1")[:MAX_FIELD])
            kind, slash, subtype = main.partition("/")
            kind, subtype = kind.strip(), subtype.strip()
            if slash and _TOKEN.fullmatch(kind) and _TOKEN.fullmatch(subtype):
                return kind, subtype, params
            return TEXT_PLAIN
    return ("MESSAGE", "RFC822", ()) if in_digest else TEXT_PLAIN  # RFC 2046 §5.1.5


def _line_break_before(message: bytes, index: int, floor: int) -> int:
    """The start of the line break that ends at ``index`` (it belongs to the delimiter after it)."""
    if index - 2 >= floor and message[index - 2 : index] == b"\r\n":
        return index - 2
    if index - 1 >= floor and message[index - 1] == 0x0A:
        return index - 1
    return index


def _split(message: bytes, start: int, end: int, boundary: bytes, limit: int) -> list[tuple[int, int]]:
    """(start, end) of each part between ``--boundary`` lines (RFC 2046 §5.1.1); at most ``limit``."""
    delimiter = b"--" + boundary
    parts: list[tuple[int, int]] = []
    part_start = -1
    pos = start
    while (index := message.find(delimiter, pos, end)) >= 0:
        pos = index + len(delimiter)
        if index > start and message[index - 1] != 0x0A:
            continue
        close = message.startswith(b"--", pos, end)
        after = pos + 2 if close else pos
        while after < end and message[after] in b" \t":  # transport padding
            after += 1
        if message.startswith(b"\r\n", after, end):
            after += 2
        elif message.startswith((b"\n", b"\r"), after, end):
            after += 1
        elif after < end:
            continue  # "--boundaryX": another boundary that starts with this one
        if part_start >= 0:
            parts.append((part_start, max(part_start, _line_break_before(message, index, start))))
        if close:
            return parts
        part_start = pos = after
        if len(parts) + 1 >= limit:
            break
    if part_start >= 0:
        parts.append((part_start, end))
    return parts


def _entity(message: bytes, start: int, end: int, depth: int, in_digest: bool, budget: list[int]) -> Entity:
    budget[0] -= 1  # parts left in the message (a list, so the recursion shares it)
    body = body_start(message, start, end)
    kind, subtype, params = _content_type(message, start, body, in_digest)
    composite = kind.lower() == "multipart" or (kind.lower(), subtype.lower()) == ("message", "rfc822")
    if composite and depth < MAX_DEPTH and budget[0] > 0:
        if kind.lower() == "message":
            inner = _entity(message, body, end, depth + 1, False, budget)
            return Entity(start, body, end, kind, subtype, params, (inner,))
        boundary = next((value for key, value in params if key.lower() == "boundary"), "")
        spans = _split(message, body, end, boundary.encode("latin-1"), budget[0]) if boundary else []
        if spans:
            digest = subtype.lower() == "digest"
            parts = tuple(_entity(message, s, e, depth + 1, digest, budget) for s, e in spans)
            return Entity(start, body, end, kind, subtype, params, parts)
    if composite:
        kind, subtype, params = TEXT_PLAIN
    return Entity(start, body, end, kind, subtype, params)


def mime_tree(message: bytes) -> Entity:
    """The message's MIME structure, as offsets into it."""
    return _entity(message, 0, len(message), 0, False, [MAX_PARTS])


# --- sections ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """The inside of ``BODY[...]``: part numbers, then "", HEADER, HEADER.FIELDS[.NOT], TEXT or MIME."""

    part: tuple[int, ...] = ()
    text: str = ""
    fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.text not in _SECTION_TEXTS or (self.text == "MIME" and not self.part):
            raise ValueError(f"invalid section text {self.text!r}")
        if bool(self.fields) != self.text.startswith("HEADER.FIELDS"):
            raise ValueError("header field names go with HEADER.FIELDS and HEADER.FIELDS.NOT only")


def _locate(root: Entity, part: tuple[int, ...]) -> Entity | None:
    """The entity a part number names (RFC 3501 §6.4.5), or None when there is no such part."""
    entity, is_message = root, True
    for number in part:
        if not is_message and entity.is_message:
            entity, is_message = entity.children[0], True  # numbers go on into the encapsulated message
        if entity.is_multipart:
            if not 1 <= number <= len(entity.children):
                return None
            entity = entity.children[number - 1]
        elif not is_message or number != 1:
            return None  # a leaf has no parts; a single-part message has only part 1, its body
        is_message = False
    return entity


def fetch_section(message: bytes, section: Section) -> bytes:
    """The bytes of ``BODY[section]`` of a message in wire form ("" for a part that does not exist)."""
    text = section.text
    if section.part:
        entity = _locate(mime_tree(message), section.part)
        if entity is None:
            return b""
        if text == "MIME":
            return message[entity.start : entity.body_start]
        if text == "":
            return message[entity.body_start : entity.end]
        if not entity.is_message:
            return b""
        inner = entity.children[0]
        message = message[inner.start : inner.end]
    if text == "":
        return message
    if text == "TEXT":
        return message[body_start(message) :]
    if text == "HEADER":
        return header_section(message)
    return header_fields(header_section(message), section.fields, negate=text == "HEADER.FIELDS.NOT")


def from_headers(headers: bytes, section: Section) -> bytes | None:
    """``BODY[section]`` from the header section alone when that is enough (HEADER*, no part), else None.

    With `MessageInfo.headers` this answers the header fetches clients run over whole mailboxes
    without opening a message file.
    """
    if section.part or not section.text.startswith("HEADER"):
        return None
    if section.text == "HEADER":
        return header_section(headers)
    return header_fields(headers, section.fields, negate=section.text == "HEADER.FIELDS.NOT")


def partial(data: bytes, origin: int, length: int) -> bytes:
    """The ``<origin.length>`` slice; an origin past the end gives "" (RFC 3501 §6.4.5)."""
    return data[origin : origin + length]


def _astring(name: str) -> str:
    if _ATOM.fullmatch(name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def section_label(section: Section, origin: int | None = None) -> str:
    """The FETCH response label: ``BODY[1.HEADER.FIELDS (FROM TO)]<0>``.

    A partial fetch is labelled with its origin only (``<0>``, not ``<0.10>``: the Twisted I1 bug).
    """
    spec = ".".join([*map(str, section.part), *([section.text] if section.text else [])])
    if section.fields:
        spec += " (" + " ".join(map(_astring, section.fields)) + ")"
    return f"BODY[{spec}]" + ("" if origin is None else f"<{origin}>")
