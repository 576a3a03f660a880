"""The configuration file (SPEC §2): TOML in, frozen dataclasses out, every problem at once.

`load_config` reads the file once.  It never stops at the first mistake: it walks every section,
collects one line per problem naming the key (``smtp.max_message_size: "50XB" is not a size``),
refuses unknown keys (a typo must not silently become a default), and raises `ConfigError` with
all of them.  Checks that depend on the machine rather than the file (a certificate that must
exist before the server can listen) are in `runtime_problems`, so `kmsctl` can work on a config
whose certificate does not exist yet.  Relative paths resolve against the config file's folder.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kms.auth.matrix import method_warnings
from kms.auth.winbind import DEFAULT_HELPER, config_problems, helper_missing
from kms.ipgroups import IPGroup, parse_group
from kms.store.space import start_problem

T = TypeVar("T")

LISTENER_NAMES = ("smtp", "submission", "smtps", "pop3", "pop3s", "imap", "imaps")
IMPLICIT_TLS_LISTENERS = frozenset({"smtps", "pop3s", "imaps"})
KNOWN_METHODS = ("SCRAM-SHA-256", "CRAM-MD5", "DIGEST-MD5", "LOGIN", "NTLM", "PLAIN")
_EMPTY_GROUP = parse_group([])
DEBUG_CATEGORIES = ("message_decoding", "update_checker", "auth", "ldap", "smtp", "imap", "pop3")


class ConfigError(Exception):
    """The file cannot be used; ``problems`` holds one line per problem, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ServerConfig:
    hostname: str


@dataclass(frozen=True)
class TLSConfig:
    certificate: Path | None
    private_key: Path | None


@dataclass(frozen=True)
class DomainsConfig:
    local: tuple[str, ...]
    catch_all: Mapping[str, str]


@dataclass(frozen=True)
class RelayConfig:
    local_group: str
    allow_authenticated: bool
    smarthost: str
    smarthost_credentials_file: Path | None
    require_tls: bool
    max_queue_lifetime: float
    smarthost_tls: str = "starttls"
    require_tls_domains: tuple[str, ...] = ()
    ca_file: Path | None = None
    mx_port: int = 25


@dataclass(frozen=True)
class DNSConfig:
    """Where look-ups go (MX for the queue, PTR/A for client names); empty = /etc/resolv.conf."""

    servers: tuple[tuple[str, int], ...] = ()
    timeout: float = 5.0


@dataclass(frozen=True)
class QueueConfig:
    """Outbound queue behaviour (retries, delay warnings, concurrency)."""

    retry_schedule: tuple[float, ...] = (300.0, 900.0, 1800.0, 3600.0)
    delay_warning: float = 4 * 3600.0
    max_connections: int = 20
    max_per_domain: int = 4


@dataclass(frozen=True)
class LimitsConfig:
    """Open connections on all listeners together and per client address (kms/limits.py)."""

    max_connections: int = 2000
    max_connections_per_ip: int = 50
    exempt_group: str = ""  # IP group never limited per address


@dataclass(frozen=True)
class SMTPConfig:
    max_message_size: int
    max_recipients: int
    max_errors: int
    command_timeout: float
    data_timeout: float


@dataclass(frozen=True)
class MiscConfig:
    resolve_client_names: bool
    hide_version: bool
    hide_local_ip: bool
    x_envelope_to: bool
    decode_tnef: bool
    decode_uuencode: bool


@dataclass(frozen=True)
class SecurityConfig:
    policy: str
    exception_group: str
    methods: tuple[str, ...]
    password_storage: str
    allow_ntlm_for_directory_users: bool
    allow_ntlmv1: bool


@dataclass(frozen=True)
class LockoutConfig:
    enabled: bool
    attempts: int
    unlock_after: float
    exempt_known_ips: bool


@dataclass(frozen=True)
class StoreConfig:
    path: Path
    soft_limit: int
    hard_limit: int
    hard_limit_action: str


@dataclass(frozen=True)
class MasterConfig:
    enabled: bool
    group: str


