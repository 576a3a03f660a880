"""SASL wire decoding and the PLAIN/LOGIN state machines, against a recording session double."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from kms.auth.credentials import IPlaintextCredentials
from kms.auth.errors import AuthenticationFailed, EncryptionRequired, MalformedResponse, MechanismUnavailable
from kms.auth.sasl import (
    MAX_RESPONSE_LENGTH,
    Authenticated,
    Challenge,
    ISASLMechanism,
    Login,
    Plain,
    SASLEngine,
    StepOutOfOrder,
    decode_response,
    encode_challenge,
)
from kms.clientinfo import ClientInfo


def _client(tls: bool = False) -> ClientInfo:
    return ClientInfo("192.0.2.7", 40000, "127.0.0.1", 587, "submission", tls=tls)


@dataclass
class RecordingSession:
    """Stands in for LoginSession: records what the mechanism hands over, and accepts anyone."""

    client: ClientInfo = field(default_factory=_client)
    logins: list[IPlaintextCredentials] = field(default_factory=list)
    refusals: list[tuple[str, str, str]] = field(default_factory=list)

    def login(self, credentials: IPlaintextCredentials) -> Deferred[Authenticated]:
        self.logins.append(credentials)
        return succeed(Authenticated(credentials.username))

    def refuse(self, username: str, method: str, reason: str) -> Deferred[Authenticated]:
        self.refusals.append((username, method, reason))
        return fail(AuthenticationFailed(reason))


def _result(d: Deferred[Any]) -> object:
    """The already-fired result of ``d``: a value, or the Failure (handled, so trial stays quiet)."""
    results: list[object] = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError("Deferred has not fired")
    return results[0]


class DecodeResponseTests(TestCase):
    def test_table(self) -> None:
        """Cancel, empty initial response, and strict base64 with surrounding whitespace ignored."""
        cases: list[tuple[bytes, bytes | None]] = [
            (b"*", None),
            (b" *\r\n", None),
            (b"=", b""),
            (b"=\r\n", b""),
            (b"", b""),
            (b"dXNlcg==", b"user"),
            (b"  dXNlcg==\r\n", b"user"),
            (b"AHVzZXIAcGFzcw==", b"\0user\0pass"),
        ]
        for line, expected in cases:
            self.assertEqual(decode_response(line), expected, line)

    def test_malformed(self) -> None:
        """Anything that is not exact base64 is refused, not repaired."""
        for line in [
            b"!!!",
            b"dXNlcg",  # padding missing
            b"dXNlcg===",  # padding in excess
            b"dXN lcg==",  # whitespace inside
            b"dXNl\ncg==",
            b"==",
            b"**",
            b"dXNlcg=x",
            b"\xff\xfe",
        ]:
            self.assertRaises(MalformedResponse, decode_response, line)

    def test_length_limit(self) -> None:
        """The longest allowed line decodes; one quad more is refused before decoding."""
        longest = b"A" * MAX_RESPONSE_LENGTH
        self.assertEqual(len(decode_response(longest) or b""), MAX_RESPONSE_LENGTH // 4 * 3)
        self.assertRaises(MalformedResponse, decode_response, longest + b"AAAA")

    def test_encode_challenge(self) -> None:
        self.assertEqual(encode_challenge(b"Username:"), b"VXNlcm5hbWU6")
        self.assertEqual(encode_challenge(b""), b"")

    @given(st.binary(max_size=MAX_RESPONSE_LENGTH // 4 * 3))
    def test_round_trip(self, data: bytes) -> None:
        """Any bytes survive encoding and decoding unchanged."""
        self.assertEqual(decode_response(encode_challenge(data)), data)


class PlainTests(TestCase):
    def setUp(self) -> None:
        self.session = RecordingSession()
        self.mechanism = Plain(self.session)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ISASLMechanism, self.mechanism))
        self.assertEqual(self.mechanism.name, "PLAIN")

    def test_initial_response(self) -> None:
        """One message logs in; the credentials carry mechanism and connection for checkers and logs."""
        result = self.successResultOf(self.mechanism.step(b"\0bob@example.test\0s3cret"))
        self.assertEqual(result, Authenticated("bob@example.test"))
        [creds] = self.session.logins
        self.assertEqual(
            (creds.username, creds.password, creds.mechanism, creds.authzid),
            ("bob@example.test", "s3cret", "PLAIN", None),
        )
        self.assertIs(creds.client, self.session.client)

    def test_no_initial_response(self) -> None:
        """Without an initial response the server sends an empty challenge first."""
        self.assertEqual(self.successResultOf(self.mechanism.step(None)), Challenge(b""))
        self.assertEqual(self.session.logins, [])
        self.successResultOf(self.mechanism.step(b"\0bob\0pw"))
        self.assertEqual([c.username for c in self.session.logins], ["bob"])

    def test_authzid_equal_to_authcid(self) -> None:
        """Acting as oneself is no impersonation."""
        self.successResultOf(self.mechanism.step(b"bob\0bob\0pw"))
        self.assertEqual(self.session.logins[0].authzid, "bob")

    def test_utf8(self) -> None:
        self.successResultOf(self.mechanism.step("\0jürgen\0pässwörd".encode()))
        creds = self.session.logins[0]
        self.assertEqual((creds.username, creds.password), ("jürgen", "pässwörd"))

    def test_password_may_contain_anything_but_nul(self) -> None:
        self.successResultOf(self.mechanism.step(b"\0bob\0 a:b\x01\xc3\xa9 "))
        self.assertEqual(self.session.logins[0].password, " a:b\x01é ")

    def test_malformed(self) -> None:
        """Syntax errors are MalformedResponse and never reach the session."""
        for message in [
            b"",
            b"bob",
            b"bob\0pw",
            b"\0bob\0pw\0",
            b"a\0bob\0pw\0extra",
            b"\0bob\xff\0pw",
            b"\0bob\0pw\xc3",
            b"\xc0\x80\0bob\0pw",
            b"\0" + b"u" * 256 + b"\0pw",
            b"a" * 256 + b"\0bob\0pw",
            b"\0bob\0" + b"p" * 1025,
        ]:
            self.failureResultOf(Plain(self.session).step(message), MalformedResponse)
        self.assertEqual((self.session.logins, self.session.refusals), ([], []))

    def test_length_limits_inclusive(self) -> None:
        self.successResultOf(Plain(self.session).step(b"\0" + b"u" * 255 + b"\0" + b"p" * 1024))
        self.assertEqual(len(self.session.logins), 1)

    def test_empty_user_or_password(self) -> None:
        """Refused like a wrong password, through the session (so it is logged and delayed)."""
        for message in [b"\0bob\0", b"\0\0pw", b"\0\0"]:
            failure = self.failureResultOf(Plain(self.session).step(message), AuthenticationFailed)
            self.assertEqual(failure.value.reason, "empty user name or password")
        self.assertEqual(self.session.logins, [])
        refused = [(username, method) for username, method, _ in self.session.refusals]
        self.assertEqual(refused, [("bob", "PLAIN"), ("", "PLAIN"), ("", "PLAIN")])

    def test_authzid_mismatch(self) -> None:
        """Acting as another user is refused until the master password feature allows it."""
        self.failureResultOf(self.mechanism.step(b"alice\0bob\0pw"), AuthenticationFailed)
        self.assertEqual(self.session.refusals, [("bob", "PLAIN", "authorization identity not allowed")])
        self.assertEqual(self.session.logins, [])

    def test_step_after_success(self) -> None:
        self.successResultOf(self.mechanism.step(b"\0bob\0pw"))
        self.failureResultOf(self.mechanism.step(b"\0bob\0pw"), StepOutOfOrder)
        self.assertEqual(len(self.session.logins), 1)

    def test_step_after_failure(self) -> None:
        self.failureResultOf(self.mechanism.step(b"nonuls"), MalformedResponse)
        self.failureResultOf(self.mechanism.step(b"\0bob\0pw"), StepOutOfOrder)
        self.assertEqual(self.session.logins, [])

    def test_none_after_start(self) -> None:
        """Only the first step may lack data; later, no response is a protocol error."""
        self.successResultOf(self.mechanism.step(None))
        self.failureResultOf(self.mechanism.step(None), MalformedResponse)

    def test_step_while_pending(self) -> None:
        """While the checker works, the exchange takes no more input; afterwards it is finished."""
        pending: Deferred[Authenticated] = Deferred()
        self.session.login = lambda credentials: pending  # type: ignore[method-assign]
        first = self.mechanism.step(b"\0bob\0pw")
        self.assertNoResult(first)
        self.failureResultOf(self.mechanism.step(b"\0bob\0pw"), StepOutOfOrder)
        pending.callback(Authenticated("bob@example.test"))
        self.assertEqual(self.successResultOf(first), Authenticated("bob@example.test"))
        self.failureResultOf(self.mechanism.step(b"\0bob\0pw"), StepOutOfOrder)

    @given(st.binary(max_size=1400) | st.lists(st.binary(max_size=300), max_size=4).map(b"\0".join))
    def test_arbitrary_bytes(self, message: bytes) -> None:
        """No input makes PLAIN fail other than as malformed or refused; NUL-free parts decode as sent."""
        session = RecordingSession()
        result = _result(Plain(session).step(message))
        if isinstance(result, Failure):
            self.assertIsNotNone(result.check(MalformedResponse, AuthenticationFailed), result)
        else:
            self.assertIsInstance(result, Authenticated)
            [creds] = session.logins
            fields = [creds.authzid or "", creds.username, creds.password]
            self.assertEqual(message, b"\0".join(field.encode() for field in fields))

    @given(st.text(min_size=1, max_size=60).filter(lambda s: "\0" not in s), st.text(min_size=1, max_size=60))
    def test_well_formed(self, username: str, password: str) -> None:
        """Every well-formed message reaches the session with exactly the text the client sent."""
        session = RecordingSession()
        message = f"\0{username}\0{password}".encode()
        result = _result(Plain(session).step(message))
        if "\0" in password:
            self.assertIsInstance(result, Failure)
            self.assertEqual(session.logins, [])
        else:
            self.assertEqual(result, Authenticated(username))
            self.assertEqual((session.logins[0].username, session.logins[0].password), (username, password))


class LoginTests(TestCase):
    def setUp(self) -> None:
        self.session = RecordingSession()
        self.mechanism = Login(self.session)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ISASLMechanism, self.mechanism))
        self.assertEqual(self.mechanism.name, "LOGIN")

    def test_prompts(self) -> None:
        """Username:, then Password:, then the login; nothing reaches the session before the end."""
        self.assertEqual(self.successResultOf(self.mechanism.step(None)), Challenge(b"Username:"))
        self.assertEqual(self.successResultOf(self.mechanism.step(b"bob")), Challenge(b"Password:"))
        self.assertEqual(self.session.logins, [])
        self.assertEqual(self.successResultOf(self.mechanism.step(b"pw")), Authenticated("bob"))
        [creds] = self.session.logins
        self.assertEqual(
            (creds.username, creds.password, creds.mechanism, creds.authzid), ("bob", "pw", "LOGIN", None)
        )

    def test_initial_response_is_username(self) -> None:
        """``AUTH LOGIN dXNlcg==`` skips the Username: prompt."""
        self.assertEqual(self.successResultOf(self.mechanism.step(b"user")), Challenge(b"Password:"))
        self.successResultOf(self.mechanism.step("pässwörd".encode()))
        [creds] = self.session.logins
        self.assertEqual((creds.username, creds.password), ("user", "pässwörd"))

    def test_bad_utf8(self) -> None:
        self.failureResultOf(Login(self.session).step(b"b\xffob"), MalformedResponse)
        mechanism = Login(self.session)
        self.successResultOf(mechanism.step(b"bob"))
        self.failureResultOf(mechanism.step(b"p\xc3"), MalformedResponse)
        self.assertEqual(self.session.logins, [])

    def test_too_long(self) -> None:
        self.failureResultOf(Login(self.session).step(b"u" * 256), MalformedResponse)
        mechanism = Login(self.session)
        self.successResultOf(mechanism.step(b"bob"))
        self.failureResultOf(mechanism.step(b"p" * 1025), MalformedResponse)

    def test_empty_password(self) -> None:
        self.successResultOf(self.mechanism.step(b"bob"))
        self.failureResultOf(self.mechanism.step(b""), AuthenticationFailed)
        self.assertEqual(self.session.refusals, [("bob", "LOGIN", "empty user name or password")])
        self.assertEqual(self.session.logins, [])

    def test_empty_username(self) -> None:
        """An empty user name is only refused once the password is in, like any wrong credentials."""
        self.assertEqual(self.successResultOf(self.mechanism.step(b"")), Challenge(b"Password:"))
        self.failureResultOf(self.mechanism.step(b"pw"), AuthenticationFailed)
        self.assertEqual(self.session.refusals, [("", "LOGIN", "empty user name or password")])

    def test_none_after_start(self) -> None:
        self.successResultOf(self.mechanism.step(None))
        self.failureResultOf(self.mechanism.step(None), MalformedResponse)

    def test_step_after_done(self) -> None:
        self.successResultOf(self.mechanism.step(b"bob"))
        self.successResultOf(self.mechanism.step(b"pw"))
        self.failureResultOf(self.mechanism.step(b"pw"), StepOutOfOrder)
        self.assertEqual(len(self.session.logins), 1)


class SASLEngineTests(TestCase):
    def test_available_in_configured_order(self) -> None:
        """Configured order wins, but SCRAM-SHA-256 comes first; unimplemented names are skipped;
        case and duplicates don't matter."""
        engine = SASLEngine(["CRAM-MD5", "login", "X-UNKNOWN", "PLAIN", "Login", "scram-sha-256"])
        self.assertEqual(engine.available(_client()), ["SCRAM-SHA-256", "CRAM-MD5", "LOGIN", "PLAIN"])
        self.assertEqual(SASLEngine(["PLAIN", "LOGIN"]).available(_client()), ["PLAIN", "LOGIN"])
        self.assertEqual(SASLEngine([]).available(_client()), [])

    def test_create(self) -> None:
        engine = SASLEngine(["PLAIN", "LOGIN"])
        session = RecordingSession()
        self.assertIsInstance(engine.create("plain", session), Plain)
        self.assertIsInstance(engine.create("LOGIN", session), Login)
        self.assertIsNot(engine.create("PLAIN", session), engine.create("PLAIN", session))

    def test_create_unavailable(self) -> None:
        """Unknown and disabled mechanisms are both unavailable."""
        engine = SASLEngine(["PLAIN", "CRAM-MD5"])
        for name in ["LOGIN", "DIGEST-MD5", "X-UNKNOWN", ""]:
            error = self.assertRaises(MechanismUnavailable, engine.create, name, RecordingSession())
            self.assertNotIsInstance(error, EncryptionRequired)

    def test_policy(self) -> None:
        """The policy hook filters what is offered and what may start, per client."""

        def plaintext_needs_tls(name: str, client: ClientInfo) -> bool:
            return client.tls or name not in ("PLAIN", "LOGIN")

        engine = SASLEngine(["PLAIN", "LOGIN"], policy=plaintext_needs_tls)
        self.assertEqual(engine.available(_client(tls=False)), [])
        self.assertEqual(engine.available(_client(tls=True)), ["PLAIN", "LOGIN"])
        self.assertRaises(EncryptionRequired, engine.create, "PLAIN", RecordingSession(_client(tls=False)))
        self.assertIsInstance(engine.create("PLAIN", RecordingSession(_client(tls=True))), Plain)

    def test_policy_refusal_without_tls_remedy(self) -> None:
        """When TLS would not help, the refusal is a plain MechanismUnavailable (no 538 hint)."""
        engine = SASLEngine(["PLAIN", "LOGIN"], policy=lambda name, client: name != "LOGIN")
        self.assertEqual(engine.available(_client(tls=True)), ["PLAIN"])
        for tls in (False, True):
            session = RecordingSession(_client(tls))
            error = self.assertRaises(MechanismUnavailable, engine.create, "LOGIN", session)
            self.assertNotIsInstance(error, EncryptionRequired)
