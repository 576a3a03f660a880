"""``twistd kms`` as an admin runs it: refusing a bad config, log rotation on SIGHUP, clean stop."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from kms.config import load_config
from tests.support.server import TwistdProcess, add_user, free_port, write_config


def run_twistd(path: Path) -> subprocess.CompletedProcess[str]:
    """Start ``twistd -n kms`` and wait for it to end (it should refuse to start)."""
    twistd = Path(sys.executable).parent / "twistd"
    command = [str(twistd), "--nodaemon", "--pidfile=", "kms", "--config", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=path.parent)


class TwistdTests(TestCase):
    timeout = 60

    def test_bad_config_refused_with_every_problem(self) -> None:
        """A start with a broken file exits non-zero and prints one line per problem, naming the key."""
        directory = Path(self.mktemp()).absolute()
        path = write_config(directory, extra='[lockout]\nattempts = "five"\ncolour = "red"\n')
        result = run_twistd(path)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("kms: lockout.attempts: must be an integer", result.stderr)
        self.assertIn("kms: lockout.colour: unknown key", result.stderr)

    def test_missing_certificate_refused(self) -> None:
        """A valid file whose certificate does not exist stops the start with the key named."""
        directory = Path(self.mktemp()).absolute()
        path = write_config(directory)
        (directory / "tls" / "server.pem").unlink()
        result = run_twistd(path)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("kms: tls.certificate:", result.stderr)

    def test_sighup_reopens_logs_and_sigterm_stops_cleanly(self) -> None:
        """logrotate moves mail.log and sends SIGHUP: lines go to a new mail.log. SIGTERM stops cleanly."""
        directory = Path(self.mktemp()).absolute()
        port = free_port()
        path = write_config(directory, listeners={"smtp": f"tcp:{port}:interface=127.0.0.1"})
        cfg = load_config(path)
        add_user(cfg, "alice@example.test", "a password")
        server = TwistdProcess(path, port)
        self.addCleanup(lambda: server.proc.poll() is None and server.stop(signal.SIGKILL))
        server.wait_listening()
        logs = cfg.store.path / "logs"

        def send(subject: str) -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.sendmail("a@remote.test", ["alice@example.test"], f"Subject: {subject}\r\n\r\nx\r\n")

        send("one")
        (logs / "mail.log").rename(logs / "mail.log.1")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "kms logs reopened" not in server.output.read_text():
            self.assertLess(time.monotonic(), deadline, server.output.read_text())
            time.sleep(0.1)
        send("two")
        self.assertEqual((logs / "mail.log.1").read_text().count(" delivered "), 1)
        self.assertEqual((logs / "mail.log").read_text().count(" delivered "), 1)
        # twistd stops the services, then re-raises the signal so its exit status tells why it ended.
        self.assertEqual(server.stop(signal.SIGTERM), -signal.SIGTERM)
        output = server.output.read_text()
        self.assertIn("Received SIGTERM, shutting down.", output)
        self.assertIn("Server Shut Down.", output)
        self.assertNotIn("Traceback", output)
