"""URL grants (issue 12): a JPIP-referenced header's Pixel Data Provider URL opens /jpip by itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import pytest_twisted
import treq
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from twisted.internet import threads

from imageshare.auth import GRANT_KEY_FILE
from imageshare.auth.grants import Grant, sign
from imageshare.transcode import openjpeg
from tests.auth.keys import AUDIENCE, ISSUER, Keys
from tests.helpers import make_instances, scu_store

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not openjpeg.is_available(), reason="OpenJPEG >= 2.5 missing"),
]

JPIP_REFERENCED = "1.2.840.10008.1.2.4.94"


async def fetch(url: str, token: str | None = None, method: str = "GET", **kw: Any) -> tuple[int, bytes, Any]:
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **kw.pop("headers", {})}
    response = await treq.request(method, url, headers=headers, **kw)
    return response.code, await response.content(), response.headers


@pytest_twisted.ensureDeferred
async def test_a_grant_in_the_pixel_data_provider_url_opens_jpip(start_server, tmp_path: Path) -> None:
    """
    WADO hands a token holder a .94 header whose Pixel Data Provider URL carries a grant; the
    URL streams without an Authorization header, for its study only (another study: 404), on
    GET only (POST: 401), and an expired or tampered grant is refused (401).
    """
    keys = Keys()
    server = await start_server(auth={"mode": "bearer", "issuer": ISSUER, "audience": AUDIENCE,
                                      "jwks": str(keys.write_jwks(tmp_path / "jwks.json"))})
    paths = make_instances(tmp_path / "a", 1, seed="a") + make_instances(tmp_path / "b", 1, seed="b")
    assert await threads.deferToThread(scu_store, server.dicom_port, paths) == [0, 0]
    await server.service.transcoder.when_idle()
    a, b = (dcmread(p, stop_before_pixels=True) for p in paths)
    assert a.StudyInstanceUID != b.StudyInstanceUID
    token = keys.token()

    wado = (f"{server.url}/wado?requestType=WADO&studyUID={a.StudyInstanceUID}&seriesUID={a.SeriesInstanceUID}"
            f"&objectUID={a.SOPInstanceUID}&contentType=application/dicom&transferSyntax={JPIP_REFERENCED}")
    code, body, headers = await fetch(wado, token)
    assert code == 200
    assert headers.getRawHeaders(b"etag") is None  # one principal's own answer: no ETag, not cached
    assert server.service.wado_cache is None or len(server.service.wado_cache) == 0
    header = dcmread(DicomBytesIO(body))
    url = str(header.PixelDataProviderURL)
    fields = dict(parse_qsl(urlsplit(url).query))
    assert fields["target"] == a.SOPInstanceUID and "grant" in fields
    grant = fields["grant"]

    # The viewer opens the URL as it is, with its own JPIP fields, and no Authorization header.
    local = f"{server.url}/jpip?{urlsplit(url).query}&type=jpp-stream&fsiz=64,64"
    code, body, headers = await fetch(local)
    assert code == 200 and body
    assert b"private" in headers.getRawHeaders(b"cache-control")[0]

    # WADO opens with it too, for the same study.
    code, _, headers = await fetch(wado.replace(JPIP_REFERENCED, "1.2.840.10008.1.2.1") + f"&grant={grant}")
    assert code == 200 and headers.getRawHeaders(b"cache-control") == [b"private"]

    # Another study's target, or object, answers as a missing one.
    code, _, _ = await fetch(f"{server.url}/jpip?target={b.SOPInstanceUID}&grant={grant}&type=jpp-stream&fsiz=64,64")
    assert code == 404
    other = (f"{server.url}/wado?requestType=WADO&studyUID={b.StudyInstanceUID}&seriesUID={b.SeriesInstanceUID}"
             f"&objectUID={b.SOPInstanceUID}&contentType=application/dicom&grant={grant}")
    assert (await fetch(other))[0] == 404
    assert (await fetch(other, token))[0] == 200  # the token holder does see it

    # Tampered, expired (signed with the server's own key), or POSTed: 401.
    payload, mac = grant.split(".")
    tampered = payload + "." + ("A" if mac[0] != "A" else "B") + mac[1:]
    key = (server.service.config.storage.data_dir / GRANT_KEY_FILE).read_bytes()
    expired = sign(key, Grant(str(a.StudyInstanceUID), ISSUER, "someone", 1))
    for bad in (tampered, expired, "x" * 5000):
        code, _, headers = await fetch(f"{server.url}/jpip?target={a.SOPInstanceUID}&grant={bad}&type=jpp-stream")
        assert code == 401 and b"invalid_token" in headers.getRawHeaders(b"www-authenticate")[0]
    code, _, _ = await fetch(f"{server.url}/jpip?target={a.SOPInstanceUID}&grant={grant}", method="POST",
                             data=b"type=jpp-stream&fsiz=64,64",
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert code == 401
