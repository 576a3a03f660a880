"""Tests for kms.imap.search: parsing every key, matching every key, NOT as the exact complement."""

from __future__ import annotations

import calendar

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kms.imap.message import analyze
from kms.imap.parser import STAR, ParseError, parse_sequence_set
from kms.imap.search import (
    And,
    Key,
    Not,
    NumberSet,
    Or,
    SearchContext,
    decode_words,
    matches,
    needs_body,
    needs_details,
    parse_search,
)
from kms.store.interfaces import MessageInfo, message_info
from kms.wireform import header_section


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return float(calendar.timegm((year, month, day, hour, minute, second)))


MESSAGES = {
    10: crlf(
        """From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@example.com>
To: Ann <ann@example.com>
Cc: cc@example.com
Bcc: secret@example.com
Subject: =?iso-8859-1?q?Caf=E9?= menu
Date: Mon, 1 Jan 2024 23:30:00 -0500
X-Spam: YES
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Gr=C3=BC=C3=9Fe aus K=C3=B6ln
"""
    ),
    20: crlf(
        """From: Bob <bob@example.org>
Subject: prices
Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/html; charset=iso-8859-1
Content-Transfer-Encoding: base64

PHA+U3RyYd9lPC9wPg==
--b
Content-Type: application/octet-stream
Content-Transfer-Encoding: base64

c2VjcmV0d29yZA==
--b--
"""
    ),
    30: b"Subject: R\xe9sum\xe9\r\nDate: someday\r\n\r\n",
}
# (flags, size, internal date); sizes are given, not measured, to make LARGER/SMALLER readable.
PROPERTIES = {
    10: (frozenset({"\\Seen", "$Work"}), 100, utc(2024, 1, 2, 4, 30)),
    20: (frozenset({"\\Flagged", "\\Deleted"}), 200, utc(2024, 3, 15, 12)),
    30: (frozenset({"\\Answered", "\\Draft", "\\Seen"}), 300, utc(2023, 12, 31, 23, 59, 59)),
}
NOW = utc(2024, 3, 15, 13)


def infos(analyzed: bool) -> list[MessageInfo]:
    """The three messages as the index has them; without ``analyzed`` their meta is empty (old index)."""
    return [
        message_info(
            uid, size, date, flags, header_section(MESSAGES[uid]), analyze(MESSAGES[uid]) if analyzed else {}
        )
        for uid, (flags, size, date) in PROPERTIES.items()
    ]


def context(with_bodies: bool = True) -> SearchContext:
    body = MESSAGES.get if with_bodies else (lambda uid: None)
    return SearchContext(max_seq=3, max_uid=30, now=NOW, recent={20}, body=body)


def search(tokens: list[object], analyzed: bool = True, with_bodies: bool = True) -> set[int]:
    program = parse_search(tokens)
    ctx = context(with_bodies)
    return {info.uid for seq, info in enumerate(infos(analyzed), 1) if matches(program, info, seq, ctx)}


