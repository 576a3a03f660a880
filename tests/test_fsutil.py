"""kms.fsutil.replace_file: whole or nothing, exactly the mode asked, never through a symlink."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

from kms.fsutil import create_private_file, replace_file


class ReplaceFileTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / "state.json"

    def test_replaces_with_the_mode_asked_whatever_the_umask(self) -> None:
        self.path.write_bytes(b"old")
        old = os.umask(0o077)
        try:
            size = replace_file(self.path, [b"new ", b"data"], 0o644, sync_dir=True)
        finally:
            os.umask(old)
        self.assertEqual((size, self.path.read_bytes()), (8, b"new data"))
        self.assertEqual(self.path.stat().st_mode & 0o777, 0o644)
        self.assertEqual(sorted(p.name for p in self.dir.iterdir()), ["state.json"])

    def test_a_failure_keeps_the_old_file_and_leaves_no_temporary(self) -> None:
        self.path.write_bytes(b"old")

        def chunks():  # type: ignore[no-untyped-def]
            yield b"half"
            raise OSError("disk gone")

        self.assertRaises(OSError, replace_file, self.path, chunks())
        self.assertEqual(self.path.read_bytes(), b"old")
        self.assertEqual(sorted(p.name for p in self.dir.iterdir()), ["state.json"])

    def test_a_symlink_in_place_of_the_temporary_is_not_followed(self) -> None:
        victim = self.dir / "victim"
        victim.write_bytes(b"keep")
        tmp = self.dir / "state.json.tmp"
        tmp.symlink_to(victim)
        self.assertRaises(OSError, replace_file, self.path, b"x", tmp=tmp)
        self.assertEqual(victim.read_bytes(), b"keep")


class CreatePrivateFileTests(TestCase):
    def test_new_file_is_0600(self) -> None:
        path = Path(self.mktemp())
        old = os.umask(0)
        try:
            create_private_file(path)
        finally:
            os.umask(old)
        self.assertEqual((path.stat().st_size, path.stat().st_mode & 0o777), (0, 0o600))

    def test_existing_file_is_not_reopened(self) -> None:
        """A POSIX lock this process holds on the file survives: any close of any descriptor of the
        file would drop it (how SQLite connections beside kmsctl lost their locks and went stale)."""
        path = Path(self.mktemp())
        path.write_bytes(b"data")
        fd = os.open(path, os.O_RDWR)
        self.addCleanup(os.close, fd)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        create_private_file(path)
        probe = (
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n"
        )
        taken = subprocess.run([sys.executable, "-c", probe, str(path)])
        self.assertEqual(taken.returncode, 3)  # still locked by us
        self.assertEqual(path.read_bytes(), b"data")
