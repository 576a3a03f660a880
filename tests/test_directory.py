"""The directory checker (kms/auth/directory.py) against a real Samba AD DC (tests/support/samba.py).

No mocked LDAP: every look-up and bind goes to the DC on 127.0.0.1 over LDAPS, StartTLS or (when
allowed) plain LDAP.  The pure parts (login names, filters, account state, AD's bind codes) are
table-tested first; they need no DC.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from kms.auth.credentials import PlaintextCredentials
from kms.auth.directory import (
    Directory,
    DirectoryChecker,
    DirectoryClient,
    DirectorySettings,
    DirectoryUser,
    LoginName,
    bind_refusal,
    filetime,
    lockout_account,
    mailbox_address,
    member_filter,
    parse_login,
    read_secret,
    realm_of,
    state_refusal,
    user_filter,
)
from kms.auth.errors import AuthenticationFailed, TemporaryAuthFailure, UnknownUser
from kms.auth.mechanisms import CramMD5Credentials
from kms.clientinfo import ClientInfo
from kms.config import ConfigError, DirectoryConfig, config_warnings, load_config, runtime_problems
from kms.logs import Logs
from kms.tls import generate_dev_certificate
from tests.support import samba
from tests.support.server import write_config

CLIENT = ClientInfo("192.0.2.7", 40000, "127.0.0.1", 2143, "imap")
ALICE_PASSWORD = "Alice dt pass 1"
OTHER_PASSWORD = "Other dt pass 1"
SETTINGS = DirectorySettings(
    uri="ldaps://dc.kms.test",
    start_tls=False,
    base_dn="DC=kms,DC=test",
    domain="KMS",
    mail_domain="mail.test",
    bind_dn="CN=svc,CN=Users,DC=kms,DC=test",
    bind_password="secret",
)
NOW = 1_700_000_000.0


def attributes(**values: object) -> dict[str, list[bytes]]:
    """Raw LDAP attributes as ldap3 returns them (lists of bytes), from Python values."""
    normal = {"userAccountControl": 512, "accountExpires": 0, "pwdLastSet": 133_000_000_000_000_000}
    normal.update({k.replace("_", "-"): v for k, v in values.items()})
    return {k: [str(v).encode()] for k, v in normal.items() if v is not None}


class LoginNameTests(TestCase):
    """Which names are the directory's, and what each asks it for."""

    def test_forms(self) -> None:
        table = {
            "alice": LoginName("alice", ("alice@mail.test",)),
            "alice@mail.test": LoginName("alice", ("alice@mail.test",)),
            "Alice@MAIL.TEST": LoginName("Alice", ("Alice@mail.test",)),
            "alice@kms.test": LoginName("alice", ("alice@kms.test",)),  # the realm: a principal name
            "KMS\\alice": LoginName("alice"),
            "kms\\alice": LoginName("alice"),
            "kms.test\\alice": LoginName("alice"),
            "a@b@mail.test": LoginName("a@b", ("a@b@mail.test",)),
        }
        for name, expected in table.items():
            self.assertEqual(parse_login(name, SETTINGS), expected, name)

    def test_not_ours(self) -> None:
        for name in ("", "alice@example.test", "OTHER\\alice", "KMS\\", "\\alice", "@mail.test",
                     "alice\x00", "ali\nce", "alice\r", "a" * 257, "\u202ealice"):
            self.assertIsNone(parse_login(name, SETTINGS), repr(name))

    def test_lockout_account(self) -> None:
        """The directory's name forms of one account count as one for lockout; other names, and a
        bare name (which lockout qualifies with the default domain), are left to lockout."""
        for name in ("KMS\\Alice", "kms.test\\alice", "alice@KMS.test", "alice@mail.test", " alice@kms.test"):
            self.assertEqual(lockout_account(name, SETTINGS), "alice@mail.test", name)
        for name in ("alice", "alice@example.test", "OTHER\\alice", "KMS\\", "ali\nce@kms.test"):
            self.assertIsNone(lockout_account(name, SETTINGS), repr(name))

    def test_realm(self) -> None:
        self.assertEqual(realm_of("DC=kms,DC=test"), "kms.test")
        self.assertEqual(realm_of("OU=People,DC=Corp,DC=Example,DC=com"), "corp.example.com")
        self.assertEqual(realm_of("not a dn"), "")
        self.assertEqual(realm_of("DC=kms, DC=test"), "kms.test")  # spaces after the commas, as often written


