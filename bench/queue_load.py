"""Outbound queue load: smtplib submits relayed mail to the real ``twistd kms``, which delivers it to sinks.

Three processes, so the load generator and the remote world stay off the server's CPU as far as two
cores allow: this one (the smtplib threads, the clock), the server, and a "remote world" child
(this script with ``--remote``: a twisted.names server on 127.0.0.1 answering MX and A for a few
destination domains, and SMTP sinks on 127.0.0.2 and 127.0.0.3 that count what arrives and keep
nothing).  The server relays for 127.0.0.1 and sends to the sinks' port (``[relay] mx_port``).

Per phase (local delivery first, as the reference; then 1, 10 and 100 recipients per message spread
over the domains), a few threads each keep one smtplib session and send their share of 4 KiB
messages.  Prints one line per figure: the SMTP acceptance rate (every 250 means the message is
fsync'd in the queue or in the mailboxes), the time from the first 250 until the sinks had every
recipient (outbound messages/s and recipients/s), and the server's CPU time (utime + stime from
/proc) per message over the phase, acceptance included.

    python bench/queue_load.py [--messages 2000] [--recipients 1,10,100] [--threads 4] [--domains 5]
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from kms.config import load_config  # noqa: E402
from tests.support.server import TwistdProcess, add_user, free_port, write_config  # noqa: E402

SENDER = "load@example.test"
LOCAL_RCPT = "bench@example.test"
MX_ADDRESSES = ("127.0.0.2", "127.0.0.3")
HELD_DOMAIN = "held.bench.test"  # its MX on 127.0.0.4 accepts connections and never greets
HELD_ADDRESS = "127.0.0.4"


def domain(i: int) -> str:
    return f"d{i}.bench.test"


def message(n: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return b"Subject: queue bench %d\r\nFrom: <%s>\r\n\r\n" % (n, SENDER.encode()) + line * 52


def recipients(n: int, count: int, domains: int) -> list[str]:
    """``count`` addresses for message ``n``, round robin over the domains (so ``min(count, domains)``
    deliveries per message)."""
    return [f"r{j}@{domain((n + j) % domains)}" for j in range(count)]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the remote world (child process) -----------------------------------------------------------------


def remote_world(domains: int) -> None:
    """DNS and sinks on this process's reactor; stdin takes ``expect <recipients>`` and ``count``.

    Answers one line ``tally <messages> <recipients> <last arrival, time.monotonic()>`` when the
    recipients counted since start reach the expected number, and at once to ``count``.
    """
    from twisted.internet import reactor, stdio
    from twisted.internet.protocol import Factory
    from twisted.protocols.basic import LineReceiver

    from tests.support.dnsserver import DNSTestServer
    from tests.support.smtpsink import SinkConfig, SinkProtocol

    tally = {"messages": 0, "recipients": 0, "last": 0.0, "expect": -1}

    def report() -> None:
        sys.stdout.write(f"tally {tally['messages']} {tally['recipients']} {tally['last']:.6f}\n")
        sys.stdout.flush()

    class CountingSink(SinkProtocol):
        """The test sink, counting each message as it is acknowledged and then forgetting it."""

        def _take_data(self) -> bool:
            done = super()._take_data()
            if done:
                _, rcpts, _ = self.session.messages.pop()
                self.session.data.clear()
                self.session.commands.clear()
                tally["messages"] += 1
                tally["recipients"] += len(rcpts)
                tally["last"] = time.monotonic()
                if tally["recipients"] == tally["expect"]:
                    report()
            return done

    class Control(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            verb, _, arg = line.decode().partition(" ")
            if verb == "expect":
                tally["expect"] = int(arg)
                if tally["recipients"] >= tally["expect"]:
                    report()
            elif verb == "count":
                report()

        def connectionLost(self, reason: Any = None) -> None:
            reactor.stop()  # type: ignore[attr-defined]

    dns = DNSTestServer()
    for i in range(domains):
        dns.add_mx(domain(i), 10, f"mx.{domain(i)}")
        dns.add_a(f"mx.{domain(i)}", MX_ADDRESSES[i % len(MX_ADDRESSES)])
    dns.add_mx(HELD_DOMAIN, 10, f"mx.{HELD_DOMAIN}")
    dns.add_a(f"mx.{HELD_DOMAIN}", HELD_ADDRESS)
    dns.start(reactor)
    config = SinkConfig()
    sessions: list[Any] = []
    open_: set[Any] = set()

    def sink() -> CountingSink:
        if len(sessions) > 1000:  # one per connection; the counts live in ``tally``
            del sessions[:]
        return CountingSink(config, sessions, open_)

    factory = Factory.forProtocol(sink)
    port = reactor.listenTCP(0, factory, interface=MX_ADDRESSES[0]).getHost().port  # type: ignore[attr-defined]
    for address in MX_ADDRESSES[1:]:
        reactor.listenTCP(port, factory, interface=address)  # type: ignore[attr-defined]
    silent = SinkConfig(greeting=None)
    held = Factory.forProtocol(lambda: SinkProtocol(silent, [], set()))
    reactor.listenTCP(port, held, interface=HELD_ADDRESS)  # type: ignore[attr-defined]
    stdio.StandardIO(Control())
    sys.stdout.write(f"ready {dns.port} {port}\n")
    sys.stdout.flush()
    reactor.run()  # type: ignore[attr-defined]


class RemoteWorld:
    """The ``--remote`` child, driven over its stdin and stdout."""

    def __init__(self, domains: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--remote", "--domains", str(domains)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        ready = self._line(30).split()
        if ready[:1] != [b"ready"]:
            raise RuntimeError(f"remote world did not start: {ready!r}")
        self.dns_port, self.smtp_port = int(ready[1]), int(ready[2])

    def _line(self, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            return b""
        return self.proc.stdout.readline()

    def _send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_for(self, recipients: int, timeout: float) -> tuple[int, int, float, bool]:
        """(messages, recipients, last arrival, complete) once ``recipients`` arrived since start, or at
        the timeout (the counts so far, not complete)."""
        self._send(f"expect {recipients}")
        line = self._line(timeout)
        complete = bool(line)
        if not line:
            self._send("count")
            line = self._line(10)
        _, messages, got, last = line.split()
        return int(messages), int(got), float(last), complete

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- the load generator ---------------------------------------------------------------------------------


def submit(port: int, jobs: list[list[str]], threads: int) -> tuple[float, float, float]:
    """Send one message per job (its recipients) from ``threads`` smtplib sessions.

    Returns the monotonic times of the start, the first 250 and the last 250.
    """
    lock = threading.Lock()
    next_job = iter(range(len(jobs)))
    done: list[float] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
                while True:
                    with lock:
                        n = next(next_job, None)
                    if n is None:
                        return
                    refused = smtp.sendmail(SENDER, jobs[n], message(n))
                    if refused:
                        raise RuntimeError(f"refused: {refused}")
                    done.append(time.monotonic())
        except BaseException as e:  # reported by the caller; the other threads go on
            errors.append(e)

    start = time.monotonic()
    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} sessions failed, first: {errors[0]!r}")
    return start, min(done), max(done)


def wait_empty(queue: Path, timeout: float) -> bool:
    """True once the queue folder holds no envelope (the runner settled every entry)."""
    deadline = time.monotonic() + timeout
    while any(name.endswith(".json") for name in os.listdir(queue)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000, help="local reference and enqueue-only phases")
    parser.add_argument(
        "--phases", default="1:1000,10:300,100:50", help="relay phases, recipients per message:messages"
    )
    parser.add_argument("--threads", type=int, default=4, help="smtplib sessions submitting at once")
    parser.add_argument("--domains", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=60, help="longest wait for one phase's deliveries")
    parser.add_argument("--dir", type=Path, default=ROOT / "var" / "bench" / "queue")
    parser.add_argument("--remote", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.remote:
        remote_world(args.domains)
        return

    shutil.rmtree(args.dir, ignore_errors=True)
    remote = RemoteWorld(args.domains)
    port = free_port()
    path = write_config(
        args.dir,
        local='["127.0.0.1"]',
        listeners={"smtp": f"tcp:{port}:interface=127.0.0.1"},
        extra=f'[dns]\nservers = ["127.0.0.1:{remote.dns_port}"]\ntimeout = "5s"\n',
    )
    path.write_text(path.read_text().replace("[relay]\n", f"[relay]\nmx_port = {remote.smtp_port}\n", 1))
    cfg = load_config(path)
    add_user(cfg, LOCAL_RCPT, "bench password")
    server = TwistdProcess(path, port)
    failed = False
    try:
        server.wait_listening()
        pid = server.proc.pid
        n = args.messages
        cpu = cpu_seconds(pid)
        start, _, last = submit(port, [[LOCAL_RCPT]] * n, args.threads)
        local_rate = n / (last - start)
        per_msg = (cpu_seconds(pid) - cpu) / n * 1000
        print(f"queue bench, local delivery reference, {args.threads} smtplib sessions, 4 KiB, fsync: "
              f"{local_rate:.0f} msg/s accepted, server CPU {per_msg:.2f} ms/msg")
        expected = 0
        for phase in args.phases.split(","):
            count, total = (int(x) for x in phase.split(":"))
            jobs = [recipients(i, count, args.domains) for i in range(total)]
            expected += total * count
            cpu = cpu_seconds(pid)
            start, first, last = submit(port, jobs, args.threads)
            accepted = total / (last - start)
            messages, got, arrival, complete = remote.wait_for(expected, args.timeout)
            settled = wait_empty(cfg.store.path / "queue", args.timeout)
            per_msg = (cpu_seconds(pid) - cpu) / total * 1000
            what = f"queue bench, {total} msgs x {count} rcpt over {min(count, args.domains)} domain(s)"
            print(f"{what}: {accepted:.0f} msg/s accepted ({accepted / local_rate:.0%} of local delivery)")
            if not (complete and settled):
                failed = True
                print(f"{what}: INCOMPLETE after {args.timeout:.0f} s: {got} of {expected} recipients "
                      f"at the sinks so far, queue {'empty' if settled else 'not empty'}")
                continue
            elapsed = arrival - first
            print(f"{what}: first 250 -> last at a sink {elapsed:.2f} s: {total / elapsed:.0f} msg/s, "
                  f"{total * count / elapsed:.0f} rcpt/s out")
            print(f"{what}: server CPU {per_msg:.2f} ms/msg ({per_msg / count * 1000:.0f} us/rcpt), "
                  f"acceptance included")
        cpu = cpu_seconds(pid)
        start, _, last = submit(port, [[f"r{i}@{HELD_DOMAIN}"] for i in range(n)], args.threads)
        held_rate = n / (last - start)
        per_msg = (cpu_seconds(pid) - cpu) / n * 1000
        print(f"queue bench, {n} msgs x 1 rcpt, delivery stalled (enqueue only): {held_rate:.0f} msg/s "
              f"accepted ({held_rate / local_rate:.0%} of local delivery), server CPU {per_msg:.2f} ms/msg")
        own = sum(os.times()[:2])
        print(f"queue bench, CPU over the whole run: server {cpu_seconds(pid):.1f} s, remote world (DNS, "
              f"sinks) {cpu_seconds(remote.proc.pid):.1f} s, load generator {own:.1f} s")
    finally:
        server.stop()
        remote.stop()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
