"""CRAM-MD5, DIGEST-MD5, SCRAM-SHA-256 and APOP: the RFCs' known answers, and the state machines
over a real login session, portal, checker, user DB and security log.

Only the thread pool runs "threaded" work at once and time is a `task.Clock`, so every outcome,
the failure delay included, is observed deterministically.  Every bad input from issue 4's list
gets a clean failure (`MalformedResponse` or a delayed `AuthenticationFailed`), and Hypothesis feeds
the parsers garbage.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from kms.auth.checkers import CompositeChecker, LocalUserChecker
from kms.auth.credentials import IChallengeCredentials, UserSecrets
from kms.auth.errors import (
    AuthenticationFailed,
    MalformedResponse,
    MechanismUnavailable,
    TemporaryAuthFailure,
)
from kms.auth.exchange import Authenticated, Challenge, ISASLMechanism, StepOutOfOrder
from kms.auth.mechanisms import (
    ApopCredentials,
    CramMD5Credentials,
    DigestMD5Credentials,
    ScramCredentials,
    parse_directives,
)
from kms.auth.passwords import DEFAULT_ITERATIONS, StoreKey, scram_keys_from_salted
from kms.auth.realm import MailUser, Realm
from kms.auth.sasl import SASLEngine
from kms.auth.session import LoginSession
from kms.clientinfo import ClientInfo
from kms.logs import Logs
from kms.store.users import UserDB
from tests.support.sasl_clients import ScramClient, digest_response

HOST = "mx.example.test"
PASSWORD = "Pässwort 1"
ALL = ["SCRAM-SHA-256", "CRAM-MD5", "DIGEST-MD5", "LOGIN", "PLAIN"]


class ImmediateThreadPool:
    """Runs "threaded" work at once, on the calling thread, so tests need no real reactor."""

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, object], None], func: Callable[..., object], *args: object
    ) -> None:
        try:
            result = func(*args)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class ImmediateReactor:
    def callFromThread(self, f: Callable[..., object], *args: object) -> None:
        f(*args)


# --- known answers from the RFCs -------------------------------------------------------------------

CLIENT = ClientInfo("192.0.2.7", 40000, "127.0.0.1", 143, "imap")


class KnownAnswerTests(TestCase):
    def test_cram_md5_rfc2195(self) -> None:
        """RFC 2195 §2: tim / tanstaaftanstaaf."""
        challenge = b"<1896.697170952@postoffice.reston.mci.net>"
        good = CramMD5Credentials("tim", challenge, b"b913a602c7eda7a495b4e6e7334d3890", CLIENT)
        verifyObject(IChallengeCredentials, good)
        self.assertTrue(good.check(UserSecrets("tim@x.test", "tanstaaftanstaaf")))
        self.assertFalse(good.check(UserSecrets("tim@x.test", "tanstaaftanstaaF")))
        self.assertNotIn("b913a6", repr(good))

    def test_apop_rfc1939(self) -> None:
        """RFC 1939 §7: mrose / tanstaaf."""
        timestamp = "<1896.697170952@dbc.mtview.ca.us>"
        good = ApopCredentials("mrose", timestamp, b"c4c9334bac560ecc979e58001b3e22fb", CLIENT)
        self.assertTrue(good.check(UserSecrets("mrose@x.test", "tanstaaf")))
        self.assertFalse(good.check(UserSecrets("mrose@x.test", "tanstaaF")))

    def test_digest_md5_rfc2831(self) -> None:
        """RFC 2831 §4, the IMAP example: chris / secret, response and rspauth."""
        credentials = DigestMD5Credentials(
            username="chris",
            realm="elwood.innosoft.com",
            nonce=b"OA6MG9tEQGm2hh",
            cnonce=b"OA6MHXh6VqTrRk",
            nc=b"00000001",
            digest_uri=b"imap/elwood.innosoft.com",
            response=b"d388dad90d4bbd760a152321f2143af7",
            utf8_charset=True,
            client=CLIENT,
        )
        self.assertFalse(credentials.check(UserSecrets("chris@x.test", "Secret")))
        self.assertIsNone(credentials.rspauth)
        self.assertTrue(credentials.check(UserSecrets("chris@x.test", "secret")))
        self.assertEqual(credentials.rspauth, b"ea40f60335c427b5527b84dbabcdfffd")

    def test_scram_sha256_rfc7677(self) -> None:
        """RFC 7677 §3: user / pencil, salt and iterations from the example; proof and signature."""
        salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
        keys = scram_keys_from_salted(hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 4096), salt, 4096)
        nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
        auth_message = (
            f"n=user,r=rOprNGfwEbeRWgbNEkqO,r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r={nonce}"
        ).encode()
        proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
        credentials = ScramCredentials("user", auth_message, proof, CLIENT)
        self.assertTrue(credentials.check(UserSecrets("user@x.test", None, keys)))
        signature = base64.b64encode(credentials.server_signature or b"")
        self.assertEqual(signature, b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
        tampered = ScramCredentials("user", auth_message + b"x", proof, CLIENT)
        self.assertFalse(tampered.check(UserSecrets("user@x.test", None, keys)))
        self.assertIsNone(tampered.server_signature)
        short = ScramCredentials("user", auth_message, proof[:-1], CLIENT)
        self.assertFalse(short.check(UserSecrets("user@x.test", None, keys)))


# --- DIGEST-MD5 directive parsing -----------------------------------------------------------------


class DirectiveTests(TestCase):
    def test_parse(self) -> None:
        parsed = parse_directives(
            b' username="chris" , REALM="a\\"b",nonce="x",,  nc=00000001,qop=auth,empty="" '
        )
        self.assertEqual(
            parsed,
            {
                "username": b"chris",
                "realm": b'a"b',
                "nonce": b"x",
                "nc": b"00000001",
                "qop": b"auth",
                "empty": b"",
            },
        )
        self.assertEqual(parse_directives(b""), {})

    def test_malformed(self) -> None:
        for data in [
            b'username="chris",username="bob"',  # duplicated
            b'username="chris",USERNAME="chris"',  # duplicated, names are case-insensitive
            b'username="chris',  # unterminated
            b'username="chris\\',  # escape at the end
            b"username",  # no value
            b"username=",  # empty token
            b'username="a" realm="b"',  # no comma
            b'="a"',  # no name
            b"user name=a",
            b"nonce=" + b"x" * 1025,  # overlong
            b'nonce="' + b"x" * 1025 + b'"',
            b",".join(b"d%d=1" % i for i in range(33)),  # too many directives
            b"a=\x00",
        ]:
            self.assertRaises(MalformedResponse, parse_directives, data)

    @given(st.binary(max_size=300))
    def test_garbage_never_crashes(self, data: bytes) -> None:
        try:
            parsed = parse_directives(data)
        except MalformedResponse:
            return
        self.assertLessEqual(len(parsed), 32)

    @given(
        st.dictionaries(
            st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
            st.binary(max_size=50).filter(lambda b: b"\r" not in b and b"\n" not in b),
            max_size=10,
        )
    )
    def test_round_trip(self, directives: dict[str, bytes]) -> None:
        """Any set of directives, quoted with escapes, parses back to itself."""

        def quote(value: bytes) -> bytes:
            return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'

        data = b",".join(name.encode() + b"=" + quote(value) for name, value in directives.items())
        self.assertEqual(parse_directives(data), directives)


# --- the state machines over a real session --------------------------------------------------------


def challenge_of(result: object) -> bytes:
    assert isinstance(result, Challenge), result
    return result.data


class MechanismTestCase(TestCase):
    """A real LoginSession on a real portal, checker chain, user DB and security log."""

    listener = "imap"

    def setUp(self) -> None:
        self.store = Path(self.mktemp())
        self.store.mkdir()
        self.key = StoreKey.load_or_create(self.store / "store.key")
        self.userdb = UserDB(self.store / "users.db")
        self.addCleanup(self.userdb.close)
        self.userdb.add("alice@example.test", PASSWORD, "des", self.key)
        self.userdb.add("bob@example.test", PASSWORD, "sha", self.key)
        self.userdb.add("carol@example.test", PASSWORD, "des", self.key)
        self.userdb.set_enabled("carol@example.test", False)
        self.userdb.add("dave@example.test", PASSWORD, "sha", self.key)
        raw = sqlite3.connect(self.store / "users.db")
        raw.execute("UPDATE users SET scram = NULL WHERE address = 'dave@example.test'")
        raw.commit()
        raw.close()
        self.logs = Logs(self.store / "logs")
        self.addCleanup(self.logs.close)
        self.clock = Clock()
        self.client = ClientInfo("192.0.2.7", 40000, "127.0.0.1", 143, self.listener)
        self.checker = LocalUserChecker(
            self.userdb,
            self.key,
            ImmediateThreadPool(),
            ImmediateReactor(),
            "example.test",  # type: ignore[arg-type]
        )
        self.session = self.new_session()

    def new_session(self, policy: Any = None) -> LoginSession:
        portal = Portal(Realm(), [CompositeChecker([self.checker])])
        return LoginSession(
            portal,
            SASLEngine(ALL, policy),
            self.client,
            self.logs,
            clock=self.clock,
            hostname=HOST,
            scram_lookup=self.checker.scram_parameters,
        )

    def step(self, mechanism: ISASLMechanism, data: bytes | None) -> object:
        """The fired result of one step: a Challenge, an Authenticated or a Failure (handled)."""
        results: list[object] = []
        mechanism.step(data).addBoth(results.append)
        if not results:
            raise AssertionError("step has not fired")
        return results[0]

    def refused(self, d: Deferred[Any]) -> AuthenticationFailed:
        """The failure of ``d``, which must come exactly after the one-second delay."""
        self.assertNoResult(d)
        self.clock.advance(1)
        error = self.failureResultOf(d, AuthenticationFailed).value
        self.assertEqual(error.args, ("invalid credentials",))  # nothing about the cause
        return error

    def malformed(self, mechanism: ISASLMechanism, data: bytes | None) -> None:
        self.failureResultOf(mechanism.step(data), MalformedResponse)
        self.failureResultOf(mechanism.step(b""), StepOutOfOrder)

    def security_log(self) -> list[str]:
        """Each security.log line from the event on (no time, session, listener, client)."""
        lines = (self.store / "logs" / "security.log").read_text().splitlines()
        return [line.split(" ", 4)[4] for line in lines]

    def last_reason(self) -> str:
        match = re.search(r'reason="([^"]*)"', self.security_log()[-1])
        assert match is not None, self.security_log()
        return match.group(1)


class CramMD5Tests(MechanismTestCase):
    def answer(self, challenge: bytes, user: str, password: str = PASSWORD) -> bytes:
        digest = hmac.new(password.encode(), challenge, "md5").hexdigest()
        return f"{user} {digest}".encode()

    def test_challenge(self) -> None:
        """``<random.time@hostname>``, fresh for every exchange."""
        first = challenge_of(self.step(self.session.begin("CRAM-MD5"), None))
        second = challenge_of(self.step(self.session.begin("CRAM-MD5"), None))
        self.assertRegex(first.decode(), r"^<\d+\.\d+@mx\.example\.test>$")
        self.assertNotEqual(first, second)

    def test_success(self) -> None:
        mechanism = self.session.begin("cram-md5")
        challenge = challenge_of(self.step(mechanism, None))
        result = self.step(mechanism, self.answer(challenge, "Alice"))
        self.assertEqual(result, Authenticated("alice@example.test", MailUser("alice@example.test")))
        self.assertEqual(self.client.identity, "alice@example.test")
        self.assertEqual(
            self.security_log(),
            ["login protocol=imap user=Alice identity=alice@example.test method=CRAM-MD5"],
        )
        self.failureResultOf(mechanism.step(b"again"), StepOutOfOrder)

    def test_upper_case_digest(self) -> None:
        mechanism = self.session.begin("CRAM-MD5")
        challenge = challenge_of(self.step(mechanism, None))
        user, digest = self.answer(challenge, "alice").split(b" ")
        self.assertIsInstance(self.step(mechanism, user + b" " + digest.upper()), Authenticated)

    def test_failures_look_alike(self) -> None:
        """sha storage, wrong password, unknown user, disabled account: one reply, four reasons."""
        for user, password, reason in [
            ("bob", PASSWORD, "CRAM-MD5 impossible for bob@example.test: password stored one-way"),
            ("alice", "wrong", "wrong password"),
            ("nobody", PASSWORD, "no checker knows this user"),
            ("carol", PASSWORD, "account disabled"),
        ]:
            mechanism = self.session.begin("CRAM-MD5")
            challenge = challenge_of(self.step(mechanism, None))
            self.refused(mechanism.step(self.answer(challenge, user, password)))
            self.assertEqual(self.last_reason(), reason)
            self.assertIsNone(self.client.identity)

    def test_bad_input(self) -> None:
        """Initial response, no space, non-UTF-8 name: malformed; a bad digest or empty name fails
        like a wrong password; nothing is left running."""
        self.malformed(self.session.begin("CRAM-MD5"), b"alice 0123")
        self.malformed(self.session.begin("CRAM-MD5"), b"")
        for answer in (b"alice", b"alice0123456789abcdef0123456789abcdef", b"\xff\xfe " + b"0" * 32):
            mechanism = self.session.begin("CRAM-MD5")
            self.step(mechanism, None)
            self.malformed(mechanism, answer)
        for answer, reason in [
            (b"alice xyz", "CRAM-MD5 digest is not 32 hex digits"),
            (b"alice " + b"g" * 32, "CRAM-MD5 digest is not 32 hex digits"),
            (b" " + b"0" * 32, "empty user name"),
        ]:
            mechanism = self.session.begin("CRAM-MD5")
            self.step(mechanism, None)
            self.refused(mechanism.step(answer))
            self.assertEqual(self.last_reason(), reason)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_temporary_failure(self) -> None:
        """A user DB that cannot be read is "try later", at once, never a wrong password."""
        mechanism = self.session.begin("CRAM-MD5")
        challenge = challenge_of(self.step(mechanism, None))
        self.userdb.close()
        self.failureResultOf(mechanism.step(self.answer(challenge, "alice")), TemporaryAuthFailure)
        self.assertTrue(self.security_log()[-1].startswith("login-tempfail protocol=imap user=alice"))


class DigestMD5Tests(MechanismTestCase):
    def test_challenge(self) -> None:
        """realm is the host name, qop auth, charset utf-8, algorithm=md5-sess unquoted (curl
        refuses the quoted form); the nonce is fresh for every exchange."""
        first = challenge_of(self.step(self.session.begin("DIGEST-MD5"), None))
        second = challenge_of(self.step(self.session.begin("DIGEST-MD5"), None))
        self.assertRegex(
            first.decode(),
            r'^realm="mx\.example\.test",nonce="[A-Za-z0-9+/=]{32}",qop="auth",charset=utf-8,algorithm=md5-sess$',
        )
        self.assertNotEqual(parse_directives(first)["nonce"], parse_directives(second)["nonce"])

    def test_success_with_rspauth(self) -> None:
        """The server proves itself with rspauth; only the client's empty answer logs it in."""
        mechanism = self.session.begin("DIGEST-MD5")
        response, rspauth = digest_response(challenge_of(self.step(mechanism, None)))
        self.assertEqual(challenge_of(self.step(mechanism, response)), rspauth)
        self.assertIsNone(self.client.identity)
        self.assertEqual(self.security_log(), [])
        self.assertEqual(
            self.step(mechanism, b""), Authenticated("alice@example.test", MailUser("alice@example.test"))
        )
        self.assertEqual(self.client.identity, "alice@example.test")
        self.assertEqual(
            self.security_log(),
            ["login protocol=imap user=alice@example.test identity=alice@example.test method=DIGEST-MD5"],
        )

    def test_hosts_and_non_latin1(self) -> None:
        """digest-uri may name the server by its address; a bare local part works; UTF-8 names and
        passwords beyond Latin-1 hash as UTF-8."""
        self.userdb.set_password("alice@example.test", "пароль", "des", self.key)
        for user, uri in [("alice", "imap/127.0.0.1"), ("ALICE@example.test", f"IMAP/{HOST.upper()}/x")]:
            mechanism = self.session.begin("DIGEST-MD5")
            response, rspauth = digest_response(challenge_of(self.step(mechanism, None)), user, "пароль", uri)
            self.assertEqual(challenge_of(self.step(mechanism, response)), rspauth)
            self.assertIsInstance(self.step(mechanism, b""), Authenticated)

    def test_abandoned_after_rspauth(self) -> None:
        """A client that never answers rspauth is not logged in; the next attempt logs the abandon."""
        mechanism = self.session.begin("DIGEST-MD5")
        response, _ = digest_response(challenge_of(self.step(mechanism, None)))
        self.step(mechanism, response)
        self.session.begin("PLAIN")
        self.assertIsNone(self.client.identity)
        self.assertEqual(
            self.security_log(),
            [
                "login-abandoned protocol=imap user=alice@example.test method=DIGEST-MD5 "
                'reason="client did not accept the server\'s proof"'
            ],
        )
        self.failureResultOf(mechanism.step(b""), StepOutOfOrder)
        self.assertIsNone(self.client.identity)

    def test_answer_to_rspauth_must_be_empty(self) -> None:
        mechanism = self.session.begin("DIGEST-MD5")
        response, _ = digest_response(challenge_of(self.step(mechanism, None)))
        self.step(mechanism, response)
        self.malformed(mechanism, b"rspauth=thanks")
        self.assertIsNone(self.client.identity)

    def test_failures_look_alike(self) -> None:
        for user, password, reason in [
            (
                "bob@example.test",
                PASSWORD,
                "DIGEST-MD5 impossible for bob@example.test: password stored one-way",
            ),
            ("alice@example.test", "wrong", "wrong password"),
            ("nobody@example.test", PASSWORD, "no checker knows this user"),
            ("carol@example.test", PASSWORD, "account disabled"),
        ]:
            mechanism = self.session.begin("DIGEST-MD5")
            response, _ = digest_response(challenge_of(self.step(mechanism, None)), user, password)
            self.refused(mechanism.step(response))
            self.assertEqual(self.last_reason(), reason)

    def test_refused_responses(self) -> None:
        """Well-formed responses that do not fit this exchange fail like a wrong password."""
        for override, reason in [
            ({"nonce": '"replayed"'}, "DIGEST-MD5: nonce is not the one this exchange issued"),
            ({"nc": "00000002"}, "DIGEST-MD5: nonce count b'00000002' is not 00000001"),
            ({"qop": "auth-int"}, "DIGEST-MD5: only qop=auth is offered"),
            ({"cipher": "rc4"}, "DIGEST-MD5: cipher given without qop=auth-conf"),
            ({"realm": '"elsewhere.test"'}, "DIGEST-MD5: realm 'elsewhere.test' is not mx.example.test"),
            ({"digest-uri": f'"smtp/{HOST}"'}, "DIGEST-MD5: digest-uri is for 'smtp', not imap"),
            (
                {"digest-uri": '"imap/evil.test"'},
                "DIGEST-MD5: digest-uri host 'evil.test' is not this server",
            ),
            ({"digest-uri": '"imap"'}, "DIGEST-MD5: digest-uri b'imap' is not serv-type/host"),
            ({"response": "0" * 31}, "DIGEST-MD5: response is not 32 hex digits"),
            ({"authzid": '"bob@example.test"'}, "authorization identity not allowed"),
            ({"username": '""'}, "empty user name"),
        ]:
            mechanism = self.session.begin("DIGEST-MD5")
            response, _ = digest_response(challenge_of(self.step(mechanism, None)), **override)
            self.refused(mechanism.step(response))
            self.assertEqual(self.last_reason(), reason, override)

    def test_authzid_of_oneself(self) -> None:
        mechanism = self.session.begin("DIGEST-MD5")
        challenge = challenge_of(self.step(mechanism, None))
        response, rspauth = digest_response(challenge, authzid='"alice@example.test"')
        self.assertEqual(challenge_of(self.step(mechanism, response)), rspauth)

    def test_malformed_responses(self) -> None:
        """Missing, duplicated, overlong directives, wrong charset, initial response: malformed."""
        self.malformed(self.session.begin("DIGEST-MD5"), b'username="alice"')  # before the challenge
        for build in [
            lambda r: r.replace(b",cnonce=", b",x-cnonce="),  # missing cnonce
            lambda r: r + b",nc=00000001",  # duplicated
            lambda r: r + b',nonce="' + b"n" * 2000 + b'"',  # overlong and duplicated
            lambda r: r + b',x-pad="' + b"n" * 1025 + b'"',  # overlong
            lambda r: r.replace(b"charset=utf-8", b"charset=latin1"),
            lambda r: r + b',username="unterminated',
            lambda r: b"",  # no directives at all
            lambda r: r.replace(b'username="alice@example.test"', b'username="\xff"'),
        ]:
            mechanism = self.session.begin("DIGEST-MD5")
            response, _ = digest_response(challenge_of(self.step(mechanism, None)))
            self.malformed(mechanism, build(response))
        self.assertEqual(self.security_log(), [])

    @given(st.binary(max_size=400))
    @settings(max_examples=200, deadline=None)
    def test_garbage_after_challenge(self, data: bytes) -> None:
        """Whatever a client sends, the step fails cleanly: malformed, or refused after the delay."""
        mechanism = self.session.begin("DIGEST-MD5")
        self.step(mechanism, None)
        d = mechanism.step(data)
        self.clock.advance(1)  # refusals fire after the delay
        self.assertTrue(self.failureResultOf(d).check(MalformedResponse, AuthenticationFailed))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(self.client.identity)


