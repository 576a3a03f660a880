"""NTLM (MS-NLMP) as mail clients speak it in SASL: NEGOTIATE -> CHALLENGE -> AUTHENTICATE.

Outlook, Thunderbird and curl send ``AUTH NTLM`` on SMTP, IMAP and POP3 with the three messages of
MS-NLMP's connection-oriented mode, base64 on the protocol's continuation lines.  kms only
authenticates with NTLM: it never offers signing, sealing or key exchange, so no session key
leaves this module and the MIC (when the client sends one) is the only use of one.

SECURITY.  Every message is hostile until parsed: each (length, offset) pair is checked against
the buffer, names are bounded and strictly decoded, and anything odd is a `MalformedResponse`.
What is accepted: NTLMv2 responses, checked against the NT hash of the user's reversibly stored
password with the MIC verified when the client says it sent one.  Anonymous logins and
LM-only answers are always refused; NTLMv1 and the NTLM2 session response (both crackable from a
captured exchange) only pass with ``allow_ntlmv1``.  The server challenge is fresh per exchange,
from `secrets`, so a captured response cannot be replayed.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import struct
import time
from dataclasses import dataclass, field
from typing import ClassVar

from cryptography.hazmat.decrepit.ciphers.algorithms import ARC4, TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from twisted.internet.defer import Deferred
from zope.interface import implementer

from kms.auth.credentials import PLAINTEXT, IChallengeCredentials, UserSecrets
from kms.auth.errors import MalformedResponse
from kms.auth.exchange import Challenge, Mechanism, MechanismSession, StepResult, challenge_gate
from kms.auth.md4 import nt_hash
from kms.clientinfo import ClientInfo

SIGNATURE = b"NTLMSSP\0"
CHALLENGE_LENGTH = 8
# Far above any real name (AD caps user names at 104 characters) but small enough to keep the
# security log readable.
MAX_NAME_BYTES = 512
_NEGOTIATE_HEADER = 32
_CHALLENGE_HEADER = 56
_AUTHENTICATE_HEADER = 64
_MIC_OFFSET = 72
_MIC_LENGTH = 16
_V1_RESPONSE_LENGTH = 24
# NTProofStr (16) + NTLMv2_CLIENT_CHALLENGE up to its AV pairs (28) + at least MsvAvEOL (4).
_V2_MIN_RESPONSE_LENGTH = 48
_V2_BLOB_HEADER = 28
# Seconds between 1601-01-01 (FILETIME's epoch) and 1970-01-01.
_FILETIME_EPOCH_OFFSET = 11644473600


class Flag(enum.IntFlag):
    """NEGOTIATE flags (MS-NLMP §2.2.2.5) that this server reads or sends."""

    UNICODE = 0x00000001
    OEM = 0x00000002
    REQUEST_TARGET = 0x00000004
    NTLM = 0x00000200
    ALWAYS_SIGN = 0x00008000
    TARGET_TYPE_DOMAIN = 0x00010000
    TARGET_TYPE_SERVER = 0x00020000
    EXTENDED_SESSIONSECURITY = 0x00080000
    TARGET_INFO = 0x00800000
    NEGOTIATE_128 = 0x20000000
    KEY_EXCH = 0x40000000
    NEGOTIATE_56 = 0x80000000


# Granted exactly when the client asks: they change nothing in how we verify a response.
_MIRRORED = Flag.ALWAYS_SIGN | Flag.EXTENDED_SESSIONSECURITY | Flag.NEGOTIATE_128 | Flag.NEGOTIATE_56


class AvId(enum.IntEnum):
    """AV_PAIR identifiers (MS-NLMP §2.2.2.1) used here."""

    EOL = 0
    NB_COMPUTER_NAME = 1
    NB_DOMAIN_NAME = 2
    DNS_COMPUTER_NAME = 3
    DNS_DOMAIN_NAME = 4
    FLAGS = 6
    TIMESTAMP = 7


_AV_FLAG_MIC_PRESENT = 0x2


@dataclass(frozen=True)
class NegotiateMessage:
    """A client's NEGOTIATE: what it asks for, and its raw bytes (part of what the MIC covers)."""

    flags: Flag
    raw: bytes = field(repr=False)


@dataclass(frozen=True)
class Target:
    """How the server names itself in its CHALLENGE (target name and target info)."""

    nb_domain: str
    nb_computer: str
    dns_domain: str
    dns_computer: str


@dataclass(frozen=True)
class ChallengeState:
    """What the server must remember between its CHALLENGE and the client's AUTHENTICATE."""

    server_challenge: bytes
    flags: Flag
    negotiate: bytes = field(repr=False)
    challenge: bytes = field(repr=False)


