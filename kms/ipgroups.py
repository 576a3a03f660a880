"""Named IP address groups: ``local = ["127.0.0.1", "::1", "192.168.0.0/16", "10.0.0.1-10.0.0.50"]``.

Relay control, the security policy exception, lockout exemptions and master authentication all ask
"is this client in group X?" once per connection, so a group is compiled at config load into sorted,
merged integer intervals and answered with one bisect.

IPv4 lives inside the IPv6 space at its mapped position (``::ffff:0:0/96``), so ``10.0.0.5`` and
``::ffff:10.0.0.5`` are the same client whichever way a dual-stack socket reports it: each matches
entries written in either form.  Ordinary IPv6 addresses never match IPv4 entries and vice versa.
Consequently an IPv6 entry that covers the mapped block (``::/0``, ``::/64``) covers every IPv4 client.
"""

from __future__ import annotations

import ipaddress
import json
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

_IPV4_MAPPED = 0xFFFF_0000_0000
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _position(address: _Address) -> int:
    """Where an address sits on the shared line: IPv6 as itself, IPv4 at its mapped position."""
    if address.version == 4:
        return _IPV4_MAPPED | int(address)
    return int(address)


def _quote(entry: object) -> str:
    """An entry as it would appear in TOML, so error messages can be matched against the config file."""
    return json.dumps(entry, ensure_ascii=False) if isinstance(entry, str) else repr(entry)


def _parse_address(text: str, entry: str) -> _Address:
    """One address of an entry; zone ids are refused because clients' zones are ignored anyway."""
    if "%" in text:
        raise ValueError(f"{_quote(entry)}: zone ids (%...) are not allowed in IP groups")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        what = "not" if text == entry.strip() else f"{_quote(text)} is not"
        raise ValueError(f"{_quote(entry)}: {what} an IPv4 or IPv6 address") from None


def _parse_entry(entry: object) -> tuple[str, int, int]:
    """One config entry -> (normalized text, first position, last position), or ValueError saying why."""
    if not isinstance(entry, str):  # a TOML typo, reported like every other config error
        raise ValueError(f"{_quote(entry)}: entries must be strings")  # noqa: TRY004
    text = entry.strip()
    if not text:
        raise ValueError(f"{_quote(entry)}: empty entry")
    if "/" in text:
        base, _, prefix = text.partition("/")
        address = _parse_address(base.strip(), entry)
        bits = address.max_prefixlen
        prefix = prefix.strip()
        if not prefix.isdecimal() or not prefix.isascii() or int(prefix) > bits:
            raise ValueError(f"{_quote(entry)}: prefix length must be a number from 0 to {bits}")
        network = ipaddress.ip_network(f"{address}/{int(prefix)}", strict=False)
        return (
            str(network),
            _position(network.network_address),
            _position(network.broadcast_address),
        )
    if "-" in text:
        parts = text.split("-")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"{_quote(entry)}: a range is written first-last, e.g. 10.0.0.1-10.0.0.50")
        start, end = (_parse_address(part.strip(), entry) for part in parts)
        if start.version != end.version:
            raise ValueError(f"{_quote(entry)}: range mixes IPv4 and IPv6")
        first, last = _position(start), _position(end)
        if first > last:
            raise ValueError(f"{_quote(entry)}: range start is after its end")
        return f"{start}-{end}", first, last
    address = _parse_address(text, entry)
    return str(address), _position(address), _position(address)


def _merge(intervals: list[tuple[int, int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Sort and coalesce overlapping or touching intervals into parallel (starts, ends) tuples."""
    starts: list[int] = []
    ends: list[int] = []
    for first, last in sorted(intervals):
        if ends and first <= ends[-1] + 1:
            ends[-1] = max(ends[-1], last)
        else:
            starts.append(first)
            ends.append(last)
    return tuple(starts), tuple(ends)


@dataclass(frozen=True)
class IPGroup:
    """A compiled group. Build it with `parse_group`; ``entries`` shows what it was built from, normalized."""

    entries: tuple[str, ...]
    _starts: tuple[int, ...] = field(repr=False, compare=False)
    _ends: tuple[int, ...] = field(repr=False, compare=False)

    def contains(self, address: str) -> bool:
        """Whether a client address is in the group; never raises: garbage and ``local`` are not in it."""
        if not isinstance(address, str):
            return False
        text = address.partition("%")[0]
        try:
            position = _position(ipaddress.ip_address(text))
        except ValueError:
            return False
        index = bisect_right(self._starts, position) - 1
        return index >= 0 and position <= self._ends[index]


def parse_group(entries: Sequence[str]) -> IPGroup:
    """Compile config entries (addresses, CIDR networks, ``first-last`` ranges); ValueError names bad ones."""
    if isinstance(entries, str | bytes):
        raise ValueError(f"{entries!r}: an IP group is a list of entries, not a single string")  # noqa: TRY004
    parsed = [_parse_entry(entry) for entry in entries]
    starts, ends = _merge([(first, last) for _, first, last in parsed])
    return IPGroup(tuple(text for text, _, _ in parsed), starts, ends)
