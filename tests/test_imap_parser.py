"""The pure IMAP parsing layer: command assembly with literals and limits, tokens, typed arguments.

Tables pin the exact behaviour; Hypothesis checks the properties a hostile client could break:
the assembler gives the same commands however the bytes are split and never holds more than its
limits, sequence sets resolve like a naive expansion, and LIST patterns match like the obvious
(exponential) regex.
"""

from __future__ import annotations

import datetime
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kms.imap.parser import (
    SEARCH_CHARSETS,
    STAR,
    Arguments,
    Atom,
    BadCharset,
    BodyFetch,
    Command,
    CommandReader,
    Continue,
    FetchItem,
    Line,
    ParseError,
    Rejected,
    StoreRequest,
    Token,
    format_set,
    list_matcher,
    mailbox_name,
    number,
    parse_date,
    parse_date_time,
    parse_fetch_items,
    parse_flag,
    parse_sequence_set,
    parse_store,
    resolve_set,
    search_tokens,
    split_command,
    tag_of,
    tokenize,
)
from kms.imap.sections import Section


def drain(reader: CommandReader) -> list[object]:
    events: list[object] = []
    while (event := reader.next_command()) is not None:
        events.append(event)
    return events


def read(data: bytes, **limits: int) -> list[object]:
    reader = CommandReader(**limits)
    reader.feed(data)
    return drain(reader)


def cmd(*texts: bytes, literals: tuple[bytes, ...] = ()) -> Command:
    return Command(texts, literals)


def tokens_of(line: bytes, *literals: bytes) -> list[Token]:
    texts = tuple(line.split(b"\0"))
    return tokenize(Command(texts, literals))


# --- assembling commands -------------------------------------------------------------------------


