"""A message's wire form, and where its header ends: shared by the store and the protocols.

The store indexes a message's header section (`kms.store.index`) and IMAP cuts ``BODY[HEADER]`` and
every MIME part's header out of it (`kms.imap.sections`); both must agree to the byte on where a
header ends, so that rule lives here, once.  Pure functions, no I/O.
"""

from __future__ import annotations

import re

_BARE_LF = re.compile(rb"(?<!\r)\n")
_BLANK_LINE = re.compile(rb"\n\r?\n")


def wire_form(data: bytes) -> bytes:
    """Every bare LF becomes CRLF; an existing CRLF (and a lone CR) stays as it is.

    Messages that are already in wire form (APPEND brings CRLF) come back as they are: two C-speed
    counts cost far less than the regular expression, which is only needed for mixed endings."""
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    if data.count(b"\n") == data.count(b"\r\n"):
        return data
    return _BARE_LF.sub(b"\r\n", data)


def body_start(message: bytes, start: int = 0, end: int | None = None) -> int:
    """Where the body of the entity at ``message[start:end]`` starts: just after the first empty
    line (CRLF or, in a part that is not in wire form, a bare LF); with none, at ``end``."""
    end = len(message) if end is None else end
    if message.startswith(b"\r\n", start, end):
        return start + 2
    if message.startswith(b"\n", start, end):
        return start + 1
    blank = _BLANK_LINE.search(message, start, end)
    return blank.end() if blank else end


def header_section(message: bytes) -> bytes:
    """The header up to and including the empty line that ends it (RFC 5322); the whole message
    when there is none.  This is ``BODY[HEADER]`` and what `MessageInfo.headers` holds."""
    return message[: body_start(message)]
