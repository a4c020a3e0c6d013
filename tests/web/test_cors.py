"""CORS (one policy for /jpip and /wado) and Vary: Accept where Accept picks the representation."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from imageshare.fairqueue import FairQueue
from imageshare.protocols.jpip.http import JpipResource
from imageshare.wado.query import WadoError, WadoQuery, negotiate
from imageshare.web.cors import Cors, add_vary
from imageshare.web.wado import Answer, WadoResource

VIEWER = b"https://viewer.example.org"
QUERY = b"requestType=WADO&studyUID=1.2.3&seriesUID=1.2.4&objectUID=1.2.5"


def request(method: bytes = b"GET", uri: bytes = b"/", **headers: bytes) -> DummyRequest:
    r = DummyRequest([])
    r.method = method
    r.uri = uri
    r.client = IPv4Address("TCP", "192.0.2.1", 40000)
    for name, value in headers.items():
        r.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value])
    return r


def header(r: DummyRequest, name: bytes) -> bytes | None:
    values = r.responseHeaders.getRawHeaders(name)
    return b", ".join(values) if values else None


def cors_headers(r: DummyRequest) -> dict[bytes, bytes]:
    return {k.lower(): b", ".join(v) for k, v in r.responseHeaders.getAllRawHeaders()
            if k.lower().startswith(b"access-control-")}


# -- the policy ---------------------------------------------------------------------------------


def test_allowed_origin_is_named_with_vary_and_exposed_headers() -> None:
    """An origin in the list is echoed (case of the scheme and host ignored), with the
    resource's exposed headers and Vary: Origin."""
    cors = Cors(("https://Viewer.example.org",), methods=("GET",), expose=("ETag", "X-A"))
    r = request(origin=VIEWER)
    cors.apply(r)
    assert cors_headers(r) == {b"access-control-allow-origin": VIEWER, b"access-control-expose-headers": b"ETag, X-A"}
    assert header(r, b"vary") == b"Origin"


def test_disallowed_or_missing_origin_gets_no_cors_header_but_still_vary() -> None:
    """Another origin, or none, gets no Access-Control-* header; the answer still varies by
    Origin, so a shared cache does not hand it to an allowed origin."""
    cors = Cors(("https://viewer.example.org",), methods=("GET",), expose=("ETag",))
    for r in (request(origin=b"https://elsewhere.example.org"), request(), request(origin=b"\xff")):
        cors.apply(r)
        assert cors_headers(r) == {} and header(r, b"vary") == b"Origin"


def test_any_origin_and_no_origin_configured() -> None:
    """``*`` answers every origin with ``*`` (no Vary needed); an empty list sends nothing."""
    r = request(origin=VIEWER)
    Cors(("*",), methods=("GET",)).apply(r)
    assert cors_headers(r) == {b"access-control-allow-origin": b"*"} and header(r, b"vary") is None
    r = request(origin=VIEWER)
    Cors((), methods=("GET",), expose=("ETag",)).apply(r)
    assert cors_headers(r) == {} and header(r, b"vary") is None


def test_preflight_answers_methods_headers_and_max_age_for_an_allowed_origin_only() -> None:
    """OPTIONS is 204 with Allow; an allowed origin's preflight also gets the methods, the
    request headers and how long to keep the answer; others get no CORS header."""
    cors = Cors(("https://viewer.example.org",), methods=("GET", "HEAD"), allow_headers=("If-None-Match",))
    r = request(b"OPTIONS", origin=VIEWER, access_control_request_method=b"GET")
    assert cors.preflight(r) == NOT_DONE_YET and r.finished and r.written == []
    assert r.responseCode == 204 and header(r, b"allow") == b"GET, HEAD, OPTIONS"
    assert cors_headers(r) == {
        b"access-control-allow-origin": VIEWER,
        b"access-control-allow-methods": b"GET, HEAD",
        b"access-control-allow-headers": b"If-None-Match",
        b"access-control-max-age": b"600",
    }
    r = request(b"OPTIONS", origin=b"https://elsewhere.example.org", access_control_request_method=b"GET")
    cors.preflight(r)
    assert r.responseCode == 204 and cors_headers(r) == {} and header(r, b"allow") == b"GET, HEAD, OPTIONS"


def test_add_vary_keeps_what_is_there_once_each() -> None:
    """Vary tokens accumulate without duplicates, whatever their case."""
    r = request()
    add_vary(r, "Accept")
    add_vary(r, "origin", "accept")
    add_vary(r, "Origin")
    assert header(r, b"vary") == b"Accept, origin"


# -- /wado ----------------------------------------------------------------------------------------


class SyncPool:
    """Runs each job at once."""

    size = 1

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return succeed(f(*args))


def retriever(query: WadoQuery, if_none_match: str | None) -> Answer:
    """Negotiates as the real retriever does; the ETag names the chosen type."""
    delivery = negotiate(query, is_image=True, streamable=True, original_syntax="1.2.840.10008.1.2.1")
    etag = f'"{delivery.content_type}"'
    if if_none_match == etag:
        return Answer(304, etag=etag)
    return Answer(200, b"body", delivery.content_type, etag)


