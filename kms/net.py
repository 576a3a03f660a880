"""Socket options every protocol front-end sets on its connections, and address helpers."""

from __future__ import annotations

import ipaddress

from twisted.internet.tcp import Server as _Server


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


def write_now(transport: object, data: bytes) -> None:
    """Give ``data`` to the kernel in this call when nothing waits ahead of it in the transport.

    Twisted's ``write`` only buffers: the bytes go out on the reactor's next turn, after an
    ``epoll_ctl`` to watch for writability and before another to stop (two system calls and a turn
    per reply).  A plain TCP transport with an empty buffer can send at once; what the kernel does not
    take, and everything under TLS or behind a backlog, goes through ``write`` as before, in order.
    """
    if (
        type(transport) is _Server
        and not transport.TLS  # after STARTTLS the same object writes through the TLS layer
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "_tempDataBuffer", True)
        and len(transport.dataBuffer) == transport.offset
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            data = data[sent:]
    if data:
        transport.write(data)  # type: ignore[attr-defined]
