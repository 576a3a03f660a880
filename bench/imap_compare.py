"""kms and a reference IMAP/POP3 server (e.g. Dovecot) side by side, in one sitting.

The reference figures in ``../shared/notes/performance-baseline.md`` were taken on another day;
this machine's noise moves figures by 2x between hours, so a claim "as fast as Dovecot" needs
both servers measured alternately, with the same client and the same messages.  This script
does that: the same figures as ``imap_load.py`` (stock ``imaplib``/``poplib``, Nagle on), round
by round, kms then the reference, and prints the median and range of each.

It does not start the reference server: run one on 127.0.0.1 with a user whose INBOX this
script may fill, e.g. Dovecot 2.3 with ``ssl = no``, ``disable_plaintext_auth = no``, a
passwd-file and ``mail_location = maildir:~/Maildir`` (docs/performance.md shows the config
used).  kms runs from a store that ``imap_load.py --keep`` filled (``--kms-dir``).  Not part of
``make bench`` (it needs the reference server).

    python bench/imap_compare.py --kms-dir var/bench/imap --size 10000 \\
        --ref-imap 14300 --ref-pop3 11000 --ref-user bench@example.test --ref-password 'bench password'
"""

from __future__ import annotations

import argparse
import imaplib
import poplib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imap_load import PASSWORD, SEARCH_FOR, Bench, check, cpu_ms, message  # noqa: E402

APPENDS = 500  # per round, into the full INBOX, expunged again afterwards


class Server:
    """Where one server listens, and (for kms) the process whose CPU time is read."""

    def __init__(self, name: str, imap: int, pop3: int, user: str, password: str, pid: int | None) -> None:
        self.name, self.imap_port, self.pop3_port = name, imap, pop3
        self.user, self.password, self.pid = user, password, pid

    def imap(self) -> imaplib.IMAP4:
        m = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=600)
        m.login(self.user, self.password)
        return m

    def pop3(self) -> poplib.POP3:
        p = poplib.POP3("127.0.0.1", self.pop3_port, timeout=600)
        p.user(self.user)
        p.pass_(self.password)
        return p


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return (time.perf_counter() - start) * 1000


def fill(server: Server, size: int) -> None:
    """APPEND until INBOX holds ``size`` messages (the reference server's first run)."""
    m = server.imap()
    have = int(check(m.select("INBOX"))[0])
    m.close()
    for n in range(have, size):
        check(m.append("INBOX", None, None, message(n)))
    m.logout()


def measure(server: Server, size: int) -> dict[str, float]:
    """One round of every figure on ``server`` (ms; APPEND in messages per second)."""
    out: dict[str, float] = {}
    m = server.imap()
    out["SELECT, first in a session"] = timed(lambda: check(m.select("INBOX")))
    out["SELECT warm"] = statistics.median(timed(lambda: check(m.select("INBOX"))) for _ in range(3))
    out["UID FETCH 1:* (FLAGS)"] = timed(lambda: check(m.uid("FETCH", "1:*", "(FLAGS)")))
    out["FETCH 1:* header fields"] = timed(
        lambda: check(m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT FROM DATE)])"))
    )
    out["FETCH 1:* (ENVELOPE)"] = timed(lambda: check(m.fetch("1:*", "(ENVELOPE)")))
    out[f"UID SEARCH FROM {SEARCH_FOR}"] = timed(lambda: check(m.uid("SEARCH", "FROM", SEARCH_FOR)))
    out["STORE 1:* +FLAGS (\\Seen)"] = timed(lambda: check(m.store("1:*", "+FLAGS", "(\\Seen)")))
    picks = ",".join(str(1 + i * size // 100) for i in range(100))
    bodies = [timed(lambda: check(m.fetch(picks, "(BODY.PEEK[])"))) for _ in range(5)]
    out["FETCH 100 full bodies (median of 5)"] = statistics.median(bodies)
    out["STORE 1:* -FLAGS (\\Seen)"] = timed(lambda: check(m.store("1:*", "-FLAGS", "(\\Seen)")))
    m.close()
    start = time.perf_counter()
    for n in range(APPENDS):
        check(m.append("INBOX", None, None, message(size + n)))
    out[f"APPEND {APPENDS} onto {size:,} (msg/s)"] = APPENDS / (time.perf_counter() - start)
    check(m.select("INBOX"))
    check(m.store(f"{size + 1}:*", "+FLAGS.SILENT", "(\\Deleted)"))
    check(m.expunge())
    m.logout()
    p: poplib.POP3 | None = None

    def login() -> None:
        nonlocal p
        p = server.pop3()
        p.stat()

    out["POP3 connect + USER/PASS + STAT"] = timed(login)
    assert p is not None
    out["POP3 UIDL"] = timed(p.uidl)
    out["POP3 100 RETR"] = timed(lambda: [p.retr(1 + i * size // 100) for i in range(100)])  # type: ignore[union-attr]
    p.quit()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kms-dir", type=Path, default=Path("var/bench/imap"))
    parser.add_argument("--size", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ref-name", default="Dovecot")
    parser.add_argument("--ref-imap", type=int, required=True)
    parser.add_argument("--ref-pop3", type=int, required=True)
    parser.add_argument("--ref-user", required=True)
    parser.add_argument("--ref-password", required=True)
    args = parser.parse_args()
    kms = Bench(argparse.Namespace(dir=args.kms_dir, wrap="", twistd_arg=[], repeat=1, idle=0))
    reference = Server(args.ref_name, args.ref_imap, args.ref_pop3, args.ref_user, args.ref_password, None)
    fill(reference, args.size)
    results: dict[str, list[dict[str, float]]] = {"kms": [], args.ref_name: []}
    cpu: list[float] = []
    for _ in range(args.rounds):
        kms.start()  # a fresh process each round: its first SELECT loads the folder
        try:
            user = f"n{args.size}@example.test"
            ours = Server("kms", kms.imap_port, kms.pop3_port, user, PASSWORD, kms.pid)
            before = cpu_ms(kms.pid)
            results["kms"].append(measure(ours, args.size))
            cpu.append(cpu_ms(kms.pid) - before)
        finally:
            kms.stop()
        results[args.ref_name].append(measure(reference, args.size))
    print(f"{args.size:,} messages, {args.rounds} rounds alternating; median (min-max)")
    for figure in results["kms"][0]:
        cells = []
        for name, rounds in results.items():
            values = [r[figure] for r in rounds]
            cells.append(f"{name} {statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})")
        print(f"{figure}: " + " | ".join(cells), flush=True)
    print(f"kms server CPU per round: {', '.join(f'{c:,.0f} ms' for c in cpu)}")


if __name__ == "__main__":
    main()
