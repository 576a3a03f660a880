"""Tests for kms.auth.winbind: the pure naming/reply/status functions, the helper pool with real
processes (hangs, deaths, stray output, capacity, shutdown), and NTLM through the real ``ntlm_auth``
against the Samba AD DC of tests/support/samba.py, with client tokens from pyspnego.

No stand-in plays ntlm_auth: the helpers are the real binary, or plain programs (``sleep``,
``sh``) that fail the ways a helper can fail.
"""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import spnego
from twisted.cred.portal import Portal
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from kms.auth.checkers import CompositeChecker
from kms.auth.credentials import IChallengeCredentials
from kms.auth.errors import AuthenticationFailed, MalformedResponse, TemporaryAuthFailure, UnknownUser
from kms.auth.exchange import Authenticated, Challenge, ISASLMechanism, MechanismSession
from kms.auth.md4 import nt_hash
from kms.auth.ntlm import Flag, parse_authenticate, parse_challenge, parse_negotiate, verify
from kms.auth.realm import IMailUser, Realm
from kms.auth.winbind import (
    DEFAULT_HELPER,
    DirectoryNames,
    DirectoryNTLM,
    DirectoryNTLMCredentials,
    HelperPool,
    IWinbindCredentials,
    Reply,
    WinbindChecker,
    WinbindExchange,
    account_name,
    helper_command,
    membership_name,
    parse_reply,
    refusal,
)
from kms.clientinfo import ClientInfo
from kms.config import Config, ConfigError, load_config, runtime_problems
from tests.support import samba
from tests.support.server import write_config

NAMES = DirectoryNames.from_config("KMS", "kms.test", "DC=kms,DC=test")
PASSWORD = "Wb-Pass-1!"


class RecordedErrors:
    """The error log's shape: what the pool reports for an admin."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def error(self, event: str, client: Any = None, **fields: object) -> None:
        self.events.append((event, fields))

    def names(self) -> list[str]:
        return [event for event, _ in self.events]


def _client() -> ClientInfo:
    return ClientInfo("192.0.2.7", 40000, "127.0.0.1", 143, "imap")


# --- pure functions -----------------------------------------------------------------------------


class HelperCommandTests(TestCase):
    def test_default(self) -> None:
        self.assertEqual(
            helper_command(DEFAULT_HELPER, "KMS", ""),
            ["/usr/bin/ntlm_auth", "--helper-protocol=squid-2.5-ntlmssp"],
        )

    def test_quoting_and_group(self) -> None:
        argv = helper_command(
            "ntlm_auth --helper-protocol=squid-2.5-ntlmssp '--configfile=/etc/my dir/smb.conf'", "kms", "mail"
        )
        self.assertEqual(argv[2:], ["--configfile=/etc/my dir/smb.conf", "--require-membership-of=KMS\\mail"])

    def test_refused(self) -> None:
        for command, why in [
            ("", "is empty"),
            ("ntlm_auth '--helper-protocol=squid-2.5-ntlmssp", "cannot be split"),
            ("ntlm_auth", "squid-2.5-ntlmssp"),
            ("ntlm_auth --helper-protocol=ntlm-server-1", "squid-2.5-ntlmssp"),
            ("ntlm_auth --helper-protocol=gss-spnego", "squid-2.5-ntlmssp"),
            ("ntlm_auth --helper-protocol squid-2.5-ntlmssp", "squid-2.5-ntlmssp"),
            (f"{DEFAULT_HELPER} --helper-protocol=gss-spnego", "exactly one"),
        ]:
            with self.assertRaises(ValueError, msg=command) as caught:
                helper_command(command, "KMS", "")
            self.assertIn(why, str(caught.exception), command)

    def test_membership_name(self) -> None:
        for group, expected in [
            ("mailusers", "KMS\\mailusers"),
            ("  mailusers ", "KMS\\mailusers"),
            ("KMS\\mailusers", "KMS\\mailusers"),
            ("S-1-5-21-1-2-3-1105", "S-1-5-21-1-2-3-1105"),
            ("CN=mailusers,CN=Users,DC=kms,DC=test", "KMS\\mailusers"),
            ("cn = Mail\\, users ,OU=x,DC=kms,DC=test", "KMS\\Mail, users"),
        ]:
            self.assertEqual(membership_name("kms", group), expected, group)
        self.assertRaises(ValueError, membership_name, "KMS", "CN=,DC=kms")


class DirectoryNamesTests(TestCase):
    def test_from_config(self) -> None:
        self.assertEqual(NAMES.nb_domain, "KMS")
        self.assertEqual(NAMES.dns_domains, frozenset({"kms.test"}))
        other = DirectoryNames.from_config("corp", "Mail.Example", "OU=x, dc=Corp , DC=Local")
        self.assertEqual(other.dns_domains, frozenset({"mail.example", "corp.local"}))
        self.assertEqual(other.nb_domain, "CORP")

    def test_login_name(self) -> None:
        """The directory's domains (NetBIOS or DNS) name the mail-domain address; others as before."""
        for user, domain, expected in [
            ("alice", "KMS", "alice@kms.test"),
            ("alice", "kms", "alice@kms.test"),
            ("alice", "kms.test", "alice@kms.test"),
            ("alice@kms.test", "", "alice@kms.test"),
            ("alice@kms.test", "KMS", "alice@kms.test"),
            ("alice", "", "alice"),
            ("bob", "OTHER", "bob"),
            ("bob", "example.test", "bob@example.test"),
        ]:
            self.assertEqual(NAMES.login_name(user, domain), expected, (user, domain))

    def test_owns(self) -> None:
        for name, owned in [
            ("alice@kms.test", True),
            ("alice@KMS.TEST", True),
            ("alice@example.test", False),
            ("alice", True),  # as the LDAP checker reads it: alice@kms.test, after the local users
            ("a@b@kms.test", True),
        ]:
            self.assertEqual(NAMES.owns(name), owned, name)

    def test_address(self) -> None:
        self.assertEqual(NAMES.address("KMS\\Alice"), "alice@kms.test")


