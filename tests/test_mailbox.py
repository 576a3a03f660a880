"""The mailbox store on real maildirs, with a real thread pool: UIDs, flags, events, durability."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from kms.imap.sections import Section, fetch_section
from kms.store import index as index_module
from kms.store import mailbox as mailbox_module
from kms.store.cachedread import cached_reader
from kms.store.index import CACHE, SNAPSHOT, UIDLIST, FolderFiles, IndexCache, LazyMeta, UidValidities
from kms.store.interfaces import (
    Account,
    DetailsNotLoaded,
    FolderEvent,
    FolderStatus,
    FolderView,
    MailboxError,
    MaildropLocked,
    MessageInfo,
    message_info,
)
from kms.store.mailbox import MailStore, locate, merge_events, positions_of
from kms.store.maildir import mailbox_path, maildir_name
from kms.wireform import header_section, wire_form

reactor: Any = _reactor
ADDRESS = "alice@example.test"


def analyze(wire: bytes) -> Mapping[str, object]:
    """A stand-in for kms.imap.message.analyze: the Subject, and proof it saw the wire form."""
    subject = ""
    for line in wire.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"subject:"):
            subject = line[8:].strip().decode("utf-8", "replace")
    return {"subject": subject, "bare_lf": b"\n" in wire.replace(b"\r\n", b"")}


def message(subject: str, body: str = "Hello.\n", lf: bytes = b"\n") -> bytes:
    text = f"From: bob@example.test\nTo: alice@example.test\nSubject: {subject}\n\n{body}"
    return text.encode().replace(b"\n", lf)


_counter = iter(range(1, 10**9))


def deliver(inbox: Path, data: bytes, when: int = 1700000000) -> str:
    """Write a file into new/ the way SMTP delivery does (LF endings, ``,S=`` size)."""
    name = f"{maildir_name(when, 0, 1, next(_counter), 'cafe0000', 'mx.test')},S={len(data)}"
    (inbox / "new" / name).write_bytes(data)
    return name


class StoreCase(TestCase):
    def setUp(self) -> None:
        self.mail_root = Path(self.mktemp()).resolve()
        self.mail_root.mkdir()
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="test-store")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.store = self.new_store()
        self.root = mailbox_path(self.mail_root, ADDRESS)

    def new_store(self) -> MailStore:
        """Another process's view of the same disk (nothing shared in memory)."""
        store = MailStore(self.mail_root, self.pool, reactor, analyze)
        self.addCleanup(store.close)
        return store

    async def account(self, store: MailStore | None = None) -> Account:
        return await (store or self.store).account(ADDRESS)

    async def open(
        self,
        name: str = "INBOX",
        readonly: bool = False,
        store: MailStore | None = None,
        details: bool = True,
    ) -> FolderView:
        """The folder open (closed at clean-up); with ``details``, its headers and metas readable."""
        view = await (await self.account(store)).open(name, readonly)
        self.addCleanup(view.close)
        if details:
            await view.details(view.messages)
        return view

    async def refused(self, d: Deferred[Any], code: str) -> MailboxError:
        error: MailboxError = await self.assertFailure(d, MailboxError)
        self.assertEqual(error.code, code, str(error))
        return error

    def cur(self, folder: Path | None = None) -> list[str]:
        return sorted(os.listdir((folder or self.root) / "cur"))


class AccountTests(StoreCase):
    async def test_first_login_defaults(self) -> None:
        """INBOX plus Sent, Drafts, Trash, Junk with SPECIAL-USE, subscribed, on disk as Maildir++."""
        account = await self.account()
        self.assertIs(await self.account(), account)
        listing = {f.name: f for f in await account.list()}
        self.assertEqual(list(listing), ["INBOX", "Drafts", "Junk", "Sent", "Trash"])
        for name, use in [
            ("Sent", "\\Sent"),
            ("Drafts", "\\Drafts"),
            ("Trash", "\\Trash"),
            ("Junk", "\\Junk"),
        ]:
            self.assertIn(use, listing[name].attributes)
            self.assertTrue((self.root / f".{name}" / "cur").is_dir())
        self.assertTrue(all(f.subscribed for f in listing.values()))
        self.assertEqual(listing["INBOX"].attributes, {"\\HasNoChildren"})

    async def test_defaults_only_on_first_login(self) -> None:
        account = await self.account()
        await account.delete("Junk")
        listing = {f.name: f for f in await (await self.account(self.new_store())).list()}
        self.assertEqual(listing["Junk"].attributes, {"\\NonExistent", "\\HasNoChildren"})  # still subscribed
        self.assertFalse((self.root / ".Junk").exists())

    async def test_concurrent_first_calls_share_one_account(self) -> None:
        first, second = self.store.account(ADDRESS), self.store.account(ADDRESS.upper())
        self.assertIs(await first, await second)

    async def test_create_delete_hierarchy(self) -> None:
        """Parents are implied (\\Noselect); deleting a parent with children leaves it \\Noselect."""
        account = await self.account()
        await account.create("Work/2024/Q1")
        await self.refused(account.create("Work/2024/Q1"), "ALREADYEXISTS")
        await self.refused(account.create("inbox"), "ALREADYEXISTS")
        listing = {f.name: f.attributes for f in await account.list()}
        self.assertEqual(listing["Work"], {"\\Noselect", "\\HasChildren"})
        self.assertEqual(listing["Work/2024/Q1"], {"\\HasNoChildren"})
        await account.create("Work")
        await account.append("Work", message("kept?"))
        await account.delete("Work")
        listing = {f.name: f.attributes for f in await account.list()}
        self.assertEqual(listing["Work"], {"\\Noselect", "\\HasChildren"})
        self.assertFalse((self.root / ".Work").exists())
        await self.refused(account.delete("Work"), "NONEXISTENT")
        await self.refused(account.delete("Nope"), "NONEXISTENT")
        await self.refused(account.delete("INBOX"), "CANNOT")
        self.assertEqual([p for p in os.listdir(self.root) if p.startswith("kms-deleted")], [])

    async def test_recreated_folder_gets_new_uidvalidity(self) -> None:
        account = await self.account()
        await account.create("X")
        first, _ = await account.append("X", message("1"))
        await account.delete("X")
        await account.create("X")
        second, uid = await account.append("X", message("2"))
        self.assertNotEqual(first, second)
        self.assertEqual(uid, 1)

    async def test_path_tricks_refused(self) -> None:
        """No name reaches outside the user's directory; odd but valid names stay inside it."""
        account = await self.account()
        for name in ["../x", "/etc", "a/../../b", "..", ".", "a//b", "a/", "x\x00y", "x\ny", "", "\x1b[0m"]:
            await self.refused(account.create(name), "CANNOT")
            await self.refused(account.open(name), "CANNOT")
            await self.refused(account.append(name, b"x"), "CANNOT")
        before = sorted(os.listdir(self.mail_root))
        await account.create("..a/.b.")
        await account.create("cur")
        self.assertEqual(sorted(os.listdir(self.mail_root)), before)
        self.assertTrue((self.root / ".%2E%2Ea.%2Eb%2E" / "cur").is_dir())
        self.assertTrue((self.root / ".cur" / "cur").is_dir())
        names = {f.name for f in await account.list()}
        self.assertTrue({"..a/.b.", "cur"} <= names)

    async def test_foreign_directories_are_not_folders(self) -> None:
        (self.root / ".a%2eb").mkdir(parents=True)
        (self.root / ".INBOX").mkdir()
        account = await self.account()
        names = [f.name for f in await account.list()]
        self.assertEqual(names, ["INBOX", "Drafts", "Junk", "Sent", "Trash"])

    async def test_subscriptions_persist(self) -> None:
        account = await self.account()
        await account.subscribe("Trash", False)
        await account.subscribe("Later", True)  # allowed before it exists (RFC 3501)
        await self.refused(account.subscribe("../x", True), "CANNOT")
        listing = {f.name: f for f in await (await self.account(self.new_store())).list()}
        self.assertFalse(listing["Trash"].subscribed)
        self.assertTrue(listing["Later"].subscribed)
        self.assertIn("\\NonExistent", listing["Later"].attributes)

    async def test_status(self) -> None:
        account = await self.account()
        await account.append("INBOX", message("a"), ["\\Seen"])
        await account.append("INBOX", message("b"))
        deliver(self.root, message("c"))
        status = await account.status("INBOX")
        self.assertEqual((status.messages, status.unseen, status.recent, status.uidnext), (3, 2, 3, 4))
        await self.refused(account.status("Nope"), "NONEXISTENT")


