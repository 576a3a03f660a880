"""TNEF (winmail.dat) to MIME: every sample in the shared testdata, name sanitizing, limits."""

from __future__ import annotations

import base64
import os
import struct
from email import message_from_bytes
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import default
from pathlib import Path

import tnefparse
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, TestCase

from kms.convert import convert_message
from kms.convert.names import attachment_part, sanitize_filename, unique_names
from kms.convert.rtf import RTFError, decompress_rtf
from kms.convert.tnef import TNEFError, decode_tnef

# Samples from tnefparse 1.4.0 (tests/examples, LGPL v3), see /work/shared/testdata/README.md.
# The shared folder sits beside the checkout (as in CI); KMS_TNEF_SAMPLES overrides it.
SAMPLES = os.environ.get(
    "KMS_TNEF_SAMPLES", str(Path(__file__).resolve().parents[2] / "shared" / "testdata" / "tnef")
)

GOOD = {
    "one-file.tnef": ["AUTHORS"],
    "two-files.tnef": ["AUTHORS", "README"],
    "body.tnef": [],
    "rtf.tnef": [],
    "triples.tnef": [],
    "umlaut.tnef": ["TBZ PARIV GmbH.jpg", "image003.jpg", "UmlautAnhang-äüö.txt"],
    "long-filename.tnef": ["allproductsmar2000.dat"],
    "missing-filenames.tnef": [
        "generpts.src",
        "TechlibDEC99.doc",
        "TechlibDEC99-JAN00.doc",
        "TechlibNOV99.doc",
    ],
    "data-before-name.tnef": ["AUTOEXEC.BAT", "CONFIG.SYS", "boot.ini"],
    "MAPI_ATTACH_DATA_OBJ.tnef": ["VIA_Nytt_1402.doc", "VIA_Nytt_1402.pdf", "VIA_Nytt_14021.htm"],
    "MAPI_OBJECT.tnef": ["Untitled_Attachment"],
    "multi-value-attribute.tnef": ["208225__5_seconds__Voice_Mail.mp3"],
    "unicode-mapi-attr-name.tnef": ["spaconsole2.cfg", "image001.png", "image002.png", "image003.png"],
    "unicode-mapi-attr.tnef": ["example.dat"],
}
BODY_TYPES = {
    "body.tnef": ["text/html"],
    "rtf.tnef": ["text/rtf"],
    "triples.tnef": ["text/plain"],
    "unicode-mapi-attr.tnef": ["text/plain", "text/html"],
    "umlaut.tnef": ["text/rtf"],
}
BAD = {
    "bad_checksum.tnef": "checksum",
    # MAPI_ATTACH_DATA_OBJ.tnef with two names edited by hand, which broke their checksums (listed as
    # malformed on purpose in testdata/README.md); repair_checksums() gives the well-formed variant.
    "duplicate_filename.tnef": "checksum",
    "IPM-DistList.tnef": "checksum",
    "garbage-at-end.tnef": "trailing garbage",
    "multi-name-property.tnef": "neither a body nor attachments",
}


def sample(name: str) -> bytes:
    path = os.path.join(SAMPLES, name)
    if not os.path.exists(path):
        raise SkipTest(f"TNEF sample {path} not available")
    with open(path, "rb") as f:
        return f.read()


def repair_checksums(tnef: bytes) -> bytes:
    """The same TNEF with every object's checksum recomputed (the sum of its data bytes, mod 2**16)."""
    data = bytearray(tnef)
    pos = 6  # signature and key
    while pos < len(data):
        (length,) = struct.unpack_from("<I", data, pos + 5)  # after the level byte and attribute id
        start = pos + 9
        struct.pack_into("<H", data, start + length, sum(data[start : start + length]) & 0xFFFF)
        pos = start + length + 2
    return bytes(data)


