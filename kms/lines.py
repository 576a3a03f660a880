"""Command lines out of a byte stream, in bounded memory: shared by the SMTP and POP3 front-ends.

A line ends at LF (one CR before it is dropped).  A line longer than the limit is reported once
as `TOO_LONG` and the rest of it is thrown away as it arrives, so a client that never sends LF
cannot make the buffer grow (Twisted's LineOnlyReceiver keeps it: audit S5).
"""

from __future__ import annotations

import enum
from typing import Final, Literal


class _Signal(enum.Enum):
    TOO_LONG = "too long"


TOO_LONG: Final = _Signal.TOO_LONG


class LineReader:
    """Takes complete lines off the front of a protocol's input buffer."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._discarding = False  # the rest of an over-long line is still arriving

    def take(self, inbox: bytearray) -> bytes | Literal[_Signal.TOO_LONG] | None:
        """The next line (without its line end), `TOO_LONG`, or None when more input is needed."""
        newline = inbox.find(b"\n")
        if self._discarding:
            if newline < 0:
                inbox.clear()
                return None
            del inbox[: newline + 1]
            self._discarding = False
            newline = inbox.find(b"\n")
        if newline < 0:
            if len(inbox) > self.limit + 1:  # +1: a CR may still be waiting for its LF
                inbox.clear()
                self._discarding = True
                return TOO_LONG
            return None
        line = bytes(inbox[:newline])
        del inbox[: newline + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        return TOO_LONG if len(line) > self.limit else line
