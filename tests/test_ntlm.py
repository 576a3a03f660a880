"""Tests for kms.auth.ntlm: MS-NLMP §4.2 known answers, the CHALLENGE we build, hostile messages,
and the SASL mechanism against a recording session double."""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field, replace
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from kms.auth.credentials import IChallengeCredentials, ILoginAttempt, UserSecrets
from kms.auth.errors import AuthenticationFailed, MalformedResponse
from kms.auth.exchange import Authenticated, Challenge, ISASLMechanism, MechanismSession
from kms.auth.md4 import nt_hash
from kms.auth.ntlm import (
    NTLM,
    SIGNATURE,
    AuthenticateMessage,
    ChallengeState,
    Flag,
    NegotiateMessage,
    NTLMCredentials,
    Target,
    build_challenge,
    filetime,
    login_name,
    ntowfv2,
    parse_authenticate,
    parse_negotiate,
    target_for,
    verify,
)
from kms.clientinfo import ClientInfo

# MS-NLMP §4.2.1: the values every example uses.
SERVER_CHALLENGE = bytes.fromhex("0123456789abcdef")
CLIENT_CHALLENGE = b"\xaa" * 8
PASSWORD = "Password"

# The AUTHENTICATE messages printed in MS-NLMP §4.2.2.3 (NTLMv1), §4.2.3.3 (NTLM2 session
# response) and §4.2.4.3 (NTLMv2): user "User", domain "Domain", workstation "COMPUTER".
SPEC_V1 = bytes.fromhex(
    "4e544c4d5353500003000000180018006c00000018001800840000000c000c00"
    "480000000800080054000000100010005c000000100010009c000000358280e2"
    "0501280a0000000f44006f006d00610069006e00550073006500720043004f00"
    "4d005000550054004500520098def7b87f88aa5dafe2df779688a172def11c7d"
    "5ccdef1367c43011f30298a2ad35ece64f16331c44bdbed927841f94518822b1"
    "b3f350c8958682ecbb3e3cb7"
)
SPEC_NTLM2_SESSION = bytes.fromhex(
    "4e544c4d5353500003000000180018006c00000018001800840000000c000c00"
    "480000000800080054000000100010005c000000000000009c00000035820882"
    "0501280a0000000f44006f006d00610069006e00550073006500720043004f00"
    "4d0050005500540045005200aaaaaaaaaaaaaaaa000000000000000000000000"
    "000000007537f803ae367128ca458204bde7caf81e97ed2683267232"
)
SPEC_V2 = bytes.fromhex(
    "4e544c4d5353500003000000180018006c00000054005400840000000c000c00"
    "480000000800080054000000100010005c00000010001000d8000000358288e2"
    "0501280a0000000f44006f006d00610069006e00550073006500720043004f00"
    "4d005000550054004500520086c35097ac9cec102554764a57cccc19aaaaaaaa"
    "aaaaaaaa68cd0ab851e51c96aabc927bebef6a1c010100000000000000000000"
    "00000000aaaaaaaaaaaaaaaa0000000002000c0044006f006d00610069006e00"
    "01000c005300650072007600650072000000000000000000c5dad2544fc97990"
    "94ce1ce90bc9d03e"
)
SPEC_MESSAGES = {"NTLMv1": SPEC_V1, "NTLM2 session": SPEC_NTLM2_SESSION, "NTLMv2": SPEC_V2}