class ReplyTests(TestCase):
    def test_parse(self) -> None:
        self.assertEqual(parse_reply(b"TT TlRMTVNTUAACAAAA"), Reply("TT", "TlRMTVNTUAACAAAA"))
        self.assertEqual(parse_reply("AF KMS\\jürgen".encode()), Reply("AF", "KMS\\jürgen"))
        self.assertEqual(parse_reply(b"BH"), Reply("BH", ""))
        for bad in [b"", b"OK", b"ERR", b"tt x", b"AF KMS\\a\x1b[2J", b"NA \xff", b"AF a\tb", b"PW x"]:
            self.assertRaises(ValueError, parse_reply, bad)

    def test_refusals(self) -> None:
        """Account and password problems are refusals naming the reason; anything else an outage."""
        for status, reason in [
            ("NT_STATUS_LOGON_FAILURE", "wrong password or unknown user (NT_STATUS_LOGON_FAILURE)"),
            ("NT_STATUS_ACCOUNT_LOCKED_OUT", "account locked out in the directory"),
            ("NT_STATUS_ACCOUNT_DISABLED", "account disabled in the directory"),
            ("NT_STATUS_ACCOUNT_EXPIRED", "account expired in the directory"),
            ("NT_STATUS_PASSWORD_MUST_CHANGE", "password must be changed (directory)"),
            ("NT_STATUS_PASSWORD_EXPIRED", "password expired in the directory"),
        ]:
            error = refusal(status, "")
            self.assertIsInstance(error, AuthenticationFailed)
            assert isinstance(error, AuthenticationFailed)
            self.assertIn(reason, error.reason)
            self.assertIn(status, error.reason)
        member = refusal("NT_STATUS_LOGON_FAILURE", "KMS\\mail")
        assert isinstance(member, AuthenticationFailed)
        self.assertIn("not a member of KMS\\mail", member.reason)
        for status in ["NT_STATUS_NO_LOGON_SERVERS", "NT_STATUS_INVALID_PARAMETER", "garbage", ""]:
            self.assertIsInstance(refusal(status, ""), TemporaryAuthFailure, status)

    def test_account_name(self) -> None:
        self.assertEqual(account_name("KMS\\alice", "KMS"), "KMS\\alice")
        self.assertEqual(account_name("kms\\alice", "KMS"), "KMS\\alice")
        self.assertRaises(AuthenticationFailed, account_name, "TRUSTED\\alice", "KMS")
        for bad in ["alice", "KMS\\", "KMS+alice"]:
            self.assertRaises(TemporaryAuthFailure, account_name, bad, "KMS")