@dataclass(frozen=True)
class AuthenticateMessage:
    """A parsed AUTHENTICATE; ``mic`` is None unless the client's AV pairs say it sent one."""

    flags: Flag
    lm_response: bytes = field(repr=False)
    nt_response: bytes = field(repr=False)
    domain: str
    user: str
    workstation: str
    mic: bytes | None = field(repr=False)
    raw: bytes = field(repr=False)
    encrypted_session_key: bytes = field(default=b"", repr=False)

    @property
    def version(self) -> int | None:
        """1 for an NTLMv1 or NTLM2 session response, 2 for NTLMv2, None without an NT response."""
        if not self.nt_response:
            return None
        return 1 if len(self.nt_response) == _V1_RESPONSE_LENGTH else 2


def _netbios(name: str) -> str:
    """A NetBIOS name: ASCII, at most 15 characters, upper case."""
    name = name.upper()
    if not name or len(name) > 15 or not name.isascii() or not name.isprintable() or "." in name:
        raise ValueError(f"{name!r} is not a NetBIOS name (1-15 ASCII characters, no dots)")
    return name


def target_for(hostname: str, nb_domain: str | None = None) -> Target:
    """The target for ``[server] hostname``; the NetBIOS domain defaults to the host's first label.

    A server that belongs to no Windows domain names itself, as a standalone Windows server does.
    """
    hostname = hostname.rstrip(".").lower()
    first, _, rest = hostname.partition(".")
    computer = _netbios(first[:15])
    domain = computer if nb_domain is None else _netbios(nb_domain)
    return Target(domain, computer, rest or hostname, hostname)


def filetime(unix_seconds: float) -> int:
    """A Windows FILETIME (100 ns ticks since 1601) for MsvAvTimestamp."""
    return int((unix_seconds + _FILETIME_EPOCH_OFFSET) * 10_000_000)


def _header(data: bytes, message_type: int, minimum: int) -> None:
    """Check the signature, the message type and that the fixed-size part is all there."""
    if len(data) < minimum:
        raise MalformedResponse(f"NTLM message of {len(data)} bytes is truncated")
    if data[:8] != SIGNATURE:
        raise MalformedResponse("not an NTLMSSP message")
    (found,) = struct.unpack_from("<I", data, 8)
    if found != message_type:
        raise MalformedResponse(f"NTLM message type {found}, expected {message_type}")


def _payload(data: bytes, field_offset: int, header: int) -> bytes:
    """The bytes a (Len, MaxLen, Offset) field points at, checked to lie inside the payload.

    MaxLen is ignored, as MS-NLMP §2.2.1 requires of a receiver.
    """
    length, _maxlen, offset = struct.unpack_from("<HHI", data, field_offset)
    if length == 0:
        return b""
    if offset < header or offset + length > len(data):
        raise MalformedResponse(f"NTLM field at byte {field_offset} points outside the message")
    return data[offset : offset + length]


def _text(data: bytes, unicode: bool, what: str) -> str:
    """A name from the message: UTF-16LE, or ASCII for OEM clients; no control characters."""
    if len(data) > MAX_NAME_BYTES:
        raise MalformedResponse(f"NTLM {what} longer than {MAX_NAME_BYTES} bytes")
    try:
        text = data.decode("utf-16-le") if unicode else data.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedResponse(f"NTLM {what} is not valid {'UTF-16' if unicode else 'ASCII'}") from None
    if not text.isprintable():
        raise MalformedResponse(f"NTLM {what} contains control characters")
    return text


def parse_negotiate(data: bytes) -> NegotiateMessage:
    """Parse a NEGOTIATE (type 1); only its flags matter to a server.

    The bare 16-byte form of old clients is accepted.  The optional domain and workstation
    fields are bounds-checked but not used: the AUTHENTICATE message names them again, and that
    one is what gets verified.
    """
    _header(data, 1, 16)
    (flags,) = struct.unpack_from("<I", data, 12)
    if len(data) > 16:
        if len(data) < _NEGOTIATE_HEADER:
            raise MalformedResponse(f"NTLM NEGOTIATE of {len(data)} bytes is truncated")
        _payload(data, 16, _NEGOTIATE_HEADER)
        _payload(data, 24, _NEGOTIATE_HEADER)
    negotiate = NegotiateMessage(Flag(flags), data)
    if not negotiate.flags & (Flag.UNICODE | Flag.OEM):
        raise MalformedResponse("NTLM NEGOTIATE offers neither Unicode nor OEM strings")
    return negotiate


