"""Active Directory users (SPEC §2 ``[directory]``, §3): found with a service account, checked by a bind.

A login name of the directory (``alice``, ``alice@<mail_domain>``, ``alice@<realm>``, ``DOMAIN\\alice``)
is looked up with the service account by sAMAccountName, userPrincipalName, mail and proxyAddresses;
exactly one entry must match.  Its account state is read from that entry (disabled, locked out,
expired, password to be changed), ``require_group`` is checked with the in-chain matching rule (nested
groups count), and the password is verified by a simple bind as the entry's DN on a fresh
connection.  The avatar id is the user's mail address: ``mail`` when it is in ``mail_domain``, else
``sAMAccountName@mail_domain``.

Layers, so each can be tested and reused by kmsctl:

- pure: `parse_login` (which names are the directory's), `user_filter` (escaped), `state_refusal`
  (the entry's account state), `bind_refusal` (AD's ``data NNN`` codes), `mailbox_address`;
- `DirectoryClient`: blocking ldap3 calls with connect and receive timeouts (thread pool, kmsctl);
- `Directory`: runs the client in its own bounded thread pool with an overall timeout, and caches
  recipient look-ups briefly; `DirectoryChecker`: the twisted.cred checker on top.

Outcomes follow `kms.auth.checkers`: `UnknownUser` when the name is not the directory's or matches no
entry, `AuthenticationFailed` with the reason for the security log, and `TemporaryAuthFailure` when
the DC is down, slow, refuses the service account or answers nonsense (never "wrong password", so
never a lockout count).

SECURITY: login names are hostile: every value put in a filter goes through `escape_filter_chars`, DNs
in filters too, and names with control characters never reach the DC.  An empty password would be an
anonymous bind that succeeds, so it is refused before any connection.  Passwords cross the network
only inside TLS (LDAPS, or StartTLS before the bind) verified against ``ca_file``, unless the admin set
``allow_plain_ldap``.  Values read from the DC are parsed defensively: an unreadable account state
refuses the login.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from kms.auth.credentials import IChallengeCredentials, ILoginAttempt, IPlaintextCredentials
from kms.auth.errors import AuthenticationFailed, TemporaryAuthFailure, UnknownUser
from kms.store.users import normalize_address

if TYPE_CHECKING:  # kms.config imports this module (through kms.auth.winbind)
    from kms.config import DirectoryConfig

_T = TypeVar("_T")

# userAccountControl and msDS-User-Account-Control-Computed bits (MS-ADTS 2.2.16).
UF_ACCOUNTDISABLE = 0x2
UF_LOCKOUT = 0x10
UF_PASSWORD_EXPIRED = 0x800000
_NEVER = 0x7FFFFFFFFFFFFFFF  # accountExpires: 0 or this mean "never"
_FILETIME_UNIX_EPOCH = 116444736000000000  # 1970-01-01 in 100 ns ticks since 1601-01-01
IN_CHAIN = "1.2.840.113556.1.4.1941"  # LDAP_MATCHING_RULE_IN_CHAIN: nested membership

_MAX_NAME = 256
ATTRIBUTES = (
    "sAMAccountName",
    "userPrincipalName",
    "mail",
    "userAccountControl",
    "msDS-User-Account-Control-Computed",
    "lockoutTime",
    "accountExpires",
    "pwdLastSet",
)
_PERSON = "(objectCategory=person)(objectClass=user)"

# Account states that refuse a login, as the security log words them.
DISABLED = "account disabled in the directory"
LOCKED = "account locked out in the directory"
EXPIRED = "account expired in the directory"
MUST_CHANGE = "password must be changed (directory)"
PASSWORD_EXPIRED = "password expired in the directory"
# The "data NNN" of an AD bind refusal (LDAP result 49).
_BIND_DATA = {
    "525": "no such user in the directory",
    "52e": "wrong password",
    "530": "logon not permitted at this time (directory)",
    "531": "logon not permitted from this workstation (directory)",
    "532": PASSWORD_EXPIRED,
    "533": DISABLED,
    "701": EXPIRED,
    "773": MUST_CHANGE,
    "775": LOCKED,
}
_DATA = re.compile(r"\bdata ([0-9a-f]{3,4})\b", re.IGNORECASE)


# --- settings ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DirectorySettings:
    """``[directory]`` with the service password read and the DNS realm derived from ``base_dn``."""

    uri: str
    start_tls: bool
    base_dn: str
    domain: str
    mail_domain: str
    bind_dn: str
    bind_password: str = field(repr=False)
    ca_file: Path | None = None
    require_group: str = ""
    allow_plain_ldap: bool = False
    connect_timeout: float = 5.0
    receive_timeout: int = 10  # whole seconds: ldap3 packs it into SO_RCVTIMEO as an integer

    @property
    def realm(self) -> str:
        """The AD DNS domain (``DC=kms,DC=test`` -> ``kms.test``): the suffix of user principal names."""
        return realm_of(self.base_dn)

    @property
    def encrypted(self) -> bool:
        return self.uri.lower().startswith("ldaps://") or self.start_tls

    @classmethod
    def from_config(cls, cfg: DirectoryConfig) -> DirectorySettings:
        """Read the service account's password file; ValueError naming the key when it is unusable."""
        if not cfg.bind_dn or cfg.bind_password_file is None:
            raise ValueError("directory.bind_dn and directory.bind_password_file are required (AD refuses "
                             "anonymous searches)")
        return cls(
            uri=cfg.uri,
            start_tls=cfg.start_tls,
            base_dn=cfg.base_dn,
            domain=cfg.domain,
            mail_domain=cfg.mail_domain.lower(),
            bind_dn=cfg.bind_dn,
            bind_password=read_secret(cfg.bind_password_file),
            ca_file=cfg.ca_file,
            require_group=cfg.require_group,
            allow_plain_ldap=cfg.allow_plain_ldap,
        )


