"""Reading a message file on the reactor thread only when the kernel promises not to wait.

A thread-pool hop costs ~100 µs of latency and CPU per request here, more than reading a 4 KiB
message from the page cache (~6 µs): the larger part of a POP3 RETR's time, and of a FETCH of a
few bodies (docs/performance.md).  Linux can say whether a read would wait for the disk:
``openat2`` with ``RESOLVE_CACHED`` fails with EAGAIN unless every path component is in the
dentry cache, and ``preadv2`` with ``RWF_NOWAIT`` fails (or reads short) unless the data is in
the page cache.  With both, reading a cached file never blocks, so it may run on the reactor;
anything else (EAGAIN, a short read, a file longer than indexed, a kernel without these calls)
returns None and the caller reads in the pool as before.

The kernel's answer is learnt once per process: ENOSYS, EINVAL or EOPNOTSUPP (kernels before
5.12, seccomp filters, file systems without non-blocking reads) turn the fast path off.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

from twisted.logger import Logger

log = Logger()

_SYS_OPENAT2 = 437  # the same number on every architecture (the generic syscall table, Linux 5.6)
_RESOLVE_CACHED = 0x20  # Linux 5.12
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class CachedReader:
    """``open_directory`` and ``read`` as above; ``enabled`` until the kernel says it cannot."""

    def __init__(self) -> None:
        self.enabled = sys.platform == "linux" and hasattr(os, "RWF_NOWAIT")
        self._syscall = None
        if self.enabled:
            try:
                self._syscall = ctypes.CDLL(None, use_errno=True).syscall
            except (OSError, AttributeError):
                self.enabled = False
        # O_NOATIME: RWF_NOWAIT does not cover the access-time update a read makes, which on ext4
        # can wait for a journal commit (the first read of new mail under relatime).
        self._how = _OpenHow(os.O_RDONLY | os.O_CLOEXEC | os.O_NOATIME, 0, _RESOLVE_CACHED)
        self._directory_how = _OpenHow(os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0, _RESOLVE_CACHED)

    def _open(self, directory: int, path: bytes, how: _OpenHow) -> int | None:
        assert self._syscall is not None
        fd = self._syscall(_SYS_OPENAT2, directory, path, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return int(fd)
        error = ctypes.get_errno()
        if error in _UNSUPPORTED:
            self._disable(error)
        elif error == errno.EPERM and how.flags & os.O_NOATIME:  # not the files' owner: a read
            self._disable(error)  # would update atime, which may wait, so the pool reads them all
        return None  # EAGAIN (not cached), ENOENT (renamed or expunged meanwhile), ...

    def _disable(self, error: int) -> None:
        if self.enabled:
            self.enabled = False
            log.info("cached reads off on this kernel: {error}", error=os.strerror(error))

    def open_directory(self, path: str) -> int | None:
        """A descriptor of directory ``path`` if opening it cannot wait for the disk; else None."""
        if not self.enabled:
            return None
        return self._open(-100, os.fsencode(path), self._directory_how)  # AT_FDCWD

    def read(self, directory: int, name: str, limit: int) -> bytes | None:
        """File ``name`` of ``directory`` (at most ``limit`` bytes), if every byte of it is cached."""
        if not self.enabled:
            return None
        fd = self._open(directory, os.fsencode(name), self._how)
        if fd is None:
            return None
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                return None
            buffer = bytearray(size)
            try:
                got = os.preadv(fd, [buffer], 0, os.RWF_NOWAIT) if size else 0
            except OSError as e:
                if e.errno in _UNSUPPORTED:
                    self._disable(e.errno)
                return None
            return bytes(buffer) if got == size else None
        finally:
            os.close(fd)


cached_reader = CachedReader()