# --- the pool, with real processes ---------------------------------------------------------------


def _empty_smb_conf(test: TestCase) -> Path:
    path = Path(test.mktemp())
    path.write_text("[global]\n")
    return path


class PoolTests(TestCase):
    """Pool mechanics with real child processes; time is a `Clock`, so nothing here waits on the wall."""

    def setUp(self) -> None:
        self.errors = RecordedErrors()
        self.clock = Clock()

    def pool(self, argv: list[str], **kwargs: Any) -> HelperPool:
        pool = HelperPool(argv, reactor, clock=self.clock, logs=self.errors, **kwargs)
        pool.startService()
        self.addCleanup(self._stop, pool)
        return pool

    def _stop(self, pool: HelperPool) -> Deferred[Any]:
        d = pool.stopService()
        self.clock.advance(pool.timeout)  # SIGKILL for helpers that ignore the closed stdin
        return d

    async def test_hung_helper_is_killed(self) -> None:
        """A helper that never answers: killed after the timeout, the request fails temporarily."""
        pool = self.pool(["sleep", "1000"], timeout=5)
        lease = await pool.lease()
        helper = lease.helper
        assert helper is not None
        request = lease.request(b"YR x")
        self.clock.advance(4.9)
        self.assertFalse(request.called)
        self.clock.advance(0.1)
        failure = self.failureResultOf(request, TemporaryAuthFailure)
        self.assertIn("no answer within 5 s", str(failure.value))
        await helper.ended
        self.assertEqual(pool.helpers, [])
        self.assertEqual(self.errors.names(), ["ntlm-helper-killed"])
        lease.release()
        self.assertEqual(pool._idle, [])

    async def test_dead_helper_replaced(self) -> None:
        """A helper that exits fails its request temporarily; the next lease starts a new one."""
        pool = self.pool(["sh", "-c", "read line; echo 'it went wrong' >&2; exit 3"], size=1)
        lease = await pool.lease()
        assert lease.helper is not None
        ended = lease.helper.ended
        failure = await self.assertFailure(lease.request(b"YR x"), TemporaryAuthFailure)
        self.assertIn("it went wrong", str(failure))
        await ended
        lease.release()
        self.assertEqual(self.errors.events[0][0], "ntlm-helper-exited")
        self.assertEqual(self.errors.events[0][1]["status"], 3)
        second = await pool.lease()
        self.assertIsNot(second.helper, None)
        self.assertEqual(pool.spawned, 2)
        second.release()

    async def test_stray_and_long_output(self) -> None:
        """Output nobody asked for, or a line without end, means the helper is not speaking the protocol."""
        pool = self.pool(["sh", "-c", "echo hello; exec sleep 1000"])
        lease = await pool.lease()
        assert lease.helper is not None
        await lease.helper.ended
        self.assertEqual(self.errors.events[0][1]["reason"], "output nobody asked for")
        lease.release()

        pool = self.pool(["sh", "-c", "read line; head -c 20000 /dev/zero | tr '\\0' a; exec sleep 1000"])
        lease = await pool.lease()
        await self.assertFailure(lease.request(b"YR x"), TemporaryAuthFailure)
        self.assertIn("longer than", str(self.errors.events[-1][1]["reason"]))
        lease.release()

    async def test_reply_outside_protocol(self) -> None:
        pool = self.pool(["sh", "-c", "read line; echo OK; exec sleep 1000"])
        lease = await pool.lease()
        assert lease.helper is not None
        failure = await self.assertFailure(lease.request(b"YR x"), TemporaryAuthFailure)
        self.assertIn("not squid-2.5-ntlmssp", str(failure))
        await lease.helper.ended

    async def test_capacity(self) -> None:
        """One exchange per helper: a second login waits for the first helper, up to the timeout."""
        pool = self.pool(["sleep", "1000"], size=1, timeout=10, max_waiting=1)
        first = await pool.lease()
        helper = first.helper
        second = pool.lease()
        self.assertFalse(second.called)
        self.failureResultOf(pool.lease(), TemporaryAuthFailure)  # the queue is full
        first.release()
        first.release()  # twice is harmless
        lease = self.successResultOf(second)
        self.assertIs(lease.helper, helper)
        third = pool.lease()
        self.clock.advance(10)
        failure = self.failureResultOf(third, TemporaryAuthFailure)
        self.assertIn("no NTLM helper free within 10 s", str(failure.value))
        self.assertEqual(pool.spawned, 1)
        lease.release()

    async def test_lease_expires(self) -> None:
        """A client that never sends its AUTHENTICATE gives its helper back after lease_timeout."""
        pool = self.pool(["sleep", "1000"], size=1, timeout=100, lease_timeout=60)
        lease = await pool.lease()
        helper = lease.helper
        lease.wait_for_client()
        waiting = pool.lease()
        self.clock.advance(59)
        self.assertFalse(waiting.called)
        self.clock.advance(1)
        self.assertIs(self.successResultOf(waiting).helper, helper)
        failure = self.failureResultOf(lease.request(b"KK x"), TemporaryAuthFailure)
        self.assertIn("expired", str(failure.value))

    async def test_stop_terminates_helpers(self) -> None:
        """Stopping the service ends every helper: by closed stdin, or SIGKILL after the timeout."""
        samba.require_samba()
        conf = _empty_smb_conf(self)
        pool = self.pool(["ntlm_auth", "--helper-protocol=squid-2.5-ntlmssp", f"--configfile={conf}"])
        stubborn = self.pool(["sleep", "1000"])
        leases = [await pool.lease(), await pool.lease(), await stubborn.lease()]
        pending = leases[0].request(b"YR")  # ntlm_auth answers "BH" only after a line; stopped first
        helpers = [lease.helper for lease in leases]
        await pool.stopService()
        self.failureResultOf(pending, TemporaryAuthFailure)
        stopping = stubborn.stopService()
        self.assertFalse(stopping.called)
        self.clock.advance(stubborn.timeout)
        await stopping
        self.assertTrue(all(h is not None and not h.alive for h in helpers))
        self.assertEqual((pool.helpers, stubborn.helpers), ([], []))
        self.failureResultOf(pool.lease(), TemporaryAuthFailure)
        self.assertEqual(self.errors.events, [])