def read_secret(path: Path) -> str:
    """The first line of a 0600 file: a secret that others can read is refused, not used."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise ValueError(f"directory.bind_password_file: {path}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if mode & 0o077:
            raise ValueError(f"directory.bind_password_file: {path} is open to group or others "
                             f"(mode {mode:o}; use 0600)")
        line = f.read(4096).decode("utf-8", "strict").splitlines()
    if not line or not line[0]:
        raise ValueError(f"directory.bind_password_file: {path} is empty")
    return line[0]


def realm_of(base_dn: str) -> str:
    """The DNS realm of a base DN (``DC=kms, DC=test`` → ``kms.test``); "" when it is not a DN."""
    try:
        parts = parse_dn(base_dn, strip=True)
    except LDAPException:
        return ""
    return ".".join(value for attribute, value, _ in parts if attribute.lower() == "dc").lower()


# --- pure decisions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoginName:
    """What one login name asks the directory for: an account name and/or addresses."""

    account: str
    addresses: tuple[str, ...] = ()


def parse_login(name: str, settings: DirectorySettings) -> LoginName | None:
    """The directory's reading of a login name, or None when it is not one of its names.

    ``DOMAIN\\alice`` (NetBIOS or DNS domain) asks for the account; ``alice@<mail_domain>`` and
    ``alice@<realm>`` for an address (mail, alias or principal) or the account ``alice``; a bare
    ``alice`` like ``alice@<mail_domain>``.  Empty names, over-long ones and control characters are
    no one's.
    """
    if not name or len(name) > _MAX_NAME or any(not c.isprintable() for c in name):
        return None
    domains = {settings.mail_domain, settings.realm} - {""}
    if "\\" in name:
        domain, _, account = name.partition("\\")
        if not account or domain.lower() not in {settings.domain.lower(), settings.realm} - {""}:
            return None
        return LoginName(account)
    if "@" in name:
        local, _, domain = name.rpartition("@")
        if not local or domain.lower() not in domains:
            return None
        return LoginName(local, (f"{local}@{domain.lower()}",))
    return LoginName(name, (f"{name}@{settings.mail_domain}",))


def lockout_account(name: str, settings: DirectorySettings) -> str | None:
    """``alice@<mail_domain>`` for ``DOMAIN\\alice`` and ``alice@<realm>``, the directory's other
    forms of that login name, so lockout counts them as one account (trying another form buys no
    more attempts); None for any other name, which lockout keys as it always does (a bare
    ``alice`` with the default domain, the first local one).  An alias or principal name that
    differs from the account name is not known without a search and stays its own account."""
    login = parse_login(name.strip(), settings)
    if login is None or ("\\" not in name and "@" not in name):
        return None
    return f"{login.account}@{settings.mail_domain}".lower()


def user_filter(login: LoginName) -> str:
    """The search filter for ``login``; every value escaped (``*``, ``(``, ``)``, ``\\``, NUL)."""
    alternatives = [f"(sAMAccountName={escape_filter_chars(login.account)})"]
    for address in login.addresses:
        value = escape_filter_chars(address)
        alternatives += [f"(mail={value})", f"(proxyAddresses=smtp:{value})", f"(userPrincipalName={value})"]
    return f"(&{_PERSON}(|{''.join(alternatives)}))"


def member_filter(user_dn: str) -> str:
    """Matches a group that has ``user_dn`` as a member, directly or through nested groups."""
    return f"(member:{IN_CHAIN}:={escape_filter_chars(user_dn)})"


def filetime(unix_seconds: float) -> int:
    """Unix time as AD's 100 ns ticks since 1601-01-01 (accountExpires, lockoutTime, pwdLastSet)."""
    return _FILETIME_UNIX_EPOCH + int(unix_seconds * 10_000_000)