class CommandReaderTests(TestCase):
    def test_lines(self) -> None:
        """CRLF or bare LF end a command; an empty line is an (empty) command too."""
        self.assertEqual(
            read(b"a1 NOOP\r\na2 CAPABILITY\n\r\n"),
            [cmd(b"a1 NOOP"), cmd(b"a2 CAPABILITY"), cmd(b"")],
        )

    def test_incomplete_line_waits(self) -> None:
        reader = CommandReader()
        reader.feed(b"a1 NO")
        self.assertEqual(drain(reader), [])
        self.assertEqual(reader.buffered, 5)
        reader.feed(b"OP\r")
        self.assertEqual(drain(reader), [])
        reader.feed(b"\n")
        self.assertEqual(drain(reader), [cmd(b"a1 NOOP")])
        self.assertEqual(reader.buffered, 0)

    def test_synchronizing_literals(self) -> None:
        """{n} asks for a continuation each time; the literal bytes are taken as they are."""
        reader = CommandReader()
        reader.feed(b"a LOGIN {5}\r\n")
        self.assertEqual(drain(reader), [Continue()])
        reader.feed(b"al\r\n{")
        self.assertEqual(drain(reader), [])
        reader.feed(b" {7}\r\n")
        self.assertEqual(drain(reader), [Continue()])
        reader.feed(b"s\r\n{3}t\r\n")
        self.assertEqual(drain(reader), [cmd(b"a LOGIN ", b" ", b"", literals=(b"al\r\n{", b"s\r\n{3}t"))])

    def test_non_synchronizing_literal(self) -> None:
        """LITERAL+ {n+}: no continuation; the empty literal works too."""
        self.assertEqual(
            read(b"a LOGIN {3+}\r\nbob {0+}\r\n\r\n"),
            [cmd(b"a LOGIN ", b" ", b"", literals=(b"bob", b""))],
        )

    def test_empty_synchronizing_literal(self) -> None:
        self.assertEqual(read(b"a X {0}\r\n\r\n"), [Continue(), cmd(b"a X ", b"", literals=(b"",))])

    def test_long_line_within_limit(self) -> None:
        """A 64 KiB UID STORE line is a command, not an error (Twisted disconnects: audit §3.3)."""
        line = b"a UID STORE " + b",".join(b"%d" % n for n in range(1, 20000, 2)) + b" +FLAGS (\\Seen)"
        self.assertLess(len(line), 65536)
        self.assertEqual(read(line + b"\r\n"), [cmd(line)])

    def test_over_long_line_is_refused_and_skipped(self) -> None:
        """Over the limit: BAD with the tag, the rest of the line dropped, the next command read."""
        events = read(b"t1 NOOP " + b"x" * 100 + b"\r\nt2 NOOP\r\n", max_line=50)
        self.assertEqual(events, [Rejected("t1", "BAD", "", "Command line too long"), cmd(b"t2 NOOP")])

    def test_over_long_line_without_end_keeps_memory_bounded(self) -> None:
        """A client that never sends LF: one BAD, then everything is dropped as it arrives."""
        reader = CommandReader(max_line=1000)
        reader.feed(b"t1 APPEND ")
        events = []
        for _ in range(100):
            reader.feed(b"y" * 1000)
            events += drain(reader)
            self.assertLessEqual(reader.buffered, 1001)
        self.assertEqual(events, [Rejected("t1", "BAD", "", "Command line too long")])
        reader.feed(b"yyy\r\nt2 NOOP\r\n")
        self.assertEqual(drain(reader), [cmd(b"t2 NOOP")])

    def test_over_long_line_announcing_a_non_synchronizing_literal(self) -> None:
        """The {n+} literal at the end of a refused line is skipped, not read as commands."""
        data = b"t1 X " + b"x" * 100 + b" {9+}\r\nt3 NOOP\r\n\r\nt2 NOOP\r\n"
        self.assertEqual(
            read(data, max_line=50), [Rejected("t1", "BAD", "", "Command line too long"), cmd(b"t2 NOOP")]
        )

    def test_text_of_all_lines_counts_toward_the_limit(self) -> None:
        data = b"t1 X " + b"a" * 30 + b" {1+}\r\nz" + b"b" * 30 + b"\r\nt2 NOOP\r\n"
        self.assertEqual(
            read(data, max_line=50), [Rejected("t1", "BAD", "", "Command line too long"), cmd(b"t2 NOOP")]
        )

    def test_synchronizing_literal_too_big(self) -> None:
        """No continuation is sent, so the client never sends it: the next line is a new command."""
        self.assertEqual(
            read(b"t1 LOGIN {101}\r\nt2 NOOP\r\n", max_literal=100),
            [Rejected("t1", "BAD", "TOOBIG", "Literal too large"), cmd(b"t2 NOOP")],
        )

    def test_non_synchronizing_literal_too_big_is_skipped(self) -> None:
        """{n+} bytes come anyway: refused at once, skipped unread, the rest of the command too."""
        reader = CommandReader(max_literal=100)
        reader.feed(b"t1 LOGIN {1000+}\r\n")
        self.assertEqual(drain(reader), [Rejected("t1", "BAD", "TOOBIG", "Literal too large")])
        for _ in range(10):
            reader.feed(b"\r\n" * 50)
            self.assertEqual(drain(reader), [])
            self.assertEqual(reader.buffered, 0)
        reader.feed(b" more {2+}\r\nxx\r\nt2 NOOP\r\n")
        self.assertEqual(drain(reader), [cmd(b"t2 NOOP")])

    def test_append_has_its_own_limit(self) -> None:
        """APPEND literals may reach APPENDLIMIT; beyond it NO [TOOBIG] (RFC 7889)."""
        self.assertEqual(read(b"t1 APPEND INBOX {500}\r\n", max_literal=100, max_append=1000), [Continue()])
        self.assertEqual(
            read(b"t1 append INBOX {1001}\r\nt2 NOOP\r\n", max_literal=100, max_append=1000),
            [Rejected("t1", "NO", "TOOBIG", "Message too large"), cmd(b"t2 NOOP")],
        )

    def test_total_of_literals_is_bounded(self) -> None:
        """Many literals each under the limit still cannot add up to unbounded memory."""
        data = b"t1 X" + b"".join(b" {60+}\r\n" + bytes([c]) * 60 for c in b"abcd") + b"\r\nt2 NOOP\r\n"
        self.assertEqual(
            read(data, max_literal=100),
            [Rejected("t1", "BAD", "TOOBIG", "Literal too large"), cmd(b"t2 NOOP")],
        )

    def test_huge_literal_number(self) -> None:
        """20 digits: too big; more digits are no literal at all (left for the tokenizer to refuse)."""
        self.assertEqual(
            read(b"t1 X {99999999999999999999}\r\n"), [Rejected("t1", "BAD", "TOOBIG", "Literal too large")]
        )
        self.assertEqual(read(b"t1 X {999999999999999999999}\r\n"), [cmd(b"t1 X {999999999999999999999}")])

    def test_untagged_refusal(self) -> None:
        self.assertEqual(
            read(b"+bad " + b"x" * 80 + b"\r\n", max_line=50),
            [Rejected("*", "BAD", "", "Command line too long")],
        )

    def test_raw_lines(self) -> None:
        """IDLE and SASL read raw lines; an over-long one is reported once and dropped."""
        reader = CommandReader(max_line=10)
        reader.feed(b"DONE\r\nabc\n" + b"z" * 30)
        self.assertEqual(reader.next_line(), Line(b"DONE"))
        self.assertEqual(reader.next_line(), Line(b"abc"))
        self.assertEqual(reader.next_line(), Line(b"", too_long=True))
        self.assertIsNone(reader.next_line())
        reader.feed(b"zz\r\nok\r\n" + b"q" * 11 + b"\r\n")
        self.assertEqual(reader.next_line(), Line(b"ok"))
        self.assertEqual(reader.next_line(), Line(b"", too_long=True))
        self.assertIsNone(reader.next_line())

    def test_inside_command(self) -> None:
        """Whether part of a command is waiting for the rest (the server ACKs such parts at once)."""
        reader = CommandReader()
        reader.feed(b"a APPEND x {3}\r\nab")
        self.assertEqual(drain(reader), [Continue()])
        self.assertTrue(reader.inside_command)
        reader.feed(b"c")
        self.assertEqual(drain(reader), [])
        self.assertTrue(reader.inside_command)
        reader.feed(b"\r\nb NO")
        self.assertEqual(drain(reader), [cmd(b"a APPEND x ", b"", literals=(b"abc",))])
        self.assertFalse(reader.inside_command)

    def test_clear(self) -> None:
        """STARTTLS: whatever was pipelined is forgotten."""
        reader = CommandReader()
        reader.feed(b"a NOOP\r\nb LOGIN x y\r\n")
        reader.clear()
        self.assertEqual(drain(reader), [])
        self.assertEqual(reader.buffered, 0)

    def test_tag_of(self) -> None:
        for line, tag in [
            (b"a1 NOOP", "a1"),
            (b"A.b-c]x NOOP", "A.b-c]x"),
            (b"", "*"),
            (b"+x NOOP", "*"),
            (b"a*b NOOP", "*"),
            (b"a{ NOOP", "*"),
            (b"\xff NOOP", "*"),
            (b"a" * 65 + b" NOOP", "*"),
        ]:
            self.assertEqual(tag_of(line), tag, line)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                [
                    b"a NOOP\r\n",
                    b"b LOGIN {3}\r\nabc x\r\n",
                    b"c X {2+}\r\n\r\n\r\n",
                    b"d " + b"q" * 70 + b"\n",
                    b"e X {200}\r\nf NOOP\r\n",
                    b"g X {300+}\r\n" + b"\n" * 300 + b"\r\n",
                    b"\r\n",
                    b"{5}\r\n",
                ]
            ),
            max_size=12,
        ),
        st.data(),
    )
    def test_splitting_never_changes_the_result(self, pieces: list[bytes], data: st.DataObject) -> None:
        stream = b"".join(pieces)
        whole = read(stream, max_line=64, max_literal=100)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
        reader = CommandReader(max_line=64, max_literal=100)
        events: list[object] = []
        start = 0
        for cut in [*cuts, len(stream)]:
            reader.feed(stream[start:cut])
            start = cut
            events += drain(reader)
        self.assertEqual(events, whole)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=300), max_size=30))
    def test_any_bytes_bounded(self, chunks: list[bytes]) -> None:
        """Whatever arrives, nothing raises and the buffer stays within the line limit."""
        reader = CommandReader(max_line=64, max_literal=100)
        for chunk in chunks:
            reader.feed(chunk)
            for event in drain(reader):
                self.assertIsInstance(event, (Command, Continue, Rejected))
            self.assertLessEqual(reader.buffered, 64 + 1)


