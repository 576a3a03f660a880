"""Config in, a running server out: the one place that knows how the parts are wired together.

`build_service` turns a validated `Config` into a `MultiService`: the store on disk, the logs, the
thread pools (one for the user database and password hashing, one set of maildir writer threads,
one for the mailbox store), the cred portal, and one endpoint service per configured listener
(SMTP, submission, SMTPS, POP3(S), IMAP(S)).  Each part is a small
service so ``twistd`` starts and stops them in order.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from kms import __version__
from kms.auth.checkers import CompositeChecker, LocalUserChecker, UnlessDisabledHere
from kms.auth.directory import (
    Directory,
    DirectoryChecker,
    DirectoryClient,
    DirectorySettings,
    lockout_account,
)
from kms.auth.lockout import Lockout, LockoutDB, LockoutSettings
from kms.auth.master import Master
from kms.auth.ntlm import NTLM
from kms.auth.passwords import StoreKey
from kms.auth.policy import SecurityPolicy, engine_policy
from kms.auth.realm import Realm
from kms.auth.sasl import MechanismFactory, SASLEngine
from kms.auth.session import LoginSession
from kms.auth.winbind import directory_ntlm
from kms.clientinfo import ClientInfo
from kms.config import IMPLICIT_TLS_LISTENERS, Config
from kms.dns import make_resolver
from kms.imap.message import analyze
from kms.imap.server import IMAPFactory, IMAPSettings
from kms.limits import ConnectionCounter, ConnectionLimits, RefusingFactory, raise_descriptor_limit
from kms.logs import Logs
from kms.pop3.server import POP3Factory, POP3Settings
from kms.queue.client import attempt
from kms.queue.mx import HopCache, resolve_hops, smarthost_hops
from kms.queue.runner import QueueRunner, RunnerSettings, read_credentials
from kms.queue.store import QueueStore
from kms.rdns import ClientNamer, ClientNamerService
from kms.smtp.delivery import LocalDelivery, RecipientResolver, RelayRules
from kms.smtp.server import SMTPFactory, SMTPSettings
from kms.store.mailbox import MailStore
from kms.store.maildir import MaildirWriter
from kms.store.space import SpaceWatch
from kms.store.users import UserDB
from kms.tls import server_context_factory
from kms.updatechecker import STATE_FILE, Checker, UpdateChecker

log = Logger()

SMTP_LISTENERS = ("smtp", "submission", "smtps")


class StorePaths:
    """Where things live inside ``[store] path``; created with owner-only permissions."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mail = root / "mail"
        self.tmp = root / "tmp"
        self.logs = root / "logs"
        self.users_db = root / "users.db"
        self.store_key = root / "store.key"
        self.lockout_db = root / "lockout.db"
        self.master = root / "master.json"
        self.queue = root / "queue"

    def create(self) -> None:
        for d in (self.root, self.mail, self.tmp):
            d.mkdir(mode=0o750, parents=(d is self.root), exist_ok=True)


class _Stoppable(Service):
    """Runs ``start`` and ``stop`` callables with the service (thread pools, writer, logs)."""

    def __init__(self, name: str, start: Callable[[], object], stop: Callable[[], object]) -> None:
        self.setName(name)
        self._start = start
        self._stop = stop

    def startService(self) -> None:
        super().startService()
        self._start()

    def stopService(self):  # type: ignore[no-untyped-def]
        super().stopService()
        return self._stop()


class _ReopenLogsOnHangup(Service):
    """SIGHUP reopens the log files, so logrotate can move them away (``postrotate: kill -HUP``)."""

    def __init__(self, logs: Logs, reactor: Any) -> None:
        self.setName("log-rotation")
        self._logs = logs
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _hangup(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self._reopen)

    def _reopen(self) -> None:
        try:
            self._logs.reopen()
        except OSError as e:
            log.error("cannot reopen the logs: {error}", error=e)
        else:
            log.info("kms logs reopened")


class _ListenerService(StreamServerEndpointService):
    """An endpoint service that says where it listens once it does (and fails the start if it can't)."""

    def __init__(self, name: str, description: str, endpoint, factory) -> None:  # type: ignore[no-untyped-def]
        super().__init__(endpoint, factory)
        self.setName(name)
        self._description = description
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._waitingForPort is not None:
            self._waitingForPort.addCallback(self._listening)

    def _listening(self, port):  # type: ignore[no-untyped-def]
        log.info("kms {name} listening on {where}", name=self.name, where=self._description)
        return port