# A NEGOTIATE, the §4.2.4.3 CHALLENGE and an NTLMv2 AUTHENTICATE with MsvAvFlags = MIC present,
# for "User"/"Domain"/"Password": Chromium's net/ntlm test data (ntlm_test_data.h), built on the
# §4.2 values, the only published MIC vector.
MIC_NEGOTIATE = bytes.fromhex("4e544c4d53535000010000000782080000000000200000000000000020000000")
MIC_CHALLENGE = bytes.fromhex(
    "4e544c4d53535000020000000c000c003800000033828ae20123456789abcdef"
    "00000000000000002400240044000000060070170000000f5300650072007600"
    "6500720002000c0044006f006d00610069006e0001000c005300650072007600"
    "6500720000000000"
)
MIC_AUTHENTICATE = bytes.fromhex(
    "4e544c4d535350000300000018001800580000008a008a00700000000c000c00"
    "fa0000000800080006010000100010000e010000000000005800000003820800"
    "0000000000000000f7361633f0ad9bdf4a7c421bc6b824a30000000000000000"
    "000000000000000000000000000000008c0260dbef690662af9c42d50782d2ed"
    "0101000000000000800bc8fd00d4d201aaaaaaaaaaaaaaaa0000000002000c00"
    "44006f006d00610069006e0001000c0053006500720076006500720006000400"
    "020000000a0010006586e99d81c2fc984e47172fd4dd03100900160048005400"
    "540050002f00530065007200760065007200000000000000000044006f006d00"
    "610069006e00550073006500720043004f004d0050005500540045005200"
)

# What curl 7.88 sends first: OEM, REQUEST_TARGET, NTLM, ALWAYS_SIGN, EXTENDED_SESSIONSECURITY.
CURL_NEGOTIATE = bytes.fromhex("4e544c4d53535000010000000682080000000000000000000000000000000000")

TARGET = target_for("mail.example.test")


ALL_FLAGS = Flag(0xFFFFFFFF)


def _spec_state(flags: Flag = ALL_FLAGS, challenge: bytes = SERVER_CHALLENGE) -> ChallengeState:
    """The state of a server that sent the §4.2 challenge (all flags, so the message's decide)."""
    return ChallengeState(challenge, flags, b"", b"")


def _secbuf(data: bytes, offset: int) -> bytes:
    return struct.pack("<HHI", len(data), len(data), offset)


def _challenge_fields(challenge: bytes) -> tuple[Flag, bytes, bytes, bytes]:
    """Flags, target name, server challenge and target info of a CHALLENGE, read independently."""
    assert challenge[:12] == SIGNATURE + b"\x02\0\0\0"
    name_len, _, name_offset = struct.unpack_from("<HHI", challenge, 12)
    (flags,) = struct.unpack_from("<I", challenge, 20)
    info_len, _, info_offset = struct.unpack_from("<HHI", challenge, 40)
    return (
        Flag(flags),
        challenge[name_offset : name_offset + name_len],
        challenge[24:32],
        challenge[info_offset : info_offset + info_len],
    )


def _av_list(data: bytes) -> list[tuple[int, bytes]]:
    pairs = []
    while True:
        av_id, length = struct.unpack_from("<HH", data)
        pairs.append((av_id, data[4 : 4 + length]))
        if av_id == 0:
            return pairs
        data = data[4 + length :]


def _client_authenticate(
    negotiate: bytes,
    challenge: bytes,
    user: str = "alice",
    domain: str = "EXAMPLE",
    password: str = "secret",
    mic: bool = False,
    unicode: bool = True,
) -> bytes:
    """An NTLMv2 AUTHENTICATE as a Windows client builds it (MS-NLMP §3.1.5.1.2), MIC optional."""
    flags, _name, server_challenge, target_info = _challenge_fields(challenge)
    timestamp = dict(_av_list(target_info))[7]
    if mic:
        target_info = target_info[:-4] + b"\x06\x00\x04\x00\x02\x00\x00\x00" + target_info[-4:]
    blob = b"\x01\x01" + bytes(6) + timestamp + CLIENT_CHALLENGE + bytes(4) + target_info + bytes(4)
    key = ntowfv2(nt_hash(password), user, domain)
    proof = hmac.new(key, server_challenge + blob, hashlib.md5).digest()
    encoding = "utf-16-le" if unicode else "ascii"
    payload = [bytes(24), proof + blob, domain.encode(encoding), user.encode(encoding), "WS".encode(encoding)]
    header = SIGNATURE + struct.pack("<I", 3)
    offset = 88
    for item in payload:
        header += _secbuf(item, offset)
        offset += len(item)
    header += _secbuf(b"", offset) + struct.pack("<I", flags) + bytes(8)
    message = header + bytes(16) + b"".join(payload)
    if mic:
        session_key = hmac.new(key, proof, hashlib.md5).digest()
        code = hmac.new(session_key, negotiate + challenge + message, hashlib.md5).digest()
        message = message[:72] + code + message[88:]
    return message


