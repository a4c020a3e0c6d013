"""The http-tcp aux channel pieces: chunk framing, handshake, acknowledgement window."""

from __future__ import annotations

import pytest
from imageshare.protocols.jpip.tcpchunks import (
    HEADER_LENGTH,
    MAX_CHUNK,
    AckWindow,
    AuxProtocolError,
    Handshake,
    chunk_header,
)


def test_chunk_header_layout() -> None:
    """Length (with header), low 16 bits of the qid, repeat 0, 24-bit sequence number."""
    assert chunk_header(11, 0x12345, 7) == bytes([0, 11, 0x23, 0x45, 0, 0, 0, 7])
    assert chunk_header(MAX_CHUNK, 1, (1 << 24) - 1)[-3:] == b"\xff\xff\xff"
    with pytest.raises(ValueError):
        chunk_header(MAX_CHUNK + 1, 0, 0)
    with pytest.raises(ValueError):
        chunk_header(20, 0, 1 << 24)


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
    first, second = (chunk_header(60008, 4, seq) + bytes(60000) for seq in (0, 1))
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
