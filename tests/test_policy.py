"""The security policy as pure functions: the full matrix of levels, exception group, TLS, methods
and protocols against a table written out independently, the ``encrypted`` command restrictions,
and the adapter the SASL engine uses (protocol from the listener)."""

from __future__ import annotations

from itertools import product

from twisted.trial.unittest import SynchronousTestCase

from kms.auth.errors import EncryptionRequired
from kms.auth.policy import (
    Decision,
    SecurityPolicy,
    engine_policy,
    may_authenticate,
    may_use_command,
)
from kms.auth.sasl import SASLEngine
from kms.clientinfo import ClientInfo
from kms.ipgroups import parse_group

INSIDE, OUTSIDE = "10.1.2.3", "192.0.2.9"
GROUP = parse_group(["10.0.0.0/8", "2001:db8::/32"])
LEVELS = ("none", "secure_auth", "encrypted")
PROTOCOLS = ("smtp", "imap", "pop3")
PLAINTEXT = ("PLAIN", "LOGIN", "IMAP-LOGIN", "USER/PASS")
CHALLENGE = ("CRAM-MD5", "DIGEST-MD5", "NTLM", "SCRAM-SHA-256", "APOP")
METHODS = PLAINTEXT + CHALLENGE

# Methods allowed to a client outside the exception group without TLS (SPEC §5).  Inside the
# group or over TLS, everything is allowed.
WITHOUT_TLS = {
    ("none", "smtp"): METHODS,
    ("none", "imap"): METHODS,
    ("none", "pop3"): METHODS,
    ("secure_auth", "smtp"): CHALLENGE,
    ("secure_auth", "imap"): CHALLENGE,
    ("secure_auth", "pop3"): CHALLENGE,
    ("encrypted", "smtp"): CHALLENGE,
    ("encrypted", "imap"): (),
    ("encrypted", "pop3"): (),
}

COMMANDS = {
    "smtp": "EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY EXPN HELP STARTTLS AUTH BDAT".split(),
    "imap": [
        *"CAPABILITY NOOP LOGOUT ID STARTTLS LOGIN AUTHENTICATE ENABLE NAMESPACE SELECT EXAMINE".split(),
        *"CREATE DELETE RENAME SUBSCRIBE UNSUBSCRIBE LIST LSUB STATUS APPEND IDLE CHECK CLOSE".split(),
        *"UNSELECT EXPUNGE FETCH STORE SEARCH COPY MOVE".split(),
        *("UID EXPUNGE", "UID FETCH", "UID STORE", "UID SEARCH", "UID COPY", "UID MOVE"),
    ],
    "pop3": "CAPA STLS USER PASS AUTH APOP QUIT STAT LIST RETR DELE NOOP RSET TOP UIDL".split(),
}
# What `encrypted` leaves a client outside the group without TLS; SMTP is never restricted.
ENCRYPTED_WITHOUT_TLS = {
    "smtp": COMMANDS["smtp"],
    "imap": ["CAPABILITY", "STARTTLS", "NOOP", "LOGOUT"],
    "pop3": ["CAPA", "STLS", "NOOP", "QUIT"],
}


def client(peer: str = OUTSIDE, tls: bool = False, listener: str = "imap") -> ClientInfo:
    return ClientInfo(peer, 40000, "192.0.2.1", 143, listener, tls=tls)


class AuthenticationMatrixTests(SynchronousTestCase):
    def test_full_matrix(self) -> None:
        """3 levels × in/out of the group × TLS or not × 9 methods × 3 protocols, one by one."""
        cases = 0
        for level, peer, tls, method, protocol in product(
            LEVELS, (INSIDE, OUTSIDE), (False, True), METHODS, PROTOCOLS
        ):
            policy = SecurityPolicy(level, GROUP)
            allowed = peer == INSIDE or tls or method in WITHOUT_TLS[level, protocol]
            expected = Decision.ALLOWED if allowed else Decision.NEEDS_TLS
            got = may_authenticate(policy, client(peer, tls), method, protocol)
            self.assertIs(got, expected, (level, peer, tls, method, protocol))
            cases += 1
        self.assertEqual(cases, 324)

    def test_spot_checks(self) -> None:
        """The cases the seed and the issue name, spelt out."""
        secure = SecurityPolicy("secure_auth", GROUP)
        encrypted = SecurityPolicy("encrypted", GROUP)
        outside = client()
        self.assertIs(may_authenticate(secure, outside, "PLAIN", "smtp"), Decision.NEEDS_TLS)
        self.assertIs(may_authenticate(secure, outside, "CRAM-MD5", "imap"), Decision.ALLOWED)
        self.assertIs(may_authenticate(secure, outside, "APOP", "pop3"), Decision.ALLOWED)
        self.assertIs(may_authenticate(secure, outside, "USER/PASS", "pop3"), Decision.NEEDS_TLS)
        self.assertIs(may_authenticate(encrypted, outside, "CRAM-MD5", "smtp"), Decision.ALLOWED)
        self.assertIs(may_authenticate(encrypted, outside, "CRAM-MD5", "imap"), Decision.NEEDS_TLS)
        self.assertIs(may_authenticate(encrypted, client(INSIDE), "PLAIN", "pop3"), Decision.ALLOWED)

    def test_method_names_ignore_case(self) -> None:
        policy = SecurityPolicy("secure_auth")
        self.assertIs(may_authenticate(policy, client(), "cram-md5", "smtp"), Decision.ALLOWED)
        self.assertIs(may_authenticate(policy, client(), "plain", "smtp"), Decision.NEEDS_TLS)

    def test_unknown_methods_and_protocols_fail_closed(self) -> None:
        """A method not known to be challenge-based is plaintext; an unknown protocol is held to
        IMAP's rules, not SMTP's looser ``encrypted``."""
        self.assertIs(
            may_authenticate(SecurityPolicy("secure_auth"), client(), "X-NEW", "smtp"), Decision.NEEDS_TLS
        )
        self.assertIs(
            may_authenticate(SecurityPolicy("encrypted"), client(), "CRAM-MD5", "x-proto"), Decision.NEEDS_TLS
        )
        self.assertFalse(may_use_command(SecurityPolicy("encrypted"), client(), "x-proto", "NOOP"))

    def test_exception_group_forms(self) -> None:
        """IPv4 in its IPv6-mapped spelling and IPv6 are matched; a UNIX socket (``local``) is not."""
        policy = SecurityPolicy("secure_auth", GROUP)
        for peer, allowed in [
            ("::ffff:10.0.0.1", True),
            ("2001:db8::5", True),
            ("11.0.0.1", False),
            ("local", False),
        ]:
            expected = Decision.ALLOWED if allowed else Decision.NEEDS_TLS
            self.assertIs(may_authenticate(policy, client(peer), "PLAIN", "imap"), expected, peer)

    def test_default_and_invalid_levels(self) -> None:
        self.assertEqual(SecurityPolicy().level, "none")
        self.assertFalse(SecurityPolicy().exception_group.contains("127.0.0.1"))
        self.assertRaises(ValueError, SecurityPolicy, "secure-auth")


