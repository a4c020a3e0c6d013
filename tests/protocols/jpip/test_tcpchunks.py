"""The http-tcp aux channel pieces: chunk framing, handshake, acknowledgement window."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from imageshare.protocols.jpip.messages import MessageEncoder, StreamParser
from imageshare.protocols.jpip.tcpchunks import (
    HEADER_LENGTH,
    MAX_CHUNK,
    AckWindow,
    AuxProtocolError,
    Handshake,
    chunk_header,
    chunks,
)


def test_chunk_header_layout() -> None:
    """Length (with header), low 16 bits of the qid, repeat 0, 24-bit sequence number."""
    assert chunk_header(11, 0x12345, 7) == bytes([0, 11, 0x23, 0x45, 0, 0, 0, 7])
    assert chunk_header(MAX_CHUNK, 1, (1 << 24) - 1)[-3:] == b"\xff\xff\xff"
    with pytest.raises(ValueError):
        chunk_header(MAX_CHUNK + 1, 0, 0)
    with pytest.raises(ValueError):
        chunk_header(20, 0, 1 << 24)


def test_lone_eor_is_an_11_byte_chunk() -> None:
    """A response that is only an EOR goes out as one 11-byte chunk."""
    eor = MessageEncoder().eor(2)
    assert list(chunks([eor], qid=3)) == [bytes([0, 11, 0, 3, 0, 0, 0, 0]) + eor]


@given(st.lists(st.integers(0, 5000), min_size=1, max_size=60), st.integers(64, MAX_CHUNK))
def test_chunks_keep_messages_whole_and_in_order(sizes: list[int], max_chunk: int) -> None:
    """Concatenated chunk bodies are the messages in order; no message is split; sizes bounded."""
    messages = [bytes([i % 251]) * n for i, n in enumerate(sizes) if n <= max_chunk - HEADER_LENGTH]
    if not messages:
        return
    out = list(chunks(messages, qid=9, max_chunk=max_chunk))
    assert b"".join(c[HEADER_LENGTH:] for c in out) == b"".join(messages)
    for seq, chunk in enumerate(out):
        assert len(chunk) <= max_chunk and int.from_bytes(chunk[:2], "big") == len(chunk)
        assert int.from_bytes(chunk[5:8], "big") == seq
    boundaries = {sum(len(m) for m in messages[:i]) for i in range(len(messages) + 1)}
    position = 0
    for chunk in out:
        position += len(chunk) - HEADER_LENGTH
        assert position in boundaries


def test_real_messages_survive_chunking() -> None:
    """A JPP stream cut into chunks parses back to the same messages."""
    enc = MessageEncoder()
    enc.reset()
    stream = [enc.header(0, 0, i, 0, 3000, True) + bytes(3000) for i in range(50)] + [enc.eor(1)]
    body = b"".join(c[HEADER_LENGTH:] for c in chunks(stream, qid=1))
    parsed = StreamParser().feed(body)
    assert len(parsed) == 51


def test_oversized_message_is_refused() -> None:
    """The planner must cut pieces for this transport: a message over a chunk is an error."""
    with pytest.raises(ValueError):
        list(chunks([bytes(MAX_CHUNK)], qid=0))


@pytest.mark.parametrize("wire", [b"JPHT0123abcd\r\n", b"JPHT0123abcd\r\n\r\n"])
def test_handshake_terminators(wire: bytes) -> None:
    """Both cid CRLF and cid CRLF CRLF are accepted, in any split."""
    for cut in range(len(wire) + 1):
        h = Handshake()
        rest = h.feed(wire[:cut]) + h.feed(wire[cut:])
        assert h.cid == b"JPHT0123abcd"
        assert rest == b""
        assert h.feed(b"\x00\x0b") == b"\x00\x0b"  # what follows is an ack, passed on


def test_after_the_first_chunk_a_crlf_is_an_ack() -> None:
    """Once a chunk was sent, bytes that happen to start with CRLF are an ack (length 0x0D0A)."""
    h = Handshake()
    assert h.feed(b"JPH_abc\r\n") == b""
    h.settle()
    ack = chunk_header(0x0D0A, 1, 0)
    assert h.feed(ack) == ack


@pytest.mark.parametrize("wire", [b"GET / HTTP/1.1\r\n", b"\x00\x01\x02\r\n", b"x" * 600])
def test_handshake_garbage(wire: bytes) -> None:
    """Anything but a channel id line is a protocol error."""
    with pytest.raises(AuxProtocolError):
        Handshake().feed(wire)


def test_ack_window_bounds_and_order() -> None:
    """Unacknowledged bytes are bounded; acks must echo the oldest chunk; partial acks wait."""
    window = AckWindow(2 * MAX_CHUNK)
    first, second = list(chunks([bytes(60000), bytes(60000)], qid=4))
    assert window.can_send(len(first))
    window.sent(first)
    assert window.can_send(len(second))
    window.sent(second)
    assert not window.can_send(20000)
    assert window.receive(first[:5]) == 0
    assert window.receive(first[5:8]) == 1
    assert window.unacked == len(second)
    with pytest.raises(AuxProtocolError):
        window.receive(first[:8])  # already acknowledged: not the oldest any more
    with pytest.raises(ValueError):
        AckWindow(1000)
