"""
The ``http-tcp`` transport (ISO/IEC 15444-9 Annex G): JPIP data on a persistent TCP channel.

Requests and their header-only replies travel over HTTP (``http.py``); the messages of
every response for an http-tcp channel come here. The client opens a TCP connection to
the auxiliary port and names its channel (the handshake of ``tcpchunks.py``); from then
on each response goes out as chunks of whole messages ending with its EOR, and the
client acknowledges every chunk by echoing its header.

Flow control: at most ``window`` unacknowledged bytes are written, and nothing while
the transport's buffer is full, so a client that reads slowly or never acknowledges
holds the server at a bounded cost (the session's lock stays with that response, so
nothing else of the session is planned meanwhile). A pre-empted response ends at once
with its EOR 3, which may overdraw the window by those few bytes; a client that stops
acknowledging altogether is dropped once it owes more than one more chunk.

A dropped TCP connection ends its channel (not the session's other channels); a channel
whose connection never comes is closed after ``attach_timeout``.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator

import attrs
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from imageshare.logsafe import Logger
from imageshare.protocols.jpip.server import Body, JpipServer
from imageshare.protocols.jpip.sessions import Channel
from imageshare.protocols.jpip.tcpchunks import (
    HEADER_LENGTH,
    MAX_CHUNK,
    AckWindow,
    AuxProtocolError,
    Handshake,
    chunk_header,
)

log = Logger(namespace="imageshare.jpip.tcp")


def _tag(cid: str | bytes) -> str:
    """Enough of a channel id to follow it in the log, not enough to use it."""
    text = cid.decode("ascii", "replace") if isinstance(cid, bytes) else cid
    return text[:12] + "…"


@attrs.define(eq=False)
class _Response:
    body: Body
    qid: int
    messages: Iterator[tuple[bytes, Any]]
    seq: int = 0


class AuxStream:
    """
    One http-tcp channel: its responses in order, and the connection that carries them.

    Responses of one session never overlap (the session's lock is held by a response
    until its EOR is out), so the queue is short; it is a queue only to keep request
    order under any circumstances.
    """

    def __init__(self, cid: str, window: int) -> None:
        self.cid = cid
        self.window = AckWindow(window)
        self.connection: AuxProtocol | None = None
        self.responses: collections.deque[_Response] = collections.deque()
        self.closed = False
        self._held: tuple[bytes, Any] | None = None  # taken from the body, not yet written
        self._pumping = False
        self.attach_timer: Any = None

    def deliver(self, qid: int, body: Body) -> None:
        body.on_cut = lambda: self._cut(body)
        self.responses.append(_Response(body, qid, body.messages()))
        self.pump()

    def _cut(self, body: Body) -> None:
        # A message taken from the body but not written is not sent: the body now yields
        # its EOR 3 instead, which goes out at once.
        if self.responses and self.responses[0].body is body and self._held and self._held[1] is not None:
            self._held = None
        self.pump()

    def pump(self) -> None:
        """Write what the window and the transport allow."""
        if self._pumping or self.closed or self.connection is None:
            return
        self._pumping = True
        try:
            while self.responses and not self.closed:
                if not self._write_chunk(self.responses[0]):
                    break
        finally:
            self._pumping = False

    def _write_chunk(self, response: _Response) -> bool:
        """Write one chunk of ``response``; False when flow control says wait."""
        assert self.connection is not None
        parts: list[tuple[bytes, Any]] = []
        size = HEADER_LENGTH
        ended = False
        while True:
            if self._held is None:
                self._held = next(response.messages)  # the body always ends with its EOR
            message, piece = self._held
            if size + len(message) > MAX_CHUNK:
                break
            # An EOR alone may overdraw the window: it ends a response that was cut or is
            # done, and holding it back would keep the session's next request waiting.
            lone_eor = piece is None and not parts
            if not lone_eor and (self.connection.paused or not self.window.can_send(size + len(message))):
                break
            parts.append(self._held)
            self._held = None
            size += len(message)
            if piece is None:
                ended = True
                break
        if not parts:
            return False
        chunk = chunk_header(size, response.qid, response.seq) + b"".join(m for m, _ in parts)
        response.seq += 1
        self.window.sent(chunk)
        self.connection.send(chunk)
        for message, piece in parts:
            response.body.sent(message, piece)
        if ended:
            # Popped before close: closing frees the session's lock, and the next request
            # of the session may be planned and delivered right away (re-entering here).
            self.responses.popleft()
            response.body.close()
        return True

    def acknowledged(self, data: bytes) -> None:
        self.window.receive(data)
        self.pump()

    def close(self) -> None:
        """The channel ended: what was not written is not in the model; free the lock."""
        self.closed = True
        self._held = None
        if self.attach_timer is not None and self.attach_timer.active():
            self.attach_timer.cancel()
        self.attach_timer = None
        while self.responses:
            self.responses.popleft().body.close()
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.drop()


class AuxChannels:
    """
    The http-tcp channels of a :class:`JpipServer`, and the listener's protocol factory.

    Parameters
    ----------
    server
        Whose sessions the channels belong to.
    clock
        ``IReactorTime`` for the attach and handshake timeouts.
    window
        Unacknowledged bytes allowed per channel.
    attach_timeout
        Seconds a granted channel waits for its connection, and a connection for its cid.
    """

    def __init__(self, server: JpipServer, clock: Any, *, window: int, attach_timeout: float) -> None:
        self._server = server
        self.clock = clock
        self._window = window
        self.attach_timeout = attach_timeout
        self._streams: dict[str, AuxStream] = {}
        server.channel_closed.append(self._channel_closed)

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def connections(self) -> int:
        return sum(1 for s in self._streams.values() if s.connection is not None)

    def factory(self) -> Factory:
        return Factory.forProtocol(lambda: AuxProtocol(self))

    def deliver(self, cid: str, qid: int, body: Body) -> None:
        """A response for channel ``cid``: sent once (or as soon as) its connection is there."""
        if self._server.sessions.find(cid) is None:
            body.close()  # the channel ended while the response was planned
            return
        stream = self._streams.get(cid)
        if stream is None:
            stream = self._streams[cid] = AuxStream(cid, self._window)
            stream.attach_timer = self.clock.callLater(self.attach_timeout, self._never_attached, cid)
        stream.deliver(qid, body)

    def attach(self, cid: bytes, connection: "AuxProtocol") -> AuxStream | None:
        """A connection named channel ``cid``; ``None`` if it may not carry it."""
        text = cid.decode("ascii")
        channel = self._server.sessions.find(text)
        if channel is None or channel.transport != "http-tcp":
            log.info("aux connection from {peer} named an unknown channel {cid}", peer=connection.peer, cid=_tag(cid))
            return None
        stream = self._streams.get(text)
        if stream is None:
            stream = self._streams[text] = AuxStream(text, self._window)
        if stream.connection is not None:
            log.info("aux connection from {peer} for channel {cid}, which has one already",
                     peer=connection.peer, cid=_tag(cid))
            return None
        if stream.attach_timer is not None and stream.attach_timer.active():
            stream.attach_timer.cancel()
        stream.attach_timer = None
        stream.connection = connection
        log.debug("aux connection from {peer} carries channel {cid}", peer=connection.peer, cid=_tag(cid))
        return stream

    def detached(self, stream: AuxStream, reason: str) -> None:
        """The connection of ``stream`` is gone: its channel ends, the session goes on."""
        if stream.closed:
            return
        log.info("http-tcp channel {cid} ended: {reason}", cid=_tag(stream.cid), reason=reason)
        self._end(stream.cid)

    def _never_attached(self, cid: str) -> None:
        log.info("http-tcp channel {cid} closed: no connection within {timeout} s",
                 cid=_tag(cid), timeout=self.attach_timeout)
        self._end(cid)

    def _end(self, cid: str) -> None:
        stream = self._streams.pop(cid, None)
        if stream is not None:
            stream.close()
        channel = self._server.sessions.find(cid)
        if channel is not None:
            self._server.sessions.close(cid, [cid], self.clock.seconds())

    def _channel_closed(self, channel: Channel) -> None:
        # cclose, expiry or the session's end: let go of the connection and the response.
        stream = self._streams.pop(channel.cid, None)
        if stream is not None:
            stream.close()

    def close_all(self) -> None:
        for cid in list(self._streams):
            self._end(cid)


@implementer(IPushProducer)
class AuxProtocol(Protocol):
    """One connection to the auxiliary port: handshake, then chunks out and acks in."""

    def __init__(self, channels: AuxChannels) -> None:
        self._channels = channels
        self._handshake = Handshake()
        self._stream: AuxStream | None = None
        self._timer: Any = None
        self.peer = "?"
        self.paused = False  # the transport's buffer is full

    def connectionMade(self) -> None:
        address = self.transport.getPeer()
        self.peer = f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"
        self._timer = self._channels.clock.callLater(self._channels.attach_timeout, self._no_handshake)
        self.transport.registerProducer(self, True)
        # A response's last chunk is often small: it must not wait for the client's ACK.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def _no_handshake(self) -> None:
        self._timer = None
        log.info("aux connection from {peer} sent no channel id in time", peer=self.peer)
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        try:
            rest = self._handshake.feed(data)
            if self._stream is None:
                if self._handshake.cid is None:
                    return
                self._cancel_timer()
                self._stream = self._channels.attach(self._handshake.cid, self)
                if self._stream is None:
                    self._close()
                    return
                self._stream.pump()
            if rest:
                self._stream.acknowledged(rest)
        except AuxProtocolError as e:
            log.info("aux connection from {peer} dropped: {reason}", peer=self.peer, reason=str(e))
            self.transport.abortConnection()
            return

    def send(self, chunk: bytes) -> None:
        self._handshake.settle()
        self.transport.write(chunk)
        # Owing more than the window plus a chunk means the client stopped acknowledging
        # even the lone EORs that may overdraw the window.
        if self._stream is not None and self._stream.window.unacked > self._stream.window.window + MAX_CHUNK:
            log.info("aux connection from {peer} dropped: it stopped acknowledging", peer=self.peer)
            self.transport.abortConnection()

    def drop(self) -> None:
        """The channel ended from the server's side."""
        self._stream = None
        self._close()

    def _close(self) -> None:
        # Over TLS, loseConnection waits until the producer is unregistered: without this
        # the connection (and its slot under the listener's caps) would stay for good.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self._stream is not None:
            self._stream.pump()

    def stopProducing(self) -> None:
        pass  # connectionLost follows

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancel_timer()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.connection = None
            self._channels.detached(stream, reason.getErrorMessage() if reason else "closed")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