MATCH_TABLE: list[tuple[list[object], set[int]]] = [
    (["ALL"], {10, 20, 30}),
    (["ANSWERED"], {30}),
    (["UNANSWERED"], {10, 20}),
    (["DELETED"], {20}),
    (["UNDELETED"], {10, 30}),
    (["DRAFT"], {30}),
    (["UNDRAFT"], {10, 20}),
    (["FLAGGED"], {20}),
    (["UNFLAGGED"], {10, 30}),
    (["SEEN"], {10, 30}),
    (["UNSEEN"], {20}),
    (["RECENT"], {20}),
    (["NEW"], {20}),
    (["OLD"], {10, 30}),
    (["KEYWORD", "$Work"], {10}),
    (["KEYWORD", "$work"], {10}),
    (["KEYWORD", "$Other"], set()),
    (["UNKEYWORD", "$WORK"], {20, 30}),
    (["LARGER", "200"], {30}),
    (["LARGER", "99"], {10, 20, 30}),
    (["SMALLER", "200"], {10}),
    (["BEFORE", "1-Jan-2024"], {30}),
    (["ON", "2-Jan-2024"], {10}),  # the UTC day of the internal date
    (["ON", "1-Jan-2024"], set()),
    (["SINCE", "2-Jan-2024"], {10, 20}),
    (["SINCE", "15-mar-2024"], {20}),
    (["SENTON", "1-Jan-2024"], {10}),  # the day written in the Date header
    (["SENTBEFORE", "2-Jan-2024"], {10, 30}),  # 30's Date does not parse: its internal date counts
    (["SENTSINCE", "15-Mar-2024"], {20}),  # 20 has no Date: its internal date counts
    (["SENTSINCE", "02-Jan-2024"], {20}),
    (["FROM", "jörg"], {10}),
    (["FROM", "JOERG@EXAMPLE"], {10}),
    (["FROM", "MÜLLER"], {10}),
    (["FROM", "bob"], {20}),
    (["FROM", ""], {10, 20}),  # only messages that have a From field
    (["TO", "ann"], {10}),
    (["CC", "cc@"], {10}),
    (["BCC", "secret"], {10}),
    (["SUBJECT", "café"], {10}),
    (["SUBJECT", "RÉSUMÉ"], {30}),  # 8-bit Latin-1 header text
    (["SUBJECT", "=?iso"], set()),  # matching is on decoded text
    (["HEADER", "X-Spam", "yes"], {10}),
    (["HEADER", "x-spam", ""], {10}),
    (["HEADER", "Subject", "menu"], {10}),
    (["HEADER", "X-None", ""], set()),
    (["HEADER", "bad name", ""], set()),
    (["BODY", "grüße"], {10}),
    (["BODY", "KÖLN"], {10}),
    (["BODY", "straße"], {20}),  # base64, ISO-8859-1, in HTML
    (["BODY", "secretword"], set()),  # attachments are not text
    (["BODY", "menu"], set()),  # the header is not the body
    (["TEXT", "menu"], {10}),
    (["TEXT", "köln"], {10}),
    (["TEXT", "prices"], {20}),
    (["TEXT", "subject: café"], {10}),
    (["UID", "20"], {20}),
    (["UID", "25:*"], {30}),
    (["UID", "31:*"], {30}),  # "*" is 30, so this is 30:31
    (["UID", "*:15"], {20, 30}),
    (["UID", "1:9,11:19"], set()),
    (["UID", "30,10"], {10, 30}),
    (["2"], {20}),
    (["2:*"], {20, 30}),
    (["*"], {30}),
    (["1,3"], {10, 30}),
    (["5:*"], {30}),
    (["3:1"], {10, 20, 30}),
    (["OLDER", "3600"], {10, 30}),
    (["YOUNGER", "3600"], {20}),
    (["NOT", "SEEN"], {20}),
    (["NOT", "NOT", "SEEN"], {10, 30}),
    (["OR", "ANSWERED", "FLAGGED"], {20, 30}),
    (["OR", "ANSWERED", "OR", "FLAGGED", "KEYWORD", "$Work"], {10, 20, 30}),
    (["SEEN", "UNANSWERED"], {10}),
    ([["SEEN", "UNANSWERED"]], {10}),
    (["OR", ["SEEN", "UNANSWERED"], "DELETED"], {10, 20}),
    (["NOT", ["SEEN", "UNANSWERED"]], {20, 30}),
    (["UID", "1:*", "NOT", "1"], {20, 30}),
    (["FROM", "Jörg"], {10}),
]