# --- tokens --------------------------------------------------------------------------------------


class TokenizeTests(TestCase):
    def test_table(self) -> None:
        table: list[tuple[list[bytes], list[object]]] = [
            ([b"a NOOP"], ["a", "NOOP"]),
            ([b'a LOGIN "us\\"er" "p\\\\w"'], ["a", "LOGIN", 'us"er', "p\\w"]),
            ([b'a X ""  NIL'], ["a", "X", "", "NIL"]),
            ([b"a X (1 (2 3) ()) 4"], ["a", "X", ["1", ["2", "3"], []], "4"]),
            (
                [b"a FETCH 1:* BODY.PEEK[HEADER.FIELDS (From To)]<0.10>"],
                ["a", "FETCH", "1:*", "BODY.PEEK[HEADER.FIELDS (From To)]<0.10>"],
            ),
            ([b"a FETCH 1 (FLAGS BODY[])"], ["a", "FETCH", "1", ["FLAGS", "BODY[]"]]),
            ([b'a LIST "" %/*'], ["a", "LIST", "", "%/*"]),
            ([b"a X \\Seen $Junk"], ["a", "X", "\\Seen", "$Junk"]),
            ([b"a X caf\xc3\xa9"], ["a", "X", "café"]),
        ]
        for line, expected in table:
            self.assertEqual(tokenize(Command(tuple(line), ())), expected, line)

    def test_types(self) -> None:
        """Atoms, quoted strings and literals are told apart."""
        atom, quoted, literal = tokens_of(b'NIL "NIL" \0', b"NIL")
        self.assertIsInstance(atom, Atom)
        self.assertNotIsInstance(quoted, Atom)
        self.assertIsInstance(quoted, str)
        self.assertEqual(literal, b"NIL")

    def test_literals_in_place(self) -> None:
        self.assertEqual(tokens_of(b"a LOGIN \0 \0", b"bob", b"pw"), ["a", "LOGIN", b"bob", b"pw"])
        self.assertEqual(tokens_of(b"a X (\0 b)", b"lit"), ["a", "X", [b"lit", "b"]])

    def test_literals_inside_brackets(self) -> None:
        """A header field name may be a literal (RFC 3501 header-fld-name is an astring): the
        bracketed part goes on after it, with the name as a quoted string."""
        self.assertEqual(
            tokens_of(b"a FETCH 1 (BODY[HEADER.FIELDS (\0 To)] UID)", b"From"),
            ["a", "FETCH", "1", ['BODY[HEADER.FIELDS ("From" To)]', "UID"]],
        )
        self.assertEqual(
            tokens_of(b"a FETCH 1 BODY.PEEK[HEADER.FIELDS (\0 \0)]<0.5>", b"X-A", b'X"\\'),
            ["a", "FETCH", "1", 'BODY.PEEK[HEADER.FIELDS ("X-A" "X\\"\\\\")]<0.5>'],
        )
        for literal in [b"A B", b"A:B", b"A]", b"", b"\xc3\xa9", b"A\r\nB"]:
            with self.subTest(literal=literal):
                self.assertRaises(ParseError, tokens_of, b"a FETCH 1 BODY[HEADER.FIELDS (\0)]", literal)
        # An unclosed "[" with no literal after it is still an error; brackets elsewhere are not changed.
        self.assertRaises(ParseError, tokens_of, b"a FETCH 1 BODY[HEADER.FIELDS (\0) BODY[", b"A")
        self.assertEqual(
            tokens_of(b'a SEARCH SUBJECT "[" \0', b"x y"), ["a", "SEARCH", "SUBJECT", "[", b"x y"]
        )

    def test_errors(self) -> None:
        for line in [
            b"a X (1",
            b"a X 1)",
            b'a X "open',
            b'a X "bad\\x"',
            b"a X \x01",
            b"a X \x7f",
            b"a X [unclosed",
            b"a X " + b"(" * 40 + b")" * 40,
        ]:
            self.assertRaises(ParseError, tokenize, Command((line,), ()))

    def test_split_command(self) -> None:
        self.assertEqual(split_command(tokens_of(b"a1 noop")), ("a1", "NOOP", []))
        self.assertEqual(
            split_command(tokens_of(b"a1 uid fetch 1 FLAGS")), ("a1", "UID FETCH", ["1", "FLAGS"])
        )
        for line in [b"", b"a1", b'"a1" NOOP', b"a1 (X)", b"a1 UID", b"a1 UID (X)", b"+ NOOP", b"* NOOP"]:
            self.assertRaises(ParseError, split_command, tokens_of(line))