def wado(cors_origins: tuple[str, ...] = ()) -> WadoResource:
    return WadoResource(retriever, FairQueue(SyncPool(), max_per_client=4), cors_origins=cors_origins)


def test_wado_answers_chosen_by_accept_say_vary_accept_200_304_406() -> None:
    """Without contentType the Accept header picks JPEG, PNG or DICOM: 200, 304 and 406
    answers all carry Vary: Accept (also when Accept is absent: sending one would change it)."""
    cases = [({"accept": b"image/png"}, 200), ({}, 200),
             ({"accept": b"image/png", "if_none_match": b'"image/png"'}, 304), ({"accept": b"text/html"}, 406)]
    for headers, status in cases:
        r = request(uri=b"/wado?" + QUERY, **headers)
        wado().render(r)
        assert r.finished and r.responseCode == status
        assert header(r, b"vary") == b"Accept", headers


def test_wado_answers_chosen_by_content_type_do_not_vary_by_accept() -> None:
    """contentType decides alone: Accept plays no part, so no Vary: Accept."""
    for extra, status in ((b"&contentType=image/png", 200), (b"&contentType=text/html", 406)):
        r = request(uri=b"/wado?" + QUERY + extra, accept=b"image/jpeg")
        wado().render(r)
        assert r.finished and r.responseCode == status and header(r, b"vary") is None


def test_wado_cors_on_answers_errors_and_preflight() -> None:
    """/wado answers an allowed origin with CORS headers exposing ETag (also on errors, and
    Vary merges Origin with Accept); OPTIONS is a preflight; another origin gets none."""
    resource = wado(("https://viewer.example.org",))
    r = request(uri=b"/wado?" + QUERY, origin=VIEWER)
    resource.render(r)
    assert cors_headers(r)[b"access-control-allow-origin"] == VIEWER
    assert b"ETag" in cors_headers(r)[b"access-control-expose-headers"]
    assert header(r, b"vary") == b"Origin, Accept"
    r = request(uri=b"/wado?requestType=WADO", origin=VIEWER)
    resource.render(r)
    assert r.responseCode == 400 and cors_headers(r)[b"access-control-allow-origin"] == VIEWER
    r = request(b"OPTIONS", b"/wado?" + QUERY, origin=VIEWER, access_control_request_method=b"GET",
                access_control_request_headers=b"if-none-match")
    assert resource.render(r) == NOT_DONE_YET and r.finished
    assert r.responseCode == 204 and cors_headers(r)[b"access-control-allow-methods"] == b"GET, HEAD"
    assert b"If-None-Match" in cors_headers(r)[b"access-control-allow-headers"]
    r = request(uri=b"/wado?" + QUERY, origin=b"https://elsewhere.example.org")
    resource.render(r)
    assert cors_headers(r) == {}
    r = request(b"POST", b"/wado?" + QUERY, origin=VIEWER)
    resource.render(r)
    assert r.responseCode == 405 and header(r, b"allow") == b"GET, HEAD, OPTIONS"


# -- /jpip ------------------------------------------------------------------------------------------


class NoServer:
    """A JPIP server that must not be reached (the requests here end before it)."""

    def respond(self, *args: Any) -> Any:
        raise AssertionError("not reached")


def test_jpip_preflight_and_errors_carry_cors_and_415_from_accept_varies() -> None:
    """/jpip: preflight for an allowed origin (GET, POST, Content-Type), none for another; a
    415 that Accept may have caused says Vary: Accept next to Origin."""
    resource = JpipResource(NoServer(), cors_origins=("https://viewer.example.org",))  # type: ignore[arg-type]
    r = request(b"OPTIONS", b"/jpip", origin=VIEWER, access_control_request_method=b"POST")
    resource.render(r)
    assert r.responseCode == 204 and cors_headers(r) == {
        b"access-control-allow-origin": VIEWER,
        b"access-control-allow-methods": b"GET, POST",
        b"access-control-allow-headers": b"Content-Type",
        b"access-control-max-age": b"600",
    }
    r = request(b"OPTIONS", b"/jpip", origin=b"https://elsewhere.example.org", access_control_request_method=b"GET")
    resource.render(r)
    assert cors_headers(r) == {}
    r = request(b"GET", b"/jpip?target=x&fsiz=64,64", origin=VIEWER, accept=b"image/gif")
    body = resource.render(r)
    assert r.responseCode == 415 and b"return types" in body
    assert header(r, b"vary") == b"Origin, Accept"
    assert b"JPIP-cnew" in cors_headers(r)[b"access-control-expose-headers"]


def test_wado_error_from_retriever_keeps_vary() -> None:
    """A refusal raised on the pool (a WadoError) is written with the Vary set before it."""

    def failing(query: WadoQuery, inm: str | None) -> Answer:
        raise WadoError(404, "no such object in this study and series")

    r = request(uri=b"/wado?" + QUERY)
    WadoResource(failing, FairQueue(SyncPool(), max_per_client=4)).render(r)
    assert r.responseCode == 404 and header(r, b"vary") == b"Accept"