class SMTPDigestTests(MechanismTestCase):
    """On SMTP (and POP3) the digest-uri's service is that protocol's, not imap."""

    listener = "submission"

    def test_service_names(self) -> None:
        self.assertEqual((self.session.protocol, self.session.service), ("smtp", "smtp"))
        pop3 = LoginSession(
            Portal(Realm(), []),
            SASLEngine([]),
            ClientInfo("1.2.3.4", 1, "127.0.0.1", 110, "pop3s"),
            self.logs,
        )
        self.assertEqual((pop3.protocol, pop3.service), ("pop3", "pop"))

    def test_digest_uri_must_name_smtp(self) -> None:
        mechanism = self.session.begin("DIGEST-MD5")
        challenge = challenge_of(self.step(mechanism, None))
        wrong, _ = digest_response(challenge, uri=f"imap/{HOST}")
        d = mechanism.step(wrong)
        self.clock.advance(1)
        self.failureResultOf(d, AuthenticationFailed)
        self.assertEqual(self.last_reason(), "DIGEST-MD5: digest-uri is for 'imap', not smtp")
        mechanism = self.session.begin("DIGEST-MD5")
        response, rspauth = digest_response(challenge_of(self.step(mechanism, None)), uri=f"smtp/{HOST}")
        self.assertEqual(challenge_of(self.step(mechanism, response)), rspauth)


