"""Deleting items by position from the long in-memory lists of a mailbox, at C speed.

A folder of 100,000 messages is a list (the store's index, every open view) and an array of UIDs
per IMAP session; an EXPUNGE of a few messages must not rebuild them with a Python loop on the
reactor thread (~5 ms each).  Pure, no I/O; used by `kms.store.mailbox` and `kms.imap.server`.
"""

from __future__ import annotations

from collections.abc import MutableSequence, Sequence
from typing import TypeVar

_T = TypeVar("_T")
FEW = 32  # up to this many deletions, moving the tail once per deletion beats one rebuild


def delete_positions(items: MutableSequence[_T], positions: Sequence[int]) -> None:
    """Delete ``items[i]`` for each ``i`` in ``positions`` (ascending, distinct), in place.

    Few positions: one ``del`` each (a memmove of the tail).  Many: the kept runs are copied as
    slices into a new sequence of the same type, which replaces the contents in one step.
    """
    if len(positions) <= FEW:
        for index in reversed(positions):
            del items[index]
        return
    kept = items[:0]
    start = 0
    for index in positions:
        kept += items[start:index]
        start = index + 1
    kept += items[start:]
    items[:] = kept
