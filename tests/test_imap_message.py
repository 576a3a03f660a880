"""Tests for kms.imap.message: ENVELOPE / BODY / BODYSTRUCTURE against hand-written RFC 3501 strings."""

from __future__ import annotations

import json
import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kms.imap import message
from kms.imap.message import addresses, analyze, envelope, render


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


def wire(meta: dict[str, object], item: str) -> bytes:
    value = meta[item]
    assert isinstance(value, str)
    return value.encode("utf-8")


# RFC 3501 §6.4.5's example message (its body shortened).
RFC_EXAMPLE = crlf(
    """Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)
From: Terry Gray <gray@cac.washington.edu>
Subject: IMAP4rev1 WG mtg summary and minutes
To: imap@cac.washington.edu
cc: minutes@CNRI.Reston.VA.US, John Klensin <KLENSIN@MIT.EDU>
Message-Id: <B27397-0100000@cac.washington.edu>
MIME-Version: 1.0
Content-Type: TEXT/PLAIN; CHARSET=US-ASCII

Hello,
world
"""
)

ALTERNATIVE_WITH_ATTACHMENT = crlf(
    """From: "Doe, Jane" <jane@example.com>
To: Team: ann@example.com, Bob <bob@example.com>;, carol@example.com
Subject: Report
Content-Type: multipart/mixed; boundary="==outer=="

This is a multi-part message in MIME format.
--==outer==
Content-Type: multipart/alternative; boundary=inner

--inner
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Hi =E2=9C=93
--inner
Content-Type: text/html; charset=utf-8

<p>Hi</p>
<p>2</p>
--inner--

--==outer==
Content-Type: application/pdf; name="report.pdf"
Content-Transfer-Encoding: base64
Content-Disposition: attachment; filename="report.pdf"; size=6
Content-ID: <part3@example.com>
Content-Description: The report
Content-Language: en
Content-Location: http://example.com/report.pdf
Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==

JVBERi0x
--==outer==--
"""
)

FORWARDED = crlf(
    """From: a@example.com
Subject: Fwd: hello
Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain

see below
--b
Content-Type: message/rfc822
Content-Disposition: inline
Content-Language: en, de

From: Old <old@example.org>
Date: Mon, 1 Jan 2024 10:00:00 +0000
Subject: hello
Message-ID: <1@example.org>

old body
--b--
"""
)

NIL_ENVELOPE = b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"