class ScramTests(MechanismTestCase):
    def exchange(self, client: ScramClient, mechanism: ISASLMechanism | None = None) -> object:
        """Run ``client`` against a new SCRAM-SHA-256 exchange until it ends; the last result."""
        mechanism = mechanism or self.session.begin("SCRAM-SHA-256")
        result = self.step(mechanism, None)
        self.assertEqual(result, Challenge(b""))
        while isinstance(result, Challenge):
            d = mechanism.step(client(result.data))
            self.clock.advance(1)
            results: list[object] = []
            d.addBoth(results.append)
            result = results[0]
        return result

    def test_des_and_sha_users(self) -> None:
        """Keys stored with either storage work; the client verified the server signature."""
        for user in ("alice", "bob@example.test"):
            client = ScramClient(user, PASSWORD)
            result = self.exchange(client)
            self.assertIsInstance(result, Authenticated)
            self.assertEqual(client.steps, 3)
        self.assertEqual(
            [line.split(" ", 3)[:3] for line in self.security_log()],
            [["login", "protocol=imap", "user=alice"], ["login", "protocol=imap", "user=bob@example.test"]],
        )

    def test_y_flag_and_own_authzid(self) -> None:
        client = ScramClient("bob@example.test", PASSWORD, authzid="bob@example.test")
        client.gs2 = "y,a=bob@example.test,"
        self.assertIsInstance(self.exchange(client), Authenticated)

    def test_failures_look_alike(self) -> None:
        for user, password, reason in [
            ("bob@example.test", "wrong", "wrong password"),
            ("nobody@example.test", PASSWORD, "no checker knows this user"),
            ("carol@example.test", PASSWORD, "account disabled"),
            (
                "dave@example.test",
                PASSWORD,
                "SCRAM-SHA-256 impossible for dave@example.test: "
                "no SCRAM keys stored (set the password again)",
            ),
            ("alice", PASSWORD + " ", "wrong password"),
        ]:
            result = self.exchange(ScramClient(user, password))
            assert isinstance(result, Failure)
            self.assertEqual(result.value.args, ("invalid credentials",))
            self.assertEqual(self.last_reason(), reason)
            self.assertIsNone(self.client.identity)

    def test_server_first_does_not_reveal_users(self) -> None:
        """Unknown users and users without keys get a stable made-up salt and the usual count."""

        def server_first(user: str) -> dict[str, str]:
            mechanism = self.session.begin("SCRAM-SHA-256")
            self.step(mechanism, None)
            data = challenge_of(self.step(mechanism, f"n,,n={user},r=abc".encode()))
            return dict(part.split("=", 1) for part in data.decode().split(","))

        real, ghost, again, dave = (server_first(u) for u in ("alice", "ghost", "GHOST", "dave"))
        self.assertEqual(ghost["s"], again["s"])
        self.assertNotEqual(ghost["s"], dave["s"])
        self.assertEqual({real["i"], ghost["i"], dave["i"]}, {str(DEFAULT_ITERATIONS)})
        self.assertTrue(ghost["r"].startswith("abc") and len(ghost["r"]) > 30)
        self.assertEqual(len(base64.b64decode(ghost["s"])), len(base64.b64decode(real["s"])))

    def test_client_first_errors(self) -> None:
        for first in [
            b"n,,r=abc,n=alice",  # order
            b"n,,m=ext,n=alice,r=abc",  # extension before the name
            b"x,,n=alice,r=abc",  # bad flag
            b"n,alice,n=alice,r=abc",  # authzid without a=
            b"n,n=alice,r=abc",  # no GS2 header
            b"n,,n=al=41ice,r=abc",  # bad saslname escape
            b"n,,n=alice,r=",  # empty nonce
            b"n,,n=alice,r=a\x01b",
            b"n,,n=alice,r=abc,bad",
            b"n,,n=alice",
            b"\xff",
            b"",
        ]:
            mechanism = self.session.begin("SCRAM-SHA-256")
            self.step(mechanism, None)
            self.malformed(mechanism, first)
        for first, reason in [
            (b"p=tls-unique,,n=alice,r=abc", "SCRAM channel binding is not supported"),
            (b"n,,n=alice,r=abc,m=ext", "SCRAM mandatory extension not supported"),
            (b"n,,n=,r=abc", "empty user name"),
        ]:
            mechanism = self.session.begin("SCRAM-SHA-256")
            self.step(mechanism, None)
            self.refused(mechanism.step(first))
            self.assertEqual(self.last_reason(), reason)

    def test_acting_as_someone_else(self) -> None:
        result = self.exchange(ScramClient("alice", PASSWORD, authzid="bob@example.test"))
        assert isinstance(result, Failure)
        self.assertEqual(self.last_reason(), "authorization identity not allowed")

    def test_client_final_errors(self) -> None:
        """A wrong channel binding, nonce or proof fails; broken syntax is malformed; the answer to
        the server-final message must be empty."""

        def after_first(user: str = "alice") -> tuple[ISASLMechanism, ScramClient, bytes]:
            mechanism = self.session.begin("SCRAM-SHA-256")
            client = ScramClient(user, PASSWORD)
            self.step(mechanism, None)
            server_first = challenge_of(self.step(mechanism, client(b"")))
            return mechanism, client, client(server_first)

        for change, reason in [
            (lambda f: f.replace(b"c=biws", b"c=eSws"), "SCRAM channel binding data differs"),
            (lambda f: re.sub(rb"r=[^,]*", b"r=other", f), "SCRAM nonce is not this exchange's"),
            (lambda f: f[:-8] + b"AAAAAAA=", "wrong password"),
            (lambda f: re.sub(rb"p=.*", b"p=AAAA", f), "wrong password"),
        ]:
            mechanism, _, final = after_first()
            self.refused(mechanism.step(change(final)))
            self.assertEqual(self.last_reason(), reason)
        for change in [
            lambda f: f.split(b",p=")[0],  # no proof
            lambda f: f.replace(b",p=", b",p=!"),
            lambda f: f.replace(b"c=biws", b"c=!!"),
            lambda f: f.replace(b"c=biws,", b""),
            lambda f: b"x" + f,
        ]:
            mechanism, _, final = after_first()
            self.malformed(mechanism, change(final))
        mechanism, client, final = after_first()
        self.assertIsInstance(self.step(mechanism, final), Challenge)
        self.malformed(mechanism, b"v=thanks")
        self.assertIsNone(self.client.identity)

    def test_lookup_trouble_is_temporary(self) -> None:
        mechanism = self.session.begin("SCRAM-SHA-256")
        self.step(mechanism, None)
        self.userdb.close()
        self.failureResultOf(mechanism.step(b"n,,n=alice,r=abc"), TemporaryAuthFailure)
        self.assertEqual(
            self.security_log(),
            [
                "login-tempfail protocol=imap user=alice method=SCRAM-SHA-256"
                ' reason="user database: Cannot operate on a closed database."'
            ],
        )


