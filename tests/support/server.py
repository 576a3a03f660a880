"""A real kms server inside the test process: real config file, real store, real sockets on 127.0.0.1.

Listeners use port 0, so tests never collide; `RunningServer.port(name)` says where each one ended up.
Clients we did not write (smtplib, swaks, openssl) talk to it from threads or child processes while
the trial reactor serves them.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed

from kms.auth.passwords import StoreKey
from kms.config import Config, load_config
from kms.service import build_service
from kms.store.users import UserDB
from kms.tls import generate_dev_certificate

BASE_CONFIG = """
[server]
hostname = "mx.example.test"
[listeners]
{listeners}
[tls]
certificate = "tls/server.pem"
private_key = "tls/server.key"
[domains]
local = {domains}
[ip_groups]
local = {local}
[relay]
local_group = "local"
[smtp]
max_message_size = "{max_size}"
max_recipients = {max_recipients}
[misc]
hide_version = {hide_version}
hide_local_ip = {hide_local_ip}
[store]
path = "store"
{store_limits}"""

# Free-space limits small enough that a test machine short of disk (one had 287 MB free) never
# answers 452 or prints kmsctl warnings in tests that are not about disk space.
TEST_STORE_LIMITS = 'soft_limit = "20MB"\nhard_limit = "10MB"\n'



def write_config(
    directory: Path,
    *,
    local: str = '["10.9.9.9"]',
    max_size: str = "1MB",
    max_recipients: int = 100,
    hide_version: bool = True,
    hide_local_ip: bool = False,
    extra: str = "",
    listeners: dict[str, str] | None = None,
    domains: Sequence[str] = ("example.test", "example.org"),
    store_limits: str = TEST_STORE_LIMITS,
) -> Path:
    """A config for a server on ephemeral ports with its store and certificate under ``directory``.

    ``extra`` is appended after the last section, ``[store]``; tests of the free-space limits pass
    ``store_limits=""`` and their own limits in ``extra``."""
    directory.mkdir(parents=True, exist_ok=True)
    generate_dev_certificate(directory / "tls" / "server.pem", directory / "tls" / "server.key")
    if listeners is None:
        listeners = {name: "tcp:0:interface=127.0.0.1" for name in ("smtp", "submission", "smtps")}
    text = BASE_CONFIG.format(
        listeners="\n".join(f'{name} = "{value}"' for name, value in listeners.items()),
        domains="[" + ", ".join(f'"{domain}"' for domain in domains) + "]",
        local=local,
        max_size=max_size,
        max_recipients=max_recipients,
        hide_version=str(hide_version).lower(),
        hide_local_ip=str(hide_local_ip).lower(),
        store_limits=store_limits,
    )
    path = directory / "kms.toml"
    path.write_text(text + extra)
    return path


def add_user(cfg: Config, address: str, password: str, storage: str = "des") -> None:
    """Create a user exactly as ``kmsctl user add`` does (the same DB file, the same key)."""
    cfg.store.path.mkdir(mode=0o750, parents=True, exist_ok=True)
    users = UserDB(cfg.store.path / "users.db")
    try:
        users.add(address, password, storage, StoreKey.load_or_create(cfg.store.path / "store.key"))
    finally:
        users.close()


class RunningServer:
    """The service tree of ``twistd kms`` started on the test reactor."""

    def __init__(self, config_path: Path) -> None:
        self.config = load_config(config_path)
        self.service = build_service(self.config, reactor)  # type: ignore[arg-type]
        self.ports: dict[str, int] = {}

    @inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        self.service.privilegedStartService()
        self.service.startService()
        waits = []
        for name in self.config.listeners:
            svc = self.service.getServiceNamed(name)
            waits.append(svc._waitingForPort.addCallback(self._record, name))
        yield gatherResults(waits)
        return self

    def _record(self, port, name: str):  # type: ignore[no-untyped-def]
        self.ports[name] = port.getHost().port
        return port

    def port(self, name: str) -> int:
        return self.ports[name]

    def stop(self) -> Deferred[None]:
        """Stop the service tree (once: a test that stopped it itself leaves the clean-up nothing)."""
        if not self.service.running:
            return succeed(None)
        return self.service.stopService()  # type: ignore[no-any-return]

    @property
    def store(self) -> Path:
        return self.config.store.path

    def maildir(self, address: str) -> Path:
        local, domain = address.lower().split("@")
        return self.store / "mail" / domain / local

    def messages(self, address: str) -> list[bytes]:
        """Every message in the user's new/, oldest first by name."""
        new = self.maildir(address) / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]


def free_port() -> int:
    """A port that was free a moment ago (for child processes, which cannot report port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TwistdProcess:
    """``twistd -n kms --config PATH`` as a child process, exactly as an admin starts it."""

    def __init__(
        self, config_path: Path, port: int, wrap: Sequence[str] = (), twistd_args: Sequence[str] = ()
    ) -> None:
        self.port = port
        self.output = config_path.parent / "twistd.out"
        twistd = Path(sys.executable).parent / "twistd"
        self._out = open(self.output, "wb")
        self.proc = subprocess.Popen(
            [
                *wrap,
                str(twistd),
                "--nodaemon",
                "--pidfile=",
                *twistd_args,
                "kms",
                "--config",
                str(config_path),
            ],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=config_path.parent,
        )

    def wait_listening(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("server did not start: " + self.output.read_text()) from None
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._out.close()
        return code
