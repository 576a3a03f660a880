"""NTLM for directory users: winbind's ``ntlm_auth`` checks their answers against the domain controller.

kms never sees a directory user's password or NT hash, so it cannot check an NTLM answer itself.
The DC can, and on a domain member (or the DC) winbindd exposes that check to ``ntlm_auth``, which
Squid and Dovecot drive as a long-lived helper over stdin/stdout.  This module does the same:

- `HelperPool` (a service): up to ``size`` helper processes started with ``reactor.spawnProcess``,
  each driven by a `ProcessProtocol` one line at a time, one exchange per helper; stderr is drained
  (ntlm_auth prints a line there for every failure); every request has a timeout; a helper that
  hangs is killed, one that dies is replaced by the next login that needs one.  Either way the
  login in flight fails *temporarily*, never as a wrong password.
- `DirectoryNTLM`: the SASL NTLM mechanism whose CHALLENGE comes from a helper, and
  `WinbindChecker`: the checker that sends the client's AUTHENTICATE to that same helper.

Protocol: ``squid-2.5-ntlmssp`` (the SPEC default, Dovecot's ``auth_winbind_helper_path``)::

    >> YR <client NEGOTIATE>      << TT <CHALLENGE for the client>
    >> KK <client AUTHENTICATE>   << AF KMS\\alice | NA NT_STATUS_... | BH <helper error>

The helper builds the CHALLENGE and keeps the server challenge, so the helper is leased to the
client from NEGOTIATE until AUTHENTICATE (`lease_timeout` bounds a client that never answers), and
whether the user is a directory user or a local one can only be decided at AUTHENTICATE, when the
name arrives.  That decision is the checker chain's: the credentials also carry the helper's
CHALLENGE (`kms.auth.ntlm.parse_challenge`), so `LocalUserChecker` verifies local (reversible)
users exactly as before, and only a user it does not know reaches `WinbindChecker`, which sends
``KK`` when the name is the directory's.  When no helper can issue the CHALLENGE (all busy, dead,
not installed) the mechanism issues its own: local users do not depend on the helpers, and
directory users fail temporarily.

``ntlm-server-1`` (we issue the challenge and send only the response) would hold a helper for one
DC round trip instead of a client round trip, but it reports failures only as English prose (no NT
status to map), answers a failure with two ``.`` lines, and never names the account it
authenticated; ``squid-2.5-ntlmssp`` gives the NT status and the canonical ``DOMAIN\\user``.
Other protocols are refused when the configuration is loaded.

SECURITY.  The client's messages are parsed by `kms.auth.ntlm` before a byte reaches the helper
and are passed on base64-encoded, so no client byte can end a helper line early.  The helper's
replies are parsed strictly too: a reply out of turn, too long or not in the protocol kills the
helper.  Only accounts of the configured NetBIOS domain are accepted from ``AF``.  No password or
hash crosses the pipe; NTLM for directory users is off unless ``allow_ntlm_for_directory_users``.
"""

from __future__ import annotations

import base64
import binascii
import re
import shlex
import shutil
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.service import MultiService, Service
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from zope.interface import Attribute, implementer

from kms.auth.credentials import ILoginAttempt
from kms.auth.directory import DISABLED, EXPIRED, LOCKED, MUST_CHANGE, PASSWORD_EXPIRED, realm_of
from kms.auth.errors import AuthenticationFailed, MalformedResponse, TemporaryAuthFailure, UnknownUser
from kms.auth.exchange import Challenge, MechanismSession, StepResult
from kms.auth.ntlm import (
    NTLM,
    AuthenticateMessage,
    ChallengeState,
    NegotiateMessage,
    NTLMCredentials,
    login_name,
    parse_challenge,
)

if TYPE_CHECKING:
    from kms.config import DirectoryConfig, SecurityConfig

HELPER_PROTOCOL = "squid-2.5-ntlmssp"
DEFAULT_HELPER = f"/usr/bin/ntlm_auth --helper-protocol={HELPER_PROTOCOL}"
# A CHALLENGE line is a few hundred bytes; anything near this is not ntlm_auth talking.
MAX_REPLY_BYTES = 16384
_STDERR_KEPT = 300