# --- the real ntlm_auth ----------------------------------------------------------------------------


def _helper_pool(test: TestCase, conf: Path, group: str = "", **kwargs: Any) -> HelperPool:
    argv = helper_command(f"ntlm_auth --helper-protocol=squid-2.5-ntlmssp --configfile={conf}", "KMS", group)
    pool = HelperPool(argv, reactor, **kwargs)
    pool.startService()
    test.addCleanup(pool.stopService)
    return pool


class HelperChallengeTests(TestCase):
    """What needs ntlm_auth but no DC: its CHALLENGE, and local verification against it."""

    def setUp(self) -> None:
        samba.require_samba()
        self.pool = _helper_pool(self, _empty_smb_conf(self))

    async def test_local_user_verified_against_helper_challenge(self) -> None:
        """pyspnego asks for key exchange and sends a MIC; ntlm_auth grants it: the MIC is still checked."""
        client = spnego.client("alice@example.test", "des pass phrase", protocol="ntlm")
        negotiate = parse_negotiate(client.step())
        exchange = WinbindExchange(self.pool, NAMES)
        state = await exchange.challenge(negotiate)
        self.assertTrue(state.flags & Flag.KEY_EXCH)
        message = parse_authenticate(client.step(state.challenge))
        exchange.release()
        self.assertIsNotNone(message.mic)
        self.assertEqual(len(message.encrypted_session_key), 16)
        self.assertTrue(verify(message, state, nt_hash("des pass phrase"), False))
        self.assertFalse(verify(message, state, nt_hash("wrong"), False))
        raw = bytearray(message.raw)
        raw[72] ^= 1  # the MIC
        self.assertFalse(verify(parse_authenticate(bytes(raw)), state, nt_hash("des pass phrase"), False))
        no_key = replace(message, encrypted_session_key=b"")
        self.assertFalse(verify(no_key, state, nt_hash("des pass phrase"), False))

    async def test_hostile_challenge(self) -> None:
        """The helper's CHALLENGE is parsed like any message: truncated, mistyped or out of bounds fails."""
        negotiate = parse_negotiate(spnego.client("a", "b", protocol="ntlm").step())
        exchange = WinbindExchange(self.pool, NAMES)
        good = (await exchange.challenge(negotiate)).challenge
        exchange.release()
        self.assertEqual(parse_challenge(good, negotiate).server_challenge, good[24:32])
        for bad in [good[:47], good[:8] + b"\3" + good[9:], good[:40] + b"\xff\xff" + good[42:]]:
            self.assertRaises(MalformedResponse, parse_challenge, bad, negotiate)

    async def test_abandoned_exchange_gives_its_helper_back(self) -> None:
        """A client that leaves (or starts over) between CHALLENGE and AUTHENTICATE: the session
        aborts the mechanism and the helper is free at once, not after ``lease_timeout``."""
        pool = _helper_pool(self, _empty_smb_conf(self), size=1, lease_timeout=600)
        mechanism = DirectoryNTLM(cast(MechanismSession, PortalSession(Portal(Realm(), []))), NAMES, pool)
        self.assertIsInstance(await mechanism.step(None), Challenge)
        negotiate = spnego.client("a", "b", protocol="ntlm").step()
        self.assertIsInstance(await mechanism.step(negotiate), Challenge)
        waiting = pool.lease()
        self.assertNoResult(waiting)
        mechanism.abort()
        self.successResultOf(waiting).release()
        self.assertEqual(pool.spawned, 1)

    async def test_helper_reused(self) -> None:
        for _ in range(3):
            exchange = WinbindExchange(self.pool, NAMES)
            await exchange.challenge(parse_negotiate(spnego.client("a", "b", protocol="ntlm").step()))
            exchange.release()
        self.assertEqual(self.pool.spawned, 1)


