"""Stock clients (imaplib, poplib) whose socket is bound to a chosen loopback source address.

Tests of IP groups, lockout per IP, hidden local IPs and connection limits need connections from
127.0.0.2, 127.0.0.3 ... while the server listens on 127.0.0.1; the stock classes cannot choose
their source address, so these override only the socket creation.
"""

from __future__ import annotations

import imaplib
import poplib
import socket


class IMAPFrom(imaplib.IMAP4):
    """imaplib from ``source`` to 127.0.0.1:``port``."""

    def __init__(self, source: str, port: int, timeout: float = 30) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


class POP3From(poplib.POP3):
    """poplib from ``source`` to 127.0.0.1:``port``."""

    def __init__(self, source: str, port: int, timeout: float = 30) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=timeout)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