def _exchange(negotiate: bytes = CURL_NEGOTIATE) -> tuple[bytes, ChallengeState]:
    return build_challenge(parse_negotiate(negotiate), TARGET, bytes(range(8)), filetime(1_700_000_000))


class KnownAnswerTests(TestCase):
    def test_ntowfv2(self) -> None:
        """MS-NLMP §4.2.4.1.1: NTOWFv2("Password", "User", "Domain")."""
        self.assertEqual(
            ntowfv2(nt_hash(PASSWORD), "User", "Domain").hex(), "0c868a403bfd7a93a3001ef22ef02e3f"
        )

    def test_ntowfv2_cases(self) -> None:
        """The user name is upper-cased (one code point for one, as Windows does); the domain is not."""
        h = nt_hash(PASSWORD)
        self.assertEqual(ntowfv2(h, "user", "Domain"), ntowfv2(h, "USER", "Domain"))
        self.assertNotEqual(ntowfv2(h, "User", "Domain"), ntowfv2(h, "User", "DOMAIN"))
        self.assertEqual(ntowfv2(h, "straße", ""), ntowfv2(h, "STRAßE", ""))
        self.assertNotEqual(ntowfv2(h, "straße", ""), ntowfv2(h, "STRASSE", ""))

    def test_spec_messages_parse(self) -> None:
        """The §4.2 AUTHENTICATE messages: names, response kinds, no MIC."""
        for name, data in SPEC_MESSAGES.items():
            with self.subTest(name):
                message = parse_authenticate(data)
                self.assertEqual(
                    (message.user, message.domain, message.workstation), ("User", "Domain", "COMPUTER")
                )
                self.assertEqual(message.version, 2 if name == "NTLMv2" else 1)
                self.assertIsNone(message.mic)
        self.assertEqual(
            parse_authenticate(SPEC_V2).nt_response[:16].hex(), "68cd0ab851e51c96aabc927bebef6a1c"
        )

    def test_spec_messages_verify(self) -> None:
        """Each §4.2 message proves "Password" for the §4.2 server challenge, with v1 allowed."""
        for name, data in SPEC_MESSAGES.items():
            with self.subTest(name):
                self.assertTrue(verify(parse_authenticate(data), _spec_state(), nt_hash(PASSWORD), True))

    def test_wrong_password_or_challenge(self) -> None:
        """Another password, or another server challenge, and no message verifies."""
        other = SERVER_CHALLENGE[:7] + b"\xee"
        for name, data in SPEC_MESSAGES.items():
            with self.subTest(name):
                message = parse_authenticate(data)
                self.assertFalse(verify(message, _spec_state(), nt_hash("password"), True))
                self.assertFalse(verify(message, _spec_state(challenge=other), nt_hash(PASSWORD), True))

    def test_v1_needs_allow_v1(self) -> None:
        """NTLMv1 and NTLM2 session responses fail unless allowed; NTLMv2 never needs it."""
        h = nt_hash(PASSWORD)
        self.assertFalse(verify(parse_authenticate(SPEC_V1), _spec_state(), h, False))
        self.assertFalse(verify(parse_authenticate(SPEC_NTLM2_SESSION), _spec_state(), h, False))
        self.assertTrue(verify(parse_authenticate(SPEC_V2), _spec_state(), h, False))

    def test_ntlm2_session_needs_negotiated_ess(self) -> None:
        """The client challenge in the LM field counts only if we offered EXTENDED_SESSIONSECURITY."""
        without = _spec_state(flags=ALL_FLAGS & ~Flag.EXTENDED_SESSIONSECURITY)
        message = parse_authenticate(SPEC_NTLM2_SESSION)
        self.assertFalse(verify(message, without, nt_hash(PASSWORD), True))
        no_lm = replace(message, lm_response=b"\xaa" * 4)
        self.assertFalse(verify(no_lm, _spec_state(), nt_hash(PASSWORD), True))

    def test_mic(self) -> None:
        """A MIC over NEGOTIATE + CHALLENGE + AUTHENTICATE is checked; any change to them fails."""
        state = ChallengeState(SERVER_CHALLENGE, Flag(0x00088207), MIC_NEGOTIATE, MIC_CHALLENGE)
        h = nt_hash(PASSWORD)
        message = parse_authenticate(MIC_AUTHENTICATE)
        self.assertEqual(message.mic, bytes.fromhex("f7361633f0ad9bdf4a7c421bc6b824a3"))
        self.assertTrue(verify(message, state, h, False))
        self.assertFalse(verify(message, replace(state, negotiate=MIC_NEGOTIATE + b"\0"), h, False))
        tampered = MIC_AUTHENTICATE[:60] + b"\x07" + MIC_AUTHENTICATE[61:]  # flags changed
        self.assertFalse(verify(parse_authenticate(tampered), state, h, False))
        bad_mic = MIC_AUTHENTICATE[:72] + bytes(16) + MIC_AUTHENTICATE[88:]
        self.assertFalse(verify(parse_authenticate(bad_mic), state, h, False))

    def test_anonymous_and_lm_only(self) -> None:
        """No user name, or no NT response, never verifies, whatever the hash."""
        message = parse_authenticate(SPEC_V2)
        h = nt_hash(PASSWORD)
        self.assertFalse(verify(replace(message, user=""), _spec_state(), h, True))
        lm_only = replace(message, nt_response=b"")
        self.assertIsNone(lm_only.version)
        self.assertFalse(verify(lm_only, _spec_state(), h, True))