def ntlm_login(pool: HelperPool, user: str, password: str, group: str = "") -> Deferred[str]:
    """One exchange through the pool, with pyspnego as the client."""
    return ensureDeferred(_ntlm_login(pool, user, password, group))


async def _ntlm_login(pool: HelperPool, user: str, password: str, group: str) -> str:
    client = spnego.client(user, password, protocol="ntlm")
    exchange = WinbindExchange(pool, NAMES, group)
    try:
        state = await exchange.challenge(parse_negotiate(client.step()))
        return await exchange.authenticate(parse_authenticate(client.step(state.challenge)))
    finally:
        exchange.release()


class DirectoryTests(TestCase):
    """NTLM through ntlm_auth and the DC's winbindd (each test holds the host's DC lease)."""

    timeout = 300

    def setUp(self) -> None:
        self.dc = samba.start_dc()
        self.addCleanup(self.dc.close)
        self.pool = _helper_pool(self, self.dc.smb_conf)

    async def assertRefused(self, user: str, password: str, reason: str, group: str = "") -> None:
        failure = await self.assertFailure(ntlm_login(self.pool, user, password, group), AuthenticationFailed)
        self.assertIn(reason, failure.reason)

    async def test_success_in_every_name_form(self) -> None:
        self.dc.add_user("wb-alice", PASSWORD)
        for user in ["KMS\\wb-alice", "kms\\WB-Alice", "wb-alice@kms.test", "wb-alice"]:
            self.assertEqual(await ntlm_login(self.pool, user, PASSWORD), "KMS\\wb-alice", user)
        self.assertEqual(self.pool.spawned, 1)

    async def test_refused_states(self) -> None:
        self.dc.add_user("wb-wrong", PASSWORD)
        self.dc.add_user("wb-disabled", PASSWORD, disabled=True)
        self.dc.add_user("wb-change", PASSWORD, must_change=True)
        self.dc.add_user("wb-expired", PASSWORD, expired=True)
        self.dc.add_user("wb-locked", PASSWORD)
        self.dc.lock_out("wb-locked")
        await self.assertRefused("KMS\\wb-wrong", "not it", "(NT_STATUS_LOGON_FAILURE)")
        await self.assertRefused("KMS\\wb-nobody", PASSWORD, "(NT_STATUS_LOGON_FAILURE)")
        for user, reason in [
            ("wb-disabled", "account disabled in the directory (NT_STATUS_ACCOUNT_DISABLED)"),
            ("wb-change", "password must be changed (directory) (NT_STATUS_PASSWORD_MUST_CHANGE)"),
            ("wb-expired", "account expired in the directory (NT_STATUS_ACCOUNT_EXPIRED)"),
            ("wb-locked", "account locked out in the directory (NT_STATUS_ACCOUNT_LOCKED_OUT)"),
        ]:
            await self.assertRefused(f"KMS\\{user}", PASSWORD, reason)
        self.dc.unlock("wb-locked")
        self.assertEqual(await ntlm_login(self.pool, "KMS\\wb-locked", PASSWORD), "KMS\\wb-locked")
        self.assertEqual(self.pool.spawned, 1)

    async def test_require_group(self) -> None:
        self.dc.add_group("wb-mail")
        self.dc.add_group("wb-staff", member_of=["wb-mail"])
        self.dc.add_user("wb-member", PASSWORD, groups=["wb-staff"])
        self.dc.add_user("wb-outsider", PASSWORD)
        self.pool = _helper_pool(self, self.dc.smb_conf, group="wb-mail")
        member = await ntlm_login(self.pool, "KMS\\wb-member", PASSWORD, "KMS\\wb-mail")
        self.assertEqual(member, "KMS\\wb-member")
        await self.assertRefused("KMS\\wb-outsider", PASSWORD, "not a member of KMS\\wb-mail", "KMS\\wb-mail")

    async def test_helper_killed_mid_exchange(self) -> None:
        """Killed between CHALLENGE and AUTHENTICATE: a temporary failure; the next login, a new helper."""
        self.dc.add_user("wb-kill", PASSWORD)
        client = spnego.client("KMS\\wb-kill", PASSWORD, protocol="ntlm")
        exchange = WinbindExchange(self.pool, NAMES)
        state = await exchange.challenge(parse_negotiate(client.step()))
        helper = self.pool.helpers[0]
        assert helper.pid is not None
        os.kill(helper.pid, signal.SIGKILL)
        await helper.ended
        message = parse_authenticate(client.step(state.challenge))
        await self.assertFailure(ensureDeferred(exchange.authenticate(message)), TemporaryAuthFailure)
        exchange.release()
        self.assertEqual(await ntlm_login(self.pool, "KMS\\wb-kill", PASSWORD), "KMS\\wb-kill")
        self.assertEqual(self.pool.spawned, 2)

    async def test_concurrent_logins(self) -> None:
        """More logins at once than helpers: they queue for the two, and every one succeeds."""
        self.dc.add_user("wb-many", PASSWORD)
        self.pool = _helper_pool(self, self.dc.smb_conf, size=2)
        logins = [ntlm_login(self.pool, "KMS\\wb-many", PASSWORD) for _ in range(6)]
        self.assertEqual(await gatherResults(logins), ["KMS\\wb-many"] * 6)
        self.assertEqual(self.pool.spawned, 2)

    async def test_dc_down(self) -> None:
        """winbindd gone: BH from the helper, a temporary failure; back when the DC is."""
        self.dc.add_user("wb-down", PASSWORD)
        self.dc.stop()
        try:
            down = ntlm_login(self.pool, "KMS\\wb-down", PASSWORD)
            failure = await self.assertFailure(down, TemporaryAuthFailure)
            self.assertIn("NT_STATUS_UNSUCCESSFUL", str(failure))
        finally:
            self.dc.start()
        self.assertEqual(await ntlm_login(self.pool, "KMS\\wb-down", PASSWORD), "KMS\\wb-down")
        self.assertEqual(self.pool.spawned, 1)

    async def test_checker_chain_and_mechanism(self) -> None:
        """DirectoryNTLM + WinbindChecker behind a portal: directory names go to the helper, others on."""
        self.dc.add_user("wb-chain", PASSWORD)
        looked_up: list[str] = []

        def address_for(account: str) -> Deferred[str]:
            looked_up.append(account)
            return deferLater(reactor, 0, lambda: "chain.mail@kms.test")

        portal = Portal(Realm(), [CompositeChecker([WinbindChecker(NAMES, address_for)])])
        session = PortalSession(portal)
        mechanism = DirectoryNTLM(cast(MechanismSession, session), NAMES, self.pool)
        verifyObject(ISASLMechanism, mechanism)
        result = await ntlm_exchange(mechanism, "KMS\\wb-chain", PASSWORD)
        self.assertEqual(result.identity, "chain.mail@kms.test")
        self.assertEqual(looked_up, ["KMS\\wb-chain"])
        credentials = session.credentials[0]
        self.assertIsInstance(credentials, DirectoryNTLMCredentials)
        verifyObject(IWinbindCredentials, credentials)
        self.assertTrue(IChallengeCredentials.providedBy(credentials))
        self.assertEqual(credentials.username, "wb-chain@kms.test")

        mechanism = DirectoryNTLM(cast(MechanismSession, session), NAMES, self.pool)
        await self.assertFailure(ntlm_exchange(mechanism, "bob@example.test", PASSWORD), UnknownUser)
        mechanism = DirectoryNTLM(cast(MechanismSession, session), NAMES, self.pool)
        other_domain = ntlm_exchange(mechanism, "OTHER\\wb-chain", PASSWORD)
        other = await self.assertFailure(other_domain, AuthenticationFailed)
        self.assertIn("NT_STATUS_LOGON_FAILURE", other.reason)
        self.assertEqual(self.pool._idle, self.pool.helpers)  # every exchange gave its helper back


