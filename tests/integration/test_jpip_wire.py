"""What JPIP puts on the wire, read as raw bytes: header spellings, the http-tcp address, and
what an OpenJPEG client is sent (its tile-header layout, chosen by its User-Agent)."""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_twisted
import treq
from pydicom import dcmread
from twisted.internet import threads

from imageshare.protocols.jpip.messages import Message, StreamParser
from tests.helpers import sample_file, scu_store
from tests.integration.rawjpip import AuxConnection, get
from tests.protocols.jpip import opj

pytestmark = pytest.mark.integration

# Every JPIP response header the server sends today (ISO/IEC 15444-9 D.2 spelling).
SPELLINGS = ("JPIP-cnew", "JPIP-tid", "JPIP-qid", "JPIP-fsiz", "JPIP-roff", "JPIP-rsiz",
             "JPIP-comps", "JPIP-layers", "JPIP-stream", "JPIP-len")


def raw_head(port: int, query: str) -> bytes:
    """The status line and headers of one GET, exactly as they arrive (bounded in time and size)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET /jpip?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode("ascii"))
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, sep, _ = data.partition(b"\r\n\r\n")
    assert sep, data[:500]
    return head


async def _ct_server(start_server: Any, **jpip: str) -> tuple[Any, str]:
    server = await start_server(jpip=jpip) if jpip else await start_server()
    ct = sample_file("CT_small.dcm")
    assert await threads.deferToThread(scu_store, server.dicom_port, [ct]) == [0]
    await server.service.transcoder.when_idle()
    return server, str(dcmread(ct, stop_before_pixels=True).SOPInstanceUID)


@pytest_twisted.ensureDeferred
async def test_jpip_headers_are_spelt_as_the_standard_spells_them(start_server: Any) -> None:
    """The bytes on the wire carry JPIP-cnew, JPIP-tid, JPIP-fsiz... exactly so (OpenJPEG's
    viewer looks them up case-sensitively), never Twisted's Jpip-Cnew; other headers keep
    their usual spelling; on http and http-tcp channels alike."""
    server, uid = await _ct_server(start_server)

    def run() -> tuple[bytes, bytes]:
        # Asks for more than there is everywhere, so that every field comes back changed.
        first = raw_head(server.http_port, f"target={uid}&cnew=http&qid=1&fsiz=100,100&roff=10,10&rsiz=5000,5000"
                                           "&layers=99&comps=0-5&stream=0-3&len=1")
        tcp = raw_head(server.http_port, f"target={uid}&cnew=http-tcp&fsiz=64,64")
        return first, tcp

    first, tcp = await threads.deferToThread(run)
    assert first.startswith(b"HTTP/1.1 200 "), first
    names = [line.split(b":", 1)[0].decode("latin-1") for line in first.split(b"\r\n")[1:]]
    assert [n for n in names if n.lower().startswith("jpip-")] and set(SPELLINGS) <= set(names), names
    assert all(n in SPELLINGS for n in names if n.lower().startswith("jpip-")), names
    assert "Content-Type" in names and "Cache-Control" in names
    assert re.search(rb"\r\nJPIP-cnew: cid=[^,\r]+,path=jpip,transport=http-tcp,auxport=\d+\r\n", tcp), tcp
    assert b"Jpip-" not in first + tcp


@pytest_twisted.ensureDeferred
async def test_public_aux_address_is_announced_while_the_listener_serves(start_server: Any) -> None:
    """With [jpip] tcp_public_host and tcp_public_port (the aux port behind NAT), JPIP-cnew of
    an http-tcp channel names them; the connection made where tcp_listen binds (where the NAT
    forwards it) still attaches and streams; http channels name neither."""
    server, uid = await _ct_server(start_server, tcp_public_host="jpip.example.org", tcp_public_port="9001")
    listening = server.service.jpip.aux_port
    assert listening not in (None, 9001)

    def run() -> None:
        reply = get(server.http_port, f"target={uid}&cnew=http-tcp&fsiz=128,128")
        assert reply.status == 200, reply.body
        cnew = reply.cnew()
        assert (cnew["transport"], cnew["host"], cnew["auxport"]) == ("http-tcp", "jpip.example.org", "9001")
        aux = AuxConnection(listening, cnew["cid"])
        try:
            _, messages, eor = aux.response()
        finally:
            aux.close()
        assert messages and eor.reason in (1, 2)  # image done or window done
        http = get(server.http_port, f"target={uid}&cnew=http&fsiz=64,64")
        assert http.status == 200 and "host=" not in http.headers["jpip-cnew"]
        assert "auxport=" not in http.headers["jpip-cnew"]

    await threads.deferToThread(run)


@pytest.mark.skipif(not opj.HAVE_TOOLS, reason="opj_jpip_transcode/opj_decompress not installed")
@pytest_twisted.ensureDeferred
async def test_openjpeg_user_agents_get_openjpegs_tile_headers(start_server: Any, tmp_path: Path) -> None:
    """With [jpip] openjpeg_user_agents = Java/, a client sending User-Agent: Java/... (as
    OpenJPEG's viewer does) and asking for <uid>.jp2 gets tile-header bins in OpenJPEG's layout,
    which opj_jpip_transcode rebuilds as they come (no normaliser) into the exact pixels, in its
    session's later responses too; a client without that User-Agent gets the part9 bin."""
    server, uid = await _ct_server(start_server, openjpeg_user_agents="Java/")
    pixels = dcmread(sample_file("CT_small.dcm")).pixel_array
    java = {b"User-Agent": [b"Java/17.0.15"]}

    async def get_body(query: str, headers: dict[bytes, list[bytes]] | None = None) -> tuple[Any, bytes]:
        response = await treq.get(f"{server.url}/jpip?{query}".encode("ascii"), headers=headers)
        return response, await treq.content(response)

    def tile_header(body: bytes) -> bytes | None:
        parts = [m.data for m in StreamParser().feed(body) if isinstance(m, Message) and m.bin_class == 2]
        return b"".join(parts) if parts else None

    first, view = await get_body(f"target={uid}.jp2&fsiz=32,32&cnew=http&type=jpp-stream", java)
    assert first.code == 200
    # SOT body (Lsot 10, Isot 0, Psot 0, TPsot 0, TNsot 1), no markers (PLT is left out), SOD.
    assert tile_header(view) == struct.pack(">HHIBB", 10, 0, 0, 0, 1) + b"\xff\x93"
    cid = first.headers.getRawHeaders(b"JPIP-cnew")[0].decode().split(",")[0].split("=", 1)[1]
    _, rest = await get_body(f"cid={cid}&fsiz=128,128")  # no User-Agent: the session's layout stays
    rebuilt = opj.transcode(tmp_path, view, rest, layout="openjpeg")
    np.testing.assert_array_equal(opj.decode(rebuilt, tmp_path, pixels.shape, precision=16, signed=True), pixels)
    other, body = await get_body(f"target={uid}&fsiz=32,32", {b"User-Agent": [b"kdu_client/7.9"]})
    assert other.code == 200 and tile_header(body) == b""
