"""Tests for kms.auth.passwords: the store key, ``des`` tokens and ``sha`` hashes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import stat
import threading
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kms.auth import passwords
from kms.auth.passwords import (
    DEFAULT_ITERATIONS,
    KEY_SIZE,
    InvalidToken,
    StoreKey,
    StoreKeyError,
    dummy_verify,
    hash_password,
    parse_hash,
    parse_scram,
    saslprep,
    scram_keys,
    scram_keys_from_salted,
    verify_password,
)

_FIXED_KEY = StoreKey(bytes(range(KEY_SIZE)))


class StoreKeyFileTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / "store.key"

    def test_created_private_with_32_random_bytes(self) -> None:
        """The first use creates a 0600 file of exactly 32 bytes and leaves no temporary file."""
        StoreKey.load_or_create(self.path)
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        self.assertEqual(len(self.path.read_bytes()), KEY_SIZE)
        self.assertEqual(os.listdir(self.dir), ["store.key"])

    def test_two_stores_get_different_keys(self) -> None:
        """Keys come from a CSPRNG, not from anything two installations share."""
        other = Path(self.mktemp())
        other.mkdir()
        StoreKey.load_or_create(self.path)
        StoreKey.load_or_create(other / "store.key")
        self.assertNotEqual(self.path.read_bytes(), (other / "store.key").read_bytes())

    def test_reload_gives_same_key(self) -> None:
        """A token made before a restart decrypts after it."""
        token = StoreKey.load_or_create(self.path).encrypt("s3cret", "a@example.test")
        self.assertEqual(StoreKey.load_or_create(self.path).decrypt(token, "a@example.test"), "s3cret")

    def test_concurrent_creation_agrees_on_one_key(self) -> None:
        """Racing creators (kmsctl and the server) all end up with the same, complete key."""
        barrier = threading.Barrier(8)
        keys: list[StoreKey] = []
        errors: list[BaseException] = []

        def create() -> None:
            barrier.wait()
            try:
                keys.append(StoreKey.load_or_create(self.path))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=create) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        token = keys[0].encrypt("pw", "ctx")
        for key in keys:
            self.assertEqual(key.decrypt(token, "ctx"), "pw")
        self.assertEqual(os.listdir(self.dir), ["store.key"])

    def test_group_readable_key_refused(self) -> None:
        """A key others may read is refused, not silently fixed: it may have leaked."""
        StoreKey.load_or_create(self.path)
        self.path.chmod(0o640)
        e = self.assertRaises(StoreKeyError, StoreKey.load_or_create, self.path)
        self.assertIn("chmod 600", str(e))
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o640)

    def test_wrong_size_refused(self) -> None:
        """A truncated or padded key file is an error, never a weaker key."""
        for size in (0, KEY_SIZE - 1, KEY_SIZE + 1):
            self.path.write_bytes(b"k" * size)
            self.path.chmod(0o600)
            self.assertRaises(StoreKeyError, StoreKey.load_or_create, self.path)

    def test_symlink_refused(self) -> None:
        """The key is never read through a symlink someone planted in the store."""
        real = self.dir / "real.key"
        real.write_bytes(os.urandom(KEY_SIZE))
        real.chmod(0o600)
        self.path.symlink_to(real)
        self.assertRaises(OSError, StoreKey.load_or_create, self.path)

    def test_repr_hides_key(self) -> None:
        """Neither the raw bytes nor their hex or base64 form appear in repr."""
        key_bytes = os.urandom(KEY_SIZE)
        text = repr(StoreKey(key_bytes))
        for form in (repr(key_bytes), key_bytes.hex(), base64.b64encode(key_bytes).decode()):
            self.assertNotIn(form, text)
        self.assertEqual(text, "<StoreKey>")


class TokenTests(TestCase):
    def test_format(self) -> None:
        """Tokens are ``v1$<b64 12-byte nonce>$<b64 ciphertext+tag>``."""
        token = _FIXED_KEY.encrypt("hello", "a@example.test")
        m = re.fullmatch(r"v1\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)", token)
        assert m is not None
        self.assertEqual(len(base64.b64decode(m.group(1))), 12)
        self.assertEqual(len(base64.b64decode(m.group(2))), len("hello") + 16)

    def test_random_nonce(self) -> None:
        """The same password twice gives different tokens: equal passwords are not visible."""
        self.assertNotEqual(_FIXED_KEY.encrypt("pw", "a@x.test"), _FIXED_KEY.encrypt("pw", "a@x.test"))

    def test_bound_to_context(self) -> None:
        """A token moved to another user's row does not decrypt."""
        token = _FIXED_KEY.encrypt("pw", "alice@example.test")
        self.assertRaises(InvalidToken, _FIXED_KEY.decrypt, token, "mallory@example.test")

    def test_other_key_fails(self) -> None:
        token = _FIXED_KEY.encrypt("pw", "a@x.test")
        self.assertRaises(InvalidToken, StoreKey(os.urandom(KEY_SIZE)).decrypt, token, "a@x.test")

    def test_tampered_fails(self) -> None:
        """Any flipped bit in the ciphertext is detected (authenticated encryption)."""
        token = _FIXED_KEY.encrypt("password", "a@x.test")
        version, nonce, ct = token.split("$")
        raw = bytearray(base64.b64decode(ct))
        for i in range(len(raw)):
            flipped = bytearray(raw)
            flipped[i] ^= 1
            bad = f"{version}${nonce}${base64.b64encode(bytes(flipped)).decode()}"
            self.assertRaises(InvalidToken, _FIXED_KEY.decrypt, bad, "a@x.test")

    def test_malformed_tokens(self) -> None:
        """Garbage raises InvalidToken, never another exception type."""
        nonce = base64.b64encode(bytes(12)).decode()
        for token in (
            "",
            "v1",
            "v2$AAAA$AAAA",
            "v1$!!$AAAA",
            f"v1${nonce}$é",
            "v1$AAAA$AAAA",
            f"v1${nonce}$AAAA",
            f"v1${nonce}$AAAA$extra",
        ):
            self.assertRaises(InvalidToken, _FIXED_KEY.decrypt, token, "a@x.test")

    @given(st.text(), st.text())
    def test_round_trip(self, plaintext: str, context: str) -> None:
        """Every str survives encrypt/decrypt, whatever the context."""
        self.assertEqual(_FIXED_KEY.decrypt(_FIXED_KEY.encrypt(plaintext, context), context), plaintext)


