"""The JPIP server core without HTTP: session memory limit and the ready-response cache."""

from __future__ import annotations

import numpy as np
import pytest
from twisted.internet.defer import ensureDeferred, succeed
from twisted.python.failure import Failure

from imageshare.codestream.index import build_index
from imageshare.protocols.jpip.plan import TargetBins
from imageshare.protocols.jpip.request import parse_request
from imageshare.protocols.jpip.server import JpipError, JpipServer, Target
from imageshare.transcode import openjpeg
from imageshare.transcode.params import EncodeParams


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Target:
    img = (np.random.default_rng(2).random((300, 400)) * 4000).astype(np.uint16)
    path = tmp_path_factory.mktemp("server") / "t.j2k"
    openjpeg.encode(img, path, precision=12, signed=False, colour_transform=False, params=EncodeParams(precinct=32))
    data = path.read_bytes()
    index = build_index(data)
    return Target("1.2.3", 0, "tid-1", index, TargetBins(index), data, len(data))


def respond(server: JpipServer, query: str):  # type: ignore[no-untyped-def]
    """Serve a request synchronously (the loader answers at once); re-raise its error."""
    results: list[object] = []
    ensureDeferred(server.respond(parse_request("GET", None, query.encode(), None, None, None))).addBoth(results.append)
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def drain(reply) -> bytes:  # type: ignore[no-untyped-def]
    out = b""
    for message, piece in reply.body.messages():
        reply.body.sent(message, piece)
        out += message
    reply.body.close()
    return out


def test_session_memory_limit_ends_the_session(target: Target) -> None:
    """A session whose cache model outgrows max_model_bytes gets EOR 6, then its cid is gone."""
    now = [0.0]
    server = JpipServer(lambda u, s: succeed(target), lambda: now[0], max_model_bytes=4096)
    reply = respond(server, "target=1.2.3&fsiz=400,300&cnew=http")
    cid = dict(h for h in reply.headers)["JPIP-cnew"].split(",")[0].split("=", 1)[1]
    drain(reply)
    limited = respond(server, f"cid={cid}&fsiz=400,300")
    assert drain(limited) == bytes([0, 6, 0])
    with pytest.raises(JpipError) as info:
        respond(server, f"cid={cid}&fsiz=400,300")
    assert info.value.status == 404


def test_expire_is_driven_by_the_clock(target: Target) -> None:
    """expire() drops sessions idle for longer than the timeout, by the injected clock."""
    now = [0.0]
    server = JpipServer(lambda u, s: succeed(target), lambda: now[0], session_timeout=10)
    drain(respond(server, "target=1.2.3&fsiz=100,75&cnew=http"))
    now[0] = 5
    assert server.expire() == 0
    now[0] = 20
    assert server.expire() == 1 and len(server.sessions) == 0
