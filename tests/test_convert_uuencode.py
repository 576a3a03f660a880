"""uuencoded blocks in text/plain bodies become MIME attachments; malformed blocks stay."""

from __future__ import annotations

import binascii
from email import message_from_bytes
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import default

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kms.convert import convert_message
from kms.convert.uuencode import find_blocks, split_text


def uuencode(data: bytes, name: str = "file.bin", mode: str = "644", nl: bytes = b"\n") -> bytes:
    lines = [f"begin {mode} {name}".encode()]
    for i in range(0, len(data), 45):
        lines.append(binascii.b2a_uu(data[i : i + 45], backtick=True).rstrip(b"\n"))
    lines += [b"`", b"end"]
    return nl.join(lines) + nl


def simple(body: bytes, nl: bytes = b"\r\n", headers: bytes = b"") -> bytes:
    return (
        b"From: a@example.test" + nl + b"To: b@example.test" + nl + b"Subject: uu" + nl + headers + nl + body
    )


def parts(data: bytes) -> list[tuple[str, str | None, bytes]]:
    msg = message_from_bytes(data, policy=default)
    return [
        (p.get_content_type(), p.get_filename(), p.get_payload(decode=True))
        for p in msg.walk()
        if not p.is_multipart()
    ]


PAYLOAD = bytes(range(256)) * 3


class FindBlockTests(TestCase):
    def test_table(self) -> None:
        good = uuencode(b"hello world\n", "hello.txt")
        cases = [
            # (text, expected [(name, data)])
            (good, [("hello.txt", b"hello world\n")]),
            (b"before\n" + good + b"after\n", [("hello.txt", b"hello world\n")]),
            (good.replace(b"\n", b"\r\n"), [("hello.txt", b"hello world\n")]),
            (uuencode(b""), [("file.bin", b"")]),
            (uuencode(PAYLOAD, "a b.bin", "0600"), [("a b.bin", PAYLOAD)]),
            (uuencode(b"x", "one") + uuencode(b"yy", "two"), [("one", b"x"), ("two", b"yy")]),
            # malformed: no end line
            (good.replace(b"end\n", b""), []),
            # malformed: garbage line inside
            (good.replace(b"`\n", b"this is not uuencoded at all!!\n"), []),
            # malformed: bad mode
            (good.replace(b"begin 644", b"begin rw-"), []),
            # malformed: no name
            (b"begin 644\n`\nend\n", []),
            # malformed: empty line inside the block
            (good.replace(b"`\n", b"\n`\n"), []),
            # text that merely mentions begin
            (b"let us begin 644 things\nend\n", []),
            # malformed first block, good second one
            (good.replace(b"end\n", b"") + uuencode(b"z", "z.txt"), [("z.txt", b"z")]),
        ]
        for text, expected in cases:
            found = [(b.name, b.data) for b in find_blocks(text)]
            self.assertEqual(found, expected, text[:80])

    def test_mode(self) -> None:
        self.assertEqual(find_blocks(uuencode(b"x", mode="755"))[0].mode, 0o755)

    def test_split(self) -> None:
        text = b"Hello\n" + uuencode(b"data", "d.bin") + b"Bye\n"
        rest, files = split_text(text)
        self.assertEqual(rest, b"Hello\nBye\n")
        self.assertEqual(files, [("d.bin", b"data")])

    def test_checksum_char_tolerated(self) -> None:
        line = binascii.b2a_uu(b"abc", backtick=True).rstrip(b"\n")
        text = b"begin 644 c\n" + line + b"Q\n`\nend\n"
        self.assertEqual([b.data for b in find_blocks(text)], [b"abc"])
        text = b"begin 644 c\n" + line + b"QQQQ\n`\nend\n"
        self.assertEqual(find_blocks(text), [])