def _freeze_startup_heap() -> None:
    """Once per process, after start-up: what is alive now (modules, classes, functions; ~50,000
    objects that live as long as the process) leaves the cyclic collector's reach, so each full
    collection walks only what came later (a STORE 1:* on 10,000 messages starts one: 40-90 ms
    before, ~5 ms after; docs/performance.md, third round)."""
    if not gc.get_freeze_count():
        gc.collect()
        gc.freeze()


def _listen(
    top: MultiService,
    reactor: Any,
    name: str,
    description: str,
    factory: RefusingFactory,
    implicit_tls: Any,
    limits: ConnectionLimits,
) -> None:
    """One listener; ``implicit_tls`` (a context) wraps the factory in TLS from the first byte.

    The connection limits sit inside TLS: one slot per TCP connection, and refusals the client can read.
    """
    limited = limits.wrap(factory, name)
    wrapped = TLSMemoryBIOFactory(implicit_tls, False, limited) if implicit_tls is not None else limited
    _ListenerService(name, description, serverFromString(reactor, description), wrapped).setServiceParent(top)


def _queue_runner(
    cfg: Config,
    top: MultiService,
    reactor: Any,
    logs: Logs,
    paths: StorePaths,
    deliver_report: Callable[[str, bytes], Any],
) -> QueueRunner:
    """The outbound queue (issue 9): its store (crash clean-up happens here), pool, DNS and runner."""
    store = QueueStore(paths.queue, report=lambda line: logs.error("queue-store", detail=line))
    pool = ThreadPool(minthreads=1, maxthreads=4, name="kms-queue")
    _Stoppable("queue-pool", pool.start, pool.stop).setServiceParent(top)
    resolver = make_resolver(cfg.dns, reactor)
    relay = cfg.relay
    hops = HopCache(reactor)

    def resolve(target: str) -> Any:
        if relay.smarthost:
            return hops.resolve(target, lambda: smarthost_hops(resolver, relay.smarthost, reactor=reactor))
        return hops.resolve(target, lambda: resolve_hops(resolver, target, relay.mx_port, reactor=reactor))

    credentials = None
    if relay.smarthost and relay.smarthost_credentials_file is not None:
        credentials = read_credentials(relay.smarthost_credentials_file)
    settings = RunnerSettings(
        hostname=cfg.server.hostname,
        product=None if cfg.misc.hide_version else f"kms {__version__}",
        smarthost=relay.smarthost,
        smarthost_tls=relay.smarthost_tls,
        smarthost_credentials=credentials,
        require_tls=relay.require_tls,
        require_tls_domains=relay.require_tls_domains,
        ca_file=relay.ca_file,
        lifetime=relay.max_queue_lifetime,
        retry_schedule=cfg.queue.retry_schedule,
        delay_warning=cfg.queue.delay_warning,
        max_connections=cfg.queue.max_connections,
        max_per_domain=cfg.queue.max_per_domain,
    )
    runner = QueueRunner(
        store,
        pool,
        reactor,
        logs,
        settings,
        resolve=resolve,
        attempt=partial(attempt, pool=pool),
        inject_dsn=deliver_report,
    )
    runner.setServiceParent(top)  # after its pool: stops first
    return runner


