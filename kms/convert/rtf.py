"""Decompression of MS-OXRTFCP compressed RTF (LZFu), used for TNEF RTF bodies."""

import struct

_PREBUF = (
    b"{\\rtf1\\ansi\\mac\\deff0\\deftab720{\\fonttbl;}{\\f0\\fnil \\froman \\fswiss "
    b"\\fmodern \\fscript \\fdecor MS Sans SerifSymbolArialTimes New RomanCourier"
    b"{\\colortbl\\red0\\green0\\blue0\r\n\\par \\pard\\plain\\f0\\fs20\\b\\i\\u\\tab\\tx"
)
_LZFU = 0x75465A4C
_MELA = 0x414C454D


class RTFError(ValueError):
    pass


def decompress_rtf(data, max_size=None):
    if len(data) < 16:
        raise RTFError("compressed RTF header truncated")
    comp_size, raw_size, comp_type, _crc = struct.unpack_from("<IIII", data)
    if max_size is not None and raw_size > max_size:
        raise RTFError("RTF body exceeds the size limit")
    body = bytes(data[16 : 4 + comp_size])
    if len(body) < comp_size - 12:  # some writers drop the final NUL (as tnefparse notes)
        body += b"\x00" * min(comp_size - 12 - len(body), 2)
    if comp_type == _MELA:
        return bytes(body[:raw_size])
    if comp_type != _LZFU:
        raise RTFError(f"unknown compressed RTF type {comp_type:#x}")
    window = bytearray(4096)
    window[: len(_PREBUF)] = _PREBUF
    wpos = len(_PREBUF)
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        control = body[i]
        i += 1
        for bit in range(8):
            if i >= n:
                break
            if control & (1 << bit):
                if i + 1 >= n:
                    raise RTFError("compressed RTF reference truncated")
                ref = (body[i] << 8) | body[i + 1]
                i += 2
                offset, length = ref >> 4, (ref & 0xF) + 2
                if offset == wpos:
                    return bytes(out)
                for k in range(length):
                    c = window[(offset + k) % 4096]
                    out.append(c)
                    window[wpos] = c
                    wpos = (wpos + 1) % 4096
            else:
                c = body[i]
                i += 1
                out.append(c)
                window[wpos] = c
                wpos = (wpos + 1) % 4096
            if max_size is not None and len(out) > max_size:
                raise RTFError("RTF body exceeds the size limit")
    return bytes(out)
