# -*- test-case-name: tests.test_imap_parser -*-
"""Pure parsing for the IMAP server: bytes to commands, commands to typed arguments.

Nothing here does I/O or keeps connection state beyond the byte assembler's own buffer; a
hostile client's bytes go in, plain values (or `ParseError`, whose text becomes ``tag BAD``)
come out, so `kms.imap.server` only has to act.

`CommandReader` assembles one command at a time from lines and literals (RFC 3501 §4.3,
RFC 7888 LITERAL+) and keeps memory bounded whatever arrives:

* The text of a command (everything but its literals) may be ``max_line`` bytes (64 KiB: a long
  ``UID STORE 1,3,5,...`` must work).  Beyond that the command is answered ``BAD`` at once and
  the rest of it dropped as it arrives; the connection stays up.
* A literal may be ``max_append`` bytes in APPEND (APPENDLIMIT) and ``max_literal`` elsewhere.
  A synchronizing literal over the limit is refused without the ``+`` continuation, so the
  client never sends it; a non-synchronizing one is refused at once and then skipped unread.
* Numbers are bounded before ``int()`` ever sees them, so no digit string can cost CPU or fail
  with an overflow.

SEARCH's ``CHARSET`` is decided here, once (`search_tokens`): the strings of a SEARCH are decoded
with it, and it may be US-ASCII or UTF-8 (the two RFC 3501 §6.4.4 requires; UTF-8 when none is
named).  Any other is refused with ``NO [BADCHARSET (UTF-8 US-ASCII)]``, after which clients
search in UTF-8; `kms.imap.search` only ever sees text.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kms.imap import mutf7
from kms.imap.sections import FIELD_NAME, Section
from kms.store.interfaces import SYSTEM_FLAGS

MAX_LINE = 64 * 1024
MAX_LITERAL = 64 * 1024
MAX_NUMBER = 2**32 - 1  # nz-number / number (RFC 3501 §9)
MAX_DEPTH = 32  # nested parentheses in one command
STAR = 0  # "*" in a sequence set; 0 is never a valid sequence number or UID

_SYSTEM_FLAGS = {flag.upper(): flag for flag in SYSTEM_FLAGS}


class ParseError(Exception):
    """The command is malformed; ``str(error)`` is the text after ``tag BAD``."""


# --- assembling commands from bytes --------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One complete command: its text segments with the literals that came between them.

    ``texts`` has one element more than ``literals``; literal *i* followed text *i*.
    """

    texts: tuple[bytes, ...]
    literals: tuple[bytes, ...]


@dataclass(frozen=True)
class Continue:
    """The client announced a synchronizing literal: send ``+`` so it sends the bytes."""


@dataclass(frozen=True)
class Rejected:
    """The command is refused before it is complete; the reader drops the rest of it."""

    tag: str
    status: str  # "BAD" or "NO"
    code: str  # "" or "TOOBIG"
    text: str


@dataclass(frozen=True)
class Line:
    """A raw line (IDLE's DONE, a SASL response); ``too_long`` lines come without their data."""

    data: bytes
    too_long: bool = False


Event = Command | Continue | Rejected

_LITERAL = re.compile(rb"\{(\d{1,20})(\+?)\}$")
_TAIL = 32  # what we keep of a dropped line: enough to see a trailing "{n+}"
_TAG = re.compile(rb"[\x21\x23\x24\x26\x27\x2c-\x5b\x5d-\x7a\x7c-\x7e]+")


def tag_of(text: bytes) -> str:
    """The tag a reply to this command line must carry: its first word, or ``*`` if unusable."""
    word = text.split(b" ", 1)[0]
    return word.decode("ascii") if _TAG.fullmatch(word) and len(word) <= 64 else "*"


def _command_name(text: bytes) -> bytes:
    words = text.split(b" ", 2)
    return words[1].upper() if len(words) > 1 else b""


