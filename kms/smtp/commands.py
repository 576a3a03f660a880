# -*- test-case-name: tests.test_smtp_commands -*-
"""Pure parsing for the SMTP server: command lines, envelope paths, ESMTP parameters, DATA bodies.

Nothing here does I/O or keeps connection state; every function takes the bytes or text a hostile
client sent and either returns plain values or raises `Refusal` carrying the exact reply, so the
protocol in `kms.smtp.server` only has to format it.

DATA decisions (see `DataReader`):

* The message ends only on CRLF "." CRLF (or "." CRLF as the very first line).  A bare LF or bare
  CR never ends a line for that purpose, which closes the 2023 "SMTP smuggling" class
  (``\\n.\\n``, ``\\r.\\r``, ``\\r\\n.\\n``, ``\\n.\\r\\n`` ... are all message text).
* Dot-stuffing is undone only after CRLF, where RFC 5321 §4.5.2 has the client add it.
* The body is stored with LF line endings: CRLF, bare CR and bare LF all become one LF.  The store
  keeps LF files (POP3 and IMAP add CR on the way out) and every line break a client could have
  meant is kept as a line break, so nothing downstream ever sees a lone CR or LF it could read
  differently from us.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from kms.smtp.interfaces import Refusal

MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1, octets
MAX_DOMAIN = 255  # §4.5.3.1.2
MAX_PATH = 256  # §4.5.3.1.3, including the angle brackets
MAX_LABEL = 63
MAX_SIZE_DIGITS = 20

# RFC 5321 §4.1.2, widened by RFC 6531 §3.3 to UTF-8; non-ASCII is refused later unless SMTPUTF8.
_U = "\u0080-\U0010ffff"
_ATEXT = f"[A-Za-z0-9!#$%&'*+\\-/=?^_`{{|}}~{_U}]"
_DOT_STRING = re.compile(f"{_ATEXT}+(?:\\.{_ATEXT}+)*")
_QUOTED_STRING = re.compile(f'"(?:[\\x20\\x21\\x23-\\x5b\\x5d-\\x7e{_U}]|\\\\[\\x20-\\x7e])*"')
_LABEL = f"[A-Za-z0-9{_U}](?:[A-Za-z0-9\\-{_U}]*[A-Za-z0-9{_U}])?"
_DOMAIN = re.compile(f"{_LABEL}(?:\\.{_LABEL})*")
_QUOTED_PAIR = re.compile(r"\\(.)")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_HELO = re.compile(r"[\x21-\x7e]{1,255}")


# --- command lines -------------------------------------------------------------------------------


def parse_command(line: bytes) -> tuple[str, str]:
    """``b"mail FROM:<a@b>"`` -> ``("MAIL", "FROM:<a@b>")``: the verb upper-cased, the rest as text.

    The line comes without its line ending.  NUL and anything that is not UTF-8 are refused here so
    no handler ever sees them; trailing blanks are forgiven because many clients send them.
    """
    if b"\0" in line:
        raise Refusal(500, "5.5.2", "NUL character in command")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise Refusal(500, "5.5.2", "Command is not valid UTF-8") from None
    verb, _, argument = text.rstrip(" \t").partition(" ")
    return verb.upper(), argument.lstrip(" ")


def parse_helo(verb: str, argument: str) -> str:
    """The HELO/EHLO name: one token of printable ASCII (it ends up in our Received header)."""
    if not _HELO.fullmatch(argument):
        raise Refusal(501, "5.5.4", f"Syntax: {verb} hostname")
    return argument


# --- paths ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MailCommand:
    """A syntactically valid ``MAIL FROM``; ``sender`` is "" for the null reverse-path ``<>``."""

    sender: str
    params: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class RcptCommand:
    """A syntactically valid ``RCPT TO``; ``recipient`` may be a bare ``postmaster``."""

    recipient: str
    params: Mapping[str, str | None] = field(default_factory=dict)


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))


def _split_path(argument: str, keyword: str, enhanced: str) -> tuple[str, str]:
    """``FROM:<path> params`` -> (``<path>``, ``params``), honouring ``>`` and spaces inside quotes."""
    if argument[: len(keyword)].upper() != keyword:
        verb = "MAIL" if keyword == "FROM:" else "RCPT"
        raise Refusal(501, "5.5.4", f"Syntax: {verb} {keyword}<address> [parameters]")
    rest = argument[len(keyword) :].lstrip(" ")
    if not rest.startswith("<"):
        raise Refusal(501, enhanced, "Address must be enclosed in <>")
    quoted = escaped = False
    for index, char in enumerate(rest):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            path, params = rest[: index + 1], rest[index + 1 :]
            if params and not params.startswith(" "):
                raise Refusal(501, enhanced, "Bad address syntax")
            return path, params.strip(" ")
    raise Refusal(501, enhanced, "Bad address syntax")


def _valid_domain(domain: str) -> bool:
    return (
        _DOMAIN.fullmatch(domain) is not None
        and _octets(domain) <= MAX_DOMAIN
        and all(_octets(label) <= MAX_LABEL for label in domain.split("."))
    )


def _valid_address_literal(literal: str) -> bool:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``; general (tagged) literals have no use for mail."""
    inner = literal[1:-1]
    try:
        if inner[:5].upper() != "IPV6:":
            ipaddress.IPv4Address(inner)
        elif "%" in inner:  # a zone id means nothing off this host
            return False
        else:
            ipaddress.IPv6Address(inner[5:])
    except ValueError:
        return False
    return True