class PortalSession:
    """The part of LoginSession a mechanism uses, straight to a portal (the e2e tests use the real one)."""

    client = _client()
    hostname = "mx.example.test"
    service = "imap"

    def __init__(self, portal: Portal) -> None:
        self.portal = portal
        self.credentials: list[Any] = []

    def login(self, credentials: Any) -> Deferred[Authenticated]:
        self.credentials.append(credentials)
        d = self.portal.login(credentials, None, IMailUser)
        return d.addCallback(lambda result: Authenticated(IMailUser(result[1]).address, result[1]))

    def refuse(self, username: str, method: str, reason: str) -> Deferred[Authenticated]:
        raise AssertionError(f"refused {username}: {reason}")


def ntlm_exchange(mechanism: DirectoryNTLM, user: str, password: str) -> Deferred[Authenticated]:
    """A whole SASL NTLM exchange with pyspnego as the client."""
    return ensureDeferred(_ntlm_exchange(mechanism, user, password))


async def _ntlm_exchange(mechanism: DirectoryNTLM, user: str, password: str) -> Authenticated:
    client = spnego.client(user, password, protocol="ntlm")
    first = await mechanism.step(None)
    assert isinstance(first, Challenge)
    challenge = await mechanism.step(client.step())
    assert isinstance(challenge, Challenge)
    result = await mechanism.step(client.step(challenge.data))
    assert isinstance(result, Authenticated)
    return result


