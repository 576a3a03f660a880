"""Tests for kms.imap.sections: BODY[section] on nested and broken MIME, header fields, labels."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kms.imap.sections import (
    MAX_DEPTH,
    MAX_PARTS,
    Entity,
    Section,
    fetch_section,
    fields,
    from_headers,
    header_fields,
    mime_tree,
    partial,
    section_label,
)


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


# A mixed message: an alternative, a forwarded multipart message, an attachment.
NESTED = crlf(
    """From: Ann <ann@example.com>
Subject: nested
Content-Type: multipart/mixed; boundary="outer"

preamble
--outer
Content-Type: multipart/alternative; boundary=alt

--alt
Content-Type: text/plain

plain text
--alt
Content-Type: text/html

<p>html</p>
--alt--

--outer
Content-Type: message/rfc822
Content-Description: forwarded

From: Bob <bob@example.com>
Subject: inner
Content-Type: multipart/mixed; boundary=in

--in
Content-Type: text/plain

inner text
--in
Content-Type: image/png
Content-Transfer-Encoding: base64

iVBORw0KGgo=
--in--
--outer
Content-Type: application/pdf; name=a.pdf

%PDF
--outer--
epilogue
"""
)

INNER_MESSAGE = crlf(
    """From: Bob <bob@example.com>
Subject: inner
Content-Type: multipart/mixed; boundary=in

--in
Content-Type: text/plain

inner text
--in
Content-Type: image/png
Content-Transfer-Encoding: base64

