"""MD4 (RFC 1320), in pure Python, for the NT password hash that NTLM is built on.

OpenSSL 3 moved MD4 to its legacy provider, so ``hashlib.new("md4")`` fails on most current
systems.  MD4 is broken as a hash; NTLM needs it only to turn a password into the NT hash, and the
inputs are short, so speed does not matter.
"""

from __future__ import annotations

import struct

_MASK = 0xFFFFFFFF
_INITIAL = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)

# Per round: the order message words are used in, and the four rotation amounts.
_ROUNDS = (
    (tuple(range(16)), (3, 7, 11, 19), 0),
    ((0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), (3, 5, 9, 13), 0x5A827999),
    ((0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15), (3, 9, 11, 15), 0x6ED9EBA1),
)


def _f(x: int, y: int, z: int) -> int:
    return (x & y) | (~x & z)


def _g(x: int, y: int, z: int) -> int:
    return (x & y) | (x & z) | (y & z)


def _h(x: int, y: int, z: int) -> int:
    return x ^ y ^ z


def _rotl(value: int, shift: int) -> int:
    value &= _MASK
    return ((value << shift) | (value >> (32 - shift))) & _MASK


def _compress(state: tuple[int, int, int, int], block: bytes) -> tuple[int, int, int, int]:
    x = struct.unpack("<16I", block)
    a, b, c, d = state
    for (order, shifts, constant), func in zip(_ROUNDS, (_f, _g, _h), strict=True):
        for i, k in enumerate(order):
            a = _rotl(a + func(b, c, d) + x[k] + constant, shifts[i % 4])
            a, b, c, d = d, a, b, c
    return (
        (state[0] + a) & _MASK,
        (state[1] + b) & _MASK,
        (state[2] + c) & _MASK,
        (state[3] + d) & _MASK,
    )


def md4(data: bytes) -> bytes:
    """The 16-byte MD4 digest of ``data``."""
    padded = (
        data + b"\x80" + b"\0" * ((55 - len(data)) % 64) + struct.pack("<Q", (len(data) * 8) & (2**64 - 1))
    )
    state = _INITIAL
    for offset in range(0, len(padded), 64):
        state = _compress(state, padded[offset : offset + 64])
    return struct.pack("<4I", *state)


def nt_hash(password: str) -> bytes:
    """NTOWFv1 (MS-NLMP §3.3.1): MD4 of the UTF-16LE password, the key every NTLM response proves.

    ``surrogatepass`` because Windows hashes the UTF-16 code units as they are, paired or not.
    """
    return md4(password.encode("utf-16-le", "surrogatepass"))
