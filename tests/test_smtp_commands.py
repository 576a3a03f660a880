"""Pure SMTP parsing: command lines, envelope paths and parameters, and the DATA reader.

The DATA reader is checked against a deliberately naive reference (split on CRLF, find the first
CRLF "." CRLF) under arbitrary chunkings, because chunk boundaries are where smuggling bugs hide.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kms.smtp.commands import (
    DataReader,
    parse_command,
    parse_helo,
    parse_mail,
    parse_path,
    parse_rcpt,
    xtext_decode,
)
from kms.smtp.interfaces import Refusal


class ParseCommandTests(TestCase):
    def test_verb_is_upper_cased_and_argument_kept(self) -> None:
        """The verb is case-insensitive; the argument keeps its case, only outer blanks go."""
        self.assertEqual(parse_command(b"mail FROM:<A@b>"), ("MAIL", "FROM:<A@b>"))
        self.assertEqual(parse_command(b"RSET  "), ("RSET", ""))
        self.assertEqual(parse_command(b"EHLO  host "), ("EHLO", "host"))
        self.assertEqual(parse_command(b""), ("", ""))

    def test_nul_and_invalid_utf8_are_refused(self) -> None:
        """NUL and bytes that are not UTF-8 never reach a handler: 500 5.5.2."""
        for line in (b"NOOP\0", b"MAIL FROM:<\xff@x>", b"\xc3"):
            with self.assertRaises(Refusal) as caught:
                parse_command(line)
            self.assertEqual((caught.exception.code, caught.exception.enhanced), (500, "5.5.2"))

    def test_utf8_argument_is_decoded(self) -> None:
        """UTF-8 arguments (SMTPUTF8 addresses) arrive as text."""
        self.assertEqual(parse_command("RCPT TO:<jösé@x.test>".encode()), ("RCPT", "TO:<jösé@x.test>"))

    def test_helo_name(self) -> None:
        """HELO/EHLO take one printable ASCII token; anything else is 501 5.5.4 naming the verb."""
        self.assertEqual(parse_helo("EHLO", "mx.example.test"), "mx.example.test")
        self.assertEqual(parse_helo("HELO", "[192.0.2.1]"), "[192.0.2.1]")
        for bad in ("", "two words", "tab\there", "x" * 256, "ünï"):
            with self.assertRaises(Refusal) as caught:
                parse_helo("EHLO", bad)
            self.assertEqual(str(caught.exception), "501 5.5.4 Syntax: EHLO hostname")


def refusal(callable_: object, *args: object, **kwargs: object) -> tuple[int, str]:
    try:
        callable_(*args, **kwargs)  # type: ignore[operator]
    except Refusal as e:
        return e.code, e.enhanced
    raise AssertionError(f"no Refusal for {args} {kwargs}")


class PathTests(TestCase):
    VALID = [
        ("<user@example.test>", "user@example.test"),
        ("<first.last+tag@sub.example.test>", "first.last+tag@sub.example.test"),
        ("<!#$%&'*+-/=?^_`{|}~@x.test>", "!#$%&'*+-/=?^_`{|}~@x.test"),
        ("<user@[192.0.2.1]>", "user@[192.0.2.1]"),
        ("<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]"),
        ("<user@[ipv6:::ffff:192.0.2.1]>", "user@[ipv6:::ffff:192.0.2.1]"),
        ("<@relay.test:user@example.test>", "user@example.test"),
        ("<@a.test,@b.test:user@example.test>", "user@example.test"),
        ('<"john doe"@example.test>', '"john doe"@example.test'),
        ('<"bob"@example.test>', "bob@example.test"),
        ('<"b\\ob"@example.test>', "bob@example.test"),
        ('<"a\\"b"@example.test>', '"a\\"b"@example.test'),
        ('<"a>b"@example.test>', '"a>b"@example.test'),
        ("<" + "l" * 64 + "@x.test>", "l" * 64 + "@x.test"),
        ("<a@" + "d" * 63 + ".test>", "a@" + "d" * 63 + ".test"),
        ("<a@x-y.test>", "a@x-y.test"),
        ("<a@1.2.3.example>", "a@1.2.3.example"),
    ]

    INVALID = [
        "user@example.test",  # no brackets
        "<user@example.test",
        "<user>",  # no domain
        "<@example.test>",
        "<user@>",
        "<.user@x.test>",
        "<user.@x.test>",
        "<us..er@x.test>",
        "<us er@x.test>",
        "<user@-x.test>",
        "<user@x-.test>",
        "<user@x..test>",
        "<user@x_y.test>",
        "<user@[300.1.1.1]>",
        "<user@[IPv6:fe80::1%eth0]>",
        "<user@[IPv6:zz::1]>",
        "<user@[tag:general]>",
        "<user@[192.0.2.1>",
        "<@relay.test,user@example.test>",  # route without ":"
        "<@-bad:user@example.test>",
        "<relay.test:user@example.test>",
        '<"unterminated@x.test>',
        "<" + "l" * 65 + "@x.test>",  # local part over 64
        "<a@" + "d" * 64 + ".test>",  # label over 63
        "<a@" + ".".join(["d" * 60] * 5) + ">",  # path over 256
        "<a@b\r.test>",
        "<a\n@b.test>",
        "<a\0@b.test>",
        "<a\x7f@b.test>",
        "<a\tb@b.test>",
        "<a\u202e@b.test>",  # bidi override: not printable
    ]

    def test_valid_paths(self) -> None:
        """RFC 5321 Mailbox syntax: dot-atoms, quoted local parts (canonicalized), literals, routes."""
        for path, expected in self.VALID:
            self.assertEqual(parse_path(path, utf8=False, enhanced="5.1.3"), expected, path)

    def test_invalid_paths_are_501_with_the_given_enhanced_code(self) -> None:
        """Every malformation, length excess or control character is 501 with 5.1.7 / 5.1.3."""
        for path in self.INVALID:
            got = refusal(parse_path, path, utf8=True, enhanced="5.1.7")
            self.assertEqual(got, (501, "5.1.7"), repr(path))

    def test_non_ascii_needs_smtputf8(self) -> None:
        """Non-ASCII mailboxes are 553 5.6.7 without SMTPUTF8 (RFC 6531) and fine with it."""
        cases = [
            ("<jösé@example.test>", "jösé@example.test"),
            ("<user@bücher.test>", "user@bücher.test"),
            ('<"ü"@x.test>', "ü@x.test"),
        ]
        for path, expected in cases:
            self.assertEqual(refusal(parse_path, path, utf8=False, enhanced="5.1.7"), (553, "5.6.7"))
            self.assertEqual(parse_path(path, utf8=True, enhanced="5.1.7"), expected)

    def test_local_part_limit_counts_octets(self) -> None:
        """The 64 limit is in octets: 32 two-octet characters fit, 33 do not."""
        fits, too_long = "é" * 32 + "@x.test", "é" * 33 + "@x.test"
        self.assertEqual(parse_path(f"<{fits}>", utf8=True, enhanced="5.1.3"), fits)
        self.assertEqual(refusal(parse_path, f"<{too_long}>", utf8=True, enhanced="5.1.3"), (501, "5.1.3"))

    def test_null_path_and_postmaster(self) -> None:
        """``<>`` only where allowed (MAIL); bare ``<postmaster>`` only where allowed (RCPT)."""
        self.assertEqual(parse_path("<>", utf8=False, enhanced="5.1.7", null_ok=True), "")
        self.assertEqual(refusal(parse_path, "<>", utf8=False, enhanced="5.1.3"), (501, "5.1.3"))
        postmaster = parse_path("<PostMaster>", utf8=False, enhanced="5.1.3", postmaster_ok=True)
        self.assertEqual(postmaster, "PostMaster")
        self.assertEqual(refusal(parse_path, "<postmaster>", utf8=False, enhanced="5.1.7"), (501, "5.1.7"))


class MailRcptTests(TestCase):
    def test_mail_with_parameters(self) -> None:
        """SIZE, BODY and SMTPUTF8 are parsed into upper-case keys with raw values."""
        command = parse_mail("FROM:<a@x.test> size=1000 BODY=8bitmime SMTPUTF8", extended=True)
        self.assertEqual(command.sender, "a@x.test")
        self.assertEqual(dict(command.params), {"SIZE": "1000", "BODY": "8bitmime", "SMTPUTF8": None})

    def test_mail_tolerates_space_after_colon_and_lower_case(self) -> None:
        """``mail from: <a@x>`` is common in the wild and unambiguous."""
        self.assertEqual(parse_mail("from: <a@x.test>", extended=False).sender, "a@x.test")
        self.assertEqual(parse_mail("FROM:<>", extended=False).sender, "")

    def test_mail_smtputf8_enables_non_ascii(self) -> None:
        """The SMTPUTF8 flag on MAIL is what allows a non-ASCII reverse-path."""
        self.assertEqual(parse_mail("FROM:<jö@x.test> SMTPUTF8", extended=True).sender, "jö@x.test")
        self.assertEqual(refusal(parse_mail, "FROM:<jö@x.test>", extended=True), (553, "5.6.7"))

    def test_mail_parameter_errors_are_555(self) -> None:
        """Unknown, malformed, duplicate or HELO-session parameters are 555 5.5.4."""
        cases = [
            ("FROM:<a@x.test> SIZE=abc", True),
            ("FROM:<a@x.test> SIZE=", True),
            ("FROM:<a@x.test> SIZE", True),
            ("FROM:<a@x.test> SIZE=" + "9" * 21, True),
            ("FROM:<a@x.test> BODY=BINARYMIME", True),
            ("FROM:<a@x.test> SMTPUTF8=yes", True),
            ("FROM:<a@x.test> MT-PRIORITY=1", True),
            ("FROM:<a@x.test> SIZE=1 SIZE=2", True),
            ("FROM:<a@x.test> -bad", True),
            ("FROM:<a@x.test> X=a=b", True),
            ("FROM:<a@x.test> SIZE=10", False),
        ]
        for argument, extended in cases:
            self.assertEqual(refusal(parse_mail, argument, extended=extended), (555, "5.5.4"), argument)

    def test_mail_syntax_errors(self) -> None:
        """Missing ``FROM:`` is 501 5.5.4; a bad path is 501 5.1.7."""
        self.assertEqual(refusal(parse_mail, "TO:<a@x.test>", extended=True), (501, "5.5.4"))
        self.assertEqual(refusal(parse_mail, "", extended=True), (501, "5.5.4"))
        self.assertEqual(refusal(parse_mail, "FROM:a@x.test", extended=True), (501, "5.1.7"))
        self.assertEqual(refusal(parse_mail, "FROM:<a@x.test>SIZE=1", extended=True), (501, "5.1.7"))
        self.assertEqual(refusal(parse_mail, "FROM:<a@x.test> <b@x.test>", extended=True), (555, "5.5.4"))

    def test_rcpt(self) -> None:
        """RCPT takes a forward-path (postmaster allowed), only DSN parameters, 5.1.3 for bad paths."""
        self.assertEqual(parse_rcpt("TO:<b@x.test>", extended=True, utf8=False).recipient, "b@x.test")
        self.assertEqual(parse_rcpt("to:<Postmaster>", extended=False, utf8=False).recipient, "Postmaster")
        self.assertEqual(parse_rcpt("TO:<bü@x.test>", extended=True, utf8=True).recipient, "bü@x.test")
        self.assertEqual(refusal(parse_rcpt, "TO:<bü@x.test>", extended=True, utf8=False), (553, "5.6.7"))
        self.assertEqual(refusal(parse_rcpt, "TO:<>", extended=True, utf8=False), (501, "5.1.3"))
        self.assertEqual(refusal(parse_rcpt, "TO:<b@x.test> FOO=BAR", extended=True, utf8=False)[0], 555)
        no_ehlo = refusal(parse_rcpt, "TO:<b@x.test> NOTIFY=NEVER", extended=False, utf8=False)
        self.assertEqual(no_ehlo[0], 555)
        self.assertEqual(refusal(parse_rcpt, "FROM:<b@x.test>", extended=True, utf8=False), (501, "5.5.4"))
        self.assertEqual(refusal(parse_rcpt, "TO:<b@x.test\r>", extended=True, utf8=False), (501, "5.1.3"))


    def test_dsn_rcpt_parameters(self) -> None:
        """NOTIFY and ORCPT (RFC 3461 §4.1, §4.2) are kept decoded; malformed values are 501."""
        ok = parse_rcpt(
            "TO:<b@x.test> notify=success,Delay ORCPT=rfc822;b+2Bx+40x.test", extended=True, utf8=False
        )
        self.assertEqual(ok.params, {"NOTIFY": "SUCCESS,DELAY", "ORCPT": "rfc822;b+x@x.test"})
        self.assertEqual(parse_rcpt("TO:<b@x.test> NOTIFY=NEVER", extended=True, utf8=False).params,
                         {"NOTIFY": "NEVER"})
        for bad in (
            "NOTIFY=NEVER,SUCCESS",
            "NOTIFY=SUCCESS,SUCCESS",
            "NOTIFY=SOMETIMES",
            "NOTIFY",
            "ORCPT=b@x.test",
            "ORCPT=rfc822;",
            "ORCPT=rfc822;b+4",
            "ORCPT=rfc822;b+0Ax",
            "ORCPT=rfc822;b+zzx",
        ):
            self.assertEqual(refusal(parse_rcpt, f"TO:<b@x.test> {bad}", extended=True, utf8=False),
                             (501, "5.5.4"), bad)

    def test_dsn_mail_parameters(self) -> None:
        """RET and ENVID (RFC 3461 §4.3, §4.4) are accepted with valid values only."""
        self.assertEqual(parse_mail("FROM:<a@x.test> RET=hdrs ENVID=QQ+2B1", extended=True).params,
                         {"RET": "hdrs", "ENVID": "QQ+2B1"})
        for bad in ("RET=ALL", "RET", "ENVID=a+0Db", "ENVID=" + "x" * 101, "ENVID=a+zz"):
            self.assertEqual(refusal(parse_mail, f"FROM:<a@x.test> {bad}", extended=True), (555, "5.5.4"))
        self.assertEqual(xtext_decode("a+2Bb+3D"), "a+b=")
        self.assertIsNone(xtext_decode("a+2b"))


# --- DATA ----------------------------------------------------------------------------------------


def reference(stream: bytes) -> tuple[bytes, bytes] | None:
    """The rules written the slow, obvious way: (body, leftover), or None while not ended."""
    framed = b"\r\n" + stream
    end = framed.find(b"\r\n.\r\n")
    if end < 0:
        return None
    lines = framed[2 : end + 2].split(b"\r\n")
    text = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    return text.replace(b"\r\n", b"\n").replace(b"\r", b"\n"), framed[end + 5 :]


def feed_all(chunks: list[bytes]) -> tuple[bytes, bool, bytes]:
    reader = DataReader()
    body: list[bytes] = []
    leftover: list[bytes] = []
    done = False
    for chunk in chunks:
        if done:
            leftover.append(chunk)
            continue
        out, done, rest = reader.feed(chunk)
        body.append(out)
        leftover.append(rest)
    return b"".join(body), done, b"".join(leftover)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


class DataReaderTests(TestCase):
    SMUGGLING = [
        b"\n.\n",
        b"\r.\r",
        b"\r\n.\n",
        b"\n.\r\n",
        b"\r.\r\n",
        b"\r\n.\r",
        b"\n.\r",
        b"\r.\n",
        b"\r\n.\r\r\n",
        b"\r\n.\n\r\n",
        b"\r\r\n.\n",
        b"\r\n.\x00\r\n",
        b"\r\n .\r\n",
    ]

    def test_only_crlf_dot_crlf_ends_the_message(self) -> None:
        """Every smuggling terminator is message text; the real CRLF.CRLF after it ends the message."""
        for fake in self.SMUGGLING:
            stream = b"Subject: x\r\n\r\nbody" + fake + b"MAIL FROM:<evil@x.test>\r\nmore\r\n.\r\nQUIT\r\n"
            body, done, leftover = feed_all([stream])
            self.assertTrue(done, fake)
            self.assertEqual(leftover, b"QUIT\r\n", fake)
            self.assertIn(b"MAIL FROM:<evil@x.test>\n", body, fake)
            self.assertEqual((body, leftover), reference(stream), fake)

    def test_line_breaks_are_stored_as_lf(self) -> None:
        """CRLF, bare CR and bare LF all become LF (the documented storage decision)."""
        self.assertEqual(feed_all([b"a\r\nb\rc\nd\r\r\ne\r\n.\r\n"])[0], b"a\nb\nc\nd\n\ne\n")

    def test_dot_unstuffing(self) -> None:
        """A leading dot after CRLF is removed once; dots elsewhere (or after bare LF) stay."""
        stream = b"..a\r\n...\r\nb.c\r\n.\rx\r\nx\n.y\r\n.\r\n"
        self.assertEqual(feed_all([stream])[0], b".a\n..\nb.c\n\nx\nx\n.y\n")

    def test_empty_message_and_first_line_dot(self) -> None:
        """ "." CRLF right after 354 ends an empty message; the body after it is leftover."""
        self.assertEqual(feed_all([b".\r\nNOOP\r\n"]), (b"", True, b"NOOP\r\n"))
        self.assertEqual(feed_all([b".", b"\r", b"\n"]), (b"", True, b""))
        self.assertEqual(feed_all([b"\r\n.\r\n"]), (b"\n", True, b""))

    def test_not_done_without_marker(self) -> None:
        """Without CRLF.CRLF nothing ends, whatever the chunks; a pending CR is not yet emitted."""
        body, done, leftover = feed_all([b"abc\r\n.", b"\n", b"x\r"])
        self.assertFalse(done)
        self.assertEqual((body, leftover), (b"abc\n\nx", b""))

    def test_endless_line_is_passed_through(self) -> None:
        """A line of any length streams through: output equals input, nothing is held back."""
        reader = DataReader()
        total = 0
        for _ in range(160):
            out, done, _ = reader.feed(b"x" * 65536)
            self.assertFalse(done)
            self.assertEqual(len(out), 65536)
            total += len(out)
        self.assertEqual(total, 160 * 65536)
        self.assertEqual(reader.feed(b"\r\n.\r\n"), (b"\n", True, b""))

    def test_feeding_after_the_end_is_an_error(self) -> None:
        """The reader is single-use: its caller must switch back to commands."""
        reader = DataReader()
        reader.feed(b".\r\n")
        self.assertTrue(reader.done)
        self.assertRaises(ValueError, reader.feed, b"x")

    @settings(max_examples=500, deadline=None)
    @given(
        st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b"\r\n.\r\n"]), max_size=40),
        st.lists(st.integers(min_value=0, max_value=200), max_size=12),
    )
    def test_any_chunking_matches_the_reference(self, pieces: list[bytes], cuts: list[int]) -> None:
        """Split anywhere (CR, LF and dot across boundaries), the result equals the reference."""
        stream = b"".join(pieces)
        whole = feed_all([stream])
        split = feed_all(chunked(stream, cuts))
        self.assertEqual(split, whole)
        expected = reference(stream)
        if expected is None:
            self.assertFalse(whole[1])
            self.assertEqual(whole[2], b"")
        else:
            self.assertEqual((whole[0], whole[2]), expected)
            self.assertTrue(whole[1])

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.text(alphabet="a.\r\n ", max_size=8), max_size=10),
        st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    )
    def test_round_trip_of_a_correctly_stuffed_message(self, lines: list[str], cuts: list[int]) -> None:
        """A sender that stuffs dots and uses CRLF gets back exactly its lines, LF-terminated."""
        clean = [line.replace("\r", "").replace("\n", "") for line in lines]
        wire = b"".join((b"." if line.startswith(".") else b"") + line.encode() + b"\r\n" for line in clean)
        body, done, leftover = feed_all(chunked(wire + b".\r\n", cuts))
        self.assertEqual(body, b"".join(line.encode() + b"\n" for line in clean))
        self.assertTrue(done)
        self.assertEqual(leftover, b"")