@dataclass(frozen=True)
class DirectoryConfig:
    uri: str
    start_tls: bool
    base_dn: str
    domain: str
    mail_domain: str
    bind_dn: str
    bind_password_file: Path | None
    ca_file: Path | None
    ntlm_helper: str
    require_group: str
    allow_plain_ldap: bool


@dataclass(frozen=True)
class ProxyConfig:
    address: str
    port: int
    username: str
    password_file: Path | None


@dataclass(frozen=True)
class UpdateConfig:
    check: bool
    beta: bool
    feed_url: str
    interval: float
    timeout: float = 30.0  # the whole fetch: look-up, connect, proxy, TLS, every byte
    ca_file: Path | None = None  # trust for an https feed; None = the system store


@dataclass(frozen=True)
class LogsConfig:
    debug: tuple[str, ...]


@dataclass(frozen=True)
class Config:
    """The whole file, validated.  ``path`` is the file it came from (absolute)."""

    path: Path
    server: ServerConfig
    listeners: Mapping[str, str]
    tls: TLSConfig
    domains: DomainsConfig
    ip_groups: Mapping[str, IPGroup]
    relay: RelayConfig
    smtp: SMTPConfig
    misc: MiscConfig
    security: SecurityConfig
    lockout: LockoutConfig
    store: StoreConfig
    master: MasterConfig
    directory: DirectoryConfig | None
    proxy: ProxyConfig | None
    update: UpdateConfig
    logs: LogsConfig = field(default_factory=lambda: LogsConfig(debug=()))
    dns: DNSConfig = field(default_factory=DNSConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def group(self, name: str) -> IPGroup:
        """The named IP group; an empty group for "" (validation guarantees the others exist)."""
        return self.ip_groups.get(name, _EMPTY_GROUP) if name else _EMPTY_GROUP


# --- value parsers: pure, raise ValueError with a message fit to follow "key: " ------------------

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def parse_size(value: object) -> int:
    """``"50MB"`` → 50,000,000; KB/MB/GB are decimal, KiB/MiB/GiB binary; an int is bytes."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a size")
    m = _SIZE_RE.match(value)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _SIZE_UNITS:
        raise ValueError(f'"{value}" is not a size (use e.g. "50MB", "1GiB" or bytes)')
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: object) -> float:
    """``"30m"`` → 1800.0 seconds; units s, m, h, d, w; a bare number is seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration")
    m = _DURATION_RE.match(value)
    if not m:
        raise ValueError(f'"{value}" is not a duration (use e.g. "90s", "30m", "24h", "5d")')
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def is_unc_path(value: str) -> bool:
    r"""``\\host\share`` and ``//host/share``: network paths the seed refuses for the store."""
    return value.startswith("\\\\") or value.startswith("//")


def is_domain(value: str) -> bool:
    return bool(_HOSTNAME_RE.match(value))


# --- the section walker --------------------------------------------------------------------------


class _Section:
    """Reads one TOML table, recording problems instead of raising, and remembers the keys used."""

    def __init__(self, loader: _Loader, name: str, table: object) -> None:
        self.loader = loader
        self.name = name
        if table is None:
            table = {}
        if not isinstance(table, dict):
            loader.problem(name, "must be a table")
            table = {}
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def _get(self, key: str, default: T, kind: type | tuple[type, ...], kind_name: str) -> T:
        self.used.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            self.loader.problem(f"{self.name}.{key}", f"must be {kind_name}, not {value!r}")
            return default
        return value  # type: ignore[return-value]

    def text(self, key: str, default: str = "") -> str:
        return self._get(key, default, str, "a string")

    def flag(self, key: str, default: bool) -> bool:
        return self._get(key, default, bool, "true or false")

    def integer(self, key: str, default: int, minimum: int | None = None) -> int:
        value = self._get(key, default, int, "an integer")
        if minimum is not None and value < minimum:
            self.loader.problem(f"{self.name}.{key}", f"must be at least {minimum}, not {value}")
            return default
        return value

    def str_list(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self._get(key, list(default), list, "a list of strings")
        if not all(isinstance(v, str) for v in value):
            self.loader.problem(f"{self.name}.{key}", "must be a list of strings")
            return default
        return tuple(value)

    def parsed(self, key: str, default: object, parser: Callable[[object], T]) -> T:
        self.used.add(key)
        raw = self.table.get(key, default)
        try:
            return parser(raw)
        except ValueError as e:
            self.loader.problem(f"{self.name}.{key}", str(e))
            return parser(default)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(key, default)
        if value not in choices:
            self.loader.problem(f"{self.name}.{key}", f'must be one of {", ".join(choices)}, not "{value}"')
            return default
        return value

    def path(self, key: str, default: str = "") -> Path | None:
        value = self.text(key, default)
        return self.loader.resolve(value) if value else None

    def finish(self) -> None:
        for key in sorted(set(self.table) - self.used):
            self.loader.problem(f"{self.name}.{key}", "unknown key")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


class _Loader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def resolve(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    def section(self, data: dict[str, Any], name: str, build: Callable[[_Section], T]) -> T:
        s = _Section(self, name, data.get(name))
        result = build(s)
        s.finish()
        return result


def load_config(path: Path | str) -> Config:
    """Read and validate the file; raise ConfigError listing every problem found."""
    path = Path(path).absolute()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from e
    return _build(_Loader(path), data)


def _build(ld: _Loader, data: dict[str, Any]) -> Config:
    known = {
        "server",
        "listeners",
        "tls",
        "domains",
        "ip_groups",
        "relay",
        "smtp",
        "misc",
        "security",
        "lockout",
        "store",
        "master",
        "directory",
        "proxy",
        "update",
        "logs",
        "dns",
        "queue",
        "limits",
    }
    for name in sorted(set(data) - known):
        ld.problem(name, "unknown section")

    server = ld.section(data, "server", _server)
    listeners = ld.section(data, "listeners", _listeners)
    tls = ld.section(data, "tls", lambda s: TLSConfig(s.path("certificate"), s.path("private_key")))
    domains = _domains(ld, data.get("domains"))
    ip_groups = _ip_groups(ld, data.get("ip_groups"))
    relay = ld.section(data, "relay", _relay)
    smtp = ld.section(data, "smtp", _smtp)
    misc = ld.section(data, "misc", _misc)
    security = ld.section(data, "security", _security)
    lockout = ld.section(data, "lockout", _lockout)
    store = ld.section(data, "store", _store)
    master = ld.section(data, "master", lambda s: MasterConfig(s.flag("enabled", False), s.text("group", "")))
    directory = ld.section(data, "directory", _directory) if "directory" in data else None
    proxy = ld.section(data, "proxy", _proxy) if "proxy" in data else None
    if proxy is not None and not proxy.address:
        proxy = None  # an empty [proxy] table, as in SPEC §2: direct connections
    update = ld.section(data, "update", _update)
    logs = ld.section(data, "logs", _logs)
    dns = ld.section(data, "dns", _dns)
    queue = ld.section(data, "queue", _queue)
    limits = ld.section(data, "limits", _limits)

    for key, group in (
        ("relay.local_group", relay.local_group),
        ("security.exception_group", security.exception_group),
        ("master.group", master.group),
        ("limits.exempt_group", limits.exempt_group),
    ):
        if group and group not in ip_groups:
            ld.problem(key, f'names IP group "{group}", which [ip_groups] does not define')
    if directory is not None and security.allow_ntlm_for_directory_users:
        for key, problem in config_problems(directory.domain, directory.ntlm_helper, directory.require_group):
            ld.problem(f"directory.{key}", problem)
    if master.enabled and not master.group:
        ld.problem("master.group", "is required when master.enabled = true")
    for domain in domains.catch_all:
        if domain not in domains.local:
            ld.problem(f"domains.catch_all.{domain}", "is not one of domains.local")
    if listeners.keys() & IMPLICIT_TLS_LISTENERS and not (tls.certificate and tls.private_key):
        ld.problem("tls", "certificate and private_key are required for smtps/pop3s/imaps listeners")

    if ld.problems:
        raise ConfigError(ld.problems)
    return Config(
        path=ld.path,
        server=server,
        listeners=listeners,
        tls=tls,
        domains=domains,
        ip_groups=ip_groups,
        relay=relay,
        smtp=smtp,
        misc=misc,
        security=security,
        lockout=lockout,
        store=store,
        master=master,
        directory=directory,
        proxy=proxy,
        update=update,
        logs=logs,
        dns=dns,
        queue=queue,
        limits=limits,
    )


def _server(s: _Section) -> ServerConfig:
    hostname = s.text("hostname", "")
    if not hostname:
        s.loader.problem("server.hostname", "is required (the name in banners and Received headers)")
    elif not is_domain(hostname):
        s.loader.problem("server.hostname", f'"{hostname}" is not a valid host name')
    return ServerConfig(hostname=hostname or "localhost")


def _listeners(s: _Section) -> dict[str, str]:
    from twisted.internet.endpoints import _parseServer  # the parser behind serverFromString

    result = {}
    for name in LISTENER_NAMES:
        value = s.text(name, "")
        if not value:
            continue
        try:
            _parseServer(value, None)
        except Exception as e:  # the parser raises assorted types for assorted typos
            s.loader.problem(f"listeners.{name}", f'"{value}" is not a Twisted endpoint string ({e})')
            continue
        result[name] = value
    return result


def _domains(ld: _Loader, table: object) -> DomainsConfig:
    s = _Section(ld, "domains", table)
    local = tuple(d.lower() for d in s.str_list("local"))
    if not local:
        ld.problem("domains.local", "must name at least one local domain")
    for d in local:
        if not is_domain(d):
            ld.problem("domains.local", f'"{d}" is not a valid domain')
    s.used.add("catch_all")
    raw = s.table.get("catch_all", {})
    catch_all: dict[str, str] = {}
    if not isinstance(raw, dict):
        ld.problem("domains.catch_all", "must be a table of domain = local part")
    else:
        for domain, user in raw.items():
            if not isinstance(user, str) or not user or "@" in user:
                ld.problem(f"domains.catch_all.{domain}", "must be the local part of a user of that domain")
            else:
                catch_all[domain.lower()] = user.lower()
    s.finish()
    return DomainsConfig(local=local, catch_all=catch_all)


def _ip_groups(ld: _Loader, table: object) -> dict[str, IPGroup]:
    if table is None:
        return {}
    if not isinstance(table, dict):
        ld.problem("ip_groups", "must be a table of name = [addresses]")
        return {}
    groups = {}
    for name, entries in table.items():
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            ld.problem(f"ip_groups.{name}", "must be a list of addresses, networks or ranges")
            continue
        try:
            groups[name] = parse_group(entries)
        except ValueError as e:
            ld.problem(f"ip_groups.{name}", str(e))
    return groups


def _relay(s: _Section) -> RelayConfig:
    smarthost = s.text("smarthost", "")
    if smarthost and not re.match(r"^[A-Za-z0-9.-]+:\d{1,5}$|^\[[0-9A-Fa-f:.]+\]:\d{1,5}$", smarthost):
        s.loader.problem("relay.smarthost", f'"{smarthost}" must be "host:port"')
    return RelayConfig(
        local_group=s.text("local_group", ""),
        allow_authenticated=s.flag("allow_authenticated", True),
        smarthost=smarthost,
        smarthost_credentials_file=s.path("smarthost_credentials_file"),
        require_tls=s.flag("require_tls", False),
        max_queue_lifetime=s.parsed("max_queue_lifetime", "5d", parse_duration),
        smarthost_tls=s.choice(
            "smarthost_tls", "starttls", ("starttls", "implicit", "opportunistic", "none")
        ),
        require_tls_domains=tuple(d.lower() for d in s.str_list("require_tls_domains")),
        ca_file=s.path("ca_file"),
        mx_port=s.integer("mx_port", 25, minimum=1),
    )


def parse_server_address(value: str, default_port: int = 53) -> tuple[str, int]:
    """``"192.0.2.1"``, ``"192.0.2.1:5353"``, ``"[2001:db8::1]:53"`` or ``"::1"`` -> (ip, port)."""
    host, port = value, default_port
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f'"{value}" is not an address')
            port = int(rest[1:])
    elif value.count(":") == 1:
        host, _, p = value.partition(":")
        port = int(p)
    ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f'"{value}": port out of range')
    return host, port


def _dns(s: _Section) -> DNSConfig:
    servers = []
    for value in s.str_list("servers"):
        try:
            servers.append(parse_server_address(value))
        except ValueError:
            s.loader.problem("dns.servers", f'"{value}" is not an IP address with an optional :port')
    timeout = s.parsed("timeout", "5s", parse_duration)
    if timeout <= 0:
        s.loader.problem("dns.timeout", "must be more than 0")
    return DNSConfig(servers=tuple(servers), timeout=timeout or 5.0)


def _queue(s: _Section) -> QueueConfig:
    schedule = []
    for value in s.str_list("retry_schedule", ("5m", "15m", "30m", "1h")):
        try:
            schedule.append(parse_duration(value))
        except ValueError as e:
            s.loader.problem("queue.retry_schedule", str(e))
    if not schedule or any(d <= 0 for d in schedule):
        s.loader.problem("queue.retry_schedule", "must list at least one duration above 0")
    return QueueConfig(
        retry_schedule=tuple(schedule) or (300.0,),
        delay_warning=s.parsed("delay_warning", "4h", parse_duration),
        max_connections=s.integer("max_connections", 20, minimum=1),
        max_per_domain=s.integer("max_per_domain", 4, minimum=1),
    )


def _limits(s: _Section) -> LimitsConfig:
    return LimitsConfig(
        max_connections=s.integer("max_connections", 2000, minimum=1),
        max_connections_per_ip=s.integer("max_connections_per_ip", 50, minimum=1),
        exempt_group=s.text("exempt_group", ""),
    )


def _smtp(s: _Section) -> SMTPConfig:
    size = s.parsed("max_message_size", "50MB", parse_size)
    if size < 1024:
        s.loader.problem("smtp.max_message_size", "must be at least 1KB")
    return SMTPConfig(
        max_message_size=size,
        max_recipients=s.integer("max_recipients", 100, minimum=1),
        max_errors=s.integer("max_errors", 10, minimum=1),
        command_timeout=s.parsed("command_timeout", "5m", parse_duration),
        data_timeout=s.parsed("data_timeout", "10m", parse_duration),
    )


def _misc(s: _Section) -> MiscConfig:
    return MiscConfig(
        resolve_client_names=s.flag("resolve_client_names", False),
        hide_version=s.flag("hide_version", True),
        hide_local_ip=s.flag("hide_local_ip", False),
        x_envelope_to=s.flag("x_envelope_to", True),
        decode_tnef=s.flag("decode_tnef", True),
        decode_uuencode=s.flag("decode_uuencode", True),
    )


def _security(s: _Section) -> SecurityConfig:
    methods = tuple(
        m.upper() for m in s.str_list("methods", ("CRAM-MD5", "DIGEST-MD5", "LOGIN", "NTLM", "PLAIN"))
    )
    for m in methods:
        if m not in KNOWN_METHODS:
            s.loader.problem("security.methods", f'"{m}" is not one of {", ".join(KNOWN_METHODS)}')
    if len(set(methods)) != len(methods):
        s.loader.problem("security.methods", "lists a method twice")
    return SecurityConfig(
        policy=s.choice("policy", "none", ("none", "secure_auth", "encrypted")),
        exception_group=s.text("exception_group", ""),
        methods=methods,
        password_storage=s.choice("password_storage", "des", ("des", "sha")),
        allow_ntlm_for_directory_users=s.flag("allow_ntlm_for_directory_users", False),
        allow_ntlmv1=s.flag("allow_ntlmv1", False),
    )


def _lockout(s: _Section) -> LockoutConfig:
    return LockoutConfig(
        enabled=s.flag("enabled", True),
        attempts=s.integer("attempts", 5, minimum=1),
        unlock_after=s.parsed("unlock_after", "30m", parse_duration),
        exempt_known_ips=s.flag("exempt_known_ips", True),
    )


def _store(s: _Section) -> StoreConfig:
    raw = s.text("path", "")
    if not raw:
        s.loader.problem("store.path", "is required")
        path = s.loader.resolve("store")
    elif is_unc_path(raw):
        s.loader.problem("store.path", f'"{raw}" is a UNC path; the store must be on a local disk')
        path = s.loader.resolve("store")
    else:
        path = s.loader.resolve(raw)
    soft = s.parsed("soft_limit", "1GB", parse_size)
    hard = s.parsed("hard_limit", "100MB", parse_size)
    if "hard_limit" in s.table and hard == 0:
        s.loader.problem(
            "store.hard_limit", "must not be 0 (the seed: new mail would be refused or warned about)"
        )
    elif hard > soft:
        s.loader.problem("store.hard_limit", "must not be above store.soft_limit")
    return StoreConfig(
        path=path,
        soft_limit=soft,
        hard_limit=hard,
        hard_limit_action=s.choice("hard_limit_action", "refuse", ("refuse", "stop")),
    )


def _directory(s: _Section) -> DirectoryConfig:
    d = DirectoryConfig(
        uri=s.text("uri"),
        start_tls=s.flag("start_tls", False),
        base_dn=s.text("base_dn"),
        domain=s.text("domain"),
        mail_domain=s.text("mail_domain").lower(),
        bind_dn=s.text("bind_dn"),
        bind_password_file=s.path("bind_password_file"),
        ca_file=s.path("ca_file"),
        ntlm_helper=s.text("ntlm_helper", DEFAULT_HELPER),
        require_group=s.text("require_group"),
        allow_plain_ldap=s.flag("allow_plain_ldap", False),
    )
    # bind_dn and its password too: AD answers no anonymous searches.
    for key in ("uri", "base_dn", "mail_domain", "bind_dn", "bind_password_file"):
        if not getattr(d, key):
            s.loader.problem(f"directory.{key}", "is required when [directory] is present")
    if d.uri and not d.uri.startswith(("ldap://", "ldaps://")):
        s.loader.problem("directory.uri", f'"{d.uri}" must start with ldap:// or ldaps://')
    if d.uri.startswith("ldap://") and not d.start_tls and not d.allow_plain_ldap:
        s.loader.problem(
            "directory.uri",
            "ldap:// without start_tls would send passwords in clear; "
            "set start_tls = true, use ldaps://, or allow_plain_ldap = true",
        )
    return d


def _proxy(s: _Section) -> ProxyConfig:
    p = ProxyConfig(
        address=s.text("address"),
        port=s.integer("port", 3128, minimum=1),
        username=s.text("username"),
        password_file=s.path("password_file"),
    )
    if p.port > 65535:
        s.loader.problem("proxy.port", f"must be at most 65535, not {p.port}")
    if ":" in p.username:
        s.loader.problem("proxy.username", "must not contain ':' (Basic authentication)")
    if not p.address and (p.username or p.password_file):
        s.loader.problem("proxy.address", "is required when username or password_file is set")
    return p


def _update(s: _Section) -> UpdateConfig:
    u = UpdateConfig(
        check=s.flag("check", True),
        beta=s.flag("beta", False),
        feed_url=s.text("feed_url", ""),
        interval=s.parsed("interval", "24h", parse_duration),
        timeout=s.parsed("timeout", "30s", parse_duration),
        ca_file=s.path("ca_file"),
    )
    if u.feed_url:
        from kms.httpfetch import parse_url  # the rule the update checker will apply

        try:
            parse_url(u.feed_url)
        except ValueError as e:
            s.loader.problem("update.feed_url", str(e))
    if u.interval < 60:
        s.loader.problem("update.interval", "must be at least 1m (a feed is not to be hammered)")
    if u.timeout <= 0:
        s.loader.problem("update.timeout", "must be more than 0")
    return u


def _logs(s: _Section) -> LogsConfig:
    debug = s.str_list("debug")
    for c in debug:
        if c not in DEBUG_CATEGORIES:
            s.loader.problem("logs.debug", f'"{c}" is not one of {", ".join(DEBUG_CATEGORIES)}')
    return LogsConfig(debug=tuple(c for c in debug if c in DEBUG_CATEGORIES))


def config_warnings(cfg: Config) -> list[str]:
    """Legal but probably unintended settings, printed by ``kmsctl check-config`` and at start."""
    warnings = []
    storage = cfg.security.password_storage
    if not cfg.security.methods:
        warnings.append("security.methods: empty; only POP3 APOP remains, and only for des users")
    who = f'new passwords (password_storage = "{storage}")'
    warnings.extend(method_warnings(cfg.security.methods, storage, True, who))
    if cfg.relay.local_group == "" and cfg.misc.hide_local_ip:
        warnings.append("misc.hide_local_ip: has no effect without relay.local_group")
    if "submission" in cfg.listeners and not cfg.tls.certificate:
        warnings.append(
            "listeners.submission: without [tls] STARTTLS is not offered; passwords cross in clear"
        )
    if cfg.directory is not None and cfg.directory.mail_domain not in cfg.domains.local:
        warnings.append(
            f"directory.mail_domain: {cfg.directory.mail_domain} is not in domains.local; "
            "mail to directory users is not delivered here"
        )
    return warnings


def runtime_problems(cfg: Config) -> list[str]:
    """What keeps the server from starting on this machine although the file itself is valid."""
    problems = []
    for key in ("certificate", "private_key"):
        p: Path | None = getattr(cfg.tls, key)
        if p is not None and not p.is_file():
            problems.append(f"tls.{key}: {p} does not exist (make run creates a development certificate)")
    parent = cfg.store.path.parent
    if not parent.is_dir():
        problems.append(f"store.path: parent folder {parent} does not exist")
    store = cfg.store
    below = start_problem(store.path, store.soft_limit, store.hard_limit, store.hard_limit_action)
    if below is not None:
        problems.append(below)
    if cfg.master.enabled and not (cfg.store.path / "master.json").is_file():
        problems.append("master.enabled: no master password is set (kmsctl master set-password)")
    secret = cfg.relay.smarthost_credentials_file
    if cfg.relay.smarthost and secret is not None:
        from kms.queue.runner import read_credentials  # what the server itself will read

        try:
            read_credentials(secret)
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"relay.smarthost_credentials_file: cannot read {secret}: {e}")
        except ValueError:
            problems.append(f'relay.smarthost_credentials_file: {secret}: expected "user:password"')
        else:
            if secret.stat().st_mode & 0o077:
                problems.append(
                    f"relay.smarthost_credentials_file: {secret} is open to group or others (chmod 600)"
                )
    directory = cfg.directory
    if directory is not None and directory.bind_password_file is not None:
        secret = directory.bind_password_file
        if not secret.is_file():
            problems.append(f"directory.bind_password_file: {secret} does not exist")
        elif secret.stat().st_mode & 0o077:
            problems.append(f"directory.bind_password_file: {secret} is open to group or others (use 0600)")
    if directory is not None and directory.ca_file is not None and not directory.ca_file.is_file():
        problems.append(f"directory.ca_file: {directory.ca_file} does not exist")
    if directory is not None and cfg.security.allow_ntlm_for_directory_users:
        missing = helper_missing(directory.ntlm_helper)
        if missing is not None:
            problems.append(f"directory.ntlm_helper: {missing}")
    return problems
