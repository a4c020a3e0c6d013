"""The http-tcp adapter with a real JpipServer, a Clock and in-memory transports."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet.defer import ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from imageshare.codestream.index import build_index
from imageshare.protocols.jpip.messages import Eor, Message, StreamParser
from imageshare.protocols.jpip.plan import TargetBins
from imageshare.protocols.jpip.request import parse_request
from imageshare.protocols.jpip.server import JpipServer, Target
from imageshare.protocols.jpip.tcp import AuxChannels, AuxProtocol
from imageshare.protocols.jpip.tcpchunks import MAX_CHUNK
from imageshare.transcode import openjpeg
from imageshare.transcode.params import EncodeParams

WINDOW = MAX_CHUNK  # the smallest allowed: one chunk in flight


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Target:
    img = (np.random.default_rng(5).random((600, 700)) * 4000).astype(np.uint16)
    path = tmp_path_factory.mktemp("tcp") / "t.j2k"
    openjpeg.encode(img, path, precision=12, signed=False, colour_transform=False, params=EncodeParams(precinct=64))
    data = path.read_bytes()
    index = build_index(data)
    return Target("1.2.3", 0, "tid-1", index, TargetBins(index), data, len(data))


class Rig:
    def __init__(self, target: Target, **limits: int) -> None:
        self.clock = Clock()
        self.server = JpipServer(lambda u, s: succeed(target), self.clock.seconds, aux_port=9, **limits)
        self.aux = AuxChannels(self.server, self.clock, window=WINDOW, attach_timeout=5)

    def request(self, query: str) -> tuple[str | None, int]:
        """Serve a request as the HTTP resource does; the granted cid (if any) and qid."""
        parsed = parse_request("GET", None, query.encode(), None, None, None)
        replies: list = []
        ensureDeferred(self.server.respond(parsed)).addBoth(replies.append)
        reply = replies[0]
        assert reply.transport == "http-tcp", reply
        self.aux.deliver(reply.cid, parsed.qid or 0, reply.body)
        cnew = dict(reply.headers).get("JPIP-cnew")
        return (cnew.split(",")[0].split("=", 1)[1] if cnew else None), parsed.qid or 0

    def connect(self, handshake: bytes) -> tuple[AuxProtocol, StringTransport]:
        protocol = self.aux.factory().buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(handshake)
        return protocol, transport


def chunks_of(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 2], "big")
        out.append(data[pos : pos + n])
        pos += n
    assert pos == len(data)
    return out


def test_window_holds_the_stream_until_acks(target: Target) -> None:
    """At most the window goes out unacknowledged; each ack lets more out; the stream ends
    with its EOR and frees the session for the next request."""
    rig = Rig(target)
    cid, _ = rig.request("target=1.2.3&fsiz=700,600&cnew=http-tcp&qid=5")
    assert len(rig.aux) == 1 and rig.aux.connections == 0
    protocol, transport = rig.connect(cid.encode() + b"\r\n\r\n")
    received = b""
    parser = StreamParser()
    messages: list = []
    for _ in range(1000):
        data = transport.value()
        transport.clear()
        assert len(data) <= WINDOW  # never more than the window in flight
        received += data
        for chunk in chunks_of(data):
            messages += parser.feed(chunk[8:])
            protocol.dataReceived(chunk[:8])
        if messages and isinstance(messages[-1], Eor):
            break
    assert messages[-1] == Eor(1)
    assert sum(len(m.data) for m in messages if isinstance(m, Message)) > 0.95 * target.size
    assert rig.server.sessions.find(cid).active is None
    rig.request(f"cid={cid}&fsiz=700,600&qid=6")
    assert transport.value()[8:] == bytes([0, 1, 0])  # the second response, at once


def test_cut_sends_a_lone_eor_past_a_full_window(target: Target) -> None:
    """A pre-empted response ends at once with an EOR 3 chunk, even with the window full."""
    rig = Rig(target)
    cid, _ = rig.request("target=1.2.3&fsiz=700,600&cnew=http-tcp&qid=1")
    protocol, transport = rig.connect(cid.encode() + b"\r\n")
    stalled = chunks_of(transport.value())
    transport.clear()
    assert transport.value() == b"" and rig.server.sessions.find(cid).active is not None
    rig.server.preempt(cid, rig.server.next_arrival())
    eor = transport.value()
    assert eor == bytes([0, 11, 0, 1, 0, 0, 0, len(stalled)]) + bytes([0, 3, 0])
    assert rig.server.sessions.find(cid).active is None  # the lock is free again


def test_unknown_cid_garbage_and_silence_are_dropped(target: Target) -> None:
    rig = Rig(target)
    _, transport = rig.connect(b"JPHTdeadbeef\r\n")
    assert transport.disconnecting
    protocol = rig.aux.factory().buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"\x16\x03\x01\x02\x00")  # a TLS hello on a plain port
    protocol.dataReceived(b"x" * 600)
    assert transport.disconnecting
    silent = rig.aux.factory().buildProtocol(None)
    silent_transport = StringTransport()
    silent.makeConnection(silent_transport)
    rig.clock.advance(6)  # the attach timeout
    assert silent_transport.disconnecting


def test_never_attached_channel_is_closed_and_its_session_ends(target: Target) -> None:
    rig = Rig(target)
    cid, _ = rig.request("target=1.2.3&fsiz=700,600&cnew=http-tcp")
    assert rig.server.sessions.find(cid) is not None
    rig.clock.advance(6)
    assert rig.server.sessions.find(cid) is None and len(rig.aux) == 0
    assert len(rig.server.sessions) == 0  # it was the session's only channel


def test_dropped_connection_ends_only_its_channel(target: Target) -> None:
    """The session keeps its other channel and the model of what was really sent."""
    rig = Rig(target)
    parsed = parse_request("GET", None, b"target=1.2.3&fsiz=87,75&cnew=http", None, None, None)
    replies: list = []
    ensureDeferred(rig.server.respond(parsed)).addBoth(replies.append)
    http_cid = replies[0].cid
    for message, piece in replies[0].body.messages():
        replies[0].body.sent(message, piece)
    replies[0].body.close()
    tcp_cid, _ = rig.request(f"cid={http_cid}&cnew=http-tcp&fsiz=700,600")
    protocol, transport = rig.connect(tcp_cid.encode() + b"\r\n")
    assert transport.value()
    protocol.connectionLost(None)
    assert rig.server.sessions.find(tcp_cid) is None
    assert rig.server.sessions.find(http_cid) is not None and len(rig.aux) == 0


def test_session_limit_ends_with_eor_6_on_the_channel(target: Target) -> None:
    """Past max_model_bytes the EOR 6 goes out on the TCP channel, then the session ends."""
    rig = Rig(target, max_model_bytes=4096)
    cid, _ = rig.request("target=1.2.3&fsiz=700,600&cnew=http-tcp&qid=1")
    protocol, transport = rig.connect(cid.encode() + b"\r\n")
    for _ in range(1000):
        data = transport.value()
        transport.clear()
        for chunk in chunks_of(data):
            protocol.dataReceived(chunk[:8])
        if data.endswith(bytes([0, 1, 0])):
            break
    rig.request(f"cid={cid}&fsiz=700,600&qid=2")
    assert transport.value() == bytes([0, 11, 0, 2, 0, 0, 0, 0, 0, 6, 0])
    assert transport.disconnecting and rig.server.sessions.find(cid) is None and len(rig.server.sessions) == 0


def test_expiry_closes_the_connection_and_frees_the_response(target: Target) -> None:
    """An idle session expires with its channels: the TCP connection is closed, the stalled
    response let go; until then requests on new HTTP connections reach it (the cid is all
    they need)."""
    rig = Rig(target, session_timeout=30)
    cid, _ = rig.request("target=1.2.3&fsiz=700,600&cnew=http-tcp")
    protocol, transport = rig.connect(cid.encode() + b"\r\n")
    assert transport.value() and rig.server.sessions.find(cid).active is not None  # stalled, window full
    rig.clock.advance(20)
    assert rig.server.expire() == 0
    rig.clock.advance(20)
    assert rig.server.expire() == 1
    assert transport.disconnecting and len(rig.aux) == 0
    protocol.connectionLost(None)  # the transport reports the close: nothing left to end
    assert len(rig.server.sessions) == 0


class FakeBody:
    """Stands in for a server Body: fixed messages, then an EOR (a unit-test fake)."""

    def __init__(self, sizes: list[int]) -> None:
        self.messages_out = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
        self.sent_out: list[bytes] = []
        self.closed = False
        self.on_cut = None

    def messages(self):  # type: ignore[no-untyped-def]
        for m in self.messages_out:
            yield m, object()
        yield bytes([0, 2, 0]), None

    def sent(self, message: bytes, piece: object) -> None:
        self.sent_out.append(message)

    def close(self) -> None:
        self.closed = True


class FakeConnection:
    paused = False

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def send(self, chunk: bytes) -> None:
        self.out.append(chunk)


@given(st.lists(st.integers(1, MAX_CHUNK - 8 - 3), min_size=0, max_size=40), st.integers(MAX_CHUNK, 4 * MAX_CHUNK))
@settings(max_examples=60, deadline=None)
def test_chunks_hold_whole_messages_within_the_window(sizes: list[int], window: int) -> None:
    """Whatever the message sizes and window: chunks carry whole messages in order, number
    0, 1, 2... with their length in the header, never put more than the window in flight
    (a lone EOR aside), and the body is committed exactly as written and closed at its EOR."""
    from imageshare.protocols.jpip.tcp import AuxStream

    stream = AuxStream("JPHTx", window)
    connection = FakeConnection()
    stream.connection = connection  # type: ignore[assignment]
    body = FakeBody(sizes)
    stream.deliver(7, body)  # type: ignore[arg-type]
    received: list[bytes] = []
    for _ in range(10_000):
        if not connection.out:
            break
        in_flight = sum(len(c) for c in connection.out)
        assert in_flight <= window or connection.out[-1][8:] == bytes([0, 2, 0])
        chunks, connection.out = connection.out, []
        received += chunks
        for chunk in chunks:
            stream.acknowledged(chunk[:8])
    assert body.closed and stream.window.unacked == 0
    expected = body.messages_out + [bytes([0, 2, 0])]
    assert b"".join(c[8:] for c in received) == b"".join(expected) == b"".join(body.sent_out)
    boundaries = {sum(len(m) for m in expected[:i]) for i in range(len(expected) + 1)}
    position = 0
    for seq, chunk in enumerate(received):
        assert int.from_bytes(chunk[:2], "big") == len(chunk) <= MAX_CHUNK
        assert chunk[2:5] == bytes([0, 7, 0]) and int.from_bytes(chunk[5:8], "big") == seq
        position += len(chunk) - 8
        assert position in boundaries
