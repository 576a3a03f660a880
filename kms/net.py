"""Socket options every protocol front-end sets on its connections."""

from __future__ import annotations


def set_tcp_nodelay(transport: object) -> None:
    """Replies written in pieces stall 40 ms on delayed ACKs without NODELAY (performance notes).

    Under TLS the TCP transport is reached through the wrapper's ``transport`` attribute.
    """
    for _ in range(4):
        set_nodelay = getattr(transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            try:
                set_nodelay(True)
            except OSError:  # not a TCP socket (UNIX socket, already closed)
                pass
            return
        transport = getattr(transport, "transport", None)
        if transport is None:
            return
