"""The SASL mechanisms (and POP3's APOP), each a small state machine on `kms.auth.exchange`.

Plaintext ones (PLAIN, LOGIN) hand a password to the login session.  Challenge-response ones
(CRAM-MD5, DIGEST-MD5, SCRAM-SHA-256, APOP) hand it credentials that provide
`IChallengeCredentials`: the checker looks the user up and the credentials verify the client's
answer against what the storage holds (`kms.auth.credentials`).  Every comparison of a secret is
constant-time, every nonce comes from `secrets`, and anything malformed from the client ends the
exchange with `MalformedResponse` or fails it like a wrong password, never with a crash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import ClassVar

from twisted.internet.defer import Deferred
from zope.interface import implementer

from kms.auth.credentials import PLAINTEXT, SCRAM, IChallengeCredentials, UserSecrets
from kms.auth.errors import MalformedResponse
from kms.auth.exchange import (
    MAX_IDENTITY_OCTETS,
    MAX_PASSWORD_OCTETS,
    Authenticated,
    Challenge,
    Mechanism,
    MechanismSession,
    StepResult,
    challenge_gate,
    plaintext_login,
    utf8,
)
from kms.clientinfo import ClientInfo

_HEX_DIGEST = re.compile(rb"[0-9a-f]{32}")


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _no_initial_response(name: str, response: bytes | None) -> None:
    """Server-first mechanisms: data before the first challenge is a protocol error."""
    if response is not None:
        raise MalformedResponse(f"{name} takes no initial response")


def _msg_id(hostname: str) -> str:
    """An RFC 1939/2195 ``<random.time@host>`` challenge; the random part alone is unguessable."""
    return f"<{secrets.randbits(64)}.{int(time.time())}@{hostname}>"


class Plain(Mechanism):
    """RFC 4616: one message ``authzid NUL authcid NUL passwd``, UTF-8."""

    name = "PLAIN"

    def _advance(self, response: bytes | None) -> StepResult:
        if response is None:
            return Challenge(b"")
        fields = response.split(b"\0")
        if len(fields) != 3:
            raise MalformedResponse(f"PLAIN message has {len(fields) - 1} NULs, not 2")
        authzid = utf8(fields[0], "authorization identity", MAX_IDENTITY_OCTETS)
        username = utf8(fields[1], "user name", MAX_IDENTITY_OCTETS)
        password = utf8(fields[2], "password", MAX_PASSWORD_OCTETS)
        return plaintext_login(self._session, self.name, username, password, authzid)


class Login(Mechanism):
    """The de-facto LOGIN mechanism: ``Username:`` and ``Password:`` prompts, as Outlook expects.

    An initial response is taken as the user name (``AUTH LOGIN dXNlcg==``).
    """

    name = "LOGIN"

    def __init__(self, session: MechanismSession) -> None:
        super().__init__(session)
        self._username: str | None = None

    def _advance(self, response: bytes | None) -> StepResult:
        if response is None:
            return Challenge(b"Username:")
        if self._username is None:
            self._username = utf8(response, "user name", MAX_IDENTITY_OCTETS)
            return Challenge(b"Password:")
        password = utf8(response, "password", MAX_PASSWORD_OCTETS)
        return plaintext_login(self._session, self.name, self._username, password)


# --- CRAM-MD5 (RFC 2195) and APOP (RFC 1939) -------------------------------------------------------


@implementer(IChallengeCredentials)
@dataclass(eq=False)
class CramMD5Credentials:
    """A CRAM-MD5 answer: ``digest`` must be HMAC-MD5 of ``challenge`` keyed with the password."""

    username: str
    challenge: bytes
    digest: bytes = field(repr=False)
    client: ClientInfo
    mechanism: ClassVar[str] = "CRAM-MD5"
    authzid: str | None = None
    requires: ClassVar[str] = PLAINTEXT

    def check(self, secrets: UserSecrets) -> bool:
        assert secrets.plaintext is not None
        expected = hmac.new(secrets.plaintext.encode("utf-8"), self.challenge, "md5").hexdigest()
        return hmac.compare_digest(expected.encode("ascii"), self.digest)


@implementer(IChallengeCredentials)
@dataclass(eq=False)
class ApopCredentials:
    """An APOP command: ``digest`` must be MD5 of the greeting's ``timestamp`` and the password."""

    username: str
    timestamp: str
    digest: bytes = field(repr=False)
    client: ClientInfo
    mechanism: ClassVar[str] = "APOP"
    authzid: str | None = None
    requires: ClassVar[str] = PLAINTEXT

    def check(self, secrets: UserSecrets) -> bool:
        assert secrets.plaintext is not None
        expected = _md5_hex((self.timestamp + secrets.plaintext).encode("utf-8"))
        return hmac.compare_digest(expected.encode("ascii"), self.digest)