class AnalyzeTests(TestCase):
    def test_rfc_example(self) -> None:
        meta = analyze(RFC_EXAMPLE)
        self.assertEqual(
            wire(meta, "ENVELOPE"),
            b'("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" "IMAP4rev1 WG mtg summary and minutes" '
            b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
            b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
            b'(("Terry Gray" NIL "gray" "cac.washington.edu")) ((NIL NIL "imap" "cac.washington.edu")) '
            b'((NIL NIL "minutes" "CNRI.Reston.VA.US")("John Klensin" NIL "KLENSIN" "MIT.EDU")) NIL NIL '
            b'"<B27397-0100000@cac.washington.edu>")',
        )
        self.assertEqual(wire(meta, "BODY"), b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 15 2)')
        self.assertEqual(
            wire(meta, "BODYSTRUCTURE"),
            b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 15 2 NIL NIL NIL NIL)',
        )

    def test_alternative_with_attachment(self) -> None:
        meta = analyze(ALTERNATIVE_WITH_ATTACHMENT)
        self.assertEqual(
            wire(meta, "ENVELOPE"),
            b'(NIL "Report" (("Doe, Jane" NIL "jane" "example.com")) '
            b'(("Doe, Jane" NIL "jane" "example.com")) '
            b'(("Doe, Jane" NIL "jane" "example.com")) ((NIL NIL "Team" NIL)(NIL NIL "ann" "example.com")'
            b'("Bob" NIL "bob" "example.com")(NIL NIL NIL NIL)'
            b'(NIL NIL "carol" "example.com")) NIL NIL NIL NIL)',
        )
        self.assertEqual(
            wire(meta, "BODYSTRUCTURE"),
            b'((("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 12 1 NIL NIL NIL NIL)'
            b'("text" "html" ("charset" "utf-8") NIL NIL "7BIT" 19 2 NIL NIL NIL NIL) "alternative" '
            b'("boundary" "inner") NIL NIL NIL)'
            b'("application" "pdf" ("name" "report.pdf") "<part3@example.com>" "The report" "base64" 8 '
            b'"Q2hlY2sgSW50ZWdyaXR5IQ==" ("attachment" ("filename" "report.pdf" "size" "6")) "en" '
            b'"http://example.com/report.pdf") "mixed" ("boundary" "==outer==") NIL NIL NIL)',
        )
        self.assertEqual(
            wire(meta, "BODY"),
            b'((("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 12 1)'
            b'("text" "html" ("charset" "utf-8") NIL NIL "7BIT" 19 2) "alternative")'
            b'("application" "pdf" ("name" "report.pdf") "<part3@example.com>" '
            b'"The report" "base64" 8) "mixed")',
        )

    def test_forwarded_message(self) -> None:
        """message/rfc822 carries the inner ENVELOPE, the inner structure and its own line count."""
        meta = analyze(FORWARDED)
        inner_envelope = (
            b'("Mon, 1 Jan 2024 10:00:00 +0000" "hello" (("Old" NIL "old" "example.org")) '
            b'(("Old" NIL "old" "example.org")) '
            b'(("Old" NIL "old" "example.org")) NIL NIL NIL NIL "<1@example.org>")'
        )
        self.assertEqual(
            wire(meta, "BODYSTRUCTURE"),
            b'(("text" "plain" NIL NIL NIL "7BIT" 9 1 NIL NIL NIL NIL)'
            b'("message" "rfc822" NIL NIL NIL "7BIT" 122 '
            + inner_envelope
            + b' ("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" '
            b'8 1 NIL NIL NIL NIL) 6 NIL ("inline" NIL) '
            b'("en" "de") NIL) "mixed" ("boundary" "b") NIL NIL NIL)',
        )
        self.assertEqual(
            wire(meta, "BODY"),
            b'(("text" "plain" NIL NIL NIL "7BIT" 9 1)("message" "rfc822" NIL NIL NIL "7BIT" 122 '
            + inner_envelope
            + b' ("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 8 1) 6) "mixed")',
        )

    def test_empty_message(self) -> None:
        meta = analyze(b"")
        self.assertEqual(wire(meta, "ENVELOPE"), NIL_ENVELOPE)
        self.assertEqual(wire(meta, "BODY"), b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0)')
        self.assertEqual((meta["search"], meta["sent"]), ({}, None))

    def test_missing_and_empty_headers(self) -> None:
        """Sender and Reply-To fall back to From when absent or empty; other empty fields stay empty."""
        meta = analyze(crlf("From: a@b\nSender:\nReply-To:  \nSubject:\nTo: \nIn-Reply-To: <x@y>\n\nbody"))
        self.assertEqual(
            wire(meta, "ENVELOPE"),
            b'(NIL "" ((NIL NIL "a" "b")) ((NIL NIL "a" "b")) ((NIL NIL "a" "b")) NIL NIL NIL "<x@y>" NIL)',
        )
        self.assertEqual(wire(meta, "BODY"), b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 4 1)')

    def test_eight_bit_headers_are_literals(self) -> None:
        """UTF-8 stays UTF-8, other 8-bit bytes are read as Latin-1; both go out as UTF-8 literals."""
        meta = analyze(b"Subject: caf\xc3\xa9\r\nFrom: J\xf6rg <j@example.com>\r\n\r\nx")
        self.assertEqual(
            wire(meta, "ENVELOPE"),
            b'(NIL {5}\r\ncaf\xc3\xa9 (({5}\r\nJ\xc3\xb6rg NIL "j" "example.com")) '
            b'(({5}\r\nJ\xc3\xb6rg NIL "j" "example.com")) (({5}\r\nJ\xc3\xb6rg NIL "j" "example.com")) '
            b"NIL NIL NIL NIL NIL)",
        )

    def test_encoded_words_and_folding(self) -> None:
        """RFC 2047 words are the client's to decode; folding is undone; quotes are escaped."""
        meta = analyze(crlf('Subject: =?utf-8?q?caf=C3=A9?=\n  and "more" \\ stuff\n\n'))
        self.assertEqual(
            wire(meta, "ENVELOPE"),
            b'(NIL "=?utf-8?q?caf=C3=A9?=  and \\"more\\" \\\\ stuff" NIL NIL NIL NIL NIL NIL NIL NIL)',
        )

    def test_broken_mime_falls_back_to_text_plain(self) -> None:
        cases = {
            "no boundary": "Content-Type: multipart/mixed\n\n--x\n\na\n--x--\n",
            "boundary never used": "Content-Type: multipart/mixed; boundary=q\n\n--x\n\na\n--x--\n",
            "garbage type": "Content-Type: multipart\n\n--x\n\na\n--x--\n",
        }
        for name, text in cases.items():
            with self.subTest(name=name):
                self.assertEqual(
                    wire(analyze(crlf(text)), "BODYSTRUCTURE"),
                    b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 17 4 NIL NIL NIL NIL)',
                )

    def test_parameters(self) -> None:
        """Parameters keep their spelling and lose their quoting; broken ones are dropped."""
        message = crlf(
            'Content-Type: Text/Plain; CharSet="utf-8"; format=flowed; name="a \\"b\\"; c"; junk; =x; '
            "filename*0*=utf-8''%C3%A9\nContent-Transfer-Encoding: 8bit\n\nx"
        )
        self.assertEqual(
            wire(analyze(message), "BODY"),
            b'("Text" "Plain" ("CharSet" "utf-8" "format" "flowed" "name" "a \\"b\\"; c" '
            b'"filename*0*" "utf-8\'\'%C3%A9") NIL NIL "8bit" 1 1)',
        )

    def test_search_and_sent(self) -> None:
        meta = analyze(FORWARDED)
        self.assertEqual(meta["search"], {"from": "a@example.com", "subject": "fwd: hello"})
        self.assertIsNone(meta["sent"])
        self.assertEqual(analyze(RFC_EXAMPLE)["sent"], 19960717)

    def test_unexpected_failure_gives_a_plain_part(self) -> None:
        """An internal error on hostile input still indexes the message, as one text part."""

        def broken(data: bytes) -> None:
            raise RecursionError("boom")

        self.patch(message, "mime_tree", broken)
        meta = analyze(crlf("Subject: s\n\nline 1\nline 2"))
        self.assertEqual(wire(meta, "ENVELOPE"), NIL_ENVELOPE)
        self.assertEqual(wire(meta, "BODY"), b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 14 2)')
        self.assertEqual(
            wire(meta, "BODYSTRUCTURE"),
            b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 14 2 NIL NIL NIL NIL)',
        )

    def test_envelope_takes_the_first_of_repeated_fields(self) -> None:
        self.assertEqual(envelope(crlf("Subject: one\nSubject: two\n\n"))[1], "one")