class StatusTests(StoreCase):
    """STATUS answers from counts kept up to date (a loaded folder) or from the cache and one
    listdir (a folder that is not): either way without walking or loading every message."""

    async def fill(self) -> Account:
        account = await self.account()
        await account.append("INBOX", message("a"), ["\\Seen"])
        await account.append("INBOX", message("b"), ["\\Deleted", "work"])
        await account.append("INBOX", message("c"), ["\\Seen", "\\Flagged"])
        return account

    def folder(self, store: MailStore) -> Any:
        return store._folders.get(self.root)

    async def status_of_a_fresh_process(self) -> tuple[FolderStatus, MailStore]:
        store = self.new_store()
        return await (await self.account(store)).status("INBOX"), store

    async def test_counts_follow_every_change(self) -> None:
        account = await self.fill()
        view, other = await self.open(), await self.open()
        folder = self.folder(self.store)

        async def check() -> None:
            messages = folder.messages
            status = await account.status("INBOX")
            self.assertEqual(status.unseen, sum("\\Seen" not in m.flags for m in messages))
            self.assertEqual(status.messages, len(messages))
            self.assertEqual(folder.doomed, {m.uid for m in messages if "\\Deleted" in m.flags})

        await check()
        await view.store([1, 2], ["\\Seen", "\\Deleted"], "+")
        await check()
        await other.store([1], ["\\Deleted"], "-")
        await check()
        await account.append("INBOX", message("d"), ["\\Deleted"])
        deliver(self.root, message("e"))
        await check()
        self.assertEqual(await view.expunge([4, 1]), [4])  # 1 is no longer \\Deleted
        await check()
        self.assertEqual(await view.expunge(), [2])
        await check()
        await view.copy([1, 3], "INBOX")
        await check()
        self.assertEqual([m.uid for m in folder.messages], [1, 3, 5, 6, 7])

    async def test_closed_folder_counted_without_loading(self) -> None:
        await self.fill()
        deliver(self.root, message("new, unseen"))
        status, store = await self.status_of_a_fresh_process()
        self.assertIsNone(self.folder(store))  # nothing was loaded, so nothing is kept
        self.assertEqual((status.messages, status.unseen, status.recent, status.uidnext), (4, 2, 1, 5))
        view = await self.open(store=store)  # what a SELECT then says agrees, UIDNEXT included
        self.assertEqual((len(view.messages), len(view.recent), view.uidnext), (4, 1, 5))
        self.assertEqual(status.uidvalidity, view.uidvalidity)

    async def test_closed_folder_loaded_when_the_cache_cannot_answer(self) -> None:
        await self.fill()
        os.unlink(self.root / "cur" / self.cur()[0])  # removed behind the index's back
        status, store = await self.status_of_a_fresh_process()
        self.assertTrue(self.folder(store).loaded)
        self.assertEqual((status.messages, status.unseen, status.uidnext), (2, 1, 4))
        for name in (CACHE, CACHE + "-wal", CACHE + "-shm"):
            if (self.root / name).exists():
                os.unlink(self.root / name)
        status, store = await self.status_of_a_fresh_process()
        self.assertTrue(self.folder(store).loaded)
        self.assertEqual((status.messages, status.unseen, status.uidnext), (2, 1, 4))

    async def test_status_of_a_missing_folder(self) -> None:
        await self.refused((await self.account(self.new_store())).status("Nope"), "NONEXISTENT")