iVBORw0KGgo=
--in--"""
)


class NestedSectionTests(TestCase):
    def test_table(self) -> None:
        """Each section of the nested message, written out by hand from RFC 3501 §6.4.5."""
        cases = {
            Section(): NESTED,
            Section((), "HEADER"): crlf(
                "From: Ann <ann@example.com>\nSubject: nested\n"
                'Content-Type: multipart/mixed; boundary="outer"\n\n'
            ),
            Section((), "TEXT"): NESTED[NESTED.index(b"preamble") :],
            Section((1,)): crlf(
                "--alt\nContent-Type: text/plain\n\nplain text\n--alt\nContent-Type: text/html\n\n"
                "<p>html</p>\n--alt--\n"
            ),
            Section((1,), "MIME"): crlf("Content-Type: multipart/alternative; boundary=alt\n\n"),
            Section((1, 1)): b"plain text",
            Section((1, 1), "MIME"): crlf("Content-Type: text/plain\n\n"),
            Section((1, 2)): b"<p>html</p>",
            Section((2,)): INNER_MESSAGE,
            Section((2,), "MIME"): crlf("Content-Type: message/rfc822\nContent-Description: forwarded\n\n"),
            Section((2,), "HEADER"): INNER_MESSAGE[: INNER_MESSAGE.index(b"--in")],
            Section((2,), "TEXT"): INNER_MESSAGE[INNER_MESSAGE.index(b"--in") :],
            Section((2,), "HEADER.FIELDS", ("subject",)): b"Subject: inner\r\n\r\n",
            Section((2,), "HEADER.FIELDS.NOT", ("From", "Content-Type")): b"Subject: inner\r\n\r\n",
            Section((2, 1)): b"inner text",
            Section((2, 2)): b"iVBORw0KGgo=",
            Section((2, 2), "MIME"): crlf("Content-Type: image/png\nContent-Transfer-Encoding: base64\n\n"),
            Section((3,)): b"%PDF",
            # Nothing there: a 4th part, parts of leaves, HEADER/TEXT of parts that are not messages.
            Section((4,)): b"",
            Section((0,)): b"",
            Section((1, 3)): b"",
            Section((3, 1)): b"",
            Section((1, 1, 1)): b"",
            Section((2, 1, 1)): b"",
            Section((2, 3)): b"",
            Section((1,), "HEADER"): b"",
            Section((3,), "TEXT"): b"",
            Section((1, 1), "HEADER.FIELDS", ("Content-Type",)): b"",
        }
        for section, expected in cases.items():
            with self.subTest(section=section):
                self.assertEqual(fetch_section(NESTED, section), expected)

    def test_tree_offsets(self) -> None:
        """The tree names the same bytes as the sections (BODYSTRUCTURE is built from it)."""
        root = mime_tree(NESTED)
        self.assertEqual((root.type, root.subtype), ("multipart", "mixed"))
        self.assertEqual(
            [(c.type, c.subtype) for c in root.children],
            [
                ("multipart", "alternative"),
                ("message", "rfc822"),
                ("application", "pdf"),
            ],
        )
        self.assertEqual(root.param("BOUNDARY"), "outer")
        inner = root.children[1].children[0]
        self.assertEqual(NESTED[inner.start : inner.end], INNER_MESSAGE)
        self.assertEqual(root.children[0].children[1].params, ())


class SinglePartTests(TestCase):
    def test_non_multipart_message_has_only_part_one(self) -> None:
        message = crlf("Subject: hi\n\nbody\n")
        self.assertEqual(fetch_section(message, Section((1,))), crlf("body\n"))
        self.assertEqual(fetch_section(message, Section((1,), "MIME")), crlf("Subject: hi\n\n"))
        self.assertEqual(fetch_section(message, Section((2,))), b"")
        self.assertEqual(fetch_section(message, Section((1, 1))), b"")
        self.assertEqual(fetch_section(message, Section((1,), "TEXT")), b"")

    def test_message_rfc822_around_a_single_part(self) -> None:
        """2.1 of a forwarded plain message is that message's body (RFC 3501 §6.4.5 example)."""
        message = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n--b\n\nfirst\n--b\nContent-Type: message/rfc822\n\n"
            "Subject: old\n\nold body\n--b--\n"
        )
        self.assertEqual(fetch_section(message, Section((2,))), crlf("Subject: old\n\nold body"))
        self.assertEqual(fetch_section(message, Section((2, 1))), b"old body")
        self.assertEqual(fetch_section(message, Section((2, 1), "MIME")), crlf("Subject: old\n\n"))
        self.assertEqual(fetch_section(message, Section((2, 2))), b"")
        self.assertEqual(fetch_section(message, Section((2,), "HEADER")), crlf("Subject: old\n\n"))

    def test_top_level_message_rfc822(self) -> None:
        message = crlf("Content-Type: message/rfc822\n\nSubject: in\n\nx")
        self.assertEqual(fetch_section(message, Section((1,))), crlf("Subject: in\n\nx"))
        self.assertEqual(fetch_section(message, Section((1,), "HEADER")), crlf("Subject: in\n\n"))
        self.assertEqual(fetch_section(message, Section((1, 1))), b"x")

    def test_empty_and_headerless_messages(self) -> None:
        cases = [
            (b"", b"", b""),
            (b"\r\n", b"\r\n", b""),
            (b"\r\nbody", b"\r\n", b"body"),
            (b"Subject: no body", b"Subject: no body", b""),
            (b"Subject: x\r\n", b"Subject: x\r\n", b""),
            (b"Subject: bare LF\n\nbody\n", b"Subject: bare LF\n\n", b"body\n"),
            (b"Subject: x\r\n\r\n\r\nbody", b"Subject: x\r\n\r\n", b"\r\nbody"),
        ]
        for message, header, text in cases:
            with self.subTest(message=message):
                self.assertEqual(fetch_section(message, Section((), "HEADER")), header)
                self.assertEqual(fetch_section(message, Section((), "TEXT")), text)
                self.assertEqual(fetch_section(message, Section((1,))), text)