Attributes = Mapping[str, Sequence[bytes]]


def _text(attributes: Attributes, name: str) -> str | None:
    values = attributes.get(name) or []
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _integer(attributes: Attributes, name: str, default: int | None = None) -> int | None:
    """An integer attribute; ``default`` when absent, None when present but not an integer."""
    text = _text(attributes, name)
    if text is None:
        return default if not attributes.get(name) else None
    try:
        return int(text, 10)
    except ValueError:
        return None


def state_refusal(attributes: Attributes, now: float) -> str | None:
    """Why this account may not log in now (for the security log), or None when it may.

    Lockout is read from msDS-User-Account-Control-Computed, which honours the lockout duration
    (userAccountControl never shows it); lockoutTime only where that attribute is missing.
    """
    uac = _integer(attributes, "userAccountControl")
    computed = _integer(attributes, "msDS-User-Account-Control-Computed", 0)
    lockout = _integer(attributes, "lockoutTime", 0)
    expires = _integer(attributes, "accountExpires", 0)
    pwd_last_set = _integer(attributes, "pwdLastSet", -1)
    if None in (uac, computed, lockout, expires, pwd_last_set):
        return "unreadable account state in the directory"
    assert uac is not None and computed is not None and expires is not None and lockout is not None
    if uac & UF_ACCOUNTDISABLE:
        return DISABLED
    locked = computed & UF_LOCKOUT if attributes.get("msDS-User-Account-Control-Computed") else lockout > 0
    if locked:
        return LOCKED
    if expires not in (0, _NEVER) and expires <= filetime(now):
        return EXPIRED
    if pwd_last_set == 0:
        return MUST_CHANGE
    if computed & UF_PASSWORD_EXPIRED:
        return PASSWORD_EXPIRED
    return None


def bind_refusal(result: int, message: str) -> str | None:
    """The security log's reason for a refused user bind, or None when the DC failed, not the user.

    Only invalidCredentials (49) is the user's: AD says why in ``data NNN``.  Anything else (busy,
    unavailable, TLS required, ...) is the directory's problem: a temporary failure.
    """
    if result != 49:
        return None
    found = _DATA.search(message)
    code = found.group(1).lower() if found else ""
    return _BIND_DATA.get(code, f"directory refused the bind ({code or 'no reason given'})")


def mailbox_address(attributes: Attributes, mail_domain: str) -> str | None:
    """The user's mailbox: ``mail`` when it is in ``mail_domain``, else sAMAccountName@mail_domain."""
    mail = _text(attributes, "mail")
    if mail is not None:
        try:
            address = normalize_address(mail)
        except ValueError:
            address = ""
        if address.endswith("@" + mail_domain):
            return address
    account = _text(attributes, "sAMAccountName")
    if account is None:
        return None
    try:
        return normalize_address(f"{account}@{mail_domain}")
    except ValueError:
        return None


# --- blocking client --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DirectoryUser:
    """One user entry: where it is, who it is, and whether it may log in (``refusal`` None)."""

    dn: str
    account: str
    address: str | None
    refusal: str | None


Step = Callable[[str, str], None]


class DebugLog(Protocol):
    """The part of `kms.logs.Logs` the directory writes to."""

    def debug_enabled(self, category: str) -> bool: ...

    def debug(self, category: str, event: str, client: None = None, **fields: object) -> None: ...


def _quiet(step: str, detail: str) -> None:
    """The default step report: nothing (kmsctl's ``directory test`` prints them)."""