class CommandReader:
    """Bytes in, `Command`/`Continue`/`Rejected` (or raw `Line`) out, in bounded memory.

    Feed everything the client sends to `feed`; call `next_command` (or `next_line` in IDLE and
    SASL exchanges, only between commands) until it returns None for "need more input".
    """

    def __init__(self, max_line: int = MAX_LINE, max_literal: int = MAX_LITERAL, max_append: int = 0) -> None:
        self._max_line = max_line
        self._max_literal = max_literal
        self._max_append = max(max_append, max_literal)
        self._buf = bytearray()
        self._scanned = 0  # the first bytes of the buffer known to hold no LF
        self._skip = 0  # bytes of a refused non-synchronizing literal still to drop
        self._raw_drop = False  # dropping the rest of an over-long raw line
        self._overlong = False  # dropping the rest of an over-long command line (tail kept)
        self._tail = b""
        self._literal: bytearray | None = None
        self._literal_size = 0
        self._reset()

    def _reset(self) -> None:
        self._texts: list[bytes] = []
        self._literals: list[bytes] = []
        self._text_size = 0
        self._literal_total = 0
        self._discarding = False  # the command was refused: follow its structure, keep nothing

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed (for pausing the transport)."""
        return len(self._buf)

    @property
    def inside_command(self) -> bool:
        """Part of a command has arrived (a literal, or the line before one) and the rest has not."""
        return bool(self._texts) or self._literal is not None

    def feed(self, data: bytes) -> None:
        self._buf += data

    def clear(self) -> None:
        """Forget buffered input (after STARTTLS: it was sent in clear text); between commands only."""
        self._consume(len(self._buf))
        self._raw_drop = False

    def _find_newline(self) -> int:
        """Where the next LF is, or -1; bytes already searched are not searched again."""
        newline = self._buf.find(b"\n", self._scanned)
        self._scanned = len(self._buf) if newline < 0 else 0
        return newline

    def _consume(self, count: int) -> None:
        del self._buf[:count]
        self._scanned = 0

    def next_command(self) -> Event | None:
        buf = self._buf
        while True:
            if self._skip:
                taken = min(self._skip, len(buf))
                self._consume(taken)
                self._skip -= taken
                if self._skip:
                    return None
                continue
            if self._literal is not None:
                taken = min(self._literal_size - len(self._literal), len(buf))
                self._literal += buf[:taken]
                self._consume(taken)
                if len(self._literal) < self._literal_size:
                    return None
                self._literals.append(bytes(self._literal))
                self._literal = None
                continue
            newline = self._find_newline()
            if self._raw_drop or self._overlong:
                if newline < 0:
                    self._tail = (self._tail + bytes(buf[-_TAIL:]))[-_TAIL:]
                    self._consume(len(buf))
                    return None
                self._tail = (self._tail + bytes(buf[max(0, newline - _TAIL) : newline]))[-_TAIL:]
                self._consume(newline + 1)
                if self._raw_drop:
                    self._raw_drop = False
                    continue
                self._overlong = False
                self._finish_line(self._tail.removesuffix(b"\r"))
                continue
            room = self._max_line - self._text_size
            if newline < 0:
                if len(buf) <= room + 1:  # +1: a CR may still be waiting for its LF
                    return None
                first = self._texts[0] if self._texts else bytes(buf[:256])
                self._tail = bytes(buf[-_TAIL:])
                self._consume(len(buf))
                self._overlong = True
                return self._refuse_line(first)
            line = bytes(buf[:newline]).removesuffix(b"\r")
            self._consume(newline + 1)
            if len(line) > room:
                rejected = self._refuse_line(self._texts[0] if self._texts else line[:256])
                self._finish_line(line[-_TAIL:])
                if rejected is not None:
                    return rejected
                continue
            event = self._finish_line(line)
            if event is not None:
                return event

    def _refuse_line(self, first: bytes) -> Rejected | None:
        if self._discarding:
            return None
        self._discarding = True
        return Rejected(tag_of(first), "BAD", "", "Command line too long")

    def _finish_line(self, line: bytes) -> Event | None:
        """A line of the current command ended: the command is complete or a literal follows."""
        marker = _LITERAL.search(line)
        if self._discarding:
            if marker is not None and marker[2]:
                self._skip = int(marker[1])  # the client sends {n+} bytes whatever we said
            else:
                self._reset()  # a refused command ends here ({n} bytes never come without "+")
            return None
        if marker is None:
            self._texts.append(line)
            command = Command(tuple(self._texts), tuple(self._literals))
            self._reset()
            return command
        size, synchronizing = int(marker[1]), not marker[2]
        text = line[: marker.start()]
        self._texts.append(text)
        self._text_size += len(text)
        append = _command_name(self._texts[0]) == b"APPEND"
        limit = self._max_append if append else self._max_literal
        self._literal_total += size
        if size > limit or self._literal_total > limit + self._max_literal:
            tag = tag_of(self._texts[0])
            if synchronizing:
                self._reset()
            else:
                self._discarding = True
                self._skip = size
            if append:
                return Rejected(tag, "NO", "TOOBIG", "Message too large")
            return Rejected(tag, "BAD", "TOOBIG", "Literal too large")
        self._literal = bytearray()
        self._literal_size = size
        return Continue() if synchronizing else None

    def next_line(self) -> Line | None:
        buf = self._buf
        while True:
            newline = self._find_newline()
            if self._raw_drop:
                if newline < 0:
                    self._consume(len(buf))
                    return None
                self._consume(newline + 1)
                self._raw_drop = False
                continue
            if newline < 0:
                if len(buf) > self._max_line + 1:
                    self._consume(len(buf))
                    self._raw_drop = True
                    return Line(b"", too_long=True)
                return None
            line = bytes(buf[:newline]).removesuffix(b"\r")
            self._consume(newline + 1)
            if len(line) > self._max_line:
                return Line(b"", too_long=True)
            return Line(line)


# --- tokens --------------------------------------------------------------------------------------


class Atom(str):
    """An unquoted word (NIL, flags, sequence sets, ``BODY[...]<o.n>``), apart from quoted strings."""


# Atom: quoted strings, literals and lists are told apart by type: str, bytes, list.
Token = Atom | str | bytes | list  # type: ignore[type-arg]

# An atom may carry one bracketed part with spaces and parentheses in it (``BODY[HEADER.FIELDS
# (A B)]``), as RFC 3501's fetch-att grammar has it.
_ATOM = re.compile(r'(?:[^ ()"\[\x00-\x1f\x7f]|\[[^\]\x00-\x1f\x7f]*\])+')
_QUOTED = re.compile(r'"((?:[^"\\\x00\r\n]|\\["\\])*)"')
_UNESCAPE = re.compile(r"\\(.)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _decode_text(raw: bytes) -> str:
    """Command text as str; 8-bit bytes that are not UTF-8 survive (surrogateescape) for CHARSET."""
    text = raw.decode("utf-8", "surrogateescape")
    if _CONTROL.search(text):
        raise ParseError("Control character in command")
    return text


def _scan(text: str, stack: list[list[Token]]) -> int | None:
    """Tokens of ``text`` onto the stack.  An atom whose ``[`` is not closed in ``text`` is left
    unscanned: its start is returned, for `tokenize` to go on with it after the next literal."""
    pos, end = 0, len(text)
    while pos < end:
        char = text[pos]
        if char == " ":
            pos += 1
        elif char == "(":
            if len(stack) > MAX_DEPTH:
                raise ParseError("Too deeply nested")
            inner: list[Token] = []
            stack[-1].append(inner)
            stack.append(inner)
            pos += 1
        elif char == ")":
            if len(stack) == 1:
                raise ParseError("Unbalanced parentheses")
            stack.pop()
            pos += 1
        elif char == '"':
            match = _QUOTED.match(text, pos)
            if match is None:
                raise ParseError("Invalid quoted string")
            stack[-1].append(_UNESCAPE.sub(r"\1", match[1]))
            pos = match.end()
        else:
            match = _ATOM.match(text, pos)
            # An atom stops at (or is kept from starting by) a "[" only when no "]" follows.
            if match is None or text.startswith("[", match.end()):
                return pos
            stack[-1].append(Atom(match[0]))
            pos = match.end()
    return None


def _field_name_text(literal: bytes) -> str:
    """A literal inside ``[...]`` as quoted-string text: there the grammar allows only a header
    field name (``BODY[HEADER.FIELDS ({4}\\r\\nFROM)]``, RFC 3501 §9 header-fld-name)."""
    name = literal.decode("ascii", "replace")
    if not FIELD_NAME.fullmatch(name) or "]" in name:
        raise ParseError("Invalid header field name")
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def tokenize(command: Command) -> list[Token]:
    """The command as atoms, quoted strings (str), literals (bytes) and lists."""
    root: list[Token] = []
    stack = [root]
    carried = ""  # the start of an atom whose "[...]" a literal interrupted
    for index, raw in enumerate(command.texts):
        text = carried + _decode_text(raw)
        carried = ""
        open_at = _scan(text, stack)
        if open_at is not None:
            if index == len(command.literals):
                raise ParseError("Unexpected character '['")
            carried = text[open_at:] + _field_name_text(command.literals[index])
        elif index < len(command.literals):
            stack[-1].append(command.literals[index])
    if len(stack) != 1:
        raise ParseError("Unbalanced parentheses")
    return root


def split_command(tokens: Sequence[Token]) -> tuple[str, str, list[Token]]:
    """``(tag, NAME, arguments)``; ``UID FETCH`` and friends are one name."""
    if not tokens or not isinstance(tokens[0], Atom) or tag_of(tokens[0].encode("utf-8", "replace")) == "*":
        raise ParseError("Invalid tag")
    tag = str(tokens[0])
    if len(tokens) < 2 or not isinstance(tokens[1], Atom):
        raise ParseError("Missing command")
    name = tokens[1].upper()
    rest = list(tokens[2:])
    if name == "UID":
        command = rest.pop(0) if rest else None
        if not isinstance(command, Atom):
            raise ParseError("Missing command after UID")
        name = "UID " + command.upper()
    return tag, name, rest


# --- typed arguments -----------------------------------------------------------------------------


def astring_value(token: Token, what: str) -> str:
    """An atom, quoted string or literal (UTF-8) as text."""
    if isinstance(token, bytes):
        try:
            return token.decode("utf-8")
        except UnicodeDecodeError:
            raise ParseError(f"{what}: literal is not UTF-8") from None
    if isinstance(token, str):
        return str(token)
    raise ParseError(f"{what}: expected a string")


class Arguments:
    """A cursor over a command's arguments; each accessor raises `ParseError` naming what is wrong."""

    def __init__(self, tokens: Sequence[Token]) -> None:
        self._tokens = tokens
        self._pos = 0

    def more(self) -> bool:
        return self._pos < len(self._tokens)

    def peek(self) -> Token | None:
        return self._tokens[self._pos] if self.more() else None

    def next(self, what: str) -> Token:
        if not self.more():
            raise ParseError(f"Missing {what}")
        token = self._tokens[self._pos]
        self._pos += 1
        return token

    def atom(self, what: str) -> str:
        token = self.next(what)
        if not isinstance(token, Atom):
            raise ParseError(f"Invalid {what}")
        return str(token)

    def astring(self, what: str) -> str:
        return astring_value(self.next(what), what)

    def mailbox(self, what: str = "mailbox name") -> str:
        return mailbox_name(self.astring(what))

    def group(self, what: str) -> list[Token]:
        token = self.next(what)
        if not isinstance(token, list):
            raise ParseError(f"Invalid {what}: expected a list")
        return token

    def rest(self) -> list[Token]:
        tokens = list(self._tokens[self._pos :])
        self._pos = len(self._tokens)
        return tokens

    def end(self) -> None:
        if self.more():
            raise ParseError("Unexpected extra arguments")


def mailbox_name(raw: str) -> str:
    """Wire name (modified UTF-7) -> store name (UTF-8, "/"); INBOX in any case is INBOX."""
    if raw.upper() == "INBOX":
        return "INBOX"
    try:
        name = mutf7.decode(raw)
    except ValueError:
        raise ParseError("Invalid mailbox name (modified UTF-7)") from None
    if name[:6].upper() == "INBOX/":
        name = "INBOX" + name[5:]
    if _CONTROL.search(name):
        raise ParseError("Invalid mailbox name")
    return name


def number(text: str, what: str, nonzero: bool = True, maximum: int = MAX_NUMBER) -> int:
    """A decimal up to ``maximum`` (2^32-1 unless told): longer digit strings are refused before
    conversion, so no digit string can cost CPU."""
    if not text.isascii() or not text.isdigit() or len(text) > len(str(maximum)):
        raise ParseError(f"Invalid {what}")
    value = int(text)
    if value > maximum or (nonzero and value == 0):
        raise ParseError(f"Invalid {what}")
    return value


def list_matcher(reference: str, pattern: str) -> Callable[[str], bool]:
    """LIST/LSUB: reference and pattern (wire form) as a test on store names (RFC 3501 §6.3.8).

    ``*`` matches anything, ``%`` anything but the delimiter; a leading INBOX matches in any case.
    The pattern runs as a bit-parallel NFA, linear in the name whatever the client wrote (a
    regex of many wildcards backtracks exponentially).
    """
    try:
        full = mutf7.decode(reference) + mutf7.decode(pattern)
    except ValueError:
        raise ParseError("Invalid mailbox pattern (modified UTF-7)") from None
    if full[:5].upper() == "INBOX" and full[5:6] in ("", "/", "*", "%"):
        full = "INBOX" + full[5:]
    tokens: list[str] = []
    for char in full:
        if char in "*%" and tokens and tokens[-1] in ("*", "%"):
            if char == "*":
                tokens[-1] = "*"  # "%*" and "*%" are "*"
            continue
        tokens.append(char)
    literals: dict[str, int] = {}
    star = percent = 0
    for index, token in enumerate(tokens):
        if token == "*":
            star |= 1 << index
        elif token == "%":
            percent |= 1 << index
        else:
            literals[token] = literals.get(token, 0) | 1 << index
    wild = star | percent
    accept = 1 << len(tokens)
    start = 1 | ((1 & wild) << 1)

    def matches(name: str) -> bool:
        states = start
        for char in name:
            stay = star if char == "/" else wild
            states = ((states & literals.get(char, 0)) << 1) | (states & stay)
            states |= (states & wild) << 1
            if not states:
                return False
        return bool(states & accept)

    return matches


# --- sequence sets -------------------------------------------------------------------------------


def parse_sequence_set(text: str) -> tuple[tuple[int, int], ...]:
    """``"1:3,7,9:*"`` -> ``((1, 3), (7, 7), (9, STAR))``; ranges as written (``5:2`` stays)."""
    ranges = []
    for part in text.split(","):
        low, colon, high = part.partition(":")
        first = STAR if low == "*" else number(low, "sequence set")
        if not colon:
            ranges.append((first, first))
        else:
            ranges.append((first, STAR if high == "*" else number(high, "sequence set")))
    return tuple(ranges)


def resolve_set(ranges: Iterable[tuple[int, int]], star: int) -> list[tuple[int, int]]:
    """``*`` replaced by ``star``, each range ordered, sorted, overlapping ranges merged.

    ``5:*`` with ``star`` 3 is ``3:5`` (RFC 3501 §9: the range covers the largest number).
    """
    ordered = sorted(
        (min(low, high), max(low, high))
        for low, high in ((star if a == STAR else a, star if b == STAR else b) for a, b in ranges)
    )
    merged: list[tuple[int, int]] = []
    for low, high in ordered:
        if merged and low <= merged[-1][1] + 1:
            if high > merged[-1][1]:
                merged[-1] = (merged[-1][0], high)
        else:
            merged.append((low, high))
    return merged


def format_set(numbers: Iterable[int]) -> str:
    """Numbers in order as a compact set: ``[1, 2, 3, 5]`` -> ``"1:3,5"`` (COPYUID, APPENDUID)."""
    parts: list[str] = []
    start = previous = None
    for value in numbers:
        if previous is not None and value == previous + 1:
            previous = value
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}:{previous}")
        start = previous = value
    if start is not None:
        parts.append(str(start) if start == previous else f"{start}:{previous}")
    return ",".join(parts)