def _av_pair(av_id: AvId, value: bytes) -> bytes:
    return struct.pack("<HH", av_id, len(value)) + value


def _security_buffer(value: bytes, offset: int) -> bytes:
    return struct.pack("<HHI", len(value), len(value), offset)


def build_challenge(
    negotiate: NegotiateMessage, target: Target, server_challenge: bytes, timestamp: int
) -> tuple[bytes, ChallengeState]:
    """The CHALLENGE (type 2) answering ``negotiate``, and the state to verify the answer with.

    ``server_challenge`` must be 8 fresh random bytes; ``timestamp`` a FILETIME.  The target info
    always goes out (clients answer NTLMv2 only when they get it), with MsvAvTimestamp, which
    makes current Windows clients add a MIC.  Flags beyond those are granted only when asked.
    """
    if len(server_challenge) != CHALLENGE_LENGTH:
        raise ValueError("the server challenge is 8 bytes")
    asked = negotiate.flags
    flags = Flag.NTLM | Flag.TARGET_INFO | (asked & _MIRRORED)
    flags |= Flag.UNICODE if asked & Flag.UNICODE else Flag.OEM
    target_name = b""
    if asked & Flag.REQUEST_TARGET:
        standalone = target.nb_domain == target.nb_computer
        flags |= Flag.REQUEST_TARGET | (Flag.TARGET_TYPE_SERVER if standalone else Flag.TARGET_TYPE_DOMAIN)
        target_name = target.nb_domain.encode("utf-16-le" if flags & Flag.UNICODE else "ascii")
    target_info = b"".join(
        [
            _av_pair(AvId.NB_DOMAIN_NAME, target.nb_domain.encode("utf-16-le")),
            _av_pair(AvId.NB_COMPUTER_NAME, target.nb_computer.encode("utf-16-le")),
            _av_pair(AvId.DNS_DOMAIN_NAME, target.dns_domain.encode("utf-16-le")),
            _av_pair(AvId.DNS_COMPUTER_NAME, target.dns_computer.encode("utf-16-le")),
            _av_pair(AvId.TIMESTAMP, struct.pack("<Q", timestamp)),
            _av_pair(AvId.EOL, b""),
        ]
    )
    message = b"".join(
        [
            SIGNATURE,
            struct.pack("<I", 2),
            _security_buffer(target_name, _CHALLENGE_HEADER),
            struct.pack("<I", flags),
            server_challenge,
            bytes(8),  # Reserved
            _security_buffer(target_info, _CHALLENGE_HEADER + len(target_name)),
            bytes(8),  # Version: only meaningful with NEGOTIATE_VERSION, which we never send
            target_name,
            target_info,
        ]
    )
    return message, ChallengeState(server_challenge, flags, negotiate.raw, message)


def parse_challenge(data: bytes, negotiate: NegotiateMessage) -> ChallengeState:
    """The state behind a CHALLENGE someone else built (a winbind helper), to verify the answer locally.

    The helper is our own child process, but its output is still checked like any message: a
    wrong type or a field outside the buffer is a `MalformedResponse`.
    """
    _header(data, 2, 48)
    _payload(data, 12, 48)
    _payload(data, 40, 48)
    (flags,) = struct.unpack_from("<I", data, 20)
    return ChallengeState(data[24:32], Flag(flags), negotiate.raw, data)


def _av_pairs(data: bytes) -> dict[int, bytes]:
    """The AV pairs of an NTLMv2 client blob, up to MsvAvEOL; duplicates are refused."""
    pairs: dict[int, bytes] = {}
    position = 0
    while position + 4 <= len(data):
        av_id, length = struct.unpack_from("<HH", data, position)
        if av_id == AvId.EOL:
            return pairs
        end = position + 4 + length
        if end > len(data):
            raise MalformedResponse("NTLMv2 AV pair runs past the response")
        if av_id in pairs:
            raise MalformedResponse(f"NTLMv2 AV pair {av_id} appears twice")
        pairs[av_id] = data[position + 4 : end]
        position = end
    raise MalformedResponse("NTLMv2 AV pairs are not terminated")


def _v2_mic(raw: bytes, nt_response: bytes) -> bytes | None:
    """Check an NTLMv2 response's client blob; the MIC, when its MsvAvFlags say one was sent."""
    blob = nt_response[16:]
    if blob[:2] != b"\x01\x01":
        raise MalformedResponse("NTLMv2 response has an unknown version")
    av_flags = _av_pairs(blob[_V2_BLOB_HEADER:]).get(AvId.FLAGS)
    if av_flags is None:
        return None
    if len(av_flags) != 4:
        raise MalformedResponse("NTLMv2 MsvAvFlags is not 4 bytes")
    if not struct.unpack("<I", av_flags)[0] & _AV_FLAG_MIC_PRESENT:
        return None
    # Always inside the message: the fixed header and a minimal NTLMv2 response are longer.
    return raw[_MIC_OFFSET : _MIC_OFFSET + _MIC_LENGTH]


