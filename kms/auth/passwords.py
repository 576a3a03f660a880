"""The two ways a local password is kept (SPEC §3): reversible ``des`` and one-way ``sha``.

``des`` keeps the seed's name, but the cipher is AES-256-GCM with the server's store key: the
plaintext is needed later by CRAM-MD5, DIGEST-MD5, NTLM and APOP.  The user's address is the
associated data, so a token copied onto another user's row does not decrypt.

``sha`` is PBKDF2-HMAC-SHA256 with a random salt.  The iteration count lives in the stored string,
so it can be raised later without breaking old hashes, and salt + iterations are exactly SCRAM-SHA-256's
``Hi(password, salt, i)``: SCRAM keys can be derived from a stored hash without the plaintext.

SCRAM-SHA-256 keys (RFC 5802 §3: StoredKey, ServerKey) are stored beside every password, whatever
its class, so one-way users also have a challenge-response method.  For ``sha`` they reuse the
hash's salt and iterations (no second PBKDF2, and no cheaper target for an offline attack).

Everything here is CPU-bound and synchronous; callers run it in a thread pool, never on the reactor.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
import stringprep
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.fsutil import fsync_dir

KEY_SIZE = 32
_NONCE_SIZE = 12
_TOKEN_VERSION = "v1"
_AAD_PREFIX = b"kms des v1\0"

PBKDF2_SCHEME = "pbkdf2-sha256"
# ~40 ms per check on the 2-core development machine; raise it as hardware gets faster.
DEFAULT_ITERATIONS = 100_000
_SALT_SIZE = 16
_HASH_SIZE = 32


class StoreKeyError(Exception):
    """The key file is unusable (wrong size, readable by others): the admin must look at it."""


class InvalidToken(ValueError):
    """A ``des`` token is malformed, was made with another key, or belongs to another user."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class StoreKey:
    """The 32-byte secret that makes ``des`` passwords reversible; its bytes never appear in repr."""

    __slots__ = ("_aead", "_mac_key")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise StoreKeyError(f"store key must be {KEY_SIZE} bytes, not {len(key)}")
        self._aead = AESGCM(key)
        # A separate key for MACs, so the AES key is never used for two purposes.
        self._mac_key = hmac.new(key, b"kms fake scram salt v1", hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "<StoreKey>"

    @classmethod
    def load_or_create(cls, path: Path) -> StoreKey:
        """Read the key at ``path``, creating it (0600) on first use.

        Creation writes a complete private temporary file and hard-links it into place, so another
        process (kmsctl and the server starting together) sees either no key or the whole key,
        never a short one, and exactly one of the racers' keys wins.  A key file that group or
        others may access is refused rather than fixed: the key may already have leaked, and
        ``des`` passwords must then be considered exposed.
        """
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        fd, tmp = _mkstemp_beside(path)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(KEY_SIZE))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won the race: use its key
            else:
                fsync_dir(path.parent)
        finally:
            os.unlink(tmp)
        return cls._load(path)

    @classmethod
    def _load(cls, path: Path) -> StoreKey:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise StoreKeyError(f"{path}: not a regular file")
            if mode & 0o077:
                raise StoreKeyError(
                    f"{path}: mode {stat.S_IMODE(mode):04o} lets others read the store key;"
                    f" run 'chmod 600 {path}' (and consider 'des' passwords exposed)"
                )
            data = f.read(KEY_SIZE + 1)
        if len(data) != KEY_SIZE:
            raise StoreKeyError(f"{path}: expected {KEY_SIZE} bytes, found {len(data)}")
        return cls(data)

    def fake_salt(self, name: str) -> bytes:
        """A salt for a user that has none (unknown, no SCRAM keys): stable per name, unguessable.

        SCRAM's first server message carries the salt; a random one per attempt, or none, would
        tell a client which accounts exist.
        """
        return hmac.new(self._mac_key, name.encode("utf-8"), hashlib.sha256).digest()[:_SALT_SIZE]

    def encrypt(self, plaintext: str, context: str) -> str:
        """A ``v1$<nonce>$<ciphertext>`` token that only decrypts with this key and this ``context``."""
        nonce = secrets.token_bytes(_NONCE_SIZE)
        ct = self._aead.encrypt(nonce, plaintext.encode("utf-8"), _AAD_PREFIX + context.encode("utf-8"))
        return f"{_TOKEN_VERSION}${_b64(nonce)}${_b64(ct)}"

    def decrypt(self, token: str, context: str) -> str:
        """The plaintext of ``token``; `InvalidToken` if it is malformed, tampered or not ours."""
        parts = token.split("$")
        if len(parts) != 3 or parts[0] != _TOKEN_VERSION:
            raise InvalidToken("not a v1 token")
        try:
            nonce, ct = _unb64(parts[1]), _unb64(parts[2])
        except (binascii.Error, UnicodeEncodeError) as e:
            raise InvalidToken("bad base64 in token") from e
        if len(nonce) != _NONCE_SIZE:
            raise InvalidToken("bad nonce length")
        try:
            plain = self._aead.decrypt(nonce, ct, _AAD_PREFIX + context.encode("utf-8"))
        except InvalidTag as e:
            raise InvalidToken("token does not decrypt with this key for this user") from e
        return plain.decode("utf-8")