class UidTests(StoreCase):
    async def fill(self) -> tuple[int, list[int]]:
        account = await self.account()
        await account.append("INBOX", message("one"), ["\\Seen", "work"])
        await account.append("INBOX", message("two"))
        deliver(self.root, message("three"))
        view = await self.open()
        view.close()
        return view.uidvalidity, [m.uid for m in view.messages]

    async def reopen(self) -> FolderView:
        return await self.open(store=self.new_store())

    async def test_uids_stable_across_restarts(self) -> None:
        uidvalidity, uids = await self.fill()
        self.assertEqual(uids, [1, 2, 3])
        view = await self.reopen()
        self.assertEqual((view.uidvalidity, [m.uid for m in view.messages]), (uidvalidity, uids))
        self.assertEqual(view.messages[0].flags, {"\\Seen", "work"})
        self.assertEqual(view.messages[2].meta["subject"], "three")

    async def test_rebuild_without_cache_keeps_uids(self) -> None:
        uidvalidity, uids = await self.fill()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.root / CACHE}{suffix}").unlink(missing_ok=True)
        view = await self.reopen()
        self.assertEqual((view.uidvalidity, [m.uid for m in view.messages]), (uidvalidity, uids))
        self.assertEqual([m.meta["subject"] for m in view.messages], ["one", "two", "three"])
        self.assertEqual(view.messages[0].flags, {"\\Seen"})  # keywords live in the cache only

    async def test_version_1_cache_converted_in_place(self) -> None:
        """A cache of schema 1 (name and keywords in the messages rows) is converted, not rebuilt:
        no message is analysed again and keywords, which only the cache holds, survive."""
        uidvalidity, uids = await self.fill()
        await self.store.close()
        db = sqlite3.connect(self.root / CACHE)
        db.executescript(
            """
            CREATE TABLE v1 (
                uid INTEGER PRIMARY KEY, name TEXT NOT NULL, size INTEGER NOT NULL, date REAL NOT NULL,
                keywords TEXT NOT NULL, headers BLOB NOT NULL, meta TEXT NOT NULL);
            INSERT INTO v1 SELECT m.uid, s.name, m.size, m.date, s.keywords, m.headers, m.meta
                FROM messages AS m JOIN state AS s ON s.uid = m.uid;
            DROP TABLE messages; DROP TABLE state; ALTER TABLE v1 RENAME TO messages;
            PRAGMA user_version=1;
            """
        )
        db.close()
        analysed: list[bytes] = []

        def counting(wire: bytes) -> Mapping[str, object]:
            analysed.append(wire)
            return analyze(wire)

        store = MailStore(self.mail_root, self.pool, reactor, counting)
        self.addCleanup(store.close)
        view = await self.open(store=store)
        self.assertEqual((view.uidvalidity, [m.uid for m in view.messages]), (uidvalidity, uids))
        self.assertEqual(analysed, [])
        self.assertEqual(view.messages[0].flags, {"\\Seen", "work"})
        self.assertEqual([m.meta["subject"] for m in view.messages], ["one", "two", "three"])
        self.assertIn(b"Subject: two", view.messages[1].headers)
        db = sqlite3.connect(self.root / CACHE)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA user_version").fetchone(), (3,))
        keywords = db.execute("SELECT uid, keywords FROM state ORDER BY uid").fetchall()
        self.assertEqual(keywords[0], (1, "work"))
        # and the converted cache takes flag changes like a new one
        await view.store([uids[1]], ["\\Flagged", "later"], "+")
        view.close()
        await store.close()
        view = await self.reopen()
        self.assertEqual(view.messages[1].flags, {"\\Flagged", "later"})
        self.assertEqual(analysed, [])

    async def test_version_2_json_meta_converted_in_place(self) -> None:
        """Schema 2 kept ``meta`` as JSON: it becomes the flat form (`meta_text`) without any
        message being analysed again; a meta the flat form cannot hold stays JSON and still reads."""
        uidvalidity, uids = await self.fill()
        await self.store.close()
        db = sqlite3.connect(self.root / CACHE)
        rows = db.execute("SELECT uid, meta FROM messages").fetchall()
        metas = [(json.dumps({"subject": LazyMeta(m)["subject"], "sent": 20231114}), uid) for uid, m in rows]
        db.executemany("UPDATE messages SET meta = ? WHERE uid = ?", metas)
        db.execute("UPDATE messages SET meta = ? WHERE uid = ?", ('{"subject":"three","n":[1,2]}', uids[2]))
        db.execute("PRAGMA user_version=2")
        db.commit()
        db.close()
        analysed: list[bytes] = []

        def counting(wire: bytes) -> Mapping[str, object]:
            analysed.append(wire)
            return analyze(wire)

        store = MailStore(self.mail_root, self.pool, reactor, counting)
        self.addCleanup(store.close)
        view = await self.open(store=store)
        self.assertEqual((view.uidvalidity, [m.uid for m in view.messages]), (uidvalidity, uids))
        self.assertEqual(analysed, [])
        self.assertEqual([m.meta["subject"] for m in view.messages], ["one", "two", "three"])
        self.assertEqual(view.messages[2].meta["n"], [1, 2])
        self.assertEqual(view.messages[0].meta, {"subject": "one", "sent": 20231114})
        db = sqlite3.connect(self.root / CACHE)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA user_version").fetchone(), (3,))
        kinds = [raw[:1] for (raw,) in db.execute("SELECT meta FROM messages ORDER BY uid")]
        self.assertEqual(kinds, ["\x00", "\x00", "{"])

    async def test_unknown_cache_version_rebuilt(self) -> None:
        uidvalidity, uids = await self.fill()
        await self.store.close()
        db = sqlite3.connect(self.root / CACHE)
        db.execute("PRAGMA user_version=99")
        db.close()
        view = await self.reopen()
        self.assertEqual((view.uidvalidity, [m.uid for m in view.messages]), (uidvalidity, uids))
        self.assertEqual([m.meta["subject"] for m in view.messages], ["one", "two", "three"])
        self.assertEqual(view.messages[0].flags, {"\\Seen"})  # keywords lost with the cache

    async def test_rebuild_from_corrupt_cache(self) -> None:
        uidvalidity, uids = await self.fill()
        for suffix in ("-wal", "-shm"):
            Path(f"{self.root / CACHE}{suffix}").unlink(missing_ok=True)
        (self.root / CACHE).write_bytes(b"this is not a database" * 100)
        view = await self.reopen()
        self.assertEqual((view.uidvalidity, [m.uid for m in view.messages]), (uidvalidity, uids))
        self.assertEqual(view.messages[1].meta["subject"], "two")

    async def test_lost_uidlist_means_new_uidvalidity(self) -> None:
        uidvalidity, _ = await self.fill()
        (self.root / UIDLIST).unlink()
        view = await self.reopen()
        self.assertNotEqual(view.uidvalidity, uidvalidity)
        self.assertEqual(len(view.messages), 3)
        self.assertEqual([m.uid for m in view.messages], [1, 2, 3])

    async def test_torn_uidlist_tail(self) -> None:
        """A crash mid-append leaves half a line: it is cut off and the UIDs after it stay unique."""
        uidvalidity, _ = await self.fill()
        with open(self.root / UIDLIST, "ab") as f:
            f.write(b"4 half-writ")
        account = await self.account(self.new_store())
        self.assertEqual(await account.append("INBOX", message("four")), (uidvalidity, 4))
        view = await self.reopen()
        self.assertEqual([m.uid for m in view.messages], [1, 2, 3, 4])

    async def test_cache_behind_the_log(self) -> None:
        """A cache that lost its last commits (crash) catches up from the log: same UIDs."""
        uidvalidity, _ = await self.fill()
        await self.store.close()
        saved = (self.root / CACHE).read_bytes()
        store = self.new_store()
        await (await self.account(store)).append("INBOX", message("four"))
        await store.close()
        for suffix in ("-wal", "-shm"):
            Path(f"{self.root / CACHE}{suffix}").unlink(missing_ok=True)
        (self.root / CACHE).write_bytes(saved)
        view = await self.reopen()
        self.assertEqual((view.uidvalidity, [m.uid for m in view.messages]), (uidvalidity, [1, 2, 3, 4]))
        self.assertEqual(view.messages[3].meta["subject"], "four")

    async def test_uidlist_compacted_without_lowering_uidnext(self) -> None:
        """Lines of long-gone messages are dropped from the log; UIDNEXT stays where it was."""
        count = 1200
        for i in range(count):
            (self.root / "cur").mkdir(parents=True, exist_ok=True)
            (self.root / "cur" / f"{1700000000 + i}.M0P1Q{i}R0.mx.test,S=3").write_bytes(b"x\n\n")
        view = await self.open()
        self.assertEqual(view.uidnext, count + 1)
        view.close()
        await self.store.close()
        for name in self.cur()[:-1]:
            os.unlink(self.root / "cur" / name)
        view = await self.reopen()
        self.assertEqual([m.uid for m in view.messages], [count])
        self.assertEqual(len((self.root / UIDLIST).read_bytes().splitlines()), 2)
        _, uid = await (await self.account(self.new_store())).append("INBOX", message("next"))
        self.assertEqual(uid, count + 1)

    async def test_odd_files_ignored_and_bad_messages_indexed(self) -> None:
        """Hidden files and names a uidlist line cannot hold are skipped; an analyzer failure
        leaves the message indexed with empty meta."""
        (self.root / "cur").mkdir(parents=True)
        (self.root / "new").mkdir()
        (self.root / "cur" / ".hidden").write_bytes(b"x")
        (self.root / "cur" / "with space:2,").write_bytes(b"x")
        (self.root / "new" / "1.M1P1Q1R1.host,S=5").write_bytes(b"\xff\xfe\n\n!")
        store = MailStore(self.mail_root, self.pool, reactor, lambda wire: {"bad": wire.decode("ascii")})
        self.addCleanup(store.close)
        view = await self.open(store=store)
        self.assertEqual([(m.uid, dict(m.meta)) for m in view.messages], [(1, {})])
        self.flushLoggedErrors(UnicodeDecodeError)

    async def test_uids_never_reused_after_expunge(self) -> None:
        account = await self.account()
        await account.append("INBOX", message("a"))
        await account.append("INBOX", message("b"), ["\\Deleted"])
        view = await self.open()
        self.assertEqual(await view.expunge(), [2])
        view.close()
        _, uid = await (await self.account(self.new_store())).append("INBOX", message("c"))
        self.assertEqual(uid, 3)

    async def test_external_changes_reconciled(self) -> None:
        """Files removed or re-flagged behind our back: the file names win over the cache."""
        await self.fill()
        names = {n.split(":")[0]: n for n in self.cur()}
        by_uid = dict(line.split(" ") for line in (self.root / UIDLIST).read_text().splitlines()[1:])
        os.unlink(self.root / "cur" / names[by_uid["2"]])
        os.rename(self.root / "cur" / names[by_uid["3"]], self.root / "cur" / (by_uid["3"] + ":2,FS"))
        view = await self.reopen()
        self.assertEqual([m.uid for m in view.messages], [1, 3])
        self.assertEqual(view.messages[1].flags, {"\\Flagged", "\\Seen"})


