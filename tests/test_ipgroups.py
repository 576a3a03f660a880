"""Tests for kms.ipgroups: entry parsing, membership at every boundary, and properties against ipaddress."""

from __future__ import annotations

import ipaddress
import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kms.ipgroups import IPGroup, parse_group

V4_MAX = 2**32 - 1
V6_MAX = 2**128 - 1


def v4(n: int) -> str:
    return str(ipaddress.IPv4Address(n))


def v6(n: int) -> str:
    return str(ipaddress.IPv6Address(n))


class ParseTests(TestCase):
    def test_malformed_entries_are_refused_with_the_entry_and_the_reason(self) -> None:
        """Each bad entry gives a ValueError that quotes it as written and says what is wrong."""
        cases = {
            "300.1.1.1": '"300.1.1.1": not an IPv4 or IPv6 address',
            "1.2.3.4/33": '"1.2.3.4/33": prefix length must be a number from 0 to 32',
            "::1/129": '"::1/129": prefix length must be a number from 0 to 128',
            "1.2.3.4/-1": '"1.2.3.4/-1": prefix length must be a number from 0 to 32',
            "1.2.3.4/": '"1.2.3.4/": prefix length must be a number from 0 to 32',
            "1.2.3.4/255.0.0.0": '"1.2.3.4/255.0.0.0": prefix length must be a number from 0 to 32',
            "1.2.3.4/\u0663": '"1.2.3.4/\u0663": prefix length must be a number from 0 to 32',
            "/24": '"/24": "" is not an IPv4 or IPv6 address',
            "a-b": '"a-b": "a" is not an IPv4 or IPv6 address',
            "1.1.1.1-::1": '"1.1.1.1-::1": range mixes IPv4 and IPv6',
            "": '"": empty entry',
            "   ": '"   ": empty entry',
            "1.2.3.4-": '"1.2.3.4-": a range is written first-last, e.g. 10.0.0.1-10.0.0.50',
            "-1.2.3.4": '"-1.2.3.4": a range is written first-last, e.g. 10.0.0.1-10.0.0.50',
            "1.1.1.1-1.1.1.2-1.1.1.3": (
                '"1.1.1.1-1.1.1.2-1.1.1.3": a range is written first-last, e.g. 10.0.0.1-10.0.0.50'
            ),
            "10.0.0.9-10.0.0.1": '"10.0.0.9-10.0.0.1": range start is after its end',
            "::2-::1": '"::2-::1": range start is after its end',
            "fe80::1%eth0": '"fe80::1%eth0": zone ids (%...) are not allowed in IP groups',
            "010.0.0.1": '"010.0.0.1": not an IPv4 or IPv6 address',
            "example.test": '"example.test": not an IPv4 or IPv6 address',
        }
        for entry, message in cases.items():
            with self.subTest(entry=entry):
                error = self.assertRaises(ValueError, parse_group, ["127.0.0.1", entry])
                self.assertEqual(str(error), message)

    def test_non_string_entries_are_refused(self) -> None:
        """A TOML integer in the list is a config error, not a crash."""
        error = self.assertRaises(ValueError, parse_group, [7])
        self.assertEqual(str(error), "7: entries must be strings")

    def test_a_bare_string_is_refused(self) -> None:
        """``local = "127.0.0.1"`` (forgot the brackets) must not be read as a list of characters."""
        self.assertRaises(ValueError, parse_group, "127.0.0.1")

    def test_empty_group(self) -> None:
        """An empty list is a valid group that contains nobody."""
        group = parse_group([])
        self.assertEqual(group.entries, ())
        for address in ("0.0.0.0", "255.255.255.255", "::", "::1", "127.0.0.1"):
            self.assertFalse(group.contains(address))

    def test_entries_are_normalized(self) -> None:
        """Whitespace is trimmed, host bits are cleared and addresses are written canonically."""
        group = parse_group([" 192.168.1.5/24 ", "10.0.0.1 - 10.0.0.50", "2001:DB8:0::1", "::1/ 128"])
        self.assertEqual(group.entries, ("192.168.1.0/24", "10.0.0.1-10.0.0.50", "2001:db8::1", "::1/128"))

    def test_repr_shows_entries_only(self) -> None:
        """The repr is what an admin wrote (normalized), not the compiled integers."""
        self.assertEqual(
            repr(parse_group(["127.0.0.1", "::1"])),
            "IPGroup(entries=('127.0.0.1', '::1'))",
        )

    def test_frozen_and_hashable(self) -> None:
        """Groups are values: equal when built from the same entries, usable as dict keys."""
        a = parse_group(["10.0.0.0/8", "::1"])
        b = parse_group(["10.0.0.0/8", "::1"])
        self.assertEqual(a, b)
        self.assertEqual(hash(a), hash(b))
        self.assertNotEqual(a, parse_group(["10.0.0.0/8"]))
        self.assertRaises(AttributeError, setattr, a, "entries", ())


