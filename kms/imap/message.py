# -*- test-case-name: tests.test_imap_message -*-
"""ENVELOPE, BODY and BODYSTRUCTURE (RFC 3501 §7.4.2), computed once when the store indexes a message.

`analyze` is the store's analyzer: its result is cached as `MessageInfo.meta`, with the three
structures already rendered to IMAP syntax, so FETCH ENVELOPE or BODYSTRUCTURE over a whole mailbox
copies cached strings and never opens a file.  They are built as nested lists of str / int / None
(`envelope`) and written by `render`.

Decisions:

* Header values are the raw text (UTF-8 when valid, else Latin-1), unfolded and stripped; RFC 2047
  encoded words stay encoded, as IMAP clients expect to decode them themselves.
* Addresses: quoting and comments are removed; with no display name, the last comment is the name
  (``a@b (Ann)``).  A missing domain is ``""`` (never NIL, which would mean a group marker), a
  missing local part ``""``; entries with nothing in them are dropped.
* The MIME structure is `kms.imap.sections.mime_tree` (so BODY[n] and BODYSTRUCTURE agree); sizes
  are octets of the body in wire form, lines count line breaks plus an unterminated last line.
* Type, subtype, parameters and encoding are as written; the defaults are spelled as in RFC 3501's
  examples (``"TEXT" "PLAIN" ("CHARSET" "US-ASCII")``, ``"7BIT"``); body-fld-md5 is the Content-MD5
  value, normally NIL.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kms.imap.fetch import quote
from kms.imap.search import header_texts, sent_date
from kms.imap.sections import Entity, field_text, fields, mime_tree, parse_params
from kms.wireform import header_section

# --- addresses -----------------------------------------------------------------------------------

_ADDRESS_TOKEN = re.compile(
    r"""(?P<space>\s+)
    | "(?P<quoted>(?:[^"\\]|\\.?)*)"?          # unterminated: to the end
    | (?P<literal>\[(?:[^\]\\]|\\.?)*\]?)      # domain literal, as written
    | (?P<special>[<>@,;:])
    | (?P<comment>\()
    | (?P<atom>[^\s"(\[<>@,;:)\]]+)
    | .                                        # a stray ")" or "]"
    """,
    re.X | re.S,
)
_COMMENT_PIECE = re.compile(r"[^()\\]+|\\.?|[()]", re.S)
_UNESCAPE = re.compile(r"\\(.)", re.S)

_Token = tuple[str, str, bool]  # kind ("word", "comment", "special"), text, preceded by blank space
Address = list[str | None]  # [name, adl, mailbox, host]


def _comment(text: str, pos: int) -> tuple[str, int]:
    """The comment opening at ``text[pos]`` (nested, escapes undone) and where it ends."""
    depth, pieces = 0, list[str]()
    for match in _COMMENT_PIECE.finditer(text, pos):
        piece = match[0]
        if piece == "(":
            depth += 1
            if depth == 1:
                continue
        elif piece == ")":
            depth -= 1
            if depth == 0:
                return "".join(pieces), match.end()
        elif piece.startswith("\\"):
            piece = piece[1:]
        pieces.append(piece)
    return "".join(pieces), len(text)


def _address_tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos, space = 0, False
    while pos < len(text):
        match = _ADDRESS_TOKEN.match(text, pos)
        assert match is not None  # the last alternative takes any character
        pos = match.end()
        kind = match.lastgroup
        if kind == "space":
            space = True
            continue
        if kind == "comment":
            comment, pos = _comment(text, match.start())
            tokens.append(("comment", comment, space))
            space = True
            continue
        if kind == "quoted":
            tokens.append(("word", _UNESCAPE.sub(r"\1", match["quoted"]), space))
        elif kind in ("literal", "atom"):
            tokens.append(("word", match[0], space))
        elif kind == "special":
            tokens.append(("special", match[0], space))
        space = False
    return tokens


class _AddressParser:
    """RFC 5322 address-list with obsolete routes and groups, forgiving every kind of damage."""

    def __init__(self, text: str) -> None:
        self.tokens = _address_tokens(text)
        self.pos = 0
        self.out: list[Address] = []

    def _special(self) -> str:
        """The special at the current position ("" at the end or on a word / comment)."""
        if self.pos < len(self.tokens) and self.tokens[self.pos][0] == "special":
            return self.tokens[self.pos][1]
        return ""

    def _words(self, stops: str) -> tuple[list[_Token], list[str]]:
        """Words and comments up to one of the ``stops`` specials (other specials are skipped)."""
        words, comments = [], []
        while self.pos < len(self.tokens):
            token = self.tokens[self.pos]
            if token[0] == "special" and token[1] in stops:
                break
            if token[0] == "word":
                words.append(token)
            elif token[0] == "comment":
                comments.append(token[1])
            self.pos += 1
        return words, comments

    def _emit(self, name: str | None, adl: str | None, mailbox: str, host: str) -> None:
        if name or mailbox or host:
            self.out.append([name or None, adl, mailbox, host])

    def _angle(self) -> tuple[str | None, str, str, list[str]]:
        """After "<": (route, local part, domain, comments), consuming the closing ">"."""
        adl = None
        if self._special() == "@":
            start = self.pos
            self._words(":>")
            if self._special() == ":":
                adl = "".join(token[1] for token in self.tokens[start : self.pos] if token[0] != "comment")
                self.pos += 1
            else:
                self.pos = start  # "<@host>": no route after all
        local, comments = self._words("@>,;<")
        host: list[_Token] = []
        if self._special() == "@":
            self.pos += 1
            host, more = self._words(">,;<")
            comments += more
        if self._special() == ">":
            self.pos += 1
        return adl, _joined(local), _joined(host), comments

    def parse(self) -> list[Address]:
        in_group = False
        while self.pos < len(self.tokens):
            words, comments = self._words("<>@,;:")
            special = self._special()
            if special == ":" and not in_group:
                self.out.append([None, None, _phrase(words), None])
                in_group = True
            elif special == "<":
                self.pos += 1
                adl, local, host, more = self._angle()
                _, trailing = self._words(",;")
                self._emit(_phrase(words) or _last(comments + more + trailing), adl, local, host)
            elif special == "@":
                self.pos += 1
                domain, more = self._words("<>@,;:")
                _, trailing = self._words(",;")
                self._emit(_last(comments + more + trailing), None, _joined(words), _joined(domain))
            elif words:
                self._emit(_last(comments), None, _phrase(words), "")
            special = self._special()
            if special == ";" and in_group:
                self.out.append([None, None, None, None])
                in_group = False
            if special:
                self.pos += 1
        if in_group:
            self.out.append([None, None, None, None])
        return self.out


def _phrase(words: Sequence[_Token]) -> str:
    return "".join((" " + text if space and index else text) for index, (_, text, space) in enumerate(words))


def _joined(words: Sequence[_Token]) -> str:
    return "".join(text for _, text, _ in words)


def _last(comments: Sequence[str]) -> str | None:
    return next((comment.strip() for comment in reversed(comments) if comment.strip()), None)


def addresses(value: str | None) -> list[Address] | None:
    """An address header as ENVELOPE address structures; None when absent or nothing in it."""
    if value is None:
        return None
    return _AddressParser(value).parse() or None


# --- envelope and body structure -----------------------------------------------------------------


class _Fields(dict[bytes, bytes]):
    """The first field of each name in a header, decoded only when asked for."""

    def __init__(self, header: bytes) -> None:
        super().__init__()
        for name, raw in fields(header):
            self.setdefault(name, raw)

    def text(self, name: bytes) -> str | None:
        raw = self.get(name)
        return None if raw is None else field_text(raw)


def envelope(header: bytes) -> list[object]:
    """The ENVELOPE of a message whose header section is ``header``."""
    first = _Fields(header)
    sender = addresses(first.text(b"from"))
    return [
        first.text(b"date"),
        first.text(b"subject"),
        sender,
        addresses(first.text(b"sender")) or sender,
        addresses(first.text(b"reply-to")) or sender,
        addresses(first.text(b"to")),
        addresses(first.text(b"cc")),
        addresses(first.text(b"bcc")),
        first.text(b"in-reply-to"),
        first.text(b"message-id"),
    ]


def _display(raw: str) -> str:
    """A Latin-1 view of raw bytes (from `mime_tree`) as text: UTF-8 when valid."""
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return raw


def _params(params: Sequence[tuple[str, str]]) -> list[str] | None:
    return [text for pair in params for text in pair] or None


def _disposition(value: str | None) -> list[object] | None:
    if value is None:
        return None
    kind, params = parse_params(value)
    return [kind, _params(params)] if kind else None


def _language(value: str | None) -> str | list[str] | None:
    tags = [tag.strip() for tag in (value or "").split(",") if tag.strip()]
    return tags[0] if len(tags) == 1 else tags or None


def _lines(message: bytes, start: int, end: int) -> int:
    return message.count(b"\n", start, end) + int(end > start and message[end - 1] != 0x0A)


def _structure(message: bytes, entity: Entity) -> tuple[list[object], list[object]]:
    """(BODYSTRUCTURE, BODY) of one entity, as lists for `render`."""
    first = _Fields(message[entity.start : entity.body_start])
    extension = [
        _disposition(first.text(b"content-disposition")),
        _language(first.text(b"content-language")),
        first.text(b"content-location"),
    ]
    params = _params([(_display(key), _display(value)) for key, value in entity.params])
    if entity.is_multipart:
        pairs = [_structure(message, child) for child in entity.children]
        subtype = _display(entity.subtype)
        return [*(full for full, _ in pairs), subtype, params, *extension], [*(b for _, b in pairs), subtype]
    basic: list[object] = [
        _display(entity.type),
        _display(entity.subtype),
        params,
        first.text(b"content-id"),
        first.text(b"content-description"),
        first.text(b"content-transfer-encoding") or "7BIT",
        entity.end - entity.body_start,
    ]
    lines = _lines(message, entity.body_start, entity.end)
    full, body = list(basic), basic
    if entity.is_message:
        inner = entity.children[0]
        inner_full, inner_body = _structure(message, inner)
        inner_envelope = envelope(message[inner.start : inner.body_start])
        full += [inner_envelope, inner_full, lines]
        body += [inner_envelope, inner_body, lines]
    elif entity.type.lower() == "text":
        full.append(lines)
        body.append(lines)
    full += [first.text(b"content-md5"), *extension]
    return full, body


def _wire(value: list[object]) -> str:
    return render(value).decode("utf-8")


def analyze(message: bytes) -> dict[str, object]:
    """The `MessageInfo.meta` of a message in wire form (`kms.store.interfaces.Analyzer`).

    ``ENVELOPE``, ``BODY`` and ``BODYSTRUCTURE`` hold what follows that name in a FETCH response,
    already in IMAP syntax (send ``.encode("utf-8")``): rendering nested lists costs ~10 µs a
    message, too much for FETCH over a whole mailbox, and one string is a fraction of the memory
    of the lists.  ``search`` and ``sent`` are what `kms.imap.search` matches header and SENT*
    keys against.
    """
    header = header_section(message)
    try:
        bodystructure, body = _structure(message, mime_tree(message))
        return {
            "ENVELOPE": _wire(envelope(header)),
            "BODY": _wire(body),
            "BODYSTRUCTURE": _wire(bodystructure),
            "search": header_texts(header),
            "sent": sent_date(header),
        }
    except Exception:  # hostile bytes must never leave a message unindexed
        plain: list[object] = ["TEXT", "PLAIN", ["CHARSET", "US-ASCII"], None, None, "7BIT"]
        plain += [len(message) - len(header), _lines(message, len(header), len(message))]
        return {
            "ENVELOPE": _wire([None] * 10),
            "BODY": _wire(plain),
            "BODYSTRUCTURE": _wire([*plain, None, None, None, None]),
            "search": {},
            "sent": None,
        }


# --- wire syntax ---------------------------------------------------------------------------------


def _render(value: list[object] | tuple[object, ...], out: list[str]) -> None:
    """One parenthesized list; leaves are written inline because structures are mostly leaves."""
    out.append("(")
    leading = True  # the lists a list starts with are written without spaces: 1*address, 1*body
    first = True
    for item in value:
        if isinstance(item, (list, tuple)):
            if not (first or leading):
                out.append(" ")
            _render(item, out)
        else:
            if not first:
                out.append(" ")
            leading = False
            if item is None:
                out.append("NIL")
            elif isinstance(item, str):
                out.append(quote(item))
            elif type(item) is int:  # not bool
                out.append(str(item))
            else:
                raise TypeError(f"cannot render {type(item).__name__} in IMAP syntax")
        first = False
    out.append(")")


def render(value: object) -> bytes:
    """IMAP wire syntax for a structure from `analyze` (or any nest of lists, str, int and None).

    None is NIL; a string is quoted, or a literal when it has CR, LF, 8-bit text or is long
    (UTF-8, NUL removed); lists are parenthesized with the lists they start with run together
    (``((a)(b) "mixed")``, ``((addr)(addr))``), as the address and multipart grammars demand.
    """
    if isinstance(value, (list, tuple)):
        out: list[str] = []
        _render(value, out)
        return "".join(out).encode("utf-8", "replace")
    return render([value])[1:-1]
