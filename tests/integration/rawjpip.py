"""
Blocking raw-socket JPIP peers for the http-tcp and pre-emption tests (test helper).

Independent of the server's code on purpose: HTTP/1.1 is written and read by hand (so
requests can be pipelined and responses read slowly), and the aux channel is read chunk
by chunk with acknowledgements under the test's control. Every read has a timeout.
"""

from __future__ import annotations

import socket
import struct
import time

import attrs

from imageshare.protocols.jpip.messages import Eor, Message, StreamParser

TIMEOUT = 30.0


@attrs.define
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def cnew(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.headers["jpip-cnew"].split(","))


class HttpConnection:
    """One HTTP/1.1 connection: requests written as given, replies read one at a time."""

    def __init__(self, port: int, *, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # a small receive window makes the server's writes stall
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(("127.0.0.1", port))
        self._buffer = b""

    def send(self, *queries: str, headers: dict[str, str] | None = None) -> None:
        """Write GET requests for ``/jpip?<query>`` back to back (pipelined); ``headers``
        (e.g. ``Authorization``) go on each of them."""
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self.sock.sendall(
            b"".join(f"GET /jpip?{q} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode("ascii") for q in queries)
        )

    def _read(self, n: int = 65536) -> bytes:
        data = self.sock.recv(n)
        if not data:
            raise ConnectionError("the server closed the connection")
        return data

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            self._buffer += self._read()
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._buffer += self._read()
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def head(self) -> tuple[int, dict[str, str]]:
        status = int(self._line().split(b" ")[1])
        headers: dict[str, str] = {}
        for _ in range(200):
            line = self._line()
            if not line:
                return status, headers
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        raise AssertionError("too many header lines")

    def body_chunks(self) -> list[bytes]:
        """The chunks of a chunked body, as they come."""
        out = []
        for _ in range(1_000_000):
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                self._line()
                return out
            out.append(self._exactly(size))
            self._exactly(2)
        raise AssertionError("endless body")

    def reply(self) -> HttpReply:
        status, headers = self.head()
        if headers.get("transfer-encoding") == "chunked":
            body = b"".join(self.body_chunks())
        else:
            body = self._exactly(int(headers.get("content-length", "0")))
        return HttpReply(status, headers, body)

    def close(self) -> None:
        self.sock.close()


def get(port: int, query: str, *, headers: dict[str, str] | None = None) -> HttpReply:
    """One request on a connection of its own (the session outlives HTTP connections)."""
    conn = HttpConnection(port)
    try:
        conn.send(query, headers=headers)
        return conn.reply()
    finally:
        conn.close()


@attrs.define
class Chunk:
    header: bytes
    body: bytes

    @property
    def length(self) -> int:
        return struct.unpack(">H", self.header[:2])[0]

    @property
    def qid(self) -> int:
        return struct.unpack(">H", self.header[2:4])[0]

    @property
    def repeat(self) -> int:
        return self.header[4]

    @property
    def seq(self) -> int:
        return int.from_bytes(self.header[5:8], "big")


class AuxConnection:
    """The client end of an http-tcp channel; acknowledgements only when told."""

    def __init__(self, port: int, cid: str, *, terminator: bytes = b"\r\n") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.sendall(cid.encode("ascii") + terminator)
        self._buffer = b""
        self.received = 0

    def chunk(self, timeout: float = TIMEOUT) -> Chunk | None:
        """The next chunk, or None if none comes within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self._buffer) >= 8:
                length = struct.unpack(">H", self._buffer[:2])[0]
                assert length >= 8, self._buffer[:8].hex()
                if len(self._buffer) >= length:
                    chunk = Chunk(self._buffer[:8], self._buffer[8:length])
                    self._buffer = self._buffer[length:]
                    return chunk
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return None
            if not data:
                raise ConnectionError("the server closed the aux connection")
            self.received += len(data)
            self._buffer += data

    def ack(self, chunk: Chunk) -> None:
        self.sock.sendall(chunk.header)

    def response(
        self, *, ack: bool = True, timeout: float = TIMEOUT, before: list[Chunk] = ()  # type: ignore[assignment]
    ) -> tuple[list[Chunk], list[Message], Eor]:
        """Chunks up to and including the one with the EOR; their messages and the EOR.
        ``before``: chunks of this response read already (messages inherit their class)."""
        chunks: list[Chunk] = list(before)
        parser = StreamParser()
        messages: list[Message] = [m for c in before for m in parser.feed(c.body)]
        for _ in range(100_000):
            chunk = self.chunk(timeout)
            assert chunk is not None, "no chunk in time"
            chunks.append(chunk)
            if ack:
                self.ack(chunk)
            out = parser.feed(chunk.body)
            for i, m in enumerate(out):
                if isinstance(m, Eor):
                    assert i == len(out) - 1, "data after the EOR in its chunk"
                    return chunks, messages, m
                messages.append(m)
        raise AssertionError("no EOR")

    def closed_by_server(self, timeout: float = 10) -> bool:
        """True once the server has closed the connection (data before that is dropped)."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(65536):
                    return True
            except socket.timeout:
                return False
            except ConnectionResetError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()
