"""The store's free-space limits without a server: the pure decisions, the I/O helpers, `SpaceWatch`
with an injected clock and an injected statvfs, and what kmsctl and the start check say about them."""

from __future__ import annotations

import errno
import io
import os
import sqlite3
import sys
import threading
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from kms import ctl
from kms.config import load_config, runtime_problems
from kms.logs import Logs
from kms.store.space import (
    HARD,
    OK,
    SOFT,
    Mount,
    SpaceWatch,
    Throttle,
    Usage,
    crossing,
    crossing_message,
    disk_usage,
    find_mount,
    format_size,
    limit_message,
    next_state,
    out_of_space,
    parse_mountinfo,
    recovery_margin,
    space_state,
    sqlite_out_of_space,
    start_problem,
    tree_size,
)
from tests.support.server import TEST_STORE_LIMITS

MB = 1_000_000


class DecisionTests(TestCase):
    def test_space_state_boundaries(self) -> None:
        """Below means strictly less: exactly at a limit is still on the good side of it."""
        soft, hard = 10 * MB, 2 * MB
        cases = [
            (100 * MB, OK),
            (soft, OK),
            (soft - 1, SOFT),
            (hard, SOFT),
            (hard - 1, HARD),
            (0, HARD),
        ]
        for free, expected in cases:
            self.assertEqual(space_state(free, soft, hard), expected, free)

    def test_space_state_equal_limits(self) -> None:
        """soft_limit == hard_limit (allowed): there is no soft state, ok goes straight to hard."""
        self.assertEqual(space_state(5 * MB, 5 * MB, 5 * MB), OK)
        self.assertEqual(space_state(5 * MB - 1, 5 * MB, 5 * MB), HARD)

    def test_crossing_table(self) -> None:
        """One event per change of state, none while it stays; the first check reports only trouble."""
        table = {
            (None, OK): None,
            (None, SOFT): "store-space-low",
            (None, HARD): "store-full",
            (OK, OK): None,
            (OK, SOFT): "store-space-low",
            (OK, HARD): "store-full",
            (SOFT, SOFT): None,
            (SOFT, HARD): "store-full",
            (SOFT, OK): "store-space-ok",
            (HARD, HARD): None,
            (HARD, SOFT): "store-space-recovered",
            (HARD, OK): "store-space-ok",
        }
        for (before, after), expected in table.items():
            self.assertEqual(crossing(before, after), expected, (before, after))

    def test_recovery_margin(self) -> None:
        """1% of the limit, never less than 1 MB."""
        cases = [(0, MB), (20_000, MB), (100 * MB, MB), (101 * MB, 1_010_000), (10**9, 10 * MB)]
        for limit, margin in cases:
            self.assertEqual(recovery_margin(limit), margin, limit)

    def test_next_state_hysteresis(self) -> None:
        """Worse at once; better only at limit + margin (soft 10 MB + 1 MB, hard 2 MB + 1 MB)."""
        soft, hard = 10 * MB, 2 * MB
        table = [
            (None, 2 * MB, SOFT),  # the first check: no history, plain limits
            (None, 10 * MB, OK),
            (OK, 10 * MB - 1, SOFT),  # down: at once
            (OK, 2 * MB - 1, HARD),
            (SOFT, 2 * MB - 1, HARD),
            (HARD, 2 * MB, HARD),  # back over the hard limit, not over its margin
            (HARD, 3 * MB - 1, HARD),
            (HARD, 3 * MB, SOFT),
            (HARD, 11 * MB - 1, SOFT),  # over the soft limit, not its margin: only as far as soft
            (HARD, 11 * MB, OK),
            (SOFT, 10 * MB, SOFT),
            (SOFT, 11 * MB - 1, SOFT),
            (SOFT, 11 * MB, OK),
            (SOFT, 5 * MB, SOFT),
            (OK, 10 * MB, OK),
        ]
        for before, free, expected in table:
            self.assertEqual(next_state(before, free, soft, hard), expected, (before, free))

    def test_next_state_close_limits(self) -> None:
        """Limits closer than the margin: a state is never left for a worse one on the way up,
        and equal limits (no soft state) go from hard to ok past the one margin."""
        self.assertEqual(next_state(SOFT, 2_600_000, 2_500_000, 2 * MB), SOFT)
        self.assertEqual(next_state(HARD, 5_500_000, 5 * MB, 5 * MB), HARD)
        self.assertEqual(next_state(HARD, 6 * MB, 5 * MB, 5 * MB), OK)

    def test_throttle(self) -> None:
        """The first occurrence is reported, then one per interval with the count left out meanwhile."""
        clock = Clock()
        throttle = Throttle(clock, 300)
        self.assertEqual(throttle.due(), 0)
        seen = []
        for _ in range(5):
            clock.advance(50)
            seen.append(throttle.due())
        self.assertEqual(seen, [None] * 5)
        clock.advance(50)  # 300 s after the first report
        self.assertEqual(throttle.due(), 5)
        clock.advance(299)
        self.assertIsNone(throttle.due())
        clock.advance(1)
        self.assertEqual(throttle.due(), 1)

    def test_format_size(self) -> None:
        cases = [
            (0, "0 B"),
            (999, "999 B"),
            (1000, "1.0 KB"),
            (1_500_000, "1.5 MB"),
            (100 * MB, "100.0 MB"),
            (2 * 10**9, "2.0 GB"),
            (3 * 10**12, "3.0 TB"),
            (7 * 10**15, "7.0 PB"),
        ]
        for size, text in cases:
            self.assertEqual(format_size(size), text)

    def test_messages(self) -> None:
        """The line names the key, the path, what is free and the limit; stop mode says it stops."""
        path = Path("/srv/kms")
        refuse = limit_message(path, 1_500_000, 100 * MB, True, "refuse")
        self.assertEqual(
            refuse,
            "store.hard_limit: 1.5 MB free on the file system of /srv/kms, below 100.0 MB; "
            "new mail is refused until space is freed",
        )
        stop = limit_message(path, 1_500_000, 100 * MB, True, "stop")
        self.assertIn('hard_limit_action = "stop": kms stops and does not start until space is freed', stop)
        soft = limit_message(path, 500 * MB, 10**9, False, "stop")
        self.assertEqual(soft, "store.soft_limit: 500.0 MB free on the file system of /srv/kms, below 1.0 GB")
        self.assertEqual(crossing_message("store-full", path, 1_500_000, 10**9, 100 * MB, "refuse"), refuse)
        recovered = crossing_message("store-space-recovered", path, 0, 1, 1, "refuse")
        self.assertIn("above store.hard_limit again; new mail is accepted", recovered)
        ok = crossing_message("store-space-ok", path, 0, 1, 1, "refuse")
        self.assertIn("above store.soft_limit again", ok)

    def test_out_of_space(self) -> None:
        self.assertTrue(out_of_space(OSError(errno.ENOSPC, "full")))
        self.assertTrue(out_of_space(OSError(errno.EDQUOT, "quota")))
        self.assertFalse(out_of_space(OSError(errno.EIO, "io")))
        self.assertFalse(out_of_space(ValueError("no")))

    def test_sqlite_out_of_space(self) -> None:
        """SQLITE_FULL and SQLITE_IOERR (with extended codes) count; a locked or corrupt file does not."""
        def error(code: int) -> sqlite3.Error:
            e = sqlite3.OperationalError("x")
            e.sqlite_errorcode = code  # type: ignore[attr-defined]
            return e

        self.assertTrue(sqlite_out_of_space(error(sqlite3.SQLITE_FULL)))
        self.assertTrue(sqlite_out_of_space(error(sqlite3.SQLITE_IOERR_SHMSIZE)))
        self.assertTrue(sqlite_out_of_space(OSError(errno.ENOSPC, "full")))
        self.assertFalse(sqlite_out_of_space(error(sqlite3.SQLITE_BUSY)))
        self.assertFalse(sqlite_out_of_space(error(sqlite3.SQLITE_CORRUPT)))
        self.assertFalse(sqlite_out_of_space(sqlite3.OperationalError("no code")))
        self.assertFalse(sqlite_out_of_space(ValueError("no")))