def hex_digest(text: str) -> bytes | None:
    """A client's MD5 digest as 32 lower-case hex bytes, or None when it is not one.

    RFC 1939 and RFC 2195 ask for lower case; upper case is accepted, as some clients send it.
    """
    data = text.encode("ascii", "replace").lower()
    return data if _HEX_DIGEST.fullmatch(data) else None


class CramMD5(Mechanism):
    """RFC 2195: the server sends ``<random.time@host>``, the client ``user SP hex(HMAC-MD5)``."""

    name = "CRAM-MD5"

    def __init__(self, session: MechanismSession) -> None:
        super().__init__(session)
        self._challenge: bytes | None = None

    def _advance(self, response: bytes | None) -> StepResult:
        if self._challenge is None:
            _no_initial_response(self.name, response)
            self._challenge = _msg_id(self._session.hostname).encode("ascii")
            return Challenge(self._challenge)
        assert response is not None
        name, space, digest_text = response.rpartition(b" ")
        if not space:
            raise MalformedResponse("CRAM-MD5 answer has no space between user name and digest")
        username = utf8(name, "user name", MAX_IDENTITY_OCTETS)
        digest = hex_digest(digest_text.decode("ascii", "replace"))
        if digest is None:
            return self._session.refuse(username, self.name, "CRAM-MD5 digest is not 32 hex digits")
        credentials = CramMD5Credentials(username, self._challenge, digest, self._session.client)
        return challenge_gate(credentials, self._session) or self._session.login(credentials)


# --- DIGEST-MD5 (RFC 2831, authentication only) ----------------------------------------------------

_MAX_DIRECTIVES = 32
_MAX_VALUE = 1024
_TOKEN = re.compile(rb"[!#$%&'*+\-.0-9A-Z^_`a-z|~]+")
_LWS = b" \t\r\n"
# Must appear exactly once in a client response (RFC 2831 §2.1.2); the rest at most once.
_REQUIRED = ("username", "nonce", "cnonce", "nc", "digest-uri", "response")


def parse_directives(data: bytes) -> dict[str, bytes]:
    """RFC 2831 ``1#( name = ( token | quoted-string ) )``, strictly: `MalformedResponse` on any flaw.

    Names are case-insensitive; a repeated name, an unterminated quote, more than a few dozen
    directives or an over-long value are refused rather than guessed at.
    """
    directives: dict[str, bytes] = {}
    pos, end = 0, len(data)

    def skip_lws(i: int) -> int:
        while i < end and data[i] in _LWS:
            i += 1
        return i

    while True:
        pos = skip_lws(pos)
        while pos < end and data[pos] == ord(","):  # empty list elements are allowed
            pos = skip_lws(pos + 1)
        if pos >= end:
            return directives
        m = _TOKEN.match(data, pos)
        if m is None:
            raise MalformedResponse(f"DIGEST-MD5: expected a directive name at offset {pos}")
        name = m.group().decode("ascii").lower()
        pos = skip_lws(m.end())
        if pos >= end or data[pos] != ord("="):
            raise MalformedResponse(f"DIGEST-MD5: directive {name!r} has no value")
        pos = skip_lws(pos + 1)
        if pos < end and data[pos] == ord('"'):
            value, pos = _quoted_string(data, pos + 1)
        else:
            m = _TOKEN.match(data, pos)
            if m is None:
                raise MalformedResponse(f"DIGEST-MD5: directive {name!r} has an invalid value")
            value, pos = m.group(), m.end()
        if len(value) > _MAX_VALUE:
            raise MalformedResponse(f"DIGEST-MD5: directive {name!r} is longer than {_MAX_VALUE} bytes")
        if name in directives:
            raise MalformedResponse(f"DIGEST-MD5: directive {name!r} appears twice")
        if len(directives) == _MAX_DIRECTIVES:
            raise MalformedResponse(f"DIGEST-MD5: more than {_MAX_DIRECTIVES} directives")
        directives[name] = value
        pos = skip_lws(pos)
        if pos < end and data[pos] != ord(","):
            raise MalformedResponse(f"DIGEST-MD5: expected ',' after directive {name!r}")