class UnchangedCurTests(StoreCase):
    """A cold load skips listing cur/ while cur/'s mtime and inode are what they were when a listing
    last matched the cache (`kms.store.index.directory_stamp`); any file added, removed or renamed
    there since, by anyone, changes the mtime and brings the listing back."""

    async def settled(self) -> tuple[int, int]:
        """A folder of three messages whose cur/ last changed a minute ago, loaded once by a fresh
        process (which lists cur/ and records the stamp); the recorded stamp."""
        account = await self.account()
        for subject, flags in (("one", ["\\Seen"]), ("two", []), ("three", ["work"])):
            await account.append("INBOX", message(subject), flags)
        self.age_cur()
        view = await self.open(store=self.new_store())
        self.assertEqual(len(view.messages), 3)
        view.close()
        stamp = self.recorded()
        cur = os.stat(self.root / "cur")
        self.assertEqual(stamp, (cur.st_mtime_ns, cur.st_ino))
        return stamp

    def age_cur(self, ns: int | None = None) -> None:
        past = ns if ns is not None else time.time_ns() - 60 * 10**9
        os.utime(self.root / "cur", ns=(past, past))

    def recorded(self) -> tuple[int, int]:
        cache = IndexCache(self.root / CACHE)
        try:
            return cache.state().cur
        finally:
            cache.close()

    def put(self, subject: str, letters: str = "S") -> str:
        """A message file written straight into cur/, as another program would."""
        data = message(subject)
        base = maildir_name(1700000000, 0, 2, next(_counter), "beef0000", "other.test")
        name = f"{base},S={len(data)}:2,{letters}"
        (self.root / "cur" / name).write_bytes(data)
        return name

    async def subjects(self) -> list[tuple[int, str, frozenset[str]]]:
        view = await self.open(store=self.new_store())
        view.close()
        return [(m.uid, str(m.meta["subject"]), m.flags) for m in view.messages]

    async def test_file_added_behind_the_servers_back(self) -> None:
        await self.settled()
        self.put("four")
        self.assertEqual(
            await self.subjects(),
            [
                (1, "one", {"\\Seen"}),
                (2, "two", frozenset()),
                (3, "three", {"work"}),
                (4, "four", {"\\Seen"}),
            ],
        )

    async def test_file_removed_or_renamed_behind_the_servers_back(self) -> None:
        await self.settled()
        first, second, _ = sorted(os.listdir(self.root / "cur"))
        os.unlink(self.root / "cur" / first)
        os.rename(self.root / "cur" / second, self.root / "cur" / (second.split(":")[0] + ":2,F"))
        self.assertEqual(await self.subjects(), [(2, "two", {"\\Flagged"}), (3, "three", {"work"})])

    async def test_unchanged_cur_is_not_listed(self) -> None:
        """Proof that the listing is skipped: a file slipped in with cur/'s mtime put back as it
        was is not seen; once the mtime moves (as any real change moves it), it is."""
        stamp = await self.settled()
        self.put("hidden")
        self.age_cur(stamp[0])
        self.assertEqual([s for _, s, _ in await self.subjects()], ["one", "two", "three"])
        self.age_cur()
        self.assertEqual([s for _, s, _ in await self.subjects()], ["one", "two", "three", "hidden"])

    async def test_status_sees_files_added_behind_the_servers_back(self) -> None:
        await self.settled()
        self.put("four", "")
        status = await (await self.account(self.new_store())).status("INBOX")
        self.assertEqual((status.messages, status.unseen), (4, 3))

    async def test_no_promise_for_a_recently_changed_cur(self) -> None:
        """A cur/ changed within the last two seconds could change again within the same mtime
        tick: no stamp is recorded, so the next load lists it."""
        await self.settled()
        self.put("four")  # cur/'s mtime is now
        await self.subjects()
        self.assertEqual(self.recorded(), (0, 0))

    async def test_changes_by_this_process_move_the_stamp(self) -> None:
        """STORE renames, APPEND and EXPUNGE change cur/, so the recorded stamp no longer matches
        and the next load lists cur/ (and records afresh once it has settled)."""
        stamp = await self.settled()
        view = await self.open()
        await view.store([2], ["\\Seen"], "+")
        await view.store([1], ["\\Deleted"], "+")
        await view.expunge()
        view.close()
        self.assertNotEqual(os.stat(self.root / "cur").st_mtime_ns, stamp[0])
        self.assertEqual(await self.subjects(), [(2, "two", {"\\Seen"}), (3, "three", {"work"})])


class LazyDetailsTests(StoreCase):
    """A cold load reads no header section or meta (`kms.store.index.FolderDetails`): the first
    command that needs them reads them, once, for every message the load made."""

    fill = UidTests.fill

    async def cold(self) -> tuple[FolderView, MailStore]:
        """INBOX (one, two, three) opened by another process, its details not read yet."""
        await self.fill()
        store = self.new_store()
        return await self.open(store=store, details=False), store

    async def test_unreadable_until_read(self) -> None:
        view, _ = await self.cold()
        with self.assertRaises(DetailsNotLoaded):
            _ = view.messages[0].meta
        with self.assertRaises(DetailsNotLoaded):
            _ = view.messages[1].headers
        self.assertEqual([m.flags for m in view.messages], [{"\\Seen", "work"}, set(), set()])
        await view.details(view.messages[1:])  # only these: a FETCH of the newest messages reads just theirs
        self.assertEqual(view.messages[1].meta["subject"], "two")
        with self.assertRaises(DetailsNotLoaded):
            _ = view.messages[0].meta
        await view.details(view.messages)
        self.assertEqual([m.meta["subject"] for m in view.messages], ["one", "two", "three"])
        self.assertIn(b"Subject: two", view.messages[1].headers)
        self.assertEqual(view.messages[2].headers, header_section(wire_form(message("three"))))

    async def test_read_once_and_kept_through_flag_changes(self) -> None:
        view, store = await self.cold()
        other = await self.open(store=store, details=False)
        await view.store([1, 2], ["\\Flagged"], "+")  # new infos, the same (unread) details
        await view.details(view.messages)
        busy: Deferred[None] = Deferred()
        store._folders[self.root].lock.run(lambda: busy)  # a STORE, say, in flight
        again = other.details(other.messages)
        self.assertTrue(again.called)  # nothing left to read: no thread hop, no wait for the lock
        busy.callback(None)
        await again
        other.sync()
        self.assertEqual([(m.meta["subject"], "\\Flagged" in m.flags) for m in other.messages],
                         [("one", True), ("two", True), ("three", False)])  # fmt: skip

    async def test_messages_analysed_here_need_no_read(self) -> None:
        """An APPEND (or delivery, or COPY) after the cold load carries its own details."""
        view, store = await self.cold()
        await (await self.account(store)).append("INBOX", message("four"))
        view.sync()
        fresh = view.details(view.messages[3:])
        self.assertTrue(fresh.called)  # nothing to read: no lock, no thread hop
        self.assertEqual(view.messages[3].meta["subject"], "four")

    async def test_a_batch_reads_its_range_or_just_its_messages(self) -> None:
        """A FETCH batch of a sequence range (dense UIDs) is read as one UID range, the rows between
        included; a scattered set reads only its own."""
        account = await self.account()
        for name in ("one", "two", "three", "four", "five", "six", "seven", "eight"):
            await account.append("INBOX", message(name))
        view = await self.open(store=self.new_store(), details=False)
        await view.details([view.messages[0], view.messages[7]])  # UIDs 1 and 8: scattered
        self.assertEqual([view.messages[n].meta["subject"] for n in (0, 7)], ["one", "eight"])
        with self.assertRaises(DetailsNotLoaded):
            _ = view.messages[1].meta
        await view.details([view.messages[1], view.messages[3]])  # UIDs 2 and 4: dense
        self.assertEqual([view.messages[n].meta["subject"] for n in (1, 2, 3)], ["two", "three", "four"])
        with self.assertRaises(DetailsNotLoaded):
            _ = view.messages[4].meta

    async def test_many_at_once_read_the_whole_folder(self) -> None:
        self.patch(mailbox_module, "_DETAILS_BY_UID", 1)
        view, _ = await self.cold()
        await view.details(view.messages[1:])  # more than _DETAILS_BY_UID: every message's, in one query
        self.assertEqual(view.messages[0].meta["subject"], "one")
        self.assertTrue(view.details(view.messages).called)  # complete: no lock, no thread hop

    async def test_expunged_before_read(self) -> None:
        """A message another session expunged before the details were read (row and file gone)
        has an empty header section and no meta; the others are read as ever."""
        view, store = await self.cold()
        other = await self.open(store=store, details=False)
        await other.store([2], ["\\Deleted"], "+")
        self.assertEqual(list(await other.expunge()), [2])
        await view.details(view.messages)
        self.assertEqual([m.uid for m in view.messages], [1, 2, 3])  # not synced yet
        self.assertEqual((view.messages[1].headers, dict(view.messages[1].meta)), (b"", {}))
        self.assertEqual(view.messages[2].meta["subject"], "three")

    async def test_row_missing_from_the_cache_is_read_from_the_file(self) -> None:
        view, _ = await self.cold()
        db = sqlite3.connect(self.root / CACHE)
        with db:
            db.execute("DELETE FROM messages WHERE uid = 1")
        db.close()
        await view.details(view.messages)
        self.assertEqual([m.meta["subject"] for m in view.messages], ["one", "two", "three"])

    async def test_copy_and_rename_inbox_carry_unread_details(self) -> None:
        view, store = await self.cold()
        account = await self.account(store)
        await account.create("Archive")
        await view.copy([1, 3], "Archive")
        archive = await self.open("Archive", store=self.new_store())
        self.assertEqual([m.meta["subject"] for m in archive.messages], ["one", "three"])
        view.close()
        fresh = await self.account(self.new_store())
        await fresh.rename("INBOX", "Old")
        old = await self.open("Old", store=self.new_store())
        self.assertEqual([m.meta["subject"] for m in old.messages], ["one", "two", "three"])