class MatchTests(TestCase):
    def test_table(self) -> None:
        for tokens, expected in MATCH_TABLE:
            with self.subTest(tokens=tokens):
                self.assertEqual(search(tokens), expected)

    def test_table_without_analyzer_meta(self) -> None:
        """Messages indexed without (or before) the analyzer's search data match the same way."""
        for tokens, expected in MATCH_TABLE:
            with self.subTest(tokens=tokens):
                self.assertEqual(search(tokens, analyzed=False), expected)

    def test_body_keys_without_bodies_match_nothing(self) -> None:
        """A message the server could not read (expunged meanwhile) matches no BODY/TEXT key."""
        self.assertEqual(search(["BODY", "köln"], with_bodies=False), set())
        self.assertEqual(search(["NOT", "TEXT", "köln"], with_bodies=False), {10, 20, 30})

    def test_bodies_are_decoded_once_per_search(self) -> None:
        reads: list[int] = []

        def body(uid: int) -> bytes | None:
            reads.append(uid)
            return MESSAGES[uid]

        ctx = SearchContext(max_seq=3, max_uid=30, body=body)
        program = parse_search(["BODY", "x", "TEXT", "y", "OR", "BODY", "z", "TEXT", "w"])
        for seq, info in enumerate(infos(True), 1):
            matches(program, info, seq, ctx)
        self.assertEqual(reads, [10, 20, 30])

    def test_needs_body(self) -> None:
        cases: list[tuple[list[object], bool]] = [
            (["ALL"], False),
            (["FROM", "x", "HEADER", "a", "b", "1:*"], False),
            (["BODY", "x"], True),
            (["OR", "SEEN", "TEXT", "x"], True),
            (["NOT", ["SEEN", "BODY", "x"]], True),
        ]
        for tokens, expected in cases:
            with self.subTest(tokens=tokens):
                self.assertEqual(needs_body(parse_search(tokens)), expected)

    def test_needs_details(self) -> None:
        """Header keys and SENT* read the cached header section or meta; flags, sizes, dates,
        sequence sets and bodies do not."""
        cases: list[tuple[list[object], bool]] = [
            (["ALL", "SEEN", "LARGER", "10", "SINCE", "1-Jan-2020", "1:*", "BODY", "x"], False),
            (["FROM", "x"], True),
            (["OR", "SEEN", "SENTSINCE", "1-Jan-2020"], True),
            (["NOT", ["SEEN", "HEADER", "a", "b"]], True),
        ]
        for tokens, expected in cases:
            with self.subTest(tokens=tokens):
                self.assertEqual(needs_details(parse_search(tokens)), expected)


class ParseTests(TestCase):
    def test_programs(self) -> None:
        cases: list[tuple[list[object], object]] = [
            (["all"], Key("ALL")),
            (["FROM", "Smith"], Key("FROM", ("smith",))),
            (
                ["flagged", "since", "1-Feb-1994", "NOT", "FROM", "Smith"],
                And((Key("FLAGGED"), Key("SINCE", (19940201,)), Not(Key("FROM", ("smith",))))),
            ),
            (["OR", "SEEN", ["FLAGGED", "DRAFT"]], Or(Key("SEEN"), And((Key("FLAGGED"), Key("DRAFT"))))),
            (["1:3,5,*"], NumberSet(parse_sequence_set("1:3,5,*"), uid=False)),
            (["UID", "2:*"], NumberSet(((2, STAR),), uid=True)),
            (["HEADER", "X-Spam", "Yes"], Key("HEADER", ("X-Spam", "yes"))),
            (["KEYWORD", "$Junk"], Key("KEYWORD", ("$Junk", "$junk"))),
            (["LARGER", "4294967296"], Key("LARGER", (4294967296,))),
            (["SUBJECT", "Straße"], Key("SUBJECT", ("strasse",))),
            (["ON", "09-Sep-2001"], Key("ON", (20010909,))),
        ]
        for tokens, program in cases:
            with self.subTest(tokens=tokens):
                self.assertEqual(parse_search(tokens), program)

    def test_errors(self) -> None:
        cases: list[tuple[list[object], str]] = [
            ([], "Missing search key"),
            ([[]], "Missing search key"),
            (["FOO"], "Unknown search key FOO"),
            (["SEEN", "BOGUS"], "Unknown search key BOGUS"),
            (["ſEEN"], "Unknown search key ſEEN"),
            (["FROM"], "FROM needs an argument"),
            (["FROM", ["x"]], "FROM needs an argument"),
            (["HEADER", "X"], "HEADER needs an argument"),
            (["SINCE", "31-Feb-2024"], "Invalid date"),
            (["SINCE", "1-Foo-2024"], "Invalid date"),
            (["SINCE", "1-Feb-24"], "Invalid date"),
            (["SINCE", "١-Feb-2024"], "Invalid date"),
            (["LARGER", "-1"], "Invalid number"),
            (["LARGER", "x"], "Invalid number"),
            (["LARGER", "1" * 30], "Invalid number"),
            (["LARGER", "9223372036854775808"], "Invalid number"),  # 2^63
            (["LARGER", "١"], "Invalid number"),
            (["UID", "0"], "Invalid sequence set"),
            (["UID", "4294967296"], "Invalid sequence set"),
            (["UID", "x"], "Invalid sequence set"),
            (["1:"], "Invalid sequence set"),
            (["1,,2"], "Invalid sequence set"),
            (["OR", "ALL"], "OR needs two search keys"),
            (["OR"], "OR needs two search keys"),
            (["NOT"], "NOT needs a search key"),
            ([None], "Invalid search key"),
            ([b"ALL"], "Invalid search key"),
            ([*["NOT"] * 200, "ALL"], "nested too deeply"),
        ]
        for tokens, message in cases:
            with self.subTest(tokens=tokens[:3]):
                error = self.assertRaises(ParseError, parse_search, tokens)
                self.assertIn(message, str(error))

    def test_charset_is_the_parsers_business(self) -> None:
        """CHARSET is settled (and removed) by `search_tokens`: here it is no search key at all."""
        error = self.assertRaises(ParseError, parse_search, ["CHARSET", "UTF-8", "ALL"])
        self.assertEqual(str(error), "Unknown search key CHARSET")

    def test_sets_are_the_parsers(self) -> None:
        """SEARCH's sequence sets are `parse_sequence_set`'s, resolved by `resolve_set` when matching."""
        for text in ("1", "*", "2:*", "3:1,2,7:9", "*:4"):
            with self.subTest(text=text):
                self.assertEqual(parse_search([text]), NumberSet(parse_sequence_set(text), uid=False))
                self.assertEqual(parse_search(["UID", text]), NumberSet(parse_sequence_set(text), uid=True))