def parse_authenticate(data: bytes) -> AuthenticateMessage:
    """Parse an AUTHENTICATE (type 3), checking every field against the buffer.

    The NT response must be empty (refused later, with a reason), 24 bytes (v1) or an NTLMv2
    response; the names are decoded as the message's own UNICODE flag says.
    """
    _header(data, 3, _AUTHENTICATE_HEADER)
    (raw_flags,) = struct.unpack_from("<I", data, 60)
    flags = Flag(raw_flags)
    # The encrypted session key (at 52) only matters when a winbind helper's CHALLENGE granted key
    # exchange (ours never does): the MIC is then keyed with what it decrypts to.
    fields = [_payload(data, offset, _AUTHENTICATE_HEADER) for offset in (12, 20, 28, 36, 44, 52)]
    lm_response, nt_response, domain, user, workstation, session_key = fields
    n = len(nt_response)
    if n and n != _V1_RESPONSE_LENGTH and n < _V2_MIN_RESPONSE_LENGTH:
        raise MalformedResponse(f"NTLM NT response of {n} bytes")
    unicode = bool(flags & Flag.UNICODE)
    return AuthenticateMessage(
        flags=flags,
        lm_response=lm_response,
        nt_response=nt_response,
        domain=_text(domain, unicode, "domain"),
        user=_text(user, unicode, "user name"),
        workstation=_text(workstation, unicode, "workstation"),
        mic=_v2_mic(data, nt_response) if n >= _V2_MIN_RESPONSE_LENGTH else None,
        raw=data,
        encrypted_session_key=session_key,
    )


def _hmac_md5(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.md5).digest()


def _upper(text: str) -> str:
    """Upper case as Windows does it: one code point for one, so 'ß' stays 'ß' (Python gives 'SS')."""
    return "".join(upper if len(upper := c.upper()) == 1 else c for c in text)


def ntowfv2(nt_hash: bytes, user: str, domain: str) -> bytes:
    """NTOWFv2 (MS-NLMP §3.3.2): HMAC-MD5 keyed by the NT hash over UPPER(user) + domain as sent."""
    return _hmac_md5(nt_hash, (_upper(user) + domain).encode("utf-16-le", "surrogatepass"))


def _des_key(seven: bytes) -> bytes:
    """Spread 56 key bits over 8 bytes (the low bit of each, DES's parity bit, left zero)."""
    bits = int.from_bytes(seven, "big")
    return bytes(((bits >> (49 - 7 * i)) & 0x7F) << 1 for i in range(8))


def _desl(key: bytes, data: bytes) -> bytes:
    """DESL (MS-NLMP §6): three single-DES encryptions of ``data`` under the 16-byte key padded to 21."""
    key = key + bytes(5)
    out = b""
    for i in range(0, 21, 7):
        single = _des_key(key[i : i + 7])
        # Three equal keys make 3DES single DES; OpenSSL 3's default provider has no plain DES.
        encryptor = Cipher(TripleDES(single * 3), modes.ECB()).encryptor()
        out += encryptor.update(data) + encryptor.finalize()
    return out


def _verify_v1(message: AuthenticateMessage, state: ChallengeState, nt_hash: bytes) -> bool:
    challenge = state.server_challenge
    if state.flags & message.flags & Flag.EXTENDED_SESSIONSECURITY:
        # NTLM2 session response: the LM field carries the client challenge (MS-NLMP §3.3.1).
        if len(message.lm_response) < CHALLENGE_LENGTH:
            return False
        challenge = hashlib.md5(challenge + message.lm_response[:CHALLENGE_LENGTH]).digest()[:8]
    return hmac.compare_digest(_desl(nt_hash, challenge), message.nt_response)