class WithoutHelperTests(TestCase):
    """No helper: NTLM not allowed for directory users, or no helper that works."""

    async def test_refused_with_reason(self) -> None:
        checker = WinbindChecker(NAMES)
        portal = Portal(Realm(), [CompositeChecker([checker])])
        session = PortalSession(portal)
        mechanism = DirectoryNTLM(cast(MechanismSession, session), NAMES, pool=None)
        failure = await self.assertFailure(ntlm_exchange(mechanism, "KMS\\alice", "pw"), AuthenticationFailed)
        self.assertEqual(
            failure.reason,
            "NTLM not allowed for directory user alice@kms.test (allow_ntlm_for_directory_users is off)",
        )
        self.assertIsNone(cast(DirectoryNTLMCredentials, session.credentials[0]).exchange)
        mechanism = DirectoryNTLM(cast(MechanismSession, session), NAMES, pool=None)
        await self.assertFailure(ntlm_exchange(mechanism, "carol@example.test", "pw"), UnknownUser)

    async def test_broken_helper(self) -> None:
        """A helper that dies at once: the CHALLENGE is ours (local users go on), directory users tempfail."""
        pool = HelperPool(["false"], reactor)
        pool.startService()
        self.addCleanup(pool.stopService)
        session = PortalSession(Portal(Realm(), [CompositeChecker([WinbindChecker(NAMES)])]))
        mechanism = DirectoryNTLM(cast(MechanismSession, session), NAMES, pool)
        failure = await self.assertFailure(ntlm_exchange(mechanism, "KMS\\alice", "pw"), TemporaryAuthFailure)
        self.assertIn("NTLM helper unavailable: NTLM helper exited", str(failure))
        credentials = cast(DirectoryNTLMCredentials, session.credentials[0])
        self.assertEqual(credentials.state.challenge[:8], b"NTLMSSP\0")
        self.assertEqual(pool.helpers, [])


