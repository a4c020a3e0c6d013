"""Early notice of pipelined HTTP/1.1 requests, without I/O.

Twisted's ``HTTPChannel`` parses no further while it answers a request, but a
streaming JPIP response must learn at once that the client sent a newer one.  So
a channel feeds every inbound byte to a :class:`RequestScanner` before Twisted
sees it.  The scanner finds request boundaries exactly as ``HTTPChannel``
(Twisted 26.x) does, and gives up rather than guess: the caller then merely loses
the early notice on that connection.
"""

from __future__ import annotations

import re

import attrs

# Compiled patterns rather than per-byte loops: the scanner sees every request the server gets.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_TARGET_BYTE = re.compile(rb"[\x00- \xb1-\xff]")  # sic: Twisted's bound is decimal 176
_MAX_HEADERS = 500  # HTTPChannel.maxHeaders


@attrs.frozen
class RequestStarted:
    """A request line has arrived; headers and body may still be on their way."""

    index: int  # 0-based ordinal of the request on this connection


@attrs.frozen
class ScannedRequest:
    """A whole request (head and body) has arrived."""

    index: int
    method: bytes
    target: bytes  # the request-target as sent
    headers: tuple[tuple[bytes, bytes], ...]  # (lower-cased name, stripped value), in order
    body: bytes


_Events = list[RequestStarted | ScannedRequest]


class _GiveUp(Exception):
    """Input that Twisted rejects, or that we choose not to follow."""


def _istoken(b: bytes) -> bool:
    return _TOKEN.fullmatch(b) is not None


def _parse_request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    # Same checks as twisted.web.http._parseRequestLine, so that we report no
    # request that Twisted would answer with 400 instead.
    parts = line.split(b" ")
    if len(parts) != 3:
        raise _GiveUp
    method, target, version = parts
    if not _istoken(method) or target == b"" or version not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise _GiveUp
    if _BAD_TARGET_BYTE.search(target):
        raise _GiveUp
    return method, target, version


class RequestScanner:
    """Follow the requests on one connection; :meth:`feed` it every inbound byte, in order.

    Memory stays below ``max_head + max_body`` bytes (plus a pending CR): a head or
    a declared body over its limit makes the scanner give up instead of buffering, as
    does a request line over ``max_request_line`` (the channel refuses those with 414).
    """

    def __init__(self, *, max_head: int = 16384, max_body: int = 65536, max_request_line: int | None = None) -> None:
        self._max_head = max_head  # HTTPChannel.totalHeadersSize
        self._max_body = max_body  # Twisted has no limit; we won't hold more
        self._max_request_line = max_head if max_request_line is None else min(max_request_line, max_head)
        self._active = True
        self._count = 0
        self._reset()

    @property
    def active(self) -> bool:
        """False once the scanner gave up (or the connection cannot carry more requests)."""
        return self._active

    def _reset(self) -> None:
        # Per-request state, as HTTPChannel.allContentReceived resets it.
        self._line = bytearray()  # incomplete line
        self._head_size = 0  # sum of line lengths, as HTTPChannel._receivedHeaderSize
        self._ate_empty = False  # one empty line before a request line is tolerated
        self._request: tuple[bytes, bytes, bytes] | None = None
        self._pending = b""  # header line kept back for continuation lines
        self._headers: list[tuple[bytes, bytes]] = []
        self._length: int | None = None
        self._body: bytearray | None = None  # not None once the head is complete

    def _give_up(self) -> None:
        self._active = False
        self._reset()  # drop every reference to buffered data

    def feed(self, data: bytes) -> list[RequestStarted | ScannedRequest]:
        """Consume ``data``; return the events it completes, in order."""
        events: _Events = []
        pos = 0
        try:
            while pos < len(data) and self._active:
                if self._body is None:
                    pos = self._take_line(data, pos, events)
                else:
                    pos = self._take_body(data, pos, events)
        except _GiveUp:
            self._give_up()
        return events

    def _take_line(self, data: bytes, pos: int, events: _Events) -> int:
        # Never copy more than the head (or the request line) may still hold (+2 for the CRLF).
        limit = self._max_head - self._head_size
        if self._request is None:
            limit = min(limit, self._max_request_line)
        room = limit + 2 - len(self._line)
        nl = data.find(b"\n", pos, pos + room)
        end = min(len(data), pos + room) if nl < 0 else nl + 1
        self._line += data[pos:end]
        if self._line.endswith(b"\r\n"):  # a bare LF stays inside the line, as in LineReceiver
            line = bytes(self._line[:-2])
            self._line.clear()
            self._line_received(line, events)
        elif len(self._line) - self._line.endswith(b"\r") > limit:
            raise _GiveUp
        return end

    def _take_body(self, data: bytes, pos: int, events: _Events) -> int:
        assert self._body is not None and self._length is not None
        chunk = data[pos : pos + self._length - len(self._body)]
        self._body += chunk
        if len(self._body) == self._length:
            self._finish(events)
        return pos + len(chunk)

    def _line_received(self, line: bytes, events: _Events) -> None:
        # Mirrors HTTPChannel.lineReceived.
        self._head_size += len(line)  # within max_head: _take_line copied no more
        if self._request is None:
            if line == b"" and not self._ate_empty:  # e.g. a CRLF after a POST body
                self._ate_empty = True
                return
            self._request = _parse_request_line(line)
            events.append(RequestStarted(self._count))
        elif line == b"":
            if self._pending:
                self._header(self._pending)
            self._body = bytearray()
            if not self._length:
                self._finish(events)
        elif line[0] in b" \t":  # continuation: joined with one space
            self._pending += b" " + line.lstrip(b" \t")
        else:
            if self._pending:
                self._header(self._pending)
            self._pending = line

    def _header(self, line: bytes) -> None:
        # Mirrors HTTPChannel.headerReceived and _maybeChooseTransferDecoder.
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if not colon or not _istoken(name) or any(c in value for c in b"\0\r\n"):
            raise _GiveUp
        name = name.lower()
        if name == b"content-length":
            if not value.isdigit() or self._length is not None:
                raise _GiveUp
            self._length = int(value)
            if self._length > self._max_body:
                raise _GiveUp
        elif name == b"transfer-encoding" and value.lower() != b"identity":
            raise _GiveUp  # chunked bodies are not followed
        self._headers.append((name, value))
        if len(self._headers) > _MAX_HEADERS:
            raise _GiveUp

    def _finish(self, events: _Events) -> None:
        assert self._request is not None and self._body is not None
        method, target, version = self._request
        headers = tuple(self._headers)
        events.append(ScannedRequest(self._count, method, target, headers, bytes(self._body)))
        self._count += 1
        self._reset()
        # HTTPChannel.checkPersistence: after this request Twisted reads no more,
        # so reporting a later one would pre-empt a response for nothing.
        connection = next((v for n, v in headers if n == b"connection"), b"")
        if version != b"HTTP/1.1" or b"close" in connection.lower().split(b" "):
            self._give_up()
