"""The seam between the SMTP protocol (bytes, state, replies) and mail handling (policy, store).

The protocol in `kms.smtp.server` knows nothing about domains, users or disks: it calls a
`MailBackend`.  `kms.smtp.delivery` implements it.  Refusals travel as `Refusal` exceptions that
carry the exact reply, so the protocol only formats them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from twisted.internet.defer import Deferred

from kms.clientinfo import ClientInfo


class Refusal(Exception):
    """A reply the backend wants sent instead of success, e.g. ``Refusal(550, "5.1.1", "...")``."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text


@dataclass(frozen=True)
class Envelope:
    """One mail transaction as accepted so far.

    ``protocol`` is the RFC 3848 "with" keyword (SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA).
    ``routes`` holds, for each recipient, what `MailBackend.check_recipient` answered for it: the
    backend's own delivery target, opaque to the protocol, so delivery need not look it up again.
    ``mail_params``/``rcpt_params`` hold ESMTP parameters upper-cased keys -> raw values (``None``
    for flags such as SMTPUTF8).
    """

    client: ClientInfo
    helo: str
    protocol: str
    sender: str  # "" for the null reverse-path
    recipients: Sequence[str]
    routes: Sequence[str] = ()
    mail_params: Mapping[str, str | None] = field(default_factory=dict)
    rcpt_params: Sequence[Mapping[str, str | None]] = ()


class Spool(Protocol):
    """Where a message body goes while it arrives; bounded memory, removed by `discard`."""

    size: int

    def write(self, data: bytes) -> None: ...

    def discard(self) -> None: ...

    def open(self) -> BinaryIO:
        """A reader from the first byte (the backend reads what the protocol wrote)."""


class MailBackend(Protocol):
    """What the SMTP protocol asks of the rest of the server. All methods may fail with Refusal."""

    def check_sender(
        self, client: ClientInfo, sender: str, params: Mapping[str, str | None]
    ) -> Deferred[None]:
        """MAIL FROM: may this client start a transaction with this reverse-path (and SIZE)?"""

    def check_recipient(self, client: ClientInfo, sender: str, recipient: str) -> Deferred[str]:
        """RCPT TO: fires with the route (see `Envelope.routes`) or fails with a Refusal.

        E.g. Refusal(550 5.1.1) unknown user, (554 5.7.1) relay denied, (451 4.3.2) try later.
        """

    def new_spool(self) -> Spool:
        """A fresh spool for one DATA phase."""

    def deliver(self, envelope: Envelope, spool: Spool) -> Deferred[str]:
        """Make every copy durable, then fire with the queue id; the spool is consumed either way."""