class ChallengeTests(TestCase):
    def test_curl_negotiate(self) -> None:
        """curl asks OEM only: the challenge is OEM, mirrors ALWAYS_SIGN and ESS, adds target info."""
        challenge, state = _exchange()
        flags, name, server_challenge, info = _challenge_fields(challenge)
        expected = (
            Flag.OEM
            | Flag.REQUEST_TARGET
            | Flag.NTLM
            | Flag.ALWAYS_SIGN
            | Flag.TARGET_TYPE_SERVER
            | Flag.EXTENDED_SESSIONSECURITY
            | Flag.TARGET_INFO
        )
        self.assertEqual(flags, expected)
        self.assertEqual(state.flags, expected)
        self.assertEqual(name, b"MAIL")
        self.assertEqual(server_challenge, bytes(range(8)))
        self.assertEqual(state, ChallengeState(bytes(range(8)), expected, CURL_NEGOTIATE, challenge))
        self.assertEqual(
            _av_list(info),
            [
                (2, "MAIL".encode("utf-16-le")),
                (1, "MAIL".encode("utf-16-le")),
                (4, "example.test".encode("utf-16-le")),
                (3, "mail.example.test".encode("utf-16-le")),
                (7, struct.pack("<Q", filetime(1_700_000_000))),
                (0, b""),
            ],
        )

    def test_unicode_client_with_everything(self) -> None:
        """UNICODE wins over OEM; signing, sealing, key exchange, LM key and VERSION are never granted."""
        asked = 0xFFFFFFFF & ~Flag.REQUEST_TARGET
        negotiate = SIGNATURE + struct.pack("<II", 1, asked) + bytes(16)
        flags, name, _, _ = _challenge_fields(_exchange(negotiate)[0])
        self.assertEqual(
            flags,
            Flag.UNICODE
            | Flag.NTLM
            | Flag.ALWAYS_SIGN
            | Flag.EXTENDED_SESSIONSECURITY
            | Flag.TARGET_INFO
            | Flag.NEGOTIATE_128
            | Flag.NEGOTIATE_56,
        )
        self.assertEqual(name, b"")

    def test_unicode_target_name_and_domain_type(self) -> None:
        """A configured NetBIOS domain is a domain target, sent in UTF-16 to Unicode clients."""
        target = target_for("mail.example.test", "example")
        negotiate = parse_negotiate(MIC_NEGOTIATE)
        flags, name, _, _ = _challenge_fields(build_challenge(negotiate, target, bytes(8), 0)[0])
        self.assertTrue(flags & Flag.TARGET_TYPE_DOMAIN)
        self.assertFalse(flags & Flag.TARGET_TYPE_SERVER)
        self.assertEqual(name, "EXAMPLE".encode("utf-16-le"))

    def test_server_challenge_length(self) -> None:
        negotiate = parse_negotiate(CURL_NEGOTIATE)
        self.assertRaises(ValueError, build_challenge, negotiate, TARGET, bytes(7), 0)

    def test_round_trip(self) -> None:
        """A client answering our challenge verifies, with and without MIC, Unicode or OEM."""
        for negotiate in (CURL_NEGOTIATE, MIC_NEGOTIATE):
            for mic in (False, True):
                with self.subTest(negotiate=negotiate, mic=mic):
                    challenge, state = _exchange(negotiate)
                    unicode = bool(state.flags & Flag.UNICODE)
                    data = _client_authenticate(negotiate, challenge, mic=mic, unicode=unicode)
                    message = parse_authenticate(data)
                    self.assertEqual(message.mic is not None, mic)
                    self.assertTrue(verify(message, state, nt_hash("secret"), False))
                    self.assertFalse(verify(message, state, nt_hash("Secret"), False))

    def test_target_for(self) -> None:
        self.assertEqual(
            target_for("Mail.Example.Test."), Target("MAIL", "MAIL", "example.test", "mail.example.test")
        )
        self.assertEqual(target_for("localhost"), Target("LOCALHOST", "LOCALHOST", "localhost", "localhost"))
        self.assertEqual(target_for("averyveryverylonghostname.example.test").nb_computer, "AVERYVERYVERYLO")
        self.assertEqual(target_for("mail.example.test", "Corp").nb_domain, "CORP")
        for bad in ("", "a" * 16, "exämple", "example.test", "bad\tname"):
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, target_for, "mail.example.test", bad)

    def test_filetime(self) -> None:
        self.assertEqual(filetime(0), 116444736000000000)


