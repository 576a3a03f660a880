"""Attachment file-name sanitizing and MIME part construction shared by the converters."""

import mimetypes
import posixpath
import unicodedata
from collections.abc import Iterable
from email import encoders
from email.mime.base import MIMEBase
from email.mime.text import MIMEText

MAX_NAME_LENGTH = 120


def sanitize_filename(name, default="attachment"):
    """Return a safe base file name: no directories, no control characters, sane length."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    name = str(name or "")
    name = unicodedata.normalize("NFC", name)
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C")
    name = name.replace("\\", "/")
    name = posixpath.basename(name.rstrip("/")) if "/" in name else name
    name = name.strip().strip(".").strip()
    if ":" in name:  # drive letters, NTFS streams
        name = name.rsplit(":", 1)[-1].strip()
    if not name or name in (".", ".."):
        name = default
    if len(name) > MAX_NAME_LENGTH:
        stem, dot, ext = name.rpartition(".")
        if dot and 0 < len(ext) <= 10:
            name = stem[: MAX_NAME_LENGTH - len(ext) - 1] + "." + ext
        else:
            # cut, then strip again so that sanitizing a sanitized name changes nothing
            name = name[:MAX_NAME_LENGTH].strip().strip(".").strip()
    return name


def unique_names(names: Iterable[str | bytes | None]) -> list[str]:
    """Sanitized names, made distinct: the second "report.pdf" becomes "report (2).pdf".

    Two attachments of one winmail.dat may carry the same name; saved side by side, one would
    overwrite the other.  Names are compared case-insensitively, as Windows and macOS do.
    """
    taken: set[str] = set()
    result = []
    for raw in names:
        name = sanitize_filename(raw)
        candidate, n = name, 1
        while candidate.casefold() in taken:
            n += 1
            candidate = _numbered(name, n)
        taken.add(candidate.casefold())
        result.append(candidate)
    return result


def _numbered(name: str, n: int) -> str:
    """``name`` with `` (n)`` before its extension, shortened to stay within MAX_NAME_LENGTH."""
    stem, dot, ext = name.rpartition(".")
    if not (dot and stem and 0 < len(ext) <= 10):
        stem, ext = name, ""
    tail = f" ({n})" + (f".{ext}" if ext else "")
    return stem[: MAX_NAME_LENGTH - len(tail)].rstrip() + tail


def guess_type(name):
    ctype, encoding = mimetypes.guess_type(name, strict=False)
    if ctype is None or encoding is not None or "/" not in ctype:
        return "application/octet-stream"
    return ctype


def attachment_part(name, data):
    """A base64 attachment part; non-ASCII names are RFC 2231 encoded."""
    name = sanitize_filename(name)
    maintype, subtype = guess_type(name).split("/", 1)
    part = MIMEBase(maintype, subtype)
    part.set_payload(bytes(data))
    encoders.encode_base64(part)
    try:
        name.encode("ascii")
        param = name
    except UnicodeEncodeError:
        param = ("utf-8", "", name)
    part.add_header("Content-Disposition", "attachment", filename=param)
    part.set_param("name", param)
    return part


def text_part(text, subtype="plain", charset="utf-8"):
    if isinstance(text, bytes):
        text = text.decode(charset, "replace")
    return MIMEText(text, subtype, "utf-8")