def _quoted_string(data: bytes, pos: int) -> tuple[bytes, int]:
    """The unescaped content of a quoted string whose opening quote is before ``pos``, and the end."""
    out = bytearray()
    while pos < len(data):
        c = data[pos]
        if c == ord('"'):
            return bytes(out), pos + 1
        if c == ord("\\"):
            pos += 1
            if pos == len(data):
                break
            c = data[pos]
        out.append(c)
        pos += 1
    raise MalformedResponse("DIGEST-MD5: unterminated quoted string")


def _digest_text(text: str, utf8_charset: bool) -> bytes:
    """RFC 2831 §2.1.2.1: with charset=utf-8, strings that fit ISO 8859-1 are hashed in it anyway."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        if not utf8_charset:
            raise
        return text.encode("utf-8")


@implementer(IChallengeCredentials)
@dataclass(eq=False)
class DigestMD5Credentials:
    """A DIGEST-MD5 response; `check` also computes ``rspauth``, the server's proof for the client."""

    username: str
    realm: str
    nonce: bytes
    cnonce: bytes
    nc: bytes
    digest_uri: bytes
    response: bytes = field(repr=False)
    utf8_charset: bool
    client: ClientInfo
    authzid: str | None = None
    mechanism: ClassVar[str] = "DIGEST-MD5"
    requires: ClassVar[str] = PLAINTEXT
    rspauth: bytes | None = field(default=None, repr=False)

    def _value(self, password: str, a2_prefix: bytes) -> bytes:
        """RFC 2831 §2.1.2.1 ``response-value`` for qop=auth, with A2 = prefix ":" digest-uri."""
        inner = b":".join(_digest_text(s, self.utf8_charset) for s in (self.username, self.realm, password))
        a1 = b":".join([hashlib.md5(inner).digest(), self.nonce, self.cnonce])
        if self.authzid is not None:
            a1 += b":" + self.authzid.encode("utf-8")
        ha2 = _md5_hex(a2_prefix + b":" + self.digest_uri)
        kd = b":".join([_md5_hex(a1).encode(), self.nonce, self.nc, self.cnonce, b"auth", ha2.encode()])
        return _md5_hex(kd).encode("ascii")

    def check(self, secrets: UserSecrets) -> bool:
        assert secrets.plaintext is not None
        try:
            expected = self._value(secrets.plaintext, b"AUTHENTICATE")
        except UnicodeEncodeError:
            return False  # a non-Latin-1 name or password without charset=utf-8 cannot match
        if not hmac.compare_digest(expected, self.response):
            return False
        self.rspauth = self._value(secrets.plaintext, b"")
        return True