class LoginNameTests(TestCase):
    def test_table(self) -> None:
        """UPNs as they are; a DNS domain qualifies the user; a NetBIOS domain is left to the checker."""
        cases = {
            ("alice@example.test", ""): "alice@example.test",
            ("alice@example.test", "EXAMPLE"): "alice@example.test",
            ("alice@example.test", "other.test"): "alice@example.test",
            ("alice", "EXAMPLE"): "alice",
            ("alice", ""): "alice",
            ("alice", "example.test"): "alice@example.test",
        }
        for (user, domain), expected in cases.items():
            with self.subTest(user=user, domain=domain):
                self.assertEqual(login_name(user, domain), expected)


def _authenticate(
    lm: bytes = bytes(24),
    nt: bytes = SPEC_V2[0x84 : 0x84 + 0x54],
    domain: bytes = "Domain".encode("utf-16-le"),
    user: bytes = "User".encode("utf-16-le"),
    workstation: bytes = b"",
    flags: Flag = Flag.UNICODE | Flag.NTLM,
) -> bytes:
    """An AUTHENTICATE with a 64-byte header (no Version, no MIC), by default §4.2.4.3's NTLMv2."""
    payload = [lm, nt, domain, user, workstation]
    header = SIGNATURE + struct.pack("<I", 3)
    offset = 64
    for item in payload:
        header += _secbuf(item, offset)
        offset += len(item)
    return header + _secbuf(b"", offset) + struct.pack("<I", flags) + b"".join(payload)


def _v2_response(av_pairs: bytes, version: bytes = b"\x01\x01") -> bytes:
    return bytes(16) + version + bytes(26) + av_pairs