class ArgumentsTests(TestCase):
    def test_accessors(self) -> None:
        args = Arguments(tokens_of(b'atom "str" \0 (1 2)', b"lit"))
        self.assertEqual(args.atom("a"), "atom")
        self.assertEqual(args.astring("b"), "str")
        self.assertEqual(args.astring("c"), "lit")
        self.assertEqual(args.group("d"), ["1", "2"])
        args.end()
        self.assertRaises(ParseError, args.next, "more")

    def test_wrong_kinds(self) -> None:
        self.assertRaises(ParseError, Arguments(tokens_of(b'"x"')).atom, "a")
        self.assertRaises(ParseError, Arguments(tokens_of(b"(x)")).astring, "a")
        self.assertRaises(ParseError, Arguments(tokens_of(b"x")).group, "a")
        self.assertRaises(ParseError, Arguments(tokens_of(b"\0", b"\xff")).astring, "a")
        self.assertRaises(ParseError, Arguments(tokens_of(b"x y")).end)

    def test_mailbox_names(self) -> None:
        for raw, name in [
            ("inbox", "INBOX"),
            ("InBoX", "INBOX"),
            ("inbox/Sub", "INBOX/Sub"),
            ("Sent", "Sent"),
            ("&AOk-t&AOk-", "été"),
            ("A&-B", "A&B"),
            ("Inboxes", "Inboxes"),
        ]:
            self.assertEqual(mailbox_name(raw), name, raw)
        for raw in ["&AOk", "&Jjo!-", "caf\u00e9", "&AGE-"]:
            self.assertRaises(ParseError, mailbox_name, raw)

    def test_number(self) -> None:
        self.assertEqual(number("4294967295", "n"), 2**32 - 1)
        self.assertEqual(number("0", "n", nonzero=False), 0)
        for text in ["0", "-1", "4294967296", "99999999999", "1e3", "", "١"]:
            self.assertRaises(ParseError, number, text, "n")
        self.assertEqual(number("4294967296", "n", maximum=2**63 - 1), 2**32)
        self.assertEqual(number("9223372036854775807", "n", maximum=2**63 - 1), 2**63 - 1)
        for text in ["9223372036854775808", "1" * 20, "0" * 30 + "1"]:
            self.assertRaises(ParseError, number, text, "n", maximum=2**63 - 1)