def wrap(tnef: bytes, linesep: str = "\r\n") -> bytes:
    msg = MIMEMultipart("mixed")
    msg["From"] = "a@example.test"
    msg["To"] = "b@example.test"
    msg["Subject"] = "winmail"
    msg.attach(MIMEText("see attached\n"))
    part = MIMEApplication(tnef, "ms-tnef")
    part.add_header("Content-Disposition", "attachment", filename="winmail.dat")
    msg.attach(part)
    return msg.as_bytes(policy=default.clone(linesep=linesep))


def attachments(data: bytes) -> list[tuple[str, str | None, bytes]]:
    msg = message_from_bytes(data, policy=default)
    return [
        (p.get_content_type(), p.get_filename(), p.get_payload(decode=True))
        for p in msg.walk()
        if not p.is_multipart()
    ]


class SampleTests(TestCase):
    def test_good_samples(self) -> None:
        for name, expected in GOOD.items():
            raw = sample(name)
            parsed = tnefparse.TNEF(raw)
            out, report = convert_message(wrap(raw))
            self.assertTrue(report.changed, (name, report))
            self.assertEqual(report.problems, [], name)
            parts = attachments(out)
            self.assertEqual(parts[0][:2], ("text/plain", None))
            self.assertNotIn("application/ms-tnef", [p[0] for p in parts], name)
            named = [(f, d) for (_, f, d) in parts if f]
            self.assertEqual([f for f, _ in named], expected, name)
            # identical bytes
            self.assertEqual([d for _, d in named], [bytes(a.data) for a in parsed.attachments], name)
            if name in BODY_TYPES:
                bodies = [t for (t, f, _) in parts[1:] if f is None]
                self.assertEqual(bodies, BODY_TYPES[name], name)

    def test_rtf_body_is_rtf(self) -> None:
        out, _ = convert_message(wrap(sample("rtf.tnef")))
        rtf = [d for (t, _, d) in attachments(out) if t == "text/rtf"][0]
        self.assertTrue(rtf.startswith(b"{\\rtf1"))
        self.assertTrue(rtf.rstrip().endswith(b"}"))

    def test_bad_samples_kept(self) -> None:
        for name, reason in BAD.items():
            raw = sample(name)
            original = wrap(raw)
            out, report = convert_message(original)
            self.assertIs(out, original, name)
            self.assertFalse(report.changed)
            self.assertEqual(len(report.problems), 1, name)
            self.assertIn(reason, report.problems[0], name)
            self.assertIn("winmail.dat", report.problems[0])

    def test_duplicate_names_made_distinct(self) -> None:
        """Two attachments called file_abcdefgh.txt: both delivered, the second as "file_abcdefgh (2).txt"."""
        raw = repair_checksums(sample("duplicate_filename.tnef"))
        self.assertEqual(
            [a.long_filename() for a in tnefparse.TNEF(raw, do_checksum=True).attachments],
            ["file_abcdefgh.txt", "file_abcdefgh.txt", "VIA_Nytt_14021.htm"],
        )
        out, report = convert_message(wrap(raw))
        self.assertEqual(report.problems, [])
        named = [(f, d) for (_, f, d) in attachments(out) if f]
        self.assertEqual(
            [f for f, _ in named], ["file_abcdefgh.txt", "file_abcdefgh (2).txt", "VIA_Nytt_14021.htm"]
        )
        original = tnefparse.TNEF(sample("MAPI_ATTACH_DATA_OBJ.tnef")).attachments
        self.assertEqual([d for _, d in named], [bytes(a.data) for a in original])

    def test_lf_message(self) -> None:
        out, report = convert_message(wrap(sample("two-files.tnef"), "\n"))
        self.assertTrue(report.changed)
        self.assertNotIn(b"\r\n", out)
        self.assertEqual([f for (_, f, _) in attachments(out) if f], ["AUTHORS", "README"])

    def test_crlf_message(self) -> None:
        out, report = convert_message(wrap(sample("two-files.tnef")))
        self.assertTrue(report.changed)
        self.assertNotIn(b"\n", out.replace(b"\r\n", b""))

    def test_single_part_tnef_message(self) -> None:
        raw = sample("one-file.tnef")
        msg = (
            b"From: a@example.test\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: application/ms-tnef; name=winmail.dat\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(raw).replace(b"\n", b"\r\n")
        )
        out, report = convert_message(msg)
        self.assertTrue(report.changed)
        parsed = message_from_bytes(out, policy=default)
        self.assertEqual(parsed.get_content_type(), "multipart/mixed")
        self.assertEqual(parsed["Subject"], "x")
        self.assertEqual([f for (_, f, _) in attachments(out) if f], ["AUTHORS"])

    def test_octet_stream_winmail_dat(self) -> None:
        raw = sample("one-file.tnef")
        msg = MIMEMultipart()
        part = MIMEApplication(raw)
        part.add_header("Content-Disposition", "attachment", filename="WINMAIL.DAT")
        msg.attach(part)
        out, report = convert_message(msg.as_bytes())
        self.assertTrue(report.changed)

    def test_disabled(self) -> None:
        original = wrap(sample("one-file.tnef"))
        out, report = convert_message(original, tnef=False)
        self.assertIs(out, original)

    def test_non_ascii_name_rfc2231(self) -> None:
        out, _ = convert_message(wrap(sample("umlaut.tnef")))
        self.assertIn(b"filename*=utf-8''UmlautAnhang-%C3%A4%C3%BC%C3%B6.txt", out)

    def test_size_limit(self) -> None:
        raw = sample("two-files.tnef")
        original = wrap(raw)
        out, report = convert_message(original, max_size=1000)
        self.assertIs(out, original)
        self.assertIn("size limit", report.problems[0])
        # the converted message as a whole must also fit
        converted, _ = convert_message(original)
        out, report = convert_message(original, max_size=len(converted) - 1)
        self.assertIs(out, original)
        self.assertIn("exceed the maximum size", report.problems[0])
        with self.assertRaises(TNEFError) as e:
            decode_tnef(raw, max_size=500)
        self.assertIn("size limit", str(e.exception))

    def test_expansion_limit(self) -> None:
        # ratio limit: decoded content may not exceed 4x the TNEF size
        raw = sample("one-file.tnef")
        import kms.convert.tnef as t

        self.patch(t, "EXPANSION_FACTOR", 0.05)
        with self.assertRaises(TNEFError):
            decode_tnef(raw)

    def test_not_tnef(self) -> None:
        for data in (b"", b"xx", b"\x00" * 100, b"\x78\x9f\x3e\x22" + b"\xff" * 50):
            with self.assertRaises(TNEFError):
                decode_tnef(data)

    def test_truncated_samples_never_raise_other(self) -> None:
        raw = sample("two-files.tnef")
        for cut in range(0, len(raw), 37):
            try:
                decode_tnef(raw[:cut])
            except TNEFError:
                pass


