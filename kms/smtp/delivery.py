"""What happens to mail the SMTP protocol accepted: relay control, recipients, trace headers, maildir.

This is the `MailBackend` behind every SMTP listener.  The decisions (may this client relay? what
does the Received header say?) are pure functions at the top of the module; `LocalDelivery` wires
them to the user database (through a thread pool) and the durable maildir writer.
"""

from __future__ import annotations

import base64
import itertools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from kms import __version__
from kms.auth.errors import TemporaryAuthFailure
from kms.clientinfo import ClientInfo
from kms.convert import ConversionReport, convert_message
from kms.ipgroups import IPGroup
from kms.logs import Logs
from kms.queue import dsn
from kms.queue.dsn import build_dsn
from kms.queue.interfaces import DELIVERED, QueuedRecipient, QueueEntry
from kms.smtp.commands import xtext_decode
from kms.smtp.interfaces import Envelope, Refusal, Spool
from kms.store.maildir import Copy, MaildirWriter, ensure_maildir, mailbox_path
from kms.store.space import SpaceWatch, out_of_space
from kms.store.spool import MessageSpool
from kms.store.users import UserDB

# --- pure decisions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RelayRules:
    """Who may send to domains that are not ours (SPEC §2 [relay])."""

    local_domains: tuple[str, ...]
    local_group: IPGroup
    allow_authenticated: bool


def split_address(address: str) -> tuple[str, str]:
    """``Local@Example.Test`` → (``Local``, ``example.test``); the bare ``postmaster`` has no domain."""
    local, sep, domain = address.rpartition("@")
    if not sep:
        return address, ""
    return local, domain.lower()


def recipient_decision(rules: RelayRules, client: ClientInfo, recipient: str) -> str:
    """``"local"``, ``"relay"`` (allowed to leave) or ``"deny"``: the relay-control verdict for one RCPT."""
    _, domain = split_address(recipient)
    if domain == "" or domain in rules.local_domains:
        return "local"
    if rules.local_group.contains(client.peer_host):
        return "relay"
    if rules.allow_authenticated and client.identity:
        return "relay"
    return "deny"


_SAFE_HELO = re.compile(r"^[A-Za-z0-9.\-_:\[\]]{1,255}$")


def received_header(
    envelope: Envelope,
    hostname: str,
    queue_id: str,
    now: float,
    hide_client: bool = False,
    version: str | None = None,
) -> bytes:
    """The RFC 5321 §4.4 trace line we prepend, LF-terminated, folded to stay under 78 columns.

    ``hide_client`` leaves out the client's address and reverse name (a local-network client with
    ``hide_local_ip``); ``version`` names the product only when versions are not hidden.  The HELO
    argument is hostile input: anything but host-name characters becomes ``unknown`` so it can
    neither break the comment syntax nor smuggle header text.
    """
    helo = envelope.helo if _SAFE_HELO.match(envelope.helo or "") else "unknown"
    client = envelope.client
    if hide_client:
        origin = f"from {helo}"
    else:
        name = (
            client.reverse_name
            if client.reverse_name and _SAFE_HELO.match(client.reverse_name)
            else "unknown"
        )
        literal = f"IPv6:{client.peer_host}" if ":" in client.peer_host else client.peer_host
        origin = f"from {helo} ({name} [{literal}])"
    by = f"by {hostname} ({version})" if version else f"by {hostname}"
    lines = [f"Received: {origin}", f"\t{by} with {envelope.protocol} id {queue_id}"]
    if len(envelope.recipients) == 1:
        lines.append(f"\tfor <{envelope.recipients[0]}>;")
    else:
        lines[-1] += ";"
    lines.append(f"\t{format_datetime(datetime.fromtimestamp(now, UTC))}")
    return ("\n".join(lines) + "\n").encode("utf-8")


# The route of a recipient that leaves through the outbound queue (never a mailbox address).
REMOTE_ROUTE = "@remote"

MAX_HOPS = 50  # Received headers a message may carry before we call it a loop (Postfix's default)
_HEAD_LIMIT = 256 * 1024  # how much of a message is searched for its trace headers