class HashTests(TestCase):
    def test_format_and_default_iterations(self) -> None:
        """``pbkdf2-sha256$<iterations>$<b64 16-byte salt>$<b64 32-byte hash>``."""
        stored = hash_password("secret")
        scheme, iterations, salt, digest = stored.split("$")
        self.assertEqual((scheme, int(iterations)), ("pbkdf2-sha256", DEFAULT_ITERATIONS))
        self.assertEqual(len(base64.b64decode(salt)), 16)
        self.assertEqual(len(base64.b64decode(digest)), 32)

    def test_verify(self) -> None:
        stored = hash_password("correct horse")
        self.assertTrue(verify_password(stored, "correct horse"))
        self.assertFalse(verify_password(stored, "correct horsE"))
        self.assertFalse(verify_password(stored, ""))

    def test_salted(self) -> None:
        """Two hashes of one password differ, and both verify."""
        a, b = hash_password("pw", 1000), hash_password("pw", 1000)
        self.assertNotEqual(a, b)
        self.assertTrue(verify_password(a, "pw") and verify_password(b, "pw"))

    def test_iterations_kept_in_hash(self) -> None:
        """Hashes made with an older (lower) count keep verifying after the default changes."""
        stored = hash_password("pw", iterations=1234)
        self.assertEqual(parse_hash(stored).iterations, 1234)
        self.assertTrue(verify_password(stored, "pw"))

    def test_is_scram_salted_password(self) -> None:
        """The stored hash is SCRAM-SHA-256's SaltedPassword = Hi(password, salt, i)."""
        h = parse_hash(hash_password("pencil", iterations=4096))
        self.assertEqual(h.salted, hashlib.pbkdf2_hmac("sha256", b"pencil", h.salt, 4096))
        self.assertNotIn(h.salted.hex(), repr(h))
        self.assertNotIn(base64.b64encode(h.salted).decode(), repr(h))

    def test_corrupt_hash_is_false(self) -> None:
        """A damaged stored hash refuses the login rather than raising."""
        good = hash_password("pw", 1000)
        for stored in (
            "",
            "pw",
            good.replace("pbkdf2-sha256", "md5"),
            good.replace("$1000$", "$0$"),
            good.replace("$1000$", "$-5$"),
            good[:-8],
            good + "$x",
        ):
            self.assertFalse(verify_password(stored, "pw"), stored)
            self.assertRaises(ValueError, parse_hash, stored)

    def test_dummy_verify(self) -> None:
        self.assertFalse(dummy_verify("anything"))

    def test_dummy_costs_like_a_real_check(self) -> None:
        """An unknown user costs what a wrong password costs: one PBKDF2 at the same work factor
        (counted, not timed: wall-clock comparisons flake on a loaded machine)."""
        calls: list[int] = []
        real_pbkdf2 = passwords._pbkdf2

        def counting(password: str, salt: bytes, iterations: int) -> bytes:
            calls.append(iterations)
            return real_pbkdf2(password, salt, iterations)

        stored = hash_password("right")
        self.patch(passwords, "_pbkdf2", counting)
        self.assertFalse(verify_password(stored, "wrong"))
        self.assertFalse(dummy_verify("wrong"))
        self.assertEqual(calls, [DEFAULT_ITERATIONS, DEFAULT_ITERATIONS])

    @settings(max_examples=20, deadline=None)
    @given(st.text(), st.text())
    def test_only_same_password_verifies(self, a: str, b: str) -> None:
        stored = hash_password(a, iterations=10)
        self.assertEqual(verify_password(stored, b), a == b)


