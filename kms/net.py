"""Socket options every protocol front-end sets on its connections, and address helpers."""

from __future__ import annotations

import ipaddress


def is_ip_address(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address (not a host name to look up)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def set_tcp_nodelay(transport: object) -> None:
    """Replies written in pieces stall 40 ms on delayed ACKs without NODELAY (performance notes).

    Under TLS the TCP transport is reached through the wrapper's ``transport`` attribute.
    """
    tcp = tcp_transport(transport)
    if tcp is not None:
        try:
            tcp.setTcpNoDelay(True)  # type: ignore[attr-defined]
        except OSError:  # not a TCP socket (UNIX socket, already closed)
            pass


def tcp_transport(transport: object) -> object | None:
    """The TCP transport itself: ``transport``, or under TLS a ``.transport`` or two down."""
    for _ in range(4):
        if hasattr(transport, "setTcpNoDelay"):
            return transport
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return None
