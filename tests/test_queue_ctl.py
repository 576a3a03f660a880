"""Tests for ``kmsctl queue``: list, show, flush, delete, bounce; in-process and as a real process,
and against a second process holding an entry's lock (as the server does while delivering)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

import kms
from kms.ctl import main
from kms.queue.interfaces import BOUNCED, DELIVERED, PENDING, QueuedRecipient, QueueEntry
from kms.queue.store import FLUSH_MARKER, NoSuchEntry, QueueStore
from tests.support.server import TEST_STORE_LIMITS

PROJECT_ROOT = Path(kms.__file__).resolve().parent.parent
CONFIG = """\
[server]
hostname = "mail.example.test"
[domains]
local = ["example.test"]
[store]
path = "store"
""" + TEST_STORE_LIMITS  # small limits: kmsctl warns on stderr below the soft limit (1GB by default)
T0 = 1_700_000_000.0
BODY = b"Subject: Quarterly numbers\nFrom: alice@example.test\nX-Trick: \x1b[2Jcleared\n\nsecret body text\n"

HOLD = (
    "import sys\nfrom pathlib import Path\nfrom kms.queue.store import QueueStore\n"
    "lock = QueueStore(Path(sys.argv[1])).try_lock(sys.argv[2])\n"
    "print('locked', flush=True)\n"
    "sys.stdin.readline()\n"
)


def make_entry(entry_id: str, **changes: object) -> QueueEntry:
    values: dict[str, object] = {
        "id": entry_id,
        "sender": "alice@example.test",
        "recipients": [
            QueuedRecipient(
                "bob@example.org",
                attempts=2,
                last_reply="451 4.7.1 greylisted, try later",
                remote_mta="mx1.example.org [192.0.2.1]",
                status="4.7.1",
                last_attempt=T0 + 600,
                notify=("FAILURE", "DELAY"),
                orcpt="rfc822;bob@example.org",
            ),
            QueuedRecipient("carol@example.net", state=DELIVERED, status="2.0.0", final_time=T0 + 600),
        ],
        "created": T0,
        "next_attempt": 4_000_000_000.0,
        "attempts": 2,
        "envid": "ENV42",
        "ret": "HDRS",
        "client": "client.example [192.0.2.9]",
    }
    values.update(changes)
    return QueueEntry(**values)  # type: ignore[arg-type]


class QueueCtlTestCase(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.config = self.dir / "kms.toml"
        self.config.write_text(CONFIG)
        (self.dir / "store").mkdir()
        self.queue = self.dir / "store" / "queue"
        self.store = QueueStore(self.queue)

    def add(self, entry_id: str, **changes: object) -> QueueEntry:
        return self.store.add(make_entry(entry_id, **changes), BODY)

    def run_ctl(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = main(["--config", str(self.config), *argv])
        return code, out.getvalue(), err.getvalue()

    def hold(self, entry_id: str) -> None:
        """Another process takes the entry's lock (the server delivering it) until the test ends."""
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
        child = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(self.queue), entry_id],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

        def stop() -> None:
            child.kill()
            child.wait()
            assert child.stdin is not None and child.stdout is not None
            child.stdin.close()
            child.stdout.close()

        self.addCleanup(stop)
        assert child.stdout is not None
        self.assertEqual(child.stdout.readline(), "locked\n")

    def mail_log(self) -> str:
        path = self.dir / "store" / "logs" / "mail.log"
        return path.read_text() if path.exists() else ""


class ListTests(QueueCtlTestCase):
    def test_empty(self) -> None:
        code, out, err = self.run_ctl("queue", "list")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("0 entries, 0 recipient(s) pending", out)

    def test_entries(self) -> None:
        """Id, age, size, next attempt, sender; each pending recipient with attempts and last reply."""
        self.add("FIRST1", created=time.time() - 7200)
        self.add("SECOND1", sender="", next_attempt=0.0, created=time.time() - 60)
        code, out, err = self.run_ctl("queue", "list")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith("ID"))
        first = next(line for line in lines if line.startswith("FIRST1"))
        when = r"2096-\d\d-\d\dT[\d:]+\+00:00"
        self.assertRegex(first, rf"^FIRST1\s+2h0[01]m\s+\d+\s+{when}\s+alice@example\.test$")
        self.assertIn(str(len(BODY)), first)
        second = next(line for line in lines if line.startswith("SECOND1"))
        self.assertRegex(second, r"\s+now\s+<>$")
        self.assertIn("    bob@example.org  (attempts 2)  451 4.7.1 greylisted, try later", lines)
        self.assertNotIn("carol@example.net", out)  # delivered, not pending
        self.assertIn("2 entries, 2 recipient(s) pending", out)

    def test_json(self) -> None:
        self.add("FIRST1")
        code, out, _ = self.run_ctl("queue", "list", "--json")
        self.assertEqual(code, 0)
        [listed] = json.loads(out)
        self.assertEqual((listed["id"], listed["envid"], listed["size"]), ("FIRST1", "ENV42", len(BODY)))
        self.assertEqual([r["state"] for r in listed["recipients"]], [PENDING, DELIVERED])

    def test_hostile_text_escaped(self) -> None:
        """A right-to-left override in a remote reply cannot reorder the administrator's screen."""
        evil = make_entry("EVIL1").recipients
        evil[0].last_reply = "550 \u202egnp.exe"
        self.store.add(make_entry("EVIL1", recipients=evil), BODY)
        _, out, _ = self.run_ctl("queue", "list")
        self.assertIn("550 \\x202egnp.exe", out)
        self.assertNotIn("\u202e", out)

    def test_damaged_entry_reported_not_fatal(self) -> None:
        self.add("GOOD1")
        (self.queue / "BAD1.json").write_bytes(b"{ not json")
        (self.queue / "BAD1.msg").write_bytes(BODY)
        code, out, err = self.run_ctl("queue", "list")
        self.assertEqual(code, 0)
        self.assertIn("GOOD1", out)
        self.assertIn("BAD1 is damaged", err)
        self.assertIn("1 entry", out)


