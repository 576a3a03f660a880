"""MessageSpool: exact size, bounded memory, spill file lifecycle."""

from __future__ import annotations

import os
import stat
import tracemalloc
from pathlib import Path

from twisted.trial.unittest import TestCase

from kms.store.spool import MessageSpool


class MessageSpoolTests(TestCase):
    def setUp(self) -> None:
        self.tmpdir = Path(self.mktemp())
        self.tmpdir.mkdir()

    def read(self, spool: MessageSpool) -> bytes:
        with spool.open() as f:
            return f.read()

    def test_small_message_stays_in_memory(self) -> None:
        spool = MessageSpool(self.tmpdir, memory_limit=100)
        spool.write(b"Subject: hi\r\n\r\n")
        spool.write(b"body\r\n")
        self.assertEqual(spool.size, 21)
        self.assertIsNone(spool.path)
        self.assertEqual(os.listdir(self.tmpdir), [])
        self.assertEqual(self.read(spool), b"Subject: hi\r\n\r\nbody\r\n")

    def test_exactly_at_limit_does_not_spill(self) -> None:
        spool = MessageSpool(self.tmpdir, memory_limit=10)
        spool.write(b"12345")
        spool.write(b"67890")
        self.assertIsNone(spool.path)
        spool.write(b"x")
        self.assertIsNotNone(spool.path)
        self.assertEqual(self.read(spool), b"1234567890x")
        self.assertEqual(spool.size, 11)

    def test_spill_file_is_private_and_complete(self) -> None:
        spool = MessageSpool(self.tmpdir, memory_limit=8)
        chunks = [bytes([i]) * (i * 7 + 1) for i in range(50)]
        for chunk in chunks:
            spool.write(chunk)
        expected = b"".join(chunks)
        self.assertEqual(spool.size, len(expected))
        assert spool.path is not None
        self.assertEqual(spool.path.parent, self.tmpdir)
        self.assertEqual(stat.S_IMODE(spool.path.stat().st_mode), 0o600)
        self.assertEqual(self.read(spool), expected)

    def test_readers_are_independent_and_repeatable(self) -> None:
        for limit in (1 << 20, 4):
            spool = MessageSpool(self.tmpdir, memory_limit=limit)
            spool.write(b"abcdefgh")
            first, second = spool.open(), spool.open()
            self.assertEqual(first.read(3), b"abc")
            self.assertEqual(second.read(), b"abcdefgh")
            self.assertEqual(first.read(), b"defgh")
            first.close()
            second.close()
            spool.discard()

    def test_open_sees_writes_made_after_an_earlier_open(self) -> None:
        spool = MessageSpool(self.tmpdir, memory_limit=1 << 20)
        spool.write(b"one")
        self.assertEqual(self.read(spool), b"one")
        spool.write(b"two")
        self.assertEqual(self.read(spool), b"onetwo")

    def test_discard_removes_spill_file_and_is_idempotent(self) -> None:
        spool = MessageSpool(self.tmpdir, memory_limit=4)
        spool.write(b"more than four bytes")
        self.assertEqual(len(os.listdir(self.tmpdir)), 1)
        spool.discard()
        self.assertEqual(os.listdir(self.tmpdir), [])
        spool.discard()
        self.assertEqual(os.listdir(self.tmpdir), [])
        self.assertRaises(ValueError, spool.write, b"x")
        self.assertRaises(ValueError, spool.open)

    def test_discard_tolerates_file_already_gone(self) -> None:
        spool = MessageSpool(self.tmpdir, memory_limit=1)
        spool.write(b"xy")
        assert spool.path is not None
        spool.path.unlink()
        spool.discard()
        self.assertEqual(os.listdir(self.tmpdir), [])

    def test_two_spools_get_distinct_files(self) -> None:
        a, b = MessageSpool(self.tmpdir, 1), MessageSpool(self.tmpdir, 1)
        a.write(b"aa")
        b.write(b"bb")
        self.assertNotEqual(a.path, b.path)
        self.assertEqual((self.read(a), self.read(b)), (b"aa", b"bb"))

    def test_memory_bounded_for_50_mb(self) -> None:
        chunk = os.urandom(1 << 16)
        total = 50 * (1 << 20)
        spool = MessageSpool(self.tmpdir)
        self.addCleanup(spool.discard)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        for _ in range(total // len(chunk)):
            spool.write(chunk)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        self.assertLess(peak, 3 << 20)
        self.assertEqual(spool.size, total)
        with spool.open() as f:
            assert spool.path is not None
            self.assertEqual(spool.path.stat().st_size, total)
            self.assertEqual(f.read(len(chunk)), chunk)
            f.seek(-len(chunk), os.SEEK_END)
            self.assertEqual(f.read(), chunk)
