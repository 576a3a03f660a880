# -*- test-case-name: tests.test_imap_mutf7 -*-
"""Modified UTF-7 mailbox names (RFC 3501 §5.1.3).

Printable ASCII stands for itself ("&" as "&-"); every other run of characters is UTF-16BE in
base64 with "," for "/", no padding, between "&" and "-".  `decode` accepts only the one spelling
`encode` produces, so two different wire names can never open the same mailbox.
"""

from __future__ import annotations

import base64
import binascii
import re

_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]+")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_ANY_PRINTABLE = re.compile(r"[\x20-\x7e]")
_BASE64 = re.compile(r"[A-Za-z0-9+,]+")


def _shift(run: str) -> str:
    encoded = base64.b64encode(run.encode("utf-16-be")).rstrip(b"=").replace(b"/", b",")
    return "&" + encoded.decode("ascii") + "-"


def encode(name: str) -> str:
    """The wire form of a mailbox name; ValueError for lone surrogates (not text)."""
    try:
        return _NOT_PRINTABLE.sub(lambda match: _shift(match[0]), name.replace("&", "&-"))
    except UnicodeEncodeError as error:
        raise ValueError(f"mailbox name is not valid text: {error.reason}") from None


def _unshift(encoded: str) -> str:
    if not _BASE64.fullmatch(encoded):
        raise ValueError(f"invalid modified base64 {encoded!r}")
    try:
        data = base64.b64decode(encoded.replace(",", "/") + "=" * (-len(encoded) % 4), validate=True)
        text = data.decode("utf-16-be")
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError(f"invalid modified base64 {encoded!r}") from None
    if _shift(text) != f"&{encoded}-":
        raise ValueError(f"non-canonical modified base64 {encoded!r}")  # stray bits, extra characters
    if _ANY_PRINTABLE.search(text):
        raise ValueError(f"printable ASCII in modified base64 {encoded!r}")
    return text


def decode(wire: str) -> str:
    """The mailbox name a client sent; ValueError unless ``wire`` is exactly what `encode` makes."""
    if not _PRINTABLE.fullmatch(wire):
        raise ValueError("mailbox name has characters outside printable ASCII")
    out = []
    pos = 0
    shift_end = -1  # where the last base64 shift ended: another may not follow at once
    while (amp := wire.find("&", pos)) >= 0:
        out.append(wire[pos:amp])
        dash = wire.find("-", amp)
        if dash < 0:
            raise ValueError("unterminated &-shift in mailbox name")
        if dash == amp + 1:
            out.append("&")
        elif amp == shift_end:
            raise ValueError("two adjacent &-shifts in mailbox name")
        else:
            out.append(_unshift(wire[amp + 1 : dash]))
            shift_end = dash + 1
        pos = dash + 1
    out.append(wire[pos:])
    return "".join(out)
