"""The folder index's pure parts: flags in names, the uidlist format, lazy meta."""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kms.imap.message import analyze
from kms.store.index import (
    LazyMeta,
    UidValidities,
    _fast_info,
    _GcPaused,
    delivery_order,
    directory_stamp,
    message_flags,
    meta_text,
    name_with_flags,
    normalize_flags,
    parse_uidlist,
    read_sized,
    split_name,
    uidlist_header,
    uidlist_lines,
)
from kms.store.interfaces import KnownDetails, MessageInfo


class FlagNameTests(TestCase):
    def test_split(self) -> None:
        self.assertEqual(split_name("123.M4P5.host,S=10:2,FS"), ("123.M4P5.host,S=10", "FS"))
        self.assertEqual(split_name("123.M4P5.host,S=10"), ("123.M4P5.host,S=10", ""))

    def test_letters_in_ascii_order_unknown_kept(self) -> None:
        flags = {"\\Seen", "\\Draft", "\\Deleted", "\\Answered", "\\Flagged", "work"}
        self.assertEqual(name_with_flags("x,S=1", flags), "x,S=1:2,DFRST")
        self.assertEqual(name_with_flags("x,S=1:2,PS", {"\\Flagged"}), "x,S=1:2,FP")
        self.assertEqual(name_with_flags("x,S=1:2,S", ()), "x,S=1:2,")

    def test_delivery_order(self) -> None:
        """Names sort by the numbers they carry, not as strings (M99 was made before M100)."""
        names = [
            "1700000001.M5P1Q1R0.h,S=1",
            "1700000000.M100P1Q2R0.h,S=1",
            "1700000000.M99P1Q10R0.h,S=1",
            "1700000000.M99P1Q9R0.h,S=1",
            "odd-name",
            "1700000000.P7Q3.h",
        ]
        self.assertEqual(
            sorted(names, key=delivery_order),
            [
                "odd-name",
                "1700000000.P7Q3.h",
                "1700000000.M99P1Q9R0.h,S=1",
                "1700000000.M99P1Q10R0.h,S=1",
                "1700000000.M100P1Q2R0.h,S=1",
                "1700000001.M5P1Q1R0.h,S=1",
            ],
        )

    def test_message_flags(self) -> None:
        self.assertEqual(message_flags("x:2,PRS", "$Junk work"), {"\\Answered", "\\Seen", "$Junk", "work"})
        self.assertEqual(message_flags("x", ""), frozenset())

    def test_normalize(self) -> None:
        self.assertEqual(
            normalize_flags(["\\seen", "\\RECENT", "\\Bogus", "$Label1", "", "two words", "\\DELETED"]),
            {"\\Seen", "\\Deleted", "$Label1"},
        )
        self.assertIs(normalize_flags(["\\Seen"]), normalize_flags(["\\seen"]))  # shared objects


class DirectoryStampTests(TestCase):
    def test_settled_directories_only(self) -> None:
        """A stamp is (mtime, inode) once the mtime is two seconds old; before that, no promise."""
        path = self.mktemp()
        os.mkdir(path)
        now = time.time_ns()
        os.utime(path, ns=(now - 3 * 10**9, now - 3 * 10**9))
        st = os.stat(path)
        self.assertEqual(directory_stamp(st, now), (now - 3 * 10**9, st.st_ino))
        self.assertEqual(directory_stamp(st, now - 1_500_000_000), (0, 0))
        os.utime(path, ns=(now, now))
        self.assertEqual(directory_stamp(os.stat(path), now), (0, 0))