class FilterTests(TestCase):
    """Every value is escaped: a name can never widen the search."""

    def test_escaped(self) -> None:
        self.assertEqual(
            user_filter(LoginName("*)(uid=*", ("a*@mail.test",))),
            "(&(objectCategory=person)(objectClass=user)(|(sAMAccountName=\\2a\\29\\28uid=\\2a)"
            "(mail=a\\2a@mail.test)(proxyAddresses=smtp:a\\2a@mail.test)(userPrincipalName=a\\2a@mail.test)))",
        )
        self.assertEqual(
            user_filter(LoginName("back\\slash\x00")),
            "(&(objectCategory=person)(objectClass=user)(|(sAMAccountName=back\\5cslash\\00)))",
        )

    def test_member_filter(self) -> None:
        self.assertEqual(
            member_filter("CN=a\\,b (x),CN=Users,DC=kms,DC=test"),
            "(member:1.2.840.113556.1.4.1941:=CN=a\\5c,b \\28x\\29,CN=Users,DC=kms,DC=test)",
        )


class AccountStateTests(TestCase):
    """The entry's state, read the way AD keeps it (lockout in the computed attribute)."""

    def test_states(self) -> None:
        LOCKED = "account locked out in the directory"
        UNREADABLE = "unreadable account state in the directory"
        past, future = str(filetime(NOW - 60)), str(filetime(NOW + 86400))
        table: list[tuple[dict[str, list[bytes]], str | None]] = [
            (attributes(), None),
            (attributes(accountExpires=future), None),
            (attributes(accountExpires=0x7FFFFFFFFFFFFFFF), None),
            (attributes(userAccountControl=514), "account disabled in the directory"),
            (attributes(msDS_User_Account_Control_Computed=16, lockoutTime=5), LOCKED),
            # lockoutTime stays set after the lockout duration; the computed bit is the truth
            (attributes(msDS_User_Account_Control_Computed=0, lockoutTime=5), None),
            (attributes(lockoutTime=5), LOCKED),
            (attributes(accountExpires=past), "account expired in the directory"),
            (attributes(pwdLastSet=0), "password must be changed (directory)"),
            (attributes(msDS_User_Account_Control_Computed=0x800000), "password expired in the directory"),
            (attributes(userAccountControl="x"), UNREADABLE),
            (attributes(userAccountControl=None), UNREADABLE),
            (attributes(accountExpires="\u00ff"), UNREADABLE),
        ]
        for values, expected in table:
            self.assertEqual(state_refusal(values, NOW), expected, values)

    def test_bind_refusal(self) -> None:
        message = "80090308: LdapErr: DSID-0C09041C, comment: AcceptSecurityContext error, data {}, v4563"
        self.assertEqual(bind_refusal(49, message.format("52e")), "wrong password")
        self.assertEqual(bind_refusal(49, message.format("775")), "account locked out in the directory")
        self.assertEqual(bind_refusal(49, message.format("533")), "account disabled in the directory")
        self.assertEqual(bind_refusal(49, message.format("773")), "password must be changed (directory)")
        self.assertEqual(bind_refusal(49, message.format("999")), "directory refused the bind (999)")
        self.assertEqual(bind_refusal(49, ""), "directory refused the bind (no reason given)")
        for result in (8, 51, 52, 53, 80):  # TLS required, busy, unavailable...: the DC's problem
            self.assertIsNone(bind_refusal(result, message.format("52e")))

    def test_mailbox_address(self) -> None:
        self.assertEqual(mailbox_address(attributes(mail="Al@Mail.Test", sAMAccountName="al"), "mail.test"),
                         "al@mail.test")
        self.assertEqual(mailbox_address(attributes(mail="al@other.test", sAMAccountName="Al"), "mail.test"),
                         "al@mail.test")
        self.assertEqual(mailbox_address(attributes(mail="a/b@mail.test", sAMAccountName="al"), "mail.test"),
                         "al@mail.test")
        self.assertEqual(mailbox_address(attributes(sAMAccountName="al"), "mail.test"), "al@mail.test")
        self.assertIsNone(mailbox_address(attributes(sAMAccountName="a/l"), "mail.test"))
        self.assertIsNone(mailbox_address(attributes(), "mail.test"))


