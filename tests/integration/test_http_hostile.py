"""Hostile HTTP clients on real sockets: huge bodies, trickled headers, connection floods.

The server runs in this process, so ``/proc/self/status`` shows its memory. Every client
runs in a thread (the reactor must keep running) and every loop is bounded in count and
in time.
"""

from __future__ import annotations

import select
import socket
import time
from typing import Iterator

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.helpers import rss

pytestmark = pytest.mark.integration

MIB = 1 << 20
HOSTILE = "127.0.0.2"  # all of 127/8 is loopback on Linux; the server listens on 127.0.0.1
# A backlog that holds a flood: with Twisted's 50 the kernel drops SYNs while the reactor
# accepts, and the clients retry a second later, which only slows the tests down.
LISTEN = "tcp:0:interface=127.0.0.1:backlog=1024"
# Memory the server may grow by while a 400 MB body is thrown at it: bodies are cut at
# their limit (at most 64 MiB, spooled to a temporary file, not memory).
RSS_CEILING = 48 * MIB

# Body-taking endpoints and their limits with the default configuration.
BODY_LIMITS = {
    "/jpip": 1 * MIB,  # [jpip] max_body
    "/xds/repository": 64 * MIB,  # [xds] max_body
    "/xds/registry": 64 * MIB,
    "/xds/imaging-source": 64 * MIB,
}