class UidListTests(TestCase):
    def test_round_trip(self) -> None:
        data = uidlist_header(1700000000, 5) + uidlist_lines([(1, "a,S=1"), (3, "b,S=2")])
        parsed = parse_uidlist(data)
        assert parsed is not None
        self.assertEqual((parsed.uidvalidity, parsed.uidnext), (1700000000, 5))
        self.assertEqual(parsed.uids, {"a,S=1": 1, "b,S=2": 3})
        self.assertEqual(parsed.length, len(data))

    def test_uidnext_is_past_the_last_line(self) -> None:
        parsed = parse_uidlist(b"V7 N1\n1 a\n9 b\n")
        assert parsed is not None
        self.assertEqual(parsed.uidnext, 10)

    def test_torn_tail_ignored(self) -> None:
        parsed = parse_uidlist(b"V7 N1\n1 a\n2 b")
        assert parsed is not None
        self.assertEqual(parsed.uids, {"a": 1})
        self.assertEqual(parsed.length, len(b"V7 N1\n1 a\n"))

    def test_from_an_offset(self) -> None:
        """Only the lines after the cache's absorbed mark are parsed; UID order still checked."""
        head = b"V7 N1\n1 a\n5 b\n"
        parsed = parse_uidlist(head + b"6 c\n", len(head))
        assert parsed is not None
        self.assertEqual((parsed.uids, parsed.uidnext, parsed.lines), ({"c": 6}, 7, 3))
        parsed = parse_uidlist(head, len(head))
        assert parsed is not None
        self.assertEqual((parsed.uids, parsed.uidnext), ({}, 6))
        self.assertIsNone(parse_uidlist(head + b"4 c\n", len(head)))
        self.assertIsNone(parse_uidlist(head, len(head) - 1))  # not a line start
        self.assertIsNone(parse_uidlist(head, len(head) + 1))

    def test_unusable(self) -> None:
        for data in [
            b"",
            b"garbage\n",
            b"V0 N1\n",
            b"V7 N1\n2 a\n1 b\n",  # not increasing
            b"V7 N1\n1 a\n1 b\n",
            b"V7 N1\nx a\n",
            b"V7 N1\n1 \n",
            b"V7 N1\n1 a b\n",
            b"V7 N1\n-1 a\n",
            b"V99999999999 N1\n",
        ]:
            self.assertIsNone(parse_uidlist(data), data)


class LazyMetaTests(TestCase):
    def test_mapping(self) -> None:
        meta = LazyMeta('{"subject": "hi", "n": [1, 2]}')
        self.assertEqual(meta["subject"], "hi")
        self.assertEqual(dict(meta), {"subject": "hi", "n": [1, 2]})
        self.assertEqual(len(meta), 2)
        self.assertEqual(LazyMeta("[1]"), {})
        self.assertEqual(LazyMeta("{broken"), {})

    def test_flat_form_round_trip(self) -> None:
        """What the IMAP analyzer returns is stored flat, read item by item, and equal to it."""
        wire = (
            b'From: "Ann \\"A\\"" <ann@x.test>\r\nTo: b@x.test\r\nSubject: =?utf-8?q?caf=C3=A9?= \xc3\xa9\r\n'
            b"Date: Tue, 14 Nov 2023 22:16:37 +0100\r\n\r\nbody\r\n"
        )
        meta = analyze(wire)
        text = meta_text(meta)
        self.assertTrue(text.startswith("\x00"))
        lazy = LazyMeta(text)
        for key in meta:
            self.assertEqual(lazy[key], meta[key])
        self.assertEqual(lazy, meta)
        self.assertEqual(lazy.get("search", {}).get("subject"), meta["search"]["subject"])  # type: ignore[union-attr]
        self.assertIsNone(lazy["search"].get("cc"))  # type: ignore[union-attr]
        self.assertEqual((lazy.get("nope"), "sent" in lazy, len(lazy)), (None, True, 5))
        self.assertIs(meta_text(lazy), text)

    @given(
        st.dictionaries(
            st.text(max_size=5),
            st.one_of(
                st.none(),
                st.integers(),
                st.text(max_size=8),
                st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3),
                st.lists(st.integers(), max_size=2),
                st.booleans(),
            ),
            max_size=4,
        )
    )
    def test_any_meta_reads_back_equal(self, meta: dict[str, object]) -> None:
        """Keys that look like other keys or separators, texts holding them, values the flat form
        cannot hold (JSON then): every meta reads back as it was."""
        lazy = LazyMeta(meta_text(meta))
        self.assertEqual(dict(lazy), meta)
        for key, value in meta.items():
            self.assertEqual(lazy[key], value)
        self.assertNotIn("absent" + "\x00", lazy)

    def test_may_contain(self) -> None:
        """SEARCH's quick test rules out a message only when the item is there without the text."""
        lazy = LazyMeta(meta_text({"search": {"from": "ann <ann@x.test>", "subject": "hi"}, "n": "carol"}))
        self.assertTrue(lazy.may_contain("search", "ann@x"))
        self.assertTrue(lazy.may_contain("search", "subject"))  # a key: True is always allowed
        self.assertFalse(lazy.may_contain("search", "carol"))  # in another item only
        self.assertTrue(lazy.may_contain("absent", "carol"))  # the caller decodes another source
        self.assertTrue(LazyMeta('{"search": {"from": "x"}}').may_contain("search", "carol"))  # JSON
        self.assertTrue(LazyMeta("\x00ksearch\x00d\x01from\x01x").may_contain("search", "carol"))  # damaged

    @given(
        st.dictionaries(
            st.sampled_from(["search", "s", "searc", "\x00ksearch"]),
            st.one_of(
                st.text(max_size=8), st.dictionaries(st.text(max_size=4), st.text(max_size=6), max_size=3)
            ),
            max_size=3,
        ),
        st.text(max_size=3),
    )
    def test_may_contain_never_rules_out_a_match(self, meta: dict[str, object], text: str) -> None:
        value = meta.get("search")
        strings = [value] if isinstance(value, str) else [] if value is None else [*value, *value.values()]
        if not LazyMeta(meta_text(meta)).may_contain("search", text):
            self.assertIn("search", meta)
            self.assertFalse(any(text in string for string in strings))

    def test_damaged_flat_text(self) -> None:
        """A damaged row reads as missing items, never as an exception from FETCH's ``get``."""
        lazy = LazyMeta("\x00kENVELOPE\x00s(NIL")
        self.assertIsNone(lazy.get("ENVELOPE"))
        self.assertEqual(dict(lazy), {})


