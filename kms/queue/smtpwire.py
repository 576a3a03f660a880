# -*- test-case-name: tests.test_queue_client -*-
"""Pure pieces of the outbound SMTP client: replies, EHLO keywords, commands, dot-stuffing.

No I/O here.  `kms.queue.client` feeds `ReplyParser` what the remote server sent, asks the
functions below what to write, and streams the body through a `DotStuffer`.

Everything a remote server sends is hostile: reply lines are bounded in length and number, a line
that is not ``NNN[ -]text`` is an error (never a crash), and reply text is reduced to printable
ASCII before it can reach the queue, a log line or a DSN.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from kms.lines import TOO_LONG, LineReader
from kms.queue.interfaces import OutboundMessage, QueuedRecipient, Reply

# RFC 5321 §4.5.3.1.5 allows 512 octets per reply line; real servers send somewhat more, never this.
MAX_REPLY_LINE = 2048
# An EHLO reply has a line per extension: some dozens at most.
MAX_REPLY_LINES = 100
# What is kept of a reply's text for the queue and DSNs.
MAX_REPLY_TEXT = 1000

_PRINTABLE = bytes(c if 0x20 <= c < 0x7F else 0x3F for c in range(256))  # anything else -> "?"
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_ADDRESS_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_NOTIFY = ("SUCCESS", "FAILURE", "DELAY")


class ReplyError(Exception):
    """The server sent something that is not an SMTP reply (or one beyond our bounds)."""


def printable(data: bytes) -> str:
    """``data`` with every byte outside printable ASCII replaced by "?"."""
    return data.translate(_PRINTABLE).decode("ascii")


@dataclass(frozen=True)
class Response:
    """One complete reply as it came: the code and the text of each line (after ``NNN-``/``NNN ``)."""

    code: int
    lines: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def reply(self) -> Reply:
        """The reply for the queue: the enhanced code of the first line, the texts joined by spaces.

        An enhanced code counts only when its class matches the reply's (a "250 5.1.1" is just text).
        """
        enhanced = ""
        texts = []
        for index, text in enumerate(self.lines):
            match = _ENHANCED.match(text)
            if match and int(match[1]) == self.code // 100:
                if index == 0:
                    enhanced = f"{match[1]}.{match[2]}.{match[3]}"
                text = text[match.end() :]
            if text.strip():
                texts.append(text.strip())
        return Reply(self.code, enhanced, " ".join(texts)[:MAX_REPLY_TEXT])

    def __str__(self) -> str:
        return str(self.reply())


def parse_reply_line(line: bytes) -> tuple[int, bool, str]:
    """``b"250-SIZE 100"`` -> ``(250, False, "SIZE 100")``: code, whether it is the last line, text.

    RFC 5321 §4.2: three digits (first 2-5, second 0-5), then "-" (more lines follow), " " or
    nothing (the last line).  Anything else raises `ReplyError`.
    """
    head = line[:3]
    if len(head) < 3 or not head.isdigit() or head[0] not in b"2345" or head[1] not in b"012345":
        raise ReplyError(f"not an SMTP reply: {printable(line[:80])!r}")
    separator = line[3:4]
    if separator not in (b"-", b" ", b""):
        raise ReplyError(f"not an SMTP reply: {printable(line[:80])!r}")
    return int(head), separator != b"-", printable(line[4:])


def _check_start(partial: bytearray) -> None:
    """Refuse a partial line that can no longer become a reply (a TLS record, HTTP) without
    waiting for a line end that may never come."""
    for index, byte in enumerate(partial[:4]):
        if byte not in (b"2345", b"012345", b"0123456789", b" -\r")[index]:
            raise ReplyError(f"not an SMTP reply: {printable(bytes(partial[:80]))!r}")


class ReplyParser:
    """Complete replies out of a byte stream, in bounded memory."""

    def __init__(self) -> None:
        self._reader = LineReader(MAX_REPLY_LINE)
        self._inbox = bytearray()
        self._code: int | None = None
        self._lines: list[str] = []

    @property
    def buffered(self) -> bool:
        """Whether part of a reply is waiting for the rest."""
        return bool(self._inbox or self._lines)

    def feed(self, data: bytes) -> list[Response]:
        """The replies completed by ``data`` (often none, sometimes several when pipelining)."""
        self._inbox += data
        responses: list[Response] = []
        while True:
            line = self._reader.take(self._inbox)
            if line is None:
                _check_start(self._inbox)
                return responses
            if line is TOO_LONG:
                raise ReplyError(f"reply line longer than {MAX_REPLY_LINE} bytes")
            code, last, text = parse_reply_line(bytes(line))
            if self._code is not None and code != self._code:
                raise ReplyError(f"reply code changes within a multi-line reply ({self._code}, {code})")
            if len(self._lines) == MAX_REPLY_LINES:
                raise ReplyError(f"reply longer than {MAX_REPLY_LINES} lines")
            self._code = code
            self._lines.append(text)
            if last:
                responses.append(Response(code, tuple(self._lines)))
                self._code = None
                self._lines = []


@dataclass(frozen=True)
class Extensions:
    """What the server's EHLO reply offered: keyword (upper case) -> parameters."""

    keywords: Mapping[str, str]

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.keywords

    @property
    def starttls(self) -> bool:
        return "STARTTLS" in self.keywords

    @property
    def eightbitmime(self) -> bool:
        return "8BITMIME" in self.keywords

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.keywords

    @property
    def dsn(self) -> bool:
        return "DSN" in self.keywords

    @property
    def size(self) -> int | None:
        """None: no SIZE extension; 0: SIZE without a (usable) limit (RFC 1870 §4)."""
        if "SIZE" not in self.keywords:
            return None
        value = self.keywords["SIZE"].split(" ")[0]
        return int(value) if value.isdigit() and len(value) <= 18 else 0

    @property
    def auth(self) -> frozenset[str]:
        return frozenset(self.keywords.get("AUTH", "").upper().split())


