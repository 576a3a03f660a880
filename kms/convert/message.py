"""Apply the TNEF and uuencode conversions to a whole message: bytes in, bytes out.

Messages with nothing to convert come back byte-identical (they are never
re-serialized).  Nothing here raises on bad input: problems are reported.
"""

import io
from email import message_from_bytes
from email.generator import BytesGenerator
from email.mime.text import MIMEText
from email.policy import compat32

from kms.convert import tnef as _tnef
from kms.convert import uuencode as _uu
from kms.convert.names import attachment_part, unique_names

_CONTENT_HEADERS = ("content-type", "content-transfer-encoding", "content-disposition")
MAX_DEPTH = 20


class ConversionReport:
    """What convert_message did: `converted` lists conversions made, `problems`
    lists why something was left as it was (for the message_decoding log)."""

    def __init__(self):
        self.converted = []
        self.problems = []

    @property
    def changed(self):
        return bool(self.converted)

    def __repr__(self):
        return f"<ConversionReport converted={self.converted!r} problems={self.problems!r}>"


def convert_message(data, tnef=True, uuencode=True, max_size=None):
    """Return (new_bytes, ConversionReport)."""
    report = ConversionReport()
    if not (tnef or uuencode):
        return data, report
    lower = data.lower()
    maybe_tnef = tnef and (b"tnef" in lower or b"winmail.dat" in lower)
    maybe_uu = uuencode and b"begin " in data
    if not (maybe_tnef or maybe_uu):
        return data, report
    try:
        msg = message_from_bytes(data, policy=compat32)
        _walk(msg, None, tnef, uuencode, max_size or 0, report, 0)
        if not report.changed:
            return data, report
        out = _serialize(msg, data)
    except Exception as e:  # never lose a message over a conversion
        report.problems.append(f"conversion failed: {type(e).__name__}: {e}")
        report.converted = []
        return data, report
    if max_size and len(out) > max_size:
        report.problems.append(
            f"converted message ({len(out)} bytes) would exceed the maximum size {max_size}"
        )
        report.converted = []
        return data, report
    return out, report


def _serialize(msg, original):
    head = original.split(b"\n\n", 1)[0]
    linesep = "\r\n" if b"\r\n" in head or b"\r\n" in original[:2000] else "\n"
    fp = io.BytesIO()
    BytesGenerator(fp, mangle_from_=False, maxheaderlen=0, policy=compat32.clone(linesep=linesep)).flatten(
        msg
    )
    return fp.getvalue()


def _walk(msg, parent, tnef, uuencode, max_size, report, depth):
    if depth > MAX_DEPTH:
        return
    if msg.is_multipart():
        payload = msg.get_payload()
        if not isinstance(payload, list):
            return
        new = []
        for sub in payload:
            if sub.is_multipart():
                _walk(sub, msg, tnef, uuencode, max_size, report, depth + 1)
                new.append(sub)
            else:
                repl = _convert_leaf(sub, tnef, uuencode, max_size, report)
                new.extend(repl if repl is not None else [sub])
        if len(new) != len(payload) or any(a is not b for a, b in zip(new, payload, strict=False)):
            msg.set_payload(new)
        return
    repl = _convert_leaf(msg, tnef, uuencode, max_size, report)
    if repl is not None:
        _make_mixed(msg, repl)


def _make_mixed(msg, parts):
    for h in _CONTENT_HEADERS:
        del msg[h]
    if msg["MIME-Version"] is None:
        msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = "multipart/mixed"
    msg.set_payload(list(parts))
    msg.preamble = None
    msg.epilogue = None


def _convert_leaf(part, tnef, uuencode, max_size, report):
    """Return a list of replacement parts, or None to keep `part`."""
    if tnef and _tnef.is_tnef_part(part):
        name = part.get_filename() or "winmail.dat"
        raw = part.get_payload(decode=True)
        if not raw:
            report.problems.append(f"TNEF part {name!r}: empty or undecodable payload")
            return None
        try:
            parts = _tnef.decode_tnef(raw, max_size=max_size or None)
        except _tnef.TNEFError as e:
            report.problems.append(f"TNEF part {name!r} kept: {e}")
            return None
        report.converted.append(f"TNEF part {name!r} replaced by {len(parts)} part(s)")
        return parts
    if uuencode and part.get_content_type() == "text/plain":
        if (part.get("Content-Disposition") or "").strip().lower().startswith("attachment"):
            return None
        raw = part.get_payload(decode=True)
        if not raw or b"begin " not in raw:
            return None
        rest, files = _uu.split_text(raw)
        if not files:
            report.problems.append("uuencode: begin line without a well-formed block, left as is")
            return None
        charset = part.get_content_charset() or "us-ascii"
        try:
            text = rest.decode(charset)
        except (LookupError, UnicodeDecodeError):
            charset, text = "utf-8", rest.decode("utf-8", "replace")
        parts = []
        if text.strip():
            try:
                parts.append(MIMEText(text, "plain", charset))
            except (LookupError, UnicodeEncodeError):
                parts.append(MIMEText(text, "plain", "utf-8"))
        names = unique_names(name for name, _ in files)
        for name, (_, blob) in zip(names, files, strict=True):
            parts.append(attachment_part(name, blob))
        report.converted.append("uuencode: " + ", ".join(repr(n) for n, _ in files) + " made attachment(s)")
        return parts
    return None
