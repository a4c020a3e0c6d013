"""What browsers and caches read on real sockets: Vary and CORS on /wado and /jpip."""

from __future__ import annotations

import shutil
from typing import Any

import pytest
import pytest_twisted
import treq
from pydicom import dcmread
from twisted.internet import threads
from twisted.logger import globalLogPublisher

from imageshare.transcode import openjpeg
from tests.helpers import sample_file, scu_store

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not openjpeg.is_available(), reason="OpenJPEG >= 2.5 missing"),
]

VIEWER = b"https://viewer.example.org"


def vary(response: Any) -> set[str]:
    """The Vary tokens of a response, lower-cased."""
    return {t.strip().lower() for v in response.headers.getRawHeaders(b"vary") or [] for t in v.decode().split(",")}


async def get(url: str, method: str = "GET", **headers: bytes) -> tuple[Any, bytes]:
    response = await treq.request(method, url.encode(), headers={k.replace("_", "-"): [v] for k, v in headers.items()})
    return response, await treq.content(response)


@pytest_twisted.ensureDeferred
async def test_wado_and_jpip_vary_and_cors(start_server) -> None:
    """With [http] cors_origins: /wado answers chosen by Accept (200, 304, 406) say Vary:
    Accept (not with contentType), carry CORS headers for the allowed origin (exposing
    ETag) and none for another; OPTIONS /wado is a preflight; /jpip varies by Accept
    unless a type field decides."""
    server = await start_server(http={"cors_origins": VIEWER.decode()})
    path = sample_file("CT_small.dcm")
    assert await threads.deferToThread(scu_store, server.dicom_port, [path]) == [0]
    await server.service.transcoder.when_idle()
    ds = dcmread(path, stop_before_pixels=True)
    wado = (f"{server.url}/wado?requestType=WADO&studyUID={ds.StudyInstanceUID}"
            f"&seriesUID={ds.SeriesInstanceUID}&objectUID={ds.SOPInstanceUID}")

    png, body = await get(wado, origin=VIEWER, accept=b"image/png")
    assert png.code == 200 and body.startswith(b"\x89PNG")
    assert vary(png) == {"accept", "origin"}
    assert png.headers.getRawHeaders(b"access-control-allow-origin") == [VIEWER]
    assert b"ETag" in png.headers.getRawHeaders(b"access-control-expose-headers")[0]
    etag = png.headers.getRawHeaders(b"etag")[0]
    cached, _ = await get(wado, origin=VIEWER, accept=b"image/png", if_none_match=etag)
    assert cached.code == 304 and vary(cached) == {"accept", "origin"}
    refused, _ = await get(wado, accept=b"text/html")
    assert refused.code == 406 and "accept" in vary(refused)
    assert refused.headers.getRawHeaders(b"access-control-allow-origin") is None
    chosen, _ = await get(wado + "&contentType=image/png", origin=VIEWER, accept=b"image/jpeg")
    assert chosen.code == 200 and vary(chosen) == {"origin"}
    other, _ = await get(wado, origin=b"https://elsewhere.example.org")
    assert other.code == 200 and not [k for k, _ in other.headers.getAllRawHeaders()
                                      if k.lower().startswith(b"access-control-")]
    preflight, body = await get(wado, "OPTIONS", origin=VIEWER, access_control_request_method=b"GET",
                                access_control_request_headers=b"if-none-match")
    assert preflight.code == 204 and body == b""
    assert preflight.headers.getRawHeaders(b"access-control-allow-origin") == [VIEWER]
    assert preflight.headers.getRawHeaders(b"access-control-allow-methods") == [b"GET, HEAD"]
    assert b"If-None-Match" in preflight.headers.getRawHeaders(b"access-control-allow-headers")[0]

    jpip = f"{server.url}/jpip?target={ds.SOPInstanceUID}&fsiz=64,64"
    by_accept, _ = await get(jpip, origin=VIEWER, accept=b"image/jpp-stream")
    assert by_accept.code == 200 and vary(by_accept) == {"accept", "origin"}
    assert b"JPIP-cnew" in by_accept.headers.getRawHeaders(b"access-control-expose-headers")[0]
    by_field, _ = await get(jpip + "&type=jpp-stream", origin=VIEWER, accept=b"image/jpp-stream")
    assert by_field.code == 200 and vary(by_field) == {"origin"}


@pytest_twisted.ensureDeferred
async def test_deprecated_jpip_cors_origins_still_works_for_both_and_is_logged(start_server) -> None:
    """An old config's [jpip] cors_origins applies to /jpip and /wado, and start-up logs one
    warning saying where it moved."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        server = await start_server(jpip={"cors_origins": "*"})
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_format") == "configuration: {warning}"]
    assert len(warnings) == 1 and "[http] cors_origins" in warnings[0]["warning"]
    assert warnings[0]["log_level"].name == "warn"
    for path in ("/wado?requestType=WADO", "/jpip?target=1.2.3"):
        response, _ = await get(server.url + path, origin=VIEWER)
        assert response.code in (400, 404) and response.headers.getRawHeaders(b"access-control-allow-origin") == [b"*"]
