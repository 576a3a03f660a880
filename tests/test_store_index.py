"""The folder index's pure parts: flags in names, the uidlist format, lazy meta."""

from __future__ import annotations

import dataclasses
import gc

from twisted.trial.unittest import TestCase

from kms.store.index import (
    LazyMeta,
    UidValidities,
    _fast_info,
    _GcPaused,
    delivery_order,
    message_flags,
    name_with_flags,
    normalize_flags,
    parse_uidlist,
    split_name,
    uidlist_header,
    uidlist_lines,
)
from kms.store.interfaces import MessageInfo


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


class UidValidityTests(TestCase):
    def test_strictly_increasing_even_within_a_second(self) -> None:
        fresh = UidValidities(clock=lambda: 1700000000.5)
        self.assertEqual([fresh(), fresh(), fresh(above=1800000000)], [1700000000, 1700000001, 1800000001])
        self.assertEqual(fresh(above=2**32), 1700000000)  # nonsense hints are ignored


class FastInfoTests(TestCase):
    def test_same_as_the_constructor(self) -> None:
        """The infos a cold load makes without ``__init__`` are ordinary frozen MessageInfos."""
        meta = LazyMeta('{"subject": "hi"}')
        args = (7, 1234, 1700000000.5, frozenset({"\\Seen", "work"}), b"Subject: hi\r\n\r\n", meta)
        fast, slow = _fast_info(*args), MessageInfo(*args)
        self.assertIs(type(fast), MessageInfo)
        self.assertEqual(fast, slow)
        self.assertEqual(repr(fast), repr(slow))
        self.assertEqual(dataclasses.astuple(fast)[:5], args[:5])
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