# --- FETCH ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BodyFetch:
    """``BODY[section]<origin.length>``, ``BODY.PEEK[...]`` or one of the RFC822 forms.

    ``name`` is the response label for RFC822, RFC822.HEADER and RFC822.TEXT; "" means the
    ``BODY[...]`` label built from the section.
    """

    section: Section
    peek: bool
    partial: tuple[int, int] | None = None
    name: str = ""


FetchItem = str | BodyFetch

SIMPLE_ITEMS = frozenset({"FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY", "BODYSTRUCTURE"})
_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_RFC822 = {
    "RFC822": BodyFetch(Section((), "", ()), peek=False, name="RFC822"),
    "RFC822.HEADER": BodyFetch(Section((), "HEADER", ()), peek=True, name="RFC822.HEADER"),
    "RFC822.TEXT": BodyFetch(Section((), "TEXT", ()), peek=False, name="RFC822.TEXT"),
}
_BODY_ATT = re.compile(r"BODY(\.PEEK)?\[([^\]]*)\](?:<([0-9]+)\.([0-9]+)>)?", re.IGNORECASE)


def parse_section(spec: str) -> Section:
    """The inside of ``BODY[...]``: ``1.2.HEADER.FIELDS (FROM TO)`` and the like (RFC 3501 §6.4.5)."""
    head, _, field_list = spec.partition(" ")
    components = head.split(".") if head else []
    if "" in components:
        raise ParseError("Invalid section")
    part: list[int] = []
    while components and components[0].isdigit():
        part.append(number(components.pop(0), "section part"))
    text = ".".join(components).upper()
    fields: tuple[str, ...] = ()
    if text.startswith("HEADER.FIELDS"):
        stack: list[list[Token]] = [[]]
        if _scan(field_list, stack) is not None:
            raise ParseError("Invalid header field list")
        if len(stack) != 1 or len(stack[0]) != 1 or not isinstance(stack[0][0], list) or not stack[0][0]:
            raise ParseError("Invalid header field list")
        names = []
        for token in stack[0][0]:
            if not isinstance(token, str) or not FIELD_NAME.fullmatch(token):
                raise ParseError("Invalid header field name")
            names.append(str(token))
        fields = tuple(names)
    elif field_list:
        raise ParseError("Invalid section")
    try:
        return Section(tuple(part), text, fields)
    except ValueError:  # Section knows which texts there are
        raise ParseError("Invalid section") from None