def trace_hops(message: bytes) -> int:
    """The Received headers in the header section of a stored (LF) message: how many MTAs it crossed.

    Only the header section counts (a forwarded message in the body does not); a header section
    longer than what was read counts what was read.
    """
    end = message.find(b"\n\n")
    head = message if end < 0 else message[: end + 1]
    return sum(1 for line in head.split(b"\n") if line[:9].lower() == b"received:")


def queue_entry(
    envelope: Envelope, queue_id: str, now: float, size: int, remote: bool = True
) -> QueueEntry | None:
    """The queue entry for the envelope's relayed recipients (``remote``) or its local ones, with
    their DSN parameters; None if there are none.  The local form only feeds success reports.

    ENVID is kept decoded (it was validated as xtext at MAIL); NOTIFY and ORCPT were decoded at RCPT.
    """
    recipients = []
    params = envelope.rcpt_params or tuple({} for _ in envelope.recipients)
    for address, route, rcpt in zip(envelope.recipients, envelope.routes, params, strict=True):
        if (route == REMOTE_ROUTE) != remote:
            continue
        notify = rcpt.get("NOTIFY")
        recipients.append(
            QueuedRecipient(
                address=address,
                notify=tuple(notify.split(",")) if notify else (),
                orcpt=rcpt.get("ORCPT"),
            )
        )
    if not recipients:
        return None
    mail = envelope.mail_params
    envid = mail.get("ENVID")
    ret = mail.get("RET")
    return QueueEntry(
        id=queue_id,
        sender=envelope.sender,
        recipients=recipients,
        created=now,
        next_attempt=now,
        size=size,
        ret=ret.upper() if ret else None,
        envid=xtext_decode(envid) if envid else None,
        body_8bit=(mail.get("BODY") or "").upper() == "8BITMIME",
        smtputf8="SMTPUTF8" in mail,
        client=envelope.client.describe(),
    )


class Outbound(Protocol):
    """Where relayed recipients go: the outbound queue (`kms.queue.runner.QueueRunner`)."""

    def enqueue(self, entry: QueueEntry, spool: Spool, header: bytes) -> Deferred[None]:
        """Make the entry durable (fsync'd) before the Deferred fires; then schedule its delivery."""


_ID_PREFIX = os.urandom(3)
_id_counter = itertools.count()


def new_queue_id(now: float) -> str:
    """Sortable by time and unique without coordination: milliseconds, a per-process random
    prefix and a counter (6 + 3 + 2 bytes, base32), with no system call per message."""
    raw = int(now * 1000).to_bytes(6, "big") + _ID_PREFIX + (next(_id_counter) & 0xFFFF).to_bytes(2, "big")
    return base64.b32encode(raw).decode("ascii").rstrip("=")


# --- the backend ---------------------------------------------------------------------------------


def _no_space() -> Refusal:
    return Refusal(452, "4.3.1", "Insufficient system storage")


class _Spool(MessageSpool):
    """A spool that outlives a full disk: the failing write is kept in ``full``, what was spilled
    is removed at once and the rest of DATA dropped, so the end of DATA can answer 452 4.3.1 (the
    protocol answers 451 to a write that raises).  Reading it raises that error again."""

    full: OSError | None = None

    def write(self, data: bytes) -> None:
        if self.full is not None:
            return
        try:
            super().write(data)
        except OSError as e:
            if not out_of_space(e):
                raise
            self.full = e
            self.discard()

    def open(self) -> BinaryIO:
        if self.full is not None:
            raise self.full
        return super().open()



class MailboxDirectory(Protocol):
    """Users kept outside the user DB (Active Directory: `kms.auth.directory.Directory`)."""

    def mailbox(self, address: str) -> Deferred[str | None]:
        """The mailbox for ``address``, None if no user has it; `TemporaryAuthFailure` when unknown now."""
        ...