NO_EXTENSIONS = Extensions({})


def parse_ehlo(response: Response) -> Extensions:
    """The extensions of a 250 EHLO reply (its first line is the server's name, not a keyword).

    Lines whose keyword is not RFC 5321 ``ehlo-keyword`` syntax are ignored (some servers still
    send ``AUTH=LOGIN``); repeated keywords keep their first parameters.
    """
    keywords: dict[str, str] = {}
    for line in response.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if _KEYWORD.match(keyword):
            keywords.setdefault(keyword.upper(), " ".join(params.split()))
    return Extensions(keywords)


def xtext(value: str) -> str:
    """RFC 3461 §4 xtext: "+" and "=" and every byte outside "!".."~" become "+HH" (UTF-8 bytes)."""
    return "".join(
        chr(byte) if 33 <= byte <= 126 and byte not in (0x2B, 0x3D) else f"+{byte:02X}"
        for byte in value.encode("utf-8")
    )


def safe_path(address: str) -> bool:
    """False for an address that would break the command line it goes into (CR, LF, NUL, controls)."""
    return address.isprintable()


def needs_smtputf8(message: OutboundMessage) -> bool:
    """The sender asked for SMTPUTF8, or an envelope address is not ASCII (RFC 6531 §3.2)."""
    return message.smtputf8 or not message.sender.isascii() or any(
        not r.address.isascii() for r in message.recipients
    )


def mail_command(message: OutboundMessage, extensions: Extensions) -> bytes:
    """MAIL FROM with what the server offers: SIZE, BODY=8BITMIME, SMTPUTF8, RET and ENVID (DSN)."""
    words = [f"MAIL FROM:<{message.sender}>"]
    if extensions.size is not None:
        words.append(f"SIZE={message.size}")
    if message.body_8bit and extensions.eightbitmime:
        words.append("BODY=8BITMIME")
    if extensions.smtputf8 and needs_smtputf8(message):
        words.append("SMTPUTF8")
    if extensions.dsn:
        if message.ret and message.ret.upper() in ("FULL", "HDRS"):
            words.append(f"RET={message.ret.upper()}")
        if message.envid:
            words.append(f"ENVID={xtext(message.envid)}")
    return " ".join(words).encode("utf-8") + b"\r\n"


def rcpt_command(recipient: QueuedRecipient, extensions: Extensions) -> bytes:
    """RCPT TO, with NOTIFY and ORCPT as received when the server offers DSN (RFC 3461 §4.1, §4.2)."""
    words = [f"RCPT TO:<{recipient.address}>"]
    if extensions.dsn:
        notify = {value.upper() for value in recipient.notify}
        if "NEVER" in notify:
            words.append("NOTIFY=NEVER")
        elif notify & set(_NOTIFY):
            words.append("NOTIFY=" + ",".join(value for value in _NOTIFY if value in notify))
        if recipient.orcpt:
            address_type, separator, original = recipient.orcpt.partition(";")
            if separator and _ADDRESS_TYPE.match(address_type):
                words.append(f"ORCPT={address_type};{xtext(original)}")
    return " ".join(words).encode("utf-8") + b"\r\n"


class DotStuffer:
    """A message body in wire form for DATA, fed in chunks of any size (RFC 5321 §4.5.2).

    Every line break the body holds becomes CRLF: CRLF stays, a bare LF or a bare CR becomes one
    CRLF (the same reading our SMTP server applies when it stores a message, docs/smtp.md), so no
    lone CR or LF reaches the next hop.  A line that starts with "." gets a second one: the first
    line and a line that starts exactly at a chunk boundary too (Twisted's client misses those,
    audit S9).  The carried state is whether the output is at a line start and whether the last
    chunk ended with a CR whose LF may open the next chunk.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._after_cr = False

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        if self._after_cr and data.startswith(b"\n"):
            data = data[1:]  # the LF of a CRLF split across chunks: the CRLF is already out
        self._after_cr = data.endswith(b"\r")
        if not data:
            return b""
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        data = data.replace(b"\n", b"\r\n")
        stuffed = data.replace(b"\n.", b"\n..")
        if self._line_start and data.startswith(b"."):
            stuffed = b"." + stuffed
        self._line_start = data.endswith(b"\n")
        return stuffed

    def finish(self) -> bytes:
        """The end-of-data marker, after a CRLF of its own when the body did not end with one."""
        return b".\r\n" if self._line_start else b"\r\n.\r\n"