def _fetch_att(token: Token) -> FetchItem:
    if not isinstance(token, Atom):
        raise ParseError("Invalid fetch attribute")
    name = token.upper()
    if name in SIMPLE_ITEMS:
        return name
    if name in _RFC822:
        return _RFC822[name]
    match = _BODY_ATT.fullmatch(token)
    if match is None:
        raise ParseError(f"Unknown fetch attribute {name[:40]}")
    partial = None
    if match[3] is not None:
        partial = (number(match[3], "partial origin", nonzero=False), number(match[4], "partial length"))
    return BodyFetch(parse_section(match[2]), peek=match[1] is not None, partial=partial)


def parse_fetch_items(args: Arguments) -> list[FetchItem]:
    """The fetch attributes: a macro, one attribute, or a parenthesized list of attributes."""
    token = args.next("fetch attributes")
    args.end()
    if isinstance(token, Atom) and token.upper() in _MACROS:
        return list(_MACROS[token.upper()])
    if isinstance(token, list):
        if not token:
            raise ParseError("Empty fetch attribute list")
        return [_fetch_att(item) for item in token]
    return [_fetch_att(token)]


# --- flags, STORE, APPEND ------------------------------------------------------------------------

_KEYWORD = re.compile(r"[!#$&'+,\-./0-9:;<=>?@A-Z\[^_`a-z|}~]+")


