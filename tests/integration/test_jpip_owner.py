"""JPIP sessions belong to their owner ([auth] mode = bearer), checked while a response streams.

Another principal presenting the owner's channel id gets the answer of an unknown channel
(404, same body) and cuts nothing, whether it asks for a view or to close the channel; the
owner's own request on another connection still pre-empts (EOR 3). Raw sockets
(tests/integration/rawjpip.py) so that the owner's response can be kept streaming.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from pydicom import dcmread
from twisted.internet import reactor, threads
from twisted.internet.threads import blockingCallFromThread

from imageshare.protocols.jpip.messages import Eor, Message, StreamParser
from imageshare.transcode import openjpeg
from tests.auth.keys import AUDIENCE, ISSUER, Keys
from tests.helpers import make_cr, scu_store
from tests.integration.rawjpip import HttpConnection, get

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not openjpeg.is_available(), reason="OpenJPEG >= 2.5 missing"),
]

FULL = "fsiz=1955,1841"


def _eor_of(body: bytes) -> int:
    out = StreamParser().feed(body)
    assert out and isinstance(out[-1], Eor), body[-16:]
    return out[-1].reason


def _never_twice(*bodies: bytes) -> None:
    """Across the bodies of one session every message continues its data-bin where it stopped."""
    held: dict[tuple[int, int, int], int] = {}
    for body in bodies:
        for m in StreamParser().feed(body):
            if isinstance(m, Message):
                key = (m.bin_class, m.csn, m.bin_id)
                assert m.offset == held.get(key, 0), f"bin {key} resent or skipped"
                held[key] = m.offset + len(m.data)


@pytest_twisted.ensureDeferred
async def test_another_principal_neither_uses_nor_cuts_a_session(start_server: Any, tmp_path: Path) -> None:
    """B with A's cid: 404 exactly as an unknown channel, for a view and for cclose, while A's
    response streams; A's response ends with its own EOR (image done), not EOR 3. A's own
    request on another connection does cut (EOR 3), and A's session outlives B's cclose."""
    keys = Keys()
    server = await start_server(
        auth={"mode": "bearer", "issuer": ISSUER, "audience": AUDIENCE,
              "jwks": str(keys.write_jwks(tmp_path / "jwks.json"))},
    )
    cr_path, _ = make_cr(tmp_path)
    assert await threads.deferToThread(scu_store, server.dicom_port, [cr_path]) == [0]
    await server.service.transcoder.when_idle()
    uid = str(dcmread(cr_path, stop_before_pixels=True).SOPInstanceUID)
    port = server.http_port
    sessions = server.service.jpip.sessions
    a = {"Authorization": f"Bearer {keys.token(sub='a', jti='ja', scope='image.read')}"}
    b = {"Authorization": f"Bearer {keys.token(sub='b', jti='jb', scope='image.read')}"}

    def streaming(cid: str) -> bool:
        """A response of channel ``cid`` is being sent, not cut (read on the reactor)."""
        def check() -> bool:
            channel = sessions.find(cid)
            body = channel.active if channel is not None else None
            return body is not None and not body._cut
        return blockingCallFromThread(reactor, check)

    def wait_streaming(conn: HttpConnection, cid: str) -> None:
        status, headers = conn.head()
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        for _ in range(50):  # bounded: 5 s
            if streaming(cid):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the owner's response is not streaming")
        time.sleep(0.5)  # stalled in full socket buffers (the client reads nothing yet)
        assert streaming(cid)

    def run() -> None:
        first = get(port, f"target={uid}&cnew=http&fsiz=245,231", headers=a)
        assert first.status == 200 and _eor_of(first.body) == 2, first.body[:200]
        cid = first.cnew()["cid"]
        bodies = [first.body]
        # An unknown channel of the same shape, for the reference 404.
        tail = re.search(r"[0-9a-f]{32}$", cid)
        assert tail is not None, cid
        unknown = cid[: tail.start()] + ("0" * 32 if tail.group() != "0" * 32 else "1" * 32)
        missing = get(port, f"cid={unknown}&{FULL}&roff=0,0&rsiz=600,600", headers=b)
        assert missing.status == 404
        closing_missing = get(port, f"cid={unknown}&cclose={unknown}&fsiz=64,64", headers=b)
        assert closing_missing.status == 404

        def as_unknown(reply: Any) -> tuple[int, str | None, bytes]:
            return reply.status, reply.headers.get("content-type"), reply.body.replace(cid.encode(), unknown.encode())

        # 1. A streams the whole image (MBs); B asks for a view and to close, on A's cid.
        conn = HttpConnection(port, rcvbuf=4096)
        try:
            conn.send(f"cid={cid}&{FULL}", headers=a)
            wait_streaming(conn, cid)
            view = get(port, f"cid={cid}&{FULL}&roff=0,0&rsiz=600,600", headers=b)
            assert as_unknown(view) == (missing.status, missing.headers.get("content-type"), missing.body)
            close = get(port, f"cid={cid}&cclose={cid}&fsiz=64,64", headers=b)
            assert as_unknown(close) == (closing_missing.status, closing_missing.headers.get("content-type"),
                                         closing_missing.body)
            assert streaming(cid)  # neither cut it
            whole = b"".join(conn.body_chunks())
        finally:
            conn.close()
        assert _eor_of(whole) == 1  # image done, not 3 (pre-empted)
        bodies.append(whole)
        _never_twice(*bodies)

        # 2. A's session outlived B's cclose, and B's requests left its model alone.
        again = get(port, f"cid={cid}&{FULL}", headers=a)
        assert again.status == 200 and again.body == bytes([0, 1, 0])

        # 3. The owner pre-empts: in a new session A asks for the whole image, then (on
        # another connection) for a pan.
        opened = get(port, f"target={uid}&cnew=http&fsiz=245,231", headers=a)
        assert opened.status == 200
        cid = opened.cnew()["cid"]
        bodies = [opened.body]
        conn = HttpConnection(port, rcvbuf=4096)
        pan = HttpConnection(port)
        try:
            conn.send(f"cid={cid}&{FULL}", headers=a)
            wait_streaming(conn, cid)
            pan.send(f"cid={cid}&{FULL}&roff=0,0&rsiz=600,600", headers=a)
            full = b"".join(conn.body_chunks())
            assert _eor_of(full) == 3  # cut short by the owner
            panned = pan.reply()
        finally:
            conn.close()
            pan.close()
        assert panned.status == 200 and _eor_of(panned.body) == 2
        bodies += [full, panned.body]

        # 4. B's cclose of this session changes nothing either, and A goes on to the end.
        close = get(port, f"cid={cid}&cclose={cid}&fsiz=64,64", headers=b)
        assert (close.status, close.body.replace(cid.encode(), unknown.encode())) == (404, closing_missing.body)
        rest = get(port, f"cid={cid}&{FULL}", headers=a)
        assert rest.status == 200 and _eor_of(rest.body) == 1  # image done
        bodies.append(rest.body)
        _never_twice(*bodies)

    await threads.deferToThread(run)
