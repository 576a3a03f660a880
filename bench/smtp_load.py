"""SMTP load: the real ``twistd kms`` in a child process, an asyncio load generator in this one.

Twenty concurrent sessions send 4 KiB messages to local mailboxes (fsync on, every 250 durable),
first with a new connection per message, then with pipelined sessions that send many messages per
connection (MAIL, RCPT and DATA in one write).  Prints one line per figure.  Also samples the
server's resident memory while one 50 MB message streams in, to show it stays flat.

    python bench/smtp_load.py [--messages 3000] [--sessions 20] [--dir var/bench]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from fsync_ceiling import ceiling  # noqa: E402 (this folder)

from kms.config import load_config  # noqa: E402
from tests.support.server import TwistdProcess, add_user, free_port, write_config  # noqa: E402

USERS = 20


def message(n: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return b"Subject: bench %d\r\nFrom: <load@remote.test>\r\n\r\n" % n + line * 52


async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            if not line.startswith(code):
                raise RuntimeError(f"expected {code!r}, got {line!r}")
            return


async def transaction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    """MAIL, RCPT and DATA pipelined (RFC 2920), then the body and its end marker."""
    rcpt = f"user{n % USERS}@example.test".encode()
    writer.write(b"MAIL FROM:<load@remote.test>\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n")
    await expect(reader, b"250")
    await expect(reader, b"250")
    await expect(reader, b"354")
    writer.write(message(n) + b".\r\n")
    await expect(reader, b"250")


async def open_session(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await expect(reader, b"220")
    writer.write(b"EHLO load.remote.test\r\n")
    await expect(reader, b"250")
    return reader, writer


async def close_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"QUIT\r\n")
    await expect(reader, b"221")
    writer.close()


async def run_load(port: int, total: int, sessions: int, per_connection: bool) -> float:
    counter = iter(range(total))

    async def worker() -> None:
        if per_connection:
            for n in counter:
                reader, writer = await open_session(port)
                await transaction(reader, writer, n)
                await close_session(reader, writer)
        else:
            reader, writer = await open_session(port)
            for n in counter:
                await transaction(reader, writer, n)
            await close_session(reader, writer)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(sessions)))
    return total / (time.perf_counter() - start)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def big_message(port: int, pid: int, size: int) -> tuple[int, int]:
    """Stream one message of ``size`` bytes; return RSS (KiB) before and the peak during."""
    reader, writer = await open_session(port)
    before = rss_kib(pid)
    peak = before
    writer.write(b"MAIL FROM:<load@remote.test> SIZE=%d\r\nRCPT TO:<user0@example.test>\r\nDATA\r\n" % size)
    await expect(reader, b"250")
    await expect(reader, b"250")
    await expect(reader, b"354")
    chunk = (b"y" * 998 + b"\r\n") * 64
    sent = 0
    while sent < size:
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)
        if sent % (len(chunk) * 64) == 0:
            peak = max(peak, rss_kib(pid))
    writer.write(b".\r\n")
    await expect(reader, b"250")
    peak = max(peak, rss_kib(pid))
    await close_session(reader, writer)
    return before, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--dir", type=Path, default=ROOT / "var" / "bench" / "smtp")
    parser.add_argument("--wrap", default="", help="command to run twistd under (e.g. eatmydata)")
    parser.add_argument(
        "--twistd-arg", action="append", default=[], help="extra twistd option (e.g. profiling)"
    )
    args = parser.parse_args()

    shutil.rmtree(args.dir, ignore_errors=True)
    port = free_port()
    path = write_config(args.dir, listeners={"smtp": f"tcp:{port}:interface=127.0.0.1"}, max_size="60MB")
    cfg = load_config(path)
    for i in range(USERS):
        add_user(cfg, f"user{i}@example.test", "bench password")
    server = TwistdProcess(path, port, wrap=args.wrap.split(), twistd_args=args.twistd_arg)
    try:
        server.wait_listening()
        limit = ceiling(args.dir / "ceiling", 5.0)
        shutil.rmtree(args.dir / "ceiling")
        print(f"maildir create ceiling in this run (4 writers, fsync per file): {limit:.0f} files/s")
        n = args.messages
        for per_connection, kind in ((True, "new connection per message"), (False, "pipelined sessions")):
            rate = asyncio.run(run_load(port, n, args.sessions, per_connection=per_connection))
            share = f"{rate / limit:.0%} of ceiling"
            print(f"SMTP {args.sessions} sessions, 4 KiB, {kind}, fsync: {rate:.0f} msg/s ({share})")
        stored = sum(
            len(os.listdir(cfg.store.path / "mail" / "example.test" / f"user{i}" / "new"))
            for i in range(USERS)
        )
        print(f"SMTP messages durable in new/ after both runs: {stored} of {2 * n}")
        before, peak = asyncio.run(big_message(port, server.proc.pid, 50_000_000))
        rss = f"{before // 1024} MiB before, {peak // 1024} MiB peak"
        print(f"SMTP server RSS streaming one 50 MB message: {rss}")
    finally:
        server.stop()
        shutil.rmtree(cfg.store.path / "mail", ignore_errors=True)


if __name__ == "__main__":
    main()