def _canonical_local_part(local: str) -> str:
    """Unquote a quoted local part when quoting is not needed, so ``"bob"@x`` and ``bob@x`` agree.

    RFC 5321 §4.1.2 forbids mailboxes that need quoting to mean something else; quoted-pairs are
    reduced to their minimal form so one mailbox has one spelling.
    """
    if not local.startswith('"'):
        return local
    content = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    if _DOT_STRING.fullmatch(content):
        return content
    return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_path(
    path: str, *, utf8: bool, enhanced: str, null_ok: bool = False, postmaster_ok: bool = False
) -> str:
    """``<@relay:local@domain>`` -> ``local@domain``, or Refusal with the reply to send.

    ``enhanced`` is 5.1.7 for senders and 5.1.3 for recipients.  Source routes are accepted and
    dropped (RFC 5321 §4.1.1.3 / appendix C); non-ASCII needs SMTPUTF8 (RFC 6531: 553 5.6.7).
    """
    if not path.isprintable():
        raise Refusal(501, enhanced, "Control characters are not allowed in addresses")
    if _octets(path) > MAX_PATH:
        raise Refusal(501, enhanced, "Path too long")
    if not (path.startswith("<") and path.endswith(">")):
        raise Refusal(501, enhanced, "Address must be enclosed in <>")
    inner = path[1:-1]
    if inner == "":
        if null_ok:
            return ""
        raise Refusal(501, enhanced, "The null address is not allowed here")
    if inner.startswith("@"):
        route, colon, inner = inner.partition(":")
        if not colon or not all(hop.startswith("@") and _valid_domain(hop[1:]) for hop in route.split(",")):
            raise Refusal(501, enhanced, "Bad source route syntax")
    if postmaster_ok and inner.lower() == "postmaster":
        return inner
    local, at, domain = inner.rpartition("@")
    if not at:
        raise Refusal(501, enhanced, "Address must have a domain")
    if not (_DOT_STRING.fullmatch(local) or _QUOTED_STRING.fullmatch(local)):
        raise Refusal(501, enhanced, "Bad address syntax")
    if domain.startswith("["):
        if not (domain.endswith("]") and _valid_address_literal(domain)):
            raise Refusal(501, enhanced, "Bad address literal")
    elif not _valid_domain(domain):
        raise Refusal(501, enhanced, "Bad domain syntax")
    local = _canonical_local_part(local)
    if _octets(local) > MAX_LOCAL_PART:
        raise Refusal(501, enhanced, "Local part too long")
    if not utf8 and not inner.isascii():
        raise Refusal(553, "5.6.7", "Non-ASCII addresses require SMTPUTF8")
    return f"{local}@{domain}"