def parse_flag(token: Token) -> str:
    """A flag as the store keeps it: system flags in canonical case, keywords as sent."""
    if not isinstance(token, Atom):
        raise ParseError("Invalid flag")
    if token.startswith("\\"):
        flag = _SYSTEM_FLAGS.get(token.upper())
        if flag is None:
            raise ParseError(f"Invalid system flag {token[:40]}")
        return flag
    if not _KEYWORD.fullmatch(token) or len(token) > 128:
        raise ParseError("Invalid keyword")
    return str(token)


def parse_flag_list(tokens: Sequence[Token]) -> list[str]:
    return list(dict.fromkeys(parse_flag(token) for token in tokens))


@dataclass(frozen=True)
class StoreRequest:
    mode: str  # "+", "-" or "" (replace)
    silent: bool
    flags: tuple[str, ...]


_STORE_ITEM = re.compile(r"([+-]?)FLAGS(\.SILENT)?", re.IGNORECASE)


def parse_store(args: Arguments) -> StoreRequest:
    """``[+|-]FLAGS[.SILENT]`` then a flag list, parenthesized or not (RFC 3501 §6.4.6)."""
    match = _STORE_ITEM.fullmatch(args.atom("store item"))
    if match is None:
        raise ParseError("Invalid store item")
    if isinstance(args.peek(), list):
        tokens = args.group("flag list")
        args.end()
    else:
        tokens = args.rest()
        if not tokens:
            raise ParseError("Missing flags")
    return StoreRequest(match[1], match[2] is not None, tuple(parse_flag_list(tokens)))


MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUMBERS = {name.upper(): index for index, name in enumerate(MONTHS, 1)}  # not calendar's: locale-bound
_DATE = re.compile(r"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")
_DATE_TIME = re.compile(
    r"([ 0-9]?[0-9])-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{4})"
)


def parse_date_time(text: str) -> float:
    """APPEND's ``"17-Jul-1996 02:44:25 -0700"`` as seconds since the epoch."""
    match = _DATE_TIME.fullmatch(text)
    month = _MONTH_NUMBERS.get(match[2].upper()) if match else None
    if match is None or month is None:
        raise ParseError("Invalid date-time")
    day, year, hour, minute, second = (int(match[i]) for i in (1, 3, 4, 5, 6))
    minutes = int(match[8][:2]) * 60 + int(match[8][2:])
    try:
        if int(match[8][2:]) >= 60:
            raise ValueError("zone minutes")
        zone = datetime.timezone(datetime.timedelta(minutes=-minutes if match[7] == "-" else minutes))
        # A leap second (:60) is the last second of its minute.
        moment = datetime.datetime(year, month, day, hour, minute, min(second, 59), tzinfo=zone)
    except ValueError:
        raise ParseError("Invalid date-time") from None
    return moment.timestamp()


def parse_date(text: str) -> datetime.date:
    """SEARCH's ``date``: ``1-Feb-1994`` (RFC 3501 §9)."""
    match = _DATE.fullmatch(text)
    if match is not None and match[2].upper() in _MONTH_NUMBERS:
        try:
            return datetime.date(int(match[3]), _MONTH_NUMBERS[match[2].upper()], int(match[1]))
        except ValueError:  # 31-Feb-2024, year 0
            pass
    raise ParseError(f"Invalid date {text[:40]!r}")


