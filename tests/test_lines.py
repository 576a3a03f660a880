"""The shared command-line reader: line ends, over-long lines, bounded memory."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kms.lines import TOO_LONG, LineReader


def drain(reader: LineReader, inbox: bytearray) -> list[object]:
    out: list[object] = []
    while (line := reader.take(inbox)) is not None:
        out.append(line)
    return out


class LineReaderTests(TestCase):
    def test_line_ends(self) -> None:
        """LF ends a line, one CR before it is dropped, a lone CR is data; partial lines wait."""
        inbox = bytearray(b"A\r\nB\nC\rD\r\npart")
        self.assertEqual(drain(LineReader(100), inbox), [b"A", b"B", b"C\rD"])
        self.assertEqual(inbox, b"part")

    def test_too_long_reported_once_and_dropped_as_it_arrives(self) -> None:
        """An endless line: TOO_LONG once, the buffer never grows, the next line is read normally."""
        reader = LineReader(10)
        inbox = bytearray()
        results = []
        for _ in range(1000):
            inbox += b"x" * 1000
            results += drain(reader, inbox)
            self.assertLessEqual(len(inbox), 1000)
        self.assertEqual(results, [TOO_LONG])
        inbox += b"tail of it\r\nNOOP\r\n"
        self.assertEqual(drain(reader, inbox), [b"NOOP"])

    def test_limit_boundaries(self) -> None:
        """Exactly the limit is a line; one more byte is too long (complete or not)."""
        self.assertEqual(drain(LineReader(4), bytearray(b"abcd\r\n")), [b"abcd"])
        self.assertEqual(drain(LineReader(4), bytearray(b"abcde\r\nok\n")), [TOO_LONG, b"ok"])
        self.assertEqual(drain(LineReader(4), bytearray(b"abcd\r")), [])  # the CR may precede an LF

    @given(st.lists(st.binary(max_size=30), max_size=20), st.lists(st.integers(1, 40), max_size=10))
    def test_any_chunking_gives_the_same_lines(self, lines: list[bytes], cuts: list[int]) -> None:
        """However the stream is cut into chunks, the same lines come out."""
        lines = [line.replace(b"\n", b"") for line in lines]
        stream = b"".join(line + b"\r\n" for line in lines)
        whole = drain(LineReader(1000), bytearray(stream))
        reader, inbox, pieces, start = LineReader(1000), bytearray(), [], 0
        for cut in [*cuts, len(stream)]:
            inbox += stream[start : start + cut]
            start += cut
            pieces += drain(reader, inbox)
        inbox += stream[start:]
        pieces += drain(reader, inbox)
        self.assertEqual(pieces, whole)
        self.assertEqual(whole, lines)  # only the CR of each CRLF is taken off