# --- sequence sets -------------------------------------------------------------------------------


def expand(ranges: list[tuple[int, int]]) -> set[int]:
    return {n for low, high in ranges for n in range(low, high + 1)}


class SequenceSetTests(TestCase):
    def test_parse(self) -> None:
        self.assertEqual(parse_sequence_set("1"), ((1, 1),))
        self.assertEqual(parse_sequence_set("1:3,7,9:*,*"), ((1, 3), (7, 7), (9, STAR), (STAR, STAR)))
        self.assertEqual(parse_sequence_set("5:2"), ((5, 2),))
        for text in ["", "0", "1:0", ",", "1,", "1::2", "a", "-1", "1:-2", "4294967296", " 1", "1 ", "$"]:
            self.assertRaises(ParseError, parse_sequence_set, text)

    def test_resolve(self) -> None:
        self.assertEqual(resolve_set(parse_sequence_set("9:*"), 3), [(3, 9)])
        self.assertEqual(resolve_set(parse_sequence_set("5:2,1,3:4,8,*"), 10), [(1, 5), (8, 8), (10, 10)])
        self.assertEqual(resolve_set(parse_sequence_set("1:*"), 0), [(0, 1)])

    def test_format(self) -> None:
        self.assertEqual(format_set([]), "")
        self.assertEqual(format_set([1, 2, 3, 5, 7, 8]), "1:3,5,7:8")
        self.assertEqual(format_set([7, 3, 4]), "7,3:4")

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), min_size=1, max_size=12),
        st.integers(0, 60),
    )
    def test_resolve_is_the_naive_expansion(self, pairs: list[tuple[int, int]], star: int) -> None:
        text = ",".join(f"{'*' if a == 0 else a}:{'*' if b == 0 else b}" for a, b in pairs)
        resolved = resolve_set(parse_sequence_set(text), star)
        naive: set[int] = set()
        for a, b in pairs:
            a, b = a or star, b or star
            naive.update(range(min(a, b), max(a, b) + 1))
        self.assertEqual(expand(resolved), naive)
        for (_, high), (low, _) in zip(resolved, resolved[1:], strict=False):
            self.assertGreater(low, high + 1)  # sorted, disjoint, not even adjacent

    @settings(max_examples=200, deadline=None)
    @given(st.sets(st.integers(1, 2**32 - 1), min_size=1, max_size=50))
    def test_format_round_trip(self, numbers: set[int]) -> None:
        text = format_set(sorted(numbers))
        self.assertEqual(expand(resolve_set(parse_sequence_set(text), 1)), numbers)


