"""JPIP sessions per client against the running server: a flood from one address reaches
its cap while a viewer from another address still opens a session and streams."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import pytest_twisted
from pydicom import dcmread
from twisted.internet import threads

from imageshare.protocols.jpip.messages import Eor, StreamParser
from imageshare.transcode import openjpeg
from tests.helpers import get_from, sample_file, scu_store

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not openjpeg.is_available(), reason="OpenJPEG >= 2.5 missing"),
]

FLOODER = "127.0.0.2"  # all of 127/8 is loopback on Linux: another client address
VIEWER = "127.0.0.1"
CAP = 4
TIMEOUT = 30.0


def get(port: int, path: str, source: str) -> tuple[int, dict[str, str], bytes]:
    return get_from(port, path, source, TIMEOUT)


def flood(port: int, path: str, source: str, count: int, parallel: int) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` requests from ``source``, ``parallel`` at a time."""
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(lambda _: get(port, path, source), range(count)))


@pytest_twisted.ensureDeferred
async def test_one_client_cannot_take_every_session(start_server: Any) -> None:
    """24 new sessions from one address, 8 at a time: exactly max_sessions_per_client get
    one, the rest 503 with Retry-After and a reason; a viewer from another address opens a
    session and gets a valid JPP-stream; cclose gives the flooding client one slot back."""
    server = await start_server(jpip={"max_sessions_per_client": str(CAP), "session_timeout": "300"})
    assert await threads.deferToThread(scu_store, server.dicom_port, [sample_file("CT_small.dcm")]) == [0]
    await server.service.transcoder.when_idle()
    uid = str(dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True).SOPInstanceUID)
    new_session = f"/jpip?target={uid}&fsiz=64,64&cnew=http&type=jpp-stream"

    started = time.monotonic()
    replies = await threads.deferToThread(flood, server.http_port, new_session, FLOODER, 24, 8)
    elapsed = time.monotonic() - started
    granted = [h for code, h, _ in replies if code == 200]
    refused = [(h, body) for code, h, body in replies if code == 503]
    assert len(granted) == CAP and len(refused) == 24 - CAP, [r[0] for r in replies]
    assert all("jpip-cnew" in h for h in granted)
    for headers, body in refused:
        assert 1 <= int(headers["retry-after"]) <= 300
        assert body == f"too many sessions for this client ({CAP})\n".encode()
    assert server.service.jpip.sessions.count(FLOODER) == CAP

    code, headers, body = await threads.deferToThread(get, server.http_port, new_session, VIEWER)
    assert code == 200, body
    assert headers["content-type"] == "image/jpp-stream" and "cid=JPH" in headers["jpip-cnew"]
    parser = StreamParser()
    messages = parser.feed(body)
    parser.close()
    assert len(messages) > 1 and isinstance(messages[-1], Eor)
    assert len(server.service.jpip.sessions) == CAP + 1

    # Closing one of its sessions (cclose) frees exactly one slot for the flooding client.
    cid = dict(i.split("=", 1) for i in granted[0]["jpip-cnew"].split(","))["cid"]
    code, _, _ = await threads.deferToThread(get, server.http_port, f"/jpip?cid={cid}&cclose={cid}", FLOODER)
    assert code == 200
    again = await threads.deferToThread(flood, server.http_port, new_session, FLOODER, 2, 1)
    assert [code for code, _, _ in again] == [200, 503]
    print(f"\n24 session requests from one address, 8 at a time: {elapsed:.2f} s")