class SecretFileTests(TestCase):
    def test_read_secret(self) -> None:
        path = Path(self.mktemp())
        path.write_text("s3cret phrase\nignored\n")
        os.chmod(path, 0o600)
        self.assertEqual(read_secret(path), "s3cret phrase")
        os.chmod(path, 0o640)
        with self.assertRaises(ValueError) as e:
            read_secret(path)
        self.assertIn("open to group or others", str(e.exception))
        with self.assertRaises(ValueError):
            read_secret(path.with_name("missing"))
        empty = Path(self.mktemp())
        empty.write_text("\n")
        os.chmod(empty, 0o600)
        with self.assertRaises(ValueError):
            read_secret(empty)

    def test_from_config(self) -> None:
        path = Path(self.mktemp())
        path.write_text("svc pass\n")
        os.chmod(path, 0o600)
        cfg = DirectoryConfig(
            uri="ldaps://dc", start_tls=False, base_dn="DC=kms,DC=test", domain="KMS", mail_domain="Kms.Test",
            bind_dn="CN=svc", bind_password_file=path, ca_file=None, ntlm_helper="", require_group="",
            allow_plain_ldap=False,
        )
        settings = DirectorySettings.from_config(cfg)
        self.assertEqual((settings.bind_password, settings.mail_domain, settings.realm),
                         ("svc pass", "kms.test", "kms.test"))
        self.assertNotIn("svc pass", repr(settings))
        with self.assertRaises(ValueError):
            DirectorySettings.from_config(dataclasses.replace(cfg, bind_dn=""))


class ConfigCheckTests(TestCase):
    """What the configuration checks say about ``[directory]`` before anything talks to a DC."""

    def test_checks(self) -> None:
        directory = Path(self.mktemp()).absolute()
        section = (
            '[directory]\nuri = "ldaps://dc"\nbase_dn = "DC=kms,DC=test"\nmail_domain = "kms.test"\n'
            'bind_dn = "CN=svc"\nbind_password_file = "svc.secret"\nca_file = "ca.pem"\n'
        )
        cfg = load_config(write_config(directory, extra=section))
        self.assertIn("directory.mail_domain: kms.test is not in domains.local; mail to directory users is "
                      "not delivered here", config_warnings(cfg))
        self.assertEqual(
            [p for p in runtime_problems(cfg) if p.startswith("directory.")],
            [f"directory.bind_password_file: {directory / 'svc.secret'} does not exist",
             f"directory.ca_file: {directory / 'ca.pem'} does not exist"],
        )
        (directory / "svc.secret").write_text("pw\n")
        os.chmod(directory / "svc.secret", 0o644)
        (directory / "ca.pem").write_text("")
        secret = directory / "svc.secret"
        self.assertEqual(
            [p for p in runtime_problems(cfg) if p.startswith("directory.")],
            [f"directory.bind_password_file: {secret} is open to group or others (use 0600)"],
        )
        os.chmod(directory / "svc.secret", 0o600)
        self.assertEqual([p for p in runtime_problems(cfg) if p.startswith("directory.")], [])
        with self.assertRaises(ConfigError) as e:
            load_config(write_config(directory, extra=section.replace('bind_dn = "CN=svc"\n', "")))
        self.assertIn("directory.bind_dn: is required when [directory] is present", e.exception.problems)