class BrokenMimeTests(TestCase):
    def structure(self, message: bytes) -> list[object]:
        def shape(entity: Entity) -> list[object]:
            if entity.is_multipart:
                return [shape(child) for child in entity.children]
            return [f"{entity.type}/{entity.subtype}".lower(), message[entity.body_start : entity.end]]

        return shape(mime_tree(message))

    def test_table(self) -> None:
        """Each kind of damage has one defined reading; nothing raises."""
        cases = {
            "no boundary parameter": (
                "Content-Type: multipart/mixed\n\n--x\n\na\n--x--\n",
                ["text/plain", crlf("--x\n\na\n--x--\n")],
            ),
            "boundary never occurs": (
                "Content-Type: multipart/mixed; boundary=nothere\n\n--x\n\na\n",
                ["text/plain", crlf("--x\n\na\n")],
            ),
            "empty boundary": (
                'Content-Type: multipart/mixed; boundary=""\n\n--\n\na\n',
                ["text/plain", crlf("--\n\na\n")],
            ),
            "only a close delimiter": (
                "Content-Type: multipart/mixed; boundary=x\n\n--x--\n",
                ["text/plain", crlf("--x--\n")],
            ),
            "no close delimiter": (
                "Content-Type: multipart/mixed; boundary=x\n\n--x\n\na\n--x\n\nb\n",
                [["text/plain", b"a"], ["text/plain", crlf("b\n")]],
            ),
            "delimiter not at a line start, longer boundary, padding": (
                "Content-Type: multipart/mixed; boundary=x\n\n--x \t\n\na --x\n--xy\n--x--junk\n"
                "--x--  \nepilogue\n--x\n",
                [["text/plain", crlf("a --x\n--xy\n--x--junk")]],
            ),
            "empty parts": (
                "Content-Type: multipart/mixed; boundary=x\n\n--x\n--x\n\n--x--",
                [["text/plain", b""], ["text/plain", b""]],
            ),
            "first delimiter at the body start": (
                "Content-Type: multipart/mixed; boundary=x\n\n--x\n\na\n--x--",
                [["text/plain", b"a"]],
            ),
            "type without subtype": ("Content-Type: text\n\nx", ["text/plain", b"x"]),
            "garbage type": ("Content-Type: ;;; =\n\nx", ["text/plain", b"x"]),
            "multipart/digest parts default to message/rfc822": (
                "Content-Type: multipart/digest; boundary=d\n\n--d\n\nSubject: a\n\nA\n--d--",
                [["message/rfc822", crlf("Subject: a\n\nA")]],
            ),
            "nested boundary that starts with the outer one": (
                "Content-Type: multipart/mixed; boundary=a\n\n--a\n"
                "Content-Type: multipart/mixed; boundary=ab\n\n--ab\n\ninner\n--ab--\n--a--",
                [[["text/plain", b"inner"]]],
            ),
        }
        for name, (text, expected) in cases.items():
            with self.subTest(name=name):
                self.assertEqual(self.structure(crlf(text)), expected)

    def test_bare_line_feeds_and_carriage_returns(self) -> None:
        message = (
            b"Content-Type: multipart/mixed; boundary=x\n\n--x\n\na\n--x\rContent-Type: text/html\n\nb\n--x--"
        )
        self.assertEqual(self.structure(message), [["text/plain", b"a"], ["text/html", b"b"]])

    def test_deep_nesting_stops_at_max_depth(self) -> None:
        depth = MAX_DEPTH + 20
        head = "".join(f"Content-Type: multipart/mixed; boundary=b{i}\n\n--b{i}\n" for i in range(depth))
        tail = "".join(f"\n--b{i}--" for i in reversed(range(depth)))
        message = crlf(head + "\nleaf" + tail)
        entity, levels = mime_tree(message), 0
        while entity.children:
            entity, levels = entity.children[0], levels + 1
        self.assertEqual(levels, MAX_DEPTH)
        self.assertEqual((entity.type, entity.subtype), ("TEXT", "PLAIN"))
        self.assertEqual(
            fetch_section(message, Section((1,) * MAX_DEPTH, "MIME"))[:25], b"Content-Type: multipart/m"
        )

    def test_part_count_is_bounded(self) -> None:
        message = crlf(
            "Content-Type: multipart/mixed; boundary=x\n\n" + "--x\n\np\n" * (MAX_PARTS + 50) + "--x--\n"
        )
        root = mime_tree(message)
        self.assertEqual(len(root.children), MAX_PARTS - 1)
        last = root.children[-1]
        self.assertEqual(message[last.body_start :].count(b"--x"), 52)  # 51 delimiters and the close


