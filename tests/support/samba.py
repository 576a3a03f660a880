"""A real Samba AD domain controller on 127.0.0.1 for the directory tests (no mocked LDAP).

Facts behind every choice here: ``../shared/notes/samba-ad.md`` (measured on these machines).

Only one DC can run per host (fixed ports 389/636/88/..., one winbindd socket compiled into
libwbclient), and trial has no class fixtures (``setUpClass`` is never called) and hands single test
methods of one class to either ``-j2`` worker. So the DC is a *host* resource, leased per test:

* ``start_dc()`` takes the host lock (``fcntl.flock``) and returns a lease; the test holds it until
  ``close()`` (use ``addCleanup``). While one test holds it, every other test that needs the DC,
  in this or any other process, blocks in ``start_dc()``.
* The DC process itself outlives one lease: the next lease (from any process) finds it running and
  pays nothing. When the last process that used it exits, it stops the DC and removes the clone.
  A test process killed outright leaves the DC running; the next run uses it and cleans it up.
* The golden copy is provisioned once (about 10 s) under ``/var/tmp``, keyed by ``samba --version``
  and this module's recipe version; a clone (``cp -a`` + path rewrite in smb.conf) starts in ~1 s.

A test sees what earlier tests of any module left in the directory, so ``add_user`` replaces an
existing account of the same name, and test modules use their own account names. Use::

    def setUp(self):
        self.dc = start_dc()  # skips, or fails in CI, when Samba cannot run here
        self.addCleanup(self.dc.close)
"""

from __future__ import annotations

import atexit
import datetime
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import ldap3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn
from twisted.trial.unittest import SkipTest

REALM = "KMS.TEST"
DOMAIN = "KMS"
BASE_DN = "DC=kms,DC=test"
MAIL_DOMAIN = "kms.test"
USERS_DN = f"CN=Users,{BASE_DN}"
SERVICE_ACCOUNT = "kms-svc"
SERVICE_DN = f"CN={SERVICE_ACCOUNT},{USERS_DN}"
SERVICE_PASSWORD = "Svc-Pass-7q!"
ADMIN_PASSWORD = "Adm1nPass!23"
LOCKOUT_THRESHOLD = 3

# Bump when the provisioning recipe changes: older golden copies are then ignored.
_RECIPE = "2"
_GOLDEN_PARENT = Path("/var/tmp")
_LOCK = Path("/tmp/kms-samba-dc.lock")
_USERS = Path("/tmp/kms-samba-dc.users")
_STATE = Path("/tmp/kms-samba-dc.state")
_LOCK_TIMEOUT = 900.0
_READY_TIMEOUT = 90.0
_APT = "apt-get install samba samba-ad-dc winbind ldap-utils krb5-user"

# [global] additions that provisioning drops or does not know (notes §1).
_GLOBAL_EXTRA = """\
\tldap server require strong auth = no
\told password allowed period = 0
\tserver services = s3fs, rpc, ldap, cldap, kdc, winbindd
\tprefork children = 1
\tusershare path =
\ttls enabled = yes
\ttls certfile = tls/srv.pem
\ttls keyfile = tls/srv.key
\ttls cafile =
"""

# The AD epoch is 1601-01-01; accountExpires counts 100 ns ticks from it. 2000-01-01 is long past.
_EXPIRED_2000 = str((946684800 + 11644473600) * 10_000_000)
_UAC_NORMAL = 0x200
_UAC_DISABLED = 0x2


def directory_section(dc: SambaDC, config_dir: Path, extra: str = "") -> str:
    """The ``[directory]`` section of a kms config for ``dc``, its bind secret written 0600 beside
    the config as ``ad-bind.secret``; ``extra`` adds keys to the section (require_group, ...)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    secret = config_dir / "ad-bind.secret"
    secret.write_text(SERVICE_PASSWORD + "\n")
    os.chmod(secret, 0o600)
    return f"""