class ApopTests(MechanismTestCase):
    listener = "pop3"
    TIMESTAMP = "<1896.697170952@dbc.mtview.ca.us>"

    def digest(self, password: str = PASSWORD) -> str:
        return hashlib.md5((self.TIMESTAMP + password).encode()).hexdigest()

    def test_rfc1939_example(self) -> None:
        """RFC 1939 §7 through the session: mrose / tanstaaf."""
        self.userdb.add("mrose@example.test", "tanstaaf", "des", self.key)
        d = self.session.login_apop("mrose", self.TIMESTAMP, "c4c9334bac560ecc979e58001b3e22fb")
        self.assertEqual(self.successResultOf(d).identity, "mrose@example.test")
        self.assertEqual(
            self.security_log(), ["login protocol=pop3 user=mrose identity=mrose@example.test method=APOP"]
        )

    def test_failures_look_alike(self) -> None:
        for user, digest, reason in [
            ("bob", self.digest(), "APOP impossible for bob@example.test: password stored one-way"),
            ("alice", self.digest("wrong"), "wrong password"),
            ("nobody", self.digest(), "no checker knows this user"),
            ("carol", self.digest(), "account disabled"),
            ("alice", "xyz", "APOP digest is not 32 hex digits"),
            ("", self.digest(), "empty user name"),
        ]:
            self.refused(self.session.login_apop(user, self.TIMESTAMP, digest))
            self.assertEqual(self.last_reason(), reason)
        self.assertEqual(
            self.successResultOf(
                self.session.login_apop("alice", self.TIMESTAMP, self.digest().upper())
            ).identity,
            "alice@example.test",
        )

    def test_policy_may_refuse(self) -> None:
        session = self.new_session(policy=lambda name, client: name != "APOP")
        self.assertRaises(MechanismUnavailable, session.login_apop, "alice", self.TIMESTAMP, self.digest())
        self.assertEqual(
            self.security_log(),
            ['mechanism-refused protocol=pop3 method=APOP reason="APOP is not allowed for this client"'],
        )
