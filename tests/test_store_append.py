"""APPEND's spare file (`FolderFiles.prepare_append`): made after a reply, written by the next
APPEND, never shared, never seen as a message, tidied away when the folder closes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kms.store.index import SPARE, FolderFiles, UidValidities, normalize_flags
from tests.test_mailbox import StoreCase, analyze, message


class SpareFileTests(StoreCase):
    def tmp(self) -> list[Path]:
        return sorted((self.root / "tmp").iterdir())

    def cur_inodes(self) -> dict[int, str]:
        return {os.stat(self.root / "cur" / name).st_ino: name for name in self.cur()}

    async def test_each_append_writes_the_file_made_after_the_previous_one(self) -> None:
        account = await self.account()
        await account.append("INBOX", message("one"))
        await self.store.locked([account.folder("INBOX")], lambda: self.store.run(lambda: None))
        spares = self.tmp()
        self.assertEqual(len(spares), 1)
        self.assertTrue(spares[0].name.startswith(SPARE))
        spare = os.stat(spares[0])
        self.assertEqual((spare.st_size, stat.S_IMODE(spare.st_mode)), (0, 0o600))

        await account.append("INBOX", message("two"), ["\\Seen"])
        inodes = self.cur_inodes()
        self.assertIn(spare.st_ino, inodes)
        self.assertTrue(inodes[spare.st_ino].endswith(":2,S"))
        self.assertEqual((self.root / "cur" / inodes[spare.st_ino]).read_bytes(), message("two"))
        view = await self.open()
        self.assertEqual([m.meta["subject"] for m in view.messages], ["one", "two"])

    async def test_closing_the_folder_removes_the_unused_spare(self) -> None:
        await (await self.account()).append("INBOX", message("one"))
        await self.store.close()
        self.assertEqual(self.tmp(), [])
        self.assertEqual(len(self.cur()), 1)

    async def test_a_spare_left_by_a_killed_process_is_never_a_message(self) -> None:
        """A process killed between making a spare (or writing into it) and the rename leaves a
        file in tmp/: the next process neither shows it nor reuses it, and UIDs go on."""
        await (await self.account()).append("INBOX", message("one"))
        killed = FolderFiles(self.root, analyze, UidValidities())
        killed.load()
        killed.prepare_append()
        (fd, name), killed._spare = killed._spare, None  # type: ignore[misc]
        os.write(fd, message("half written"))
        os.close(fd)
        killed.close()

        later = self.new_store()
        _, uid = await (await self.account(later)).append("INBOX", message("two"))
        self.assertEqual(uid, 2)
        view = await self.open(store=later)
        self.assertEqual([m.meta["subject"] for m in view.messages], ["one", "two"])
        self.assertEqual((self.root / "tmp" / name).read_bytes(), message("half written"))

    async def test_two_processes_never_write_the_same_file(self) -> None:
        """Each spare has its own name and inode: APPENDs alternating between two stores on one
        folder (as a restart racing the old process would) each keep their own bytes."""
        first, second = self.store, self.new_store()
        accounts = [await self.account(first), await self.account(second)]
        for i in range(6):
            await accounts[i % 2].append("INBOX", message(f"m{i}"))
        await first.close()
        await second.close()
        bodies = sorted((self.root / "cur" / name).read_bytes() for name in self.cur())
        self.assertEqual(bodies, sorted(message(f"m{i}") for i in range(6)))
        self.assertEqual(self.tmp(), [])


class DirectFolderFilesTests(StoreCase):
    def test_append_without_a_spare_makes_its_own_file(self) -> None:
        """The first APPEND into a folder (no spare yet) works exactly as before the spare."""
        (self.root / "cur").mkdir(parents=True)
        for sub in ("new", "tmp"):
            (self.root / sub).mkdir()
        files = FolderFiles(self.root, analyze, UidValidities())
        files.load()
        try:
            entry = files.append(message("one"), normalize_flags(["\\Flagged"]), None)
            self.assertEqual(entry.info.uid, 1)
            self.assertEqual(os.listdir(self.root / "tmp"), [])
            files.prepare_append()
            self.assertEqual(len(os.listdir(self.root / "tmp")), 1)
        finally:
            files.close()
        self.assertEqual(os.listdir(self.root / "tmp"), [])