def verify(message: AuthenticateMessage, state: ChallengeState, nt_hash: bytes, allow_v1: bool) -> bool:
    """Whether ``message`` proves knowledge of the password behind ``nt_hash``.

    Anonymous and LM-only messages never pass; v1 answers only with ``allow_v1``.
    """
    if not message.user or message.version is None:
        return False
    if message.version == 1:
        return allow_v1 and _verify_v1(message, state, nt_hash)
    key = ntowfv2(nt_hash, message.user, message.domain)
    proof = _hmac_md5(key, state.server_challenge + message.nt_response[16:])
    if not hmac.compare_digest(proof, message.nt_response[:16]):
        return False
    if message.mic is None:
        return True
    # Without key exchange (we never offer it) the exported session key is the session base key;
    # with it (a winbind helper's CHALLENGE may grant it, and the client's AUTHENTICATE must keep
    # it: MS-NLMP negotiates a flag only when both set it) the client sent that key RC4-encrypted.
    session_key = _hmac_md5(key, proof)
    if state.flags & message.flags & Flag.KEY_EXCH:
        if len(message.encrypted_session_key) != 16:
            return False
        decryptor = Cipher(ARC4(session_key), mode=None).decryptor()
        session_key = decryptor.update(message.encrypted_session_key) + decryptor.finalize()
    raw = message.raw
    unsigned = raw[:_MIC_OFFSET] + bytes(_MIC_LENGTH) + raw[_MIC_OFFSET + _MIC_LENGTH :]
    return hmac.compare_digest(
        _hmac_md5(session_key, state.negotiate + state.challenge + unsigned), message.mic
    )


def login_name(user: str, domain: str) -> str:
    """The login name for the checker, from the user and domain of an AUTHENTICATE.

    A UPN (``alice@example.test``) is an address already.  A DNS domain (``example.test\\alice``,
    as curl sends it) qualifies the user.  A NetBIOS domain (``EXAMPLE\\alice``) says nothing
    about the mail domain, so the checker qualifies the bare name with its default domain.
    """
    if "@" in user or "." not in domain:
        return user
    return f"{user}@{domain}"


@implementer(IChallengeCredentials)
@dataclass(frozen=True, eq=False)
class NTLMCredentials:
    """An AUTHENTICATE to check against the user's NT hash, made from the reversible password.

    ``username`` is the `login_name` the checker looks up; ``user`` and ``domain`` are what the
    client sent (the NTLMv2 proof covers them exactly as sent, and a directory checker needs them).
    """

    username: str
    message: AuthenticateMessage
    state: ChallengeState = field(repr=False)
    allow_v1: bool
    client: ClientInfo
    mechanism: ClassVar[str] = "NTLM"
    authzid: str | None = None
    requires: ClassVar[str] = PLAINTEXT

    @property
    def user(self) -> str:
        return self.message.user

    @property
    def domain(self) -> str:
        return self.message.domain

    def check(self, secrets: UserSecrets) -> bool:
        """Runs in the checker's thread: MD4 and a few HMACs, no I/O."""
        if secrets.plaintext is None:
            return False
        return verify(self.message, self.state, nt_hash(secrets.plaintext), self.allow_v1)


class NTLM(Mechanism):
    """SASL NTLM: empty challenge, NEGOTIATE -> CHALLENGE, AUTHENTICATE -> login.

    ``allow_v1`` is ``[security] allow_ntlmv1``; ``nb_domain`` the NetBIOS domain to announce
    (default: the first label of the server's hostname, as a standalone Windows server does).
    """

    name = "NTLM"

    def __init__(
        self, session: MechanismSession, allow_v1: bool = False, nb_domain: str | None = None
    ) -> None:
        super().__init__(session)
        self._allow_v1 = allow_v1
        self._target = target_for(session.hostname, nb_domain)
        self._state: ChallengeState | None = None

    def _advance(self, response: bytes | None) -> StepResult:
        if response is None:
            return Challenge(b"")
        if self._state is None:
            return self._challenge(parse_negotiate(response))
        message = parse_authenticate(response)
        credentials = self._credentials(message, self._state)
        username = credentials.username
        refused = challenge_gate(credentials, self._session)
        if refused is not None:
            return refused
        if message.version is None:
            return self._session.refuse(username, self.name, "no NT response (LM only)")
        if message.version == 1 and not self._allow_v1:
            return self._session.refuse(username, self.name, "NTLMv1 refused (allow_ntlmv1 off)")
        return self._session.login(credentials)

    def _challenge(self, negotiate: NegotiateMessage) -> Challenge | Deferred[Challenge]:
        """Our own CHALLENGE; a subclass may have a helper build it instead (and set ``_state``)."""
        challenge, self._state = build_challenge(
            negotiate, self._target, secrets.token_bytes(CHALLENGE_LENGTH), filetime(time.time())
        )
        return Challenge(challenge)

    def _credentials(self, message: AuthenticateMessage, state: ChallengeState) -> NTLMCredentials:
        """What the portal checks; a subclass may name the user differently and add to it."""
        username = login_name(message.user, message.domain)
        return NTLMCredentials(username, message, state, self._allow_v1, self._session.client)