# NA codes that are the account's or the password's fault: a refusal, counted by lockout like a
# wrong password, worded as the LDAP checker words them.  Any other code (no logon servers, trust
# failure, ...) is an outage: temporary.
REFUSALS = {
    "NT_STATUS_LOGON_FAILURE": "wrong password or unknown user",
    "NT_STATUS_WRONG_PASSWORD": "wrong password",
    "NT_STATUS_NO_SUCH_USER": "unknown user",
    "NT_STATUS_ACCOUNT_LOCKED_OUT": LOCKED,
    "NT_STATUS_ACCOUNT_DISABLED": DISABLED,
    "NT_STATUS_ACCOUNT_EXPIRED": EXPIRED,
    "NT_STATUS_PASSWORD_EXPIRED": PASSWORD_EXPIRED,
    "NT_STATUS_PASSWORD_MUST_CHANGE": MUST_CHANGE,
    "NT_STATUS_INVALID_LOGON_HOURS": "outside the account's logon hours",
    "NT_STATUS_INVALID_WORKSTATION": "not allowed from this workstation",
    "NT_STATUS_ACCOUNT_RESTRICTION": "account restriction",
    "NT_STATUS_LOGON_TYPE_NOT_GRANTED": "logon type not granted",
    "NT_STATUS_NTLM_BLOCKED": "NTLM blocked by the domain",
}
_NT_STATUS = re.compile(r"NT_STATUS_[A-Z0-9_]+")


# --- configuration: pure ---------------------------------------------------------------------------


def helper_command(command: str, domain: str, require_group: str) -> list[str]:
    """The helper's argv: ``[directory] ntlm_helper`` split like a shell would, plus the group.

    ValueError (for the config loader, naming what is wrong) when the command is empty, badly
    quoted, or does not run ``--helper-protocol=squid-2.5-ntlmssp``.  ``require_group`` becomes
    ``--require-membership-of``, so the DC refuses non-members before we see an answer.
    """
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise ValueError(f"cannot be split into arguments: {e}") from None
    if not argv:
        raise ValueError("is empty")
    protocols = [arg.partition("=")[2] for arg in argv if arg.startswith("--helper-protocol=")]
    if protocols != [HELPER_PROTOCOL] or "--helper-protocol" in argv:
        raise ValueError(f"must run exactly one --helper-protocol={HELPER_PROTOCOL} (the one kms speaks)")
    if require_group:
        argv.append(f"--require-membership-of={membership_name(domain, require_group)}")
    return argv


def config_problems(domain: str, command: str, require_group: str) -> list[tuple[str, str]]:
    """``(key, problem)`` pairs of ``[directory]`` when NTLM for directory users is allowed."""
    problems = []
    if not domain:
        problems.append(("domain", "is required when security.allow_ntlm_for_directory_users = true"))
    try:
        helper_command(command, domain, "")
    except ValueError as e:
        problems.append(("ntlm_helper", str(e)))
    if require_group:
        try:
            membership_name(domain, require_group)
        except ValueError as e:
            problems.append(("require_group", str(e)))
    return problems


def helper_missing(command: str) -> str | None:
    """Why the helper program cannot run here (for the start-up checks), or None."""
    program = shlex.split(command)[0]
    if shutil.which(program) is None:
        return f"{program} is not an executable program here (Debian: apt-get install winbind)"
    return None


def membership_name(domain: str, group: str) -> str:
    """What ``--require-membership-of`` takes for ``require_group``: ``DOMAIN\\group`` or a SID.

    A DN (what the LDAP checker's nested-membership filter uses) names the group by its first
    RDN's value, which for groups made with the usual tools is also the group's account name.
    """
    group = group.strip()
    if "\\" in group.split("=", 1)[0] or group.upper().startswith("S-1-"):
        return group
    if "=" in group:
        first = re.split(r"(?<!\\),", group, maxsplit=1)[0]
        group = re.sub(r"\\(.)", r"\1", first.partition("=")[2].strip())
    if not group:
        raise ValueError("names no group")
    return f"{domain.upper()}\\{group}"


