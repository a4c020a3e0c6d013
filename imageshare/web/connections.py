"""
Connection caps for a listener, and the process's open-file limit.

:class:`CappedFactory` stands in front of a listener's protocol factory: it admits a
connection while the listener's caps (:class:`~imageshare.conncaps.ConnectionCaps`)
allow, and closes one beyond them at once, logging refusals at most once per address
every ten seconds.

It does not wrap the transport, as ``twisted.protocols.policies.WrappingFactory`` does:
the HTTP channel tunes its transport (``SEND_LIMIT``) and registers itself as its
producer, and the JPIP aux protocol does the same; both must see the real transport (or
the TLS one). Only the transport's calls into the protocol pass through
:class:`_Admitted`, to learn when the connection is gone.
"""

from __future__ import annotations

import resource
from typing import Any, Callable

from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory, IReactorTime, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from imageshare.conncaps import ConnectionCaps
from imageshare.logsafe import Logger
from imageshare.logthrottle import LogThrottle
from imageshare.web.clients import address_key

__all__ = ["CappedFactory", "HTTP_REFUSAL", "ensure_open_files", "raise_open_files_limit"]

log = Logger(namespace="imageshare.connections")

_RETRY_AFTER = 5  # seconds; a guess at how soon a slot frees up

_REFUSAL_BODY = b"too many connections\n"
#: What an HTTP client over a cap reads before the connection closes.
HTTP_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Server: ImageShare\r\n"
    b"Retry-After: %d\r\n"
    b"Connection: close\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"\r\n" % (_RETRY_AFTER, len(_REFUSAL_BODY))
) + _REFUSAL_BODY


class _Refused(Protocol):
    """A connection over a cap: answered (plain HTTP) or dropped, never read."""

    def __init__(self, refusal: bytes | None) -> None:
        self._refusal = refusal

    def connectionMade(self) -> None:
        if self._refusal is None or ISSLTransport.providedBy(self.transport):
            # Over TLS an answer would wait for a handshake the client may never finish.
            self.transport.abortConnection()
            return
        self.transport.write(self._refusal)  # fits the empty socket buffer: no waiting
        self.transport.loseConnection()


@implementer(IProtocol)
class _Admitted:
    """
    Passes the transport's calls on to ``protocol``, and frees the slot when the connection goes.

    ``protocol`` is connected to the real transport itself; everything but
    :meth:`connectionLost` is forwarded untouched, and the interfaces the transport looks
    for on its protocol (half-close, TLS handshake notice) are those of ``protocol``.
    """

    def __init__(self, protocol: IProtocol, release: Callable[[], None]) -> None:
        self.protocol = protocol
        self._release: Callable[[], None] | None = release
        directlyProvides(self, providedBy(protocol))

    def makeConnection(self, transport: Any) -> None:
        self.protocol.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()
        self.protocol.connectionLost(reason)

    def __getattr__(self, name: str) -> Any:
        if name == "protocol":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.protocol, name)


@implementer(IProtocolFactory)
class CappedFactory:
    """
    ``factory``, with at most ``caps`` connections at once.

    Parameters
    ----------
    factory
        Builds the protocol of an admitted connection.
    caps
        The listener's counts; each listener has its own.
    clock
        ``IReactorTime`` for the log throttle.
    label
        Names the listener in the log.
    refusal
        Written to a plain TCP connection over a cap before it closes (see
        :data:`HTTP_REFUSAL`); ``None`` closes without a word, as do TLS connections.
    """

    def __init__(
        self,
        factory: IProtocolFactory,
        caps: ConnectionCaps,
        clock: IReactorTime,
        *,
        label: str,
        refusal: bytes | None = None,
        throttle: LogThrottle | None = None,
    ) -> None:
        self.factory = factory
        self.caps = caps
        self._clock = clock
        self._label = label
        self._refusal = refusal
        self._throttle = throttle or LogThrottle(10.0)

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        key = address_key(addr)
        over = self.caps.admit(key)
        if over is not None:
            self._refused(key, over)
            return _Refused(self._refusal)
        try:
            protocol = self.factory.buildProtocol(addr)
        except BaseException:
            self.caps.release(key)
            raise
        if protocol is None:
            self.caps.release(key)
            return None
        return _Admitted(protocol, lambda: self.caps.release(key))

    def _refused(self, key: str, over: str) -> None:
        count = self._throttle.hit(key, self._clock.seconds())
        if count is not None:
            cap = self.caps.max_total if over == "total" else self.caps.max_per_address
            log.warn(
                "{label}: refused {count} connection(s) from {address} over the {which} cap of {cap} "
                "(at most one such line per address every {interval:.0f} s)",
                label=self._label, count=count, address=key, which=over, cap=cap,
                interval=self._throttle.interval,
            )

    def doStart(self) -> None:
        self.factory.doStart()

    def doStop(self) -> None:
        self.factory.doStop()

    def logPrefix(self) -> str:
        prefix = getattr(self.factory, "logPrefix", None)
        return prefix() if prefix is not None else self._label


def raise_open_files_limit() -> tuple[int, int]:
    """
    Raise the soft ``RLIMIT_NOFILE`` to the hard limit where the system allows.

    Every connection is a file descriptor; the soft limit is often 1024 while the hard one
    is far higher, and servers are expected to raise it themselves.

    Returns
    -------
    tuple
        ``(soft, hard)`` after the attempt (``RLIM_INFINITY`` is -1).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # e.g. an infinite hard limit the kernel caps lower (nr_open): keep ours
        else:
            soft = hard
    return soft, hard


def ensure_open_files(needed: int) -> None:
    """
    Raise the open-file limit (:func:`raise_open_files_limit`) and warn if ``needed``
    descriptors (the connection caps of every listener, plus a margin) do not fit.
    """
    soft, hard = raise_open_files_limit()
    if soft != resource.RLIM_INFINITY and needed > soft:
        log.warn(
            "the connection caps allow {needed} open files, more than this process may hold "
            "({soft}; hard limit {hard}): lower the caps or raise the limit (LimitNOFILE= in systemd)",
            needed=needed, soft=soft, hard=hard,
        )
    else:
        log.debug("open files: limit {soft}, connection caps need {needed}", soft=soft, needed=needed)
