"""TNEF (winmail.dat) to ordinary MIME parts, using tnefparse."""

import logging

from kms.convert.names import attachment_part, text_part, unique_names

TNEF_TYPES = ("application/ms-tnef", "application/vnd.ms-tnef")
EXPANSION_FACTOR = 4


class TNEFError(Exception):
    """The TNEF data could not be converted; the message says why."""


def is_tnef_part(part):
    ctype = part.get_content_type().lower()
    if ctype in TNEF_TYPES:
        return True
    if ctype == "application/octet-stream":
        name = (part.get_filename() or "").strip().lower()
        return name == "winmail.dat"
    return False


def _as_text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def decode_tnef(data, max_size=None):
    """Decode TNEF bytes into a list of email.message.Message parts.

    Raises TNEFError with a human-readable reason on any problem.  The total
    decoded size is limited to EXPANSION_FACTOR * len(data) and to max_size.
    """
    import tnefparse

    if not isinstance(data, (bytes, bytearray)) or len(data) < 6:
        raise TNEFError("too short to be TNEF")
    # tnefparse logs warnings for recoverable problems; we check explicitly.
    tlog = logging.getLogger("tnefparse")
    previous = tlog.disabled
    tlog.disabled = True
    try:
        try:
            parsed = tnefparse.TNEF(bytes(data), do_checksum=True)
        except Exception as e:  # tnefparse raises many kinds on bad input
            raise TNEFError(f"unparseable TNEF: {type(e).__name__}: {e}") from None
        consumed = 6 + sum(obj.length for obj in parsed.objects)
        if consumed != len(data):
            raise TNEFError(f"{len(data) - consumed} bytes of trailing garbage after the last TNEF object")
        bad = [o for o in parsed.objects if not getattr(o, "good_checksum", True)]
        if bad:
            raise TNEFError(f"bad checksum in {len(bad)} TNEF object(s)")
        limit = EXPANSION_FACTOR * len(data)
        if max_size:
            limit = min(limit, max_size)
        parts = []
        total = 0

        def account(n):
            nonlocal total
            total += n
            if total > limit:
                raise TNEFError(f"decoded content exceeds the size limit of {limit} bytes")

        try:
            if parsed.body:
                body = _as_text(parsed.body).rstrip("\x00")
                account(len(body))
                parts.append(text_part(body, "plain"))
            if parsed.htmlbody:
                html = _as_text(parsed.htmlbody).rstrip("\x00")
                account(len(html))
                parts.append(text_part(html, "html"))
            if not parsed.body and not parsed.htmlbody and parsed._rtfbody:
                rtf = _rtf(parsed)
                if rtf is not None:
                    account(len(rtf))
                    parts.append(text_part(rtf.decode("latin-1").rstrip("\x00"), "rtf", "latin-1"))
            found = []
            for n, att in enumerate(parsed.attachments, 1):
                payload = att.data
                if not isinstance(payload, (bytes, bytearray)):
                    raise TNEFError(f"attachment {n} has no plain data (embedded object)")
                account(len(payload))
                try:
                    name = att.long_filename()
                except Exception:
                    name = att.name
                found.append((name or f"attachment-{n}", payload))
            names = unique_names(name for name, _ in found)
            parts.extend(attachment_part(name, blob) for name, (_, blob) in zip(names, found, strict=True))
        except TNEFError:
            raise
        except Exception as e:
            raise TNEFError(f"undecodable TNEF content: {type(e).__name__}: {e}") from None
        if not parts:
            raise TNEFError("TNEF carries neither a body nor attachments")
        return parts
    finally:
        tlog.disabled = previous


def _rtf(parsed):
    """Decompressed RTF, or None when compressed_rtf is unavailable or the data is bad."""
    from kms.convert.rtf import RTFError, decompress_rtf

    try:
        return decompress_rtf(parsed._rtfbody)
    except RTFError:
        return None
