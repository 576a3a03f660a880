"""Tests for kms.queue.store: durable entries, crash recovery, damaged envelopes, cross-process locks.

Crashes are real: a child process runs `QueueStore.add` and ``os._exit``s before its n-th write,
fsync or rename (and half-way through a write), for every n; the store is then reopened here.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import signal
import stat
import subprocess
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

from twisted.trial.unittest import TestCase

import kms
from kms.queue import store as store_module
from kms.queue.interfaces import BOUNCED, DELIVERED, QueuedRecipient, QueueEntry
from kms.queue.store import (
    DamagedEntry,
    EntryBusy,
    NoSuchEntry,
    QueueStore,
    check_id,
    decode_entry,
    encode_entry,
)

PROJECT_ROOT = Path(kms.__file__).resolve().parent.parent
T0 = 1_700_000_000.0


def make_entry(entry_id: str = "ENTRY1", **changes: object) -> QueueEntry:
    values: dict[str, object] = {
        "id": entry_id,
        "sender": "alice@example.test",
        "recipients": [QueuedRecipient("bob@example.org"), QueuedRecipient("carol@example.net")],
        "created": T0,
        "next_attempt": T0,
    }
    values.update(changes)
    return QueueEntry(**values)  # type: ignore[arg-type]


def full_entry(entry_id: str = "FULL1") -> QueueEntry:
    """Every field of both dataclasses away from its default, so a field the store forgot shows."""
    recipient = QueuedRecipient(
        address="bøb@exämple.org",
        state=BOUNCED,
        notify=("SUCCESS", "FAILURE"),
        orcpt="utf-8;bøb@exämple.org",
        attempts=3,
        last_reply="550 5.1.1 no such user",
        remote_mta="mx1.example.org [192.0.2.1]",
        final_time=T0 + 30.5,
        status="5.1.1",
        last_attempt=T0 + 30.25,
        dsn_sent=True,
    )
    return QueueEntry(
        id=entry_id,
        sender="älice@example.test",
        recipients=[recipient, QueuedRecipient("x@example.org", state=DELIVERED)],
        created=T0,
        next_attempt=T0 + 300,
        size=1234,
        attempts=4,
        ret="HDRS",
        envid="QQ314159",
        body_8bit=True,
        smtputf8=True,
        client="client.example [192.0.2.9]",
        delay_warned=True,
    )


def run_python(script: str, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", script, *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,
    )


def start_python(script: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=PROJECT_ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


class StoreTestCase(TestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute() / "queue"
        self.root.parent.mkdir()
        self.reports: list[str] = []
        self.store = self.open()

    def open(self) -> QueueStore:
        return QueueStore(self.root, report=self.reports.append)

    def names(self) -> set[str]:
        return set(os.listdir(self.root))


class AddGetTests(StoreTestCase):
    def test_round_trip(self) -> None:
        """add writes header + body; get gives back the entry with the body's size; owner-only modes."""
        stored = self.store.add(make_entry(), b"Subject: hi\n\nhello\n", b"Received: by us\n")
        self.assertEqual(stored.size, len(b"Received: by us\nSubject: hi\n\nhello\n"))
        self.assertEqual(self.store.get("ENTRY1"), stored)
        body = self.store.body_path("ENTRY1").read_bytes()
        self.assertEqual(body, b"Received: by us\nSubject: hi\n\nhello\n")
        self.assertEqual(stat.S_IMODE(self.root.stat().st_mode), 0o700)
        for name in ("ENTRY1.json", "ENTRY1.msg", "ENTRY1.lock"):
            self.assertEqual(stat.S_IMODE((self.root / name).stat().st_mode), 0o600, name)
        self.assertEqual(self.names(), {"ENTRY1.json", "ENTRY1.msg", "ENTRY1.lock"})

    def test_every_field_round_trips(self) -> None:
        entry = full_entry()
        self.store.add(entry, b"x")
        self.assertEqual(self.store.get(entry.id), replace(entry, size=1))

    def test_envelope_names_every_field_and_a_version(self) -> None:
        """The JSON holds exactly the dataclass fields (plus "version"): a field added to the interfaces
        and forgotten by the store fails here."""
        obj = json.loads(encode_entry(full_entry()))
        self.assertEqual(set(obj), {"version"} | {f.name for f in fields(QueueEntry)})
        self.assertEqual(obj["version"], store_module.FORMAT_VERSION)
        self.assertEqual(set(obj["recipients"][0]), {f.name for f in fields(QueuedRecipient)})

    def test_stream_source_copied_from_its_position(self) -> None:
        data = os.urandom(300_000)  # several chunks
        source = io.BytesIO(b"SKIP" + data)
        source.read(4)
        stored = self.store.add(make_entry(), source)
        self.assertEqual(stored.size, len(data))
        self.assertEqual(self.store.body_path("ENTRY1").read_bytes(), data)

    def test_duplicate_id_refused_and_first_kept(self) -> None:
        self.store.add(make_entry(), b"first")
        self.assertRaises(FileExistsError, self.store.add, make_entry(), b"second")
        self.assertEqual(self.store.body_path("ENTRY1").read_bytes(), b"first")

    def test_failed_add_leaves_nothing(self) -> None:
        """A body source that fails half-way (a vanished spool, a full disk) leaves no trace."""

        class Broken(io.RawIOBase):
            calls = 0

            def read(self, size: int = -1) -> bytes:
                self.calls += 1
                if self.calls > 2:
                    raise OSError("disk on fire")
                return b"x" * 1000

        self.assertRaises(OSError, self.store.add, make_entry(), Broken())  # type: ignore[arg-type]
        self.assertEqual(self.names(), set())

    def test_invalid_entries_refused_leaving_nothing(self) -> None:
        bad = [
            make_entry(sender="a\r\nRCPT TO:<x@evil>"),
            make_entry(recipients=[]),
            make_entry(recipients=[QueuedRecipient("")]),
            make_entry(recipients=[QueuedRecipient("b@x", state="lost")]),
            make_entry(recipients=[QueuedRecipient("b@x", notify=("ALWAYS",))]),
            make_entry(created=float("nan")),
            make_entry(ret="ALL"),
            make_entry(envid="e" * 101),
        ]
        for entry in bad:
            self.assertRaises(ValueError, self.store.add, entry, b"x")
        self.assertEqual(self.names(), set())

    def test_get_unknown(self) -> None:
        self.assertRaises(NoSuchEntry, self.store.get, "NOPE")

    def test_save_replaces_atomically(self) -> None:
        self.store.add(make_entry(), b"x")
        with self.store.try_lock("ENTRY1"):
            entry = self.store.get("ENTRY1")
            entry.attempts = 2
            entry.recipients[0].state = DELIVERED
            self.store.save(entry)
        again = self.open().get("ENTRY1")
        self.assertEqual((again.attempts, again.recipients[0].state), (2, DELIVERED))
        self.assertNotIn("ENTRY1.json.tmp", self.names())

    def test_save_unknown(self) -> None:
        with self.store.try_lock("GHOST"):
            self.assertRaises(NoSuchEntry, self.store.save, make_entry("GHOST"))
        self.assertEqual(self.names(), set())

    def test_remove(self) -> None:
        self.store.add(make_entry(), b"x")
        with self.store.try_lock("ENTRY1"):
            self.store.remove("ENTRY1")
            self.assertRaises(NoSuchEntry, self.store.remove, "ENTRY1")
        self.assertEqual(self.names(), set())  # the lock file went with the lock
        self.assertRaises(NoSuchEntry, self.store.get, "ENTRY1")

    def test_changes_need_the_lock(self) -> None:
        self.store.add(make_entry(), b"x")
        self.assertRaises(RuntimeError, self.store.save, make_entry())
        self.assertRaises(RuntimeError, self.store.remove, "ENTRY1")
        lock = self.store.try_lock("ENTRY1")
        lock.release()
        self.assertRaises(RuntimeError, self.store.remove, "ENTRY1")
        self.assertEqual(self.store.get("ENTRY1").id, "ENTRY1")