def _close(conn: ldap3.Connection) -> None:
    """Unbind, on a connection that may already be broken (then there is nothing to tell the DC)."""
    try:
        conn.unbind()
    except LDAPException:
        pass


class DirectoryClient:
    """Blocking ldap3 operations with connect and receive timeouts: for a thread pool, or kmsctl.

    A new connection per operation: nothing to go stale when the DC restarts, and a user's bind
    never shares a connection with the service account's searches.
    """

    def __init__(self, settings: DirectorySettings) -> None:
        self.settings = settings
        parts = urlsplit(settings.uri)
        self._ldaps = parts.scheme.lower() == "ldaps"
        self._host = parts.hostname or ""
        self._port = parts.port or (636 if self._ldaps else 389)

    @property
    def where(self) -> str:
        return f"{'ldaps' if self._ldaps else 'ldap'}://{self._host}:{self._port}"

    def _server(self) -> ldap3.Server:
        """A new ldap3 Server per connection: one shared across threads would remember an outage
        (it marks addresses unavailable) and is not thread-safe."""
        tls = ldap3.Tls(
            validate=ssl.CERT_REQUIRED,
            ca_certs_file=str(self.settings.ca_file) if self.settings.ca_file else None,
        )
        return ldap3.Server(
            self._host,
            port=self._port,
            use_ssl=self._ldaps,
            tls=tls,
            get_info=ldap3.NONE,
            connect_timeout=self.settings.connect_timeout,
        )

    def connect(self, user: str, password: str, step: Step = _quiet) -> ldap3.Connection | str:
        """A bound connection, or the reason the DC refused the bind (for the security log).

        Raises `TemporaryAuthFailure` when the DC cannot be reached or TLS fails.
        """
        if not password:
            return "empty password"  # an unauthenticated bind would succeed
        if not self.settings.encrypted and not self.settings.allow_plain_ldap:
            raise TemporaryAuthFailure("plain ldap:// refused (set start_tls, use ldaps://)")
        conn = ldap3.Connection(
            self._server(),
            user=user,
            password=password,
            receive_timeout=self.settings.receive_timeout,
            auto_referrals=False,
            read_only=True,
            raise_exceptions=False,
        )
        try:
            conn.open(read_server_info=False)
            # Measured against Samba: without it, each bind over TLS stalled ~40 ms (Nagle vs delayed ACK).
            conn.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ldaps:
                step("TLS", f"LDAPS, certificate verified ({self._ca_name()})")
            elif self.settings.start_tls:
                conn.start_tls(read_server_info=False)
                step("TLS", f"StartTLS, certificate verified ({self._ca_name()})")
            else:
                step("TLS", "none: plain ldap:// (allow_plain_ldap)")
            if conn.bind():
                return conn
            result, message = conn.result.get("result", -1), str(conn.result.get("message", ""))
        except LDAPException as e:
            _close(conn)
            raise TemporaryAuthFailure(f"directory unreachable ({self.where}): {e}") from e
        _close(conn)
        reason = bind_refusal(int(result), message)
        if reason is None:
            raise TemporaryAuthFailure(f"directory bind failed ({self.where}): result {result} {message}")
        return reason

    def _ca_name(self) -> str:
        return str(self.settings.ca_file) if self.settings.ca_file else "system CAs"

    def service(self, step: Step = _quiet) -> ldap3.Connection:
        """A connection bound as the service account; its refusal is an outage, not the user's fault."""
        conn = self.connect(self.settings.bind_dn, self.settings.bind_password, step)
        if isinstance(conn, str):
            raise TemporaryAuthFailure(f"service account bind refused: {conn}")
        return conn

    def _search(
        self, conn: ldap3.Connection, base: str, search_filter: str, scope: str = ldap3.SUBTREE,
        attributes: Sequence[str] = ATTRIBUTES, size_limit: int = 0,
    ) -> list[dict[str, Any]]:
        try:
            ok = conn.search(base, search_filter, scope, attributes=list(attributes), size_limit=size_limit)
        except LDAPException as e:
            raise TemporaryAuthFailure(f"directory search failed: {e}") from e
        code = conn.result.get("result", -1)
        # sizeLimitExceeded (4) still returns the entries; noSuchObject (32) means base_dn or
        # require_group names nothing, which is the configuration's fault, not the user's.
        if not ok and code not in (0, 4):
            raise TemporaryAuthFailure(f"directory search of {base} failed: result {code} "
                                       f"{conn.result.get('description')} {conn.result.get('message')}")
        # A search from the domain root also returns referrals (searchResRef): entries only.
        return [r for r in conn.response or [] if r.get("type") == "searchResEntry"]

    def _user(self, entry: Mapping[str, Any], now: float) -> DirectoryUser:
        raw: Attributes = entry.get("raw_attributes") or {}
        address = mailbox_address(raw, self.settings.mail_domain)
        refusal = state_refusal(raw, now)
        if address is None and refusal is None:
            refusal = "no usable mail address in the directory"
        return DirectoryUser(str(entry["dn"]), _text(raw, "sAMAccountName") or "", address, refusal)

    def find(self, login: LoginName, conn: ldap3.Connection | None = None) -> DirectoryUser | None:
        """The one entry ``login`` names, or None; `AuthenticationFailed` when several match."""
        own = conn is None
        bound = self.service() if conn is None else conn
        try:
            entries = self._search(bound, self.settings.base_dn, user_filter(login), size_limit=2)
        finally:
            if own:
                _close(bound)
        if len(entries) > 1:
            raise AuthenticationFailed(f"ambiguous name: several directory entries match {login.account!r}")
        return self._user(entries[0], time.time()) if entries else None

    def group_dn(self, conn: ldap3.Connection) -> str:
        """``require_group`` as a DN: taken as is when it is one, else looked up by account name."""
        group = self.settings.require_group
        if "=" in group:
            return group
        search = f"(&(objectClass=group)(sAMAccountName={escape_filter_chars(group)}))"
        entries = self._search(conn, self.settings.base_dn, search, attributes=["cn"], size_limit=2)
        if len(entries) != 1:
            raise TemporaryAuthFailure(f"require_group {group!r}: {len(entries)} groups of that name")
        return str(entries[0]["dn"])

    def is_member(self, conn: ldap3.Connection, user_dn: str) -> bool:
        """Whether ``user_dn`` is in ``require_group``, directly or through nested groups."""
        group = self.group_dn(conn)
        return bool(self._search(conn, group, member_filter(user_dn), ldap3.BASE, attributes=["cn"]))

    def groups(self, conn: ldap3.Connection, user_dn: str) -> list[str]:
        """Every group ``user_dn`` is in, nested ones included (for kmsctl)."""
        search = f"(&(objectClass=group){member_filter(user_dn)})"
        entries = self._search(conn, self.settings.base_dn, search, attributes=["cn"])
        return sorted(str(e["dn"]) for e in entries)

    def authenticate(self, username: str, password: str) -> str:
        """The user's mailbox address when ``password`` is theirs and they may log in; else raises.

        `UnknownUser` for names that are not the directory's or match no entry.
        """
        login = parse_login(username, self.settings)
        if login is None:
            raise UnknownUser("not a directory name")
        if not password:
            raise AuthenticationFailed("empty password")
        conn = self.service()
        try:
            user = self.find(login, conn)
            if user is None:
                raise UnknownUser("no such directory user")
            if user.refusal is not None:
                raise AuthenticationFailed(user.refusal)
            bound = self.connect(user.dn, password)
            if isinstance(bound, str):
                raise AuthenticationFailed(bound)
            _close(bound)
            if self.settings.require_group and not self.is_member(conn, user.dn):
                raise AuthenticationFailed(f"not a member of {self.settings.require_group}")
        finally:
            _close(conn)
        assert user.address is not None
        return user.address

    def users(self) -> Iterator[tuple[DirectoryUser, bool | None]]:
        """Every user of the directory, with whether it is in ``require_group`` (None: no group set)."""
        conn = self.service()
        try:
            members: set[str] | None = None
            if self.settings.require_group:
                group = escape_filter_chars(self.group_dn(conn))
                search = f"(&{_PERSON}(memberOf:{IN_CHAIN}:={group}))"
                members = {str(e["dn"]).lower() for e in self._paged(conn, search, ["cn"])}
            now = time.time()
            for entry in self._paged(conn, f"(&{_PERSON})", ATTRIBUTES):
                user = self._user(entry, now)
                yield user, None if members is None else user.dn.lower() in members
        finally:
            _close(conn)

    def _paged(
        self, conn: ldap3.Connection, search: str, attributes: Sequence[str]
    ) -> Iterator[dict[str, Any]]:
        try:
            for entry in conn.extend.standard.paged_search(
                self.settings.base_dn, search, attributes=list(attributes), paged_size=500, generator=True
            ):
                if entry.get("type") == "searchResEntry":
                    yield entry
        except LDAPException as e:
            raise TemporaryAuthFailure(f"directory search failed: {e}") from e

    def diagnose(self, username: str, password: str, step: Step) -> bool:
        """``kmsctl directory test``: every step of a login, reported as it passes; False at the first
        that fails (its reason reported as step ``FAILED``)."""
        try:
            login = parse_login(username, self.settings)
            if login is None:
                names = f"{self.settings.domain}\\, @{self.settings.mail_domain}, @{self.settings.realm}"
                raise UnknownUser(f"{username!r} is not a name of this directory ({names})")
            with socket.create_connection((self._host, self._port), self.settings.connect_timeout):
                step("connect", f"{self.where} reachable")
            conn = self.service(step)
            step("service bind", f"bound as {self.settings.bind_dn}")
            try:
                user = self.find(login, conn)
                if user is None:
                    raise UnknownUser(f"no entry matches {user_filter(login)}")
                step("search", f"{user.dn} (sAMAccountName {user.account}, mailbox {user.address})")
                bound = self.connect(user.dn, password)
                if isinstance(bound, str):
                    raise AuthenticationFailed(bound)
                _close(bound)
                step("user bind", "password accepted")
                if user.refusal is not None:
                    raise AuthenticationFailed(user.refusal)
                step("state", "enabled, not locked, not expired, password valid")
                groups = self.groups(conn, user.dn)
                if self.settings.require_group and not self.is_member(conn, user.dn):
                    raise AuthenticationFailed(f"not a member of {self.settings.require_group}; "
                                               f"member of: {'; '.join(groups) or 'no groups'}")
                step("groups", "; ".join(groups) or "no groups")
            finally:
                _close(conn)
        except AuthenticationFailed as e:
            step("FAILED", e.reason)
            return False
        except (TemporaryAuthFailure, OSError) as e:
            step("FAILED", str(e))
            return False
        return True


