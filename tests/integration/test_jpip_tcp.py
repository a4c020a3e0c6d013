"""JPIP http-tcp channels and pre-emption against the running server, over real sockets."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_twisted
from pydicom import dcmread
from twisted.internet import reactor, task, threads
from twisted.logger import formatEvent, globalLogPublisher

from imageshare.protocols.jpip.messages import Eor, Message, StreamParser
from tests.helpers import make_cr, scu_store
from tests.integration.rawjpip import AuxConnection, Chunk, HttpConnection, HttpReply, get
from tests.protocols.jpip import opj

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not opj.HAVE_TOOLS, reason="OpenJPEG's JPIP tools are not installed"),
]

FULL = "fsiz=1955,1841"
# A session's walk through the CR: first view, zooms, pans, then the rest in byte-limited steps.
WALK = [
    "fsiz=245,231",
    "fsiz=489,461",
    "fsiz=978,920&roff=100,100&rsiz=400,400",
    "fsiz=978,920&roff=500,300&rsiz=400,400",
    "fsiz=1955,1841&roff=1200,1000&rsiz=512,512&len=120000",
    "fsiz=1955,1841&roff=1200,1000&rsiz=512,512",
    "fsiz=1955,1841&layers=2",
    "fsiz=1955,1841",
]


async def _serve(start_server: Any, tmp_path: Path, **sections: dict[str, str]) -> dict[str, Any]:
    server = await start_server(**sections)
    cr_path, pixels = make_cr(tmp_path)
    statuses = await threads.deferToThread(scu_store, server.dicom_port, [cr_path])
    assert statuses == [0]
    await server.service.transcoder.when_idle()
    uid = str(dcmread(cr_path, stop_before_pixels=True).SOPInstanceUID)
    frame = server.service.catalog.frames(uid)[0]
    return {
        "server": server,
        "uid": uid,
        "pixels": pixels,
        "size": (server.data_dir / frame.codestream_path).stat().st_size,
        "http": server.http_port,
        "aux": server.service.jpip.aux_port,
    }


@pytest_twisted.async_fixture
async def cr(start_server: Any, tmp_path: Path) -> dict[str, Any]:
    """A running server holding a 1955x1841 CR (about 5 MB of codestream), window 64 KiB."""
    return await _serve(start_server, tmp_path, jpip={"tcp_window": "65535", "tcp_attach_timeout": "1"})


def bins_of(messages: list[Message]) -> dict[tuple[int, int, int], tuple[bytes, bool]]:
    """Data-bin contents the messages give, asserting no byte comes twice or out of order."""
    bins: dict[tuple[int, int, int], tuple[bytes, bool]] = {}
    for m in messages:
        key = (m.bin_class, m.csn, m.bin_id)
        data, complete = bins.get(key, (b"", False))
        assert m.offset == len(data), f"bin {key}: offset {m.offset}, held {len(data)}"
        bins[key] = (data + m.data, complete or m.complete)
    return bins


def check_chunks(chunks: list[Chunk], qid: int) -> None:
    for seq, c in enumerate(chunks):
        assert (c.qid, c.repeat, c.seq) == (qid, 0, seq)
        assert c.length == 8 + len(c.body) <= 65535


def open_tcp(aux_port: int, http_port: int, query: str, **kw: Any) -> tuple[HttpReply, AuxConnection]:
    reply = get(http_port, query)
    assert reply.status == 200, reply.body
    cnew = reply.cnew()
    assert cnew["transport"] == "http-tcp" and int(cnew["auxport"]) == aux_port
    return reply, AuxConnection(aux_port, cnew["cid"], **kw)


def walk_http(port: int, uid: str) -> tuple[list[dict[Any, Any]], list[int], list[bytes]]:
    first = get(port, f"target={uid}&cnew=http&qid=1&{WALK[0]}")
    cid = first.cnew()["cid"]
    bodies = [first.body] + [get(port, f"cid={cid}&qid={i + 2}&{w}").body for i, w in enumerate(WALK[1:])]
    steps, reasons, seen = [], [], []
    for body in bodies:
        out = StreamParser().feed(body)
        seen.extend(m for m in out if isinstance(m, Message))
        steps.append(bins_of(seen))
        reasons.append(out[-1].reason)
    return steps, reasons, bodies


def walk_tcp(aux_port: int, http_port: int, uid: str, terminator: bytes) -> tuple[list[dict[Any, Any]], list[int], list[bytes]]:
    reply, aux = open_tcp(aux_port, http_port, f"target={uid}&cnew=http-tcp,http&qid=1&{WALK[0]}",
                          terminator=terminator)
    assert reply.body == b"" and reply.headers["content-length"] == "0"
    assert reply.headers["jpip-qid"] == "1" and "jpip-tid" in reply.headers
    cid = reply.cnew()["cid"]
    steps, reasons, bodies, seen = [], [], [], []
    try:
        for qid, window in enumerate(WALK, start=1):
            if qid > 1:
                r = get(http_port, f"cid={cid}&qid={qid}&{window}")
                assert r.status == 200 and r.body == b"" and r.headers["jpip-qid"] == str(qid)
            chunks, messages, eor = aux.response()
            check_chunks(chunks, qid)
            bodies.append(b"".join(c.body for c in chunks))
            seen.extend(messages)
            steps.append(bins_of(seen))
            reasons.append(eor.reason)
    finally:
        aux.close()
    return steps, reasons, bodies


@pytest_twisted.ensureDeferred
async def test_same_data_bins_over_http_and_http_tcp(cr: dict[str, Any], tmp_path: Path) -> None:
    """One walk of views over http and over http-tcp (both handshake terminators): after each
    step the client holds the same data-bins; the http-tcp stream decodes, with OpenJPEG's
    own tools, to the DICOM pixels."""
    uid = cr["uid"]
    http_steps, http_reasons, _ = await threads.deferToThread(walk_http, cr["http"], uid)
    for terminator in (b"\r\n", b"\r\n\r\n"):
        tcp_steps, tcp_reasons, bodies = await threads.deferToThread(
            walk_tcp, cr["aux"], cr["http"], uid, terminator
        )
        assert tcp_reasons == http_reasons == [2, 2, 2, 2, 4, 2, 2, 1]
        for a, b in zip(http_steps, tcp_steps):
            assert a == b
    rebuilt = opj.transcode(tmp_path, *bodies)
    decoded = opj.decode(rebuilt, tmp_path, cr["pixels"].shape, precision=15, signed=False)
    np.testing.assert_array_equal(decoded, cr["pixels"])


@pytest_twisted.ensureDeferred
async def test_flow_control_stops_at_the_window_and_acks_resume(cr: dict[str, Any], tmp_path: Path) -> None:
    """A client that never acknowledges gets at most the window (64 KiB) and the server holds
    no more than that per channel, for several such clients at once; acknowledging resumes
    the stream to its end."""
    service = cr["server"].service

    def stall(n: int) -> list[tuple[str, AuxConnection, list[Chunk]]]:
        out = []
        for _ in range(n):
            reply, aux = open_tcp(cr["aux"], cr["http"], f"target={cr['uid']}&cnew=http-tcp&qid=7&{FULL}")
            chunks = []
            for _ in range(1000):
                c = aux.chunk(timeout=1.0)
                if c is None:
                    break
                chunks.append(c)
            out.append((reply.cnew()["cid"], aux, chunks))
        return out

    stalled = await threads.deferToThread(stall, 4)
    for cid, aux, chunks in stalled:
        sent = sum(c.length for c in chunks)
        assert 0 < sent <= 65535 and aux.received == sent
        stream = service.jpip_aux._streams[cid]
        assert stream.window.unacked == sent
        assert service.jpip.sessions.find(cid).active is not None  # still mid-response

    def resume(aux: AuxConnection, chunks: list[Chunk]) -> tuple[list[Chunk], list[Message], Eor]:
        for c in chunks:
            aux.ack(c)
        return aux.response(before=chunks)

    cid, aux, chunks = stalled[0]
    all_chunks, _, eor = await threads.deferToThread(resume, aux, chunks)
    assert eor.reason == 1
    check_chunks(all_chunks, 7)
    body = b"".join(c.body for c in all_chunks)
    assert len(body) > 0.9 * cr["size"]
    rebuilt = opj.transcode(tmp_path, body)
    decoded = opj.decode(rebuilt, tmp_path, cr["pixels"].shape, precision=15, signed=False)
    np.testing.assert_array_equal(decoded, cr["pixels"])
    for _, other, _ in stalled:
        other.close()


@pytest_twisted.ensureDeferred
async def test_preemption_over_http_tcp(cr: dict[str, Any], tmp_path: Path) -> None:
    """A pan request sent while a full-resolution response is stalled cuts it with EOR 3 at
    once; the pan is served next, and the session goes on without sending any byte twice
    or leaving a gap, to the exact pixels."""

    def run() -> list[bytes]:
        reply, aux = open_tcp(cr["aux"], cr["http"], f"target={cr['uid']}&cnew=http-tcp&qid=1&fsiz=245,231")
        cid = reply.cnew()["cid"]
        bodies = []
        chunks, _, eor = aux.response()
        bodies.append(b"".join(c.body for c in chunks))
        assert eor.reason == 2
        assert get(cr["http"], f"cid={cid}&qid=2&{FULL}").status == 200
        stalled = []
        for _ in range(1000):  # no acks: the window fills
            c = aux.chunk(timeout=1.0)
            if c is None:
                break
            stalled.append(c)
        assert stalled and sum(c.length for c in stalled) <= 65535
        pan = get(cr["http"], f"cid={cid}&qid=3&{FULL}&roff=0,0&rsiz=600,600")
        assert pan.status == 200
        cut = aux.chunk(timeout=10)  # the EOR comes although the window is full
        assert cut is not None and (cut.qid, cut.body) == (2, bytes([0, 3, 0]))
        check_chunks(stalled + [cut], 2)
        bodies.append(b"".join(c.body for c in stalled + [cut]))
        for c in stalled + [cut]:
            aux.ack(c)
        chunks, _, eor = aux.response()
        assert eor.reason == 2
        check_chunks(chunks, 3)
        bodies.append(b"".join(c.body for c in chunks))
        assert get(cr["http"], f"cid={cid}&qid=4&{FULL}").status == 200
        chunks, _, eor = aux.response()
        assert eor.reason == 1
        bodies.append(b"".join(c.body for c in chunks))
        aux.close()
        return bodies

    bodies = await threads.deferToThread(run)
    bins_of(opj.messages(*bodies))  # no byte twice, no gap
    rebuilt = opj.transcode(tmp_path, *bodies)
    decoded = opj.decode(rebuilt, tmp_path, cr["pixels"].shape, precision=15, signed=False)
    np.testing.assert_array_equal(decoded, cr["pixels"])


def _closed(s: Any) -> bool:
    """The server closed (or reset) the socket without writing anything."""
    s.settimeout(10)
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def _eor_of(body: bytes) -> int:
    out = StreamParser().feed(body)
    assert isinstance(out[-1], Eor)
    return out[-1].reason


@pytest_twisted.ensureDeferred
async def test_preemption_over_pipelined_http(cr: dict[str, Any], tmp_path: Path) -> None:
    """On one HTTP/1.1 connection a pan request pipelined behind a streaming full-resolution
    response cuts it with EOR 3 and is answered next; pipelined in the same packet, the first
    response is nothing but EOR 3; with wait=yes nothing is cut. The model stays exact."""

    def run() -> tuple[list[bytes], int]:
        first = get(cr["http"], f"target={cr['uid']}&cnew=http&fsiz=245,231")
        cid = first.cnew()["cid"]
        bodies = [first.body]
        conn = HttpConnection(cr["http"], rcvbuf=4096)
        conn.send(f"cid={cid}&{FULL}")
        status, headers = conn.head()
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        time.sleep(0.5)  # the response stalls in full socket buffers
        conn.send(f"cid={cid}&{FULL}&roff=0,0&rsiz=600,600")
        full = b"".join(conn.body_chunks())
        assert _eor_of(full) == 3  # cut short: an EOR 3 comes only before the end
        pan = conn.reply()
        assert pan.status == 200 and _eor_of(pan.body) == 2
        bodies += [full, pan.body]
        # Both in one packet: the first is pre-empted before it starts.
        conn.send(f"cid={cid}&{FULL}", f"cid={cid}&{FULL}&roff=600,600&rsiz=300,300")
        a, b = conn.reply(), conn.reply()
        assert a.body == bytes([0, 3, 0]) and _eor_of(b.body) == 2
        bodies.append(b.body)
        # wait=yes: queued behind, not cutting.
        conn.send(f"cid={cid}&{FULL}", f"cid={cid}&fsiz=489,461&wait=yes")
        a, b = conn.reply(), conn.reply()
        assert _eor_of(a.body) == 1 and b.body == bytes([0, 1, 0])  # it holds the whole image now
        bodies.append(a.body)
        conn.close()
        return bodies, len(a.body)

    bodies, _ = await threads.deferToThread(run)
    bins_of(opj.messages(*bodies))
    rebuilt = opj.transcode(tmp_path, *bodies)
    decoded = opj.decode(rebuilt, tmp_path, cr["pixels"].shape, precision=15, signed=False)
    np.testing.assert_array_equal(decoded, cr["pixels"])


@pytest_twisted.ensureDeferred
async def test_aux_port_abuse_is_logged_and_contained(cr: dict[str, Any]) -> None:
    """Garbage, half handshakes, unknown cids, a second connection for a channel and an
    abrupt disconnect mid-response: each is logged and closed; the dropped channel ends but
    its session (with its model) goes on; another session streams on meanwhile; no channel
    or connection is left behind."""
    service = cr["server"].service
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        def run() -> None:
            import socket

            # A session that streams throughout, on its own channel.
            reply, other = open_tcp(cr["aux"], cr["http"], f"target={cr['uid']}&cnew=http-tcp&fsiz=489,461")
            other_cid = reply.cnew()["cid"]
            assert other.response()[2].reason == 2
            for garbage in (b"GET / HTTP/1.1\r\n\r\n", b"\x00\xff" * 300, b"JPHT" + b"0" * 32 + b"\r\n"):
                s = socket.create_connection(("127.0.0.1", cr["aux"]), timeout=10)
                s.sendall(garbage)
                assert _closed(s)  # nothing written back
                s.close()
            # Half a handshake, then silence: closed after the attach timeout (1 s).
            s = socket.create_connection(("127.0.0.1", cr["aux"]), timeout=10)
            s.sendall(b"JPHT12")
            t0 = time.monotonic()
            assert _closed(s) and time.monotonic() - t0 < 8
            s.close()
            s = socket.create_connection(("127.0.0.1", cr["aux"]), timeout=10)
            s.close()  # connect and vanish

            # A session with an http channel and an http-tcp channel.
            first = get(cr["http"], f"target={cr['uid']}&cnew=http&fsiz=245,231")
            http_cid = first.cnew()["cid"]
            added = get(cr["http"], f"cid={http_cid}&cnew=http-tcp&fsiz=245,231")
            assert added.status == 200 and added.body == b""
            tcp_cid = added.cnew()["cid"]
            assert tcp_cid != http_cid
            aux = AuxConnection(cr["aux"], tcp_cid)
            chunks, messages, eor = aux.response()
            assert (messages, eor.reason) == ([], 2)  # the http channel already brought it all
            second = AuxConnection(cr["aux"], tcp_cid)
            assert second.closed_by_server()  # one connection per channel
            second.close()
            assert get(cr["http"], f"cid={tcp_cid}&{FULL}").status == 200
            assert aux.chunk() is not None
            aux.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            aux.close()  # abrupt (RST) in the middle of the response
            for _ in range(100):
                if get(cr["http"], f"cid={tcp_cid}&fsiz=64,64").status == 404:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("the dropped channel stayed open")
            rest = get(cr["http"], f"cid={http_cid}&{FULL}")
            assert rest.status == 200 and _eor_of(rest.body) == 1
            other_more = get(cr["http"], f"cid={other_cid}&{FULL}")
            assert other_more.status == 200
            assert other.response()[2].reason == 1
            other.close()

        await threads.deferToThread(run)
        for _ in range(100):
            if service.jpip_aux.connections == 0:
                break
            await task.deferLater(reactor, 0.05)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert service.jpip_aux.connections == 0 and len(service.jpip_aux) == 0
    text = "\n".join(formatEvent(e) for e in events if e.get("log_namespace") == "imageshare.jpip.tcp")
    for expected in ("named an unknown channel", "the first line is not a channel id", "sent no channel id in time",
                     "which has one already", "ended"):
        assert expected in text, expected


@pytest_twisted.ensureDeferred
async def test_channels_cclose_and_attach_timeout(cr: dict[str, Any]) -> None:
    """Several channels share a session's model; cclose of the http-tcp channel closes its
    connection while the http channel goes on; a granted channel whose connection never
    comes is closed after tcp_attach_timeout and frees its session's lock."""
    service = cr["server"].service

    def run() -> None:
        reply, aux = open_tcp(cr["aux"], cr["http"], f"target={cr['uid']}&cnew=http-tcp&fsiz=245,231")
        tcp_cid = reply.cnew()["cid"]
        _, first, _ = aux.response()
        added = get(cr["http"], f"cid={tcp_cid}&cnew=http&fsiz=489,461")
        http_cid = added.cnew()["cid"]
        assert added.cnew()["transport"] == "http" and added.body  # the new channel's data come over HTTP
        assert get(cr["http"], f"cid={tcp_cid}&fsiz=489,461").status == 200
        chunks, messages, eor = aux.response()
        assert messages == [] and eor.reason == 2  # the other channel brought it already
        closing = get(cr["http"], f"cid={http_cid}&cclose={tcp_cid}&fsiz=978,920")
        assert closing.status == 200 and closing.body  # answered on the request's own channel
        assert aux.closed_by_server()
        aux.close()
        assert get(cr["http"], f"cid={tcp_cid}&fsiz=64,64").status == 404
        assert get(cr["http"], f"cid={http_cid}&fsiz=978,920").body == bytes([0, 2, 0])
        bins_of(first + opj.messages(added.body, closing.body))

        # Granted, never attached: the channel is gone after the timeout (1 s here).
        lonely = get(cr["http"], f"target={cr['uid']}&cnew=http-tcp&{FULL}")
        lonely_cid = lonely.cnew()["cid"]
        for _ in range(100):
            if get(cr["http"], f"cid={lonely_cid}&fsiz=64,64").status == 404:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the unattached channel stayed")

    await threads.deferToThread(run)
    assert len(service.jpip_aux) == 0