# --- FETCH, STORE, flags, dates ------------------------------------------------------------------


def fetch(text: bytes, *literals: bytes) -> list[FetchItem]:
    return parse_fetch_items(Arguments(tokens_of(text, *literals)))


class FetchItemTests(TestCase):
    def test_macros_and_simple(self) -> None:
        self.assertEqual(fetch(b"all"), ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"])
        self.assertEqual(fetch(b"FAST"), ["FLAGS", "INTERNALDATE", "RFC822.SIZE"])
        self.assertEqual(fetch(b"FULL"), ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"])
        self.assertEqual(
            fetch(b"(uid flags RFC822.SIZE bodystructure)"), ["UID", "FLAGS", "RFC822.SIZE", "BODYSTRUCTURE"]
        )
        self.assertEqual(fetch(b"UID"), ["UID"])

    def test_body_sections(self) -> None:
        self.assertEqual(fetch(b"BODY[]"), [BodyFetch(Section(), peek=False)])
        self.assertEqual(fetch(b"body.peek[]<0.10>"), [BodyFetch(Section(), peek=True, partial=(0, 10))])
        self.assertEqual(
            fetch(b'(BODY.PEEK[HEADER.FIELDS (From "To")])'),
            [BodyFetch(Section((), "HEADER.FIELDS", ("From", "To")), peek=True)],
        )
        self.assertEqual(
            fetch(b"BODY[1.2.header.fields.not (X-A)]"),
            [BodyFetch(Section((1, 2), "HEADER.FIELDS.NOT", ("X-A",)), peek=False)],
        )
        self.assertEqual(fetch(b"BODY[3.MIME]"), [BodyFetch(Section((3,), "MIME"), peek=False)])
        self.assertEqual(fetch(b"BODY[2.TEXT]"), [BodyFetch(Section((2,), "TEXT"), peek=False)])
        self.assertEqual(fetch(b"BODY[1]"), [BodyFetch(Section((1,), ""), peek=False)])
        self.assertEqual(
            fetch(b"(BODY.PEEK[1.HEADER.FIELDS.NOT (\0 X-B)])", b"X-A"),
            [BodyFetch(Section((1,), "HEADER.FIELDS.NOT", ("X-A", "X-B")), peek=True)],
        )

    def test_rfc822_forms(self) -> None:
        rfc822, header, text = fetch(b"(RFC822 RFC822.HEADER RFC822.TEXT)")
        self.assertEqual(rfc822, BodyFetch(Section(), peek=False, name="RFC822"))
        self.assertEqual(header, BodyFetch(Section((), "HEADER"), peek=True, name="RFC822.HEADER"))
        self.assertEqual(text, BodyFetch(Section((), "TEXT"), peek=False, name="RFC822.TEXT"))

    def test_errors(self) -> None:
        for text in [
            b"()",
            b"(ALL)",
            b"BOGUS",
            b"BODY[MIME]",
            b"BODY[0]",
            b"BODY[1.]",
            b"BODY[HEADER.FIELDS]",
            b"BODY[HEADER.FIELDS ()]",
            b"BODY[HEADER.FIELDS (A:B)]",
            b"BODY[TEXT (A)]",
            b"BODY[HEADERS]",
            b"BODY[]<0.0>",
            b"BODY[]<1>",
            b"BODY[]<0.99999999999>",
            b'"FLAGS"',
            b"FLAGS UID",
        ]:
            self.assertRaises(ParseError, fetch, text)


class StoreAndFlagTests(TestCase):
    def test_store(self) -> None:
        def store(text: bytes) -> StoreRequest:
            return parse_store(Arguments(tokens_of(text)))

        self.assertEqual(store(b"+FLAGS (\\Seen)"), StoreRequest("+", False, ("\\Seen",)))
        self.assertEqual(
            store(b"-flags.silent \\deleted $Junk"), StoreRequest("-", True, ("\\Deleted", "$Junk"))
        )
        self.assertEqual(store(b"FLAGS ()"), StoreRequest("", False, ()))
        self.assertEqual(store(b"FLAGS (\\Seen \\seen)"), StoreRequest("", False, ("\\Seen",)))
        for text in [b"+FLAGS", b"FLAG (\\Seen)", b"+FLAGS (\\Recent)", b"+FLAGS (\\Bogus)", b"+FLAGS (a) b"]:
            self.assertRaises(ParseError, store, text)

    def test_flags(self) -> None:
        self.assertEqual(parse_flag(Atom("\\ANSWERED")), "\\Answered")
        self.assertEqual(parse_flag(Atom("$MDNSent")), "$MDNSent")
        for token in [
            Atom("\\Recent"),
            Atom("\\*"),
            Atom("a*b"),
            Atom("a%"),
            "quoted",
            b"lit",
            Atom("x" * 129),
        ]:
            self.assertRaises(ParseError, parse_flag, token)

    def test_date_time(self) -> None:
        self.assertEqual(parse_date_time("17-Jul-1996 02:44:25 -0700"), 837596665.0)
        self.assertEqual(parse_date_time(" 1-jan-2000 00:00:00 +0000"), 946684800.0)
        self.assertEqual(parse_date_time("01-Jan-2000 01:00:00 +0100"), 946684800.0)
        for text in [
            "",
            "17-Jul-1996",
            "32-Jul-1996 00:00:00 +0000",
            "17-Foo-1996 00:00:00 +0000",
            "17-Jul-1996 24:00:00 +0000",
            "31-Feb-2000 00:00:00 +0000",
            "17-Jul-1996 00:00:00 0000",
            "17-Jul-1996 00:00:00 +9999",
        ]:
            self.assertRaises(ParseError, parse_date_time, text)

    def test_date(self) -> None:
        self.assertEqual(parse_date("1-Feb-1994"), datetime.date(1994, 2, 1))
        self.assertEqual(parse_date("09-sep-2001"), datetime.date(2001, 9, 9))
        for text in ["", "31-Feb-2024", "1-Foo-2024", "1-Feb-24", "١-Feb-2024", "1-Feb-0000", "001-Feb-2024"]:
            self.assertRaises(ParseError, parse_date, text)


# --- LIST patterns -------------------------------------------------------------------------------


def reference_regex(full: str) -> re.Pattern[str]:
    return re.compile(
        "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in full), re.S
    )


class ListMatcherTests(TestCase):
    def test_table(self) -> None:
        names = ["INBOX", "INBOX/a", "Sent", "a", "a/b", "a/b/c", "ab"]
        for reference, pattern, expected in [
            ("", "*", names),
            ("", "%", ["INBOX", "Sent", "a", "ab"]),
            ("", "a/%", ["a/b"]),
            ("a/", "*", ["a/b", "a/b/c"]),
            ("", "inbox", ["INBOX"]),
            ("", "inbox/*", ["INBOX/a"]),
            ("", "%/%", ["INBOX/a", "a/b"]),
            ("", "*b", ["a/b", "ab"]),
            ("", "a*%", ["a", "a/b", "a/b/c", "ab"]),
            ("", "Sent", ["Sent"]),
            ("", "sent", []),
        ]:
            matcher = list_matcher(reference, pattern)
            self.assertEqual([n for n in names if matcher(n)], expected, (reference, pattern))

    def test_modified_utf7(self) -> None:
        self.assertTrue(list_matcher("", "&AOk-t*")("été/x"))
        self.assertRaises(ParseError, list_matcher, "", "&AOk")

    def test_many_wildcards_stay_fast(self) -> None:
        """A regex would backtrack for ages on this; the NFA is linear."""
        matcher = list_matcher("", "*a" * 40 + "b")
        self.assertFalse(matcher("a" * 255))

    @settings(max_examples=500, deadline=None)
    @given(st.text("ab/*%", max_size=8), st.text("ab/", max_size=8))
    def test_same_as_the_obvious_regex(self, pattern: str, name: str) -> None:
        self.assertEqual(list_matcher("", pattern)(name), bool(reference_regex(pattern).fullmatch(name)))


# --- SEARCH --------------------------------------------------------------------------------------


class SearchTokenTests(TestCase):
    def test_default_charset(self) -> None:
        self.assertEqual(
            search_tokens(tokens_of(b'FROM "caf\xc3\xa9" (OR SEEN \0)', "Ü".encode())),
            ["FROM", "café", ["OR", "SEEN", "Ü"]],
        )

    def test_charset(self) -> None:
        self.assertEqual(search_tokens(tokens_of(b"charset us-ascii ALL")), ["ALL"])
        self.assertEqual(
            search_tokens(tokens_of(b'CHARSET "utf-8" SUBJECT "caf\xc3\xa9" BODY \0', "ü".encode())),
            ["SUBJECT", "café", "BODY", "ü"],
        )

    def test_refused(self) -> None:
        """Only US-ASCII and UTF-8 (what BADCHARSET lists); text they cannot decode is a BAD."""
        self.assertEqual(list(SEARCH_CHARSETS), ["UTF-8", "US-ASCII"])
        for charset in [b"ISO-8859-1", b"KLINGON", b"base64", b"UTF8", b"utf-16"]:
            with self.subTest(charset=charset):
                self.assertRaises(BadCharset, search_tokens, tokens_of(b"CHARSET " + charset + b" ALL"))
        self.assertRaises(ParseError, search_tokens, tokens_of(b"CHARSET (UTF-8) ALL"))
        self.assertRaises(ParseError, search_tokens, tokens_of(b'CHARSET US-ASCII SUBJECT "caf\xc3\xa9"'))
        self.assertRaises(ParseError, search_tokens, tokens_of(b"CHARSET US-ASCII SUBJECT \0", b"\xc3\xa9"))
        self.assertRaises(ParseError, search_tokens, tokens_of(b'SUBJECT "\xff"'))
