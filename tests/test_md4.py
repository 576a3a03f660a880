"""Tests for kms.auth.md4: the RFC 1320 test suite, padding boundaries, and the NT hash."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from kms.auth.md4 import md4, nt_hash


class MD4Tests(TestCase):
    def test_rfc1320_suite(self) -> None:
        """RFC 1320 appendix A.5, every line."""
        suite = {
            b"": "31d6cfe0d16ae931b73c59d7e0c089c0",
            b"a": "bde52cb31de33e46245e05fbdbd6fb24",
            b"abc": "a448017aaf21d8525fc10ae87aa6729d",
            b"message digest": "d9130a8164549fe818874806e1c7014b",
            b"abcdefghijklmnopqrstuvwxyz": "d79e1c308aa5bbcdeea8ed63df412da9",
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789": (
                "043f8582f241db351ce627e153e7f0e4"
            ),
            b"1234567890" * 8: "e33b4ddc9c38f2199c3e7b164fcc0536",
        }
        for data, digest in suite.items():
            with self.subTest(data=data):
                self.assertEqual(md4(data).hex(), digest)

    def test_padding_boundaries(self) -> None:
        """Lengths around the 56-byte padding limit and the block size (digests from OpenSSL's legacy MD4)."""
        cases = {
            55: "c889c81dd86c4d2e025778944ea02881",
            56: "d5f9a9e9257077a5f08b0b92f348b0ad",
            63: "7ea3da77432d44c323671097d1348fc8",
            64: "52f5076fabd22680234a3fa9f9dc5732",
            65: "330e377bf231f3cacfecc2c182fe7e5b",
            119: "e65dd227ccef97fa1d34d70189120f76",
            120: "b03ddbd470b47c013e0c7ab2ddd763db",
            1000: "5f1bf26a8067c9159b91f1440f7c9e8a",
        }
        for length, digest in cases.items():
            with self.subTest(length=length):
                self.assertEqual(md4(b"a" * length).hex(), digest)


class NTHashTests(TestCase):
    def test_ms_nlmp_ntowfv1(self) -> None:
        """MS-NLMP §4.2.2.1.2: NTOWFv1("Password")."""
        self.assertEqual(nt_hash("Password").hex(), "a4f49c406510bdcab6824ee7c30fd852")

    def test_empty_and_non_ascii(self) -> None:
        """The empty password hashes the empty string; non-ASCII passwords go through UTF-16LE."""
        self.assertEqual(nt_hash(""), md4(b""))
        self.assertEqual(nt_hash("Pässwörd€"), md4("Pässwörd€".encode("utf-16-le")))
        self.assertEqual(nt_hash("😀"), md4(b"\x3d\xd8\x00\xde"))