# --- the server's side: pool, timeout, cache, checker -----------------------------------------------


class Directory:
    """The directory for the running server: every ldap3 call in ``pool``, bounded by ``timeout``.

    ``pool`` is the directory's own (a slow DC must not hold the user DB's or the store's threads);
    its size bounds the connections to the DC.  A call that waits in the pool past its deadline
    gives up without touching the DC.  Recipient look-ups are remembered for ``cache_ttl`` seconds,
    misses too, so a dictionary attack over RCPT does not become one search per guess.  With
    ``logs``, each call's outcome and duration go to the debug category ``ldap``.
    """

    def __init__(
        self,
        client: DirectoryClient,
        pool: ThreadPool,
        reactor: Any,
        clock: IReactorTime | None = None,
        timeout: float = 20.0,
        cache_ttl: float = 30.0,
        cache_size: int = 10_000,
        logs: DebugLog | None = None,
    ) -> None:
        self.client = client
        self._logs = logs
        self.settings = client.settings
        self._pool = pool
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._timeout = timeout
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        self._mailboxes: dict[str, tuple[str | None, float]] = {}

    def owns(self, username: str) -> bool:
        """Whether ``username`` is one of the directory's login names (no look-up)."""
        return parse_login(username, self.settings) is not None

    def _run(self, operation: str, name: str, work: Callable[..., _T], *args: Any) -> Deferred[_T]:
        started = self._clock.seconds()
        deadline = started + self._timeout

        def bounded() -> _T:
            if self._clock.seconds() > deadline:
                raise TemporaryAuthFailure("directory busy: no thread free before the timeout")
            return work(*args)

        d: Deferred[_T] = deferToThreadPool(self._reactor, self._pool, bounded)
        d.addTimeout(self._timeout, self._clock)
        d.addErrback(self._timed_out)
        if self._logs is not None and self._logs.debug_enabled("ldap"):
            d.addBoth(self._debug, operation, name, started)
        return d

    def _debug(self, result: _T | Failure, operation: str, name: str, started: float) -> _T | Failure:
        """One debug line per call, on the reactor thread (never the password: it is not at hand)."""
        assert self._logs is not None
        if isinstance(result, Failure):
            error = result.value
            reason = error.reason if isinstance(error, AuthenticationFailed) else str(error)
            outcome = f"{type(error).__name__}: {reason}"
        else:
            outcome = "ok" if result is not None else "not found"
        elapsed = round((self._clock.seconds() - started) * 1000)
        self._logs.debug("ldap", operation, user=name, outcome=outcome, ms=elapsed)
        return result

    def _timed_out(self, failure: Failure) -> Failure:
        if failure.check(defer.TimeoutError):
            raise TemporaryAuthFailure(f"directory did not answer within {self._timeout:g} s")
        return failure

    def authenticate(self, username: str, password: str) -> Deferred[str]:
        """The mailbox address of the directory user ``username`` if ``password`` is theirs."""
        return self._run("authenticate", username, self.client.authenticate, username, password)

    def find(self, username: str) -> Deferred[DirectoryUser | None]:
        """The directory user ``username`` names, or None (`UnknownUser` is not raised here)."""
        login = parse_login(username, self.settings)
        if login is None:
            return defer.succeed(None)
        return self._run("lookup", username, self.client.find, login)

    def mailbox(self, address: str) -> Deferred[str | None]:
        """The mailbox for mail to ``address`` (mail, alias, principal or account at ``mail_domain``).

        None for other domains, unknown, ambiguous or disabled users; `TemporaryAuthFailure` when
        the DC cannot say.
        """
        local, _, domain = address.rpartition("@")
        if not local or domain.lower() != self.settings.mail_domain:
            return defer.succeed(None)
        key = address.lower()
        now = self._clock.seconds()
        hit = self._mailboxes.get(key)
        if hit is not None and hit[1] > now:
            return defer.succeed(hit[0])

        def found(user: DirectoryUser | None) -> str | None:
            mailbox = None
            if user is not None and user.refusal != DISABLED:
                mailbox = user.address
            if len(self._mailboxes) >= self._cache_size:  # bounded: guesses must not grow it forever
                self._mailboxes.clear()
            self._mailboxes[key] = (mailbox, self._clock.seconds() + self._cache_ttl)
            return mailbox

        def ambiguous(failure: Failure) -> Failure | None:
            return None if failure.check(AuthenticationFailed) else failure

        return self.find(address).addCallbacks(found, ambiguous)

    def address_for(self, username: str) -> Deferred[str]:
        """The mailbox address of a user the DC already authenticated (NTLM's ``DOMAIN\\alice``)."""

        def found(user: DirectoryUser | None) -> str:
            if user is None or user.address is None:
                raise AuthenticationFailed(f"{username} has no entry or address in the directory")
            return user.address

        return self.find(username).addCallback(found)


