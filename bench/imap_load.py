"""IMAP and POP3 against the real ``twistd kms`` in a child process, with stock clients (Nagle on).

For each folder size N (default 10,000 and 100,000) one user's INBOX is filled with ~4 KiB
messages of varied From/Subject/Date, then timed with one stdlib ``imaplib``/``poplib`` client:
SELECT (cold: the first after a server start, and warm), ``UID FETCH 1:* (FLAGS)``, header
fields, ENVELOPE, ``UID SEARCH FROM``, ``STORE 1:* +FLAGS``, 100 full bodies, and POP3
login+STAT, UIDL and 100 RETR.

Filling: sizes up to ``--append-all`` are filled entirely by APPEND (the session has no folder
selected, as when a client saves to Sent); a larger folder gets all but the last
``--append-tail`` messages written into ``new/`` by this script before the server starts (the
server takes them in at the first SELECT, timed), and the rest by APPEND, so its APPEND rate is
measured at the full folder size.  Then ``--append-selected`` more APPENDs go into the folder the
session has selected (an EXISTS after each), and are expunged again.

Last, ``--idle`` raw-socket connections (Nagle on) log in, SELECT and IDLE on INBOXes of
``--idle-folder`` sizes; the server's resident memory per connection is printed, and the time
until every one of them hears EXISTS for one APPEND from another session.  The soft ``ulimit -n``
is raised first if needed (the server inherits it).

Each figure is one line; the Dovecot / stock Twisted reference from the baseline note (same
machine class, same clients) follows in parentheses where one exists.  Times are wall clock at the
client (including imaplib's own parsing); "server CPU" is the server's CPU time over the same
interval, summed over its threads from /proc (nanoseconds; 10 ms ticks where schedstat is
absent).  The default run takes about four minutes.

    python bench/imap_load.py [--sizes 10000,100000] [--append-all 10000] [--append-tail 1000]
        [--append-selected 200] [--idle 1000] [--idle-folder 10,10000] [--repeat 3]
        [--dir var/bench/imap] [--wrap CMD] [--twistd-arg ARG] [--keep] [--reuse]

``--keep`` leaves the filled store in ``--dir``; ``--reuse`` then skips filling the folders it
finds there and measures the reads again on a fresh server (STORE ``-FLAGS`` puts every folder
back as it was, so repeated runs rename the same files).
"""

from __future__ import annotations

import argparse
import email.utils
import imaplib
import os
import poplib
import random
import resource
import selectors
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from kms.config import load_config  # noqa: E402
from kms.store.maildir import mailbox_path  # noqa: E402
from tests.support.server import TwistdProcess, add_user, free_port, write_config  # noqa: E402

PASSWORD = "bench password"
SENDERS = [
    "Alice Archer", "Bob Baker", "Carol Chandler", "Dave Dawson", "Erin Evans", "Frank Fischer",
    "Grace Gordon", "Heidi Hansen", "Ivan Ivanov", "Judy Jensen", "Mallory Moss", "Niaj Nolan",
    "Olivia Ortiz", "Peggy Parker", "Rupert Reed", "Sybil Stone", "Trent Turner", "Victor Vance",
    "Walter White", "Zoe Zimmer",
]  # fmt: skip
SEARCH_FOR = "carol"  # one sender in twenty: UID SEARCH FROM matches ~5 %
WORDS = (
    "quarterly report meeting budget invoice travel release review draft schedule offer "
    "contract update question reminder minutes proposal feedback summary agenda"
).split()
TICK = os.sysconf("SC_CLK_TCK")

# Reference figures from /work/shared/notes/performance-baseline.md, by operation and folder size.
REFERENCE: dict[str, dict[int, str]] = {
    "append": {1000: "Dovecot 333/s", 10000: "Dovecot 153/s, stock Twisted 989/s in memory",
               100000: "stock Twisted 917/s"},
    "select": {1000: "Dovecot 3.0 ms", 10000: "Dovecot 23.6 ms, stock Twisted 0.5 ms in memory",
               100000: "stock Twisted 2.4 ms"},
    "flags": {1000: "Dovecot 7.4 ms", 10000: "Dovecot 90 ms, stock Twisted 942 ms",
              100000: "stock Twisted 9.3 s"},
    "headers": {1000: "Dovecot 12.8 ms", 10000: "Dovecot 148 ms, stock Twisted 1,370 ms",
                100000: "stock Twisted 13.7 s"},
    "search": {1000: "Dovecot 5.6 ms", 10000: "Dovecot 53 ms, stock Twisted 237 ms",
               100000: "stock Twisted 7.5 s"},
    "bodies": {1000: "Dovecot 3.2 ms", 10000: "Dovecot 3.4 ms, stock Twisted 8.2 ms",
               100000: "stock Twisted 9.0 ms"},
    "store": {1000: "Dovecot 33 ms", 10000: "Dovecot 277 ms, stock Twisted 93 ms",
              100000: "stock Twisted 1.2 s"},
    "pop3login": {1000: "Dovecot 21.7 ms", 10000: "Dovecot 56.2 ms, stock Twisted 11.8 ms",
                  100000: "stock Twisted 117 ms"},
    "uidl": {1000: "Dovecot 3.1 ms", 10000: "Dovecot 25.9 ms, stock Twisted 24.3 ms",
             100000: "stock Twisted 215 ms"},
}  # fmt: skip


