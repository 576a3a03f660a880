"""One DNS resolver for the whole server: MX look-ups for the queue, PTR/A for client names.

Built from ``[dns]``: the listed servers, or /etc/resolv.conf when none are listed.  Every query
goes through `twisted.names`, so nothing waits on the reactor thread, and every query has the
configured timeout.
"""

from __future__ import annotations

from typing import Any

from twisted.names.client import Resolver

from kms.config import DNSConfig


def make_resolver(cfg: DNSConfig, reactor: Any) -> Resolver:
    """A `twisted.names` resolver that asks ``cfg.servers`` (or resolv.conf) with ``cfg.timeout``.

    One try per query with the whole timeout: a server that does not answer costs ``timeout``
    seconds, never more, which is what callers budget for.
    """
    if cfg.servers:
        return Resolver(servers=list(cfg.servers), reactor=reactor, timeout=(cfg.timeout,))
    return Resolver(resolv="/etc/resolv.conf", reactor=reactor, timeout=(cfg.timeout,))