class HostileInputTests(TestCase):
    def assertMalformed(self, parse: Any, data: bytes) -> None:
        self.assertRaises(MalformedResponse, parse, data)

    def test_negotiate(self) -> None:
        """Short, foreign, mistyped and out-of-bounds NEGOTIATEs; the 16-byte old form is fine."""
        self.assertEqual(parse_negotiate(CURL_NEGOTIATE[:16]).flags, Flag(0x88206))
        header = SIGNATURE + struct.pack("<II", 1, Flag.UNICODE)
        for bad in (
            b"",
            SIGNATURE,
            CURL_NEGOTIATE[:15],
            CURL_NEGOTIATE[:20],
            b"NTLMSSP\x01" + CURL_NEGOTIATE[8:],
            SIGNATURE + struct.pack("<II", 3, 0x88206) + bytes(16),
            SIGNATURE + struct.pack("<II", 1, Flag.NTLM) + bytes(16),
            header + _secbuf(b"x", 32) + bytes(8),
            header + _secbuf(b"x", 31) + bytes(8) + b"x",
            header + bytes(8) + struct.pack("<HHI", 0xFFFF, 0xFFFF, 0xFFFFFFFF),
        ):
            with self.subTest(bad=bad):
                self.assertMalformed(parse_negotiate, bad)

    def test_authenticate_truncated(self) -> None:
        """Every truncation of a valid AUTHENTICATE is refused."""
        for length in range(len(SPEC_V2)):
            with self.subTest(length=length):
                self.assertMalformed(parse_authenticate, SPEC_V2[:length])

    def test_authenticate_fields_out_of_bounds(self) -> None:
        """A length or offset pointing past the end, or into the fixed header."""
        for field_offset in (12, 20, 28, 36, 44):
            for length, offset in ((0xFFFF, 64), (2, 0xFFFFFFFF), (2, len(SPEC_V2) - 1), (2, 0), (2, 63)):
                with self.subTest(field=field_offset, length=length, offset=offset):
                    data = bytearray(SPEC_V2)
                    struct.pack_into("<HHI", data, field_offset, length, length, offset)
                    self.assertMalformed(parse_authenticate, bytes(data))

    def test_authenticate_max_len_ignored(self) -> None:
        """MaxLen is ignored on receipt, as MS-NLMP §2.2.1 says."""
        data = bytearray(SPEC_V2)
        struct.pack_into("<H", data, 38, 0)
        self.assertEqual(parse_authenticate(bytes(data)).user, "User")

    def test_authenticate_wrong_kind(self) -> None:
        self.assertMalformed(parse_authenticate, CURL_NEGOTIATE + bytes(32))
        self.assertMalformed(parse_authenticate, b"NTLMSSP\x01" + SPEC_V2[8:])

    def test_nt_response_lengths(self) -> None:
        """Neither 0, 24 nor a whole NTLMv2 response."""
        for n in (1, 16, 23, 25, 44, 47):
            with self.subTest(n=n):
                self.assertMalformed(parse_authenticate, _authenticate(nt=bytes(n)))

    def test_names(self) -> None:
        """Odd UTF-16, lone surrogates, control characters, overlong names, non-ASCII OEM."""
        for bad in (
            _authenticate(user=b"Use"),
            _authenticate(user=b"\x00\xd8"),
            _authenticate(user="a\x00b".encode("utf-16-le")),
            _authenticate(domain="a\r\nb".encode("utf-16-le")),
            _authenticate(workstation="\x1b[31m".encode("utf-16-le")),
            _authenticate(user="a".encode("utf-16-le") * 257),
            _authenticate(user="ä".encode("latin-1"), flags=Flag.OEM),
        ):
            with self.subTest(bad=bad):
                self.assertMalformed(parse_authenticate, bad)
        oem = parse_authenticate(_authenticate(user=b"alice", domain=b"EXAMPLE", flags=Flag.OEM))
        self.assertEqual((oem.user, oem.domain), ("alice", "EXAMPLE"))
        self.assertEqual(parse_authenticate(_authenticate(user="jürgen".encode("utf-16-le"))).user, "jürgen")

    def test_v2_blob(self) -> None:
        """Unknown blob version, unterminated, overrunning or repeated AV pairs, bad MsvAvFlags."""
        eol = b"\0\0\0\0"
        flags_mic = b"\x06\x00\x04\x00\x02\x00\x00\x00"
        for bad in (
            _v2_response(eol, version=b"\x02\x01"),
            _v2_response(b"\x02\x00\x02\x00ab" + b"\x01\x00\x00\x00"),
            _v2_response(b"\x02\x00\xff\x00ab" + eol),
            _v2_response(b"\x02\x00\x02\x00ab\x02\x00\x02\x00cd" + eol),
            _v2_response(b"\x06\x00\x02\x00\x02\x00" + eol),
        ):
            with self.subTest(bad=bad):
                self.assertMalformed(parse_authenticate, _authenticate(nt=bad))
        self.assertIsNotNone(parse_authenticate(_authenticate(nt=_v2_response(flags_mic + eol))).mic)
        self.assertIsNone(parse_authenticate(_authenticate(nt=_v2_response(eol))).mic)

    @given(st.binary(max_size=200))
    def test_random_bytes(self, data: bytes) -> None:
        """Random bytes: a message or MalformedResponse, never another exception."""
        for parse in (parse_negotiate, parse_authenticate):
            try:
                parse(data)
            except MalformedResponse:
                pass

    @given(st.binary(min_size=8, max_size=300))
    def test_random_after_header(self, tail: bytes) -> None:
        """Random bytes behind a valid signature and type reach the field parsers."""
        for message_type, parse in ((1, parse_negotiate), (3, parse_authenticate)):
            try:
                parse(SIGNATURE + struct.pack("<I", message_type) + tail)
            except MalformedResponse:
                pass

    @given(st.lists(st.tuples(st.integers(0, len(MIC_AUTHENTICATE) - 1), st.integers(0, 255)), max_size=8))
    def test_mutated_messages(self, changes: list[tuple[int, int]]) -> None:
        """Bytes of a real AUTHENTICATE changed: parsed and verified, or refused; never a crash."""
        data = bytearray(MIC_AUTHENTICATE)
        for position, value in changes:
            data[position] = value
        try:
            message = parse_authenticate(bytes(data))
        except MalformedResponse:
            return
        state = ChallengeState(SERVER_CHALLENGE, Flag(0x00088207), MIC_NEGOTIATE, MIC_CHALLENGE)
        self.assertIsInstance(verify(message, state, nt_hash(PASSWORD), True), bool)


