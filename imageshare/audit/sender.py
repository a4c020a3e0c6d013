"""
Sends the spooled audit messages to the audit record repository (ITI-20).

A small Twisted client: TLS with RFC 5425 octet-counting frames, or UDP (RFC 5426, one
message per datagram). The spool is read and trimmed through ``run`` (the audit writer
thread), never on the reactor.

Delivery is at least once. Over TLS a message counts as taken once it was written and the
connection was still up ``confirm_delay`` seconds later; messages written on a connection
that is lost before are sent again on the next one, in order, so the repository may see a
message twice but never a gap. Over UDP a datagram handed to the kernel counts as taken.
Reconnection waits double from one second up to ``retry_max``.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.python.failure import Failure

from imageshare.audit.syslog import frame
from imageshare.logsafe import Logger

__all__ = ["SyslogSender", "TlsLink", "UdpLink"]

log = Logger(namespace="imageshare.audit")

Run = Callable[..., "Deferred[Any]"]


class _StreamProtocol(Protocol):
    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.connected_ = True

    def dataReceived(self, data: bytes) -> None:
        pass  # a repository says nothing back

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected_ = False
        self.lost.callback(None)


class TlsLink:
    """Connects with an endpoint (TLS-wrapped TCP); one protocol per connection."""

    framed = True

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint

    async def connect(self) -> Any:
        return await self._endpoint.connect(Factory.forProtocol(_StreamProtocol))


class _UdpProtocol(DatagramProtocol):
    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.connected_ = True

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class UdpLink:
    """A connected UDP socket to the repository (the host is resolved on each connect)."""

    framed = False

    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port

    async def connect(self) -> Any:
        address = await self._reactor.resolve(self._host)
        proto = _UdpProtocol()
        port = self._reactor.listenUDP(0, proto, interface="::" if ":" in address else "0.0.0.0")
        port.connect(address, self._port)
        return proto


class SyslogSender(Service):
    """Forwards the spool, in order, to the repository; see the module docstring."""

    name = "audit-sender"

    def __init__(self, link: Any, batch: Callable[[int], Awaitable[list[tuple[int, bytes]]]],
                 taken: Callable[[int], Awaitable[Any]], clock: Any, *, where: str, confirm_delay: float = 1.0,
                 retry_max: float = 60.0) -> None:
        self._link = link
        self._batch = batch
        self._taken = taken
        self._clock = clock
        self._where = where
        self._confirm_delay = confirm_delay
        self._retry_max = retry_max
        self._wake: Deferred[None] | None = None
        self._proto: Any = None
        self._loop: Deferred[None] | None = None
        self._sleeping: Any = None
        self._connecting: Deferred[Any] | None = None
        self.connected = False

    def wake(self) -> None:
        """New messages are in the spool (call on the reactor)."""
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.callback(None)

    def startService(self) -> None:
        super().startService()
        self._loop = ensureDeferred(self._run())
        self._loop.addErrback(lambda f: log.failure("the audit sender stopped", f))

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.wake()
        for pending in (self._sleeping, self._connecting):
            if pending is not None:
                pending.cancel()
        proto, self._proto = self._proto, None
        if proto is not None and getattr(proto, "transport", None) is not None:
            proto.transport.loseConnection()
        loop, self._loop = self._loop, None
        return loop

    async def _sleep(self, seconds: float) -> None:
        # Not cut short by wake(): neither the backoff nor the confirmation wait.
        self._sleeping = deferLater(self._clock, seconds)
        try:
            await self._sleeping
        except CancelledError:
            pass
        finally:
            self._sleeping = None

    async def _run(self) -> None:
        delay = 1.0
        while self.running:
            if self._proto is None:
                self._connecting = ensureDeferred(self._link.connect())
                try:
                    self._proto = await self._connecting
                except Exception as e:
                    if not self.running:
                        break
                    log.warn("audit repository {where} unreachable ({error}); next try in {delay:.0f} s",
                             where=self._where, error=str(e) or type(e).__name__, delay=delay)
                    await self._sleep(delay)
                    delay = min(self._retry_max, delay * 2)
                    continue
                finally:
                    self._connecting = None
                if not self.running:
                    self._proto.transport.loseConnection()
                    self._proto = None
                    break
                self.connected = True
                log.info("audit repository {where} connected", where=self._where)
                self._proto.lost.addCallback(self._lost, self._proto)
            proto = self._proto
            rows = await self._batch(0)
            if not rows:
                d: Deferred[None] = Deferred()
                self._wake = d
                await d
                continue
            for _, body in rows:
                proto.transport.write(frame(body) if self._link.framed else body)
            if self._link.framed:
                await self._sleep(self._confirm_delay)
                if proto is not self._proto or not proto.connected_ or not self.running:
                    continue  # lost meanwhile: the same messages go again on the next connection
            delay = 1.0
            await self._taken(rows[-1][0])

    def _lost(self, _: None, proto: Any) -> None:
        if proto is self._proto:
            self._proto = None
            self.connected = False
            if self.running:
                log.warn("audit repository {where}: connection lost", where=self._where)
            self.wake()
