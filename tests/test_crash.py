"""Nothing acknowledged is ever lost: SIGKILL the real ``twistd kms`` while clients are sending.

Every message that got "250" must be in new/, complete; no file in new/ may be partial.  The server
runs as a child process exactly as an admin starts it; the clients are smtplib in threads.
"""

from __future__ import annotations

import signal
import smtplib
import threading
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from kms.config import load_config
from tests.support.server import TwistdProcess, add_user, free_port, write_config

BODY_LINES = 60  # ~4 KiB bodies


def body_for(ident: str) -> bytes:
    lines = [
        f"Subject: {ident}",
        "",
        *(f"{ident} line {i:03d} " + "x" * 50 for i in range(BODY_LINES)),
        f"END {ident}",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


class KillNineTests(TestCase):
    timeout = 120

    def test_acknowledged_messages_survive_sigkill(self) -> None:
        """Eight clients send for ~2 s, the server is SIGKILLed; every 250'd message is intact on disk."""
        directory = Path(self.mktemp()).absolute()
        port = free_port()
        path = write_config(directory, listeners={"smtp": f"tcp:{port}:interface=127.0.0.1"})
        cfg = load_config(path)
        add_user(cfg, "alice@example.test", "irrelevant password")
        server = TwistdProcess(path, port)
        self.addCleanup(lambda: server.proc.poll() is None and server.stop(signal.SIGKILL))
        server.wait_listening()

        acked: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def sender(worker: int) -> None:
            n = 0
            while not stop.is_set():
                ident = f"w{worker}-m{n}"
                n += 1
                try:
                    with smtplib.SMTP("127.0.0.1", port, timeout=5) as s:
                        s.sendmail("sender@remote.test", ["alice@example.test"], body_for(ident))
                except (OSError, smtplib.SMTPException):
                    if stop.is_set():
                        return
                    continue
                with lock:
                    acked.append(ident)

        threads = [threading.Thread(target=sender, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        server.stop(signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(10)

        new = cfg.store.path / "mail" / "example.test" / "alice" / "new"
        stored: dict[str, bytes] = {}
        for f in new.iterdir():
            data = f.read_bytes()
            ident = data.split(b"Subject: ", 1)[1].split(b"\n", 1)[0].decode()
            expected = body_for(ident).replace(b"\r\n", b"\n")
            self.assertTrue(data.endswith(expected), f"{f.name} is partial or altered")
            self.assertIn(f",S={len(data)}", f.name)
            stored[ident] = data
        self.assertGreater(len(acked), 20, "too few messages were sent to prove anything")
        missing = [i for i in acked if i not in stored]
        self.assertEqual(missing, [], f"{len(missing)} acknowledged messages lost")