class ScramKeyTests(TestCase):
    def test_rfc7677_keys(self) -> None:
        """RFC 7677 §3 (user/pencil): the stored verifier checks the example's proof."""
        salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
        keys = scram_keys_from_salted(hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 4096), salt, 4096)
        client_key = bytes(
            a ^ b
            for a, b in zip(
                base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="),
                hmac.digest(keys.stored_key, RFC7677_AUTH_MESSAGE, "sha256"),
                strict=True,
            )
        )
        self.assertEqual(hashlib.sha256(client_key).digest(), keys.stored_key)
        self.assertEqual(
            base64.b64encode(hmac.digest(keys.server_key, RFC7677_AUTH_MESSAGE, "sha256")),
            b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        )

    def test_encode_parse_round_trip(self) -> None:
        keys = scram_keys("pencil", iterations=4096)
        stored = keys.encode()
        self.assertRegex(
            stored, r"^SCRAM-SHA-256\$4096:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]{44}:[A-Za-z0-9+/=]{44}$"
        )
        self.assertEqual(parse_scram(stored), keys)
        self.assertNotIn(base64.b64encode(keys.stored_key).decode(), repr(keys))
        self.assertNotEqual(scram_keys("pencil", iterations=4096).salt, keys.salt)

    def test_sasl_prepared(self) -> None:
        """Keys are made from the SASLprep'd password, as RFC 5802 clients derive them."""
        keys = scram_keys("I\u00adX", iterations=4096)
        salted = hashlib.pbkdf2_hmac("sha256", b"IX", keys.salt, 4096)
        self.assertEqual(scram_keys_from_salted(salted, keys.salt, 4096), keys)

    def test_parse_errors(self) -> None:
        good = scram_keys("pencil", iterations=4096).encode()
        for bad in [
            "",
            good.replace("SCRAM-SHA-256", "SCRAM-SHA-1"),
            good.replace("$4096:", "$0:"),
            good.replace("$4096:", "$x:"),
            good.rsplit(":", 1)[0],
            good[:-4] + "!!!=",
            good.rsplit(":", 1)[0] + ":AAAA",
            "SCRAM-SHA-256$4096:$" + good.split("$")[2],
        ]:
            self.assertRaises(ValueError, parse_scram, bad)

    def test_fake_salt(self) -> None:
        """Stable per name and key, different across names and keys, as long as a real salt."""
        other = StoreKey(bytes(KEY_SIZE))
        self.assertEqual(_FIXED_KEY.fake_salt("ghost"), _FIXED_KEY.fake_salt("ghost"))
        self.assertNotEqual(_FIXED_KEY.fake_salt("ghost"), _FIXED_KEY.fake_salt("ghost2"))
        self.assertNotEqual(_FIXED_KEY.fake_salt("ghost"), other.fake_salt("ghost"))
        self.assertEqual(len(_FIXED_KEY.fake_salt("ghost")), len(scram_keys("x", iterations=1).salt))


class SASLprepTests(TestCase):
    def test_rfc4013_examples(self) -> None:
        """RFC 4013 §3's table, plus the space mapping."""
        for text, expected in [
            ("I\u00adX", "IX"),
            ("user", "user"),
            ("USER", "USER"),
            ("\u00aa", "a"),
            ("\u2168", "IX"),
            ("a\u00a0b", "a b"),
        ]:
            self.assertEqual(saslprep(text), expected, text)
        for text in ["\u0007", "\u0627\u0031", "a\u0627", "\ufffe", "\U000e0001"]:
            self.assertRaises(ValueError, saslprep, text)
        self.assertEqual(saslprep("\u0627\u0031\u0628"), "\u0627\u0031\u0628")

    @given(st.text(max_size=40))
    def test_never_crashes(self, text: str) -> None:
        try:
            result = saslprep(text)
        except ValueError:
            return
        self.assertEqual(saslprep(result), result)


RFC7677_AUTH_MESSAGE = (
    b"n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
)