class RTFTests(TestCase):
    def test_short(self) -> None:
        self.assertRaises(RTFError, decompress_rtf, b"abc")

    def test_uncompressed_mela(self) -> None:
        body = b"{\\rtf1 hi}"
        import struct

        data = struct.pack("<IIII", len(body) + 12, len(body), 0x414C454D, 0) + body
        self.assertEqual(decompress_rtf(data), body)

    def test_spec_example(self) -> None:
        # MS-OXRTFCP 3.1.1 example
        data = bytes.fromhex(
            "2d0000002b0000004c5a4675f1c5c7a703000a007263706731323542320af32068656c090020627705b06c647d0a800fa0"
        )
        self.assertEqual(decompress_rtf(data), b"{\\rtf1\\ansi\\ansicpg1252\\pard hello world}\r\n")


class NameTests(TestCase):
    def test_sanitize(self) -> None:
        cases = [
            ("report.pdf", "report.pdf"),
            ("../../etc/passwd", "passwd"),
            ("..\\..\\windows\\system32\\cmd.exe", "cmd.exe"),
            ("/absolute/path.txt", "path.txt"),
            ("C:evil.txt", "evil.txt"),
            ("a\r\nb\x00c\x1b.txt", "abc.txt"),
            ("", "attachment"),
            ("..", "attachment"),
            ("dir/", "dir"),
            ("  .hidden ", "hidden"),
            ("x" * 300 + ".txt", "x" * 116 + ".txt"),
            ("y" * 300, "y" * 120),
            ("naïve ☃.txt", "naïve ☃.txt"),
            (b"bytes\xff.bin", "bytes\ufffd.bin"),
        ]
        for given_, expected in cases:
            self.assertEqual(sanitize_filename(given_), expected, repr(given_))

    def test_unique_names(self) -> None:
        cases = [
            (["a.pdf", "b.pdf"], ["a.pdf", "b.pdf"]),
            (["report.pdf", "report.pdf", "Report.PDF"], ["report.pdf", "report (2).pdf", "Report (3).PDF"]),
            (["x (2).txt", "x.txt", "x.txt"], ["x (2).txt", "x.txt", "x (3).txt"]),
            (["noext", "noext", ".hidden"], ["noext", "noext (2)", "hidden"]),
            (["../a/f.txt", "b\\f.txt"], ["f.txt", "f (2).txt"]),
            (["", None, b""], ["attachment", "attachment (2)", "attachment (3)"]),
            (["y" * 300, "y" * 300], ["y" * 120, "y" * 116 + " (2)"]),
            (["z" * 300 + ".txt"] * 2, ["z" * 116 + ".txt", "z" * 112 + " (2).txt"]),
        ]
        for given_, expected in cases:
            self.assertEqual(unique_names(given_), expected, repr(given_))

    @given(st.lists(st.one_of(st.sampled_from(["a.txt", "A.txt", "a (2).txt", "x" * 130, ""]), st.text())))
    def test_unique_names_arbitrary(self, names: list[str]) -> None:
        """Always distinct (ignoring case), each a fixed point of sanitizing, within the length limit."""
        got = unique_names(names)
        self.assertEqual(len(got), len(names))
        self.assertEqual(len({n.casefold() for n in got}), len(got))
        for name in got:
            self.assertEqual(sanitize_filename(name), name)
            self.assertLessEqual(len(name), 120)

    def test_part_types(self) -> None:
        self.assertEqual(attachment_part("a.pdf", b"x").get_content_type(), "application/pdf")
        self.assertEqual(attachment_part("a.tar.gz", b"x").get_content_type(), "application/octet-stream")
        self.assertEqual(attachment_part("noext", b"x").get_content_type(), "application/octet-stream")

    @given(st.text())
    def test_sanitize_arbitrary(self, name: str) -> None:
        clean = sanitize_filename(name)
        self.assertTrue(clean)
        self.assertLessEqual(len(clean), 120)
        self.assertNotIn("/", clean)
        self.assertNotIn("\\", clean)
        self.assertFalse(any(ord(c) < 32 or ord(c) == 127 for c in clean))
        self.assertEqual(sanitize_filename(clean), clean)
        attachment_part(name, b"data").as_bytes()


class ArbitraryTests(TestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=4000))
    def test_decode_tnef_arbitrary(self, data: bytes) -> None:
        try:
            decode_tnef(b"\x78\x9f\x3e\x22" + data)
        except TNEFError:
            pass

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=3000))
    def test_convert_message_arbitrary(self, data: bytes) -> None:
        out, report = convert_message(data)
        self.assertIsInstance(out, bytes)

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=2000))
    def test_wrapped_garbage_kept(self, data: bytes) -> None:
        original = wrap(b"\x78\x9f\x3e\x22" + data)
        out, report = convert_message(original)
        if not report.changed:
            self.assertIs(out, original)

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=2000))
    def test_rtf_arbitrary(self, data: bytes) -> None:
        try:
            decompress_rtf(data)
        except RTFError:
            pass