[directory]
uri = "{dc.ldaps_uri}"
base_dn = "{BASE_DN}"
domain = "{DOMAIN}"
mail_domain = "{MAIL_DOMAIN}"
bind_dn = "{SERVICE_DN}"
bind_password_file = "ad-bind.secret"
ca_file = "{dc.ca_file}"
{extra}"""


def samba_missing() -> str | None:
    """Why a Samba AD DC cannot run here, or None when it can."""
    missing = [tool for tool in ("samba", "samba-tool", "wbinfo", "ntlm_auth") if shutil.which(tool) is None]
    if missing:
        return f"not installed: {', '.join(missing)} ({_APT})"
    if os.geteuid() != 0:
        return "the Samba DC binds ports 389/636/88 on 127.0.0.1 and needs root"
    return None


def require_samba() -> None:
    """Skip when Samba cannot run on a developer machine; fail loudly where it must run.

    In CI (``CI`` set), and as root on Debian where apt could install it, a missing DC is an error,
    never a skip: silently skipped directory tests would pass a broken AD integration.
    """
    reason = samba_missing()
    if reason is None:
        return
    if os.environ.get("CI") or (os.geteuid() == 0 and Path("/etc/debian_version").exists()):
        raise RuntimeError(f"the directory tests need a Samba AD DC and it cannot run: {reason}")
    raise SkipTest(f"Samba AD DC unavailable: {reason}")


def _env() -> dict[str, str]:
    """The environment for Samba's own tools: they run on the system python, not our venv's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def _run(args: Sequence[str], timeout: float = 120) -> str:
    done = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, env=_env(), stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done.stdout


def _golden_dir() -> Path:
    version = _run(["samba", "--version"]).strip()
    key = hashlib.sha256(f"{version}\0{_RECIPE}".encode()).hexdigest()[:16]
    return _GOLDEN_PARENT / f"kms-samba-golden-{key}"


def _write_certificates(tls: Path) -> None:
    """A CA and a server certificate for IP:127.0.0.1 (Samba's own has no SAN; notes §2)."""
    tls.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kms test AD CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dc1.kms.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("dc1.kms.test"),
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    (tls / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tls / "srv.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_path = tls / "srv.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )


def _xattrs_work(directory: Path) -> bool:
    """Whether this file system takes ``security.*`` xattrs (Samba's NTACLs need them; notes §1)."""
    probe = directory / ".xattr-probe"
    probe.touch()
    try:
        return subprocess.run(["setfattr", "-n", "security.kmsprobe", "-v", "1", str(probe)],
                              capture_output=True, env=_env()).returncode == 0
    except FileNotFoundError:
        return False
    finally:
        probe.unlink()


def _provision(target: Path) -> None:
    """Provision a DC into ``target`` (empty or absent); does not start it."""
    (target / "etc").mkdir(parents=True)
    for sub in ("run", "log", "cache", "state"):
        (target / sub).mkdir()
    conf = target / "etc" / "smb.conf"
    conf.write_text("")  # else provision inherits /etc/samba/smb.conf
    options = [
        "netbios name = DC1",
        "interfaces = 127.0.0.1",
        "bind interfaces only = yes",
        f"pid directory = {target}/run",
        f"ncalrpc dir = {target}/run/ncalrpc",
        f"log file = {target}/log/log.%m",
    ]
    if not _xattrs_work(target):
        options += [
            "vfs objects = dfs_samba4 acl_xattr xattr_tdb",
            f"xattr_tdb:file = {target}/state/xattr.tdb",
        ]
    _run(
        [
            "samba-tool", "domain", "provision", "-s", str(conf), f"--targetdir={target}",
            f"--realm={REALM}", f"--domain={DOMAIN}", "--server-role=dc", "--dns-backend=NONE",
            "--host-name=dc1", f"--adminpass={ADMIN_PASSWORD}",
            *(f"--option={option}" for option in options),
        ],
        timeout=300,
    )
    text = conf.read_text()
    if "[global]\n" not in text:
        raise RuntimeError(f"provisioned smb.conf has no [global] section:\n{text}")
    conf.write_text(text.replace("[global]\n", "[global]\n" + _GLOBAL_EXTRA, 1))
    _write_certificates(target / "private" / "tls")
    _run(
        [
            "samba-tool", "domain", "passwordsettings", "set", "-s", str(conf), "--complexity=off",
            "--history-length=0", "--min-pwd-length=1", "--min-pwd-age=0", "--max-pwd-age=0",
            f"--account-lockout-threshold={LOCKOUT_THRESHOLD}", "--account-lockout-duration=1",
            "--reset-account-lockout-after=1",
        ]
    )
    _run(["samba-tool", "user", "create", SERVICE_ACCOUNT, SERVICE_PASSWORD, "-s", str(conf)])