class RecipientResolver:
    """Maps an envelope recipient of a local domain to the mailbox address that receives it.

    The user DB first, then the ``directory`` (when there is one), then the domain's catch-all.

    Look-ups run in the auth thread pool.  Found mailboxes are remembered for ``ttl`` seconds, so
    a busy sender costs one thread hop per message (the maildir write) instead of two; a user
    added with kmsctl receives mail at once (misses are never remembered), one deleted or disabled
    may still receive mail for up to ``ttl`` seconds.
    """

    def __init__(
        self,
        users: UserDB,
        pool: ThreadPool,
        reactor: Any,
        catch_all: Mapping[str, str],
        default_domain: str,
        ttl: float = 5.0,
        directory: MailboxDirectory | None = None,
    ) -> None:
        self._users = users
        self._directory = directory
        self._pool = pool
        self._reactor = reactor
        self._catch_all = catch_all
        self._default_domain = default_domain
        self._ttl = ttl
        self._found: dict[str, tuple[str, float]] = {}

    def resolve(self, recipient: str) -> Deferred[str | None]:
        key = recipient.lower()
        hit = self._found.get(key)
        now = self._reactor.seconds()
        if hit is not None and hit[1] > now:
            return succeed(hit[0])
        if self._directory is None:
            d = deferToThreadPool(self._reactor, self._pool, self.resolve_blocking, recipient)
        else:
            d = deferToThreadPool(self._reactor, self._pool, self._local_user, recipient)
            d.addCallback(self._directory_or_catch_all, recipient)
        return d.addCallback(self._remember, key)

    def _directory_or_catch_all(self, mailbox: str | None, recipient: str) -> str | Deferred[str | None]:
        if mailbox is not None:
            return mailbox
        assert self._directory is not None

        def found(user: str | None) -> str | Deferred[str | None]:
            if user is not None:
                return user
            return deferToThreadPool(self._reactor, self._pool, self._catch_all_user, recipient)

        def unavailable(failure: Failure) -> None:
            failure.trap(TemporaryAuthFailure)
            raise Refusal(451, "4.4.3", f"<{recipient}>: Directory unavailable, try again later")

        return self._directory.mailbox(self._address(recipient)).addCallbacks(found, unavailable)

    def _remember(self, mailbox: str | None, key: str) -> str | None:
        if mailbox is None:
            self._found.pop(key, None)
        else:
            if len(self._found) > 10_000:  # bounded: a dictionary attack must not grow it forever
                self._found.clear()
            self._found[key] = (mailbox, self._reactor.seconds() + self._ttl)
        return mailbox

    def resolve_blocking(self, recipient: str) -> str | None:
        return self._local_user(recipient) or self._catch_all_user(recipient)

    def _address(self, recipient: str) -> str:
        local, domain = split_address(recipient)
        return f"{local}@{domain or self._default_domain}".lower()

    def _local_user(self, recipient: str) -> str | None:
        record = self._users.get(self._address(recipient))
        return record.address if record is not None and record.enabled else None

    def _catch_all_user(self, recipient: str) -> str | None:
        domain = self._address(recipient).rpartition("@")[2]
        catch = self._catch_all.get(domain)
        if catch:
            record = self._users.get(f"{catch}@{domain}")
            if record is not None and record.enabled:
                return record.address
        return None


