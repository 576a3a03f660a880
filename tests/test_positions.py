"""kms.positions: deleting by position from lists and arrays, on both of its paths."""

from __future__ import annotations

from array import array

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kms.positions import FEW, delete_positions


class DeletePositionsTests(TestCase):
    def test_both_paths(self) -> None:
        for positions in ([], [0], [3, 7, 9], list(range(0, 100, 3)), list(range(100))):
            with self.subTest(count=len(positions)):
                items = list(range(100))
                delete_positions(items, positions)
                self.assertEqual(items, [n for n in range(100) if n not in positions])
        self.assertGreater(len(range(0, 100, 3)), FEW)  # the table reaches the rebuilding path

    def test_in_place_and_same_type(self) -> None:
        items = array("Q", range(200))
        same = items
        delete_positions(items, list(range(0, 200, 2)))
        self.assertIs(items, same)
        self.assertEqual(items, array("Q", range(1, 200, 2)))

    @given(st.sets(st.integers(0, 199)), st.booleans())
    def test_same_as_filtering(self, chosen: set[int], as_array: bool) -> None:
        items: list[int] | array[int] = array("Q", range(200)) if as_array else list(range(200))
        delete_positions(items, sorted(chosen))
        self.assertEqual(list(items), [n for n in range(200) if n not in chosen])