class ShowTests(QueueCtlTestCase):
    def test_show(self) -> None:
        self.add("FIRST1")
        code, out, err = self.run_ctl("queue", "show", "FIRST1")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("id:            FIRST1", out)
        self.assertIn("sender:        <alice@example.test>", out)
        self.assertIn("parameters:    RET=HDRS ENVID=ENV42", out)
        self.assertIn("client:        client.example [192.0.2.9]", out)
        self.assertIn("  bob@example.org: pending, 2 attempt(s), status 4.7.1", out)
        self.assertIn("    last reply:   451 4.7.1 greylisted, try later", out)
        self.assertIn("    remote host:  mx1.example.org [192.0.2.1]", out)
        self.assertIn("    dsn:          NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob@example.org", out)
        self.assertIn("  carol@example.net: delivered, 0 attempt(s), status 2.0.0", out)
        self.assertIn("  Subject: Quarterly numbers", out)
        self.assertIn("  X-Trick: \\x1b[2Jcleared", out)  # escape sequences in headers are shown, not obeyed
        self.assertNotIn("\x1b", out)
        self.assertNotIn("secret body text", out)

    def test_json(self) -> None:
        self.add("FIRST1")
        code, out, _ = self.run_ctl("queue", "show", "FIRST1", "--json")
        self.assertEqual(code, 0)
        shown = json.loads(out)
        self.assertEqual(shown["id"], "FIRST1")
        self.assertTrue(shown["header"].startswith("Subject: Quarterly numbers\n"))
        self.assertNotIn("secret body text", shown["header"])

    def test_unknown_and_invalid(self) -> None:
        code, _, err = self.run_ctl("queue", "show", "NOPE1")
        self.assertEqual(code, 1)
        self.assertIn("no such queue entry: NOPE1", err)
        code, _, err = self.run_ctl("queue", "show", "../../users.db")
        self.assertEqual(code, 1)
        self.assertIn("invalid queue id", err)


class FlushTests(QueueCtlTestCase):
    def test_flush_one(self) -> None:
        self.add("FIRST1")
        self.add("SECOND1")
        before = time.time()
        code, out, err = self.run_ctl("queue", "flush", "FIRST1")
        self.assertEqual((code, err, out), (0, "", "flushed FIRST1\n"))
        self.assertTrue(before <= self.store.get("FIRST1").next_attempt <= time.time())
        self.assertEqual(self.store.get("SECOND1").next_attempt, 4_000_000_000.0)
        self.assertTrue((self.queue / FLUSH_MARKER).exists())
        self.assertEqual([e.id for e in self.store.due(time.time())], ["FIRST1"])

    def test_flush_all(self) -> None:
        for entry_id in ("FIRST1", "SECOND1", "THIRD1"):
            self.add(entry_id)
        code, out, _ = self.run_ctl("queue", "flush")
        self.assertEqual((code, out), (0, "flushed 3 entries\n"))
        self.assertEqual(len(self.store.due(time.time())), 3)

    def test_flush_all_with_one_busy(self) -> None:
        """The busy entry is named and left alone, the others are flushed, the exit status says so."""
        self.add("FIRST1")
        self.add("BUSY1")
        self.hold("BUSY1")
        code, out, err = self.run_ctl("queue", "flush")
        self.assertEqual(code, 1)
        self.assertIn("BUSY1 is being delivered or changed right now", err)
        self.assertEqual(out, "flushed 1 entry\n")
        self.assertEqual(self.store.get("BUSY1").next_attempt, 4_000_000_000.0)

    def test_flush_one_busy(self) -> None:
        self.add("BUSY1")
        self.hold("BUSY1")
        code, _, err = self.run_ctl("queue", "flush", "BUSY1")
        self.assertEqual(code, 1)
        self.assertIn("BUSY1 is being delivered or changed right now; try again", err)
        self.assertEqual(self.store.get("BUSY1").next_attempt, 4_000_000_000.0)