class DigestMD5(Mechanism):
    """RFC 2831 authentication (qop=auth only): challenge, response, ``rspauth``, empty answer.

    The nonce is used for exactly one response: the exchange ends after it, and each exchange
    makes a new one, so a captured response can never be replayed.
    """

    name = "DIGEST-MD5"

    def __init__(self, session: MechanismSession) -> None:
        super().__init__(session)
        self._nonce: bytes | None = None
        self._verified: Authenticated | None = None

    def _advance(self, response: bytes | None) -> StepResult:
        if self._nonce is None:
            _no_initial_response(self.name, response)
            self._nonce = base64.b64encode(secrets.token_bytes(24))
            realm = self._session.hostname.encode("ascii")
            # algorithm unquoted: curl and others reject algorithm="md5-sess".
            return Challenge(
                b'realm="%s",nonce="%s",qop="auth",charset=utf-8,algorithm=md5-sess' % (realm, self._nonce)
            )
        assert response is not None
        if self._verified is not None:
            if response:
                raise MalformedResponse("DIGEST-MD5: the answer to rspauth must be empty")
            return self._session.commit(self._verified)
        return self._respond(response)

    def _respond(self, response: bytes) -> StepResult:
        assert self._nonce is not None
        d = parse_directives(response)
        missing = [name for name in _REQUIRED if name not in d]
        if missing:
            raise MalformedResponse(f"DIGEST-MD5: missing {', '.join(missing)}")
        utf8_charset = "charset" in d
        if utf8_charset and d["charset"].lower() != b"utf-8":
            raise MalformedResponse("DIGEST-MD5: charset must be utf-8")
        encoding = "utf-8" if utf8_charset else "latin-1"
        try:
            username = d["username"].decode(encoding)
            realm = d.get("realm", b"").decode(encoding)
            authzid = d["authzid"].decode("utf-8") if "authzid" in d else None
        except UnicodeDecodeError:
            raise MalformedResponse("DIGEST-MD5: user name, realm or authzid is not UTF-8") from None
        credentials = DigestMD5Credentials(
            username=username,
            realm=realm,
            nonce=d["nonce"],
            cnonce=d["cnonce"],
            nc=d["nc"],
            digest_uri=d["digest-uri"],
            response=d["response"].lower(),
            utf8_charset=utf8_charset,
            client=self._session.client,
            authzid=authzid or None,
        )
        problem = self._problem(d, credentials)
        if problem is not None:
            return self._session.refuse(username, self.name, f"DIGEST-MD5: {problem}")
        refused = challenge_gate(credentials, self._session)
        if refused is not None:
            return refused
        return Deferred.fromCoroutine(self._verify(credentials))

    def _problem(self, d: dict[str, bytes], credentials: DigestMD5Credentials) -> str | None:
        """Why a well-formed response cannot be right for this exchange, or None."""
        assert self._nonce is not None
        if not hmac.compare_digest(credentials.nonce, self._nonce):
            return "nonce is not the one this exchange issued"
        if credentials.nc != b"00000001":
            return f"nonce count {credentials.nc!r} is not 00000001"
        if d.get("qop", b"auth") != b"auth":
            return "only qop=auth is offered"
        if "cipher" in d:
            return "cipher given without qop=auth-conf"
        if "realm" in d and credentials.realm.lower() != self._session.hostname.lower():
            return f"realm {credentials.realm!r} is not {self._session.hostname}"
        if not _HEX_DIGEST.fullmatch(credentials.response):
            return "response is not 32 hex digits"
        return self._uri_problem(credentials.digest_uri)

    def _uri_problem(self, uri: bytes) -> str | None:
        """RFC 2831 ``digest-uri``: ``serv-type/host[/serv-name]`` naming this service and this server."""
        parts = uri.decode("ascii", "replace").split("/")
        if len(parts) not in (2, 3):
            return f"digest-uri {uri!r} is not serv-type/host"
        serv_type, host = parts[0].lower(), parts[1].lower()
        if serv_type != self._session.service:
            return f"digest-uri is for {serv_type!r}, not {self._session.service}"
        client = self._session.client
        own = {self._session.hostname.lower(), client.local_host.lower(), f"[{client.local_host.lower()}]"}
        if host not in own:
            return f"digest-uri host {host!r} is not this server"
        return None

    async def _verify(self, credentials: DigestMD5Credentials) -> Challenge | Authenticated:
        self._verified = await self._session.verify(credentials)
        assert credentials.rspauth is not None
        return Challenge(b"rspauth=" + credentials.rspauth)


# --- SCRAM-SHA-256 (RFC 5802, RFC 7677), without channel binding ----------------------------------

_MAX_NONCE = 256
_SCRAM_ATTRIBUTE = re.compile(r"[A-Za-z]=")


def _saslname(text: str) -> str:
    """RFC 5802 ``saslname``: ``=2C`` is ``,`` and ``=3D`` is ``=``; any other ``=`` is an error."""
    if "=" in text.replace("=2C", "").replace("=3D", ""):
        raise MalformedResponse("SCRAM: '=' in a name that is not =2C or =3D")
    return text.replace("=2C", ",").replace("=3D", "=")


def _attributes(message: str, what: str) -> list[tuple[str, str]]:
    """``a=value`` pairs of a SCRAM message, in order; `MalformedResponse` when one is not."""
    pairs = []
    for part in message.split(","):
        if not _SCRAM_ATTRIBUTE.match(part):
            raise MalformedResponse(f"SCRAM: {what} has a malformed attribute")
        pairs.append((part[0], part[2:]))
    return pairs


@implementer(IChallengeCredentials)
@dataclass(eq=False)
class ScramCredentials:
    """A SCRAM client proof; `check` also computes the server signature the client will verify."""

    username: str
    auth_message: bytes
    proof: bytes = field(repr=False)
    client: ClientInfo
    authzid: str | None = None
    mechanism: ClassVar[str] = "SCRAM-SHA-256"
    requires: ClassVar[str] = SCRAM
    server_signature: bytes | None = field(default=None, repr=False)

    def check(self, secrets: UserSecrets) -> bool:
        keys = secrets.scram
        assert keys is not None
        signature = hmac.digest(keys.stored_key, self.auth_message, "sha256")
        if len(self.proof) != len(signature):
            return False
        client_key = bytes(a ^ b for a, b in zip(self.proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), keys.stored_key):
            return False
        self.server_signature = hmac.digest(keys.server_key, self.auth_message, "sha256")
        return True


