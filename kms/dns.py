"""The server's DNS resolvers, all built by `make_resolver` from ``[dns]``: the queue's (MX and
address look-ups), the client namer's (PTR/A, on a reactor scope it closes at stop) and the
update checker's (made at its first host name; a feed given by IP address never makes one).

Each asks the servers ``[dns]`` lists, or the ``nameserver`` lines of /etc/resolv.conf (read once,
at start: Twisted's own resolv.conf mode keeps a re-read timer on the reactor forever; a changed
resolv.conf takes effect at the next start).  Every query goes through `twisted.names`, so
nothing waits on the reactor thread, and every query has the configured timeout.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from twisted.names.client import Resolver

from kms.config import DNSConfig

RESOLV_CONF = Path("/etc/resolv.conf")


def nameservers(text: str) -> list[tuple[str, int]]:
    """The ``nameserver`` addresses of a resolv.conf text, in order (zone ids and junk skipped)."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                found.append((str(ipaddress.ip_address(fields[1])), 53))
            except ValueError:
                continue
    return found


def make_resolver(cfg: DNSConfig, reactor: Any, resolv_conf: Path = RESOLV_CONF) -> Resolver:
    """A `twisted.names` resolver that asks ``cfg.servers`` (or resolv.conf's) with ``cfg.timeout``.

    One try per query with the whole timeout: a server that does not answer costs ``timeout``
    seconds, never more, which is what callers budget for.  No server at all means 127.0.0.1, as
    for the C library.
    """
    servers = list(cfg.servers)
    if not servers:
        try:
            servers = nameservers(resolv_conf.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            servers = []
    return Resolver(servers=servers or [("127.0.0.1", 53)], reactor=reactor, timeout=(cfg.timeout,))