class AddressTests(TestCase):
    def test_table(self) -> None:
        cases: dict[str, object] = {
            "a@b": [[None, None, "a", "b"]],
            "Ann <a@b>": [["Ann", None, "a", "b"]],
            "Ann  Lee   <a@b>": [["Ann Lee", None, "a", "b"]],
            '"Doe, J." <j@x>': [["Doe, J.", None, "j", "x"]],
            '"a \\"q\\" b" <x@y>': [['a "q" b', None, "x", "y"]],
            "j@x (John Doe)": [["John Doe", None, "j", "x"]],
            "John (middle) Doe <j@x>": [["John Doe", None, "j", "x"]],
            "<j@x> (Jo (the) Doe)": [["Jo (the) Doe", None, "j", "x"]],
            "<@r1.example,@r2.example:joe@c.example>": [
                [None, "@r1.example,@r2.example", "joe", "c.example"]
            ],
            "<@host>": [[None, None, "", "host"]],
            "undisclosed-recipients:;": [
                [None, None, "undisclosed-recipients", None],
                [None, None, None, None],
            ],
            "G: a@b, C <c@d>;, e@f": [
                [None, None, "G", None],
                [None, None, "a", "b"],
                ["C", None, "c", "d"],
                [None, None, None, None],
                [None, None, "e", "f"],
            ],
            "G: a@b": [[None, None, "G", None], [None, None, "a", "b"], [None, None, None, None]],
            ": a@b;": [[None, None, "", None], [None, None, "a", "b"], [None, None, None, None]],
            "postmaster": [[None, None, "postmaster", ""]],
            "<postmaster>": [[None, None, "postmaster", ""]],
            "Ann <a@b": [["Ann", None, "a", "b"]],
            "Ann <a@b, Bob <c@d>": [["Ann", None, "a", "b"], ["Bob", None, "c", "d"]],
            '"unterminated <a@b>': [[None, None, "unterminated <a@b>", ""]],
            "a@b@c": [[None, None, "a", "b"]],
            ",,a@b,,": [[None, None, "a", "b"]],
            "Ann <>": [["Ann", None, "", ""]],
            "=?utf-8?q?J=C3=B6rg?= <j@x>": [["=?utf-8?q?J=C3=B6rg?=", None, "j", "x"]],
            "a@[192.0.2.1]": [[None, None, "a", "[192.0.2.1]"]],
            '"quoted local"@x': [[None, None, "quoted local", "x"]],
            "a . b @ x . y": [[None, None, "a.b", "x.y"]],
            "Jörg <j@x>": [["Jörg", None, "j", "x"]],
            "a@b (unterminated comment": [["unterminated comment", None, "a", "b"]],
            "a@b) ]": [[None, None, "a", "b"]],
            "Ann <a@b>, ;": [["Ann", None, "a", "b"]],
            "": None,
            "   ": None,
            "<>": None,
            "(only a comment)": None,
        }
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(addresses(text), expected)

    def test_absent(self) -> None:
        self.assertIsNone(addresses(None))

    @given(st.text(st.sampled_from('ab <>@,;:()"\\[].é '), max_size=30))
    def test_any_text_gives_well_formed_addresses(self, text: str) -> None:
        """Four fields each; only group markers have a NIL host; markers balance."""
        depth = 0
        for name, adl, mailbox, host in addresses(text) or []:
            if host is None:
                self.assertIsNone(name)
                self.assertIsNone(adl)
                depth += 1 if mailbox is not None else -1
                self.assertIn(depth, (0, 1))
            else:
                self.assertIsInstance(mailbox, str)
        self.assertEqual(depth, 0)