def chunked_body(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """``total`` bytes of chunked body, produced lazily from one reused block."""
    piece = b"%x\r\n" % size + b"x" * size + b"\r\n"
    for _ in range(total // size):
        yield piece
    yield b"0\r\n\r\n"


def read_reply(sock: socket.socket, already: bytes = b"", timeout: float = 10.0) -> bytes:
    """Read until the peer closes or ``timeout`` passes (bounded), returning what came."""
    sock.settimeout(0.5)
    data = already
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(data) < 65536:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            if b"\r\n\r\n" in data:
                break  # an answer is in and nothing more comes
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def post_huge_chunked(port: int, path: str, total: int = 400 * MIB, timeout: float = 120.0) -> tuple[bytes, int, int]:
    """POST a chunked body of ``total`` bytes, stopping when an answer arrives or the
    connection closes; returns (answer, body bytes sent, peak RSS growth)."""
    base = rss()
    peak = base
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    sock.setblocking(False)
    body = chunked_body(total)
    pending = b""
    sent = 0
    reply = b""
    deadline = time.monotonic() + timeout
    for i in range(10 * total // (64 * 1024)):  # each round sends or reads something, or waits 1 s
        if time.monotonic() > deadline:
            break
        if not pending:
            pending = next(body, b"")
            if not pending:
                break  # all sent
        readable, writable, _ = select.select([sock], [sock], [], 1.0)
        if readable:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            reply += data
            if b"\r\n\r\n" in reply:
                break  # the answer is in: stop sending
        elif writable:
            try:
                n = sock.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                break
            pending = pending[n:]
            sent += n
        if i % 256 == 0:
            peak = max(peak, rss())
    reply = read_reply(sock, reply)
    peak = max(peak, rss())
    sock.close()
    return reply, sent, peak - base


@pytest.mark.parametrize("path", list(BODY_LIMITS))
@pytest_twisted.ensureDeferred
async def test_huge_chunked_body_is_cut_at_its_limit(start_server, path: str) -> None:
    """A chunked 400 MB POST gets 413 once its limit is passed; the server's memory stays flat."""
    server = await start_server()
    started = time.monotonic()
    reply, sent, growth = await threads.deferToThread(post_huge_chunked, server.http_port, path)
    elapsed = time.monotonic() - started
    limit = BODY_LIMITS[path]
    print(f"{path}: 413 after {sent / MIB:.1f} MiB sent in {elapsed:.1f} s, RSS grew {growth / MIB:.1f} MiB")
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert b"\r\nConnection: close\r\n" in reply and b"\r\nServer: ImageShare\r\n" in reply
    # Cut at the bound: what was sent beyond it sat in socket buffers.
    assert limit <= sent <= limit + 32 * MIB
    assert growth < RSS_CEILING


def head_only(port: int, path: str, length: int, expect: bool) -> tuple[bytes, float]:
    """Send only the headers of a POST declaring ``length`` bytes; the answer and its delay."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {length}\r\n".encode()
                     + (b"Expect: 100-continue\r\n" if expect else b"") + b"\r\n")
        reply = read_reply(sock)
    return reply, time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_content_length_over_the_limit_is_refused_before_the_body(start_server) -> None:
    """413 comes from the headers alone (instead of 100 Continue when asked), at every
    endpoint, including paths without a limit of their own."""
    server = await start_server()
    for path, limit in [*BODY_LIMITS.items(), ("/status", 65536), ("/wado", 65536)]:
        for expect in (False, True):
            reply, delay = await threads.deferToThread(head_only, server.http_port, path, limit + 1, expect)
            assert reply.startswith(b"HTTP/1.1 413 "), (path, expect, reply[:200])
            assert b"100 Continue" not in reply and delay < 5
    # Within the limit, Expect is honoured and the request proceeds.
    reply, _ = await threads.deferToThread(head_only, server.http_port, "/jpip", 100, True)
    assert reply.startswith(b"HTTP/1.1 100 Continue")


def trickle_headers(port: int, every: float, lines: int) -> tuple[bytes, float]:
    """One header line every ``every`` seconds, at most ``lines``; the answer and when it came."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /status HTTP/1.1\r\n")
        for i in range(lines):
            readable, _, _ = select.select([sock], [], [], every)
            if readable:
                break
            try:
                sock.sendall(b"X-Slow-%d: y\r\n" % i)
            except (BrokenPipeError, ConnectionResetError):
                break
        reply = read_reply(sock, timeout=2)
        return reply, time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_trickled_headers_are_cut_at_the_header_deadline(start_server) -> None:
    """A header line every second does not keep the request alive past header_timeout: 408."""
    server = await start_server(http={"header_timeout": "2"})
    reply, elapsed = await threads.deferToThread(trickle_headers, server.http_port, 1.0, 8)
    print(f"slow headers: 408 after {elapsed:.2f} s")
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert 1.9 < elapsed < 4.0


def open_silent(port: int, count: int, source: str, batch: int = 50) -> list[socket.socket]:
    """``count`` connections from ``source`` that send nothing, opened ``batch`` at a time
    (the listen backlog) without blocking, so that opening them takes no longer than the
    server takes to accept them."""
    socks: list[socket.socket] = []
    deadline = time.monotonic() + 60
    while len(socks) < count and time.monotonic() < deadline:
        connecting = []
        for _ in range(min(batch, count - len(socks))):
            s = socket.socket()
            s.bind((source, 0))
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            connecting.append(s)
        waiting = list(connecting)
        while waiting and time.monotonic() < deadline:
            _, writable, _ = select.select([], waiting, [], 1.0)
            waiting = [s for s in waiting if s not in writable]
        # A connection refused at once may already be reset here: it is kept all the same,
        # and reads as closed.
        socks.extend(connecting)
    return socks


def closed_within(socks: list[socket.socket], timeout: float) -> tuple[int, int, float]:
    """Wait (bounded) for the peer to close each socket; (closed, answered 503, seconds taken)."""
    started = time.monotonic()
    deadline = started + timeout
    open_ = {s.fileno(): s for s in socks}
    answered = 0
    while open_ and time.monotonic() < deadline:
        readable, _, _ = select.select(list(open_.values()), [], [], 0.5)
        for s in readable:
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                data = b""
            if data.startswith(b"HTTP/1.1 503 "):
                answered += 1
            if not data or b"\r\n\r\n" in data:
                del open_[s.fileno()]
    return len(socks) - len(open_), answered, time.monotonic() - started


def status_code(port: int, source: str = "127.0.0.1") -> tuple[bytes, float]:
    """GET /status from ``source``: the status line and how long it took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        reply = read_reply(sock)
    return reply.split(b"\r\n", 1)[0], time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_silent_sockets_from_one_address_neither_lock_out_others_nor_stay(start_server) -> None:
    """500 idle connections from 127.0.0.2: those over its cap are closed at once (503), the
    others at the idle deadline, and a client on 127.0.0.1 is served meanwhile."""
    server = await start_server(http={"listen": LISTEN, "idle_timeout": "3", "header_timeout": "2"})
    per_address = server.service.config.http.max_connections_per_address
    socks = await threads.deferToThread(open_silent, server.http_port, 500, HOSTILE)
    try:
        assert len(socks) == 500
        status, delay = await threads.deferToThread(status_code, server.http_port)
        assert status == b"HTTP/1.1 200 OK" and delay < 5
        refused, answered, _ = await threads.deferToThread(closed_within, socks, 1.5)
        assert refused == answered == 500 - per_address
        closed, _, took = await threads.deferToThread(closed_within, socks, 10)
        print(f"500 silent sockets: {refused} refused at once (503), all {closed} closed "
              f"{1.5 + took:.1f} s after opening (idle_timeout 3 s)")
        assert closed == 500 and 1.5 + took < 5
    finally:
        for s in socks:
            s.close()


@pytest_twisted.ensureDeferred
async def test_aux_listener_is_capped_per_address(start_server) -> None:
    """The JPIP aux port counts its own connections: one over the per-address cap is closed at
    once, while another address still gets in."""
    server = await start_server(http={"listen": LISTEN, "max_connections_per_address": "8"},
                                jpip={"tcp_listen": LISTEN})
    aux_port = server.service.jpip.aux_port
    held = await threads.deferToThread(open_silent, aux_port, 8, HOSTILE)
    extra = await threads.deferToThread(open_silent, aux_port, 4, HOSTILE)
    other = await threads.deferToThread(open_silent, aux_port, 1, "127.0.0.1")
    try:
        closed, _, _ = await threads.deferToThread(closed_within, extra, 2)
        assert closed == 4
        closed, _, _ = await threads.deferToThread(closed_within, held + other, 1)
        assert closed == 0  # admitted ones wait for their handshake (tcp_attach_timeout)
        # The HTTP listener counts separately: 8 aux connections take nothing from it.
        status, _ = await threads.deferToThread(status_code, server.http_port, HOSTILE)
        assert status == b"HTTP/1.1 200 OK"
    finally:
        for s in held + extra + other:
            s.close()


def send_whole_request(port: int, request: bytes, timeout: float = 30.0) -> tuple[bytes, float]:
    """Send all of ``request`` before reading anything (as http.client and urllib do); the
    answer and how long it took. A reset while sending counts as no answer."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            return b"", time.monotonic() - started
        reply = read_reply(sock, timeout=timeout)
    return reply, time.monotonic() - started


def long_wado_url(size: int) -> bytes:
    """A /wado request-target of ``size`` bytes (a query with one very long UID)."""
    start = b"/wado?requestType=WADO&studyUID=1.2&seriesUID=1.2&objectUID="
    return start + b"1" * (size - len(start))


@pytest.mark.parametrize("size", [20 * 1024, 64 * 1024, 1024 * 1024])
@pytest_twisted.ensureDeferred
async def test_long_request_line_gets_414_at_every_length(start_server, size: int) -> None:
    """A request line over [http] max_request_line (16 KiB) used to get no answer at all
    (Twisted closed the connection); now 414 with Connection: close, even when the client
    sends the whole 1 MB request before reading, and the server's memory stays flat."""
    server = await start_server()
    base = rss()
    request = b"GET " + long_wado_url(size) + b" HTTP/1.1\r\nHost: localhost\r\nAccept: image/jpeg\r\n\r\n"
    reply, elapsed = await threads.deferToThread(send_whole_request, server.http_port, request)
    growth = rss() - base
    status = reply.split(b"\r\n", 1)[0]
    print(f"{size} byte request line: {status!r} in {elapsed * 1000:.0f} ms, "
          f"RSS grew {growth / MIB:.1f} MiB")
    assert reply.startswith(b"HTTP/1.1 414 URI Too Long\r\n"), reply[:200]
    assert b"\r\nConnection: close\r\n" in reply and b"\r\nServer: ImageShare\r\n" in reply
    assert elapsed < 10 and growth < 8 * MIB


@pytest_twisted.ensureDeferred
async def test_request_lines_below_the_channel_limit_get_wado_414_and_long_headers_431(start_server) -> None:
    """Between WADO's own query limit (4096) and the channel's (16 KiB) the WADO resource
    answers 414; a header line of 40 KiB gets 431 rather than a silent close."""
    server = await start_server()
    request = b"GET " + long_wado_url(8 * 1024) + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    reply, _ = await threads.deferToThread(send_whole_request, server.http_port, request)
    assert reply.startswith(b"HTTP/1.1 414 "), reply[:200]
    assert b"query is longer than 4096 bytes" in reply
    request = b"GET /status HTTP/1.1\r\nHost: localhost\r\nCookie: " + b"c" * (40 * 1024) + b"\r\n\r\n"
    reply, _ = await threads.deferToThread(send_whole_request, server.http_port, request)
    assert reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), reply[:200]
    assert b"\r\nConnection: close\r\n" in reply