MOUNTINFO = (
    "22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "40 22 0:35 / /srv/mail\\040store rw,nosuid - tmpfs tmpfs rw,size=8192k\n"
    "41 22 252:0 /data /srv/mailbox rw master:1 propagate_from:2 - ext4 /dev/vda rw\n"
    "garbage line without separator\n"
    "42 22 0:36 / /srv/mail\\040store rw - tmpfs other rw\n"
)


class MountTests(TestCase):
    def test_parse_mountinfo(self) -> None:
        """Optional tag fields and octal escapes are handled; malformed lines are skipped."""
        mounts = parse_mountinfo(MOUNTINFO)
        self.assertEqual(
            mounts,
            [
                Mount("252:0", "/", "ext4", "/dev/vda"),
                Mount("0:35", "/srv/mail store", "tmpfs", "tmpfs"),
                Mount("252:0", "/srv/mailbox", "ext4", "/dev/vda"),
                Mount("0:36", "/srv/mail store", "tmpfs", "other"),
            ],
        )

    def test_find_mount(self) -> None:
        """The deepest mount point of the same device above the path, matched on whole components."""
        mounts = parse_mountinfo(MOUNTINFO)
        root_device = os.makedev(252, 0)
        self.assertEqual(find_mount(mounts, root_device, "/srv/mailbox/x").point, "/srv/mailbox")  # type: ignore[union-attr]
        # /srv/mailboxes is not under /srv/mailbox: the root file system holds it
        self.assertEqual(find_mount(mounts, root_device, "/srv/mailboxes").point, "/")  # type: ignore[union-attr]
        self.assertEqual(find_mount(mounts, os.makedev(0, 36), "/srv/mail store/a").source, "other")  # type: ignore[union-attr]
        self.assertIsNone(find_mount(mounts, os.makedev(9, 9), "/srv/mailbox"))