def build_service(cfg: Config, reactor: Any) -> MultiService:
    """Assemble every part of the server for ``cfg``; nothing listens until the service starts.

    ``reactor`` is the running reactor: it provides time, threads and TCP (no one interface does).
    """
    top = MultiService()
    paths = StorePaths(cfg.store.path)
    paths.create()
    logs = Logs(paths.logs, cfg.logs.debug)
    _Stoppable("logs", lambda: None, logs.close).setServiceParent(top)
    _ReopenLogsOnHangup(logs, reactor).setServiceParent(top)
    store = cfg.store
    space = SpaceWatch(paths.root, store.soft_limit, store.hard_limit, store.hard_limit_action, logs, reactor)
    space.setServiceParent(top)

    auth_pool = ThreadPool(minthreads=1, maxthreads=4, name="kms-auth")
    _Stoppable("auth-pool", auth_pool.start, auth_pool.stop).setServiceParent(top)
    users = UserDB(paths.users_db)
    key = StoreKey.load_or_create(paths.store_key)
    default_domain = cfg.domains.local[0]
    local_users = LocalUserChecker(users, key, auth_pool, reactor, default_domain=default_domain)
    checkers: list[ICredentialsChecker] = [local_users]
    ntlm: MechanismFactory = partial(NTLM, allow_v1=cfg.security.allow_ntlmv1)
    directory: Directory | None = None
    directory_account: Callable[[str], str | None] | None = None
    if cfg.directory is not None:
        # The directory's own pool: a slow DC must not hold the user DB's threads.
        directory_pool = ThreadPool(minthreads=0, maxthreads=4, name="kms-directory")
        _Stoppable("directory-pool", directory_pool.start, directory_pool.stop).setServiceParent(top)
        directory_settings = DirectorySettings.from_config(cfg.directory)
        directory_account = partial(lockout_account, settings=directory_settings)
        client = DirectoryClient(directory_settings)
        directory = Directory(client, directory_pool, reactor, logs=logs)
        # NTLM for directory users (winbind's ntlm_auth): its checker right after the local users',
        # before the directory's, which refuses every other challenge method for directory users.
        ntlm, winbind = directory_ntlm(
            cfg.directory, cfg.security, reactor, logs, top, address_for=directory.address_for
        )
        def disabled_here(address: str) -> Any:
            def look() -> bool:
                record = users.get(address)
                return record is not None and not record.enabled

            return deferToThreadPool(reactor, auth_pool, look)

        checkers += [UnlessDisabledHere(c, disabled_here) for c in (winbind, DirectoryChecker(directory))]
    checker = CompositeChecker(checkers)
    portal = Portal(Realm(), [checker])
    policy = SecurityPolicy(cfg.security.policy, cfg.group(cfg.security.exception_group))
    engine = SASLEngine(cfg.security.methods, engine_policy(policy), factories={"NTLM": ntlm})

    writer = MaildirWriter(reactor)
    _Stoppable("maildir-writer", writer.start, writer.stop).setServiceParent(top)
    store_pool = ThreadPool(minthreads=1, maxthreads=4, name="kms-store")
    mail_store = MailStore(paths.mail, store_pool, reactor, analyze, space=space)

    def stop_store() -> Deferred[None]:
        """Close every folder (its pending work done, its snapshot written) in the pool, and only
        then stop the pool: MultiService stops its children all at once, and a folder close
        queued behind a running operation would otherwise reach a pool already stopped."""
        return mail_store.close().addBoth(lambda _: store_pool.stop())

    _Stoppable("mail-store", store_pool.start, stop_store).setServiceParent(top)

    backend = LocalDelivery(
        hostname=cfg.server.hostname,
        rules=RelayRules(cfg.domains.local, cfg.group(cfg.relay.local_group), cfg.relay.allow_authenticated),
        resolver=RecipientResolver(
            users, auth_pool, reactor, cfg.domains.catch_all, default_domain, directory=directory
        ),
        writer=writer,
        pool=auth_pool,
        reactor=reactor,
        logs=logs,
        mail_root=paths.mail,
        spool_dir=paths.tmp,
        hide_version=cfg.misc.hide_version,
        hide_local_ip=cfg.misc.hide_local_ip,
        x_envelope_to=cfg.misc.x_envelope_to,
        on_delivered=mail_store.delivered,
        decode_tnef=cfg.misc.decode_tnef,
        decode_uuencode=cfg.misc.decode_uuencode,
        max_message_size=cfg.smtp.max_message_size,
        space=space,
    )
    backend.outbound = _queue_runner(cfg, top, reactor, logs, paths, backend.deliver_report)

    lockout: Lockout | None = None
    if cfg.lockout.enabled:
        exception_group = cfg.group(cfg.security.exception_group)
        lockout_db = LockoutDB(paths.lockout_db)
        _Stoppable("lockout-db", lambda: None, lockout_db.close).setServiceParent(top)
        lockout_settings = LockoutSettings(
            attempts=cfg.lockout.attempts,
            unlock_after=cfg.lockout.unlock_after,
            exempt_known_ips=cfg.lockout.exempt_known_ips,
            excepted=exception_group.contains,
            default_domain=default_domain,
            directory_account=directory_account,
        )
        lockout = Lockout(lockout_db, lockout_settings, auth_pool, reactor, reactor, logs=logs)

    master: Master | None = None
    if cfg.master.enabled:

        def find_user(username: str) -> str | None:
            try:
                record = users.get(local_users.qualify(username))
            except ValueError:
                return None
            return record.address if record is not None and record.enabled else None

        group = cfg.group(cfg.master.group)
        master = Master(paths.master, key, group.contains, find_user, auth_pool, reactor)

    namer: ClientNamer | None = None
    if cfg.misc.resolve_client_names:
        namer = ClientNamer(partial(make_resolver, cfg.dns), reactor)
        ClientNamerService(namer).setServiceParent(top)

    def session_factory(client: ClientInfo) -> LoginSession:
        if namer is not None:
            namer.name(client)  # fire and forget: the session never waits for DNS
        return LoginSession(
            portal,
            engine,
            client,
            logs,
            clock=reactor,
            hostname=cfg.server.hostname,
            scram_lookup=local_users.scram_parameters,
            lockout=lockout,
            master=master,
        )

    tls_context: Any = None
    if cfg.tls.certificate and cfg.tls.private_key:
        tls_context = server_context_factory(cfg.tls.certificate, cfg.tls.private_key)
    banner = "ESMTP" if cfg.misc.hide_version else f"ESMTP kms {__version__}"
    counter = ConnectionCounter(
        cfg.limits.max_connections,
        cfg.limits.max_connections_per_ip,
        cfg.group(cfg.limits.exempt_group).contains,
    )
    limits = ConnectionLimits(counter, reactor, logs)
    descriptors = raise_descriptor_limit(cfg.limits.max_connections)
    if descriptors is not None:
        logs.error("open-file-limit", detail=descriptors)

    for name in SMTP_LISTENERS:
        if name not in cfg.listeners:
            continue
        implicit = name in IMPLICIT_TLS_LISTENERS
        settings = SMTPSettings(
            hostname=cfg.server.hostname,
            listener=name,
            banner=banner,
            ehlo_greeting="" if cfg.misc.hide_version else f"kms {__version__}",
            implicit_tls=implicit,
            require_auth=name in ("submission", "smtps"),
            max_message_size=cfg.smtp.max_message_size,
            max_recipients=cfg.smtp.max_recipients,
            max_errors=cfg.smtp.max_errors,
            command_timeout=cfg.smtp.command_timeout,
            data_timeout=cfg.smtp.data_timeout,
        )
        starttls = None if implicit else tls_context
        factory: RefusingFactory = SMTPFactory(
            settings, backend, session_factory, starttls, clock=reactor, logs=logs
        )
        _listen(top, reactor, name, cfg.listeners[name], factory, tls_context if implicit else None, limits)

    product = None if cfg.misc.hide_version else f"kms {__version__}"
    for name in ("pop3", "pop3s", "imap", "imaps"):
        if name not in cfg.listeners:
            continue
        implicit = name in IMPLICIT_TLS_LISTENERS
        starttls = None if implicit else tls_context
        if name.startswith("pop3"):
            pop3 = POP3Settings(
                hostname=cfg.server.hostname,
                listener=name,
                implicit_tls=implicit,
                banner_product=product,
                policy=policy,
            )
            factory = POP3Factory(
                pop3, mail_store.account, session_factory, starttls, clock=reactor, logs=logs
            )
        else:
            imap = IMAPSettings(
                hostname=cfg.server.hostname,
                listener=name,
                implicit_tls=implicit,
                hide_version=cfg.misc.hide_version,
                append_limit=cfg.smtp.max_message_size,
                policy=policy,
            )
            factory = IMAPFactory(
                imap, mail_store.account, session_factory, starttls, clock=reactor, logs=logs
            )
        _listen(top, reactor, name, cfg.listeners[name], factory, tls_context if implicit else None, limits)

    if cfg.update.check and cfg.update.feed_url:
        update_checker = Checker(
            cfg.update,
            cfg.proxy,
            paths.root / STATE_FILE,
            logs,
            reactor,
            partial(make_resolver, cfg.dns, reactor),
            partial(deferToThreadPool, reactor, store_pool),
        )
        UpdateChecker(update_checker, reactor, cfg.update.interval).setServiceParent(top)

    _Stoppable("gc-freeze", _freeze_startup_heap, lambda: None).setServiceParent(top)  # started last
    return top