class ScramSHA256(Mechanism):
    """RFC 7677: client-first, server-first (salt, iterations), client-final with proof, server-final.

    Channel binding is not offered (no -PLUS mechanism), so the GS2 flag must be ``n`` or ``y``.
    """

    name = "SCRAM-SHA-256"

    def __init__(self, session: MechanismSession) -> None:
        super().__init__(session)
        self._gs2_header: str | None = None
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._username = ""
        self._authzid: str | None = None
        self._verified: Authenticated | None = None

    def _advance(self, response: bytes | None) -> StepResult:
        if response is None:
            return Challenge(b"")  # no initial response: ask for the client-first message
        if self._gs2_header is None:
            return self._client_first(response)
        if self._verified is None:
            return self._client_final(response)
        if response:
            raise MalformedResponse("SCRAM: the answer to the server-final message must be empty")
        return self._session.commit(self._verified)

    def _client_first(self, response: bytes) -> StepResult:
        text = utf8(response, "SCRAM client-first message", MAX_IDENTITY_OCTETS + _MAX_NONCE + 64)
        flag, comma, rest = text.partition(",")
        authzid_part, comma2, bare = rest.partition(",")
        if not comma or not comma2:
            raise MalformedResponse("SCRAM: no GS2 header")
        if flag not in ("n", "y") and not flag.startswith("p="):
            raise MalformedResponse(f"SCRAM: bad GS2 channel-binding flag {flag[:8]!r}")
        if authzid_part and not authzid_part.startswith("a="):
            raise MalformedResponse("SCRAM: bad authzid in GS2 header")
        attributes = _attributes(bare, "client-first message")
        if len(attributes) < 2 or attributes[0][0] != "n" or attributes[1][0] != "r":
            raise MalformedResponse("SCRAM: client-first message must start n=...,r=...")
        username = _saslname(attributes[0][1])
        nonce = attributes[1][1]
        if not nonce or len(nonce) > _MAX_NONCE or not nonce.isprintable() or not nonce.isascii():
            raise MalformedResponse("SCRAM: client nonce is empty, too long or not printable ASCII")
        self._gs2_header = f"{flag},{authzid_part},"
        self._client_first_bare = bare
        self._username = username
        self._authzid = _saslname(authzid_part[2:]) or None
        if flag.startswith("p="):
            return self._session.refuse(username, self.name, "SCRAM channel binding is not supported")
        if any(name == "m" for name, _ in attributes[2:]):
            return self._session.refuse(username, self.name, "SCRAM mandatory extension not supported")
        if not username:
            return self._session.refuse(username, self.name, "empty user name")
        self._nonce = nonce + base64.b64encode(secrets.token_bytes(24)).decode("ascii")
        return Deferred.fromCoroutine(self._server_first_message())

    async def _server_first_message(self) -> Challenge | Authenticated:
        salt, iterations = await self._session.scram_parameters(self._username, self.name)
        self._server_first = f"r={self._nonce},s={base64.b64encode(salt).decode('ascii')},i={iterations}"
        return Challenge(self._server_first.encode("ascii"))

    def _client_final(self, response: bytes) -> StepResult:
        assert self._gs2_header is not None
        text = utf8(response, "SCRAM client-final message", 1024)
        without_proof, sep, proof_text = text.rpartition(",p=")
        if not sep:
            raise MalformedResponse("SCRAM: client-final message has no proof")
        attributes = _attributes(without_proof, "client-final message")
        if len(attributes) < 2 or attributes[0][0] != "c" or attributes[1][0] != "r":
            raise MalformedResponse("SCRAM: client-final message must start c=...,r=...")
        try:
            proof = base64.b64decode(proof_text, validate=True)
            binding = base64.b64decode(attributes[0][1], validate=True)
        except binascii.Error:
            raise MalformedResponse("SCRAM: invalid base64 in client-final message") from None
        if binding != self._gs2_header.encode("utf-8"):
            return self._session.refuse(self._username, self.name, "SCRAM channel binding data differs")
        if attributes[1][1] != self._nonce:
            return self._session.refuse(self._username, self.name, "SCRAM nonce is not this exchange's")
        auth_message = ",".join([self._client_first_bare, self._server_first, without_proof])
        credentials = ScramCredentials(
            self._username, auth_message.encode("utf-8"), proof, self._session.client, self._authzid
        )
        refused = challenge_gate(credentials, self._session)
        if refused is not None:
            return refused
        return Deferred.fromCoroutine(self._verify(credentials))

    async def _verify(self, credentials: ScramCredentials) -> Challenge | Authenticated:
        self._verified = await self._session.verify(credentials)
        assert credentials.server_signature is not None
        return Challenge(b"v=" + base64.b64encode(credentials.server_signature))