class MessageTests(TestCase):
    def test_single_part(self) -> None:
        for nl in (b"\r\n", b"\n"):
            body = b"Hi," + nl + uuencode(PAYLOAD, "data.bin", nl=nl) + b"bye" + nl
            out, report = convert_message(simple(body, nl))
            self.assertTrue(report.changed)
            self.assertEqual(report.problems, [])
            got = parts(out)
            self.assertEqual(
                [(t, f) for t, f, _ in got], [("text/plain", None), ("application/octet-stream", "data.bin")]
            )
            self.assertEqual(got[0][2].replace(b"\r\n", b"\n"), b"Hi,\nbye\n")
            self.assertEqual(got[1][2], PAYLOAD)
            msg = message_from_bytes(out, policy=default)
            self.assertEqual(msg["Subject"], "uu")
            if nl == b"\n":
                self.assertNotIn(b"\r\n", out)
            else:
                self.assertNotIn(b"\n", out.replace(b"\r\n", b""))

    def test_multiple_files(self) -> None:
        body = uuencode(b"one", "1.txt") + b"middle\n" + uuencode(b"\x89PNG", "2.png")
        out, report = convert_message(simple(body, b"\n"))
        got = parts(out)
        self.assertEqual(
            [(t, f, d) for t, f, d in got[1:]],
            [("text/plain", "1.txt", b"one"), ("image/png", "2.png", b"\x89PNG")],
        )
        self.assertEqual(got[0][2], b"middle\n")

    def test_same_name_twice(self) -> None:
        """Two blocks named alike become "a.txt" and "a (2).txt", not one file hiding the other."""
        body = uuencode(b"first", "a.txt") + uuencode(b"second", "A.TXT") + uuencode(b"third", "a.txt")
        out, _ = convert_message(simple(body, b"\n"))
        got = [(f, d) for _, f, d in parts(out)]
        self.assertEqual(got, [("a.txt", b"first"), ("A (2).TXT", b"second"), ("a (3).txt", b"third")])

    def test_only_attachment_no_body(self) -> None:
        out, report = convert_message(simple(uuencode(b"x", "x.bin"), b"\n"))
        self.assertEqual([f for _, f, _ in parts(out)], ["x.bin"])

    def test_in_multipart(self) -> None:
        msg = MIMEMultipart()
        msg["Subject"] = "mp"
        msg.attach(MIMEText("text\n" + uuencode(b"abc", "abc.txt").decode()))
        html = MIMEText("<p>begin 644 x</p>", "html")
        msg.attach(html)
        out, report = convert_message(msg.as_bytes())
        got = parts(out)
        self.assertEqual(
            [(t, f) for t, f, _ in got],
            [("text/plain", None), ("text/plain", "abc.txt"), ("text/html", None)],
        )

    def test_quoted_printable_body(self) -> None:
        from email import charset

        cs = charset.Charset("utf-8")
        cs.body_encoding = charset.QP
        m = MIMEText("", "plain")
        m.set_payload("x\n" + uuencode(b"q", "q.bin").decode(), cs)
        out, report = convert_message(m.as_bytes())
        self.assertEqual([f for _, f, _ in parts(out)], [None, "q.bin"])

    def test_path_tricks_in_names(self) -> None:
        for name, expected in [
            ("../../etc/passwd", "passwd"),
            ("C:\\win\\evil.exe", "evil.exe"),
            ("/tmp/x.txt", "x.txt"),
            ("ünï.txt", "ünï.txt"),
            ("..", "attachment"),
        ]:
            body = uuencode(b"z", "PLACEHOLDER").replace(b"PLACEHOLDER", name.encode())
            out, report = convert_message(simple(body, b"\n"))
            self.assertEqual([f for _, f, _ in parts(out)], [expected], name)

    def test_untouched_identical(self) -> None:
        cases = [
            simple(b"no attachments here\r\n"),
            simple(b"begin 644 x\r\nnot uu at all, no end\r\n"),
            simple(uuencode(b"abc").replace(b"end\n", b"")),
            simple(uuencode(b"abc"), headers=b"Content-Type: text/html\r\n"),
            simple(
                uuencode(b"abc"), headers=b"Content-Type: text/plain\r\nContent-Disposition: attachment\r\n"
            ),
        ]
        for data in cases:
            out, report = convert_message(data)
            self.assertIs(out, data)
            self.assertFalse(report.changed)

    def test_malformed_reported(self) -> None:
        _, report = convert_message(simple(b"begin 644 x\r\ngarbage!!\r\nend\r\n"))
        self.assertEqual(len(report.problems), 1)

    def test_disabled(self) -> None:
        data = simple(uuencode(b"abc"))
        out, _ = convert_message(data, uuencode=False)
        self.assertIs(out, data)


class ArbitraryTests(TestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=2000))
    def test_find_blocks_arbitrary(self, data: bytes) -> None:
        split_text(b"begin 644 f\n" + data + b"\nend\n")

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=3000), st.sampled_from([b"\n", b"\r\n"]))
    def test_convert_arbitrary(self, data: bytes, nl: bytes) -> None:
        out, _ = convert_message(simple(b"begin 644 f" + nl + data + nl + b"end" + nl, nl))
        self.assertIsInstance(out, bytes)

    @settings(max_examples=200, deadline=None)
    @given(
        st.binary(max_size=2000),
        st.text(min_size=1, max_size=50).filter(lambda s: "\n" not in s and "\r" not in s and s.strip() == s),
    )
    def test_roundtrip(self, data: bytes, name: str) -> None:
        text = uuencode(data, "n").replace(b" n\n", b" " + name.encode() + b"\n", 1)
        found = find_blocks(text)
        self.assertEqual([b.data for b in found], [data])
