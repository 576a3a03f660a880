"""IMAP mailbox names ↔ Maildir++ folder directories: the only place a folder name becomes a path.

An IMAP name (UTF-8, hierarchy delimiter ``/``) names a directory directly under the user's
maildir root: ``INBOX`` (any case) is the root itself, ``A/B`` is ``.A.B``.  Inside a component
every byte of its UTF-8 form that is not ``[A-Za-z0-9 _-]`` (``.`` and ``%`` included) becomes
``%XX``; the directory name is therefore ASCII, has no ``/``, and no component can hold the
Maildir++ separator ``.``.  The mapping is 1:1: `folder_name` accepts only
directory names that `folder_directory` would produce, so a stray directory can never alias a
folder, and nothing outside the root (or inside ``tmp/ new/ cur/`` and our own files, none of
which start with ``.``) is reachable by any name.

Names from the network are hostile: empty components, ``.`` and ``..`` components, leading or
trailing ``/``, control characters, lone surrogates, and names over 255 bytes (or whose directory
name would be) are refused with ``MailboxError(..., "CANNOT")``.  Names are not Unicode-normalised:
two spellings of "é" are two folders, as the bytes on the wire say.
"""

from __future__ import annotations

import re
import unicodedata

from kms.store.interfaces import MailboxError

DELIMITER = "/"
INBOX = "INBOX"
MAX_BYTES = 255  # the IMAP name in UTF-8, and the directory name (the usual NAME_MAX)

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _-")
_ESCAPE = re.compile(rb"%([0-9A-F]{2})")


def canonical_name(name: str) -> str:
    """``name`` validated, with a leading ``INBOX`` component in upper case (RFC 3501 §5.1)."""
    if not name:
        raise MailboxError("empty mailbox name", "CANNOT")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise MailboxError("mailbox name is not valid UTF-8", "CANNOT")
    if len(encoded) > MAX_BYTES:
        raise MailboxError(f"mailbox name longer than {MAX_BYTES} bytes", "CANNOT")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise MailboxError("control character in mailbox name", "CANNOT")
    parts = name.split(DELIMITER)
    for part in parts:
        if part in ("", ".", ".."):
            raise MailboxError("empty, '.' or '..' level in mailbox name", "CANNOT")
    if parts[0].upper() == INBOX:
        parts[0] = INBOX
    return DELIMITER.join(parts)


def folder_directory(name: str) -> str:
    """The directory (relative to the maildir root) of IMAP name ``name``; "" for INBOX."""
    canonical = canonical_name(name)
    if canonical == INBOX:
        return ""
    directory = "." + ".".join(_escape(part) for part in canonical.split(DELIMITER))
    if len(directory) > MAX_BYTES:
        raise MailboxError(f"mailbox name too long once stored (over {MAX_BYTES} bytes)", "CANNOT")
    return directory


def folder_name(directory: str) -> str:
    """The inverse of `folder_directory`; ValueError for any directory name it would not produce."""
    if directory == "":
        return INBOX
    if not directory.startswith(".") or not directory.isascii():
        raise ValueError(f"not a folder directory: {directory!r}")
    try:
        name = DELIMITER.join(_unescape(part) for part in directory[1:].split("."))
        if folder_directory(name) != directory:
            raise ValueError(f"not the canonical directory of {name!r}: {directory!r}")
    except (MailboxError, UnicodeDecodeError) as e:
        raise ValueError(f"not a folder directory: {directory!r}") from e
    return name


def parent_names(name: str) -> list[str]:
    """The superior names of a canonical name, outermost first: ``a/b/c`` → [``a``, ``a/b``]."""
    parts = name.split(DELIMITER)
    return [DELIMITER.join(parts[:i]) for i in range(1, len(parts))]


def is_inferior(name: str, ancestor: str) -> bool:
    """Whether ``name`` lies below ``ancestor`` in the hierarchy (not equal to it)."""
    return name.startswith(ancestor + DELIMITER)


def _escape(part: str) -> str:
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in part.encode("utf-8"))


def _unescape(part: str) -> str:
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), part.encode("ascii")).decode("utf-8")