def _client() -> ClientInfo:
    return ClientInfo("192.0.2.7", 40000, "127.0.0.1", 587, "submission")


@dataclass
class RecordingSession:
    """Stands in for LoginSession: records what the mechanism hands over, and accepts anyone."""

    client: ClientInfo = field(default_factory=_client)
    hostname: str = "mail.example.test"
    service: str = "smtp"
    logins: list[ILoginAttempt] = field(default_factory=list)
    refusals: list[tuple[str, str, str]] = field(default_factory=list)

    def login(self, credentials: ILoginAttempt) -> Deferred[Authenticated]:
        self.logins.append(credentials)
        return succeed(Authenticated(credentials.username))

    def refuse(self, username: str, method: str, reason: str) -> Deferred[Authenticated]:
        self.refusals.append((username, method, reason))
        return fail(AuthenticationFailed(reason))


def _ntlm(session: RecordingSession, allow_v1: bool = False, nb_domain: str | None = None) -> NTLM:
    # NTLM uses only client, hostname, login and refuse of the session protocol.
    return NTLM(cast(MechanismSession, session), allow_v1, nb_domain)


def _result(d: Deferred[Any]) -> Any:
    """The already-fired result of ``d``: a value, or the Failure (handled, so trial stays quiet)."""
    results: list[object] = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError("Deferred has not fired")
    return results[0]