@implementer(ICredentialsChecker)
class DirectoryChecker:
    """Directory users' logins (SPEC §3): a password checked by a bind; challenge methods refused.

    Placed after `LocalUserChecker` (local users first) in the `CompositeChecker`.  A challenge
    mechanism (CRAM-MD5, DIGEST-MD5, SCRAM, APOP) needs a secret the directory never gives out, so
    for a directory user it fails like a wrong password, with the reason logged.
    """

    credentialInterfaces = (IPlaintextCredentials, IChallengeCredentials)

    def __init__(self, directory: Directory) -> None:
        self._directory = directory

    def requestAvatarId(self, credentials: ILoginAttempt) -> Deferred[str]:  # type: ignore[override]
        """The user's mailbox address, or a failure from `kms.auth.errors`."""
        username = credentials.username
        if not self._directory.owns(username):
            return defer.fail(UnknownUser("not a directory name"))
        plaintext = IPlaintextCredentials(credentials, None)
        if plaintext is None:
            return self._directory.find(username).addCallback(self._impossible, credentials.mechanism)
        if not plaintext.password:
            return defer.fail(AuthenticationFailed("empty password"))
        d = self._directory.authenticate(username, plaintext.password)
        return d.addCallback(self._authorized, credentials)

    @staticmethod
    def _impossible(user: DirectoryUser | None, mechanism: str) -> str:
        if user is None:
            raise UnknownUser("no such directory user")
        raise AuthenticationFailed(f"{mechanism} impossible for {user.address or user.dn}: directory user")

    @staticmethod
    def _authorized(address: str, credentials: ILoginAttempt) -> str:
        authzid = credentials.authzid
        if authzid and authzid.lower() not in (address, credentials.username.lower()):
            raise AuthenticationFailed(f"may not act as {authzid}")
        return address
