"""
The auxiliary TCP channel of ``http-tcp`` (ISO/IEC 15444-9 Annex G), without I/O.

Requests travel over HTTP; data flows over a separate TCP connection that the client
opens and names by sending its channel id. The server sends chunks: an 8-byte header
(chunk length including the header, the low 16 bits of the request id, a repeat count
that is 0 on TCP, a 24-bit sequence number restarting at 0 for each request) followed by
whole JPP messages; the client acknowledges each chunk by echoing its header. These are
the pieces the Twisted protocol (``tcp.py``) drives: the handshake parser, the chunk header and
the window of unacknowledged bytes that bounds what a slow client costs.
"""

from __future__ import annotations

import collections
import re
import struct

HEADER_LENGTH = 8
MAX_CHUNK = 0xFFFF  # the length field has 16 bits
MAX_MESSAGE = MAX_CHUNK - HEADER_LENGTH  # messages are never split across chunks
_CID = re.compile(rb"^[A-Za-z0-9_\-.]{1,128}$")
_MAX_HANDSHAKE = 512


class AuxProtocolError(ValueError):
    """The peer broke the aux channel protocol; the connection should be closed."""


def chunk_header(length: int, qid: int, seq: int) -> bytes:
    """The 8 header bytes of a chunk of ``length`` bytes (header included)."""
    if not HEADER_LENGTH <= length <= MAX_CHUNK:
        raise ValueError(f"chunk length {length} out of range")
    if not 0 <= seq < 1 << 24:
        raise ValueError(f"sequence number {seq} out of range")
    return struct.pack(">HHB", length, qid & 0xFFFF, 0) + seq.to_bytes(3, "big")


class Handshake:
    """
    Reads the channel id the client sends first: ``cid CRLF`` (OpenJPEG) or
    ``cid CRLF CRLF`` (Kakadu). Nothing is answered on success.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self.cid: bytes | None = None
        self._settled = False  # the optional second CRLF has been seen or ruled out

    def feed(self, data: bytes) -> bytes:
        """Consume handshake bytes; return what follows it (acknowledgements)."""
        if self.cid is not None:
            return self._after(data)
        self._buffer += data
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_HANDSHAKE:
                raise AuxProtocolError("no channel id line within 512 bytes")
            return b""
        line, rest = self._buffer[:end], self._buffer[end + 2 :]
        if not _CID.match(line):
            raise AuxProtocolError("the first line is not a channel id")
        self.cid = line
        self._buffer = b""
        return self._after(rest)

    def settle(self) -> None:
        """A chunk went out: from now on the client's bytes are acknowledgements."""
        if self.cid is not None:
            self._settled = True

    def _after(self, data: bytes) -> bytes:
        # Kakadu's empty line may come with the cid or in the next segment. The client
        # sends it before it has any chunk to acknowledge, so a CRLF arriving before the
        # first chunk went out (see settle) is the terminator, not the start of an ack.
        if self._settled:
            return data
        data = self._buffer + data
        if data in (b"", b"\r"):
            self._buffer = data
            return b""
        self._buffer = b""
        self._settled = True
        return data[2:] if data.startswith(b"\r\n") else data


class AckWindow:
    """
    Chunks sent but not yet acknowledged, and whether more may be sent.

    Parameters
    ----------
    window
        Unacknowledged bytes allowed in flight; a client that reads slowly or never
        acknowledges costs at most this (plus one chunk).
    """

    def __init__(self, window: int) -> None:
        if window < MAX_CHUNK:
            raise ValueError(f"the window must hold at least one chunk ({MAX_CHUNK} bytes)")
        self.window = window
        self.unacked = 0
        self._outstanding: collections.deque[bytes] = collections.deque()
        self._partial = b""

    def can_send(self, length: int) -> bool:
        return self.unacked + length <= self.window

    def sent(self, chunk: bytes) -> None:
        self._outstanding.append(chunk[:HEADER_LENGTH])
        self.unacked += int.from_bytes(chunk[:2], "big")

    def receive(self, data: bytes) -> int:
        """Consume acknowledgement bytes; return how many chunks they acknowledged."""
        data = self._partial + data
        acked = 0
        pos = 0
        while len(data) - pos >= HEADER_LENGTH:
            header = data[pos : pos + HEADER_LENGTH]
            if not self._outstanding or header != self._outstanding[0]:
                raise AuxProtocolError("an acknowledgement does not echo the oldest chunk sent")
            self._outstanding.popleft()
            self.unacked -= int.from_bytes(header[:2], "big")
            acked += 1
            pos += HEADER_LENGTH
        self._partial = data[pos:]
        return acked
