"""Who is asking: the key by which per-client limits count a request.

Today that is the peer's IP address. Once requests carry tokens, an authenticated
principal can take its place: the limits only ever see the key string.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IAddress
from twisted.web.iweb import IRequest

__all__ = ["ClientKey", "address_key", "peer_address"]

#: ``key(request) -> str``: requests with the same key share one client's limits.
ClientKey = Callable[[IRequest], str]


def peer_address(request: IRequest) -> str:
    """The peer's IP address, or ``"local"`` for a transport without one (UNIX socket).

    Behind a reverse proxy every request has the proxy's address: forwarded headers are
    not trusted, since any client can send them.
    """
    return address_key(request.getClientAddress())


def address_key(address: IAddress | None) -> str:
    """The client address a connection counts against (``"local"`` for UNIX sockets)."""
    host = getattr(address, "host", None)
    return str(host) if host else "local"