class SnapshotTests(StoreCase):
    """A folder leaving memory leaves a snapshot of itself (`kms.store.index.encode_snapshot`),
    and the next cold load takes it instead of the cache's rows, but only while it describes
    exactly the cache's content: anything else falls back to the rows, never to wrong data."""

    settled = UnchangedCurTests.settled
    age_cur = UnchangedCurTests.age_cur
    recorded = UnchangedCurTests.recorded
    put = UnchangedCurTests.put
    subjects = UnchangedCurTests.subjects

    async def snapshotted(self) -> None:
        """The settled folder opened and closed by a server that then stops: a snapshot now."""
        await self.settled()
        store = self.new_store()
        (await self.open(store=store)).close()
        await store.close()
        self.assertTrue((self.root / SNAPSHOT).exists())

    def load(self) -> tuple[list[tuple[object, ...]], bool]:
        """A fresh process's load, as comparable tuples, and whether it came from the snapshot."""
        files = FolderFiles(self.root, analyze, UidValidities())
        try:
            loaded = files.load()
            used = bool(files._snapshot_key)
            loaded.details.add(files.read_details(None, loaded.names), whole=True)
        finally:
            files.close()
        rows = [
            (i.uid, i.size, i.internal_date, i.flags, i.headers, dict(i.meta), loaded.names[i.uid])
            for i in loaded.infos
        ]
        return rows, used

    async def test_next_load_takes_the_snapshot_with_the_same_content(self) -> None:
        await self.snapshotted()
        from_snapshot, used = self.load()
        self.assertTrue(used)
        (self.root / SNAPSHOT).unlink()
        from_rows, used = self.load()
        self.assertFalse(used)
        self.assertEqual(from_snapshot, from_rows)
        self.assertEqual([r[3] for r in from_rows], [{"\\Seen"}, frozenset(), {"work"}])

    async def test_change_by_another_process_after_the_snapshot(self) -> None:
        """A keyword changes only the cache (no file is renamed, cur/'s mtime stays): the cache's
        generation moved, so the older snapshot is not taken."""
        await self.snapshotted()
        files = FolderFiles(self.root, analyze, UidValidities())
        loaded = files.load()
        info = next(i for i in loaded.infos if i.uid == 2)
        files.set_flags([info], [loaded.names[2]], {info.flags: frozenset({"urgent"})})
        files.close()  # no snapshot of its own: the one on disk is from before the change
        self.assertEqual(
            await self.subjects(),
            [(1, "one", {"\\Seen"}), (2, "two", {"urgent"}), (3, "three", {"work"})],
        )

    async def test_a_folder_that_missed_a_change_leaves_no_snapshot(self) -> None:
        """A loads; B loads, sets a keyword (the cache only) and closes; A leaving memory must not
        write its older view as a snapshot of the newer cache (the keyword would be lost)."""
        await self.settled()
        a = FolderFiles(self.root, analyze, UidValidities())
        loaded_a = a.load()
        b = FolderFiles(self.root, analyze, UidValidities())
        loaded_b = b.load()
        info = next(i for i in loaded_b.infos if i.uid == 2)
        b.set_flags([info], [loaded_b.names[2]], {info.flags: frozenset({"urgent"})})
        b.close()
        a.retire(loaded_a.infos, loaded_a.names)
        self.assertFalse((self.root / SNAPSHOT).exists())
        self.assertEqual(
            await self.subjects(),
            [(1, "one", {"\\Seen"}), (2, "two", {"urgent"}), (3, "three", {"work"})],
        )

    async def test_damaged_snapshots_fall_back_to_the_rows(self) -> None:
        await self.snapshotted()
        good = (self.root / SNAPSHOT).read_bytes()
        expected = [(1, "one", {"\\Seen"}), (2, "two", frozenset()), (3, "three", {"work"})]
        other_format = good[:8] + b"\x63\x00" + good[10:]
        flipped = good[:-40] + bytes([good[-40] ^ 1]) + good[-39:]
        for damaged in (good[: len(good) // 2], good[:20], b"", os.urandom(len(good)), other_format, flipped):
            (self.root / SNAPSHOT).write_bytes(damaged)
            self.assertEqual(self.load()[1], False)
            self.assertEqual(await self.subjects(), expected)
        (self.root / SNAPSHOT).write_bytes(good)
        self.assertEqual(self.load()[1], True)

    async def test_leaving_records_the_stamp_of_a_cur_it_changed(self) -> None:
        """A folder leaving memory after changing cur/ lists it, and when the listing is exactly
        its files records the new stamp: the next cold load (once that stamp has settled) takes
        the snapshot instead of listing cur/."""
        old = await self.settled()
        store = self.new_store()
        view = await self.open(store=store)
        await view.store([2], ["\\Flagged"], "+")
        view.close()
        await store.close()
        cur = os.stat(self.root / "cur")
        self.assertNotEqual(old, (cur.st_mtime_ns, cur.st_ino))
        self.assertEqual(self.recorded(), (cur.st_mtime_ns, cur.st_ino))
        self.patch(index_module, "_SETTLED_NS", 0)  # as if two seconds had passed
        rows, used = self.load()
        self.assertTrue(used)
        self.assertEqual([(r[0], r[3]) for r in rows], [(1, {"\\Seen"}), (2, {"\\Flagged"}), (3, {"work"})])

    async def test_nothing_recorded_when_cur_holds_other_files(self) -> None:
        """A file put into cur/ behind the server's back while the folder was open: the listing at
        leaving differs from the folder, so the old stamp stays and the next load lists cur/."""
        old = await self.settled()
        store = self.new_store()
        view = await self.open(store=store)
        self.put("stranger")
        view.close()
        await store.close()
        self.assertEqual(self.recorded(), old)
        self.assertEqual([s for _, s, _ in await self.subjects()], ["one", "two", "three", "stranger"])

    async def test_a_load_while_the_stamp_is_fresh_clears_it(self) -> None:
        """A stamp recorded on leaving may be seconds old; a load within two seconds lists cur/
        and clears it, so a change in the same timestamp tick cannot hide behind it."""
        await self.settled()
        store = self.new_store()
        view = await self.open(store=store)
        await view.store([1], ["\\Flagged"], "+")
        view.close()
        await store.close()
        cur = os.stat(self.root / "cur")
        self.assertEqual(self.recorded(), (cur.st_mtime_ns, cur.st_ino))  # seconds old at most
        (await self.open(store=self.new_store())).close()
        self.assertEqual(self.recorded(), (0, 0))


class ViewTests(StoreCase):
    async def test_delivery_reaches_open_view(self) -> None:
        """delivered() → listener called → sync shows the message, moved to cur/ with ':2,'."""
        view = await self.open()
        called: list[None] = []
        view.set_listener(lambda: called.append(None))
        name = deliver(self.root, message("fresh"))
        self.store.delivered(ADDRESS.upper())
        self.store.delivered(ADDRESS)  # a second notice for the same files is harmless
        while not called:
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(view.messages, [])  # only sync changes the snapshot
        event = view.sync()
        self.assertEqual([m.meta["subject"] for m in event.added], ["fresh"])
        self.assertEqual(view.messages, list(event.added))
        self.assertEqual(view.uidnext, 2)
        self.assertEqual(view.recent, {1})
        self.assertEqual(os.listdir(self.root / "new"), [])
        self.assertEqual(self.cur(), [name + ":2,"])

    async def test_delivered_for_closed_or_unknown_mailboxes_is_harmless(self) -> None:
        self.store.delivered("nobody@example.test")
        view = await self.open()
        view.close()
        self.store.delivered(ADDRESS)
        deliver(self.root, message("later"))
        view = await self.open()
        self.assertEqual(len(view.messages), 1)

    async def test_refresh_sees_new_files(self) -> None:
        view = await self.open()
        deliver(self.root, message("x"))
        await view.refresh()
        self.assertEqual(len(view.sync().added), 1)

    async def test_expunge_reaches_other_views(self) -> None:
        account = await self.account()
        for i in range(4):
            await account.append("INBOX", message(str(i)), ["\\Deleted"] if i in (1, 2) else [])
        first, second = await self.open(), await self.open()
        heard: list[None] = []
        second.set_listener(lambda: heard.append(None))
        self.assertEqual(await first.expunge([2, 4]), [2])
        self.assertEqual(heard, [None])
        self.assertEqual([m.uid for m in second.messages], [1, 2, 3, 4])
        self.assertEqual(list(second.sync().expunged), [2])
        self.assertEqual([m.uid for m in second.messages], [1, 3, 4])
        self.assertEqual([m.uid for m in first.messages], [1, 2, 3, 4])  # its own sync shows it
        self.assertEqual(list(first.sync().expunged), [2])
        self.assertEqual(await first.expunge(), [3])
        self.assertEqual(len(self.cur()), 2)

    async def test_flags_are_file_names(self) -> None:
        account = await self.account()
        await account.append("INBOX", message("a"))
        await account.append("INBOX", message("b"))
        view, other = await self.open(), await self.open()
        infos = await view.store([1, 2, 99], ["\\Seen", "\\flagged", "$Work", "\\Recent"], "+")
        self.assertEqual([i.flags for i in infos], [{"\\Seen", "\\Flagged", "$Work"}] * 2)
        self.assertTrue(all(n.endswith(":2,FS") for n in self.cur()), self.cur())
        self.assertEqual(view.messages[0].flags, {"\\Seen", "\\Flagged", "$Work"})  # at once, for the caller
        self.assertEqual(list(view.sync().flags), [])
        self.assertEqual(other.messages[0].flags, frozenset())
        self.assertEqual([i.flags for i in other.sync().flags], [{"\\Seen", "\\Flagged", "$Work"}] * 2)
        await view.store([1], ["\\Flagged"], "-")
        await view.store([2], ["\\Answered"], "")
        names = self.cur()
        self.assertTrue(names[0].endswith(":2,S") and names[1].endswith(":2,R"), names)
        await other.store([1], ["\\Draft"], "+")
        await view.store([1], ["\\Answered"], "+")  # newer than the change other just queued here
        self.assertEqual(list(view.sync().flags), [])  # the STORE answer already showed it all
        self.assertEqual(view.messages[0].flags, {"\\Seen", "\\Draft", "\\Answered", "$Work"})
        await view.store([1], ["\\Draft", "\\Answered"], "-")
        reopened = await self.open(store=self.new_store())
        self.assertEqual([m.flags for m in reopened.messages], [{"\\Seen", "$Work"}, {"\\Answered"}])

    async def test_store_with_mixed_flags_and_a_vanished_file(self) -> None:
        """Each distinct flag set gets its own outcome; a file gone from cur/ behind the server's
        back is left as it was (the others change, and the unseen count follows exactly)."""
        account = await self.account()
        await account.append("INBOX", message("a"))
        await account.append("INBOX", message("b"), ["\\Flagged"])
        await account.append("INBOX", message("c"), ["\\Seen", "work"])
        await account.append("INBOX", message("d"))
        view = await self.open()
        second = next(n for n in self.cur() if b"Subject: b" in (self.root / "cur" / n).read_bytes())
        os.unlink(self.root / "cur" / second)
        infos = await view.store([1, 2, 3, 4], ["\\Seen"], "+")
        self.assertEqual([i.uid for i in infos], [1, 2, 3, 4])
        expected = [{"\\Seen"}, {"\\Flagged"}, {"\\Seen", "work"}, {"\\Seen"}]
        self.assertEqual([i.flags for i in infos], expected)
        self.assertEqual([m.flags for m in view.messages], expected)
        self.assertEqual((await account.status("INBOX")).unseen, 1)
        self.assertEqual(sum(n.endswith(":2,S") for n in self.cur()), 3)
        reopened = await self.open(store=self.new_store())
        self.assertEqual([m.flags for m in reopened.messages], [{"\\Seen"}, {"\\Seen", "work"}, {"\\Seen"}])

    async def test_store_reports_changes_as_it_renames(self) -> None:
        """``progress`` gets the changed messages batch by batch, on the reactor thread, before
        the result; an unchanged message and a file that vanished are not in any batch."""
        self.patch(index_module, "SET_FLAGS_BATCH", 2)
        account = await self.account()
        for name in ("a", "b", "c", "d", "e"):
            await account.append("INBOX", message(name), ["\\Seen"] if name == "c" else [])
        view = await self.open()
        fourth = next(n for n in self.cur() if b"Subject: d" in (self.root / "cur" / n).read_bytes())
        os.unlink(self.root / "cur" / fourth)
        batches: list[tuple[list[int], bool]] = []

        def progress(infos: Sequence[MessageInfo]) -> None:
            batches.append(([i.uid for i in infos], threading.current_thread() is threading.main_thread()))

        infos = await view.store([1, 2, 3, 4, 5], ["\\Seen"], "+", progress)
        self.assertEqual(batches, [([1, 2], True), ([5], True)])
        seen, unseen = {"\\Seen"}, set()
        self.assertEqual([i.flags for i in infos], [seen, seen, seen, unseen, seen])  # 4: as it was
        self.assertEqual([m.flags for m in view.messages], [seen, seen, seen, unseen, seen])

    async def test_readonly_view_refuses_changes(self) -> None:
        await (await self.account()).append("INBOX", message("a"), ["\\Deleted"])
        view = await self.open(readonly=True)
        self.assertTrue(view.readonly)
        await self.refused(view.store([1], ["\\Seen"], "+"), "CANNOT")
        await self.refused(view.expunge(), "CANNOT")
        self.assertEqual(len(self.cur()), 1)

    async def test_recent_taken_by_first_read_write_view(self) -> None:
        account = await self.account()
        await account.append("INBOX", message("a"))
        examine = await self.open(readonly=True)
        first = await self.open()
        second = await self.open()
        self.assertEqual((examine.recent, first.recent, second.recent), ({1}, {1}, set()))
        await account.append("INBOX", message("b"))
        self.assertEqual(second.sync() and second.recent, {2})
        self.assertEqual(first.sync() and first.recent, {1})
        self.assertEqual((await account.status("INBOX")).recent, 0)

    async def test_added_then_expunged_before_sync_is_invisible(self) -> None:
        account = await self.account()
        view, other = await self.open(), await self.open()
        await account.append("INBOX", message("a"), ["\\Deleted"])
        await view.expunge()
        event = other.sync()
        self.assertEqual((list(event.added), list(event.expunged)), ([], []))
        self.assertEqual(other.uidnext, 2)

    async def test_copy(self) -> None:
        """COPY hard-links into the target, keeps flags and date, and answers COPYUID data."""
        account = await self.account()
        await account.append("INBOX", message("a"), ["\\Seen", "work"], internal_date=1600000000)
        await account.append("INBOX", message("b"))
        trash = await self.open("Trash")
        view = await self.open()
        uidvalidity, mapping = await view.copy([2, 1, 7], "Trash")
        self.assertEqual(uidvalidity, trash.uidvalidity)
        self.assertEqual(list(mapping), [(1, 1), (2, 2)])
        copied = trash.sync().added
        self.assertEqual([m.flags for m in copied], [{"\\Seen", "work"}, frozenset()])
        self.assertEqual(copied[0].internal_date, 1600000000)
        self.assertEqual(copied[0].meta["subject"], "a")
        source, target = self.cur(), self.cur(self.root / ".Trash")
        self.assertEqual(
            (self.root / "cur" / source[0]).stat().st_ino,
            (self.root / ".Trash" / "cur" / target[0]).stat().st_ino,
        )
        await self.refused(view.copy([1], "Nope"), "TRYCREATE")
        await self.refused(view.copy([1], "../etc"), "CANNOT")
        _, again = await view.copy([1], "INBOX")
        self.assertEqual(list(again), [(1, 3)])

    async def test_open_message_wire_form(self) -> None:
        raw = message("wire") + b"line two\r\nline three\n"
        _, uid = await (await self.account()).append("INBOX", raw)
        deliver(self.root, message("lf", "x\n"))
        view = await self.open()
        first, second = view.messages
        self.assertEqual(await view.open_message(first.uid), wire_form(raw))
        self.assertEqual(first.size, len(wire_form(raw)))
        self.assertEqual(
            first.headers, b"From: bob@example.test\r\nTo: alice@example.test\r\nSubject: wire\r\n\r\n"
        )
        self.assertFalse(first.meta["bare_lf"])  # the analyzer is given the wire form
        body = await view.open_message(second.uid)
        self.assertEqual(body, message("lf", "x\n", b"\r\n"))
        self.assertEqual(second.size, len(body))
        await self.refused(view.open_message(99), "EXPUNGEISSUED")

    async def test_open_messages(self) -> None:
        """One read for several; each in wire form; expunged ones left out, the rest still read."""
        account = await self.account()
        raws = [message("crlf", lf=b"\r\n"), message("lf"), message("mixed") + b"x\r\ny\n"]
        for raw in raws:
            await account.append("INBOX", raw)
        view = await self.open()
        other = await self.open()
        await other.store([2], ["\\Deleted"], "+")
        await other.expunge()
        stranger = message_info(99, 10, 0.0, frozenset(), b"", {})
        wanted = [*view.messages, stranger]  # 2 expunged by the other session, 99 never here
        self.assertEqual(await view.open_messages(wanted), {1: raws[0], 3: wire_form(raws[2])})
        self.assertEqual(await view.open_messages([]), {})
        view.close()
        await self.refused(view.open_messages(wanted[:1]), "CANNOT")

    async def test_store_of_a_message_this_view_has_not_synced_yet(self) -> None:
        """The store changes it (it is in the folder) and the view hears of it at its next sync."""
        account = await self.account()
        view = await self.open()
        await account.append("INBOX", message("late"))
        stored = await view.store([1], ["\\Flagged"], "+")
        self.assertEqual([(i.uid, i.flags) for i in stored], [(1, {"\\Flagged"})])
        self.assertEqual(view.messages, [])
        view.sync()
        self.assertEqual([(i.uid, i.flags) for i in view.messages], [(1, {"\\Flagged"})])

    async def test_open_messages_cached_or_not(self) -> None:
        """Files in the page cache are read at once on the reactor, evicted ones in the pool:
        the same bytes either way (kms.store.cachedread)."""
        account = await self.account()
        raws = [message(f"m{n}", "x\n" * 2000) for n in range(4)]
        for raw in raws:
            await account.append("INBOX", raw)
        view = await self.open()
        pooled: list[int] = []
        read_many = FolderFiles.read_many

        def counted(
            files: FolderFiles, names: Mapping[int, tuple[str, int]]
        ) -> tuple[dict[int, bytes], list[int]]:
            pooled.extend(names)
            return read_many(files, names)

        self.patch(FolderFiles, "read_many", counted)
        for name in self.cur()[1::2]:  # messages 2 and 4 leave the page cache
            fd = os.open(self.root / "cur" / name, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        bodies = await view.open_messages(list(view.messages))
        self.assertEqual(bodies, {n + 1: wire_form(raw) for n, raw in enumerate(raws)})
        if cached_reader.enabled:
            self.assertNotIn(1, pooled)  # read inline
        self.assertEqual(await view.open_message(3), wire_form(raws[2]))

    async def test_open_messages_during_flag_changes(self) -> None:
        """Files renamed while a lock-free read runs are read again under the lock."""
        account = await self.account()
        for n in range(10):
            await account.append("INBOX", message(f"m{n}"))
        view = await self.open()
        uids = [info.uid for info in view.messages]
        stores = [view.store(uids, ["\\Seen"], "+" if i % 2 else "-") for i in range(10)]
        reads = [view.open_messages(list(view.messages)) for _ in range(10)]
        for stored in stores:
            await stored
        for read in reads:
            bodies = await read
            self.assertEqual(sorted(bodies), uids)
            self.assertEqual(bodies[uids[3]], wire_form(message("m3")))

    async def test_open_messages_reads_vanished_files_again_under_the_lock(self) -> None:
        account = await self.account()
        for n in range(3):
            await account.append("INBOX", message(f"m{n}"))
        view = await self.open()
        calls: list[list[int]] = []
        read_many = FolderFiles.read_many

        def renamed_meanwhile(
            files: FolderFiles, names: Mapping[int, tuple[str, int]]
        ) -> tuple[dict[int, bytes], list[int]]:
            calls.append(sorted(names))
            found, vanished = read_many(files, names)
            if len(calls) == 1:  # as if a STORE had renamed message 2 just before the read
                del found[2]
                vanished.append(2)
            return found, vanished

        self.patch(FolderFiles, "read_many", renamed_meanwhile)
        self.patch(cached_reader, "enabled", False)  # every file through the pool
        bodies = await view.open_messages(list(view.messages))
        self.assertEqual(calls, [[1, 2, 3], [2]])
        self.assertEqual(bodies, {n + 1: wire_form(message(f"m{n}")) for n in range(3)})

    async def test_indexed_header_is_imaps_body_header(self) -> None:
        """The header the index caches (HEADER fetches, SEARCH) is, to the byte, the BODY[HEADER]
        IMAP cuts from the file: one rule for where a header ends."""
        account = await self.account()
        for raw in (b"No: blank line\n", b"\nbody first\n", b"A: 1\n\n\nbody", b"A: 1\r\nB:\n\r\nx", b""):
            await account.append("INBOX", raw)
        view = await self.open()
        self.assertEqual(len(view.messages), 5)
        for info in view.messages:
            whole = await view.open_message(info.uid)
            self.assertEqual(info.headers, fetch_section(whole, Section((), "HEADER")), whole)

    async def test_open_message_during_flag_changes(self) -> None:
        await (await self.account()).append("INBOX", message("a"))
        view = await self.open()
        stores = [view.store([1], ["\\Seen"], "+" if i % 2 else "-") for i in range(20)]
        reads = [view.open_message(1) for _ in range(20)]
        for stored in stores:
            await stored
        for read in reads:
            self.assertEqual(await read, wire_form(message("a")))

    async def test_deleted_folder_under_an_open_view(self) -> None:
        account = await self.account()
        await account.append("Trash", message("a"))
        view = await self.open("Trash")
        await account.delete("Trash")
        self.assertEqual(list(view.sync().expunged), [1])
        await self.refused(view.store([1], ["\\Seen"], "+"), "NONEXISTENT")

    def test_merge_events_relative_to_snapshot(self) -> None:
        def info(uid: int, *flags: str) -> MessageInfo:
            return message_info(uid, 1, 0.0, frozenset(flags), b"", {})

        asked: list[set[int]] = []

        def present(uids: set[int]) -> set[int]:
            asked.append(set(uids))
            return uids & {1, 2, 3}

        event = merge_events(
            [
                FolderEvent(added=[info(4)], flags=[info(2, "\\Seen")]),
                FolderEvent(expunged=[3, 4], flags=[info(5, "x")]),
                FolderEvent(added=[info(5)], flags=[info(5, "\\Seen"), info(1, "y")]),
                FolderEvent(expunged=[1]),
            ],
            present,
        )
        self.assertEqual(list(event.expunged), [1, 3])
        self.assertEqual([(i.uid, i.flags) for i in event.added], [(5, {"\\Seen"})])
        self.assertEqual([(i.uid, i.flags) for i in event.flags], [(2, {"\\Seen"})])
        self.assertEqual(asked, [{1, 2, 3, 4, 5}])  # one question for the whole merge

    @given(st.sets(st.integers(1, 300), max_size=150), st.lists(st.integers(0, 320), max_size=40))
    def test_positions_of(self, present: set[int], uids: list[int]) -> None:
        """The same ascending positions whether it searches for each UID or walks the list."""
        messages = [message_info(uid, 1, 0.0, frozenset(), b"", {}) for uid in sorted(present)]
        expected = [i for i, info in enumerate(messages) if info.uid in set(uids)]
        self.assertEqual(positions_of(messages, uids), expected)
        self.assertEqual(locate(messages, uids), {messages[i].uid: i for i in expected})


class RenameTests(StoreCase):
    async def test_rename_inbox_moves_messages(self) -> None:
        account = await self.account()
        await account.append("INBOX", message("a"), ["\\Seen"])
        await account.append("INBOX", message("b"))
        await account.create("INBOX/child")
        view = await self.open()
        await account.rename("inbox", "Old")
        self.assertEqual(list(view.sync().expunged), [1, 2])
        self.assertEqual(self.cur(), [])
        old = await self.open("Old")
        self.assertEqual(
            [(m.uid, m.meta["subject"], m.flags) for m in old.messages],
            [(1, "a", {"\\Seen"}), (2, "b", frozenset())],
        )
        names = {f.name for f in await account.list()}
        self.assertTrue({"INBOX", "Old", "INBOX/child"} <= names)
        _, uid = await account.append("INBOX", message("c"))
        self.assertEqual(uid, 3)  # INBOX keeps its UID sequence
        await self.refused(account.rename("INBOX", "Old"), "ALREADYEXISTS")

    async def test_rename_with_children_and_open_view(self) -> None:
        account = await self.account()
        await account.create("A/B")
        await account.create("A")
        await account.append("A/B", message("deep"))
        await account.subscribe("A/B", True)
        view = await self.open("A/B")
        await account.rename("A", "Z/A")
        names = {f.name: f for f in await account.list()}
        self.assertNotIn("A", names)
        self.assertTrue(names["Z/A/B"].subscribed)
        self.assertEqual(view.name, "Z/A/B")
        await view.store([1], ["\\Seen"], "+")  # the open view follows its folder
        self.assertTrue(self.cur(self.root / ".Z.A.B")[0].endswith(":2,S"))
        moved = await self.open("Z/A/B")
        self.assertEqual(moved.messages[0].meta["subject"], "deep")
        await self.refused(account.rename("Nope", "X"), "NONEXISTENT")
        await self.refused(account.rename("Z", "Z/A/C"), "CANNOT")
        await self.refused(account.rename("Sent", "Trash"), "ALREADYEXISTS")
        await self.refused(account.rename("Sent", "INBOX"), "ALREADYEXISTS")


class MaildropTests(StoreCase):
    async def test_exclusive_until_closed(self) -> None:
        account = await self.account()
        drop = await account.open_maildrop()
        await self.assertFailure(account.open_maildrop(), MaildropLocked)
        other = await self.account(self.new_store())  # another store is another process: not ours
        (await other.open_maildrop()).close()
        imap = await account.open("INBOX")  # IMAP may still open the INBOX
        imap.close()
        drop.close()
        (await account.open_maildrop()).close()


class AppendTests(StoreCase):
    async def test_durable_when_fired(self) -> None:
        """When APPEND answers, the file is in cur/ with its flags, and its UID is in the uidlist."""
        account = await self.account()
        uidvalidity, uid = await account.append(
            "Drafts", message("draft", lf=b"\r\n"), ["\\Draft"], 1500000000
        )
        drafts = self.root / ".Drafts"
        (name,) = self.cur(drafts)
        self.assertTrue(name.endswith(":2,D"))
        self.assertEqual((drafts / "cur" / name).read_bytes(), message("draft", lf=b"\r\n"))
        self.assertEqual((drafts / "cur" / name).stat().st_mtime, 1500000000)
        self.assertEqual(os.listdir(drafts / "tmp"), [])
        self.assertIn(f"{uid} {name.split(':')[0]}\n".encode(), (drafts / UIDLIST).read_bytes())
        self.assertTrue((drafts / UIDLIST).read_bytes().startswith(f"V{uidvalidity} ".encode()))
        await self.refused(account.append("Nope", b"x"), "TRYCREATE")

    async def test_concurrent_appends_get_distinct_uids(self) -> None:
        account = await self.account()
        view = await self.open()
        results = [await d for d in [account.append("INBOX", message(str(i))) for i in range(30)]]
        self.assertEqual([uid for _, uid in results], list(range(1, 31)))
        self.assertEqual([m.uid for m in view.sync().added], list(range(1, 31)))


class ScaleTests(StoreCase):
    timeout = 600

    async def test_open_20000(self) -> None:
        """A 20,000-message folder: first open (analyses every file), cold open with the cache,
        warm re-open, and an append rate.  Timings are printed, not asserted."""
        count = 20_000
        account = await self.account()
        body = message("bulk", "x" * 3000 + "\n")
        for i in range(count):
            name = f"{1700000000 + i}.M0P1Q{i}Rbeef.mx.test,S={len(body)}:2,S"
            (self.root / "cur" / name).write_bytes(body)
        stalls = ReactorStalls()
        started = time.perf_counter()
        view = await account.open("INBOX")
        first = time.perf_counter() - started
        stall = stalls.stop()
        self.assertLess(stall, first / 2)  # the reading happened off the reactor thread
        self.assertEqual(len(view.messages), count)
        self.assertEqual(view.messages[-1].uid, count)
        view.close()

        cold = await self.new_store().account(ADDRESS)
        started = time.perf_counter()
        view = await cold.open("INBOX")
        cached = time.perf_counter() - started
        self.assertEqual([m.uid for m in view.messages], list(range(1, count + 1)))
        view.close()
        started = time.perf_counter()
        view = await cold.open("INBOX")
        warm = time.perf_counter() - started
        self.addCleanup(view.close)

        started = time.perf_counter()
        for i in range(100):
            await cold.append("INBOX", message(f"more {i}"))
        rate = 100 / (time.perf_counter() - started)
        self.assertEqual(len(view.sync().added), 100)
        print(
            f"\n20k folder: first open {first * 1000:.0f} ms (longest reactor stall {stall * 1000:.0f} ms),"
            f" open from cache {cached * 1000:.0f} ms, warm re-open {warm * 1000:.1f} ms, append {rate:.0f}/s"
        )


class ReactorStalls:
    """The longest gap between ticks of a 5 ms LoopingCall: how long the reactor was kept busy."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._last = time.perf_counter()
        self._loop = LoopingCall(self._tick)
        self._loop.start(0.005)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.longest = max(self.longest, now - self._last)
        self._last = now

    def stop(self) -> float:
        self._loop.stop()
        return self.longest
