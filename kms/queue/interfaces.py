"""The seams of the outbound queue: what is stored, what one delivery attempt returns.

`kms.queue.store` keeps `QueueEntry` values on disk; `kms.queue.client` makes one SMTP attempt
to one host and answers with an `AttemptResult` (or raises `HostFailure`); `kms.queue.mx` says
which hosts to try; `kms.queue.dsn` writes the bounce; `kms.queue.runner` decides, with the pure
functions of `kms.queue.schedule`, what happens next.  Values here are plain data: JSON on disk,
no pickle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Recipient states.  "pending" is retried; the three others are final.
PENDING = "pending"
DELIVERED = "delivered"
BOUNCED = "bounced"  # 5xx, null MX, no such domain, or the queue lifetime ran out
STATES = (PENDING, DELIVERED, BOUNCED)


@dataclass
class QueuedRecipient:
    """One envelope recipient and where its delivery stands.

    ``notify`` holds the RFC 3461 NOTIFY values received (upper case, e.g. ("FAILURE", "DELAY"));
    empty means none were given (the default: failure and delay).  ``orcpt`` is the ORCPT
    parameter as received (``rfc822;bob@example.org``, xtext decoded), or None.
    ``last_reply`` is the last answer for it ("550 5.1.1 <bob@…>: no such user", or a
    connection problem "connection refused by mx1.example.org [192.0.2.1]"); ``remote_mta``
    the host that gave it.  ``status`` is the RFC 3463 code of that outcome ("5.1.1", "4.4.1";
    the DSN's Status field), ``last_attempt`` when it came.  ``dsn_sent``: the report this
    recipient's final state calls for (failure, or success with NOTIFY=SUCCESS) is queued, so
    a restart does not send it twice and a bounce by kmsctl is still reported by the runner.
    """

    address: str
    state: str = PENDING
    notify: tuple[str, ...] = ()
    orcpt: str | None = None
    attempts: int = 0
    last_reply: str = ""
    remote_mta: str = ""
    final_time: float | None = None
    status: str = ""
    last_attempt: float | None = None
    dsn_sent: bool = False


@dataclass
class QueueEntry:
    """One queued message: envelope, per-recipient state, schedule.

    The body lives beside the entry (`QueueStore.body_path`) and already carries our Received
    header.  ``ret``/``envid`` are the RFC 3461 MAIL parameters (None when absent);
    ``body_8bit``/``smtputf8`` what MAIL said (BODY=8BITMIME, SMTPUTF8), so the attempt can
    demand the same of the next hop.  ``client`` is ``name [ip]`` of who submitted it.
    """

    id: str
    sender: str  # "" for the null reverse-path (DSNs); never answered with a DSN
    recipients: list[QueuedRecipient]
    created: float
    next_attempt: float
    size: int = 0
    attempts: int = 0
    ret: str | None = None
    envid: str | None = None
    body_8bit: bool = False
    smtputf8: bool = False
    client: str = ""
    delay_warned: bool = False

    def pending(self) -> list[QueuedRecipient]:
        return [r for r in self.recipients if r.state == PENDING]


@dataclass(frozen=True)
class Reply:
    """One SMTP reply as received: ``Reply(550, "5.1.1", "<bob@example.org>: no such user")``."""

    code: int
    enhanced: str
    text: str

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def success(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ")


@dataclass(frozen=True)
class TLSPolicy:
    """How one attempt uses TLS.

    ``mode``: "none" (never STARTTLS), "opportunistic" (STARTTLS when offered, certificate not
    checked, plaintext when not offered or when the handshake fails on a fresh connection),
    "required" (STARTTLS must be offered and the certificate must verify for ``verify_name``
    against ``ca_file`` or the system store), "implicit" (TLS from the first byte, verified).
    """

    mode: str = "opportunistic"
    verify_name: str = ""
    ca_file: Path | None = None


@dataclass(frozen=True)
class OutboundMessage:
    """What one attempt sends: the envelope of the still-pending recipients and the body file."""

    id: str
    sender: str
    recipients: tuple[QueuedRecipient, ...]
    body_path: Path
    size: int
    body_8bit: bool = False
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None


@dataclass(frozen=True)
class AttemptResult:
    """The host's answer for each recipient of an attempt (address -> Reply).

    ``dsn``: the host offered DSN, so NOTIFY/ORCPT went on and success reports are its job; without
    it, a recipient that asked for NOTIFY=SUCCESS gets a "relayed" report from us (RFC 3461 §4.3).
    """

    host: str  # "mx1.example.org [192.0.2.1]"
    replies: Mapping[str, Reply] = field(default_factory=dict)
    dsn: bool = False


class HostFailure(Exception):
    """This host gave no per-recipient answers: try the next host (or retry later).

    Raised for refused/timed-out connections, a 4xx/5xx greeting or EHLO, TLS required but not
    possible, a dropped connection before the end of DATA.  ``reply`` is the SMTP reply when
    there was one.  ``permanent`` is True only when no other host or retry can help (e.g. the
    message needs SMTPUTF8 and the host lacks it; the message is larger than its SIZE).
    """

    def __init__(self, host: str, reason: str, reply: Reply | None = None, permanent: bool = False) -> None:
        super().__init__(f"{host}: {reason}")
        self.host = host
        self.reason = reason
        self.reply = reply
        self.permanent = permanent


class DestinationError(Exception):
    """No host to try for a domain: NXDOMAIN or null MX (permanent), DNS timeout/SERVFAIL (not)."""

    def __init__(self, domain: str, reason: str, permanent: bool) -> None:
        super().__init__(f"{domain}: {reason}")
        self.domain = domain
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True)
class Hop:
    """One address to try: the MX (or smarthost/A) name, its IP, the port."""

    name: str
    address: str
    port: int

    def describe(self) -> str:
        return f"{self.name} [{self.address}]"