class DeleteTests(QueueCtlTestCase):
    def test_delete(self) -> None:
        self.add("FIRST1")
        code, out, err = self.run_ctl("queue", "delete", "FIRST1")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("deleted FIRST1 (1 recipient(s) were pending; no report is sent)", out)
        self.assertRaises(NoSuchEntry, self.store.get, "FIRST1")
        self.assertEqual(os.listdir(self.queue), [])  # no DSN queued, nothing left behind
        self.assertRegex(self.mail_log(), r"queue-deleted .*id=FIRST1.*reason=kmsctl")

    def test_delete_busy(self) -> None:
        self.add("BUSY1")
        self.hold("BUSY1")
        code, _, err = self.run_ctl("queue", "delete", "BUSY1")
        self.assertEqual(code, 1)
        self.assertIn("BUSY1 is being delivered or changed right now", err)
        self.assertEqual(self.store.get("BUSY1").id, "BUSY1")
        self.assertEqual(self.mail_log(), "")

    def test_delete_unknown(self) -> None:
        code, _, err = self.run_ctl("queue", "delete", "NOPE1")
        self.assertEqual(code, 1)
        self.assertIn("no such queue entry: NOPE1", err)
        self.assertEqual(os.listdir(self.queue), [])  # not even a lock file


class BounceTests(QueueCtlTestCase):
    def test_bounce(self) -> None:
        """Pending recipients fail with 5.0.0 now; delivered ones stay; the runner will report it."""
        self.add("FIRST1")
        before = time.time()
        code, out, err = self.run_ctl("queue", "bounce", "FIRST1")
        self.assertEqual((code, err), (0, ""))
        self.assertIn(
            "bounced 1 recipient(s) of FIRST1; the server sends the report to <alice@example.test>",
            out,
        )
        entry = self.store.get("FIRST1")
        bob, carol = entry.recipients
        self.assertEqual((bob.state, bob.status), (BOUNCED, "5.0.0"))
        self.assertEqual(bob.last_reply, "bounced by the administrator")
        self.assertFalse(bob.dsn_sent)
        self.assertEqual((carol.state, carol.status), (DELIVERED, "2.0.0"))
        self.assertTrue(before <= entry.next_attempt <= time.time())
        self.assertTrue((self.queue / FLUSH_MARKER).exists())
        self.assertEqual([e.id for e in self.store.due(time.time())], ["FIRST1"])
        self.assertRegex(self.mail_log(), r"queue-bounced .*id=FIRST1.*recipients=1")

    def test_bounce_null_sender(self) -> None:
        self.add("NULL1", sender="")
        code, out, _ = self.run_ctl("queue", "bounce", "NULL1")
        self.assertEqual(code, 0)
        self.assertIn("no report is sent (null sender, or NOTIFY asked for none)", out)

    def test_nothing_pending(self) -> None:
        done = [QueuedRecipient("bob@example.org", state=DELIVERED)]
        self.add("DONE1", recipients=done)
        code, _, err = self.run_ctl("queue", "bounce", "DONE1")
        self.assertEqual(code, 1)
        self.assertIn("DONE1 has no pending recipients", err)

    def test_bounce_busy(self) -> None:
        self.add("BUSY1")
        self.hold("BUSY1")
        code, _, err = self.run_ctl("queue", "bounce", "BUSY1")
        self.assertEqual(code, 1)
        self.assertIn("BUSY1 is being delivered or changed right now", err)
        self.assertEqual(self.store.get("BUSY1").recipients[0].state, PENDING)


class SubprocessTests(QueueCtlTestCase):
    def test_real_kmsctl(self) -> None:
        """The verbs as a real process: list sees what this process queued, delete removes it."""
        self.add("FIRST1")
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}

        def kmsctl(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "kms.ctl", "--config", str(self.config), "queue", *argv],
                capture_output=True,
                text=True,
                cwd=PROJECT_ROOT,
                env=env,
                timeout=60,
            )

        listed = kmsctl("list")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertIn("FIRST1", listed.stdout)
        deleted = kmsctl("delete", "FIRST1")
        self.assertEqual(deleted.returncode, 0, deleted.stderr)
        self.assertEqual(self.store.entries(), [])
        usage = kmsctl("frobnicate")
        self.assertEqual(usage.returncode, 2)