@dataclass(frozen=True)
class DirectoryNames:
    """How NTLM names a directory user, from ``[directory]``.

    ``dns_domains`` holds ``mail_domain`` and the DNS name of ``base_dn`` (``DC=kms,DC=test`` is
    ``kms.test``, the domain of userPrincipalNames).
    """

    nb_domain: str
    mail_domain: str
    dns_domains: frozenset[str]

    @classmethod
    def from_config(cls, domain: str, mail_domain: str, base_dn: str) -> DirectoryNames:
        realm = realm_of(base_dn)
        dns = {mail_domain.lower()} | ({realm} if realm else set())
        return cls(domain.upper(), mail_domain.lower(), frozenset(dns))

    def login_name(self, user: str, domain: str) -> str:
        """The login name lockout, the local checker and the security log use for an AUTHENTICATE.

        ``KMS\\alice`` (the directory's NetBIOS or DNS domain) is ``alice@<mail_domain>``, the name
        her plaintext logins have; everything else is named as `kms.auth.ntlm.login_name` does.
        """
        if "@" not in user and (domain.upper() == self.nb_domain or domain.lower() in self.dns_domains):
            return f"{user}@{self.mail_domain}"
        return login_name(user, domain)

    def owns(self, name: str) -> bool:
        """Whether a login name may be the directory's: bare, or in its mail or DNS domain.

        As the LDAP checker reads names; the chain asks only after the local users said "unknown".
        """
        return "@" not in name or name.rpartition("@")[2].lower() in self.dns_domains

    def address(self, account: str) -> str:
        """The mailbox of ``DOMAIN\\sam`` when nothing better is known: ``sam@mail_domain``."""
        return account.partition("\\")[2].lower() + "@" + self.mail_domain


# --- helper replies: pure -----------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One squid-2.5-ntlmssp answer: ``code`` is TT, AF, NA or BH."""

    code: str
    argument: str


def parse_reply(line: bytes) -> Reply:
    """A helper line, strictly: UTF-8, a known code, printable; ValueError otherwise."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("helper reply is not UTF-8") from None
    code, _, argument = text.partition(" ")
    if code not in ("TT", "AF", "NA", "BH") or not text.isprintable():
        raise ValueError(f"helper reply {text[:60]!r} is not squid-2.5-ntlmssp")
    return Reply(code, argument.strip())


def refusal(status: str, group: str) -> AuthenticationFailed | TemporaryAuthFailure:
    """What an ``NA`` means: a refusal naming its reason, or, for an unknown code, an outage."""
    code = _NT_STATUS.match(status)
    name = code.group(0) if code else status[:80]
    reason = REFUSALS.get(name)
    if reason is None:
        return TemporaryAuthFailure(f"NTLM helper: {name}")
    if name == "NT_STATUS_LOGON_FAILURE" and group:
        # The DC answers a non-member exactly like a wrong password.
        reason = f"wrong password, unknown user or not a member of {group}"
    return AuthenticationFailed(f"{reason} ({name})")


def account_name(argument: str, nb_domain: str) -> str:
    """The ``DOMAIN\\user`` of an ``AF``, only for our domain: a trusted domain's ``bob`` is not ours."""
    domain, sep, user = argument.partition("\\")
    if not sep or not user or not user.isprintable():
        raise TemporaryAuthFailure(f"NTLM helper named no DOMAIN\\user: {argument[:80]!r}")
    if domain.upper() != nb_domain:
        raise AuthenticationFailed(f"NTLM account {argument} is not of domain {nb_domain}")
    return f"{nb_domain}\\{user}"


# --- the helper processes ------------------------------------------------------------------------


class HelperLog(Protocol):
    """What the pool writes to: the error log (`kms.logs.Logs.error`)."""

    def error(self, event: str, client: Any = None, **fields: object) -> None: ...


