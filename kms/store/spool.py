"""The body of one SMTP DATA phase while it arrives.

Small messages stay in memory; a large one spills to a private file in the store's ``tmp`` so that
memory stays bounded whatever the client sends.  Nothing here is fsync'd: a spool only has to live
until delivery, and delivery (`kms.store.maildir`) makes the copies durable before the 250.
"""

from __future__ import annotations

import io
import os
import secrets
from pathlib import Path
from typing import BinaryIO

_SPILL_BUFFER = 1 << 16


class MessageSpool:
    """Holds up to ``memory_limit`` bytes in memory, then appends everything to a file in ``tmpdir``.

    Satisfies `kms.smtp.interfaces.Spool`; `open` gives delivery a reader from the first byte.
    """

    def __init__(self, tmpdir: Path, memory_limit: int = 1 << 20) -> None:
        self._tmpdir = tmpdir
        self._memory_limit = memory_limit
        self._memory = bytearray()
        self._frozen: bytes | None = None
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._discarded = False
        self.size = 0

    @property
    def path(self) -> Path | None:
        """The spill file, or None while the message is still in memory (or after `discard`)."""
        return self._path

    def write(self, data: bytes) -> None:
        """Append ``data``; the first write that would pass the memory limit moves everything to disk."""
        if self._discarded:
            raise ValueError("write to a discarded spool")
        if self._file is None and len(self._memory) + len(data) > self._memory_limit:
            self._spill()
        if self._file is None:
            self._memory += data
            self._frozen = None
        else:
            self._file.write(data)
        self.size += len(data)

    def open(self) -> BinaryIO:
        """A new reader positioned at the start; each call is independent (one per delivered copy)."""
        if self._discarded:
            raise ValueError("open of a discarded spool")
        if self._file is None:
            if self._frozen is None:
                self._frozen = bytes(self._memory)
            return io.BytesIO(self._frozen)  # shares the bytes object, no copy per reader
        self._file.flush()
        assert self._path is not None
        return open(self._path, "rb")

    def discard(self) -> None:
        """Forget the message and remove any spill file; safe to call more than once."""
        self._discarded = True
        self._memory = bytearray()
        self._frozen = None
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:
                pass  # the flush of a full disk: the file is closed anyway, and removed below
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None

    def _spill(self) -> None:
        path = self._tmpdir / f"spool-{secrets.token_hex(12)}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._path = path
        self._file = os.fdopen(fd, "wb", buffering=_SPILL_BUFFER)
        self._file.write(self._memory)
        self._memory = bytearray()
        self._frozen = None
