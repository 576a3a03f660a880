# -*- test-case-name: tests.test_pop3 -*-
"""Pure parsing and formatting for the POP3 server: command lines, arguments, TOP, dot-stuffing.

Nothing here does I/O or keeps connection state.  Parsers take what a hostile client sent and return
plain values or raise `POP3Error` carrying the exact ``-ERR`` text, so the protocol in
`kms.pop3.server` never formats anything from client input, and never names an exception class in a
reply (audit P6).

Message bodies go out exactly as the store gives them (CRLF wire form, audit P5) with only the
dot-stuffing of RFC 1939 §3 added, chunk by chunk, so a large message never needs a second, stuffed
copy in memory and a line that starts at a chunk boundary is stuffed like any other (audit P4).
"""

from __future__ import annotations

from collections.abc import Iterator

# Bytes of a message handed to the transport at a time (its write buffer is about this size).
CHUNK_SIZE = 64 * 1024
# Message numbers and TOP line counts: a ten-digit number is already beyond any maildrop; longer
# strings are refused before int() (which would happily spend time on 4,000 digits).
MAX_NUMBER_DIGITS = 10
# RFC 3206 codes that mean "not now" rather than "you did something wrong".
TEMPORARY_CODES = ("[SYS/TEMP]", "[IN-USE]")


class POP3Error(Exception):
    """A refused command; ``text`` follows ``-ERR `` verbatim, RFC 2449 response code included."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def parse_command(line: bytes) -> tuple[str, str]:
    """``b"retr 1"`` -> ``("RETR", "1")``: the keyword upper-cased, the rest exactly as sent.

    The rest is kept verbatim because a password (PASS) may contain, start or end with spaces.  The
    line comes without its line ending.  NUL and anything that is not UTF-8 are refused here, so no
    handler ever sees them.
    """
    if b"\0" in line:
        raise POP3Error("NUL character in command")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise POP3Error("Command is not valid UTF-8") from None
    keyword, _, argument = text.partition(" ")
    return keyword.upper(), argument


def split_arguments(argument: str, usage: str, minimum: int = 0, maximum: int = 0) -> list[str]:
    """The space-separated words of ``argument``; too few or too many: ``-ERR Syntax: <usage>`` (P2)."""
    words = [word for word in argument.split(" ") if word]
    if not minimum <= len(words) <= maximum:
        raise POP3Error(f"Syntax: {usage}")
    return words


def _number(word: str) -> int | None:
    """A plain ASCII decimal (no sign, no other scripts' digits) of reasonable length, else None."""
    if word.isascii() and word.isdigit() and len(word) <= MAX_NUMBER_DIGITS:
        return int(word)
    return None


def parse_message_number(word: str, count: int) -> int:
    """A message number from 1 to ``count``; whether it is deleted is the protocol's business."""
    number = _number(word)
    if number is None:
        raise POP3Error("Invalid message number")
    if not 1 <= number <= count:
        raise POP3Error("No such message")
    return number


def parse_line_count(word: str) -> int:
    """TOP's second argument: how many body lines, zero allowed."""
    number = _number(word)
    if number is None:
        raise POP3Error("Invalid line count")
    return number


def top(message: bytes, lines: int) -> bytes:
    """RFC 1939 TOP: the header section, the empty line after it, and the first ``lines`` body lines.

    A message without an empty line is all header and comes back whole, as does one with fewer
    body lines than asked for.
    """
    if message.startswith(b"\r\n"):
        position = 2  # no header fields at all
    else:
        separator = message.find(b"\r\n\r\n")
        if separator < 0:
            return message
        position = separator + 4
    for _ in range(lines):
        newline = message.find(b"\n", position)
        if newline < 0:
            return message
        position = newline + 1
    return message[:position]


def dot_stuffed(data: bytes, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """``data`` as the body of a multi-line response, the terminating ``.`` line included.

    Every line that starts with ``.`` gets a second one: the first line, and a line that begins
    exactly at a chunk boundary, too (audit P4).  Nothing else changes: the bytes are already in
    CRLF wire form (P5).  If ``data`` does not end with CRLF, one is added so the terminator is a
    line of its own; an empty message is just the terminator.
    """
    at_line_start = True
    end = len(data)
    terminator = b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n"
    for start in range(0, end, chunk_size):
        piece = data[start : start + chunk_size]
        stuffed = piece.replace(b"\n.", b"\n..")
        if at_line_start and piece.startswith(b"."):
            stuffed = b"." + stuffed
        at_line_start = piece.endswith(b"\n")
        if start + chunk_size >= end:
            stuffed += terminator
        yield stuffed
    if not data:
        yield b".\r\n"