class _Helper(ProcessProtocol):
    """One ntlm_auth process: a line out, a line back, one request at a time."""

    def __init__(self, pool: HelperPool) -> None:
        self._pool = pool
        self._buffer = b""
        self._waiting: defer.Deferred[bytes] | None = None
        self._timer: IDelayedCall | None = None
        self._killer: IDelayedCall | None = None
        self.pid: int | None = None
        self.alive = True
        self.stderr = ""
        self.ended: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)  # kept: the transport forgets it at exit

    def request(self, line: bytes, timeout: float) -> defer.Deferred[bytes]:
        """Send one line; the answer is the next line (its lease makes sure nobody else asks)."""
        if not self.alive or self.transport is None:
            return defer.fail(TemporaryAuthFailure(f"NTLM helper exited ({self.stderr or 'no message'})"))
        self._waiting = defer.Deferred()
        self._timer = self._pool.clock.callLater(timeout, self._timed_out, timeout)
        self.transport.write(line + b"\n")
        return self._waiting

    def kill(self, why: str) -> None:
        """Stop a helper that cannot be trusted any more; its request fails temporarily."""
        if self.alive:
            self._pool.log("ntlm-helper-killed", pid=self.pid, reason=why)
        self.alive = False
        self._fail(TemporaryAuthFailure(f"NTLM helper killed: {why}"))
        self.signal("KILL")

    def signal(self, name: str) -> None:
        try:
            if self.transport is not None:
                self.transport.signalProcess(name)
        except ProcessExitedAlready:
            pass

    def stop(self, killer: IDelayedCall) -> None:
        """End of service: fail what is pending and close stdin, on which ntlm_auth exits.

        ``killer`` sends SIGKILL later, unless the helper has exited by then.
        """
        self._killer = killer
        self.alive = False
        self._fail(TemporaryAuthFailure("NTLM helpers are stopping"))
        if self.transport is not None:
            self.transport.closeStdin()

    def _timed_out(self, timeout: float) -> None:
        self._timer = None
        self.kill(f"no answer within {timeout:g} s")

    def _fail(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if waiting is not None:
            waiting.errback(error)

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        while self.alive and b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            waiting, self._waiting = self._waiting, None
            if waiting is None:
                self.kill("output nobody asked for")
                return
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            waiting.callback(line)
        if len(self._buffer) > MAX_REPLY_BYTES:
            self.kill(f"reply longer than {MAX_REPLY_BYTES} bytes")

    def errReceived(self, data: bytes) -> None:
        # Drained always (a full pipe would stall the helper); the last line explains a death.
        lines = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
        if lines:
            self.stderr = lines[-1].strip()[:_STDERR_KEPT]

    def processEnded(self, reason: Failure) -> None:
        was_alive, self.alive = self.alive, False
        status = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        if was_alive and not self._pool.stopping:
            self._pool.log(
                "ntlm-helper-exited", pid=self.pid, status=status, signal=signal, stderr=self.stderr or "-"
            )
        if self._killer is not None and self._killer.active():
            self._killer.cancel()
        self._pool.ended(self)  # first: what the failure below sets off must not find this helper
        self._fail(TemporaryAuthFailure(f"NTLM helper exited ({self.stderr or f'status {status}'})"))
        self.ended.callback(None)


@dataclass(eq=False)
class Lease:
    """One helper, reserved for one client's exchange until `release` (or the lease timeout)."""

    pool: HelperPool
    helper: _Helper | None
    timer: IDelayedCall | None = field(default=None, repr=False)

    def request(self, line: bytes) -> defer.Deferred[Reply]:
        """Send a line and parse the answer; a reply outside the protocol kills the helper."""
        helper = self.helper
        if helper is None:
            return defer.fail(TemporaryAuthFailure("NTLM exchange expired before the client answered"))
        self._stop_timer()

        def parsed(line: bytes) -> Reply:
            try:
                return parse_reply(line)
            except ValueError as e:
                helper.kill(str(e))
                raise TemporaryAuthFailure(str(e)) from None

        d = helper.request(line, self.pool.timeout)
        return d.addCallback(parsed)

    def wait_for_client(self) -> None:
        """The helper now waits for the client: give it back if the client takes too long."""
        self._stop_timer()
        self.timer = self.pool.clock.callLater(self.pool.lease_timeout, self.release)

    def kill(self, why: str) -> None:
        if self.helper is not None:
            self.helper.kill(why)
        self.release()

    def release(self) -> None:
        """Give the helper back; safe to call any number of times."""
        self._stop_timer()
        helper, self.helper = self.helper, None
        if helper is not None:
            self.pool.give_back(helper)

    def _stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class HelperPool(Service):
    """Up to ``size`` long-lived helpers, started when first needed; stopped with the server.

    ``timeout`` bounds each request (and a wait for a free helper), ``lease_timeout`` the time a
    client may take between its NEGOTIATE and its AUTHENTICATE.  At most ``max_waiting`` logins
    queue for a helper; beyond that they fail temporarily at once.
    """

    def __init__(
        self,
        argv: list[str],
        reactor: Any,
        clock: IReactorTime | None = None,
        size: int = 4,
        timeout: float = 10.0,
        lease_timeout: float = 10.0,
        max_waiting: int = 32,
        logs: HelperLog | None = None,
    ) -> None:
        self.setName("ntlm-helpers")
        self.argv = argv
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.size = size
        self.timeout = timeout
        self.lease_timeout = lease_timeout
        self.max_waiting = max_waiting
        self._logs = logs
        self.stopping = False
        self.helpers: list[_Helper] = []
        self._idle: list[_Helper] = []
        self._waiters: deque[tuple[defer.Deferred[Lease], IDelayedCall]] = deque()
        self.spawned = 0

    def log(self, event: str, **fields: object) -> None:
        if self._logs is not None:
            self._logs.error(event, **fields)

    def lease(self) -> defer.Deferred[Lease]:
        """A helper of one's own, or `TemporaryAuthFailure` when none frees up in time."""
        if self.stopping:
            return defer.fail(TemporaryAuthFailure("NTLM helpers are stopping"))
        while self._idle:
            helper = self._idle.pop()
            if helper.alive:
                return defer.succeed(Lease(self, helper))
        if len(self.helpers) < self.size:
            try:
                return defer.succeed(Lease(self, self._spawn()))
            except OSError as e:
                self.log("ntlm-helper-spawn-failed", command=self.argv[0], error=str(e))
                return defer.fail(TemporaryAuthFailure(f"cannot start the NTLM helper: {e}"))
        if len(self._waiters) >= self.max_waiting:
            return defer.fail(TemporaryAuthFailure(f"all {self.size} NTLM helpers busy"))
        waiting: defer.Deferred[Lease] = defer.Deferred()
        timer = self.clock.callLater(self.timeout, self._gave_up, waiting)
        self._waiters.append((waiting, timer))
        return waiting

    def _spawn(self) -> _Helper:
        helper = _Helper(self)
        self.reactor.spawnProcess(helper, self.argv[0], self.argv, env=None)
        self.helpers.append(helper)
        self.spawned += 1
        return helper

    def _gave_up(self, waiting: defer.Deferred[Lease]) -> None:
        self._waiters = deque(w for w in self._waiters if w[0] is not waiting)
        waiting.errback(TemporaryAuthFailure(f"no NTLM helper free within {self.timeout:g} s"))

    def _next_waiter(self) -> defer.Deferred[Lease] | None:
        if not self._waiters:
            return None
        waiting, timer = self._waiters.popleft()
        timer.cancel()
        return waiting

    def give_back(self, helper: _Helper) -> None:
        if not helper.alive or self.stopping:
            return
        waiting = self._next_waiter()
        if waiting is None:
            self._idle.append(helper)
        else:
            waiting.callback(Lease(self, helper))

    def ended(self, helper: _Helper) -> None:
        """A helper exited: forget it, and start its replacement if a login waits for one."""
        self.helpers = [h for h in self.helpers if h is not helper]
        self._idle = [h for h in self._idle if h is not helper]
        if self.stopping:
            return
        waiting = self._next_waiter()
        if waiting is not None:
            self.lease().chainDeferred(waiting)

    def stopService(self) -> defer.Deferred[Any]:
        """Close every helper's stdin (ntlm_auth exits on EOF) and kill what is still there later."""
        super().stopService()
        self.stopping = True
        while self._waiters:
            waiting, timer = self._waiters.popleft()
            timer.cancel()
            waiting.errback(TemporaryAuthFailure("NTLM helpers are stopping"))
        ended = [helper.ended for helper in self.helpers]
        for helper in list(self.helpers):
            helper.stop(self.clock.callLater(self.timeout, helper.signal, "KILL"))
        return defer.DeferredList(ended)


# --- one client's exchange ------------------------------------------------------------------------


class WinbindExchange:
    """One client's NTLM exchange through one leased helper: the CHALLENGE, then the verdict.

    ``unavailable`` says why no helper issued the CHALLENGE (the mechanism then issued its own,
    so local users still log in); a directory user's verdict is then a temporary failure.
    """

    def __init__(self, pool: HelperPool, names: DirectoryNames, group: str = "") -> None:
        self._pool = pool
        self._names = names
        self._group = group
        self._lease: Lease | None = None
        self.unavailable: str | None = None

    async def challenge(self, negotiate: NegotiateMessage) -> ChallengeState:
        """``YR`` with the client's NEGOTIATE; the helper's ``TT`` is what the client gets."""
        self._lease = lease = await self._pool.lease()
        reply = await lease.request(b"YR " + base64.b64encode(negotiate.raw))
        if reply.code != "TT":
            answer = f"{reply.code} {reply.argument[:80]}"
            lease.kill(f"{answer} instead of TT")
            raise TemporaryAuthFailure(f"NTLM helper refused the NEGOTIATE: {answer}")
        try:
            state = parse_challenge(base64.b64decode(reply.argument, validate=True), negotiate)
        except (binascii.Error, MalformedResponse) as e:
            lease.kill(f"unusable CHALLENGE: {e}")
            raise TemporaryAuthFailure(f"NTLM helper sent an unusable CHALLENGE: {e}") from None
        lease.wait_for_client()
        return state

    async def authenticate(self, message: AuthenticateMessage) -> str:
        """``KK`` with the client's AUTHENTICATE: our domain's ``DOMAIN\\user``, or why not."""
        lease = self._lease
        if lease is None or self.unavailable is not None:
            raise TemporaryAuthFailure(f"NTLM helper unavailable: {self.unavailable or 'no CHALLENGE'}")
        reply = await lease.request(b"KK " + base64.b64encode(message.raw))
        if reply.code == "AF":
            lease.release()
            return account_name(reply.argument, self._names.nb_domain)
        if reply.code == "NA":
            lease.release()
            raise refusal(reply.argument, self._group)
        if reply.code == "BH":
            # winbindd unreachable or the DC down: the helper itself is fine (YR resets it).
            lease.release()
        else:
            lease.kill(f"TT {reply.argument[:40]} out of turn")
        raise TemporaryAuthFailure(f"NTLM helper: {reply.code} {reply.argument[:80]}")

    def release(self) -> None:
        if self._lease is not None:
            self._lease.release()


# --- credentials, checker, mechanism ---------------------------------------------------------------


class IWinbindCredentials(ILoginAttempt):
    """An NTLM AUTHENTICATE that the directory's helper can check (when NTLM is allowed for it)."""

    message = Attribute("AuthenticateMessage: what the client sent")
    exchange = Attribute("WinbindExchange | None: the helper holding the challenge; None when not allowed")


@implementer(IWinbindCredentials)
@dataclass(frozen=True, eq=False)
class DirectoryNTLMCredentials(NTLMCredentials):
    """`NTLMCredentials` (so local users are checked locally) that a directory user's helper can check."""

    exchange: WinbindExchange | None = field(default=None, repr=False)


AddressLookup = Callable[[str], defer.Deferred[str]]


@implementer(ICredentialsChecker)
class WinbindChecker:
    """Directory users' NTLM logins: the helper's verdict, mapped to the user's address.

    Placed after `LocalUserChecker` in the chain (local users keep their local check) and before
    any other checker that takes challenge credentials.  ``address_for`` turns ``KMS\\alice`` into
    her mailbox address (the directory's ``mail``); without one it is ``alice@<mail_domain>``.
    """

    credentialInterfaces = (IWinbindCredentials,)

    def __init__(self, names: DirectoryNames, address_for: AddressLookup | None = None) -> None:
        self._names = names
        self._address_for = address_for

    def requestAvatarId(self, credentials: IWinbindCredentials) -> defer.Deferred[str]:  # type: ignore[override]
        return defer.ensureDeferred(self._check(credentials))

    async def _check(self, credentials: IWinbindCredentials) -> str:
        name = credentials.username
        if not self._names.owns(name):
            raise UnknownUser("not a directory user")
        exchange = credentials.exchange
        if exchange is None:
            raise AuthenticationFailed(
                f"NTLM not allowed for directory user {name} (allow_ntlm_for_directory_users is off)"
            )
        account: str = await exchange.authenticate(credentials.message)
        if self._address_for is None:
            return self._names.address(account)
        address: str = await self._address_for(account)
        return address


class DirectoryNTLM(NTLM):
    """SASL NTLM when ``[directory]`` is configured: the CHALLENGE comes from a winbind helper.

    Without a pool (``allow_ntlm_for_directory_users`` off) the CHALLENGE is ours, and
    `WinbindChecker` refuses directory users with the reason logged; without a free, working
    helper it is ours too, and directory users fail temporarily.  The helper goes back to the
    pool once the AUTHENTICATE has been answered, whoever answered it.
    """

    def __init__(
        self,
        session: MechanismSession,
        names: DirectoryNames,
        pool: HelperPool | None = None,
        group: str = "",
        allow_v1: bool = False,
    ) -> None:
        super().__init__(session, allow_v1=allow_v1, nb_domain=names.nb_domain or None)
        self._names = names
        self._exchange = None if pool is None else WinbindExchange(pool, names, group)

    def _challenge(self, negotiate: NegotiateMessage) -> Challenge | defer.Deferred[Challenge]:
        exchange = self._exchange
        if exchange is None:
            return super()._challenge(negotiate)

        def issued(state: ChallengeState) -> Challenge:
            self._state = state
            return Challenge(state.challenge)

        def own(failure: Failure) -> Challenge | defer.Deferred[Challenge]:
            # No helper (all busy, broken, missing): local users need none, so go on without.
            exchange.release()
            failure.trap(TemporaryAuthFailure)
            exchange.unavailable = str(failure.value)
            return NTLM._challenge(self, negotiate)

        d: defer.Deferred[ChallengeState] = defer.ensureDeferred(exchange.challenge(negotiate))
        return d.addCallbacks(issued, own)

    def _credentials(self, message: AuthenticateMessage, state: ChallengeState) -> NTLMCredentials:
        username = self._names.login_name(message.user, message.domain)
        return DirectoryNTLMCredentials(
            username, message, state, self._allow_v1, self._session.client, exchange=self._exchange
        )

    def _advance(self, response: bytes | None) -> StepResult:
        if self._exchange is None or self._state is None or response is None:
            return super()._advance(response)
        d: defer.Deferred[Any] = defer.maybeDeferred(super()._advance, response)  # type: ignore[arg-type]
        return d.addBoth(self._released)

    def _released(self, result: Any) -> Any:
        self.abort()
        return result

    def abort(self) -> None:
        """A client that cancels, starts over or leaves between CHALLENGE and AUTHENTICATE gives
        its helper back now, not after ``lease_timeout`` (a pool of four would otherwise be held
        by four dropped connections)."""
        super().abort()
        if self._exchange is not None:
            self._exchange.release()


def directory_ntlm(
    directory: DirectoryConfig,
    security: SecurityConfig,
    reactor: Any,
    logs: HelperLog,
    parent: MultiService,
    address_for: AddressLookup | None = None,
) -> tuple[Callable[[MechanismSession], DirectoryNTLM], WinbindChecker]:
    """The NTLM mechanism factory and its checker for a server with ``[directory]``.

    The helper pool exists only when ``allow_ntlm_for_directory_users`` is on; it is a child of
    ``parent``, so its helpers stop with the server.  ``address_for`` is where the directory's own
    ``KMS\\alice`` -> ``mail`` look-up plugs in (default: ``alice@<mail_domain>``).
    """
    d = directory
    names = DirectoryNames.from_config(d.domain, d.mail_domain, d.base_dn)
    group = membership_name(d.domain, d.require_group) if d.require_group else ""
    pool = None
    if security.allow_ntlm_for_directory_users:
        argv = helper_command(d.ntlm_helper, d.domain, d.require_group)
        pool = HelperPool(argv, reactor, logs=logs)
        pool.setServiceParent(parent)
    factory = partial(DirectoryNTLM, names=names, pool=pool, group=group, allow_v1=security.allow_ntlmv1)
    return factory, WinbindChecker(names, address_for)