class NoDCTests(TestCase):
    """Names that are not the directory's, and empty passwords, never reach a DC (none is running)."""

    async def test_refused_before_any_connection(self) -> None:
        pool = ThreadPool(0, 1, name="test-directory")
        pool.start()
        self.addCleanup(pool.stop)
        # Port 1 on 127.0.0.1: nothing listens, so any attempt to connect would be a temporary failure.
        settings = dataclasses.replace(SETTINGS, uri="ldaps://127.0.0.1:1", mail_domain="kms.test")
        checker = DirectoryChecker(Directory(DirectoryClient(settings), pool, reactor))

        def attempt(name: str, password: str) -> Deferred[str]:
            return checker.requestAvatarId(PlaintextCredentials(name, password, "PLAIN", CLIENT))

        for name in ("", "bob@example.test", "OTHER\\bob", "bob\x00", "b\nob"):
            await self.assertFailure(attempt(name, "pw"), UnknownUser)
        failure = await self.assertFailure(attempt("bob", ""), AuthenticationFailed)
        self.assertEqual(failure.reason, "empty password")
        await self.assertFailure(attempt("bob", "pw"), TemporaryAuthFailure)  # the control: it would try


_USERS_MADE_IN: set[Path] = set()


def ensure_users(dc: samba.SambaDC) -> None:
    """The module's read-only users, made once per DC clone (tests never change them)."""
    if dc.directory in _USERS_MADE_IN:
        return
    dc.add_group("dt-outer")
    dc.add_group("dt-inner", member_of=["dt-outer"])
    dc.add_user("dt-alice", ALICE_PASSWORD, mail="Alice.Dt@kms.test",
                proxy_addresses=["SMTP:alice.dt@kms.test", "smtp:DT-AL@kms.test"], groups=["dt-inner"])
    dc.add_user("dt-bob", OTHER_PASSWORD)
    dc.add_user("dt-carol", OTHER_PASSWORD, mail="carol@elsewhere.test")
    dc.add_user("dt-corp", OTHER_PASSWORD, mail="dt.corp@corp.test")
    dc.add_user("dt-dis", OTHER_PASSWORD, disabled=True)
    dc.add_user("dt-exp", OTHER_PASSWORD, expired=True)
    dc.add_user("dt-mc", OTHER_PASSWORD, must_change=True)
    dc.add_user("dt-amb1", OTHER_PASSWORD, mail="dt-amb@kms.test")
    dc.add_user("dt-amb2", OTHER_PASSWORD, proxy_addresses=["smtp:dt-amb@kms.test"])
    _USERS_MADE_IN.add(dc.directory)


class CountingClient(DirectoryClient):
    """The real client, counting its searches (to see what the cache saves)."""

    searches = 0

    def find(self, login: LoginName, conn: Any = None) -> DirectoryUser | None:
        self.searches += 1
        return super().find(login, conn)


