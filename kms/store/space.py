"""Free space of the store's file system: the soft and hard limits of SPEC §8.

The decisions are pure (`space_state`, `next_state`, `crossing`, the messages); the I/O is
`disk_usage` (one statvfs), `filesystem_of` and `tree_size` (for ``kmsctl store status``);
`SpaceWatch` is the service that checks every few seconds and before each message.  Its statvfs
runs on a daemon thread of its own: a hung network file system then holds that thread, never the
reactor, and never shutdown (a thread pool joins its threads when it stops).  The thread lives as
long as the service: one started per check would cost four times the CPU of the hop.  `Throttle`
keeps an error that a full disk makes repeat (every login's lockout record) to a line now and then.
"""

from __future__ import annotations

import errno
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from kms.logs import Logs

OK, SOFT, HARD = "ok", "soft", "hard"

# error.log level of each crossing: one line when the state changes, none while it stays.
LEVELS = {
    "store-full": "critical",
    "store-space-low": "warning",
    "store-space-recovered": "notice",
    "store-space-ok": "notice",
}

# --- pure decisions ------------------------------------------------------------------------------


def space_state(free: int, soft: int, hard: int) -> str:
    """``"hard"`` below the hard limit, ``"soft"`` below the soft one, else ``"ok"`` (below = less than)."""
    if free < hard:
        return HARD
    if free < soft:
        return SOFT
    return OK


_RANK = {OK: 0, SOFT: 1, HARD: 2}
MIN_MARGIN = 1_000_000  # 1 MB: below this the way back up would follow every file written and removed


