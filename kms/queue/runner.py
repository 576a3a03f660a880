"""The queue runner: picks due entries, delivers their pending recipients, retries, bounces.

One entry is handled at a time per process (its lock held, so kmsctl cannot change it meanwhile):
its pending recipients are grouped by destination (their domain, or one group for the smarthost),
each group resolves its hops (MX in preference order, or the smarthost) and tries them in order
until one answers per recipient; every answer is applied with `kms.queue.schedule`, then the entry
is saved (or removed once nothing is pending) and DSNs go to the sender.  Groups of all entries run
concurrently within ``max_connections`` overall and ``max_per_domain`` per destination, so a
destination that is down holds up nothing but its own mail.

Delivery is *at least once*: a remote "250" is recorded when the entry is saved after the attempt,
so a crash between the two sends that copy again after the restart (duplicates are harmless next to
loss, and remote servers deduplicate by Message-ID where they care).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, gatherResults, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from kms.logs import Logs
from kms.queue import dsn, schedule
from kms.queue.interfaces import (
    BOUNCED,
    DELIVERED,
    PENDING,
    DestinationError,
    Hop,
    HostFailure,
    OutboundMessage,
    QueuedRecipient,
    QueueEntry,
    Reply,
    TLSPolicy,
)
from kms.queue.store import EntryBusy, NoSuchEntry, QueueStore
from kms.smtp.interfaces import Spool

log = Logger()

Resolve = Callable[[str], Deferred[list[Hop]]]
Attempt = Callable[..., Deferred[Any]]
InjectDSN = Callable[[str, bytes], Deferred[Any]]


@dataclass(frozen=True)
class RunnerSettings:
    """What the runner needs from the config (see docs/outbound.md)."""

    hostname: str
    product: str | None  # None when hide_version
    smarthost: str = ""
    smarthost_tls: str = "starttls"
    smarthost_credentials: tuple[str, str] | None = None
    require_tls: bool = False
    require_tls_domains: tuple[str, ...] = ()
    ca_file: Path | None = None
    lifetime: float = 5 * 86400.0
    retry_schedule: tuple[float, ...] = (300.0, 900.0, 1800.0, 3600.0)
    delay_warning: float = 4 * 3600.0
    max_connections: int = 20
    max_per_domain: int = 4
    scan_interval: float = 300.0  # full scan for entries nobody scheduled (a restart, kmsctl)
    poll_interval: float = 2.0  # how often `kmsctl queue flush` is looked for
    timeout: float = 30.0  # TCP connect; each reply has its own RFC 5321 timeout in the client


def destination(address: str) -> str:
    """The domain part, lower case: what MX look-ups and per-destination limits key on."""
    return address.rpartition("@")[2].lower()


def tls_policy(settings: RunnerSettings, domain: str, hop: Hop) -> TLSPolicy:
    """TLS for one hop: the smarthost's mode, required for listed domains, else opportunistic."""
    if settings.smarthost:
        mode = {"starttls": "required"}.get(settings.smarthost_tls, settings.smarthost_tls)
        return TLSPolicy(mode=mode, verify_name=hop.name, ca_file=settings.ca_file)
    if settings.require_tls or domain in settings.require_tls_domains:
        return TLSPolicy(mode="required", verify_name=hop.name, ca_file=settings.ca_file)
    return TLSPolicy(mode="opportunistic", verify_name=hop.name, ca_file=settings.ca_file)


def read_credentials(path: Path) -> tuple[str, str]:
    """``user:password`` from the smarthost credentials file (first line; the password may hold ':')."""
    text = path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise ValueError(f"{path}: expected one line user:password")
    return user, password


