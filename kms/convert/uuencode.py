"""uuencoded blocks (begin <mode> <name> ... end) in plain text to attachments."""

import binascii
import re

_BEGIN = re.compile(rb"^begin ([0-7]{3,4}) ([^\r\n]+?)[ \t]*$")


class UUBlock:
    __slots__ = ("start", "end", "mode", "name", "data")

    def __init__(self, start, end, mode, name, data):
        self.start, self.end, self.mode, self.name, self.data = start, end, mode, name, data


def _decode_line(line):
    """Decode one uuencoded line strictly; raise ValueError when malformed."""
    if not line:
        raise ValueError("empty line inside block")
    if line[0] < 32 or line[0] > 96:
        raise ValueError("bad length character")
    n = (line[0] - 32) & 63
    try:
        return binascii.a2b_uu(line)
    except binascii.Error:
        # Some encoders append a one-character checksum; allow just that.
        significant = 1 + ((n + 2) // 3) * 4
        if len(line.rstrip()) - significant > 1:
            raise ValueError("trailing garbage on line") from None
        try:
            return binascii.a2b_uu(line[:significant])
        except binascii.Error as e:
            raise ValueError(str(e)) from None


def find_blocks(text):
    """Find well-formed uuencoded blocks in bytes `text`; malformed ones are skipped.

    Returns a list of UUBlock with byte offsets [start, end) covering the whole
    block including its end line and line terminator.
    """
    lines = text.splitlines(keepends=True)
    offsets = []
    pos = 0
    for line in lines:
        offsets.append(pos)
        pos += len(line)
    blocks = []
    i = 0
    while i < len(lines):
        m = _BEGIN.match(lines[i].rstrip(b"\r\n"))
        if not m:
            i += 1
            continue
        data = bytearray()
        j = i + 1
        ok = False
        while j < len(lines):
            raw = lines[j].rstrip(b"\r\n")
            if raw.rstrip() == b"end":
                ok = True
                break
            try:
                data += _decode_line(raw)
            except ValueError:
                break
            j += 1
        if ok:
            name = m.group(2).decode("utf-8", "replace")
            end = offsets[j] + len(lines[j])
            blocks.append(UUBlock(offsets[i], end, int(m.group(1), 8), name, bytes(data)))
            i = j + 1
        else:
            i += 1
    return blocks


def split_text(text):
    """Return (remaining_text, [(name, data), ...]); blocks removed from text."""
    blocks = find_blocks(text)
    if not blocks:
        return text, []
    out = bytearray()
    pos = 0
    for b in blocks:
        out += text[pos : b.start]
        pos = b.end
    out += text[pos:]
    return bytes(out), [(b.name, b.data) for b in blocks]
