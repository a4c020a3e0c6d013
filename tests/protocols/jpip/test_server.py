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


def _cid(reply) -> str:  # type: ignore[no-untyped-def]
    return dict(reply.headers)["JPIP-cnew"].split(",")[0].split("=", 1)[1]


def respond_at(server: JpipServer, query: str, arrival: int):  # type: ignore[no-untyped-def]
    """Start serving a request numbered ``arrival``; the Deferred of its reply."""
    return ensureDeferred(server.respond(parse_request("GET", None, query.encode(), None, None, None), arrival))


def test_transports_granted_only_when_offered_and_available(target: Target) -> None:
    """http-tcp is granted when offered and the aux listener is up (with auxport), else http
    if offered, else 501."""
    server = JpipServer(lambda u, s: succeed(target), lambda: 0.0)
    reply = respond(server, "target=1.2.3&fsiz=100,75&cnew=http-tcp,http")
    assert "transport=http," in dict(reply.headers)["JPIP-cnew"] + "," and reply.transport == "http"
    drain(reply)
    with pytest.raises(JpipError) as info:
        respond(server, "target=1.2.3&fsiz=100,75&cnew=http-tcp")
    assert info.value.status == 501
    server.aux_port = 4321
    reply = respond(server, "target=1.2.3&fsiz=100,75&cnew=http,http-tcp")
    assert dict(reply.headers)["JPIP-cnew"].endswith(",path=jpip,transport=http-tcp,auxport=4321")
    assert (reply.transport, reply.cid) == ("http-tcp", _cid(reply))
    messages = [m for m, _ in reply.body.messages()]
    assert max(len(m) for m in messages) <= 65535 - 8  # whole messages fit a chunk
    reply.body.close()


def test_newer_request_cuts_the_streaming_response(target: Target) -> None:
    """A request without wait=yes cuts the channel's streaming response at the next message
    boundary with EOR 3; the model holds exactly what was sent, so the next response starts
    there; with wait=yes nothing is cut."""
    server = JpipServer(lambda u, s: succeed(target), lambda: 0.0)
    cid = _cid(first := respond(server, "target=1.2.3&fsiz=50,38&cnew=http"))
    drain(first)
    full = respond(server, f"cid={cid}&fsiz=400,300")
    cuts: list[bool] = []
    full.body.on_cut = lambda: cuts.append(True)
    messages = full.body.messages()
    sent = []
    for _ in range(3):
        message, piece = next(messages)
        full.body.sent(message, piece)
        sent.append(message)
    waiting = respond_at(server, f"cid={cid}&fsiz=400,300&wait=yes", server.next_arrival())
    assert cuts == [] and not waiting.called  # queued behind, not cutting
    newer = respond_at(server, f"cid={cid}&fsiz=400,300", server.next_arrival())
    assert cuts == [True] and full.body.is_cut
    eor, piece = next(messages)
    assert (eor, piece) == (bytes([0, 3, 0]), None)
    full.body.sent(eor, piece)
    full.body.close()
    # The waiting request came before the newer one: it is cut before it starts.
    skipped = waiting.result
    assert drain(skipped) == bytes([0, 3, 0])
    rest = newer.result
    body = drain(rest)
    assert body.endswith(bytes([0, 1, 0]))
    from imageshare.protocols.jpip.messages import Message, StreamParser

    parser = StreamParser()
    got = [m for m in parser.feed(b"".join(sent) + body) if isinstance(m, Message)]
    seen: dict[tuple[int, int], int] = {}
    for m in got:
        assert m.offset == seen.get((m.bin_class, m.bin_id), 0)  # no gap, nothing twice
        seen[(m.bin_class, m.bin_id)] = m.offset + len(m.data)


def test_concurrent_loads_share_one_and_keep_arrival_order(target: Target) -> None:
    """Requests for a codestream being loaded wait for the one load and resume in order."""
    from twisted.internet.defer import Deferred

    loads: list[Deferred[Target]] = []

    def load(uid: str, stream: int) -> Deferred[Target]:
        loads.append(Deferred())
        return loads[-1]

    server = JpipServer(load, lambda: 0.0)
    order: list[str] = []
    a = ensureDeferred(server.target("1.2.3", 0)).addCallback(lambda t: order.append("a"))
    b = ensureDeferred(server.target("1.2.3", 0)).addCallback(lambda t: order.append("b"))
    assert len(loads) == 1
    loads[0].callback(target)
    assert order == ["a", "b"] and a.called and b.called
    failures: list[Failure] = []
    ensureDeferred(server.target("1.2.4", 0)).addErrback(failures.append)
    loads[1].errback(RuntimeError("disk gone"))
    assert failures and failures[0].check(RuntimeError)
    assert ("1.2.4", 0) not in server._loading  # a later request tries again


def respond_as(server: JpipServer, query: str, client: str):  # type: ignore[no-untyped-def]
    """Serve a request of ``client`` synchronously; re-raise its error."""
    results: list[object] = []
    request = parse_request("GET", None, query.encode(), None, None, None)
    ensureDeferred(server.respond(request, client=client)).addBoth(results.append)
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def test_sessions_per_client_are_capped_and_freed(target: Target) -> None:
    """A client at max_sessions_per_client gets 503 with Retry-After before anything is
    loaded for it; another client opens a session; requests on existing channels go on;
    a session ended by the memory limit (EOR 6) frees its client's slot for a new one."""
    now = [0.0]
    loads: list[str] = []

    def load(uid: str, stream: int):  # type: ignore[no-untyped-def]
        loads.append(uid)
        return succeed(target)

    server = JpipServer(load, lambda: now[0], max_sessions_per_client=2, max_model_bytes=4096,
                        target_cache=0, session_timeout=300)
    first = respond_as(server, "target=1.2.3&fsiz=400,300&cnew=http", "10.0.0.2")  # outgrows the model limit
    drain(first)
    drain(respond_as(server, "target=1.2.3&fsiz=100,75&cnew=http", "10.0.0.2"))
    loaded = len(loads)
    now[0] = 30
    with pytest.raises(JpipError) as info:
        respond_as(server, "target=1.2.3&fsiz=100,75&cnew=http", "10.0.0.2")
    assert info.value.status == 503 and info.value.retry_after == 270
    assert len(loads) == loaded  # refused before any work
    drain(respond_as(server, "target=1.2.3&fsiz=100,75&cnew=http", "10.0.0.1"))
    cid = _cid(first)
    # Its existing session is still answered, here with the end of the session (EOR 6).
    assert drain(respond_as(server, f"cid={cid}&fsiz=400,300", "10.0.0.2")) == bytes([0, 6, 0])
    assert server.sessions.count("10.0.0.2") == 1
    reply = respond_as(server, "target=1.2.3&fsiz=100,75&cnew=http", "10.0.0.2")
    assert "JPIP-cnew" in dict(reply.headers)
    drain(reply)