def _ensure_golden() -> Path:
    """The provisioned golden copy, made on first use (caller holds the host lock)."""
    golden = _golden_dir()
    if (golden / "etc" / "smb.conf").exists():
        return golden
    building = Path(tempfile.mkdtemp(prefix=golden.name + ".building-", dir=_GOLDEN_PARENT))
    try:
        building.rmdir()
        _provision(building)
        # smb.conf holds the build path (the only absolute path in a DC's files); clones rewrite it.
        (building / "etc" / "golden-path").write_text(str(building))
        os.rename(building, golden)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return golden


def _clone(golden: Path) -> Path:
    clone = Path(tempfile.mkdtemp(prefix="kms-samba-dc-", dir=_GOLDEN_PARENT))
    clone.rmdir()
    subprocess.run(["cp", "-a", str(golden), str(clone)], check=True, env=_env())
    built_at = (golden / "etc" / "golden-path").read_text()
    conf = clone / "etc" / "smb.conf"
    conf.write_text(conf.read_text().replace(built_at, str(clone)))
    return clone


def _alive(pid: int) -> bool:
    """A live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _foreign_samba(ours: int) -> list[str]:
    """Samba daemons not in our DC's process group (a system smbd or winbindd collides with it)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            name = (entry / "comm").read_text().strip()
        except (OSError, IndexError):
            continue
        if name in ("samba", "smbd", "nmbd", "winbindd") and int(fields[2]) != ours:
            found.append(f"{name}[{entry.name}]")
    return found


def _stop_group(pid: int) -> None:
    """SIGTERM samba, then SIGKILL whatever is left of its process group (it was started by setsid)."""
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            _reap()
            time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 15
    while _group_alive(pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"Samba process group {pid} does not die")
        _reap()
        time.sleep(0.05)
    _reap()


_children: list[subprocess.Popen[bytes]] = []


def _reap() -> None:
    """Collect samba processes this process started (another process may have stopped them)."""
    for child in list(_children):
        if child.poll() is not None:
            _children.remove(child)


def _read_state() -> dict[str, object]:
    try:
        state = json.loads(_STATE.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _update_state(**changes: object) -> None:
    """Record the DC's pid, clone directory and golden copy (caller holds the host lock)."""
    tmp = _STATE.with_suffix(".tmp")
    tmp.write_text(json.dumps({**_read_state(), **changes}))
    os.replace(tmp, _STATE)


def _admin_connection(uri: str, ca_file: Path) -> ldap3.Connection:
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca_file))
    server = ldap3.Server(uri, tls=tls, connect_timeout=5)
    conn = ldap3.Connection(
        server, f"Administrator@{MAIL_DOMAIN}", ADMIN_PASSWORD, receive_timeout=30, raise_exceptions=True
    )
    conn.bind()
    return conn


def _ready(ca_file: Path) -> bool:
    try:
        conn = _admin_connection("ldaps://127.0.0.1", ca_file)
    except ldap3.core.exceptions.LDAPException:
        return False
    conn.unbind()
    return subprocess.run(["wbinfo", "-p"], capture_output=True, env=_env(), timeout=10).returncode == 0


