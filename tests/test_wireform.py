"""kms.wireform: the wire form of a stored message and where its header ends."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kms.wireform import body_start, header_section, wire_form


class WireFormTests(TestCase):
    def test_examples(self) -> None:
        cases = {
            b"": b"",
            b"a\nb\n": b"a\r\nb\r\n",
            b"a\r\nb\n": b"a\r\nb\r\n",
            b"a\rb\n": b"a\rb\r\n",  # a lone CR is left alone
            b"\n\n": b"\r\n\r\n",
            b"a\r\r\n": b"a\r\r\n",
        }
        for raw, wire in cases.items():
            self.assertEqual(wire_form(raw), wire, raw)

    def test_wire_form_comes_back_as_is(self) -> None:
        """No copy and no regular expression for a message APPEND already sent with CRLF."""
        wire = b"A: 1\r\n\r\nbody\r\rx\r\n"
        self.assertIs(wire_form(wire), wire)

    @given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a"]), max_size=30).map(b"".join))
    def test_same_as_replacing_each_bare_lf(self, raw: bytes) -> None:
        self.assertEqual(wire_form(raw), re.sub(rb"(?<!\r)\n", b"\r\n", raw))

    @given(st.binary(max_size=200))
    def test_idempotent_and_no_bare_lf(self, raw: bytes) -> None:
        wire = wire_form(raw)
        self.assertEqual(wire_form(wire), wire)
        self.assertNotRegex(wire, rb"(?<!\r)\n")


class HeaderSectionTests(TestCase):
    def test_examples(self) -> None:
        cases = [
            (b"", b""),
            (b"\r\n", b"\r\n"),
            (b"\r\nbody", b"\r\n"),
            (b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\n", b"A: 1\r\nB: 2\r\n\r\n"),
            (b"Subject: no body", b"Subject: no body"),
            (b"A: 1\r\n", b"A: 1\r\n"),
            (b"Subject: bare LF\n\nbody\n", b"Subject: bare LF\n\n"),
            (b"Subject: x\r\n\r\n\r\nbody", b"Subject: x\r\n\r\n"),
        ]
        for message, header in cases:
            with self.subTest(message=message):
                self.assertEqual(header_section(message), header)
                self.assertEqual(body_start(message), len(header))

    def test_entity_inside_a_message(self) -> None:
        message = b"X: 1\r\n\r\n--b\r\nA: 2\r\n\r\npart\r\n--b--"
        start = message.index(b"A: 2")
        self.assertEqual(body_start(message, start), message.index(b"part"))
        self.assertEqual(body_start(message, start, start + 4), start + 4)  # no blank line inside

    @given(st.binary(max_size=200))
    def test_wire_header_ends_at_the_first_blank_line(self, raw: bytes) -> None:
        wire = wire_form(raw)
        header = header_section(wire)
        self.assertTrue(wire.startswith(header))
        blank = wire.find(b"\r\n\r\n")
        if wire.startswith(b"\r\n"):
            self.assertEqual(header, b"\r\n")
        elif blank < 0:
            self.assertEqual(header, wire)
        else:
            self.assertEqual(header, wire[: blank + 4])