# --- SEARCH --------------------------------------------------------------------------------------


SEARCH_CHARSETS = {"UTF-8": "utf-8", "US-ASCII": "ascii"}  # RFC 3501 §6.4.4's two; what BADCHARSET lists


class BadCharset(Exception):
    """SEARCH named a charset not in `SEARCH_CHARSETS`: ``NO [BADCHARSET (UTF-8 US-ASCII)]``."""


def search_tokens(tokens: Sequence[Token]) -> list[object]:
    """``[CHARSET name] keys...`` -> the keys as str/list for `kms.imap.search.parse_search`.

    Strings and literals are decoded with the charset (UTF-8 when none is named); a charset not
    in `SEARCH_CHARSETS` is `BadCharset`, text the charset cannot decode a `ParseError`.
    """
    tokens = list(tokens)
    charset = "UTF-8"
    if len(tokens) >= 2 and isinstance(tokens[0], Atom) and tokens[0].upper() == "CHARSET":
        charset = astring_value(tokens[1], "charset").upper()
        tokens = tokens[2:]
    codec = SEARCH_CHARSETS.get(charset)
    if codec is None:
        raise BadCharset(charset)

    def convert(token: Token) -> object:
        if isinstance(token, list):
            return [convert(item) for item in token]
        try:
            if isinstance(token, bytes):
                return token.decode(codec)
            if isinstance(token, Atom):
                return str(token)
            return token.encode("utf-8", "surrogateescape").decode(codec)
        except UnicodeError:
            raise ParseError(f"Search string is not valid {charset}") from None

    return [convert(token) for token in tokens]