class DiskTests(TestCase):
    def test_tree_size_counts_hard_links_once(self) -> None:
        """Like du: allocated blocks, a hard-linked file (IMAP COPY) once, symlinks not followed."""
        root = Path(self.mktemp())
        (root / "a" / "b").mkdir(parents=True)
        big = root / "a" / "b" / "big"
        big.write_bytes(os.urandom(64 * 1024))
        os.link(big, root / "a" / "copy")
        outside = Path(self.mktemp())
        outside.mkdir()
        (outside / "huge").write_bytes(os.urandom(256 * 1024))
        os.symlink(outside, root / "link")
        single = tree_size(root)
        assert single is not None
        blocks = os.stat(big).st_blocks * 512
        self.assertGreaterEqual(blocks, 64 * 1024)
        self.assertGreaterEqual(single, blocks)
        self.assertLess(single, 2 * blocks)  # the link did not count twice, the symlink not at all
        self.assertIsNone(tree_size(root / "absent"))

    def test_disk_usage_of_missing_store_is_its_parent(self) -> None:
        """A store not created yet is measured on the file system it will be created on."""
        parent = Path(self.mktemp())
        parent.mkdir()
        usage = disk_usage(parent / "not" / "yet")
        st = os.statvfs(parent)
        self.assertEqual(usage.total, st.f_blocks * st.f_frsize)
        self.assertGreater(usage.free, 0)

    def test_start_problem(self) -> None:
        """Only stop mode refuses a start, and only below the hard limit."""
        path = Path(self.mktemp())
        huge = 10**20  # more than any disk: always below
        problem = start_problem(path, huge, huge, "stop")
        assert problem is not None
        self.assertTrue(problem.startswith("store.hard_limit: "))
        self.assertIn('hard_limit_action = "stop"', problem)
        self.assertIsNone(start_problem(path, huge, huge, "refuse"))
        self.assertIsNone(start_problem(path, huge, 1, "stop"))


