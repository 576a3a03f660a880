"""Reads that never wait for the disk (kms.store.cachedread), against the real kernel."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase

from kms.store.cachedread import CachedReader


class CachedReaderTests(TestCase):
    def setUp(self) -> None:
        self.reader = CachedReader()
        if not self.reader.enabled:
            raise SkipTest("no openat2/RWF_NOWAIT here")
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.data = os.urandom(64 * 1024)
        (self.dir / "m").write_bytes(self.data)
        fd = self.reader.open_directory(str(self.dir))
        if fd is None:  # just made: its dentry is cached, or the kernel cannot promise it
            raise SkipTest("directory not in the dentry cache")
        self.fd = fd
        self.addCleanup(os.close, fd)

    def test_cached_file(self) -> None:
        self.assertEqual(self.reader.read(self.fd, "m", len(self.data)), self.data)
        self.assertEqual(self.reader.read(self.fd, "m", 10**9), self.data)

    def test_longer_than_expected_missing_or_empty(self) -> None:
        self.assertIsNone(self.reader.read(self.fd, "m", len(self.data) - 1))  # not the indexed file
        self.assertIsNone(self.reader.read(self.fd, "gone", 100))
        (self.dir / "empty").write_bytes(b"")
        self.assertEqual(self.reader.read(self.fd, "empty", 0), b"")
        self.assertTrue(self.reader.enabled)

    def test_evicted_file_is_left_to_the_pool(self) -> None:
        """Pages dropped from the page cache: RWF_NOWAIT refuses, the reader answers None."""
        path = self.dir / "m"
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            try:
                os.preadv(fd, [bytearray(16)], 0, os.RWF_NOWAIT)
            except BlockingIOError:
                pass
            else:
                raise SkipTest("this file system keeps the pages (tmpfs) or reads them anyway")
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the probe may have read ahead
        finally:
            os.close(fd)
        self.assertIsNone(self.reader.read(self.fd, "m", len(self.data)))
        self.assertTrue(self.reader.enabled)

    def test_would_block_answers_none(self) -> None:
        def would_block(*args: object) -> int:
            raise BlockingIOError(errno.EAGAIN, "would block")

        self.patch(os, "preadv", would_block)
        self.assertIsNone(self.reader.read(self.fd, "m", len(self.data)))
        self.assertTrue(self.reader.enabled)

    def test_a_kernel_without_openat2_turns_it_off(self) -> None:
        def no_such_call(*args: object) -> int:
            ctypes.set_errno(errno.ENOSYS)
            return -1

        self.reader._syscall = no_such_call  # type: ignore[assignment]
        self.assertIsNone(self.reader.read(self.fd, "m", len(self.data)))
        self.assertFalse(self.reader.enabled)
        self.assertIsNone(self.reader.open_directory(str(self.dir)))

    def test_uncached_path_is_refused_not_waited_for(self) -> None:
        """EAGAIN from RESOLVE_CACHED (a dentry not cached) is a plain None, the reader stays on."""

        def not_cached(*args: object) -> int:
            ctypes.set_errno(errno.EAGAIN)
            return -1

        self.reader._syscall = not_cached  # type: ignore[assignment]
        self.assertIsNone(self.reader.read(self.fd, "m", len(self.data)))
        self.assertTrue(self.reader.enabled)

    def test_files_of_another_owner_turn_it_off(self) -> None:
        """O_NOATIME needs the files' owner: EPERM means a read would update atime (which may wait
        for the journal), so every read goes to the pool from then on."""

        def not_the_owner(*args: object) -> int:
            ctypes.set_errno(errno.EPERM)
            return -1

        self.reader._syscall = not_the_owner  # type: ignore[assignment]
        self.assertIsNone(self.reader.read(self.fd, "m", len(self.data)))
        self.assertFalse(self.reader.enabled)
