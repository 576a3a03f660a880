"""How fast can this machine create fsync'd maildir files, and how close does MaildirWriter get?

    python bench/fsync_ceiling.py [--seconds 5] [--dir DIR] [--rounds 1] [--in-flight 20]

Measures on the filesystem that will hold the store (default: a fresh directory under ./var/bench),
4 KiB files, tmp -> write -> fsync -> rename into new/ -> fsync new/:
  * the ceiling: 4 threads, each doing the full sequence per file (no batching);
  * MaildirWriter with 4 workers (group commit), fed by ``--in-flight`` concurrent deliveries
    (20 matches the SMTP baseline's 20 sessions).
With several rounds the two alternate (the VM is noisy) and the median is printed.  Everything it
creates is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from twisted.internet import defer, task, threads  # noqa: E402

from kms.store.maildir import Copy, MaildirWriter, ensure_maildir  # noqa: E402
from kms.store.spool import MessageSpool  # noqa: E402

WORKERS = 4
FILE_SIZE = 4096


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ceiling(root: Path, seconds: float) -> float:
    """Files/s with WORKERS threads each doing create, write, fsync, rename, fsync(new/) per file."""
    ensure_maildir(root)
    payload = os.urandom(FILE_SIZE)
    counts = [0] * WORKERS
    deadline = time.monotonic() + seconds

    def run(worker: int) -> None:
        while time.monotonic() < deadline:
            name = f"{worker}.{counts[worker]}"
            fd = os.open(root / "tmp" / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, payload)
            os.fsync(fd)
            os.close(fd)
            os.rename(root / "tmp" / name, root / "new" / name)
            fsync_dir(root / "new")
            counts[worker] += 1

    start = time.monotonic()
    pool = [threading.Thread(target=run, args=(i,)) for i in range(WORKERS)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(counts) / (time.monotonic() - start)


async def group_commit(reactor: Any, root: Path, seconds: float, in_flight: int) -> float:
    """Files/s through MaildirWriter with ``in_flight`` deliveries kept outstanding."""
    await threads.deferToThread(ensure_maildir, root)
    header = b"X-Envelope-To: b@x\n"
    spool = MessageSpool(root.parent)
    spool.write(os.urandom(FILE_SIZE - len(header)))
    writer = MaildirWriter(reactor, workers=WORKERS)
    writer.start()
    done = 0
    deadline = time.monotonic() + seconds
    finished: defer.Deferred[None] = defer.Deferred()
    outstanding = 0

    def issue() -> None:
        nonlocal outstanding
        outstanding += 1
        writer.deliver([Copy(root, header, spool)]).addCallback(delivered)

    def delivered(_: object) -> None:
        nonlocal done, outstanding
        done += 1
        outstanding -= 1
        if time.monotonic() < deadline:
            issue()
        elif not outstanding:
            finished.callback(None)

    start = time.monotonic()
    for _ in range(in_flight):
        issue()
    await finished
    elapsed = time.monotonic() - start
    await writer.stop()
    spool.discard()
    return done / elapsed


async def main(reactor: Any, args: argparse.Namespace) -> None:
    if args.dir is None:
        base = Path("var/bench")
        base.mkdir(parents=True, exist_ok=True)
    else:
        base = args.dir
    workdir = Path(tempfile.mkdtemp(prefix="fsync-", dir=base))
    raw: list[float] = []
    grouped: list[float] = []
    try:
        for round_ in range(args.rounds):
            raw.append(await threads.deferToThread(ceiling, workdir / f"raw{round_}", args.seconds))
            grouped.append(await group_commit(reactor, workdir / f"mw{round_}", args.seconds, args.in_flight))
    finally:
        await threads.deferToThread(shutil.rmtree, workdir)
    print(f"maildir create ceiling, {WORKERS} writers, fsync per file: {statistics.median(raw):.0f} files/s")
    print(f"MaildirWriter group commit, {WORKERS} workers: {statistics.median(grouped):.0f} files/s")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    parser.add_argument("--dir", type=Path, help="parent of the scratch directory (default ./var/bench)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; the median is printed")
    parser.add_argument("--in-flight", type=int, default=20, help="concurrent deliveries for MaildirWriter")
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse_args(sys.argv[1:])
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, options)))
