"""Tests for kms.imap.mutf7: RFC 3501 §5.1.3 examples, every kind of invalid spelling, round trips."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kms.imap.mutf7 import decode, encode

# Any text but lone surrogates (which are not text).
TEXT = st.text(st.characters(exclude_categories=["Cs"]))


class EncodingTests(TestCase):
    def test_table(self) -> None:
        """Names and their wire forms, both ways (the RFC's own example among them)."""
        cases = {
            "INBOX": "INBOX",
            "": "",
            "&": "&-",
            "a&b&&": "a&-b&-&-",
            "Entwürfe": "Entw&APw-rfe",
            "~peter/mail/台北/日本語": "~peter/mail/&U,BTFw-/&ZeVnLIqe-",
            "😀": "&2D3eAA-",
            "ü&": "&APw-&-",
            "&ü": "&-&APw-",
            "tab\there": "tab&AAk-here",
            "\x7f": "&AH8-",
            "a b ~!": "a b ~!",
        }
        for name, wire in cases.items():
            with self.subTest(name=name):
                self.assertEqual(encode(name), wire)
                self.assertEqual(decode(wire), name)

    def test_invalid_wire_forms(self) -> None:
        """Everything `encode` would not produce is refused, so one folder has one spelling."""
        cases = {
            "&": "unterminated",
            "&U,BTFw": "unterminated",
            "a&AGE": "unterminated",
            "&AGE-": "printable ASCII",  # "a" must stand for itself
            "&ACY-": "printable ASCII",  # "&" must be "&-"
            "&APw-&APw-": "adjacent",  # one shift, not two
            "&APx-": "non-canonical",  # stray low bits
            "&APwA-": "invalid",  # a superfluous character makes an odd octet count
            "&AP-": "invalid",  # an odd number of octets
            "&2D0-": "invalid",  # a lone high surrogate
            "&APw=-": "invalid",  # padding
            "&AP/w-": "invalid",  # "/" instead of ","
            "&&-": "invalid",
            "Entwürfe": "outside printable ASCII",
            "tab\there": "outside printable ASCII",
        }
        for wire, reason in cases.items():
            with self.subTest(wire=wire):
                error = self.assertRaises(ValueError, decode, wire)
                self.assertIn(reason, str(error))

    def test_lone_surrogates_are_not_names(self) -> None:
        self.assertRaises(ValueError, encode, "a\udcff")

    @given(TEXT)
    def test_round_trip(self, name: str) -> None:
        wire = encode(name)
        self.assertTrue(wire.isascii() and wire.isprintable())
        self.assertEqual(decode(wire), name)

    @given(st.text(st.sampled_from("&-AGEPwU,+/Z9a"), max_size=12))
    def test_decode_accepts_only_the_canonical_spelling(self, wire: str) -> None:
        """Whatever decodes, encodes back to exactly the same wire form."""
        try:
            name = decode(wire)
        except ValueError:
            return
        self.assertEqual(encode(name), wire)