class CommandMatrixTests(SynchronousTestCase):
    def test_full_matrix(self) -> None:
        """3 levels × in/out of the group × TLS or not × every command of each protocol."""
        cases = 0
        for level, peer, tls, protocol in product(LEVELS, (INSIDE, OUTSIDE), (False, True), PROTOCOLS):
            policy = SecurityPolicy(level, GROUP)
            for command in COMMANDS[protocol]:
                restricted = level == "encrypted" and peer == OUTSIDE and not tls
                expected = not restricted or command in ENCRYPTED_WITHOUT_TLS[protocol]
                got = may_use_command(policy, client(peer, tls), protocol, command)
                self.assertIs(got, expected, (level, peer, tls, protocol, command))
                cases += 1
        self.assertEqual(cases, 3 * 2 * 2 * sum(len(commands) for commands in COMMANDS.values()))

    def test_command_names_ignore_case(self) -> None:
        self.assertTrue(may_use_command(SecurityPolicy("encrypted"), client(), "pop3", "stls"))


class EnginePolicyTests(SynchronousTestCase):
    """The one callable the shared SASL engine asks: the protocol comes from the listener."""

    methods = ["SCRAM-SHA-256", "CRAM-MD5", "DIGEST-MD5", "LOGIN", "PLAIN"]
    challenge = ["SCRAM-SHA-256", "CRAM-MD5", "DIGEST-MD5"]

    def available(self, level: str, listener: str, tls: bool = False, peer: str = OUTSIDE) -> list[str]:
        engine = SASLEngine(self.methods, engine_policy(SecurityPolicy(level, GROUP)))
        return engine.available(client(peer, tls, listener))

    def test_listeners_map_to_protocols(self) -> None:
        """Under ``encrypted`` SMTP listeners keep the challenge methods, IMAP and POP3 none."""
        for listener in ("smtp", "submission"):
            self.assertEqual(self.available("encrypted", listener), self.challenge, listener)
        for listener in ("imap", "pop3", "x-unknown"):
            self.assertEqual(self.available("encrypted", listener), [], listener)
        for listener in ("smtp", "imap", "pop3"):
            self.assertEqual(self.available("secure_auth", listener), self.challenge, listener)
            self.assertEqual(self.available("none", listener), self.methods, listener)

    def test_tls_and_exception_group(self) -> None:
        """Implicit-TLS listeners start with ``tls`` set; the group is exempt without it."""
        for listener in ("smtps", "imaps", "pop3s"):
            self.assertEqual(self.available("encrypted", listener, tls=True), self.methods, listener)
        self.assertEqual(self.available("encrypted", "imap", peer=INSIDE), self.methods)

    def test_refusals_say_tls_would_help(self) -> None:
        """The engine turns NEEDS_TLS into `EncryptionRequired` (SMTP's 538), APOP included."""
        engine = SASLEngine(self.methods, engine_policy(SecurityPolicy("encrypted")))

        class Session:
            client = ClientInfo(OUTSIDE, 1, "192.0.2.1", 110, "pop3")

        self.assertRaises(EncryptionRequired, engine.create, "CRAM-MD5", Session())
        self.assertRaises(EncryptionRequired, engine.check_allowed, "APOP", Session.client)
        engine.check_allowed("APOP", ClientInfo(OUTSIDE, 1, "192.0.2.1", 25, "smtp"))