# --- ESMTP parameters ----------------------------------------------------------------------------


def _parse_params(text: str, extended: bool) -> dict[str, str | None]:
    """``SIZE=10 SMTPUTF8`` -> ``{"SIZE": "10", "SMTPUTF8": None}``; any malformation is 555 5.5.4."""
    params: dict[str, str | None] = {}
    if not text:
        return params
    if not extended:
        raise Refusal(555, "5.5.4", "ESMTP parameters need EHLO")
    for item in text.split():
        keyword, equals, value = item.partition("=")
        if not _KEYWORD.fullmatch(keyword) or (equals and not _VALUE.fullmatch(value)):
            raise Refusal(555, "5.5.4", "Malformed parameter")
        key = keyword.upper()
        if key in params:
            raise Refusal(555, "5.5.4", f"Duplicate parameter {key}")
        params[key] = value if equals else None
    return params


_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")
MAX_ENVID = 100  # RFC 3461 §4.4
MAX_ORCPT = 500  # §4.2: the address part is bounded by the path length; the xtext may triple it
NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def xtext_decode(value: str) -> str | None:
    """RFC 3461 §4 xtext to text, or None when malformed (a ``+`` not followed by two upper hex)."""
    if "+" in value and len(_XTEXT_HEX.findall(value)) != value.count("+"):
        return None
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)


def parse_notify(value: str | None) -> tuple[str, ...] | None:
    """``NOTIFY=`` value -> ("NEVER",) or a subset of SUCCESS/FAILURE/DELAY; None when malformed."""
    if not value:
        return None
    items = tuple(v.upper() for v in value.split(","))
    if items == ("NEVER",):
        return items
    if not items or len(set(items)) != len(items) or not set(items) <= NOTIFY_VALUES:
        return None
    return items


def parse_orcpt(value: str | None) -> str | None:
    """``ORCPT=rfc822;bob+40example.org`` -> ``rfc822;bob@example.org``; None when malformed."""
    if not value or len(value) > MAX_ORCPT:
        return None
    kind, semi, raw = value.partition(";")
    if not semi or not _KEYWORD.fullmatch(kind) or not raw:
        return None
    text = xtext_decode(raw)
    if text is None or not text.isprintable() or any(ord(c) < 0x20 for c in text):
        return None
    return f"{kind.lower()};{text}"


def _check_mail_params(params: Mapping[str, str | None]) -> None:
    """The MAIL parameters we advertise: SIZE (RFC 1870), BODY (RFC 6152), SMTPUTF8 (RFC 6531),
    RET and ENVID (RFC 3461)."""
    for key, value in params.items():
        if key == "SIZE":
            ok = value is not None and value.isdigit() and len(value) <= MAX_SIZE_DIGITS
        elif key == "BODY":
            ok = value is not None and value.upper() in ("7BIT", "8BITMIME")
        elif key == "SMTPUTF8":
            ok = value is None
        elif key == "RET":
            ok = value is not None and value.upper() in ("FULL", "HDRS")
        elif key == "ENVID":
            text = xtext_decode(value) if value is not None else None
            ok = text is not None and 0 < len(text) <= MAX_ENVID and text.isascii() and text.isprintable()
        else:
            raise Refusal(555, "5.5.4", f"Unsupported parameter {key}")
        if not ok:
            raise Refusal(555, "5.5.4", f"Bad value for {key}")


def parse_mail(argument: str, *, extended: bool) -> MailCommand:
    """The argument of MAIL (``FROM:<path> [params]``); params are allowed only after EHLO."""
    path, param_text = _split_path(argument, "FROM:", "5.1.7")
    params = _parse_params(param_text, extended)
    _check_mail_params(params)
    sender = parse_path(path, utf8="SMTPUTF8" in params, enhanced="5.1.7", null_ok=True)
    return MailCommand(sender, params)