class LocalDelivery:
    """`MailBackend`: local domains into maildirs, relayed recipients into the outbound queue.

    Without an ``outbound`` queue (some tests), relaying answers 451 4.3.2.
    """

    def __init__(
        self,
        *,
        hostname: str,
        rules: RelayRules,
        resolver: RecipientResolver,
        writer: MaildirWriter,
        pool: ThreadPool,
        reactor: Any,
        logs: Logs,
        mail_root: Path,
        spool_dir: Path,
        hide_version: bool,
        hide_local_ip: bool,
        x_envelope_to: bool,
        on_delivered: Callable[[str], None] | None = None,
        decode_tnef: bool = False,
        decode_uuencode: bool = False,
        max_message_size: int | None = None,
        outbound: Outbound | None = None,
        space: SpaceWatch | None = None,
    ) -> None:
        self.hostname = hostname
        self.rules = rules
        self.resolver = resolver
        self.writer = writer
        self.pool = pool
        self.reactor = reactor
        self.logs = logs
        self.mail_root = mail_root
        self.spool_dir = spool_dir
        self.hide_version = hide_version
        self.hide_local_ip = hide_local_ip
        self.x_envelope_to = x_envelope_to
        self._maildirs: dict[str, Path] = {}
        self._on_delivered = on_delivered
        self.decode_tnef = decode_tnef
        self.decode_uuencode = decode_uuencode
        self.max_message_size = max_message_size
        self.outbound = outbound
        self.space = space

    def check_sender(
        self, client: ClientInfo, sender: str, params: Mapping[str, str | None]
    ) -> Deferred[None]:
        """Any syntactically valid reverse-path is accepted (sender checks arrive with later issues),
        unless the store is below its hard limit (SPEC §8)."""
        if self.space is not None and self.space.refusing:
            self.logs.mail("refused-no-space", client, sender=sender)
            return fail(_no_space())
        return succeed(None)

    def check_recipient(self, client: ClientInfo, sender: str, recipient: str) -> Deferred[str]:
        """The mailbox for ``recipient`` (or `REMOTE_ROUTE`), or a Refusal: relay denied, unknown user."""
        verdict = recipient_decision(self.rules, client, recipient)
        if verdict == "deny":
            self.logs.mail("relay-denied", client, sender=sender, recipient=recipient)
            return fail(Refusal(554, "5.7.1", f"<{recipient}>: Relay access denied"))
        if verdict == "relay":
            if self.outbound is not None:
                return succeed(REMOTE_ROUTE)
            return fail(
                Refusal(451, "4.3.2", f"<{recipient}>: Outbound delivery is not available yet, try later")
            )

        def found(mailbox: str | None) -> str:
            if mailbox is None:
                self.logs.mail("unknown-recipient", client, sender=sender, recipient=recipient)
                raise Refusal(550, "5.1.1", f"<{recipient}>: Recipient address rejected: User unknown")
            return mailbox

        return self.resolver.resolve(recipient).addCallback(found)

    def new_spool(self) -> MessageSpool:
        return _Spool(self.spool_dir)

    def deliver(self, envelope: Envelope, spool: Spool) -> Deferred[str]:
        """Write every copy durably (group commit), log, and only then give the queue id.

        One copy per distinct (mailbox, recipient) with ``x_envelope_to`` (a catch-all mailbox gets a
        copy for each address it receives for, so its owner can sort by X-Envelope-To), else one per
        mailbox.  The mailbox of each recipient is the route RCPT found.
        """
        now = self.reactor.seconds()
        queue_id = new_queue_id(now)
        targets: dict[tuple[str, str], str] = {}  # (mailbox, recipient key) -> recipient
        converted: list[Spool] = []
        trace = self._trace(envelope, queue_id, now)
        entry = queue_entry(envelope, queue_id, now, spool.size + len(trace))
        d: Deferred[Any] = maybeDeferred(self._route, envelope, targets)
        d.addCallback(lambda _: self._loop_check(envelope, spool))
        d.addCallback(lambda _: self._room(spool))
        if entry is not None:
            d.addCallback(lambda _: self._enqueue(entry, spool, trace))
        d.addCallback(lambda _: self._convert(envelope, spool, converted) if targets else None)
        d.addCallback(
            lambda body: self.writer.deliver(self._copies(body, trace, targets)) if targets else None
        )

        def done(result: object) -> object:
            spool.discard()
            for extra in converted:
                extra.discard()
            return result

        def logged(_: object) -> str:
            for (mailbox, _key), recipient in targets.items():
                if self._on_delivered is not None:
                    self._on_delivered(mailbox)  # open IMAP/POP3 sessions of that mailbox see it now
                self.logs.mail(
                    "delivered",
                    envelope.client,
                    id=queue_id,
                    sender=envelope.sender,
                    recipient=recipient,
                    mailbox=mailbox,
                    size=spool.size,
                    protocol=envelope.protocol,
                )
            for queued in entry.recipients if entry is not None else ():
                self.logs.mail(
                    "queued",
                    envelope.client,
                    id=queue_id,
                    sender=envelope.sender,
                    recipient=queued.address,
                    size=entry.size if entry is not None else 0,
                    protocol=envelope.protocol,
                )
            self._report_success(envelope, queue_id, now, spool.size)
            return queue_id

        def full(failure: Any) -> Any:
            if not out_of_space(failure.value):
                return failure
            if self.space is not None:
                self.space.check_now()  # refuse the next MAIL without waiting for the periodic check
            self.logs.mail("refused-no-space", envelope.client, sender=envelope.sender, size=spool.size)
            raise _no_space()

        return d.addBoth(done).addCallbacks(logged, full)

    def _report_success(self, envelope: Envelope, queue_id: str, now: float, size: int) -> None:
        """NOTIFY=SUCCESS on a local recipient: a "delivered" report (RFC 3461 §4.1), after the 250.

        Best effort: it is built and delivered while the client goes on; a failure is logged.
        """
        if not envelope.sender or not any("SUCCESS" in (p.get("NOTIFY") or "") for p in envelope.rcpt_params):
            return  # the common case, decided without building anything
        entry = queue_entry(envelope, queue_id, now, size, remote=False)
        if entry is None or not entry.sender:
            return
        asked = [r for r in entry.recipients if "SUCCESS" in r.notify]
        if not asked:
            return
        for r in asked:
            r.state, r.status, r.final_time = DELIVERED, "2.0.0", now
        data = build_dsn(
            entry,
            asked,
            dsn.DELIVERED,
            reporting_mta=self.hostname,
            now=now,
            product=None if self.hide_version else f"kms {__version__}",
        )

        def failed(failure: Failure) -> None:
            self.logs.error("report-failed", envelope.client, id=queue_id, error=failure.getErrorMessage())

        self.deliver_report(entry.sender, data).addErrback(failed)

    def _loop_check(self, envelope: Envelope, spool: Spool) -> Deferred[None] | None:
        """554 5.4.6 for a message that has crossed `MAX_HOPS` MTAs: a mail loop (an MX pointing
        back at us, two servers forwarding to each other) ends here instead of circling forever."""

        def head() -> bytes:
            with spool.open() as f:
                return f.read(_HEAD_LIMIT)

        def count(data: bytes) -> None:
            hops = trace_hops(data)
            if hops >= MAX_HOPS:
                self.logs.mail("loop-refused", envelope.client, sender=envelope.sender, hops=hops)
                raise Refusal(554, "5.4.6", f"Too many hops ({hops}): mail loop?")

        if getattr(spool, "path", None) is None:  # still in memory: nothing to wait for
            count(head())
            return None
        return deferToThreadPool(self.reactor, self.pool, head).addCallback(count)

    def _room(self, spool: Spool) -> Deferred[None] | None:
        """ENOSPC (answered 452 4.3.1) if space ran out while the message arrived: its spool hit a
        full disk, or the store is now below the hard limit (SPEC §8: checked before each message)."""
        if isinstance(spool, _Spool) and spool.full is not None:
            raise spool.full
        return None if self.space is None else self.space.room()

    def deliver_report(self, recipient: str, data: bytes) -> Deferred[str | None]:
        """A message we wrote (a DSN) to ``recipient``: its local mailbox, or the queue with a null
        sender (so it can never cause another DSN).  Fires with the mailbox or queue id once durable,
        or None when a local recipient no longer exists (logged; a DSN is not worth a loop)."""
        now = self.reactor.seconds()
        queue_id = new_queue_id(now)
        spool = self.new_spool()
        spool.write(data.replace(b"\r\n", b"\n"))
        _, domain = split_address(recipient)
        if domain not in self.rules.local_domains:
            entry = QueueEntry(
                id=queue_id,
                sender="",
                recipients=[QueuedRecipient(address=recipient, notify=("NEVER",))],
                created=now,
                next_attempt=now,
                size=spool.size,
                body_8bit=not data.isascii(),
                smtputf8=not recipient.isascii(),
            )
            d: Deferred[Any] = self._enqueue(entry, spool, b"")
            d.addCallback(lambda _: queue_id)
        else:

            def located(mailbox: str | None) -> Deferred[Any] | None:
                if mailbox is None:
                    self.logs.mail("report-undeliverable", None, id=queue_id, recipient=recipient)
                    return None
                routed = maybeDeferred(self._route_mailboxes, [mailbox])
                routed.addCallback(
                    lambda _: self.writer.deliver([Copy(self._maildirs[mailbox], b"", spool)])
                )
                routed.addCallback(lambda _: self._on_delivered(mailbox) if self._on_delivered else None)
                return routed.addCallback(lambda _: mailbox)

            d = self.resolver.resolve(recipient).addCallback(located)

        def logged(where: Any) -> Any:
            if where is not None:
                self.logs.mail("report", None, id=queue_id, recipient=recipient, size=spool.size)
            return where

        def discard(result: Any) -> Any:
            spool.discard()
            return result

        return d.addBoth(discard).addCallback(logged)

    def _enqueue(self, entry: QueueEntry, spool: Spool, trace: bytes) -> Deferred[None]:
        """Relayed recipients: durable in the queue before the 250 (the body as received, no conversion)."""
        if self.outbound is None:  # check_recipient never routes to the queue without one
            raise RuntimeError("relayed recipient without an outbound queue")
        return self.outbound.enqueue(entry, spool, trace)

    def _convert(self, envelope: Envelope, spool: Spool, converted: list[Spool]) -> Deferred[Spool] | Spool:
        """TNEF/uuencode to MIME (SPEC §9), off the reactor; the body to deliver (maybe a new spool)."""
        if not (self.decode_tnef or self.decode_uuencode):
            return spool

        def work() -> tuple[Spool, ConversionReport]:
            with spool.open() as f:
                data = f.read()
            out, report = convert_message(
                data, tnef=self.decode_tnef, uuencode=self.decode_uuencode, max_size=self.max_message_size
            )
            if out is data:
                return spool, report
            fresh = self.new_spool()
            converted.append(fresh)
            fresh.write(out)
            return fresh, report

        def report(result: tuple[Spool, ConversionReport]) -> Spool:
            body, rep = result
            if self.logs.debug_enabled("message_decoding"):
                for what in rep.converted:
                    self.logs.debug("message_decoding", "converted", envelope.client, detail=what)
                for why in rep.problems:
                    self.logs.debug("message_decoding", "kept", envelope.client, detail=why)
            return body

        def failed(reason: Any) -> Spool:
            # never lose a message over a conversion: deliver what was received
            self.logs.debug("message_decoding", "failed", envelope.client, detail=str(reason.value))
            return spool

        return deferToThreadPool(self.reactor, self.pool, work).addCallbacks(report, failed)

    def _route(self, envelope: Envelope, targets: dict[tuple[str, str], str]) -> Deferred[None] | None:
        """Fill ``targets``; locate (off the reactor) maildirs not seen before in this process."""
        for recipient, mailbox in zip(envelope.recipients, envelope.routes, strict=True):
            if mailbox != REMOTE_ROUTE:
                key = recipient.lower() if self.x_envelope_to else ""
                targets.setdefault((mailbox, key), recipient)
        return self._route_mailboxes([mailbox for mailbox, _ in targets])

    def _route_mailboxes(self, mailboxes: Sequence[str]) -> Deferred[None] | None:
        """Locate (off the reactor) the maildirs not seen before in this process."""
        missing = [m for m in mailboxes if m not in self._maildirs]
        if not missing:
            return None
        located = deferToThreadPool(self.reactor, self.pool, self._locate, missing)
        return located.addCallback(self._maildirs.update)

    def _trace(self, envelope: Envelope, queue_id: str, now: float) -> bytes:
        """Our Received header for this message (the same on local copies and the queued one)."""
        hide = self.hide_local_ip and self.rules.local_group.contains(envelope.client.peer_host)
        return received_header(
            envelope,
            self.hostname,
            queue_id,
            now,
            hide_client=hide,
            version=None if self.hide_version else f"kms {__version__}",
        )

    def _copies(self, spool: Spool, trace: bytes, targets: Mapping[tuple[str, str], str]) -> list[Copy]:
        """One copy per target: our Received header, X-Envelope-To, then the body as received."""
        copies = []
        for (mailbox, _key), recipient in targets.items():
            header = trace
            if self.x_envelope_to:
                header += f"X-Envelope-To: <{recipient}>\n".encode()
            copies.append(Copy(maildir=self._maildirs[mailbox], header=header, spool=spool))
        return copies

    def _locate(self, mailboxes: Sequence[str]) -> dict[str, Path]:
        """Thread-pool side, once per mailbox and process: its validated maildir, created if new."""
        found = {}
        for mailbox in mailboxes:
            maildir = mailbox_path(self.mail_root, mailbox)
            ensure_maildir(maildir)
            found[mailbox] = maildir
        return found