class UidValidityTests(TestCase):
    def test_strictly_increasing_even_within_a_second(self) -> None:
        fresh = UidValidities(clock=lambda: 1700000000.5)
        self.assertEqual([fresh(), fresh(), fresh(above=1800000000)], [1700000000, 1700000001, 1800000001])
        self.assertEqual(fresh(above=2**32), 1700000000)  # nonsense hints are ignored


class FastInfoTests(TestCase):
    def test_same_as_the_constructor(self) -> None:
        """The infos a cold load makes without ``__init__`` are ordinary frozen MessageInfos."""
        details = KnownDetails(b"Subject: hi\r\n\r\n", LazyMeta('{"subject": "hi"}'))
        args = (7, 1234, 1700000000.5, frozenset({"\\Seen", "work"}), details)
        fast, slow = _fast_info(*args), MessageInfo(*args)
        self.assertIs(type(fast), MessageInfo)
        self.assertEqual(fast, slow)
        self.assertEqual(repr(fast), repr(slow))
        self.assertEqual((fast.uid, fast.size, fast.internal_date, fast.flags, fast.details), args)
        self.assertEqual(dataclasses.replace(fast, uid=8), dataclasses.replace(slow, uid=8))
        with self.assertRaises(dataclasses.FrozenInstanceError):
            fast.uid = 9  # type: ignore[misc]


class GcPausedTests(TestCase):
    def test_nested_pauses_restore_the_collector_once(self) -> None:
        self.addCleanup(gc.enable)
        paused = _GcPaused()
        gc.enable()
        with paused:
            self.assertFalse(gc.isenabled())
            with paused:
                self.assertFalse(gc.isenabled())
            self.assertFalse(gc.isenabled())  # the outer (or another thread's) load still runs
        self.assertTrue(gc.isenabled())

    def test_a_disabled_collector_stays_disabled(self) -> None:
        self.addCleanup(gc.enable)
        paused = _GcPaused()
        gc.disable()
        with paused:
            pass
        self.assertFalse(gc.isenabled())


class ReadSizedTests(TestCase):
    def test_expected_shorter_and_longer_files(self) -> None:
        """One read when the file is at most its indexed size; a file that grew behind our back
        (not the one indexed) is still read whole."""
        directory = Path(self.mktemp())
        directory.mkdir()
        data = b"x" * 100_000
        (directory / "m").write_bytes(data)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, fd)
        for size in (0, 1, 99_999, 100_000, 100_001, 200_000):
            self.assertEqual(read_sized(fd, "m", size), data, size)
        with self.assertRaises(FileNotFoundError):
            read_sized(fd, "gone", 10)