class QueueRunner(Service):
    """The outbound queue as a service; also the `Outbound` that SMTP delivery enqueues into."""

    def __init__(
        self,
        store: QueueStore,
        pool: ThreadPool,
        reactor: Any,
        logs: Logs,
        settings: RunnerSettings,
        *,
        resolve: Resolve,
        attempt: Attempt,
        inject_dsn: InjectDSN,
        clock: Any = None,
    ) -> None:
        """``clock`` (default: the reactor) runs the schedule; tests pass a `task.Clock`."""
        self.setName("queue-runner")
        self.store = store
        self.pool = pool
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.logs = logs
        self.settings = settings
        self._resolve = resolve
        self._attempt = attempt
        self._inject_dsn = inject_dsn
        self._connections = DeferredSemaphore(settings.max_connections)
        self._per_domain: dict[str, DeferredSemaphore] = {}
        self._active: set[str] = set()
        self._loop: LoopingCall | None = None
        self._last_scan: float | None = None
        self._timers: dict[str, Any] = {}  # entry id -> IDelayedCall of its next attempt
        self._in_flight: set[Deferred[Any]] = set()  # attempts under way, cancelled at stop

    # --- service -----------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.settings.poll_interval, now=True).addErrback(self._loop_died)

    def stopService(self) -> Deferred[Any] | None:
        """No new attempts; the ones under way are cancelled (their recipients stay pending)."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for attempt in list(self._in_flight):
            attempt.cancel()
        return None

    def _schedule(self, entry_id: str, when: float) -> None:
        """Come back to the entry at ``when`` (one timer per entry; an earlier one is replaced)."""
        if not self.running:
            return
        old = self._timers.pop(entry_id, None)
        if old is not None and old.active():
            old.cancel()
        delay = max(0.0, when - self.clock.seconds())

        def fire() -> None:
            self._timers.pop(entry_id, None)
            self.process(entry_id)

        self._timers[entry_id] = self.clock.callLater(delay, fire)

    def _loop_died(self, failure: Failure) -> None:
        self.logs.error("queue-scan-failed", error=failure.getErrorMessage())
        log.failure("queue scan", failure)

    # --- the SMTP side -----------------------------------------------------------------------------

    def enqueue(self, entry: QueueEntry, spool: Spool, header: bytes) -> Deferred[None]:
        """Durable (fsync'd) in the queue when the Deferred fires; delivery starts right after."""

        def write() -> None:
            with spool.open() as body:
                self.store.add(entry, body, header)

        d = deferToThreadPool(self.reactor, self.pool, write)
        return d.addCallback(lambda _: self._schedule(entry.id, entry.next_attempt))

    # --- scanning ----------------------------------------------------------------------------------

    def _tick(self) -> Deferred[Any]:
        """Scan when `kmsctl queue flush` asked for it, or when the last full scan is old enough."""
        now = self.clock.seconds()
        if self._last_scan is None or now - self._last_scan >= self.settings.scan_interval:
            return self.scan()
        d: Deferred[Any] = deferToThreadPool(self.reactor, self.pool, self.store.take_flush_request)
        d.addCallback(lambda asked: self.scan() if asked else None)
        return d.addErrback(self._loop_died)  # logged; the loop itself must go on

    def scan(self) -> Deferred[None]:
        """Start every due entry that is not already being handled (also after `kmsctl queue flush`)."""
        now = self.clock.seconds()
        self._last_scan = now
        d = deferToThreadPool(self.reactor, self.pool, self.store.due, now)

        def start(entries: Sequence[QueueEntry]) -> None:
            for entry in entries:
                if entry.id not in self._active:
                    self.process(entry.id)

        def failed(failure: Failure) -> None:
            self.logs.error("queue-scan-failed", error=failure.getErrorMessage())

        return d.addCallbacks(start, failed)

    def process(self, entry_id: str) -> Deferred[None]:
        """Deliver what is pending in one entry (skipped when busy: kmsctl or another pass has it)."""
        if entry_id in self._active:
            return Deferred.fromCoroutine(_nothing())
        self._active.add(entry_id)
        d = self._process(entry_id)

        def finished(result: object) -> None:
            self._active.discard(entry_id)
            if isinstance(result, Failure):
                self.logs.error("queue-entry-failed", id=entry_id, error=result.getErrorMessage())
                log.failure("queue entry {id}", result, id=entry_id)

        return d.addBoth(finished)

    @inlineCallbacks
    def _process(self, entry_id: str) -> Any:
        try:
            lock = yield deferToThreadPool(self.reactor, self.pool, self.store.try_lock, entry_id)
        except EntryBusy:
            return  # kmsctl has it; the next scan comes back to it
        try:
            try:
                entry = yield deferToThreadPool(self.reactor, self.pool, self.store.get, entry_id)
            except NoSuchEntry:
                return  # delivered and removed by an earlier pass, or deleted with kmsctl
            if not entry.pending() or entry.next_attempt <= self.clock.seconds():
                relayed: list[QueuedRecipient] = []
                if entry.pending():
                    yield self._deliver(entry, relayed)
                if self.running:  # stopped meanwhile: the entry stays as it was on disk
                    yield self._settle(entry, relayed)
        finally:
            lock.release()  # one flock(LOCK_UN) and close: too small to be worth a thread hop

    # --- one delivery pass -------------------------------------------------------------------------

    def _deliver(self, entry: QueueEntry, relayed: list[QueuedRecipient]) -> Deferred[Any]:
        """Every destination group of the entry at once; ``relayed`` collects the recipients that
        asked for a success report from a host that could not pass NOTIFY on."""
        groups: dict[str, list[QueuedRecipient]] = {}
        for recipient in entry.pending():
            key = "" if self.settings.smarthost else destination(recipient.address)
            groups.setdefault(key, []).append(recipient)
        body = self.store.body_path(entry.id)
        return gatherResults(
            [self._limited(domain, rcpts, entry, body, relayed) for domain, rcpts in groups.items()],
            consumeErrors=True,
        )

    def _limited(
        self,
        domain: str,
        recipients: list[QueuedRecipient],
        entry: QueueEntry,
        body: Path,
        relayed: list[QueuedRecipient],
    ) -> Deferred[Any]:
        """One destination group within the per-destination and overall connection limits."""
        per_domain = self._per_domain.get(domain)
        if per_domain is None:
            per_domain = self._per_domain[domain] = DeferredSemaphore(self.settings.max_per_domain)

        def forget_idle(result: object) -> object:
            if not per_domain.waiting and per_domain.tokens == per_domain.limit:
                self._per_domain.pop(domain, None)
            return result

        d = per_domain.run(self._connections.run, self._group, domain, entry, recipients, body, relayed)
        return d.addBoth(forget_idle)

    @inlineCallbacks
    def _group(
        self,
        domain: str,
        entry: QueueEntry,
        recipients: list[QueuedRecipient],
        body: Path,
        relayed: list[QueuedRecipient],
    ) -> Any:
        """Try the hops of one destination in order until one answers for the recipients."""
        if not self.running:
            return  # stopping: waited for a connection slot in vain; the recipients stay pending
        now = self.clock.seconds
        try:
            target = self.settings.smarthost or domain
            hops = yield self._resolve(target)
        except DestinationError as e:
            for r in recipients:
                schedule.apply_destination_error(r, e, now())
            return
        if not hops:
            nowhere = DestinationError(domain, "no host to deliver to", False)
            for r in recipients:
                schedule.apply_destination_error(r, nowhere, now())
            return
        message = OutboundMessage(
            id=entry.id,
            sender=entry.sender,
            recipients=tuple(recipients),
            body_path=body,
            size=entry.size,
            body_8bit=entry.body_8bit,
            smtputf8=entry.smtputf8,
            ret=entry.ret,
            envid=entry.envid,
        )
        last: HostFailure | None = None
        for hop in hops:
            if not self.running:
                return  # stopping: the recipients stay pending for the next start
            attempt = self._attempt(
                self.reactor,
                hop,
                message,
                helo=self.settings.hostname,
                tls=tls_policy(self.settings, domain, hop),
                credentials=self.settings.smarthost_credentials,
                timeout=self.settings.timeout,
            )
            self._in_flight.add(attempt)
            try:
                result = yield attempt
            except CancelledError:
                return
            except HostFailure as failure:
                last = failure
                self.logs.mail("host-failed", None, id=entry.id, host=failure.host, reason=failure.reason)
                if failure.permanent:
                    break
                continue
            except Exception as e:  # ours, not the host's (the body unreadable, say): retry later,
                # and never fail the pass, or the other groups' results would not be saved
                log.failure("delivering {id} to {host}", id=entry.id, host=hop.describe())
                last = HostFailure(hop.describe(), f"local error: {e}")
                break
            finally:
                self._in_flight.discard(attempt)
            for r in recipients:
                reply = result.replies.get(r.address)
                if reply is None:
                    reply = Reply(451, "4.4.0", "no answer for this recipient")
                schedule.apply_reply(r, reply, result.host, now())
                self._log_result(entry, r)
                if r.state == DELIVERED and not result.dsn and schedule.wants_success_dsn(r):
                    relayed.append(r)
            return
        if last is not None:
            for r in recipients:
                schedule.apply_host_failure(r, last, now())
                self._log_result(entry, r)

    def _log_result(self, entry: QueueEntry, r: QueuedRecipient) -> None:
        event = {DELIVERED: "sent", BOUNCED: "bounced", PENDING: "deferred"}[r.state]
        self.logs.mail(
            event,
            None,
            id=entry.id,
            sender=entry.sender,
            recipient=r.address,
            host=r.remote_mta,
            reply=r.last_reply,
        )

    # --- after the pass: expiry, DSNs, save or remove -----------------------------------------------

    @inlineCallbacks
    def _settle(self, entry: QueueEntry, relayed: list[QueuedRecipient]) -> Any:
        """After a pass (or a kmsctl bounce): expiry, failure and delay DSNs, then save or remove.

        A DSN is made durable before the entry records it as sent, so a crash sends it again rather
        than never.
        """
        s = self.settings
        now = self.clock.seconds()
        if entry.pending():
            entry.attempts += 1
            if schedule.expired(entry, now, s.lifetime):
                for r in entry.pending():
                    schedule.expire(r, now, s.lifetime)
                    self._log_result(entry, r)
        failed = schedule.unreported_failures(entry)
        reported = (yield self._send_dsn(entry, failed, dsn.FAILED, now)) if failed else True
        for r in entry.recipients:
            if r.state == BOUNCED and (reported or r not in failed):
                r.dsn_sent = True  # reported now, or never to be (NOTIFY, null sender)
        if relayed and entry.sender:
            yield self._send_dsn(entry, relayed, dsn.RELAYED, now)
        if schedule.needs_delay_warning(entry, now, s.delay_warning):
            delayed = schedule.delay_recipients(entry)
            entry.delay_warned = yield self._send_dsn(entry, delayed, dsn.DELAYED, now)
        if schedule.finished(entry):
            yield deferToThreadPool(self.reactor, self.pool, self.store.remove, entry.id)
            return
        until = entry.created + s.lifetime
        entry.next_attempt = schedule.next_attempt(entry.attempts, now, s.retry_schedule, until=until)
        yield deferToThreadPool(self.reactor, self.pool, self.store.save, entry)
        self._schedule(entry.id, entry.next_attempt)

    def _send_dsn(
        self, entry: QueueEntry, recipients: list[QueuedRecipient], kind: str, now: float
    ) -> Deferred[bool]:
        """Whether the report went out; a failure (the sender's mailbox unavailable, say) is
        logged and the pass's results are saved all the same, the report tried again next pass."""
        def build() -> bytes:
            with open(self.store.body_path(entry.id), "rb") as f:
                body = f.read(dsn.RETURN_LIMIT + 1)
            return dsn.build_dsn(
                entry,
                recipients,
                kind,
                reporting_mta=self.settings.hostname,
                now=now,
                body=body,
                product=self.settings.product,
                will_retry_until=entry.created + self.settings.lifetime,
            )

        d = deferToThreadPool(self.reactor, self.pool, build)
        d.addCallback(lambda data: self._inject_dsn(entry.sender, data))

        def logged(_: object) -> bool:
            for r in recipients:
                self.logs.mail("dsn", None, id=entry.id, kind=kind, sender=entry.sender, recipient=r.address)
            return True

        def failed(failure: Failure) -> bool:
            log.failure("report ({kind}) for {id} not sent", failure, kind=kind, id=entry.id)
            return False

        return d.addCallbacks(logged, failed)


async def _nothing() -> None:
    return None