class SambaDC:
    """A lease on the host's DC: exclusive use until ``close()``."""

    ldap_uri = "ldap://127.0.0.1"
    ldaps_uri = "ldaps://127.0.0.1"
    admin_password = ADMIN_PASSWORD

    def __init__(self, lock: IO[str], directory: Path) -> None:
        self._lock: IO[str] | None = lock
        self.directory = directory
        self.smb_conf = directory / "etc" / "smb.conf"
        self.ca_file = directory / "private" / "tls" / "ca.pem"

    # -- the DC process ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        pid = _read_state().get("pid")
        return pid if isinstance(pid, int) and _alive(pid) else None

    def start(self) -> None:
        """Start samba on this clone (no-op if it runs) and wait until LDAP and winbindd answer."""
        if self.pid is not None:
            return
        out = open(self.directory / "log" / "samba.out", "ab")
        with out:
            child = subprocess.Popen(
                ["samba", "--foreground", "-s", str(self.smb_conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_env(),
                start_new_session=True,  # its own process group, for teardown by group
            )
        _children.append(child)
        _update_state(pid=child.pid)
        deadline = time.monotonic() + _READY_TIMEOUT
        while not _ready(self.ca_file):
            if child.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = (self.directory / "log" / "samba.out").read_text(errors="replace")[-3000:]
                others = _foreign_samba(child.pid)
                hint = f"\nother Samba processes hold ports or the winbind socket: {others}" if others else ""
                raise RuntimeError(f"Samba AD DC did not come up (exit {child.returncode}):\n{log}{hint}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop samba (data stays; ``start()`` brings the same directory back), e.g. "DC down" tests."""
        pid = _read_state().get("pid")
        if isinstance(pid, int):
            _stop_group(pid)
        _update_state(pid=None)

    def close(self) -> None:
        """End the lease: the DC keeps running for the next test; the last process out stops it."""
        global _lease
        if self._lock is not None:
            self._lock.close()
            self._lock = None
            _lease = None

    # -- directory content ------------------------------------------------------------------------

    def admin(self) -> ldap3.Connection:
        """An Administrator connection over LDAPS (verified); the caller unbinds it."""
        return _admin_connection(self.ldaps_uri, self.ca_file)

    def dn_of(self, name: str) -> str | None:
        conn = self.admin()
        try:
            conn.search(BASE_DN, f"(sAMAccountName={escape_filter_chars(name)})", attributes=["cn"])
            entries = [r for r in conn.response if r["type"] == "searchResEntry"]
            return str(entries[0]["dn"]) if entries else None
        finally:
            conn.unbind()

    def add_user(
        self,
        name: str,
        password: str,
        *,
        mail: str | None = None,
        proxy_addresses: Sequence[str] = (),
        groups: Sequence[str] = (),
        disabled: bool = False,
        must_change: bool = False,
        expired: bool = False,
    ) -> str:
        """Create (or re-create: any account of that name is deleted first) a user; returns its DN."""
        dn = f"CN={escape_rdn(name)},{USERS_DN}"
        attributes: dict[str, object] = {
            "sAMAccountName": name,
            "userPrincipalName": f"{name}@{MAIL_DOMAIN}",
            "unicodePwd": f'"{password}"'.encode("utf-16-le"),
            "userAccountControl": str(_UAC_NORMAL | (_UAC_DISABLED if disabled else 0)),
        }
        if mail is not None:
            attributes["mail"] = mail
        if proxy_addresses:
            attributes["proxyAddresses"] = list(proxy_addresses)
        if expired:
            attributes["accountExpires"] = _EXPIRED_2000
        old = self.dn_of(name)
        conn = self.admin()
        try:
            if old is not None:
                conn.delete(old)
            conn.add(dn, ["top", "person", "organizationalPerson", "user"], attributes)
            if must_change:
                conn.modify(dn, {"pwdLastSet": [(ldap3.MODIFY_REPLACE, ["0"])]})
            for group in groups:
                conn.modify(self._group_dn(conn, group), {"member": [(ldap3.MODIFY_ADD, [dn])]})
        finally:
            conn.unbind()
        return dn

    def add_group(self, name: str, member_of: Sequence[str] = ()) -> str:
        """Create a global security group (kept if it exists), nested into ``member_of``; returns its DN."""
        conn = self.admin()
        try:
            dn = self._find_group(conn, name)
            if dn is None:
                dn = f"CN={escape_rdn(name)},{USERS_DN}"
                conn.add(dn, ["top", "group"], {"sAMAccountName": name})
            for parent in member_of:
                parent_dn = self._group_dn(conn, parent)
                conn.search(parent_dn, "(objectClass=group)", ldap3.BASE, attributes=["member"])
                members = {str(m).lower() for m in conn.entries[0].member.values} if conn.entries else set()
                if dn.lower() not in members:
                    conn.modify(parent_dn, {"member": [(ldap3.MODIFY_ADD, [dn])]})
        finally:
            conn.unbind()
        return dn

    @staticmethod
    def _find_group(conn: ldap3.Connection, name: str) -> str | None:
        conn.search(BASE_DN, f"(&(objectClass=group)(sAMAccountName={escape_filter_chars(name)}))")
        entries = [r for r in conn.response if r["type"] == "searchResEntry"]
        return str(entries[0]["dn"]) if entries else None

    def _group_dn(self, conn: ldap3.Connection, name: str) -> str:
        dn = self._find_group(conn, name)
        if dn is None:
            raise KeyError(f"no group {name!r} in the test DC; add_group it first")
        return dn

    def lock_out(self, name: str) -> None:
        """Lock the account the way an attacker would: bad binds up to the domain's threshold."""
        for _ in range(LOCKOUT_THRESHOLD):
            conn = ldap3.Connection(ldap3.Server(self.ldap_uri, connect_timeout=5), f"{name}@{MAIL_DOMAIN}",
                                    "not-the-password", receive_timeout=30)
            conn.bind()
            conn.unbind()
        if not self.locked(name):
            raise RuntimeError(f"{name} is not locked after {LOCKOUT_THRESHOLD} bad binds")

    def locked(self, name: str) -> bool:
        conn = self.admin()
        try:
            conn.search(BASE_DN, f"(sAMAccountName={escape_filter_chars(name)})",
                        attributes=["msDS-User-Account-Control-Computed"])
            entry = conn.entries[0]
            return bool(int(entry["msDS-User-Account-Control-Computed"].value or 0) & 0x10)
        finally:
            conn.unbind()

    def unlock(self, name: str) -> None:
        dn = self.dn_of(name)
        if dn is None:
            raise KeyError(name)
        conn = self.admin()
        try:
            conn.modify(dn, {"lockoutTime": [(ldap3.MODIFY_REPLACE, ["0"])]})
        finally:
            conn.unbind()


# -- the host-wide lease ------------------------------------------------------------------------

_registered: IO[str] | None = None  # our LOCK_SH on _USERS: "this process uses the DC"
_lease: SambaDC | None = None  # the lease this process holds now


def _acquire(path: Path, timeout: float) -> IO[str]:
    handle = open(path, "a+")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                raise RuntimeError(f"{path} held for {timeout:.0f} s: another test keeps the DC") from None
            time.sleep(0.1)


def _alone(share: IO[str]) -> bool:
    """Whether our share of the DC is the only one: no other live process uses or awaits it.

    Caller holds the host lock. Converting our shared lock to an exclusive one succeeds only then;
    the shared lock is taken again either way.
    """
    try:
        fcntl.flock(share, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        fcntl.flock(share, fcntl.LOCK_SH)
    return True


def _discard_dc() -> None:
    """Stop the DC named in the state file and remove its clone (caller holds the host lock)."""
    state = _read_state()
    pid, directory = state.get("pid"), state.get("directory")
    if isinstance(pid, int):
        _stop_group(pid)
    if isinstance(directory, str) and Path(directory).name.startswith("kms-samba-dc-"):
        shutil.rmtree(directory, ignore_errors=True)
    _STATE.unlink(missing_ok=True)


def _at_exit() -> None:
    """The last process that used the DC stops it and removes its clone."""
    global _registered
    if _registered is None:
        return
    if _lease is not None:  # a test that never closed its lease: we hold the host lock already
        _lease.close()
    lock = _acquire(_LOCK, _LOCK_TIMEOUT)
    try:
        if _alone(_registered):
            _discard_dc()
        _registered.close()
        _registered = None
    finally:
        lock.close()


def start_dc() -> SambaDC:
    """Blocking: take the host's DC for this test; provision, clone and start it as needed."""
    global _registered, _lease
    require_samba()
    if _lease is not None:
        raise RuntimeError("this process already holds the DC; close() the first lease")
    if _registered is None:
        # Registered before waiting, so that the holder's exit does not tear down a DC we wait for.
        _registered = open(_USERS, "a+")
        fcntl.flock(_registered, fcntl.LOCK_SH)
        atexit.register(_at_exit)
    lock = _acquire(_LOCK, _LOCK_TIMEOUT)
    try:
        golden = _ensure_golden()
        state = _read_state()
        directory = str(state.get("directory"))
        if state.get("golden") != str(golden) or not Path(directory, "etc", "smb.conf").exists():
            _discard_dc()  # left by a killed run of an older recipe, or half-removed
            directory = str(_clone(golden))
            _update_state(pid=None, directory=directory, golden=str(golden))
        dc = SambaDC(lock, Path(directory))
        dc.start()
    except BaseException:
        lock.close()
        raise
    _lease = dc
    return dc