class IdTests(StoreTestCase):
    HOSTILE = ["", "../x", "a/b", "..", ".", "x.json", "a b", "ä", "a\x00b", "x" * 65, "/etc/passwd", "A\n"]

    def test_path_tricks_refused(self) -> None:
        for bad in self.HOSTILE:
            self.assertRaises(ValueError, check_id, bad)
            self.assertRaises(ValueError, self.store.get, bad)
            self.assertRaises(ValueError, self.store.try_lock, bad)
            self.assertRaises(ValueError, self.store.body_path, bad)
            self.assertRaises(ValueError, self.store.add, make_entry(bad), b"x")
        self.assertEqual(self.names(), set())
        self.assertEqual(os.listdir(self.root.parent), ["queue"])


class CrossProcessTests(StoreTestCase):
    READ = (
        "import json, sys\nfrom dataclasses import asdict\nfrom pathlib import Path\n"
        "from kms.queue.store import QueueStore\n"
        "s = QueueStore(Path(sys.argv[1]))\n"
        "print(json.dumps([asdict(e) for e in s.entries()]))\n"
        "print(s.body_path(sys.argv[2]).read_bytes().decode())\n"
    )
    WRITE = (
        "import sys\nfrom pathlib import Path\n"
        "from kms.queue.store import QueueStore\n"
        "from kms.queue.interfaces import QueueEntry, QueuedRecipient\n"
        "s = QueueStore(Path(sys.argv[1]))\n"
        "r = QueuedRecipient('r@example.org', notify=('NEVER',))\n"
        "e = QueueEntry(id='CHILD1', sender='', recipients=[r], created=5.0, next_attempt=6.0, ret='FULL')\n"
        "s.add(e, sys.stdin.buffer, b'Received: child\\n')\n"
    )

    def test_read_by_another_process(self) -> None:
        entry = self.store.add(full_entry("PARENT1"), b"Subject: from parent\n\nbody\n")
        result = run_python(self.READ, str(self.root), "PARENT1")
        self.assertEqual(result.returncode, 0, result.stderr)
        listed, body = result.stdout.split("\n", 1)
        self.assertEqual(json.loads(listed), [json.loads(json.dumps(asdict(entry)))])
        self.assertEqual(body, "Subject: from parent\n\nbody\n\n")

    def test_written_by_another_process(self) -> None:
        result = run_python(self.WRITE, str(self.root), input="Subject: child\n\nhi\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        entry = self.open().get("CHILD1")
        self.assertEqual((entry.sender, entry.ret, entry.created), ("", "FULL", 5.0))
        self.assertEqual(entry.recipients[0].notify, ("NEVER",))
        body = self.store.body_path("CHILD1").read_bytes()
        self.assertEqual(body, b"Received: child\nSubject: child\n\nhi\n")


HOLD = (
    "import sys\nfrom pathlib import Path\nfrom kms.queue.store import QueueStore\n"
    "s = QueueStore(Path(sys.argv[1]))\n"
    "lock = s.try_lock(sys.argv[2])\n"
    "print('locked', flush=True)\n"
    "sys.stdin.readline()\n"
    "lock.release()\n"
    "print('released', flush=True)\n"
    "sys.stdin.readline()\n"
)


class LockTests(StoreTestCase):
    def hold(self, entry_id: str) -> subprocess.Popen[str]:
        child = start_python(HOLD, str(self.root), entry_id)

        def stop() -> None:
            if child.poll() is None:
                child.kill()
            child.wait()
            assert child.stdin is not None and child.stdout is not None
            child.stdin.close()
            child.stdout.close()

        self.addCleanup(stop)
        assert child.stdout is not None
        self.assertEqual(child.stdout.readline(), "locked\n")
        return child

    def test_other_process_holds_the_lock(self) -> None:
        """While another process holds an entry, this one can read it but not lock it; then it can."""
        self.store.add(make_entry(), b"x")
        child = self.hold("ENTRY1")
        self.assertRaises(EntryBusy, self.store.try_lock, "ENTRY1")
        self.assertEqual([e.id for e in self.store.entries()], ["ENTRY1"])
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("\n")
        child.stdin.flush()
        self.assertEqual(child.stdout.readline(), "released\n")
        with self.store.try_lock("ENTRY1"):
            self.store.remove("ENTRY1")

    def test_lock_dies_with_its_process(self) -> None:
        """SIGKILL leaves no stale lock: flock belongs to the process."""
        self.store.add(make_entry(), b"x")
        child = self.hold("ENTRY1")
        self.assertRaises(EntryBusy, self.store.try_lock, "ENTRY1")
        child.send_signal(signal.SIGKILL)
        child.wait()
        self.store.try_lock("ENTRY1").release()

    def test_same_process_twice(self) -> None:
        """Two threads of one process exclude each other too (one lock per open file)."""
        self.store.add(make_entry(), b"x")
        with self.store.try_lock("ENTRY1"):
            self.assertRaises(EntryBusy, self.store.try_lock, "ENTRY1")
            self.assertRaises(EntryBusy, self.open().try_lock, "ENTRY1")
        self.store.try_lock("ENTRY1").release()

    def test_lock_file_removed_between_open_and_lock(self) -> None:
        """The previous holder removed the entry and its lock file after we opened it and before our
        flock: our lock is then on a file nobody else sees, so try_lock must take the current one."""
        self.store.add(make_entry(), b"x")
        calls: list[int] = []
        real_flock = fcntl.flock

        class RacingFcntl:
            LOCK_EX, LOCK_NB = fcntl.LOCK_EX, fcntl.LOCK_NB

            @staticmethod
            def flock(fd: int, operation: int) -> None:
                calls.append(fd)
                if len(calls) == 1:
                    os.unlink(self.root / "ENTRY1.lock")
                real_flock(fd, operation)

        self.patch(store_module, "fcntl", RacingFcntl)
        with self.store.try_lock("ENTRY1"):
            self.assertEqual(len(calls), 2)
            self.assertRaises(EntryBusy, self.open().try_lock, "ENTRY1")

    def test_recovery_leaves_work_in_progress_alone(self) -> None:
        """A body without envelope whose lock is held is an add in progress in another process:
        opening the store there must not delete it; once the lock is free it is an orphan."""
        child = self.hold("BUSY1")
        (self.root / "BUSY1.msg").write_bytes(b"arriving")
        self.open()
        self.assertTrue((self.root / "BUSY1.msg").exists())
        self.assertEqual(self.reports, [])
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("\n")
        child.stdin.flush()
        self.assertEqual(child.stdout.readline(), "released\n")
        self.open()
        self.assertFalse((self.root / "BUSY1.msg").exists())
        self.assertEqual(len(self.reports), 1)
        self.assertIn("BUSY1", self.reports[0])


CRASH = """
import os, sys
from pathlib import Path
import kms.fsutil as fsutil
import kms.queue.store as store_module
from kms.queue.store import QueueStore
from kms.queue.interfaces import QueueEntry, QueuedRecipient

root, crash_at = Path(sys.argv[1]), int(sys.argv[2])
steps = 0

def counted(name, real):
    def call(*args, **kwargs):
        global steps
        steps += 1
        if steps == crash_at:
            if name == "write_all":  # die half-way through a write
                fd, data = args
                real(fd, data[: len(data) // 2])
            os._exit(9)
        return real(*args, **kwargs)
    return call

store = QueueStore(root)
fsutil.write_all = counted("write_all", fsutil.write_all)
store_module.fsync_dir = counted("fsync_dir", store_module.fsync_dir)
os.fsync = counted("fsync", os.fsync)
os.rename = counted("rename", os.rename)
entry = QueueEntry(id="CRASH1", sender="alice@example.test",
                   recipients=[QueuedRecipient("bob@example.org")], created=1.0, next_attempt=1.0)
store.add(entry, b"Subject: crash\\n\\n" + b"line\\n" * 50000, b"Received: by test\\n")
print(steps)
"""

BODY = b"Received: by test\nSubject: crash\n\n" + b"line\n" * 50000


class CrashTests(TestCase):
    def test_crash_at_every_step_of_add(self) -> None:
        """Killed before each write (half-way through it), fsync and rename of add: reopening finds
        no trace of the entry or the complete entry, never a part of one."""
        outcomes = []
        reports = []
        for crash_at in range(1, 40):
            root = Path(self.mktemp()).absolute()
            root.mkdir()
            result = run_python(CRASH, str(root / "queue"), str(crash_at))
            found: list[str] = []
            store = QueueStore(root / "queue", report=found.append)
            names = set(os.listdir(root / "queue"))
            entries = store.entries()
            reports.extend(found)
            if result.returncode == 0:
                steps = int(result.stdout)
                self.assertEqual(crash_at, steps + 1)
            else:
                self.assertEqual(result.returncode, 9, result.stderr)
            if entries:
                self.assertEqual([e.id for e in entries], ["CRASH1"])
                self.assertEqual(entries[0].size, len(BODY))
                self.assertEqual(store.body_path("CRASH1").read_bytes(), BODY)
                self.assertEqual(names, {"CRASH1.json", "CRASH1.msg", "CRASH1.lock"})
                outcomes.append("complete")
            else:
                self.assertEqual(names, set(), crash_at)
                outcomes.append("absent")
            if result.returncode == 0:
                break
        else:
            self.fail("add never completed")
        # Every step was a real crash point: absent up to the envelope's rename, complete after it.
        self.assertEqual(outcomes[-1], "complete")
        self.assertEqual(outcomes[0], "absent")
        self.assertEqual(outcomes, sorted(outcomes, key=lambda o: o == "complete"))
        self.assertGreaterEqual(len(outcomes), 8)
        self.assertTrue(any("body without envelope" in r for r in reports), reports)
        self.assertTrue(any("temporary files" in r for r in reports), reports)

    def test_crash_in_remove_leaves_a_body_that_recovery_removes(self) -> None:
        root = Path(self.mktemp()).absolute() / "queue"
        root.parent.mkdir()
        store = QueueStore(root)
        store.add(make_entry(), b"x")
        os.unlink(root / "ENTRY1.json")  # remove() unlinks the envelope first; it died right after
        reports: list[str] = []
        reopened = QueueStore(root, report=reports.append)
        self.assertEqual(reopened.entries(), [])
        self.assertEqual(os.listdir(root), [])
        self.assertEqual(len(reports), 1)


class DamageTests(StoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.store.add(make_entry("GOOD1"), b"good")

    def plant(self, entry_id: str, envelope: bytes, body: bytes | None = b"body") -> None:
        (self.root / f"{entry_id}.json").write_bytes(envelope)
        if body is not None:
            (self.root / f"{entry_id}.msg").write_bytes(body)

    def good_json(self, entry_id: str) -> dict[str, object]:
        return json.loads(encode_entry(make_entry(entry_id)))  # type: ignore[no-any-return]

    def assert_moved_aside(self, entry_id: str) -> None:
        """Skipped (the good entry still listed), reported once, moved to damaged/ with its body."""
        self.assertEqual([e.id for e in self.store.entries()], ["GOOD1"])
        self.assertEqual(len(self.reports), 1, self.reports)
        self.assertIn(entry_id, self.reports[0])
        self.assertIn(f"{entry_id}.json", os.listdir(self.root / "damaged"))
        self.assertFalse((self.root / f"{entry_id}.json").exists())
        self.assertFalse((self.root / f"{entry_id}.msg").exists())
        self.assertEqual([e.id for e in self.store.entries()], ["GOOD1"])
        self.assertEqual(len(self.reports), 1)  # not reported again at the next scan

    def test_not_json(self) -> None:
        self.plant("BAD1", b"\x00\xff{{{ not json")
        self.assert_moved_aside("BAD1")

    def test_truncated(self) -> None:
        self.plant("BAD1", encode_entry(make_entry("BAD1"))[:-20])
        self.assert_moved_aside("BAD1")

    def test_wrong_version(self) -> None:
        obj = self.good_json("BAD1")
        obj["version"] = 99
        self.plant("BAD1", json.dumps(obj).encode())
        self.assert_moved_aside("BAD1")
        self.assertIn("version", self.reports[0])

    def test_wrong_types_and_values(self) -> None:
        changes: list[tuple[str, object]] = [
            ("sender", 42),
            ("sender", "a\nb"),
            ("recipients", "bob"),
            ("recipients", [{"address": "x"}]),
            ("created", "yesterday"),
            ("created", True),
            ("attempts", -1),
            ("attempts", 1.5),
            ("size", 2**60),
            ("ret", "ALL"),
            ("recipients", [{**self.good_json("X")["recipients"][0], "notify": ["NEVER", "FAILURE"]}]),  # type: ignore[index]
            ("recipients", [{**self.good_json("X")["recipients"][0], "notify": ["DELAY", "DELAY"]}]),  # type: ignore[index]
            ("id", "OTHER"),
            ("unknown", 1),
        ]
        for n, (key, value) in enumerate(changes):
            obj = self.good_json(f"BAD{n}")
            obj[key] = value
            self.assertRaises(DamagedEntry, decode_entry, json.dumps(obj).encode(), f"BAD{n}")
        obj = self.good_json("BAD1")
        del obj["sender"]
        self.assertRaises(DamagedEntry, decode_entry, json.dumps(obj).encode(), "BAD1")
        self.assertRaises(DamagedEntry, decode_entry, b'{"version": 1, "created": NaN}', None)
        self.assertRaises(DamagedEntry, decode_entry, b"[" * 100_000 + b"]" * 100_000, None)
        self.assertRaises(DamagedEntry, decode_entry, b"[]", None)
        huge_number = json.dumps(self.good_json("BAD1")).replace('"size": 0', '"size": ' + "9" * 5000)
        self.assertRaises(DamagedEntry, decode_entry, huge_number.encode(), "BAD1")

    def test_too_many_recipients(self) -> None:
        obj = self.good_json("BAD1")
        obj["recipients"] = obj["recipients"] * (store_module.MAX_RECIPIENTS // 2 + 1)  # type: ignore[operator]
        self.assertRaises(DamagedEntry, decode_entry, json.dumps(obj).encode(), "BAD1")

    def test_oversized_envelope_not_read(self) -> None:
        self.patch(store_module, "MAX_ENVELOPE_BYTES", 1000)
        obj = self.good_json("BAD1")
        obj["client"] = "c" * 2000
        self.plant("BAD1", json.dumps(obj).encode())
        self.assert_moved_aside("BAD1")
        self.assertIn("larger", self.reports[0])

    def test_symlinked_envelope(self) -> None:
        secret = self.root.parent / "secret.json"
        secret.write_bytes(encode_entry(make_entry("BAD1")))
        (self.root / "BAD1.json").symlink_to(secret)
        (self.root / "BAD1.msg").write_bytes(b"x")
        self.assert_moved_aside("BAD1")
        self.assertTrue(secret.exists())

    def test_symlinked_body(self) -> None:
        """A body that is a link to another file is never delivered (it would send that file)."""
        (self.root / "BAD1.json").write_bytes(encode_entry(make_entry("BAD1")))
        (self.root / "BAD1.msg").symlink_to(self.root / "GOOD1.msg")
        self.assert_moved_aside("BAD1")
        self.assertIn("not a regular file", self.reports[0])

    def test_envelope_without_body(self) -> None:
        self.plant("BAD1", encode_entry(make_entry("BAD1")), body=None)
        self.assert_moved_aside("BAD1")
        self.assertIn("without its body", self.reports[0])

    def test_envelope_without_body_found_on_open(self) -> None:
        self.plant("BAD1", encode_entry(make_entry("BAD1")), body=None)
        self.open()
        self.assertEqual(len(self.reports), 1)
        self.assertIn("BAD1.json", os.listdir(self.root / "damaged"))

    def test_damaged_but_locked_is_left_for_later(self) -> None:
        self.plant("BAD1", b"garbage")
        with self.open().try_lock("BAD1"):
            self.assertEqual([e.id for e in self.store.entries()], ["GOOD1"])
            self.assertTrue((self.root / "BAD1.json").exists())
            self.assertEqual(self.reports, [])
        self.assert_moved_aside("BAD1")

    def test_get_damaged(self) -> None:
        self.plant("BAD1", b"garbage")
        self.assertRaises(DamagedEntry, self.store.get, "BAD1")

    def test_stale_lock_file_removed(self) -> None:
        (self.root / "OLD1.lock").write_bytes(b"")
        self.open()
        self.assertNotIn("OLD1.lock", self.names())
        self.assertEqual(self.reports, [])


class DueTests(StoreTestCase):
    def test_due(self) -> None:
        """Due: next attempt reached (earliest first), or nothing pending any more."""
        self.store.add(make_entry("LATER1", next_attempt=T0 + 100), b"x")
        self.store.add(make_entry("NOW1", next_attempt=T0 + 10), b"x")
        self.store.add(make_entry("EARLY1", next_attempt=T0 + 5), b"x")
        done = [QueuedRecipient("bob@example.org", state=BOUNCED)]
        self.store.add(make_entry("DONE1", next_attempt=T0 + 1000, recipients=done), b"x")
        self.assertEqual([e.id for e in self.store.due(T0 + 10)], ["EARLY1", "NOW1", "DONE1"])
        self.assertEqual([e.id for e in self.store.due(T0)], ["DONE1"])
        self.assertEqual({e.id for e in self.store.due(T0 + 100)}, {"EARLY1", "NOW1", "LATER1", "DONE1"})

    def test_flush_marker(self) -> None:
        self.assertFalse(self.store.take_flush_request())
        self.store.request_flush()
        self.store.request_flush()
        self.assertTrue((self.root / store_module.FLUSH_MARKER).exists())
        self.assertTrue(self.store.take_flush_request())
        self.assertFalse(self.store.take_flush_request())
        self.assertEqual(self.store.entries(), [])