class MechanismTests(TestCase):
    def setUp(self) -> None:
        self.session = RecordingSession()
        self.mechanism = _ntlm(self.session)

    def _challenge(self, negotiate: bytes = CURL_NEGOTIATE) -> bytes:
        result = _result(self.mechanism.step(negotiate))
        self.assertIsInstance(result, Challenge)
        return result.data

    def test_interfaces(self) -> None:
        verifyObject(ISASLMechanism, self.mechanism)
        self.assertEqual(self.mechanism.name, "NTLM")

    def test_full_exchange(self) -> None:
        """Empty challenge, NEGOTIATE -> CHALLENGE, AUTHENTICATE -> credentials to the session."""
        self.assertEqual(_result(self.mechanism.step(None)), Challenge(b""))
        challenge = self._challenge(MIC_NEGOTIATE)
        flags, name, _, _ = _challenge_fields(challenge)
        self.assertEqual(name, "MAIL".encode("utf-16-le"))
        data = _client_authenticate(MIC_NEGOTIATE, challenge, user="alice", domain="example.test", mic=True)
        self.assertEqual(_result(self.mechanism.step(data)), Authenticated("alice@example.test"))
        [credentials] = self.session.logins
        verifyObject(IChallengeCredentials, credentials)
        assert isinstance(credentials, NTLMCredentials)
        self.assertEqual(
            (credentials.user, credentials.domain, credentials.mechanism), ("alice", "example.test", "NTLM")
        )
        self.assertIsNone(credentials.authzid)
        self.assertTrue(credentials.check(UserSecrets("alice@example.test", plaintext="secret")))
        self.assertFalse(credentials.check(UserSecrets("alice@example.test", plaintext="Secret")))
        self.assertFalse(credentials.check(UserSecrets("alice@example.test")))

    def test_fresh_challenge_each_time(self) -> None:
        """Two exchanges never share a server challenge."""
        first = _challenge_fields(self._challenge())[2]
        second = _challenge_fields(_result(_ntlm(self.session).step(CURL_NEGOTIATE)).data)[2]
        self.assertNotEqual(first, second)

    def test_authenticate_first(self) -> None:
        """An AUTHENTICATE without a NEGOTIATE before it is malformed."""
        failure = _result(self.mechanism.step(SPEC_V2))
        failure.trap(MalformedResponse)

    def test_garbage(self) -> None:
        self._challenge()
        _result(self.mechanism.step(b"\0" * 100)).trap(MalformedResponse)
        self.assertEqual(self.session.logins, [])

    def test_anonymous_refused(self) -> None:
        self._challenge()
        _result(self.mechanism.step(_authenticate(user=b"", nt=b"", lm=b"\0"))).trap(AuthenticationFailed)
        self.assertEqual(self.session.refusals, [("", "NTLM", "empty user name")])

    def test_lm_only_refused(self) -> None:
        self._challenge()
        _result(self.mechanism.step(_authenticate(nt=b""))).trap(AuthenticationFailed)
        self.assertEqual(self.session.refusals, [("User", "NTLM", "no NT response (LM only)")])

    def test_v1_refused_by_default(self) -> None:
        self._challenge()
        _result(self.mechanism.step(SPEC_V1)).trap(AuthenticationFailed)
        self.assertEqual(self.session.refusals, [("User", "NTLM", "NTLMv1 refused (allow_ntlmv1 off)")])
        self.assertEqual(self.session.logins, [])

    def test_v1_allowed(self) -> None:
        """With allow_ntlmv1 the response reaches the checker, and verifies for its challenge."""
        mechanism = _ntlm(self.session, allow_v1=True)
        _result(mechanism.step(CURL_NEGOTIATE))
        self.assertEqual(_result(mechanism.step(SPEC_NTLM2_SESSION)), Authenticated("User"))
        [credentials] = self.session.logins
        assert isinstance(credentials, NTLMCredentials)
        # The mechanism's challenge was random; with the §4.2 one the same message verifies.
        spec = replace(credentials, state=_spec_state())
        self.assertTrue(spec.check(UserSecrets("user@example.test", plaintext=PASSWORD)))
        self.assertFalse(credentials.check(UserSecrets("user@example.test", plaintext=PASSWORD)))

    def test_configured_domain(self) -> None:
        mechanism = _ntlm(self.session, nb_domain="EXAMPLE")
        _, name, _, _ = _challenge_fields(_result(mechanism.step(CURL_NEGOTIATE)).data)
        self.assertEqual(name, b"EXAMPLE")


class MessageTypesTests(TestCase):
    def test_reprs_hide_responses(self) -> None:
        """Responses and raw messages stay out of reprs (they are offline-crackable)."""
        message = parse_authenticate(SPEC_V2)
        self.assertNotIn("68cd", repr(message))
        self.assertNotIn(repr(SPEC_V2[:8]), repr(message))
        self.assertIsInstance(message, AuthenticateMessage)
        self.assertNotIn("raw", repr(NegotiateMessage(Flag.UNICODE, CURL_NEGOTIATE)))
