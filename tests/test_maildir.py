"""Maildir paths, names and durable group-commit delivery (real files, real threads, a real crash)."""

from __future__ import annotations

import io
import os
import re
import stat
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet import defer, protocol
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

import kms
from kms.store import maildir
from kms.store.maildir import (
    Copy,
    MaildirWriter,
    ensure_maildir,
    mailbox_path,
    maildir_name,
    sanitize_hostname,
)
from kms.store.spool import MessageSpool

reactor: Any = _reactor  # the global reactor; its stub type lacks the thread and process interfaces
REPO_ROOT = Path(kms.__file__).resolve().parent.parent
NAME_RE = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)R([0-9a-f]{8})\.(.+),S=(\d+)$")


class BytesSpool:
    """A spool already complete in memory."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def open(self) -> BinaryIO:
        return io.BytesIO(self.data)


class GatedSpool(BytesSpool):
    """Holds a worker inside `open` until released, so the test controls what gets batched."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def open(self) -> BinaryIO:
        self.entered.set()
        self.gate.wait(10)
        return super().open()


class MailboxPathTests(TestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.root.mkdir()

    def test_accepted(self) -> None:
        cases = {
            "User@Example.COM": ("example.com", "user"),
            "a.b+tag@mail.example.org": ("mail.example.org", "a.b+tag"),
            "o'neil@x": ("x", "o'neil"),
            "ÜSER@bücher.de": ("bücher.de", "üser"),
            "x" * 255 + "@d": ("d", "x" * 255),
            "a b@d": ("d", "a b"),
        }
        for address, (domain, local) in cases.items():
            self.assertEqual(mailbox_path(self.root, address), self.root / domain / local, address)

    def test_refused(self) -> None:
        refused = [
            "",
            "plain",
            "a@b@c",
            "@x",
            "a@",
            "@",
            "../x@y",
            "x@..",
            "..@x",
            "a@.",
            ".@x",
            ".hidden@x",
            "a@.x",
            "a..b@x",
            "a@x..y",
            "a/b@x",
            "a@x/y",
            "/etc@x",
            "a@/etc",
            "a\\b@x",
            "a@x\\y",
            "a\0@x",
            "a@x\0",
            "a\n@x",
            "a\r@x",
            "a\t@x",
            "a\x7f@x",
            "a\x85@x",
            "a\x1b[0m@x",
            "a\ud800@x",
            "x" * 256 + "@d",
            "a@" + "d" * 256,
            "é" * 128 + "@d",
        ]
        for address in refused:
            self.assertRaises(ValueError, mailbox_path, self.root, address)

    def test_symlink_out_of_root_refused(self) -> None:
        outside = Path(self.mktemp()).resolve()
        outside.mkdir()
        (self.root / "evil.com").symlink_to(outside)
        self.assertRaises(ValueError, mailbox_path, self.root, "user@evil.com")
        (self.root / "ok.com").mkdir()
        (self.root / "ok.com" / "bob").symlink_to(outside)
        self.assertRaises(ValueError, mailbox_path, self.root, "bob@ok.com")

    def test_symlink_inside_root_allowed(self) -> None:
        (self.root / "real.com").mkdir()
        (self.root / "alias.com").symlink_to(self.root / "real.com")
        self.assertEqual(mailbox_path(self.root, "u@alias.com"), self.root / "alias.com" / "u")


class NameTests(TestCase):
    def test_format(self) -> None:
        self.assertEqual(
            maildir_name(1700000000, 42, 1234, 7, "0badf00d", "mx1.example.com"),
            "1700000000.M42P1234Q7R0badf00d.mx1.example.com",
        )

    def test_hostname_escaped(self) -> None:
        self.assertEqual(sanitize_hostname("a/b:c,d"), "a\\057b\\072c\\054d")
        name = maildir_name(1, 2, 3, 4, "ab", "h/o:st")
        self.assertNotIn("/", name)
        self.assertNotIn(":", name)


class EnsureMaildirTests(TestCase):
    def test_creates_private_dirs_and_is_idempotent(self) -> None:
        root = Path(self.mktemp()) / "mail" / "example.com" / "user"
        ensure_maildir(root)
        for sub in ("tmp", "new", "cur"):
            self.assertTrue((root / sub).is_dir())
            self.assertEqual(stat.S_IMODE((root / sub).stat().st_mode), 0o700)
        (root / "new" / "keep").write_bytes(b"x")
        ensure_maildir(root)
        self.assertEqual((root / "new" / "keep").read_bytes(), b"x")

    def test_completes_a_partial_maildir(self) -> None:
        root = Path(self.mktemp())
        (root / "new").mkdir(parents=True)
        ensure_maildir(root)
        self.assertEqual(sorted(os.listdir(root)), ["cur", "new", "tmp"])

    def test_concurrent_calls(self) -> None:
        root = Path(self.mktemp()) / "d" / "u"
        errors: list[BaseException] = []

        def run() -> None:
            try:
                ensure_maildir(root)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(sorted(os.listdir(root)), ["cur", "new", "tmp"])


class MaildirWriterTests(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.base.mkdir()

    def make_writer(self, **kwargs: int) -> MaildirWriter:
        writer = MaildirWriter(reactor, **kwargs)
        writer.start()
        self.addCleanup(writer.stop)
        return writer

    def maildir(self, name: str) -> Path:
        root = self.base / name
        ensure_maildir(root)
        return root

    def assertDelivered(self, path: Path, maildir_root: Path, content: bytes) -> None:
        self.assertEqual(path.parent, maildir_root / "new")
        self.assertEqual(path.read_bytes(), content)
        match = NAME_RE.match(path.name)
        self.assertIsNotNone(match, path.name)
        assert match is not None
        self.assertEqual(int(match.group(7)), len(content))
        self.assertEqual(int(match.group(3)), os.getpid())

    async def test_several_maildirs_one_call(self) -> None:
        writer = self.make_writer()
        roots = [self.maildir(n) for n in ("a", "b", "c")]
        spool = MessageSpool(self.base, memory_limit=1000)
        body = b"Subject: test\n\n" + b"line of body\n" * 20000  # spills; several 64 KiB chunks
        spool.write(body)
        self.addCleanup(spool.discard)
        copies = [Copy(root, f"X-Envelope-To: {root.name}@x\n".encode(), spool) for root in roots]
        copies.append(Copy(roots[0], b"X-Envelope-To: second@x\n", spool))
        paths = await writer.deliver(copies)
        self.assertEqual(len(paths), 4)
        for copy, path in zip(copies, paths, strict=True):
            self.assertDelivered(path, copy.maildir, copy.header + body)
        self.assertEqual(len(set(paths)), 4)
        for root in roots:
            self.assertEqual(os.listdir(root / "tmp"), [])
            self.assertEqual(os.listdir(root / "cur"), [])
        self.assertEqual(len(os.listdir(roots[0] / "new")), 2)

    async def test_empty_body_and_empty_header(self) -> None:
        writer = self.make_writer()
        root = self.maildir("m")
        copies = [Copy(root, b"", BytesSpool(b"")), Copy(root, b"H: v\n", BytesSpool(b""))]
        paths = await writer.deliver(copies)
        self.assertDelivered(paths[0], root, b"")
        self.assertDelivered(paths[1], root, b"H: v\n")
        self.assertEqual(stat.S_IMODE(paths[0].stat().st_mode), 0o600)

    async def test_no_copies(self) -> None:
        writer = self.make_writer()
        self.assertEqual((await writer.deliver([])), [])

    async def test_each_new_dir_fsynced_once_per_batch(self) -> None:
        synced: list[Path] = []
        real = maildir.fsync_dir

        def counting(directory: Path) -> None:
            synced.append(directory)
            real(directory)

        root = self.maildir("m")
        other = self.maildir("o")
        self.patch(maildir, "fsync_dir", counting)
        writer = self.make_writer(workers=1, max_batch=16)
        gate = GatedSpool(b"first\n")
        first = writer.deliver([Copy(root, b"", gate)])
        self.assertTrue(gate.entered.wait(5))
        rest = [writer.deliver([Copy(root, b"", BytesSpool(b"%d\n" % i))]) for i in range(40)]
        rest.append(writer.deliver([Copy(root, b"", BytesSpool(b"x")), Copy(other, b"", BytesSpool(b"y"))]))
        gate.gate.set()
        await defer.gatherResults([first, *rest])
        # 1 + 41 jobs, batches of at most 16: [1], [16], [16], [9]; the last batch also touches o/new.
        self.assertEqual(sorted(map(str, synced)), sorted(map(str, [root / "new"] * 4 + [other / "new"])))
        self.assertEqual(len(os.listdir(root / "new")), 42)

    async def test_failures_are_per_job_and_leave_nothing_behind(self) -> None:
        writer = self.make_writer(workers=1)
        good1, good2, good3 = self.maildir("g1"), self.maildir("g2"), self.maildir("g3")
        no_tmp = self.maildir("no_tmp")
        (no_tmp / "tmp").rmdir()
        (no_tmp / "tmp").write_bytes(b"")  # tmp/ is a file: works as a failure even for root
        no_new = self.maildir("no_new")
        (no_new / "new").rmdir()
        (self.base / "a-file").write_bytes(b"")
        never = self.base / "a-file" / "mailbox"  # cannot be created

        gate = GatedSpool(b"gate")
        held = writer.deliver([Copy(good1, b"", gate)])
        self.assertTrue(gate.entered.wait(5))
        # Everything below is queued behind the gate, so it lands in one batch together.
        bad_tmp = writer.deliver([Copy(good2, b"", BytesSpool(b"1")), Copy(no_tmp, b"", BytesSpool(b"2"))])
        ok_a = writer.deliver([Copy(good2, b"A", BytesSpool(b"a"))])
        # Two copies renamed into new/ before the third fails at rename: both must be unlinked.
        bad_new = writer.deliver(
            [
                Copy(good3, b"", BytesSpool(b"3")),
                Copy(good1, b"", BytesSpool(b"4")),
                Copy(no_new, b"", BytesSpool(b"5")),
            ]
        )
        bad_missing = writer.deliver([Copy(never, b"", BytesSpool(b"6"))])
        ok_b = writer.deliver([Copy(good3, b"B", BytesSpool(b"b"))])
        gate.gate.set()

        [held_path] = await held
        await self.assertFailure(bad_tmp, NotADirectoryError)
        [a_path] = await ok_a
        await self.assertFailure(bad_new, FileNotFoundError)
        await self.assertFailure(bad_missing, NotADirectoryError)
        [b_path] = await ok_b
        self.assertDelivered(a_path, good2, b"Aa")
        self.assertDelivered(b_path, good3, b"Bb")
        self.assertEqual(os.listdir(good1 / "new"), [held_path.name])
        self.assertEqual(os.listdir(good2 / "new"), [a_path.name])
        self.assertEqual(os.listdir(good3 / "new"), [b_path.name])
        for root in (good1, good2, good3, no_new):
            self.assertEqual(os.listdir(root / "tmp"), [], root)
        self.assertEqual(os.listdir(no_tmp / "new"), [])

    async def test_missing_maildir_is_created(self) -> None:
        """A first delivery to a new mailbox, or one whose folders were removed, creates them."""
        writer = self.make_writer()
        fresh = self.base / "fresh" / "user"
        [path] = await writer.deliver([Copy(fresh, b"H", BytesSpool(b"x"))])
        self.assertDelivered(path, fresh, b"Hx")
        self.assertEqual(sorted(os.listdir(fresh)), ["cur", "new", "tmp"])

    async def test_spool_read_error_removes_tmp_file(self) -> None:
        class Broken:
            def open(self) -> BinaryIO:
                raise OSError("spool vanished")

        writer = self.make_writer()
        root = self.maildir("m")
        await self.assertFailure(writer.deliver([Copy(root, b"H\n", Broken())]), OSError)
        self.assertEqual(os.listdir(root / "tmp"), [])
        self.assertEqual(os.listdir(root / "new"), [])

    async def test_200_in_flight(self) -> None:
        writer = self.make_writer()
        roots = [self.maildir(f"u{i}") for i in range(5)]
        deferreds = [
            writer.deliver([Copy(roots[i % 5], b"N: %d\n" % i, BytesSpool(b"body %d\n" % i))])
            for i in range(200)
        ]
        results = await defer.gatherResults(deferreds)
        paths = [p for (p,) in results]
        self.assertEqual(len({p.name for p in paths}), 200)
        for i, path in enumerate(paths):
            self.assertDelivered(path, roots[i % 5], b"N: %d\nbody %d\n" % (i, i))
        self.assertEqual(sum(len(os.listdir(r / "new")) for r in roots), 200)
        self.assertEqual(sum(len(os.listdir(r / "tmp")) for r in roots), 0)

    async def test_stop_waits_for_in_flight_work(self) -> None:
        writer = MaildirWriter(reactor, workers=2)
        writer.start()
        root = self.maildir("m")
        deferreds = [writer.deliver([Copy(root, b"", BytesSpool(b"%d" % i))]) for i in range(60)]
        self.assertFalse(any(d.called for d in deferreds))
        await writer.stop()
        self.assertTrue(all(d.called for d in deferreds))
        results = await defer.gatherResults(deferreds)
        self.assertEqual(sorted(int(p.read_bytes()) for (p,) in results), list(range(60)))
        self.assertEqual(len(os.listdir(root / "new")), 60)
        await self.assertFailure(writer.deliver([Copy(root, b"", BytesSpool(b"late"))]), RuntimeError)
        self.assertEqual(len(os.listdir(root / "new")), 60)

    async def test_restart_and_service_protocol(self) -> None:
        writer = MaildirWriter(reactor, workers=1)
        root = self.maildir("m")
        await self.assertFailure(writer.deliver([Copy(root, b"", BytesSpool(b"x"))]), RuntimeError)
        writer.startService()
        self.assertTrue(writer.running)
        await writer.deliver([Copy(root, b"", BytesSpool(b"1"))])
        await writer.stopService()
        self.assertFalse(writer.running)
        writer.start()
        await writer.deliver([Copy(root, b"", BytesSpool(b"2"))])
        await writer.stop()
        self.assertEqual(sorted(p.read_bytes() for p in (root / "new").iterdir()), [b"1", b"2"])


CHILD = r"""
import itertools, sys
from pathlib import Path
from twisted.internet import reactor
from kms.store.maildir import Copy, MaildirWriter, ensure_maildir
from kms.store.spool import MessageSpool

root = Path(sys.argv[1])
ensure_maildir(root)
writer = MaildirWriter(reactor, workers=4)
writer.start()
seq = itertools.count()

def body(n):
    return (b"%d:" % n) * (2000 + (n % 7) * 9000)

def one():
    n = next(seq)
    spool = MessageSpool(root.parent, memory_limit=50_000)
    spool.write(body(n))
    d = writer.deliver([Copy(root, b"X-Seq: %d\n" % n, spool)])
    def done(paths):
        sys.stdout.write("%d %s\n" % (n, paths[0]))
        sys.stdout.flush()
    d.addCallback(done)
    d.addBoth(lambda r: (spool.discard(), one(), r)[2])

for _ in range(16):
    one()
reactor.run()
"""


def expected_content(n: int) -> bytes:
    return b"X-Seq: %d\n" % n + (b"%d:" % n) * (2000 + (n % 7) * 9000)


class _Collector(protocol.ProcessProtocol):
    def __init__(self, enough: int) -> None:
        self.enough = enough
        self.buffer = b""
        self.lines: list[bytes] = []
        self.stderr = b""
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.killed = False

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *complete, self.buffer = self.buffer.split(b"\n")
        self.lines.extend(complete)
        if len(self.lines) >= self.enough:
            self.kill()

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def kill(self) -> None:
        if not self.killed:
            self.killed = True
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]

    def processEnded(self, reason: object) -> None:
        self.ended.callback(None)


class CrashTests(TestCase):
    timeout = 30

    async def test_sigkill_mid_run_loses_nothing_acknowledged(self) -> None:
        root = Path(self.mktemp()).resolve() / "mail" / "user"
        root.parent.mkdir(parents=True)
        collector = _Collector(enough=300)
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        reactor.spawnProcess(collector, sys.executable, [sys.executable, "-c", CHILD, str(root)], env=env)
        safety = reactor.callLater(10, collector.kill)
        await collector.ended
        if safety.active():
            safety.cancel()
        self.assertGreaterEqual(len(collector.lines), 300, collector.stderr.decode(errors="replace"))

        reported: dict[int, Path] = {}
        for line in collector.lines:
            seq, name = line.decode().split(" ", 1)
            reported[int(seq)] = Path(name)
        for n, path in reported.items():
            self.assertEqual(path.read_bytes(), expected_content(n), path)
        on_disk = list((root / "new").iterdir())
        self.assertTrue(set(reported.values()) <= set(on_disk))
        for found in on_disk:
            content = found.read_bytes()
            match = re.match(rb"X-Seq: (\d+)\n", content)
            self.assertIsNotNone(match, found)
            assert match is not None
            self.assertEqual(content, expected_content(int(match.group(1))), found)
            parsed = NAME_RE.match(found.name)
            self.assertIsNotNone(parsed, found)
            assert parsed is not None
            self.assertEqual(int(parsed.group(7)), len(content))