class RenderTests(TestCase):
    def test_table(self) -> None:
        cases: list[tuple[object, bytes]] = [
            (None, b"NIL"),
            (0, b"0"),
            (4294967296, b"4294967296"),
            ("", b'""'),
            ('a"b\\c', b'"a\\"b\\\\c"'),
            ("café", b"{5}\r\ncaf\xc3\xa9"),
            ("a\r\nb", b"{4}\r\na\r\nb"),
            ("tab\there", b"{8}\r\ntab\there"),
            ("nul\x00x", b"{4}\r\nnulx"),
            ("x" * 1000, b'"' + b"x" * 1000 + b'"'),
            ("x" * 1001, b"{1001}\r\n" + b"x" * 1001),
            ("\udcff", b"{1}\r\n?"),
            ([], b"()"),
            ([None, "a", 1], b'(NIL "a" 1)'),
            ([[1], [2], "x", [3], [4]], b'((1)(2) "x" (3) (4))'),
            ([None, [["a"]], [["b"], ["c"]]], b'(NIL (("a")) (("b")("c")))'),
            ((1, (2,), ()), b"(1 (2) ())"),
        ]
        for value, expected in cases:
            with self.subTest(value=value):
                self.assertEqual(render(value), expected)

    def test_refuses_other_types(self) -> None:
        for value in (True, 1.5, {"a": 1}, b"x", [False]):
            with self.subTest(value=value):
                self.assertRaises(TypeError, render, value)

    @given(
        st.recursive(
            st.none() | st.integers(0, 2**63) | st.text(),
            lambda children: st.lists(children, max_size=5),
            max_leaves=30,
        )
    )
    def test_round_trip(self, value: object) -> None:
        """What render writes, an IMAP parser reads back as the same structure (NUL aside)."""
        self.assertEqual(parse_imap(render(value)), strip_nul(value))


def strip_nul(value: object) -> object:
    if isinstance(value, list):
        return [strip_nul(item) for item in value]
    if isinstance(value, str):
        return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return value


_IMAP_TOKEN = re.compile(rb' ?(?:(\()|(\))|(NIL)|([0-9]+)|"((?:[^"\\]|\\["\\])*)"|\{([0-9]+)\}\r\n)')


def parse_imap(data: bytes) -> object:
    """A strict reader for render's output: IMAP tokens with optional single spaces between them."""
    stack: list[list[object]] = [[]]
    pos = 0
    while pos < len(data):
        match = _IMAP_TOKEN.match(data, pos)
        assert match is not None, data[pos:]
        pos = match.end()
        if match[1]:
            stack.append([])
        elif match[2]:
            done = stack.pop()
            stack[-1].append(done)
        elif match[3]:
            stack[-1].append(None)
        elif match[4]:
            stack[-1].append(int(match[4]))
        elif match[5] is not None:
            stack[-1].append(re.sub(rb"\\(.)", rb"\1", match[5]).decode("ascii"))
        else:
            size = int(match[6])
            stack[-1].append(data[pos : pos + size].decode("utf-8"))
            pos += size
    assert len(stack) == 1 and len(stack[0]) == 1
    return stack[0][0]


MIME_BYTES = st.lists(
    st.sampled_from(
        [
            b"Content-Type: multipart/mixed; boundary=a\r\n",
            b"Content-Type: message/rfc822\r\n",
            b'Content-Type: text/plain; charset="x\r\n',
            b"Content-Disposition: attachment; filename=\r\n",
            b"Content-Language: ,\r\n",
            b"From: a <b@c>, (x\r\n",
            b"To: g: ;\r\n",
            b"Subject: \xff\xfe\x00\r\n",
            b"\r\n",
            b"--a\r\n",
            b"--a--\r\n",
            b"text\r\n",
            b"\t folded\r\n",
        ]
    ),
    max_size=40,
).map(b"".join)


class PropertyTests(TestCase):
    @given(MIME_BYTES | st.binary(max_size=200))
    def test_analyze_never_fails_and_survives_json(self, data: bytes) -> None:
        meta = analyze(data)
        self.assertEqual(json.loads(json.dumps(meta)), meta)
        for item in ("ENVELOPE", "BODY", "BODYSTRUCTURE"):
            structure = parse_imap(wire(meta, item))
            self.assertIsInstance(structure, list)
        envelope_list = parse_imap(wire(meta, "ENVELOPE"))
        assert isinstance(envelope_list, list)
        self.assertEqual(len(envelope_list), 10)