def _mkstemp_beside(path: Path) -> tuple[int, str]:
    """A new 0600 file in ``path``'s directory (same filesystem, so it can be linked into place)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), str(tmp)
        except FileExistsError:
            continue


@dataclass(frozen=True)
class PBKDF2Hash:
    """A parsed ``sha`` hash: what SCRAM-SHA-256 needs (``salted`` is its SaltedPassword).

    ``salted`` is as good as the password for SCRAM, so repr leaves it out.
    """

    iterations: int
    salt: bytes
    salted: bytes

    def __repr__(self) -> str:
        return f"PBKDF2Hash(iterations={self.iterations})"

    def encode(self) -> str:
        """The stored form ``pbkdf2-sha256$<iterations>$<b64 salt>$<b64 hash>``."""
        return f"{PBKDF2_SCHEME}${self.iterations}${_b64(self.salt)}${_b64(self.salted)}"


def parse_hash(stored: str) -> PBKDF2Hash:
    """Split a stored ``sha`` hash; `ValueError` when it is not one we wrote."""
    parts = stored.split("$")
    if len(parts) != 4 or parts[0] != PBKDF2_SCHEME or not parts[1].isdigit():
        raise ValueError("not a pbkdf2-sha256 hash")
    try:
        salt, salted = _unb64(parts[2]), _unb64(parts[3])
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ValueError("bad base64 in hash") from e
    iterations = int(parts[1])
    if iterations < 1 or not salt or len(salted) != _HASH_SIZE:
        raise ValueError("implausible pbkdf2-sha256 parameters")
    return PBKDF2Hash(iterations, salt, salted)


def _pbkdf2(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations, _HASH_SIZE)


def hash_password(password: str, iterations: int = DEFAULT_ITERATIONS) -> str:
    """A new salted one-way hash of ``password`` for ``sha`` storage."""
    salt = secrets.token_bytes(_SALT_SIZE)
    return PBKDF2Hash(iterations, salt, _pbkdf2(password, salt, iterations)).encode()


def verify_password(stored: str, password: str) -> bool:
    """Whether ``password`` matches ``stored``, compared in constant time; False for a corrupt hash."""
    try:
        h = parse_hash(stored)
    except ValueError:
        dummy_verify(password)
        return False
    return hmac.compare_digest(_pbkdf2(password, h.salt, h.iterations), h.salted)


_DUMMY_SALT = secrets.token_bytes(_SALT_SIZE)


def dummy_verify(password: str) -> bool:
    """Spend what one `verify_password` at the default cost spends, then say no.

    Checking an unknown user (or one whose secret needs no hashing) must take as long as checking
    a wrong password, or response times tell an attacker which accounts exist.
    """
    hmac.compare_digest(_pbkdf2(password, _DUMMY_SALT, DEFAULT_ITERATIONS), bytes(_HASH_SIZE))
    return False


SCRAM_SCHEME = "SCRAM-SHA-256"


@dataclass(frozen=True)
class ScramKeys:
    """A user's SCRAM-SHA-256 verifier (RFC 5802 §3): enough to check a proof, not to make one."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def encode(self) -> str:
        """The stored form ``SCRAM-SHA-256$<iterations>:<b64 salt>$<b64 StoredKey>:<b64 ServerKey>``."""
        return (
            f"{SCRAM_SCHEME}${self.iterations}:{_b64(self.salt)}"
            f"${_b64(self.stored_key)}:{_b64(self.server_key)}"
        )


def parse_scram(stored: str) -> ScramKeys:
    """Split stored SCRAM keys; `ValueError` when they are not what `ScramKeys.encode` writes."""
    scheme, _, rest = stored.partition("$")
    params, _, keys = rest.partition("$")
    iterations, _, salt = params.partition(":")
    stored_key, _, server_key = keys.partition(":")
    if scheme != SCRAM_SCHEME or not iterations.isdigit() or int(iterations) < 1:
        raise ValueError("not SCRAM-SHA-256 keys")
    try:
        decoded = [_unb64(part) for part in (salt, stored_key, server_key)]
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ValueError("bad base64 in SCRAM keys") from e
    if not decoded[0] or any(len(k) != _HASH_SIZE for k in decoded[1:]):
        raise ValueError("implausible SCRAM keys")
    return ScramKeys(int(iterations), *decoded)


def scram_keys_from_salted(salted: bytes, salt: bytes, iterations: int) -> ScramKeys:
    """The verifier for a SaltedPassword ``Hi(password, salt, iterations)`` (RFC 5802 §3)."""
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    return ScramKeys(iterations, salt, hashlib.sha256(client_key).digest(), server_key)


def scram_keys(password: str, iterations: int = DEFAULT_ITERATIONS) -> ScramKeys:
    """New SCRAM keys with a fresh salt (one PBKDF2: run off the reactor).

    RFC 5802 §2.2 has clients SASLprep the password; one SASLprep refuses (control characters)
    is used as it is, which no conforming client will match, so SCRAM simply fails for it.
    """
    try:
        password = saslprep(password)
    except ValueError:
        pass
    salt = secrets.token_bytes(_SALT_SIZE)
    return scram_keys_from_salted(_pbkdf2(password, salt, iterations), salt, iterations)


_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
)


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep for stored strings (no unassigned code points); `ValueError` if prohibited."""
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c))
    result = unicodedata.normalize("NFKC", mapped)
    for c in result:
        if any(prohibited(c) for prohibited in _PROHIBITED) or stringprep.in_table_a1(c):
            raise ValueError(f"SASLprep prohibits U+{ord(c):04X}")
    if any(stringprep.in_table_d1(c) for c in result):
        # RFC 3454 §6: right-to-left text must start and end with RandALCat, and hold no LCat.
        if not (stringprep.in_table_d1(result[0]) and stringprep.in_table_d1(result[-1])):
            raise ValueError("SASLprep: right-to-left string must start and end with RandALCat")
        if any(stringprep.in_table_d2(c) for c in result):
            raise ValueError("SASLprep: mixed right-to-left and left-to-right text")
    return result