class DecodeWordsTests(TestCase):
    def test_table(self) -> None:
        cases = {
            "plain": "plain",
            "=?utf-8?q?caf=C3=A9?=": "café",
            "=?UTF-8?B?Y2Fmw6k=?=": "café",
            "=?utf-8?b?Y2Fmw6k?=": "café",  # missing padding
            "=?iso-8859-1?q?caf=E9_au_lait?=": "café au lait",
            "=?utf-8*en?q?hi?=": "hi",
            "=?utf-8?q?a?= =?utf-8?q?b?=": "ab",  # blank space between words is dropped
            "=?utf-8?q?a?= x =?utf-8?q?b?=": "a x b",
            "x =?utf-8?q?a?=": "x a",
            "=?nonsense?q?abc?=": "abc",
            "=?base64?q?abc?=": "abc",  # a codec that is not a text encoding
            "=?utf-8?b?!!!?=": "",  # base64 decoding skips what is not base64
            "=?utf-8?q?\xff?=": "?",
            "=?utf-8?x?abc?=": "=?utf-8?x?abc?=",
        }
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(decode_words(text), expected)


# Single search keys as token lists, for generated programs.
LEAVES = [tokens for tokens, _ in MATCH_TABLE if tokens and tokens[0] not in ("NOT", "OR")]
PROGRAMS = st.recursive(
    st.sampled_from(LEAVES),
    lambda inner: st.one_of(
        inner.map(lambda tokens: ["NOT", *tokens]),
        st.tuples(inner, inner).map(lambda pair: ["OR", [*pair[0]], [*pair[1]]]),
        st.lists(inner, min_size=1, max_size=3).map(
            lambda parts: [[token for part in parts for token in part]]
        ),
    ),
    max_leaves=8,
)


class PropertyTests(TestCase):
    @given(PROGRAMS, st.booleans())
    def test_not_is_the_exact_complement(self, tokens: list[object], analyzed: bool) -> None:
        self.assertEqual(search(["NOT", [*tokens]], analyzed), {10, 20, 30} - search(tokens, analyzed))

    @given(PROGRAMS, PROGRAMS)
    def test_or_and_and_are_union_and_intersection(self, left: list[object], right: list[object]) -> None:
        self.assertEqual(search(["OR", [*left], [*right]]), search(left) | search(right))
        self.assertEqual(search([*left, *right]), search(left) & search(right))

    @given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 40)), min_size=1, max_size=5))
    def test_number_sets(self, ranges: list[tuple[int, int]]) -> None:
        """A set as written (``*`` = 0) covers what the RFC says: each range in either order, ``*`` = 30."""
        text = ",".join(f"{low}:{high or '*'}" for low, high in ranges)
        expected = {
            uid
            for uid in (10, 20, 30)
            for low, high in ranges
            if min(low, high or 30) <= uid <= max(low, high or 30)
        }
        self.assertEqual(search(["UID", text]), expected)