# --- messages -------------------------------------------------------------------------------------


def message(n: int) -> bytes:
    """Message ``n``: ~4 KiB, its sender, subject and date drawn from ``n`` (the same every run)."""
    rng = random.Random(n)
    name = SENDERS[n % len(SENDERS)]
    address = name.split()[0].lower() + "@remote.test"
    when = 1_700_000_000 + n * 300 + rng.randrange(300)
    subject = f"{rng.choice(WORDS).capitalize()} {rng.choice(WORDS)} #{n}"
    head = (
        f"Return-Path: <{address}>\r\n"
        f"From: {name} <{address}>\r\n"
        "To: Bench User <bench@example.test>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {email.utils.formatdate(when)}\r\n"
        f"Message-ID: <{n}.{when}@remote.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    lines = []
    size = len(head)
    while size < 4000:
        line = " ".join(rng.choice(WORDS) for _ in range(11)).encode() + b"\r\n"
        lines.append(line)
        size += len(line)
    return head + b"".join(lines)


def prefill(maildir: Path, first: int, count: int) -> None:
    """Write messages ``first .. first+count-1`` into ``new/`` as a delivery agent would (no fsync)."""
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    base = int(time.time()) - count
    for i in range(count):
        data = message(first + i)
        name = f"{base + i}.M{i % 1_000_000}P{os.getpid()}Q{i}.{host},S={len(data)}"
        with open(maildir / "new" / name, "wb") as f:
            f.write(data)


# --- measuring ------------------------------------------------------------------------------------


def cpu_ms(pid: int) -> float:
    """The process's CPU time so far: the sum of its threads' run time in nanoseconds
    (``/proc/<pid>/task/*/schedstat``), or utime+stime in clock ticks (10 ms) without it.
    Threads that exited are not counted: the server's thread pools keep theirs."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except FileNotFoundError:  # the thread ended meanwhile
                continue
    except OSError:
        total = 0
    if total:
        return total / 1e6
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / TICK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fmt_ms(ms: float) -> str:
    return f"{ms / 1000:.2f} s" if ms >= 10_000 else f"{ms:,.1f} ms" if ms < 100 else f"{ms:,.0f} ms"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir: Path = args.dir
        self.imap_port = free_port()
        self.pop3_port = free_port()
        listeners = {
            "imap": f"tcp:{self.imap_port}:interface=127.0.0.1",
            "pop3": f"tcp:{self.pop3_port}:interface=127.0.0.1",
        }
        # The IDLE figure holds --idle connections from 127.0.0.1: above the default limits.
        room = max(args.idle, 0) + 100
        limits = f"\n[limits]\nmax_connections = {max(room, 2000)}\nmax_connections_per_ip = {room}\n"
        self.config_path = write_config(self.dir, listeners=listeners, max_size="60MB", extra=limits)
        self.cfg = load_config(self.config_path)
        self.server: TwistdProcess | None = None
        self.done: set[int] = set()  # folder sizes measured
        self._first: float | None = None  # a first run much slower than the median, for report()

    # -- the server

    def start(self) -> None:
        self.server = TwistdProcess(
            self.config_path, self.imap_port, wrap=self.args.wrap.split(), twistd_args=self.args.twistd_arg
        )
        self.server.wait_listening()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def pid(self) -> int:
        assert self.server is not None
        return self.server.proc.pid

    def timed(self, work: Callable[[], object]) -> tuple[float, float, object]:
        """(wall ms, server CPU ms, result) of one call."""
        cpu = cpu_ms(self.pid)
        start = time.perf_counter()
        result = work()
        wall = (time.perf_counter() - start) * 1000
        return wall, cpu_ms(self.pid) - cpu, result

    def repeated(self, work: Callable[[], object]) -> tuple[float, float, object]:
        """Median wall and server-CPU ms over ``--repeat`` calls; the last result."""
        runs = [self.timed(work) for _ in range(self.args.repeat)]
        wall = statistics.median(r[0] for r in runs)
        if runs[0][0] > 1.5 * wall + 5:  # the first run paid for something the others reused
            self._first = runs[0][0]
        return wall, statistics.median(r[1] for r in runs), runs[-1][2]

    def report(self, size: int, what: str, wall: float, cpu: float | None, ref: str = "") -> None:
        extra = [] if cpu is None else [f"server CPU {fmt_ms(cpu)}"]
        if self._first is not None:
            extra.insert(0, f"median of {self.args.repeat}, first run {fmt_ms(self._first)}")
            self._first = None
        if ref and size in REFERENCE.get(ref, {}):
            extra.append(REFERENCE[ref][size])
        tail = f" ({'; '.join(extra)})" if extra else ""
        print(f"IMAP {size} msgs: {what}: {fmt_ms(wall)}{tail}", flush=True)

    # -- clients

    def imap(self, user: str) -> imaplib.IMAP4:
        m = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=600)
        m.login(user, PASSWORD)
        return m

    def pop3(self, user: str) -> poplib.POP3:
        p = poplib.POP3("127.0.0.1", self.pop3_port, timeout=600)
        p.user(user)
        p.pass_(PASSWORD)
        return p

    # -- one folder size

    def run_size(self, size: int) -> None:
        user = f"n{size}@example.test"
        maildir = mailbox_path(self.cfg.store.path / "mail", user)
        if self.args.reuse and (maildir / "kms-uidlist").exists():
            print(f"IMAP {size} msgs: reusing the folder filled by an earlier --keep run", flush=True)
            self.read_all(user, size, maildir)
            return
        add_user(self.cfg, user, PASSWORD)
        appended = size if size <= self.args.append_all else min(self.args.append_tail, size)
        written = size - appended
        if written:
            start = time.perf_counter()
            prefill(maildir, 0, written)
            seconds = time.perf_counter() - start
            print(
                f"IMAP {size} msgs: {written} messages written into new/ by the script, not by APPEND "
                f"({written / seconds:,.0f} files/s)",
                flush=True,
            )

        self.start()
        try:
            if written:
                m = self.imap(user)
                wall, cpu, _ = self.timed(lambda: check(m.select("INBOX")))
                print(
                    f"IMAP {size} msgs: first SELECT taking in {written} files from new/ "
                    f"(read, analysed, moved to cur/, indexed): {wall / 1000:.1f} s "
                    f"({written / wall * 1000:,.0f} msg/s; server CPU {cpu / 1000:.1f} s)",
                    flush=True,
                )
                m.logout()
            m = self.imap(user)  # APPEND as a mail client's "save to Sent" does: folder not selected
            self.append(m, size, written)
            if self.args.append_selected:
                self.append_selected(m, size, self.args.append_selected)
            m.logout()
        finally:
            self.stop()

        self.read_all(user, size, maildir)

    def read_all(self, user: str, size: int, maildir: Path) -> None:
        """The read figures, each phase on a fresh server: "cold" SELECT is the first after a start
        (the index loaded from ``kms-index``).  The first cold SELECT follows changes to ``cur/``
        (APPEND, or the last run's STORE), so it lists ``cur/``; the second finds ``cur/`` as that
        load left it and skips the listing (`kms.store.index.directory_stamp`: only a ``cur/``
        unchanged for two seconds is trusted, hence the wait)."""
        settled = os.stat(maildir / "cur").st_mtime + 2.1 - time.time()
        if settled > 0:
            time.sleep(settled)
        self.start()
        try:
            m = self.imap(user)
            wall, cpu, _ = self.timed(lambda: check(m.select("INBOX")))
            self.report(size, "SELECT cold, cur/ changed since the last load (listed)", wall, cpu)
            m.logout()
        finally:
            self.stop()
        self.start()
        try:
            self.reads(user, size)
            self.pop3_reads(user, size)
        finally:
            self.stop()
        self.done.add(size)

    def append(self, m: imaplib.IMAP4, size: int, first: int) -> None:
        count = size - first
        step = 1000
        marks = [time.perf_counter()]
        cpu = cpu_ms(self.pid)
        for n in range(first, size):
            check(m.append("INBOX", None, None, message(n)))
            if (n - first + 1) % step == 0 or n == size - 1:
                marks.append(time.perf_counter())
        cpu = cpu_ms(self.pid) - cpu
        total = marks[-1] - marks[0]
        windows = [
            min(step, count - i * step) / (b - a)
            for i, (a, b) in enumerate(zip(marks, marks[1:], strict=False))
        ]
        ref = REFERENCE["append"].get(size, "")
        at = f" onto {first:,} messages" if first else ""
        print(
            f"IMAP {size} msgs: APPEND {count:,} msgs{at}, one imaplib client: {count / total:,.0f} msg/s "
            f"(server CPU {cpu / count:.2f} ms/msg{'; ' + ref if ref else ''})",
            flush=True,
        )
        if len(windows) > 1:
            print(
                f"IMAP {size} msgs: APPEND first 1,000: {windows[0]:,.0f} msg/s, last 1,000: "
                f"{windows[-1]:,.0f} msg/s",
                flush=True,
            )
        print(
            f"IMAP {size} msgs: APPEND msg/s per 1,000: " + " ".join(f"{w:.0f}" for w in windows),
            flush=True,
        )

    def append_selected(self, m: imaplib.IMAP4, size: int, count: int) -> None:
        """APPEND into the folder this session has selected (each reply brings EXISTS), then
        expunge those messages again so the read figures see exactly ``size`` messages."""
        check(m.select("INBOX"))
        uidnext = int(m.response("UIDNEXT")[1][0])  # type: ignore[index]
        cpu = cpu_ms(self.pid)
        start = time.perf_counter()
        for i in range(count):
            check(m.append("INBOX", None, None, message(size + i)))
        seconds = time.perf_counter() - start
        cpu = cpu_ms(self.pid) - cpu
        print(
            f"IMAP {size} msgs: APPEND {count} msgs into the selected folder (EXISTS after each): "
            f"{count / seconds:,.0f} msg/s (server CPU {cpu / count:.2f} ms/msg)",
            flush=True,
        )
        check(m.uid("STORE", f"{uidnext}:*", "+FLAGS.SILENT", "(\\Deleted)"))
        check(m.uid("EXPUNGE", f"{uidnext}:*"))
        check(m.close())

    def reads(self, user: str, size: int) -> None:
        m = self.imap(user)
        time.sleep(0.2)
        rss = [rss_kib(self.pid)]
        wall, cpu, _ = self.timed(lambda: check(m.select("INBOX")))
        self.report(size, "SELECT cold, cur/ unchanged since the last load (not listed)", wall, cpu)
        rss.append(rss_kib(self.pid))
        m.close()
        wall, cpu, _ = self.repeated(lambda: check(m.select("INBOX")))
        self.report(size, "SELECT warm", wall, cpu, "select")

        wall, cpu, data = self.repeated(lambda: check(m.uid("FETCH", "1:*", "(FLAGS)")))
        assert isinstance(data, list) and len(data) == size, len(data)  # type: ignore[arg-type]
        self.report(size, "UID FETCH 1:* (FLAGS)", wall, cpu, "flags")

        wall, cpu, data = self.repeated(
            lambda: check(m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT FROM DATE)])"))
        )
        assert isinstance(data, list) and len(data) == 2 * size, len(data)  # type: ignore[arg-type]
        self.report(size, "FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT FROM DATE)])", wall, cpu, "headers")

        wall, cpu, data = self.repeated(lambda: check(m.fetch("1:*", "(ENVELOPE)")))
        assert isinstance(data, list) and len(data) == size, len(data)  # type: ignore[arg-type]
        self.report(size, "FETCH 1:* (ENVELOPE)", wall, cpu)
        wall, cpu, data = self.repeated(lambda: check(m.uid("SEARCH", "SUBJECT", "report")))
        self.report(size, "UID SEARCH SUBJECT report", wall, cpu)
        rss.append(rss_kib(self.pid))
        print(
            f"IMAP {size} msgs: server RSS {rss[0] / 1024:.0f} MiB before the cold SELECT, "
            f"+{(rss[1] - rss[0]) * 1024 / size:,.0f} bytes per message after it, "
            f"+{(rss[2] - rss[0]) * 1024 / size:,.0f} after FETCH ENVELOPE and SEARCH SUBJECT",
            flush=True,
        )

        wall, cpu, data = self.repeated(lambda: check(m.uid("SEARCH", "FROM", SEARCH_FOR)))
        found = len(data[0].split())  # type: ignore[index]
        expected = len(range(SENDERS.index("Carol Chandler"), size, len(SENDERS)))
        assert found == expected, (found, expected)
        self.report(size, f"UID SEARCH FROM {SEARCH_FOR} ({found:,} hits)", wall, cpu, "search")

        wall, cpu, data = self.timed(lambda: check(m.store("1:*", "+FLAGS", "(\\Seen)")))
        assert isinstance(data, list) and len(data) == size, len(data)
        self.report(size, "STORE 1:* +FLAGS (\\Seen) (every file renamed)", wall, cpu, "store")

        picks = ",".join(str(1 + i * size // 100) for i in range(100))
        wall, cpu, data = self.repeated(lambda: check(m.fetch(picks, "(BODY.PEEK[])")))
        assert isinstance(data, list) and len(data) == 200, len(data)  # type: ignore[arg-type]
        self.report(size, "FETCH 100 full bodies (BODY.PEEK[], spread over the folder)", wall, cpu, "bodies")

        # Back as it was, so that a --reuse run measures the same renames.
        wall, cpu, data = self.timed(lambda: check(m.store("1:*", "-FLAGS", "(\\Seen)")))
        assert isinstance(data, list) and len(data) == size, len(data)
        self.report(size, "STORE 1:* -FLAGS (\\Seen) (every file renamed back)", wall, cpu)
        m.logout()
        print(
            f"IMAP {size} msgs: server RSS after the IMAP figures: {rss_kib(self.pid) / 1024:.0f} MiB",
            flush=True,
        )

    def pop3_reads(self, user: str, size: int) -> None:
        def login() -> poplib.POP3:
            p = self.pop3(user)
            count, _ = p.stat()
            assert count == size, count
            return p

        runs = []
        for _ in range(self.args.repeat):
            wall, cpu, p = self.timed(login)
            runs.append((wall, cpu))
            p.quit()  # type: ignore[attr-defined]
            time.sleep(0.05)  # the maildrop lock is released when the server sees the QUIT
        self.report(
            size, "POP3 connect + USER/PASS + STAT", statistics.median(r[0] for r in runs),
            statistics.median(r[1] for r in runs), "pop3login",
        )  # fmt: skip
        p = self.pop3(user)
        wall, cpu, listing = self.repeated(p.uidl)
        assert len(listing[1]) == size  # type: ignore[index]
        self.report(size, "POP3 UIDL", wall, cpu, "uidl")

        def retr() -> None:
            for i in range(100):
                p.retr(1 + i * size // 100)

        wall, cpu, _ = self.repeated(retr)
        self.report(size, "POP3 100 RETR (one at a time)", wall, cpu)
        p.quit()

    # -- idle connections

    def run_idle(self, count: int, folder_size: int) -> None:
        user = f"n{folder_size}@example.test"  # the folder of that size measured above, if any
        if folder_size not in self.done:
            user = f"idle{folder_size}@example.test"
            add_user(self.cfg, user, PASSWORD)
            prefill(mailbox_path(self.cfg.store.path / "mail", user), 0, folder_size)
        raise_fd_limit(count + 100)  # before the server starts: it inherits the limit
        self.start()
        conns: list[socket.socket] = []
        try:
            m = self.imap(user)  # take the files in and load the folder once, outside the figure
            check(m.select("INBOX"))
            m.logout()
            time.sleep(0.5)
            before = rss_kib(self.pid)
            start = time.perf_counter()
            # A few at a time: each LOGIN costs the server one PBKDF2 in its auth thread pool.
            with ThreadPoolExecutor(4) as pool:
                conns.extend(pool.map(lambda _: idle_connection(self.imap_port, user), range(count)))
            opened = time.perf_counter() - start
            time.sleep(1.0)
            after = rss_kib(self.pid)
            per = (after - before) / count
            print(
                f"IMAP {count} connections in IDLE on a {folder_size:,}-message INBOX: server RSS "
                f"{before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after = {per:.1f} KiB per "
                f"connection (opened in {opened:.1f} s, {count / opened:,.0f} logins+SELECT+IDLE/s)",
                flush=True,
            )
            m = self.imap(user)
            cpu = cpu_ms(self.pid)
            start = time.perf_counter()
            check(m.append("INBOX", None, None, message(folder_size)))
            appended = time.perf_counter() - start
            first, last = wait_for_all(conns, b" EXISTS\r\n", start, 300)
            cpu = cpu_ms(self.pid) - cpu
            m.logout()
            print(
                f"IMAP {count} connections in IDLE on a {folder_size:,}-message INBOX, one APPEND from "
                f"another session: tagged OK after {appended * 1000:,.0f} ms; from the APPEND's start, "
                f"EXISTS at the first IDLE client after {first * 1000:,.0f} ms, at all {count} after "
                f"{last * 1000:,.0f} ms (server CPU {cpu:,.0f} ms)",
                flush=True,
            )
            for s in conns:
                s.sendall(b"DONE\r\nz LOGOUT\r\n")
        finally:
            for s in conns:
                s.close()
            self.stop()


def check(result: tuple[str, list]) -> list:  # type: ignore[type-arg]
    typ, data = result
    if typ != "OK":
        raise RuntimeError(f"{typ}: {data!r}")
    return data


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < needed:
            raise SystemExit(f"ulimit -n: hard limit {hard} is below the {needed} files needed")


def read_until(f: socket.socket, buf: bytearray, marker: bytes) -> None:
    while marker not in buf:
        chunk = f.recv(65536)
        if not chunk:
            raise ConnectionError(f"server closed the connection waiting for {marker!r}: {bytes(buf)!r}")
        buf += chunk


def wait_for_all(
    conns: list[socket.socket], marker: bytes, start: float, timeout: float
) -> tuple[float, float]:
    """Seconds from ``start`` until the first and the last socket received ``marker``."""
    waiting = {s.fileno(): (s, bytearray()) for s in conns}
    first = 0.0
    with selectors.DefaultSelector() as sel:
        for s in conns:
            sel.register(s, selectors.EVENT_READ)
        while waiting:
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"{len(waiting)} IDLE clients heard nothing in {timeout} s")
            for key, _ in sel.select(1.0):
                s, buf = waiting[key.fd]
                buf += s.recv(65536)
                if marker in buf:
                    first = first or time.perf_counter() - start
                    sel.unregister(s)
                    del waiting[key.fd]
    return first, time.perf_counter() - start


def idle_connection(port: int, user: str) -> socket.socket:
    """A plain socket (Nagle on) logged in, with INBOX selected, in IDLE."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    buf = bytearray()
    read_until(s, buf, b"\r\n")
    steps = [
        (f'a LOGIN "{user}" "{PASSWORD}"\r\n'.encode(), b"\r\na OK"),
        (b"b SELECT INBOX\r\n", b"\r\nb OK"),
        (b"c IDLE\r\n", b"\r\n+ "),
    ]
    for command, marker in steps:
        s.sendall(command)
        read_until(s, buf, marker)
    return s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="folder sizes, comma-separated")
    parser.add_argument(
        "--append-all", type=int, default=10000, help="fill folders up to this size by APPEND"
    )
    parser.add_argument(
        "--append-tail", type=int, default=1000, help="APPENDed onto a larger prefilled folder"
    )
    parser.add_argument(
        "--append-selected", type=int, default=200, help="APPENDs into the selected folder (0: skip)"
    )
    parser.add_argument("--idle", type=int, default=1000, help="connections held in IDLE (0: skip)")
    parser.add_argument("--idle-folder", default="10,10000", help="INBOX sizes for the IDLE figure")
    parser.add_argument("--repeat", type=int, default=3, help="runs per read-only figure (median)")
    parser.add_argument("--dir", type=Path, default=ROOT / "var" / "bench" / "imap")
    parser.add_argument("--wrap", default="", help="command to run twistd under (e.g. eatmydata)")
    parser.add_argument(
        "--twistd-arg", action="append", default=[], help="extra twistd option (e.g. profiling)"
    )
    parser.add_argument("--keep", action="store_true", help="leave the filled store in --dir")
    parser.add_argument(
        "--reuse", action="store_true", help="skip filling folders an earlier --keep run left (reads only)"
    )
    args = parser.parse_args()

    if not args.reuse:
        shutil.rmtree(args.dir, ignore_errors=True)
    began = time.perf_counter()
    bench = Bench(args)
    try:
        for size in (int(s) for s in args.sizes.split(",") if s):
            bench.run_size(size)
        if args.idle:
            for folder_size in (int(s) for s in args.idle_folder.split(",") if s):
                bench.run_idle(args.idle, folder_size)
    finally:
        bench.stop()
        if not args.keep:
            shutil.rmtree(args.dir / "store" / "mail", ignore_errors=True)
    print(f"IMAP/POP3 bench took {time.perf_counter() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