class ConfigTests(TestCase):
    """What `load_config` says about ``[directory]`` when NTLM for directory users is allowed."""

    def load(self, directory: str, allowed: bool = True) -> Config:
        allow = f"allow_ntlm_for_directory_users = {str(allowed).lower()}"
        extra = f"[security]\n{allow}\n[directory]\n{directory}"
        return load_config(write_config(Path(self.mktemp()), extra=extra))

    def test_default_helper(self) -> None:
        cfg = self.load(DIRECTORY)
        assert cfg.directory is not None
        self.assertEqual(cfg.directory.ntlm_helper, DEFAULT_HELPER)

    def test_problems(self) -> None:
        for text, problem in [
            (DIRECTORY.replace('domain = "KMS"\n', ""), "directory.domain: is required when"),
            (DIRECTORY + 'ntlm_helper = "ntlm_auth --helper-protocol=gss-spnego"\n', "ntlm_helper: must"),
            (DIRECTORY + 'ntlm_helper = "ntlm_auth \'"\n', "directory.ntlm_helper: cannot be split"),
            (DIRECTORY + 'require_group = "CN=,DC=kms"\n', "directory.require_group: names no group"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                self.load(text)
            self.assertIn(problem, str(caught.exception))
            self.load(text, allowed=False)  # only checked when NTLM for directory users is on

    def test_missing_helper_stops_the_start(self) -> None:
        helper = 'ntlm_helper = "/nonexistent/ntlm_auth --helper-protocol=squid-2.5-ntlmssp"\n'
        problem = "directory.ntlm_helper: /nonexistent/ntlm_auth is not an executable program here"
        self.assertIn(problem, "\n".join(runtime_problems(self.load(DIRECTORY + helper))))
        self.assertNotIn(problem, "\n".join(runtime_problems(self.load(DIRECTORY + helper, allowed=False))))


DIRECTORY = """uri = "ldaps://127.0.0.1"
base_dn = "DC=kms,DC=test"
domain = "KMS"
mail_domain = "kms.test"
bind_dn = "CN=kms-svc,CN=Users,DC=kms,DC=test"
bind_password_file = "ad-bind.secret"
"""

