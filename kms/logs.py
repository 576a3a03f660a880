"""The four logs of SPEC §10 under ``<store>/logs/``: mail, security, error and debug.

SECURITY: every value written here may come from a hostile client (addresses, EHLO names, reverse
DNS names, user names).  A log line is built only by `format_line`, which escapes anything that could
end a line, forge a field or hide text from a terminal, so one event is always exactly one line.
Keys that look like they hold a secret are refused outright, so a password can't reach disk.

Lines are appended with one ``write(2)`` on an ``O_APPEND`` descriptor: cheap enough for the reactor
thread, and atomic with respect to ``kmsctl`` appending to the same file from another process.
"""

from __future__ import annotations

import functools
import os
import re
import string
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from twisted.logger import Logger

from kms.clientinfo import ClientInfo

DEBUG_CATEGORIES = frozenset({"message_decoding", "update_checker", "auth", "ldap", "smtp", "imap", "pop3"})
MAX_VALUE_LENGTH = 512
_FILES = ("mail", "security", "error", "debug")
_FORBIDDEN_KEY_PARTS = ("password", "secret", "response", "key")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")
_BARE_VALUE = re.compile(r"[!#-\[\]-~]+")  # printable ASCII except space, '"' and '\'
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "_.:%-")
_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9_.:%-]+")

_log = Logger(namespace="kms")


def _code(char: str) -> str:
    r"""``\xNN``, ``\uNNNN`` or ``\UNNNNNNNN``: a character spelled so that it cannot act."""
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _escape(text: str) -> str:
    r"""Escape ``\``, ``"`` and everything not printable (CR, LF, NUL, bidi overrides, lone surrogates)."""
    return "".join(
        "\\" + char if char in '\\"' else char if char.isprintable() else _code(char) for char in text
    )


def format_value(value: object) -> str:
    """One value as a single token: bare when plain ASCII, else quoted and escaped; long ones truncated."""
    text = value if isinstance(value, str) else str(value)
    if _BARE_VALUE.fullmatch(text) and len(text) <= MAX_VALUE_LENGTH:
        return text
    marker = ""
    if len(text) > MAX_VALUE_LENGTH:
        marker = f"...[{len(text) - MAX_VALUE_LENGTH} more chars]"
        text = text[:MAX_VALUE_LENGTH]
    return f'"{_escape(text)}{marker}"'


def _check_key(key: str) -> None:
    """Refuse keys that are not plain names or that suggest a secret: a programming error, caught in tests."""
    if not _NAME.fullmatch(key):
        raise ValueError(f"log field name {key!r} is not a plain name")
    lowered = key.lower()
    if any(part in lowered for part in _FORBIDDEN_KEY_PARTS):
        raise ValueError(f"log field {key!r} looks like a secret; secrets are never logged")


def _token(text: str) -> str:
    """A client-side part (session, listener, address, name): only host-name characters stay as they are."""
    if len(text) <= MAX_VALUE_LENGTH and _PLAIN_TOKEN.fullmatch(text):
        return text  # the common case, without a loop over characters
    return "".join(char if char in _TOKEN_CHARS else _code(char) for char in text[:MAX_VALUE_LENGTH]) or "-"


def _client_part(client: ClientInfo | None) -> str:
    """``session listener describe()`` with every part escaped, or dashes when there is no client."""
    if client is None:
        return "- - -"
    where = f"[{_token(client.peer_host)}]"
    if client.reverse_name:
        where = f"{_token(client.reverse_name)} {where}"
    return f"{_token(client.session_id)} {_token(client.listener)} {where}"


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def _timestamp(when: float) -> str:
    """UTC with milliseconds, e.g. ``2026-11-27T21:40:00.123Z``."""
    seconds, fraction = divmod(int(when * 1000), 1000)
    return f"{_second(seconds)}.{fraction:03d}Z"


def format_line(when: float, event: str, client: ClientInfo | None, fields: Mapping[str, object]) -> str:
    """The whole log line, without its newline; ValueError for a malformed event name or a secret key."""
    if not _NAME.fullmatch(event):
        raise ValueError(f"log event {event!r} is not a plain name")
    parts = [_timestamp(when), _client_part(client), event]
    for key, value in fields.items():
        _check_key(key)
        parts.append(f"{key}={format_value(value)}")
    return " ".join(parts)


class Logs:
    """The open log files of one store. Writes reopen a closed file, so no event is lost after close()."""

    def __init__(
        self,
        directory: Path,
        debug_categories: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        categories = frozenset(debug_categories)
        unknown = categories - DEBUG_CATEGORIES
        if unknown:
            known = ", ".join(sorted(DEBUG_CATEGORIES))
            raise ValueError(f"unknown debug log categories {sorted(unknown)}; known: {known}")
        self._directory = directory
        self._categories = categories
        self._clock = clock
        self._fds: dict[str, int] = {}
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.reopen()

    def mail(self, event: str, client: ClientInfo | None = None, **fields: object) -> None:
        """A delivery: accepted, delivered, queued, bounced."""
        self._write("mail", event, client, fields)

    def security(self, event: str, client: ClientInfo | None = None, **fields: object) -> None:
        """An authentication result, policy refusal, lock, unlock or master login."""
        self._write("security", event, client, fields)

    def error(self, event: str, client: ClientInfo | None = None, **fields: object) -> None:
        """Something an admin must see; also sent to twisted.logger so ``twistd -n`` shows it."""
        line = self._write("error", event, client, fields)
        _log.error("{kms_line}", kms_line=line.partition(" ")[2])

    def debug(self, category: str, event: str, client: ClientInfo | None = None, **fields: object) -> None:
        """Written only when ``category`` is enabled; the event is logged as ``category.event``."""
        if not self.debug_enabled(category):
            return
        self._write("debug", f"{category}.{event}", client, fields)

    def debug_enabled(self, category: str) -> bool:
        """Whether ``category`` is on, so callers can skip building costly debug fields."""
        if category not in DEBUG_CATEGORIES:
            raise ValueError(f"unknown debug log category {category!r}")
        return category in self._categories

    def close(self) -> None:
        """Release the files (at shutdown); a later write opens its file again."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def reopen(self) -> None:
        """Close and open every file again, creating missing ones: call after logrotate moves them."""
        self.close()
        for name in _FILES:
            self._open(name)

    def _open(self, name: str) -> int:
        path = self._directory / f"{name}.log"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._fds[name] = fd
        return fd

    def _write(self, name: str, event: str, client: ClientInfo | None, fields: Mapping[str, object]) -> str:
        line = format_line(self._clock(), event, client, fields)
        data = (line + "\n").encode("utf-8", "backslashreplace")
        try:
            fd = self._fds[name] if name in self._fds else self._open(name)
            while data:
                data = data[os.write(fd, data) :]
        except OSError as error:
            # A full disk must not take the session down with it; the admin sees it in twistd's log.
            _log.error(
                "cannot write {name}.log: {error}; lost: {kms_line}", name=name, error=error, kms_line=line
            )
        return line