class DirectoryTests(TestCase):
    """The checker behind a real thread pool, against the DC."""

    timeout = 300

    def setUp(self) -> None:
        self.dc = samba.start_dc()
        self.addCleanup(self.dc.close)
        ensure_users(self.dc)
        self.pool = ThreadPool(0, 2, name="test-directory")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def settings(self, **changes: Any) -> DirectorySettings:
        base = DirectorySettings(
            uri=self.dc.ldaps_uri,
            start_tls=False,
            base_dn=samba.BASE_DN,
            domain=samba.DOMAIN,
            mail_domain=samba.MAIL_DOMAIN,
            bind_dn=samba.SERVICE_DN,
            bind_password=samba.SERVICE_PASSWORD,
            ca_file=self.dc.ca_file,
        )
        return dataclasses.replace(base, **changes)

    def checker(self, **changes: Any) -> DirectoryChecker:
        return DirectoryChecker(Directory(DirectoryClient(self.settings(**changes)), self.pool, reactor))

    def login(self, name: str, password: str, checker: DirectoryChecker | None = None,
              authzid: str | None = None) -> Deferred[str]:
        credentials = PlaintextCredentials(name, password, "PLAIN", CLIENT, authzid)
        return (checker or self.checker()).requestAvatarId(credentials)

    async def refusal(self, name: str, password: str, checker: DirectoryChecker | None = None) -> str:
        failure = await self.assertFailure(self.login(name, password, checker), AuthenticationFailed)
        self.assertNotIsInstance(failure, UnknownUser)
        return failure.reason

    async def test_login_forms(self) -> None:
        """Account, account@mail_domain, DOMAIN\\account, mail, alias, principal: all are alice."""
        checker = self.checker()
        for name in ("dt-alice", "DT-ALICE", "dt-alice@kms.test", "KMS\\dt-alice", "kms.test\\dt-alice",
                     "alice.dt@kms.test", "Alice.DT@KMS.test", "dt-al@kms.test"):
            self.assertEqual(await self.login(name, ALICE_PASSWORD, checker), "alice.dt@kms.test", name)
        # Without a mail address in the mail domain, the mailbox is account@mail_domain.
        self.assertEqual(await self.login("dt-bob", OTHER_PASSWORD, checker), "dt-bob@kms.test")
        self.assertEqual(await self.login("dt-carol", OTHER_PASSWORD, checker), "dt-carol@kms.test")

    async def test_realm_differs_from_mail_domain(self) -> None:
        """With mail_domain corp.test, user@kms.test is the principal name and user@corp.test the mail."""
        checker = self.checker(mail_domain="corp.test")
        for name in ("dt-corp", "dt-corp@kms.test", "dt.corp@corp.test", "KMS\\dt-corp"):
            self.assertEqual(await self.login(name, OTHER_PASSWORD, checker), "dt.corp@corp.test", name)
        self.assertEqual(await self.login("dt-bob@kms.test", OTHER_PASSWORD, checker), "dt-bob@corp.test")
        await self.assertFailure(self.login("dt-bob@elsewhere.test", OTHER_PASSWORD, checker), UnknownUser)

    async def test_wrong_password(self) -> None:
        self.dc.add_user("dt-wrong", ALICE_PASSWORD)
        self.assertEqual(await self.refusal("dt-wrong", "not it"), "wrong password")
        self.assertEqual(await self.refusal("KMS\\dt-wrong", ALICE_PASSWORD.upper()), "wrong password")

    async def test_refused_states(self) -> None:
        """Each state refuses the right password, and says which it was."""
        self.dc.add_user("dt-locked", OTHER_PASSWORD)
        self.dc.lock_out("dt-locked")
        table = {
            "dt-dis": "account disabled in the directory",
            "dt-exp": "account expired in the directory",
            "dt-mc": "password must be changed (directory)",
            "dt-locked": "account locked out in the directory",
        }
        for name, reason in table.items():
            self.assertEqual(await self.refusal(name, OTHER_PASSWORD), reason)
        self.dc.unlock("dt-locked")
        self.assertEqual(await self.login("dt-locked", OTHER_PASSWORD), "dt-locked@kms.test")

    async def test_unknown_and_ambiguous(self) -> None:
        await self.assertFailure(self.login("dt-nobody", OTHER_PASSWORD), UnknownUser)
        await self.assertFailure(self.login("dt-nobody@kms.test", OTHER_PASSWORD), UnknownUser)
        reason = await self.refusal("dt-amb@kms.test", OTHER_PASSWORD)
        self.assertIn("ambiguous", reason)

    async def test_injection(self) -> None:
        """Filter metacharacters, NUL and DNs in the name match nobody, even with alice's password."""
        names = [
            "*", "dt-alic*", "dt-alice*", "*)(sAMAccountName=*", "dt-alice)(|(sAMAccountName=*", ")(", "\\",
            "KMS\\*", "KMS\\dt-alic*", "*@kms.test", "dt-al*@kms.test", "dt-alice)(mail=*@kms.test",
            "dt-alice\x00", "\x00", "dt-a\\2a", "CN=dt-alice,CN=Users,DC=kms,DC=test",
            "CN=dt-alice,CN=Users,DC=kms,DC=test@kms.test", "KMS\\CN=dt-alice,CN=Users,DC=kms,DC=test",
        ]
        checker = self.checker()
        for name in names:
            await self.assertFailure(self.login(name, ALICE_PASSWORD, checker), UnknownUser)

    async def test_require_group_nested(self) -> None:
        """alice is in dt-inner, which is in dt-outer: a member of both; bob of neither."""
        for group in ("dt-outer", "dt-inner", f"CN=dt-outer,CN=Users,{samba.BASE_DN}"):
            checker = self.checker(require_group=group)
            self.assertEqual(await self.login("dt-alice", ALICE_PASSWORD, checker), "alice.dt@kms.test")
            reason = await self.refusal("dt-bob", OTHER_PASSWORD, checker)
            self.assertEqual(reason, f"not a member of {group}")
        # A group or base that does not exist is the admin's mistake, not the user's password.
        for changes in ({"require_group": "dt-no-such-group"},
                        {"require_group": f"CN=dt-no-such-group,CN=Users,{samba.BASE_DN}"},
                        {"base_dn": f"OU=nowhere,{samba.BASE_DN}"}):
            checker = self.checker(**changes)
            await self.assertFailure(self.login("dt-alice", ALICE_PASSWORD, checker), TemporaryAuthFailure)

    async def test_authzid(self) -> None:
        self.assertEqual(await self.login("dt-alice", ALICE_PASSWORD, authzid="alice.dt@kms.test"),
                         "alice.dt@kms.test")
        failure = await self.assertFailure(self.login("dt-alice", ALICE_PASSWORD, authzid="dt-bob@kms.test"),
                                           AuthenticationFailed)
        self.assertEqual(failure.reason, "may not act as dt-bob@kms.test")

    async def test_challenge_methods_refused(self) -> None:
        """CRAM-MD5 needs the password in clear, which the directory never gives: refused with the reason."""
        checker = self.checker()
        cram = CramMD5Credentials("dt-alice@kms.test", b"<1.2@kms>", b"0" * 32, CLIENT)
        failure = await self.assertFailure(checker.requestAvatarId(cram), AuthenticationFailed)
        self.assertEqual(failure.reason, "CRAM-MD5 impossible for alice.dt@kms.test: directory user")
        nobody = CramMD5Credentials("dt-nobody@kms.test", b"<1.2@kms>", b"0" * 32, CLIENT)
        await self.assertFailure(checker.requestAvatarId(nobody), UnknownUser)

    async def test_debug_log(self) -> None:
        """With the ``ldap`` debug category: one line per call with its outcome, never the password."""
        path = Path(self.mktemp())
        logs = Logs(path, ("ldap",))
        self.addCleanup(logs.close)
        checker = DirectoryChecker(Directory(DirectoryClient(self.settings()), self.pool, reactor, logs=logs))
        await self.login("dt-alice", ALICE_PASSWORD, checker)
        await self.assertFailure(self.login("dt-dis", OTHER_PASSWORD, checker), AuthenticationFailed)
        text = (path / "debug.log").read_text()
        self.assertIn("ldap.authenticate user=dt-alice outcome=ok ms=", text)
        self.assertIn('ldap.authenticate user=dt-dis outcome="AuthenticationFailed: account disabled in the '
                      'directory" ms=', text)
        self.assertNotIn(ALICE_PASSWORD, text)
        self.assertNotIn(OTHER_PASSWORD, text)

    async def test_starttls_and_plain(self) -> None:
        ldap = self.dc.ldap_uri
        starttls = self.checker(uri=ldap, start_tls=True)
        self.assertEqual(await self.login("dt-alice", ALICE_PASSWORD, starttls), "alice.dt@kms.test")
        refused = self.checker(uri=ldap)
        login = self.login("dt-alice", ALICE_PASSWORD, refused)
        failure = await self.assertFailure(login, TemporaryAuthFailure)
        self.assertIn("plain ldap:// refused", str(failure))
        plain = self.checker(uri=ldap, allow_plain_ldap=True)
        self.assertEqual(await self.login("dt-alice", ALICE_PASSWORD, plain), "alice.dt@kms.test")

    async def test_wrong_ca_refused(self) -> None:
        """A DC whose certificate the configured CA did not sign is not talked to, on LDAPS or StartTLS."""
        other = Path(self.mktemp())
        other.mkdir()
        generate_dev_certificate(other / "ca.pem", other / "ca.key", addresses=("127.0.0.1",))
        for changes in ({}, {"uri": self.dc.ldap_uri, "start_tls": True}):
            checker = self.checker(ca_file=other / "ca.pem", **changes)
            failure = await self.assertFailure(self.login("dt-alice", ALICE_PASSWORD, checker),
                                               TemporaryAuthFailure)
            self.assertIn("certificate verify failed", str(failure))

    async def test_dc_stopped(self) -> None:
        """DC down: a temporary failure for every name, never a refusal; back up, logins work again."""
        checker = self.checker()
        self.dc.stop()
        try:
            for name, password in (("dt-alice", ALICE_PASSWORD), ("dt-alice", "wrong"), ("dt-nobody", "x")):
                await self.assertFailure(self.login(name, password, checker), TemporaryAuthFailure)
        finally:
            self.dc.start()
        self.assertEqual(await self.login("dt-alice", ALICE_PASSWORD, checker), "alice.dt@kms.test")

    async def test_mailbox_lookup(self) -> None:
        """RCPT look-ups: mail, aliases, account names; misses and hits cached for cache_ttl."""
        clock = Clock()
        client = CountingClient(self.settings())
        directory = Directory(client, self.pool, reactor, clock=clock, cache_ttl=30)
        for address in ("alice.dt@kms.test", "DT-AL@kms.test", "dt-alice@kms.test"):
            self.assertEqual(await directory.mailbox(address), "alice.dt@kms.test", address)
        self.assertEqual(await directory.mailbox("dt-bob@kms.test"), "dt-bob@kms.test")
        self.assertIsNone(await directory.mailbox("dt-dis@kms.test"))  # disabled: no mail either
        self.assertEqual(await directory.mailbox("dt-mc@kms.test"), "dt-mc@kms.test")  # may not log in yet
        self.assertIsNone(await directory.mailbox("dt-nobody@kms.test"))
        self.assertIsNone(await directory.mailbox("dt-amb@kms.test"))
        self.assertIsNone(await directory.mailbox("dt-alice@elsewhere.test"))  # other domain: no search
        searches = client.searches
        self.assertEqual(searches, 8)
        self.assertEqual(await directory.mailbox("Alice.Dt@kms.test"), "alice.dt@kms.test")
        self.assertIsNone(await directory.mailbox("dt-nobody@kms.test"))
        self.assertEqual(client.searches, searches)  # both from the cache
        clock.advance(31)
        self.assertIsNone(await directory.mailbox("dt-nobody@kms.test"))
        self.assertEqual(client.searches, searches + 1)
        self.assertEqual(await directory.address_for("KMS\\dt-alice"), "alice.dt@kms.test")

    async def test_slow_dc(self) -> None:
        """A DC that accepts and never answers: a temporary failure at the overall timeout, and a call
        that waited for a thread past its deadline gives up without connecting."""
        connections: list[Any] = []

        class Silent(Protocol):
            def connectionMade(self) -> None:
                connections.append(self.transport)

        port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = ThreadPool(0, 1, name="test-directory-slow")
        pool.start()
        self.addCleanup(pool.stop)
        clock = Clock()
        settings = self.settings(uri=f"ldaps://127.0.0.1:{port.getHost().port}", receive_timeout=60)
        directory = Directory(DirectoryClient(settings), pool, reactor, clock=clock, timeout=20)
        first = directory.authenticate("dt-alice", ALICE_PASSWORD)
        second = directory.authenticate("dt-bob", OTHER_PASSWORD)
        while not connections:  # the first call is in its TLS handshake, the second waits for the thread
            await deferLater(reactor, 0.01, lambda: None)
        clock.advance(20.5)
        for d in (first, second):
            failure = await self.assertFailure(d, TemporaryAuthFailure)
            self.assertIn("did not answer within 20 s", str(failure))
        for transport in connections:
            transport.loseConnection()  # the first thread's handshake ends; the second job runs
        await deferToThreadPool(reactor, pool, lambda: None)  # after both jobs (one thread)
        self.assertEqual(len(connections), 1)