def parse_rcpt(argument: str, *, extended: bool, utf8: bool) -> RcptCommand:
    """The argument of RCPT (``TO:<path>``); ``utf8`` says whether MAIL carried SMTPUTF8.

    The RFC 3461 parameters NOTIFY and ORCPT are accepted; values are kept decoded (NOTIFY upper
    case, ORCPT as ``type;address``).  Anything else is 555.
    """
    path, param_text = _split_path(argument, "TO:", "5.1.3")
    params = _parse_params(param_text, extended)
    checked: dict[str, str | None] = {}
    for key, value in params.items():
        if key == "NOTIFY":
            notify = parse_notify(value)
            if notify is None:
                raise Refusal(501, "5.5.4", "Bad value for NOTIFY")
            checked[key] = ",".join(notify)
        elif key == "ORCPT":
            orcpt = parse_orcpt(value)
            if orcpt is None:
                raise Refusal(501, "5.5.4", "Bad value for ORCPT")
            checked[key] = orcpt
        else:
            raise Refusal(555, "5.5.4", f"Unsupported parameter {key}")
    return RcptCommand(parse_path(path, utf8=utf8, enhanced="5.1.3", postmaster_ok=True), checked)


# --- DATA ----------------------------------------------------------------------------------------

_MID = 0  # inside a line (or after a bare CR/LF, which is not a line start)
_CR = 1  # a CR arrived; LF would make it CRLF, anything else makes it a bare CR
_BOL = 2  # just after CRLF (or at the start): a "." here is special
_BOL_DOT = 3  # CRLF "."
_BOL_DOT_CR = 4  # CRLF "." CR: an LF now ends the message
_DONE = 5


def _normalize(text: bytes) -> bytes:
    return text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


class DataReader:
    """Turns the bytes after ``354`` into the stored body (see the module docstring for the rules).

    Its whole state is one small integer, so any chunking of any input (an endless line included)
    costs constant memory here; what it returns is proportional to what it was fed.  Bulk text is
    handled with ``bytes.find``/``replace``; only the bytes around a line start are stepped singly.
    """

    def __init__(self) -> None:
        self._state = _BOL

    @property
    def done(self) -> bool:
        """Whether the end-of-data marker has been seen."""
        return self._state == _DONE

    def feed(self, data: bytes) -> tuple[bytes, bool, bytes]:
        """Consume ``data``: (body text to store, whether the message ended, bytes after the end)."""
        if self._state == _DONE:
            raise ValueError("DataReader fed after the end of data")
        out: list[bytes] = []
        state = self._state
        position, end = 0, len(data)
        while position < end:
            if state == _MID:
                found = data.find(b"\r\n.", position)
                if found >= 0:
                    out.append(_normalize(data[position:found]))
                    out.append(b"\n")
                    state, position = _BOL, found + 2
                    continue
                tail = data[position:]
                if tail.endswith(b"\r\n"):
                    out.append(_normalize(tail[:-2]))
                    out.append(b"\n")
                    state = _BOL
                elif tail.endswith(b"\r"):
                    out.append(_normalize(tail[:-1]))
                    state = _CR
                else:
                    out.append(_normalize(tail))
                break
            byte = data[position]
            if state == _CR:
                out.append(b"\n")
                if byte == 0x0A:
                    state, position = _BOL, position + 1
                elif byte == 0x0D:
                    position += 1
                else:
                    state = _MID
            elif state == _BOL:
                if byte == 0x2E:
                    state, position = _BOL_DOT, position + 1
                else:
                    state = _MID
            elif state == _BOL_DOT:
                if byte == 0x0D:
                    state, position = _BOL_DOT_CR, position + 1
                else:
                    state = _MID  # the stuffed dot is dropped
            else:  # _BOL_DOT_CR
                if byte == 0x0A:
                    self._state = _DONE
                    return b"".join(out), True, data[position + 1 :]
                state = _CR  # the dot is dropped; its CR turned out to be a bare CR
        self._state = state
        return b"".join(out), False, b""