def recovery_margin(limit: int) -> int:
    """How far above ``limit`` free space must climb before the state below it ends: 1% of the
    limit, at least 1 MB.  Without it, free space hovering at a limit logs every crossing."""
    return max(limit // 100, MIN_MARGIN)


def next_state(before: str | None, free: int, soft: int, hard: int) -> str:
    """The state after a check that found ``free`` bytes, with hysteresis: a worse state is
    entered at once, a better one only at ``limit + recovery_margin(limit)`` or more."""
    now = space_state(free, soft, hard)
    if before is None or _RANK[now] >= _RANK[before]:
        return now
    recovered = space_state(free, soft + recovery_margin(soft), hard + recovery_margin(hard))
    return recovered if _RANK[recovered] < _RANK[before] else before


def crossing(before: str | None, after: str) -> str | None:
    """The error-log event for a change of state (``before`` None: the first check), or None.

    One line per crossing, not per check: a store that stays low is reported once.
    """
    if after == before:
        return None
    if after == HARD:
        return "store-full"
    if after == SOFT:
        return "store-space-low" if before in (None, OK) else "store-space-recovered"
    return None if before is None else "store-space-ok"


def out_of_space(error: BaseException) -> bool:
    """A write failed because the file system (or the user's disk quota) is full."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def sqlite_out_of_space(error: BaseException) -> bool:
    """An SQLite write failed for want of disk space: SQLITE_FULL, or the I/O error SQLite reports
    when it cannot grow its WAL index (SQLITE_IOERR_SHMSIZE) on a full file system."""
    if out_of_space(error):
        return True
    if not isinstance(error, sqlite3.Error):
        return False
    return (getattr(error, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)


def format_size(size: int) -> str:
    """Decimal units, like the config's sizes: 1,500,000 → ``1.5 MB``."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} PB"


def limit_message(path: Path, free: int, limit: int, hard: bool, action: str) -> str:
    """Below a limit, in the admin's words (error.log, twistd's refusal to start, every kmsctl run)."""
    key = "store.hard_limit" if hard else "store.soft_limit"
    text = f"{key}: {format_size(free)} free on the file system of {path}, below {format_size(limit)}"
    if not hard:
        return text
    if action == "stop":
        return text + '; hard_limit_action = "stop": kms stops and does not start until space is freed'
    return text + "; new mail is refused until space is freed"


def crossing_message(event: str, path: Path, free: int, soft: int, hard: int, action: str) -> str:
    """The ``detail`` of a crossing's error-log line."""
    if event == "store-full":
        return limit_message(path, free, hard, True, action)
    if event == "store-space-low":
        return limit_message(path, free, soft, False, action)
    above = "store.hard_limit" if event == "store-space-recovered" else "store.soft_limit"
    text = f"{format_size(free)} free on the file system of {path}, above {above} again"
    return text + ("; new mail is accepted, but space is still low" if above == "store.hard_limit" else "")


# --- I/O ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    free: int  # bytes the server may still use (f_bavail: without the blocks reserved for root)
    total: int


def disk_usage(path: Path) -> Usage:
    """statvfs of ``path``, or of its nearest existing parent (a store not created yet). Blocking."""
    target = path
    while True:
        try:
            st = os.statvfs(target)
        except FileNotFoundError:
            if target.parent == target:
                raise
            target = target.parent
        else:
            return Usage(free=st.f_bavail * st.f_frsize, total=st.f_blocks * st.f_frsize)


def start_problem(path: Path, soft: int, hard: int, action: str) -> str | None:
    """With ``hard_limit_action = "stop"``, a start below the hard limit is refused with this line."""
    if action != "stop":
        return None
    try:
        usage = disk_usage(path)
    except OSError:
        return None  # an unreadable path is reported by the checks that need it
    if space_state(usage.free, soft, hard) != HARD:
        return None
    return limit_message(path, usage.free, hard, True, action)


@dataclass(frozen=True)
class Mount:
    device: str  # "major:minor"
    point: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    r"""mountinfo spells space, tab, newline and backslash as ``\040``-style octal escapes."""
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field


def parse_mountinfo(text: str) -> list[Mount]:
    """``/proc/self/mountinfo`` (proc(5)): id parent major:minor root point options [tags] - type source."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(" "), right.split(" ")
        if not sep or len(fields) < 6 or len(tail) < 2:
            continue
        mounts.append(Mount(fields[2], _unescape(fields[4]), _unescape(tail[0]), _unescape(tail[1])))
    return mounts


def find_mount(mounts: list[Mount], device: int, path: str) -> Mount | None:
    """The mount holding ``path`` on ``device``: the deepest mount point above it (bind mounts share
    a device; the last mount of a point hides the earlier ones)."""
    wanted = f"{os.major(device)}:{os.minor(device)}"
    best: Mount | None = None
    for mount in mounts:
        point = mount.point.rstrip("/") + "/"
        if mount.device == wanted and (path + "/").startswith(point):
            if best is None or len(mount.point) >= len(best.point):
                best = mount
    return best


def filesystem_of(path: Path) -> Mount | None:
    """Where the store lives (Linux; None elsewhere or when it cannot be told). Blocking."""
    target = path
    while not target.exists() and target.parent != target:
        target = target.parent
    try:
        device = os.stat(target).st_dev
        text = Path("/proc/self/mountinfo").read_text(errors="replace")
    except OSError:
        return None
    return find_mount(parse_mountinfo(text), device, os.path.realpath(target))


def tree_size(path: Path) -> int | None:
    """Bytes a tree occupies on disk (like ``du``: allocated blocks, hard links once, symlinks not
    followed); None if it does not exist. Blocking; files vanishing meanwhile are skipped."""
    try:
        total = os.lstat(path).st_blocks * 512
    except FileNotFoundError:
        return None
    seen: set[tuple[int, int]] = set()
    directories = [path]
    while directories:
        try:
            entries = os.scandir(directories.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir:
                    directories.append(Path(entry.path))
                elif st.st_nlink > 1:
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


class Throttle:
    """At most one report per ``interval`` seconds of something that repeats (a full disk fails
    every login's bookkeeping), saying how often it happened meanwhile."""

    def __init__(self, clock: IReactorTime, interval: float) -> None:
        self._clock = clock
        self._interval = interval
        self._last: float | None = None
        self._held = 0

    def due(self) -> int | None:
        """Count one occurrence: None to keep quiet, else report it now, with this many earlier
        ones that were left out since the last report."""
        now = self._clock.seconds()
        if self._last is not None and now - self._last < self._interval:
            self._held += 1
            return None
        self._last, held, self._held = now, self._held, 0
        return held


# --- the service --------------------------------------------------------------------------------


class SpaceWatch(Service):
    """The store's space state, current to within ``interval`` seconds, and fresh on `check_now`.

    ``state`` is synchronous for the hot path (SMTP MAIL); `check_now` is the check before a
    message is accepted.  Concurrent callers share statvfs calls: at most one runs, and callers
    arriving meanwhile wait for the next one (the running one may have started before their event).
    Crossings go to error.log once each; the way back up needs a margin (`next_state`).  At the
    hard limit with ``action = "stop"`` the server stops (``stop``, the reactor's by default) and
    ``stopped_server`` says so (twistd's exit status); with ``"refuse"`` it goes on and recovers
    by itself.
    """

    def __init__(
        self,
        path: Path,
        soft: int,
        hard: int,
        action: str,
        logs: Logs,
        reactor: Any,
        *,
        clock: IReactorTime | None = None,
        interval: float = 10.0,
        timeout: float = 30.0,
        probe: Callable[[Path], Usage] = disk_usage,
        stop: Callable[[], object] | None = None,
    ) -> None:
        self.setName("space-watch")
        self.path = path
        self.soft = soft
        self.hard = hard
        self.action = action
        self.usage: Usage | None = None
        self._logs = logs
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._interval = interval
        self._timeout = timeout
        self._probe = probe
        self._stop = stop if stop is not None else reactor.stop
        self._known: str | None = None  # None until the first check answered
        self._waiters: list[Deferred[str]] = []  # served by the running statvfs
        self._queued: list[Deferred[str]] = []  # served by the next one
        self._probing = False
        self._hang: IDelayedCall | None = None
        self._hung = False
        self._failing = False
        self.stopped_server = False  # stop mode stopped the server: twistd must exit non-zero
        self._loop: LoopingCall | None = None
        self._requests: queue.SimpleQueue[bool] = queue.SimpleQueue()  # True: probe; False: end
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> str:
        """``"ok"``, ``"soft"`` or ``"hard"`` as of the last check (``"ok"`` before the first)."""
        return self._known or OK

    @property
    def refusing(self) -> bool:
        """New mail is refused: below the hard limit."""
        return self._known == HARD

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.check_now)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._hang is not None:
            self._hang.cancel()
            self._hang = None
        if self._thread is not None:
            self._requests.put(False)  # ends the thread once it is free (a hung one is a daemon)
            self._thread = None
        self._answer(self.state)

    def check_now(self) -> Deferred[str]:
        """The state after a statvfs started now; the last known state if the file system has not
        answered for ``timeout`` seconds (reported once in error.log)."""
        if self._hung:
            return succeed(self.state)
        d: Deferred[str] = Deferred()
        if self._probing:
            self._queued.append(d)
        else:
            self._waiters.append(d)
            self._start_probe()
        return d

    def room(self) -> Deferred[None]:
        """Before a new message is accepted: fails with ENOSPC below the hard limit, so callers
        answer as they do for a full disk (SMTP 452 4.3.1, IMAP NO [OVERQUOTA])."""

        def checked(state: str) -> None:
            if state == HARD:
                raise OSError(errno.ENOSPC, "the store is below store.hard_limit")

        return self.check_now().addCallback(checked)

    def _start_probe(self) -> None:
        self._probing = True
        self._hang = self._clock.callLater(self._timeout, self._not_answering)
        if self._thread is None:
            self._thread = threading.Thread(target=self._probe_loop, name="kms-space", daemon=True)
            self._thread.start()
        self._requests.put(True)

    def _probe_loop(self) -> None:
        while self._requests.get():
            try:
                result: Usage | Failure = self._probe(self.path)
            except Exception:
                result = Failure()
            self._reactor.callFromThread(self._probed, result)

    def _not_answering(self) -> None:
        self._hang = None
        self._hung = True
        self._logs.error("store-space-check-hung", level="error", path=str(self.path), seconds=self._timeout)
        self._answer(self.state)

    def _probed(self, result: Usage | Failure) -> None:
        self._probing = False
        self._hung = False
        if self._hang is not None:
            self._hang.cancel()
            self._hang = None
        if isinstance(result, Failure):
            if not self._failing:
                self._failing = True
                error = result.getErrorMessage()
                self._logs.error("store-space-check-failed", level="error", path=str(self.path), error=error)
        else:
            self._failing = False
            self._update(result)
        waiters, self._waiters = self._waiters, []
        if self._queued:  # before the callbacks, which may call check_now again
            self._waiters, self._queued = self._queued, []
            self._start_probe()
        for d in waiters:
            d.callback(self.state)

    def _answer(self, state: str) -> None:
        """Fire every waiting caller with ``state`` (the file system is not answering, or we stop)."""
        waiters, self._waiters, self._queued = self._waiters + self._queued, [], []
        for d in waiters:
            d.callback(state)

    def _update(self, usage: Usage) -> None:
        self.usage = usage
        after = next_state(self._known, usage.free, self.soft, self.hard)
        event = crossing(self._known, after)
        self._known = after
        if event is not None:
            self._logs.error(
                event,
                level=LEVELS[event],
                path=str(self.path),
                free=usage.free,
                soft_limit=self.soft,
                hard_limit=self.hard,
                detail=crossing_message(event, self.path, usage.free, self.soft, self.hard, self.action),
            )
        if after == HARD and self.action == "stop" and not self.stopped_server:
            self.stopped_server = True
            try:
                self._stop()
            except ReactorNotRunning:
                pass
