"""SASL clients written from the RFCs alone, for tests: SCRAM-SHA-256 (no stock client here speaks
it) and a DIGEST-MD5 response builder (to drive the state machine step by step)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from kms.auth.mechanisms import parse_directives


class ScramClient:
    """The client side of SCRAM-SHA-256 (RFC 5802 §3, §5), as an imaplib/smtplib auth callable.

    Called with each server challenge (decoded), returns the next client message; raises if the
    server's signature is wrong, so a test cannot pass against a server that does not know the key.
    """

    def __init__(self, username: str, password: str, authzid: str = "") -> None:
        self.username = username.replace("=", "=3D").replace(",", "=2C")
        self.password = password.encode("utf-8")
        self.gs2 = f"n,{'a=' + authzid if authzid else ''},"
        self.nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        self.server_signature: bytes | None = None
        self.server_first = ""
        self.steps = 0

    def __call__(self, challenge: bytes | None) -> bytes:
        self.steps += 1
        if self.steps == 1:
            self.first_bare = f"n={self.username},r={self.nonce}"
            return (self.gs2 + self.first_bare).encode()
        if self.steps == 2:
            return self.final(challenge or b"")
        assert challenge == b"v=" + base64.b64encode(self.server_signature or b""), challenge
        return b""

    def final(self, server_first: bytes) -> bytes:
        self.server_first = server_first.decode()
        fields = dict(part.split("=", 1) for part in self.server_first.split(","))
        assert fields["r"].startswith(self.nonce)
        salted = hashlib.pbkdf2_hmac("sha256", self.password, base64.b64decode(fields["s"]), int(fields["i"]))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c={base64.b64encode(self.gs2.encode()).decode()},r={fields['r']}"
        auth_message = f"{self.first_bare},{self.server_first},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self.server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


def digest_response(
    challenge: bytes,
    user: str = "alice@example.test",
    password: str = "Pässwort 1",
    uri: str = "imap/mx.example.test",
    **override: str,
) -> tuple[bytes, bytes]:
    """An RFC 2831 client's response to ``challenge`` and the rspauth it expects back.

    ``override`` replaces directives as sent (quotes included); response is computed last.
    """
    offered = parse_directives(challenge)
    d = {
        "charset": "utf-8",
        "username": f'"{user}"',
        "realm": f'"{offered["realm"].decode()}"',
        "nonce": f'"{offered["nonce"].decode()}"',
        "nc": "00000001",
        "cnonce": '"cn0nce+/="',
        "digest-uri": f'"{uri}"',
        "qop": "auth",
    }
    d.update(override)
    value = {k: v.strip('"') for k, v in d.items()}

    def text(s: str) -> bytes:  # RFC 2831 §2.1.2.1: Latin-1 where it fits, else UTF-8
        try:
            return s.encode("latin-1")
        except UnicodeEncodeError:
            return s.encode("utf-8")

    def kd(prefix: str) -> bytes:
        inner = hashlib.md5(text(value["username"]) + b":" + text(value["realm"]) + b":" + text(password))
        a1 = inner.digest() + f":{value['nonce']}:{value['cnonce']}".encode()
        if "authzid" in value:
            a1 += b":" + value["authzid"].encode()
        ha2 = hashlib.md5(f"{prefix}:{value['digest-uri']}".encode()).hexdigest()
        line = f"{hashlib.md5(a1).hexdigest()}:{value['nonce']}:00000001:{value['cnonce']}:auth:{ha2}"
        return hashlib.md5(line.encode()).hexdigest().encode()

    d.setdefault("response", kd("AUTHENTICATE").decode())
    return ",".join(f"{k}={v}" for k, v in d.items()).encode(), b"rspauth=" + kd("")