@pytest_twisted.ensureDeferred
async def test_http_tcp_needs_its_listener(start_server: Any) -> None:
    """Without tcp_listen, a client offering http-tcp and http gets http; offering only
    http-tcp, it gets 501 (a transport it did not offer is never granted)."""
    server = await start_server(jpip={"tcp_listen": ""})
    assert server.service.jpip_tcp is None and server.service.jpip.aux_port is None

    def run() -> None:
        ok = get(server.http_port, "target=1.2.3&cnew=http-tcp,http&fsiz=64,64")
        assert ok.status == 404  # no such target, but the transport was acceptable
        refused = get(server.http_port, "target=1.2.3&cnew=http-tcp&fsiz=64,64")
        assert refused.status == 501 and b"http-tcp" in refused.body

    await threads.deferToThread(run)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cli = str(Path(sys.executable).parent / "imageshare-jpip")
    return subprocess.run([cli, *args], capture_output=True, text=True, timeout=120)


@pytest_twisted.ensureDeferred
async def test_command_line_client_over_http_tcp(cr: dict[str, Any], tmp_path: Path) -> None:
    """imageshare-jpip --transport http-tcp fetches the full image in byte-limited steps over
    the TCP channel, says so, and closes its session."""
    url = f"{cr['server'].url}/jpip/{cr['uid']}"
    r = await threads.deferToThread(run_cli, url, "--transport", "http-tcp", "--fsiz", "1955,1841",
                                    "--len", "500000", "-o", str(tmp_path / "full.npy"))
    assert r.returncode == 0, r.stderr
    assert "over http-tcp" in r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "full.npy"), cr["pixels"])
    assert len(cr["server"].service.jpip.sessions) == 0  # cclose ended it
