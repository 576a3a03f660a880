"""What every protocol front-end knows about the client on the other end of one connection.

A `ClientInfo` is made at ``connectionMade`` from ``transport.getPeer()`` (so it is right behind
the PROXY protocol too) and updated in place when STARTTLS completes or a login succeeds.  Policy,
logging, relay control and lockout all read it; none of them touch a transport.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

_counter = itertools.count(1)
_prefix = os.urandom(3).hex()


def new_session_id() -> str:
    """A short id, unique in this process, that ties together the log lines of one connection."""
    return f"{_prefix}{next(_counter):06x}"


@dataclass
class ClientInfo:
    """The client of one connection. Mutable: ``tls``, ``reverse_name`` and ``identity`` change."""

    peer_host: str
    peer_port: int
    local_host: str
    local_port: int
    listener: str
    tls: bool = False
    reverse_name: str | None = None
    identity: str | None = None
    session_id: str = field(default_factory=new_session_id)

    @classmethod
    def from_transport(cls, transport: object, listener: str, tls: bool = False) -> ClientInfo:
        """Build from an ITransport's getPeer()/getHost(); UNIX sockets appear as host ``local``."""
        peer = transport.getPeer()  # type: ignore[attr-defined]
        host = transport.getHost()  # type: ignore[attr-defined]
        return cls(
            peer_host=str(getattr(peer, "host", "local")),
            peer_port=int(getattr(peer, "port", 0) or 0),
            local_host=str(getattr(host, "host", "local")),
            local_port=int(getattr(host, "port", 0) or 0),
            listener=listener,
            tls=tls,
        )

    def describe(self) -> str:
        """``name [ip]`` once the reverse name is known, else ``[ip]``: the form used in every log."""
        if self.reverse_name:
            return f"{self.reverse_name} [{self.peer_host}]"
        return f"[{self.peer_host}]"