class HeaderFieldsTests(TestCase):
    HEADER = (
        b"Received: from a\r\n\tby b\r\n"
        b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
        b"From: J\xc3\xb6rg <j@example.com>\r\n"
        b"X-Latin: caf\xe9\r\n"
        b"from-x: not from\r\n"
        b"Fromage: no\r\n"
        b"Date : Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"junk line without colon\r\n"
        b"SUBJECT: second\r\n"
        b"  continued\r\n"
        b"\r\n"
    )

    def test_table(self) -> None:
        cases = [
            (
                ("Subject",),
                False,
                b"Subject: =?utf-8?q?caf=C3=A9?=\r\nSUBJECT: second\r\n  continued\r\n\r\n",
            ),
            (
                ("FROM", "date"),
                False,
                b"From: J\xc3\xb6rg <j@example.com>\r\nDate : Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n",
            ),
            (("x-latin",), False, b"X-Latin: caf\xe9\r\n\r\n"),
            (("received",), False, b"Received: from a\r\n\tby b\r\n\r\n"),
            (("Cc",), False, b"\r\n"),
            (("bad name", "(", "é"), False, b"\r\n"),
            (
                ("subject", "received", "x-latin", "from-x", "fromage", "date"),
                True,
                b"From: J\xc3\xb6rg <j@example.com>\r\n\r\n",
            ),
            (("bad name",), True, self.HEADER.replace(b"junk line without colon\r\n", b"")),
        ]
        for names, negate, expected in cases:
            with self.subTest(names=names, negate=negate):
                self.assertEqual(header_fields(self.HEADER, names, negate), expected)

    def test_header_without_final_line_break(self) -> None:
        self.assertEqual(header_fields(b"A: 1\r\nB: 2", ("b",)), b"B: 2\r\n\r\n")
        self.assertEqual(header_fields(b"", ("b",)), b"\r\n")

    def test_fetch_section_ignores_the_body(self) -> None:
        message = b"Subject: a\r\n\r\nSubject: in the body\r\n"
        self.assertEqual(
            fetch_section(message, Section((), "HEADER.FIELDS", ("subject",))), b"Subject: a\r\n\r\n"
        )

    def test_from_headers(self) -> None:
        """Header-only sections of the top message are answered without the message."""
        self.assertEqual(from_headers(self.HEADER, Section((), "HEADER")), self.HEADER)
        self.assertEqual(from_headers(self.HEADER, Section((), "HEADER.FIELDS", ("cc",))), b"\r\n")
        without_received = from_headers(self.HEADER, Section((), "HEADER.FIELDS.NOT", ("received",)))
        self.assertEqual(
            without_received,
            self.HEADER[self.HEADER.index(b"Subject") :].replace(b"junk line without colon\r\n", b""),
        )
        for section in (Section(), Section((), "TEXT"), Section((1,), "HEADER"), Section((1,))):
            self.assertIsNone(from_headers(self.HEADER, section))

    def test_fields(self) -> None:
        self.assertEqual(
            [name for name, _ in fields(self.HEADER)],
            [b"received", b"subject", b"from", b"x-latin", b"from-x", b"fromage", b"date", b"subject"],
        )
        self.assertEqual(dict(fields(self.HEADER))[b"received"], b" from a\r\n\tby b\r")

    @given(
        st.lists(
            st.tuples(st.sampled_from(["A", "b", "Cc", "cc", "X-Y"]), st.binary(max_size=10)), max_size=8
        ),
        st.lists(st.sampled_from(["a", "B", "CC", "x-y", "z"]), min_size=1, max_size=3),
    )
    def test_fields_and_not_fields_partition_the_header(
        self, items: list[tuple[str, bytes]], names: list[str]
    ) -> None:
        """HEADER.FIELDS and HEADER.FIELDS.NOT of one list split the fields between them, in order."""
        items = [(name, value.replace(b"\n", b"")) for name, value in items]
        header = b"".join(name.encode() + b": " + value + b"\r\n" for name, value in items) + b"\r\n"
        chosen = header_fields(header, names)
        others = header_fields(header, names, negate=True)
        self.assertEqual(len(chosen) + len(others), len(header) + 2)
        wanted = {name.lower().encode() for name in names}
        self.assertEqual([f for f in fields(header) if f[0] in wanted], list(fields(chosen)))
        self.assertEqual([f for f in fields(header) if f[0] not in wanted], list(fields(others)))