class DiagnoseTests(TestCase):
    """``kmsctl directory test``'s steps, from the client (the ctl test runs the real command)."""

    timeout = 120

    def setUp(self) -> None:
        self.dc = samba.start_dc()
        self.addCleanup(self.dc.close)
        ensure_users(self.dc)

    def client(self, **changes: Any) -> DirectoryClient:
        settings = DirectorySettings(
            uri=self.dc.ldaps_uri, start_tls=False, base_dn=samba.BASE_DN, domain=samba.DOMAIN,
            mail_domain=samba.MAIL_DOMAIN, bind_dn=samba.SERVICE_DN, bind_password=samba.SERVICE_PASSWORD,
            ca_file=self.dc.ca_file,
        )
        return DirectoryClient(dataclasses.replace(settings, **changes))

    def steps(self, client: DirectoryClient, name: str, password: str) -> tuple[bool, list[tuple[str, str]]]:
        seen: list[tuple[str, str]] = []
        ok = client.diagnose(name, password, lambda step, detail: seen.append((step, detail)))
        return ok, seen

    def test_success(self) -> None:
        ok, steps = self.steps(self.client(require_group="dt-outer"), "dt-alice", ALICE_PASSWORD)
        self.assertTrue(ok)
        self.assertEqual([s for s, _ in steps],
                         ["connect", "TLS", "service bind", "search", "user bind", "state", "groups"])
        self.assertIn("CN=dt-outer,CN=Users,DC=kms,DC=test", steps[-1][1])

    def test_failures(self) -> None:
        table = [
            (self.client(), "dt-dis", OTHER_PASSWORD, "search", "account disabled in the directory"),
            (self.client(), "dt-nobody", OTHER_PASSWORD, "service bind", "no entry matches"),
            (self.client(require_group="dt-outer"), "dt-bob", OTHER_PASSWORD, "state", "not a member of"),
            (self.client(bind_password="wrong"), "dt-alice", ALICE_PASSWORD, "TLS", "service account bind"),
            (self.client(uri="ldaps://127.0.0.1:1"), "dt-alice", ALICE_PASSWORD, None, "Connection refused"),
        ]
        for client, name, password, last_step, reason in table:
            ok, steps = self.steps(client, name, password)
            self.assertFalse(ok)
            self.assertEqual(steps[-1][0], "FAILED")
            self.assertIn(reason, steps[-1][1])
            self.assertEqual(steps[-2][0] if len(steps) > 1 else None, last_step, steps)