class MembershipTests(TestCase):
    def check(self, entries: list[str], inside: list[str], outside: list[str]) -> None:
        group = parse_group(entries)
        for address in inside:
            with self.subTest(entries=entries, address=address):
                self.assertTrue(group.contains(address), f"{address} should be in {entries}")
        for address in outside:
            with self.subTest(entries=entries, address=address):
                self.assertFalse(group.contains(address), f"{address} should not be in {entries}")

    def test_single_addresses(self) -> None:
        self.check(["127.0.0.1"], ["127.0.0.1"], [" 127.0.0.1", "127.0.0.0", "127.0.0.2", "::1"])
        self.check(["::1"], ["::1", "0::0:1", "::0001"], ["::", "::2", "127.0.0.1", "::ffff:127.0.0.1"])

    def test_ipv4_cidr_boundaries(self) -> None:
        self.check(
            ["192.168.0.0/16"],
            ["192.168.0.0", "192.168.0.1", "192.168.127.255", "192.168.255.255"],
            ["192.167.255.255", "192.169.0.0", "::c0a8:1", "::ffff:192.169.0.0"],
        )
        self.check(["10.1.2.3/32"], ["10.1.2.3"], ["10.1.2.2", "10.1.2.4"])
        self.check(["10.1.2.3/31"], ["10.1.2.2", "10.1.2.3"], ["10.1.2.1", "10.1.2.4"])

    def test_host_bits_are_cleared(self) -> None:
        """192.168.1.5/24 means the whole /24, including addresses below .5."""
        self.check(["192.168.1.5/24"], ["192.168.1.0", "192.168.1.4", "192.168.1.255"], ["192.168.2.0"])

    def test_ipv4_everything(self) -> None:
        """0.0.0.0/0 is every IPv4 client (in either notation) and no IPv6 one."""
        self.check(
            ["0.0.0.0/0"],
            ["0.0.0.0", "255.255.255.255", "::ffff:0.0.0.0", "::ffff:255.255.255.255"],
            ["::", "::1", "::fffe:ffff:ffff", "::1:0:0:0", "2001:db8::1", "fe80::1"],
        )

    def test_ipv6_cidr_boundaries(self) -> None:
        self.check(
            ["2001:db8::/32"],
            ["2001:db8::", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", "2001:DB8::1"],
            ["2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", "2001:db9::", "32.1.13.184"],
        )
        self.check(["2001:db8::1/128"], ["2001:db8::1"], ["2001:db8::", "2001:db8::2"])
        self.check(["::/0"], ["::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "2001:db8::1"], ["garbage"])

    def test_ranges_inclusive_at_both_ends(self) -> None:
        self.check(
            ["10.0.0.1-10.0.0.50"],
            ["10.0.0.1", "10.0.0.25", "10.0.0.50", "::ffff:10.0.0.50"],
            ["10.0.0.0", "10.0.0.51", "::a00:1"],
        )
        self.check(["10.0.0.7-10.0.0.7"], ["10.0.0.7"], ["10.0.0.6", "10.0.0.8"])
        self.check(["10.0.0.255-10.0.1.0"], ["10.0.0.255", "10.0.1.0"], ["10.0.0.254", "10.0.1.1"])
        self.check(["fe80::a-fe80::f"], ["fe80::a", "fe80::c", "fe80::f"], ["fe80::9", "fe80::10"])

    def test_ipv4_mapped_clients_match_ipv4_entries(self) -> None:
        """A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; they are still IPv4 clients."""
        self.check(
            ["127.0.0.1", "192.168.0.0/16"],
            ["::ffff:127.0.0.1", "::FFFF:7f00:1", "::ffff:192.168.3.4"],
            ["::ffff:127.0.0.2", "::127.0.0.1", "::1"],
        )

    def test_ipv4_clients_match_mapped_entries(self) -> None:
        """An entry written in mapped form covers the plain IPv4 addresses it maps."""
        self.check(
            ["::ffff:10.0.0.0/104"],
            ["10.0.0.0", "10.255.255.255", "::ffff:10.1.2.3"],
            ["9.255.255.255", "11.0.0.0", "::a00:0"],
        )
        self.check(["::ffff:1.2.3.4"], ["1.2.3.4"], ["1.2.3.5"])

    def test_ipv6_range_spanning_the_mapped_block(self) -> None:
        """Only the part of an IPv6 entry inside ::ffff:0:0/96 reaches IPv4 clients."""
        self.check(
            ["::fffe:ffff:fff0-::ffff:0.0.0.9"],
            ["0.0.0.0", "0.0.0.9", "::fffe:ffff:ffff"],
            ["0.0.0.10", "255.255.255.255", "::fffe:ffff:ffef"],
        )

    def test_zone_ids_are_ignored_on_clients(self) -> None:
        self.check(["fe80::/10"], ["fe80::1%eth0", "fe80::1%25"], ["fec0::1%eth0", "%eth0"])

    def test_overlapping_and_adjacent_entries(self) -> None:
        self.check(
            ["10.0.0.0/25", "10.0.0.128/25", "10.0.0.100-10.0.1.5", "10.0.0.3"],
            ["10.0.0.0", "10.0.0.127", "10.0.0.128", "10.0.0.255", "10.0.1.5"],
            ["9.255.255.255", "10.0.1.6"],
        )

    def test_garbage_is_never_a_member_and_never_raises(self) -> None:
        """contains() answers False for anything that is not an address, including UNIX sockets."""
        group = parse_group(["0.0.0.0/0", "::/0"])
        for junk in [
            "",
            " ",
            "local",
            "localhost",
            "1.2.3",
            "1.2.3.4.5",
            "1.2.3.4/32",
            "[::1]",
            "::1::",
            "256.0.0.1",
            "\x00",
            "1.2.3.4\r\n",
            "1.2.3.4\x00",
            None,
            16909060,
            b"1.2.3.4",
        ]:
            with self.subTest(junk=junk):
                self.assertFalse(group.contains(junk))  # type: ignore[arg-type]


addresses4 = st.integers(0, V4_MAX)
addresses6 = st.integers(0, V6_MAX)


@st.composite
def entries(draw: st.DrawFn) -> str:
    """A random valid entry of any form and family, biased toward small spaces so entries overlap."""
    family = draw(st.sampled_from([4, 6, "mapped"]))
    bits = 32 if family == 4 else 128
    top = V4_MAX if family == 4 else V6_MAX
    if family == "mapped":
        low, high = 0xFFFF_0000_0000, 0xFFFF_FFFF_FFFF
    else:
        low, high = draw(st.sampled_from([(0, top), (0, 1023), (top - 1023, top)]))
    text = v4 if family == 4 else v6
    kind = draw(st.sampled_from(["single", "cidr", "range"]))
    a = draw(st.integers(low, high))
    if kind == "single":
        return text(a)
    if kind == "cidr":
        return f"{text(a)}/{draw(st.integers(0, bits))}"
    b = draw(st.integers(low, high))
    return f"{text(min(a, b))}-{text(max(a, b))}"


@st.composite
def probes(draw: st.DrawFn) -> str:
    """A client address, concentrated where entries() puts its boundaries."""
    family = draw(st.sampled_from([4, 6, "mapped"]))
    if family == 4:
        return v4(draw(st.one_of(addresses4, st.integers(0, 1023), st.integers(V4_MAX - 1023, V4_MAX))))
    if family == "mapped":
        return "::ffff:" + v4(draw(st.one_of(addresses4, st.integers(0, 1023))))
    return v6(draw(st.one_of(addresses6, st.integers(0, 1023), st.integers(V6_MAX - 1023, V6_MAX))))


def as_ipv6(address: str) -> ipaddress.IPv6Address:
    """The reference model: an IPv4 address is its IPv4-mapped IPv6 address."""
    parsed = ipaddress.ip_address(address)
    return ipaddress.IPv6Address(f"::ffff:{parsed}") if parsed.version == 4 else parsed


def naive_contains(entry: str, address: str) -> bool:
    """Reference membership for one entry, with ipaddress objects instead of merged intervals."""
    client = as_ipv6(address)
    if "-" in entry:
        first, last = (as_ipv6(part) for part in entry.split("-"))
        return first <= client <= last
    network = ipaddress.ip_network(entry, strict=False)
    if network.version == 4:
        network = ipaddress.IPv6Network(f"::ffff:{network.network_address}/{96 + network.prefixlen}")
    return client in network


class PropertyTests(TestCase):
    @given(addresses4, addresses4, addresses4)
    def test_ipv4_range_membership(self, a: int, b: int, probe: int) -> None:
        """An address is in lo-hi exactly when lo <= address <= hi."""
        lo, hi = min(a, b), max(a, b)
        group = parse_group([f"{v4(lo)}-{v4(hi)}"])
        self.assertEqual(group.contains(v4(probe)), lo <= probe <= hi)
        self.assertEqual(group.contains(f"::ffff:{v4(probe)}"), lo <= probe <= hi)
        self.assertTrue(group.contains(v4(lo)))
        self.assertTrue(group.contains(v4(hi)))

    @given(addresses6, addresses6, addresses6)
    def test_ipv6_range_membership(self, a: int, b: int, probe: int) -> None:
        lo, hi = min(a, b), max(a, b)
        group = parse_group([f"{v6(lo)}-{v6(hi)}"])
        self.assertEqual(group.contains(v6(probe)), lo <= probe <= hi)

    @given(addresses4, st.integers(0, 32), addresses4)
    def test_ipv4_cidr_membership(self, base: int, prefix: int, probe: int) -> None:
        """A /n keeps the top n bits: same top bits, same network."""
        group = parse_group([f"{v4(base)}/{prefix}"])
        shift = 32 - prefix
        self.assertEqual(group.contains(v4(probe)), base >> shift == probe >> shift)

    @given(addresses6, st.integers(0, 128), addresses6)
    def test_ipv6_cidr_membership(self, base: int, prefix: int, probe: int) -> None:
        group = parse_group([f"{v6(base)}/{prefix}"])
        shift = 128 - prefix
        self.assertEqual(group.contains(v6(probe)), base >> shift == probe >> shift)

    @given(st.lists(entries(), max_size=6), probes())
    def test_group_is_the_union_of_its_entries(self, group_entries: list[str], probe: str) -> None:
        """Merging intervals never changes the answer: a group contains what any entry contains."""
        expected = any(naive_contains(entry, probe) for entry in group_entries)
        self.assertEqual(parse_group(group_entries).contains(probe), expected)

    @given(st.lists(entries(), max_size=5), st.lists(entries(), max_size=5), probes())
    def test_concatenating_groups_is_union(self, first: list[str], second: list[str], probe: str) -> None:
        expected = parse_group(first).contains(probe) or parse_group(second).contains(probe)
        self.assertEqual(parse_group(first + second).contains(probe), expected)
        self.assertEqual(parse_group(second + first).contains(probe), expected)

    @given(st.lists(entries(), max_size=6), addresses4)
    def test_mapped_and_plain_ipv4_agree(self, group_entries: list[str], probe: int) -> None:
        """However the socket spells an IPv4 client, the answer is the same."""
        group = parse_group(group_entries)
        self.assertEqual(group.contains(v4(probe)), group.contains(f"::ffff:{v4(probe)}"))

    @given(st.lists(entries(), max_size=6))
    def test_normalized_entries_compile_to_the_same_group(self, group_entries: list[str]) -> None:
        """Feeding a group's entries back in (as a config dump would) gives an equal group."""
        group = parse_group(group_entries)
        again = parse_group(list(group.entries))
        self.assertEqual(again, group)
        self.assertEqual((again._starts, again._ends), (group._starts, group._ends))

    @given(st.text())
    def test_contains_never_raises(self, junk: str) -> None:
        self.assertIsInstance(parse_group(["0.0.0.0/0", "::/0"]).contains(junk), bool)

    @given(st.text())
    def test_parse_raises_only_value_error(self, junk: str) -> None:
        """Any text is either a valid entry or a ValueError naming it, never another exception."""
        try:
            group = parse_group([junk])
        except ValueError as error:
            self.assertTrue(str(error).startswith(json.dumps(junk, ensure_ascii=False) + ": "))
        else:
            self.assertIsInstance(group, IPGroup)