class SectionTests(TestCase):
    def test_labels(self) -> None:
        """Response labels; a partial is labelled with its origin only (Twisted bug I1)."""
        cases = [
            (Section(), None, "BODY[]"),
            (Section(), 0, "BODY[]<0>"),
            (Section((), "HEADER"), None, "BODY[HEADER]"),
            (Section((1, 2), "MIME"), 100, "BODY[1.2.MIME]<100>"),
            (Section((3,)), None, "BODY[3]"),
            (Section((), "HEADER.FIELDS", ("Subject", "FROM")), None, "BODY[HEADER.FIELDS (Subject FROM)]"),
            (
                Section((2,), "HEADER.FIELDS.NOT", ("a]b", 'q"')),
                5,
                'BODY[2.HEADER.FIELDS.NOT ("a]b" "q\\"")]<5>',
            ),
        ]
        for section, origin, label in cases:
            with self.subTest(label=label):
                self.assertEqual(section_label(section, origin), label)

    def test_partial(self) -> None:
        cases = [
            ((0, 10), b"0123456789"),
            ((2, 3), b"234"),
            ((8, 10), b"89"),
            ((10, 1), b""),
            ((99, 5), b""),
            ((0, 0), b""),
        ]
        for (origin, length), expected in cases:
            self.assertEqual(partial(b"0123456789", origin, length), expected)

    def test_invalid_sections(self) -> None:
        for args in [
            ((), "MIME"),
            ((), "BODY"),
            ((), "HEADER.FIELDS"),
            ((), "HEADER", ("a",)),
            ((), "header"),
        ]:
            with self.subTest(args=args):
                self.assertRaises(ValueError, Section, *args)


MIME_BYTES = st.lists(
    st.sampled_from(
        [
            b"Content-Type: multipart/mixed; boundary=a\r\n",
            b"Content-Type: message/rfc822\r\n",
            b"Content-Type: multipart/digest; boundary=b\r\n",
            b"Content-Type: text/plain\r\n",
            b"Subject: x\r\n",
            b"\r\n",
            b"\n",
            b"--a\r\n",
            b"--a--\r\n",
            b"--b\r\n",
            b"--b--",
            b"text\r\n",
            b"\xff\x00\r",
            b" folded\r\n",
        ]
    ),
    max_size=40,
).map(b"".join)


class PropertyTests(TestCase):
    @given(MIME_BYTES)
    def test_tree_is_well_formed(self, message: bytes) -> None:
        """Every entity lies inside its parent's body, and HEADER + TEXT is always the whole."""

        def check(entity: Entity, low: int, high: int) -> None:
            self.assertTrue(low <= entity.start <= entity.body_start <= entity.end <= high)
            for child in entity.children:
                check(child, entity.body_start, entity.end)

        check(mime_tree(message), 0, len(message))
        header = fetch_section(message, Section((), "HEADER"))
        self.assertEqual(header + fetch_section(message, Section((), "TEXT")), message)

    @given(MIME_BYTES, st.lists(st.integers(0, 4), min_size=1, max_size=4))
    def test_every_part_is_a_slice(self, message: bytes, part: list[int]) -> None:
        for text in ("", "MIME"):
            data = fetch_section(message, Section(tuple(part), text))
            self.assertIn(data, message)