class FakeDisk:
    """The statvfs the watch is given: free space set by the test; counts calls; can hang."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.calls = 0
        self.gate: threading.Event | None = None
        self.entered = threading.Event()  # a call has taken its snapshot
        self.error: OSError | None = None

    def __call__(self, path: Path) -> Usage:
        self.calls += 1
        free, error = self.free, self.error  # what the disk held when the call started
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        if error is not None:
            raise error
        return Usage(free=free, total=100 * MB)


class WatchTests(TestCase):
    timeout = 30
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.logs = Logs(self.dir / "logs")
        self.addCleanup(self.logs.close)
        self.clock = Clock()
        self.disk = FakeDisk(50 * MB)
        self.stops = 0

    def watch(self, action: str = "refuse") -> SpaceWatch:
        def stop() -> None:
            self.stops += 1

        watch = SpaceWatch(
            self.dir,
            10 * MB,
            2 * MB,
            action,
            self.logs,
            reactor,
            clock=self.clock,
            interval=10,
            timeout=30,
            probe=self.disk,
            stop=stop,
        )
        self.addCleanup(watch.stopService)  # ends its thread
        return watch

    def error_lines(self) -> list[str]:
        return (self.dir / "logs" / "error.log").read_text().splitlines()

    @inlineCallbacks
    def test_once_per_crossing(self):  # type: ignore[no-untyped-def]
        """Each crossing writes one error.log line with its level; staying below writes nothing."""
        watch = self.watch()
        steps = [
            (50 * MB, OK),
            (5 * MB, SOFT),
            (4 * MB, SOFT),
            (1 * MB, HARD),
            (0, HARD),
            (3 * MB, SOFT),
            (20 * MB, OK),
            (20 * MB, OK),
        ]
        for free, expected in steps:
            self.disk.free = free
            state = yield watch.check_now()
            self.assertEqual((state, watch.state), (expected, expected))
            self.assertEqual(watch.refusing, expected == HARD)
        self.assertEqual(watch.usage, Usage(20 * MB, 100 * MB))
        events = [line.split()[4:6] for line in self.error_lines()]
        self.assertEqual(
            events,
            [
                ["store-space-low", "level=warning"],
                ["store-full", "level=critical"],
                ["store-space-recovered", "level=notice"],
                ["store-space-ok", "level=notice"],
            ],
        )
        full = self.error_lines()[1]
        self.assertIn(f"free=1000000 soft_limit={10 * MB} hard_limit={2 * MB}", full)
        self.assertIn("new mail is refused until space is freed", full)
        self.assertEqual(self.stops, 0)

    @inlineCallbacks
    def test_hovering_at_a_limit_logs_once(self):  # type: ignore[no-untyped-def]
        """Free space going up and down around the hard limit (2 MB) by less than the margin: one
        store-full line, mail refused until 3 MB are free; then one store-space-recovered."""
        watch = self.watch()
        for free in (5 * MB, 1_900_000, 2_100_000, 1_950_000, 2_900_000, 1_990_000, 2_999_999):
            self.disk.free = free
            self.assertEqual((yield watch.check_now()), HARD if free < 5 * MB else SOFT, free)
            self.assertEqual(watch.refusing, free < 5 * MB)
        self.disk.free = 3 * MB
        self.assertEqual((yield watch.check_now()), SOFT)
        self.assertFalse(watch.refusing)
        events = [line.split()[4] for line in self.error_lines()]
        self.assertEqual(events, ["store-space-low", "store-full", "store-space-recovered"])

    @inlineCallbacks
    def test_room(self):  # type: ignore[no-untyped-def]
        """room() passes in the soft state and fails with ENOSPC in the hard one, after a fresh check."""
        watch = self.watch()
        self.disk.free = 5 * MB
        yield watch.room()
        self.disk.free = 1 * MB
        error = yield self.assertFailure(watch.room(), OSError)
        self.assertEqual(error.errno, errno.ENOSPC)
        self.assertEqual(self.disk.calls, 2)

    @inlineCallbacks
    def test_periodic_checks(self):  # type: ignore[no-untyped-def]
        """The service checks at start and every interval; the state is there for the hot path.

        Each ``check_now`` here queues behind a check already running, or runs alone when none
        is: the statvfs count tells whether the service started one meanwhile.
        """
        watch = self.watch()
        self.assertEqual(watch.state, OK)  # before any answer: not refusing
        self.disk.free = 1 * MB
        watch.startService()
        yield watch.check_now()
        self.assertEqual((self.disk.calls, watch.state), (2, HARD))
        self.clock.advance(9)
        yield watch.check_now()
        self.assertEqual(self.disk.calls, 3)  # no periodic check before the interval
        self.disk.free = 50 * MB
        self.clock.advance(1)
        yield watch.check_now()
        self.assertEqual((self.disk.calls, watch.state), (5, OK))

    @inlineCallbacks
    def test_concurrent_callers_share_statvfs(self):  # type: ignore[no-untyped-def]
        """Callers arriving while a statvfs runs wait for the next one, which serves them all."""
        watch = self.watch()
        self.disk.gate = threading.Event()
        first = watch.check_now()
        later = [watch.check_now() for _ in range(5)]
        self.assertTrue(self.disk.entered.wait(10))  # the statvfs thread is inside the first call
        self.disk.free = 1 * MB
        self.disk.gate.set()
        self.assertEqual((yield first), OK)
        states = []
        for d in later:
            states.append((yield d))
        self.assertEqual(states, [HARD] * 5)
        self.assertEqual(self.disk.calls, 2)

    @inlineCallbacks
    def test_callers_calling_again_from_their_callback(self):  # type: ignore[no-untyped-def]
        """A caller whose callback checks again (the next message of a session) is served, and so
        is everyone already waiting: no caller is dropped, whatever the order of events."""
        watch = self.watch()
        self.disk.gate = threading.Event()
        first = watch.check_now()
        queued = watch.check_now()
        again: list[Deferred[str]] = []

        def next_message(state: str) -> str:
            again.append(watch.check_now())
            return state

        first.addCallback(next_message)
        self.disk.gate.set()
        self.assertEqual((yield first), OK)
        self.assertEqual((yield queued), OK)
        self.assertEqual((yield again[0]), OK)
        self.assertEqual(self.disk.calls, 3)

    @inlineCallbacks
    def test_hung_file_system(self):  # type: ignore[no-untyped-def]
        """A statvfs that does not answer: callers get the last state after the timeout, the error
        log says so once, later callers are answered at once; the answer, when it comes, counts."""
        watch = self.watch()
        self.disk.free = 5 * MB
        yield watch.check_now()
        self.disk.entered.clear()
        self.disk.gate = threading.Event()
        self.addCleanup(self.disk.gate.set)
        self.disk.free = 1 * MB  # what the hung call will eventually report
        waiting = watch.check_now()
        self.assertFalse(waiting.called)
        self.clock.advance(30)
        self.assertEqual((yield waiting), SOFT)
        self.assertEqual((yield watch.check_now()), SOFT)
        self.assertEqual((yield watch.check_now()), SOFT)
        hung = [line for line in self.error_lines() if "store-space-check-hung" in line]
        self.assertEqual(len(hung), 1)
        self.assertTrue(self.disk.entered.wait(10))  # the thread may pick the call up only now
        self.assertEqual(self.disk.calls, 2)
        self.disk.gate.set()
        for _ in range(1000):  # the late answer arrives through the reactor
            if watch.state == HARD:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.disk.gate = None
        self.assertEqual((yield watch.check_now()), HARD)

    @inlineCallbacks
    def test_failing_statvfs_reported_once(self):  # type: ignore[no-untyped-def]
        """An error keeps the last state and is logged once until a check succeeds again."""
        watch = self.watch()
        self.disk.free = 1 * MB
        yield watch.check_now()
        self.disk.error = OSError(errno.EIO, "I/O error")
        self.assertEqual((yield watch.check_now()), HARD)
        self.assertEqual((yield watch.check_now()), HARD)
        failed = [line for line in self.error_lines() if "store-space-check-failed" in line]
        self.assertEqual(len(failed), 1)
        self.assertIn('error="[Errno 5] I/O error"', failed[0])

    @inlineCallbacks
    def test_stop_mode_stops_once(self):  # type: ignore[no-untyped-def]
        """hard_limit_action = "stop": the first hard check stops the server, and only that one."""
        watch = self.watch("stop")
        self.disk.free = 5 * MB
        yield watch.check_now()
        self.assertEqual(self.stops, 0)
        self.assertFalse(watch.stopped_server)
        self.disk.free = 1 * MB
        yield watch.check_now()
        yield watch.check_now()
        self.assertEqual(self.stops, 1)
        self.assertTrue(watch.stopped_server)  # twistd's exit status
        [full] = [line for line in self.error_lines() if "store-full" in line]
        self.assertIn('hard_limit_action = \\"stop\\": kms stops', full)


class ConfigAndCtlTests(TestCase):
    def config(self, store: str) -> Path:
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / "kms.toml"
        path.write_text(
            '[server]\nhostname = "x.test"\n[domains]\nlocal = ["example.test"]\n'
            f'[store]\npath = "store"\n{store}'
        )
        return path

    def run_ctl(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = ctl.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_stop_mode_below_hard_limit_cannot_start(self) -> None:
        """runtime_problems (what twistd and check-config print) refuses a stop-mode start below the limit."""
        huge = 9 * 10**18  # more than any disk, and a TOML integer
        limits = f"soft_limit = {huge}\nhard_limit = {huge}\n"
        stop = load_config(self.config(limits + 'hard_limit_action = "stop"\n'))
        [problem] = runtime_problems(stop)
        self.assertEqual(problem, start_problem(stop.store.path, huge, huge, "stop"))
        refuse = load_config(self.config(limits))
        self.assertEqual(runtime_problems(refuse), [])

    def test_every_kmsctl_run_warns_below_soft_limit(self) -> None:
        """One warning line on stderr, whatever the verb; the exit code is the verb's."""
        path = self.config(f"soft_limit = {9 * 10**18}\n")
        code, out, err = self.run_ctl("--config", str(path), "user", "list")
        self.assertEqual(code, 0)
        self.assertIn("ADDRESS", out)
        [line] = err.splitlines()
        self.assertTrue(line.startswith("kmsctl: warning: store.soft_limit: "), line)
        code, _, err = self.run_ctl("--config", str(path), "user", "show", "nobody@example.test")
        self.assertEqual(code, 1)
        self.assertEqual(err.splitlines()[0], line)
        self.assertIn("no such user", err)
        code, _, err = self.run_ctl("--config", str(self.config(TEST_STORE_LIMITS)), "user", "list")
        self.assertEqual((code, err), (0, ""))

    def test_store_status(self) -> None:
        """Path, file system, free/total, limits, state and the usage of mail, queue and logs."""
        path = self.config('soft_limit = "2GB"\nhard_limit = "1GB"\n')
        store = path.parent / "store"
        (store / "mail" / "example.test" / "a" / "cur").mkdir(parents=True)
        (store / "mail" / "example.test" / "a" / "cur" / "m").write_bytes(b"x" * 100_000)
        code, out, _ = self.run_ctl("--config", str(path), "store", "status")
        self.assertEqual(code, 0)
        fields = dict(line.split(":", 1) for line in out.splitlines())
        self.assertEqual(fields["path"].strip(), str(store.absolute()))
        self.assertIn(" on ", fields["filesystem"])
        usage = disk_usage(store)
        self.assertIn(f"of {usage.total} bytes", fields["free"])
        self.assertEqual(fields["soft_limit"].strip(), "2.0 GB")
        self.assertEqual(fields["hard_limit"].strip(), "1.0 GB (hard_limit_action = refuse)")
        self.assertEqual(fields["state"].strip(), space_state(usage.free, 2 * 10**9, 10**9))
        self.assertRegex(fields["mailboxes"].strip(), r"^1\d\d\.\d KB \(")
        self.assertEqual(fields["queue"].strip(), f"absent ({store.absolute() / 'queue'})")
        self.assertIn("absent", fields["logs"])
