"""The JPIP server core without HTTP: session memory limit and the ready-response cache."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from twisted.internet.defer import ensureDeferred, succeed
from twisted.python.failure import Failure

from imageshare.codestream.index import build_index
from imageshare.protocols.jpip.messages import Message, StreamParser
from imageshare.protocols.jpip.plan import TargetBins
from imageshare.protocols.jpip.request import parse_request
from imageshare.protocols.jpip.server import JpipError, JpipServer, Target, target_uid
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


def respond(  # type: ignore[no-untyped-def]
    server: JpipServer, query: str, user_agent: str | None = None, path: str | None = None
):
    """Serve a request synchronously (the loader answers at once); re-raise its error."""
    results: list[object] = []
    request = parse_request("GET", path, query.encode(), None, None, None)
    ensureDeferred(server.respond(request, user_agent=user_agent)).addBoth(results.append)
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


def test_public_aux_address_is_announced_for_http_tcp_only(target: Target) -> None:
    """With a public aux host and port (NAT), JPIP-cnew of an http-tcp channel names them
    (host=, auxport=) instead of the listening port; http channels carry neither; without
    the listener up, http-tcp is still not granted."""
    server = JpipServer(lambda u, s: succeed(target), lambda: 0.0,
                        public_aux_host="jpip.example.org", public_aux_port=443)
    with pytest.raises(JpipError) as info:
        respond(server, "target=1.2.3&fsiz=100,75&cnew=http-tcp")
    assert info.value.status == 501
    server.aux_port = 4321
    tcp = respond(server, "target=1.2.3&fsiz=100,75&cnew=http-tcp")
    cnew = dict(tcp.headers)["JPIP-cnew"]
    assert cnew.endswith(",path=jpip,transport=http-tcp,host=jpip.example.org,auxport=443"), cnew
    tcp.body.close()
    http = respond(server, "target=1.2.3&fsiz=100,75&cnew=http")
    assert dict(http.headers)["JPIP-cnew"].endswith(",path=jpip,transport=http")
    drain(http)
    port_only = JpipServer(lambda u, s: succeed(target), lambda: 0.0, aux_port=4321, public_aux_port=9001)
    reply = respond(port_only, "target=1.2.3&fsiz=100,75&cnew=http-tcp")
    assert dict(reply.headers)["JPIP-cnew"].endswith(",transport=http-tcp,auxport=9001")
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


# --- what OpenJPEG's viewer needs: the region headers, a .jp2 target, its tile headers ------

WINDOW_HEADERS = ("JPIP-fsiz", "JPIP-roff", "JPIP-rsiz")


def _window_headers(reply) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {name: value for name, value in reply.headers if name in WINDOW_HEADERS}


@pytest.mark.parametrize("query,expected", [
    ("fsiz=100,75", {"JPIP-roff": "0,0", "JPIP-rsiz": "100,75"}),  # an exact frame, no region
    ("fsiz=170,170", {"JPIP-fsiz": "100,75", "JPIP-roff": "0,0", "JPIP-rsiz": "100,75"}),  # the viewer's first
    ("fsiz=170,170,round-up", {"JPIP-fsiz": "400,300", "JPIP-roff": "0,0", "JPIP-rsiz": "400,300"}),
    ("fsiz=400,300&roff=10,20&rsiz=50,60", {}),  # everything as asked
    ("fsiz=400,300&rsiz=50,60", {"JPIP-roff": "0,0"}),
    ("fsiz=400,300&roff=10,20", {"JPIP-rsiz": "390,280"}),  # to the far edges
    ("fsiz=800,600&roff=100,100&rsiz=200,200", {"JPIP-fsiz": "400,300", "JPIP-roff": "50,50", "JPIP-rsiz": "100,100"}),
    ("fsiz=400,300&roff=350,250&rsiz=100,100", {"JPIP-rsiz": "50,50"}),  # clipped
], ids=lambda v: v if isinstance(v, str) else "")  # fmt: skip
def test_region_headers_when_omitted_or_changed(target: Target, query: str, expected: dict[str, str]) -> None:
    """JPIP-roff and JPIP-rsiz name the region served, at the granted frame size, whenever the
    request left them out or the server changed them (JPIP-fsiz only when the frame differs);
    a request naming them exactly gets none; re-sent with the reported values, it gets the
    same data and none of these headers (15444-9 D.2)."""
    server = JpipServer(lambda u, s: succeed(target), lambda: 0.0)
    reply = respond(server, f"target=1.2.3&{query}")
    assert _window_headers(reply) == expected
    body = drain(reply)
    fields = dict(f.split("=", 1) for f in query.split("&"))
    fields.update({name[5:]: value for name, value in expected.items()})
    fields["fsiz"] = fields["fsiz"].split(",round")[0] if "JPIP-fsiz" in expected else fields["fsiz"]
    again = respond(server, "target=1.2.3&" + "&".join(f"{k}={v}" for k, v in fields.items()))
    assert _window_headers(again) == {}
    assert drain(again) == body


def test_no_region_headers_without_a_view_window(target: Target) -> None:
    """A request without fsiz names no view-window: no region to report, in or out of a session."""
    server = JpipServer(lambda u, s: succeed(target), lambda: 0.0)
    stateless = respond(server, "target=1.2.3")
    session = respond(server, "target=1.2.3&cnew=http")
    assert _window_headers(stateless) == _window_headers(session) == {}
    drain(stateless)
    drain(session)


def test_target_may_carry_a_jp2_or_j2c_suffix(target: Target) -> None:
    """target=<uid>.jp2 or <uid>.j2c (any case, in the query or the path) names the instance
    <uid>: the suffix is dropped before the lookup and the tid is the one without it; a
    session opened so accepts its target with or without a suffix, not another one; other
    suffixes, two of them or a suffix alone are no UID (404, nothing loaded)."""
    asked: list[str] = []

    def load(uid: str, stream: int):  # type: ignore[no-untyped-def]
        asked.append(uid)
        return succeed(target)

    assert [target_uid(t) for t in ("1.2.3.jp2", "1.2.3.J2C", "1.2.3", "1.2.3.jpx", ".jp2")] == \
        ["1.2.3", "1.2.3", "1.2.3", "1.2.3.jpx", ""]
    server = JpipServer(load, lambda: 0.0, target_cache=0)  # every request loads: the loader sees them all
    tids = set()
    for name in ("1.2.3.jp2", "1.2.3.j2c", "1.2.3.JP2", "1.2.3"):
        reply = respond(server, f"target={name}&fsiz=50,38")
        tids.add(dict(reply.headers)["JPIP-tid"])
        drain(reply)
    reply = respond(server, "fsiz=50,38", path="1.2.3.jp2")
    tids.add(dict(reply.headers)["JPIP-tid"])
    drain(reply)
    assert asked == ["1.2.3"] * 5 and tids == {"tid-1"}
    for bad in ("1.2.3.jpx", "1.2.3.jp2.jp2", ".jp2", "1.2.3jp2", "1.2.3.jp2%00"):
        with pytest.raises(JpipError) as info:
            respond(server, f"target={bad}&fsiz=50,38")
        assert info.value.status == 404, bad
    assert len(asked) == 5
    opened = respond(server, "target=1.2.3.jp2&fsiz=50,38&cnew=http")
    cid = _cid(opened)
    drain(opened)
    for same in ("1.2.3", "1.2.3.j2c", "1.2.3.jp2"):
        drain(respond(server, f"cid={cid}&target={same}&fsiz=100,75"))
    with pytest.raises(JpipError) as info:
        respond(server, f"cid={cid}&target=1.2.4.jp2&fsiz=100,75")
    assert info.value.status == 400


def _tile_header(body: bytes) -> bytes | None:
    """The bytes of tile-header bin 0 in a response body, ``None`` if it has none."""
    parts = [m.data for m in StreamParser().feed(body) if isinstance(m, Message) and m.bin_class == 2]
    return b"".join(parts) if parts else None


# The fixture's tile-part header holds only PLT, which is left out: the part9 bin is empty.
OPJ_TILE_HEADER = struct.pack(">HHIBB", 10, 0, 0, 0, 1) + b"\xff\x93"


def test_tile_header_layout_follows_the_user_agent(target: Target) -> None:
    """Stateless requests whose User-Agent starts with an openjpeg_user_agents prefix
    (case-sensitive) get tile-header bins in OpenJPEG's layout, every other one the default
    (part9, or openjpeg for everyone); the ready-response cache keeps the layouts apart."""
    server = JpipServer(lambda u, s: succeed(target), lambda: 0.0, openjpeg_user_agents=("Java/", "opj"))
    query = "target=1.2.3&fsiz=50,38"
    for user_agent, header in [("Java/17.0.15", OPJ_TILE_HEADER), ("kdu_client/7.9", b""), (None, b""),
                               ("opj_jpip_viewer", OPJ_TILE_HEADER), ("java/17", b""), ("Java/1", OPJ_TILE_HEADER),
                               ("Mozilla/5.0 Java/17", b"")]:  # fmt: skip
        assert _tile_header(drain(respond(server, query, user_agent))) == header, user_agent
    everyone = JpipServer(lambda u, s: succeed(target), lambda: 0.0, tile_header_layout="openjpeg")
    assert _tile_header(drain(respond(everyone, query))) == OPJ_TILE_HEADER
    assert JpipServer(lambda u, s: succeed(target), lambda: 0.0, openjpeg_user_agents=("",)).layout_for("x") == "part9"
    with pytest.raises(ValueError):
        JpipServer(lambda u, s: succeed(target), lambda: 0.0, tile_header_layout="kakadu")


def test_session_keeps_the_layout_it_opened_with(target: Target) -> None:
    """A session's layout is fixed at cnew: later requests with another User-Agent (or none)
    get the same one, also when the client says it dropped the bin (model=-H0); model= and
    need= are read against that layout's bin lengths (H0:10 holds the 10-byte SOT body of
    OpenJPEG's bin, not more than a whole part9 bin)."""
    server = JpipServer(lambda u, s: succeed(target), lambda: 0.0, openjpeg_user_agents=("Java/",))
    java = respond(server, "target=1.2.3&fsiz=50,38&cnew=http", "Java/17.0.15")
    java_cid = _cid(java)
    assert _tile_header(drain(java)) == OPJ_TILE_HEADER
    other = respond(server, "target=1.2.3&fsiz=50,38&cnew=http")
    other_cid = _cid(other)
    assert _tile_header(drain(other)) == b""
    # Held complete: not sent again, whoever asks.
    assert _tile_header(drain(respond(server, f"cid={java_cid}&fsiz=100,75"))) is None
    # Dropped by the client: sent again in the session's layout, not the request's.
    assert _tile_header(drain(respond(server, f"cid={java_cid}&fsiz=100,75&model=-H0", "kdu_client/7.9"))) \
        == OPJ_TILE_HEADER
    assert _tile_header(drain(respond(server, f"cid={other_cid}&fsiz=100,75&model=-H0", "Java/17.0.15"))) == b""
    # Stateless, with the request's own layout: lengths of that layout.
    held_sot = respond(server, "target=1.2.3&fsiz=50,38&model=Hm,M0,H0:10", "Java/17.0.15")
    messages = [m for m in StreamParser().feed(drain(held_sot)) if isinstance(m, Message)]
    assert (messages[0].bin_class, messages[0].offset, messages[0].data, messages[0].complete) == \
        (2, 10, b"\xff\x93", True)
    only_header = respond(server, "target=1.2.3&fsiz=50,38&need=H0", "Java/17.0.15")
    messages = [m for m in StreamParser().feed(drain(only_header)) if isinstance(m, Message)]
    assert [(m.bin_class, m.offset, m.data) for m in messages] == [(2, 0, OPJ_TILE_HEADER)]
