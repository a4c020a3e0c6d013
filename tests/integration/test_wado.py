"""WADO-URI (RAD-55) against the running server.

Rendered images are compared with an independent rendering of the same object by dcmtk's
``dcmj2pnm`` with the same window, frame, region and size. Tolerances, as the mean
absolute difference in grey levels (per sample):

* PNG, < 2: both sides are lossless, so what differs is rounding (at most 1 per pixel)
  and, for small renderings, our reduced-resolution JPEG 2000 decode (the 5/3 wavelet's
  low-pass band) against dcmtk's area averaging of the full image;
* JPEG, < 4: on top of that, two different JPEG encoders (Pillow's libjpeg at 4:4:4,
  dcmtk's IJG at 4:2:2), each adding its own quantisation error at quality 90.

DICOM variants are checked with pydicom, dcmdump, our JPIP client and byte equality.
"""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_twisted
import treq
from PIL import Image
from pydicom import dcmread
from twisted.internet import threads
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.logger import formatEvent, globalLogPublisher

from imageshare.dicom import derived
from imageshare.jpip_cli import JpipClient
from imageshare.transcode import openjpeg
from tests.helpers import make_cr, sample_file, scu_store

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("dcmj2pnm") is None, reason="dcmtk is not installed"),
    pytest.mark.skipif(not openjpeg.is_available(), reason="OpenJPEG >= 2.5 missing"),
]

PUBLIC_URL = "http://imageshare.example:8080"
FILES = {
    "ct": "CT_small.dcm",  # 128x128 signed 16-bit, rescale intercept -1024, no window
    "rgb": "examples_rgb_color.dcm",  # 320x240 RGB
    "palette": "examples_palette.dcm",  # PALETTE COLOR: stored, not streamable
    "frames": "SC_rgb_rle_2frame.dcm",  # RLE, 2 RGB frames
    "sr": "test-SR.dcm",  # a non-image
}
PNG_TOLERANCE = 2
JPEG_TOLERANCE = 4


class Client:
    """WADO-URI requests against one server: whole bodies, headers by lower-case name."""

    def __init__(self, server: Any, uids: dict[str, tuple[str, str, str]]) -> None:
        self.server = server
        self.uids = uids

    def url(self, name: str, **params: Any) -> str:
        study, series, instance = self.uids[name]
        query = {"requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": instance}
        query.update({k: str(v) for k, v in params.items()})
        return f"{self.server.url}/wado?{urllib.parse.urlencode(query)}"

    async def get(self, name: str, *, method: str = "GET", headers: dict[str, str] | None = None,
                  **params: Any) -> tuple[int, dict[str, str], bytes]:
        return await fetch(self.url(name, **params), method=method, headers=headers)


async def fetch(url: str, *, method: str = "GET", headers: dict[str, str] | None = None
                ) -> tuple[int, dict[str, str], bytes]:
    response = await treq.request(method, url.encode("ascii"), headers=headers or {})
    body = await treq.content(response)
    found = {k.decode().lower(): v[-1].decode() for k, v in response.headers.getAllRawHeaders()}
    if isinstance(response.length, int):  # Twisted's client keeps Content-Length apart
        found["content-length"] = str(response.length)
    return response.code, found, body


def raw_request(port: int, target: bytes, method: bytes = b"GET") -> tuple[int, dict[str, str], bytes]:
    """A request line sent exactly as given (quotes, NUL escapes...); (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), data[:200]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ", 2)[1]), headers, body


def raw_get(port: int, target: bytes) -> tuple[int, bytes]:
    status, _, body = raw_request(port, target)
    return status, body


def dcmtk(src: Path, out: Path, *options: str) -> np.ndarray:
    """dcmj2pnm's rendering of ``src`` (options as on its command line)."""
    subprocess.run(["dcmj2pnm", *options, str(src), str(out)], check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(out)).astype(int)


def image(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body))).astype(int)


def mad(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).mean())


def uids_of(path: Path) -> tuple[str, str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


async def serve(start_server: Any, paths: dict[str, Path]) -> Client:
    server = await start_server(http={"public_url": PUBLIC_URL})
    statuses = await threads.deferToThread(scu_store, server.dicom_port, list(paths.values()))
    assert statuses == [0] * len(paths)
    await server.service.transcoder.when_idle()
    client = Client(server, {name: uids_of(path) for name, path in paths.items()})
    client.paths = paths  # type: ignore[attr-defined]
    return client


@pytest_twisted.async_fixture
async def served(start_server: Any) -> Client:
    """A server holding a CT, an RGB image, a palette image, a 2-frame RLE image and an SR."""
    return await serve(start_server, {name: sample_file(f) for name, f in FILES.items()})


@pytest_twisted.async_fixture
async def served_cr(start_server: Any, tmp_path: Path) -> Client:
    """A server holding a 1955x1841 MONOCHROME1 CR with its own window, transcoded."""
    path, _ = make_cr(tmp_path)
    ds = dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.WindowCenter, ds.WindowWidth = 12000, 9000
    ds.save_as(path, enforce_file_format=True)
    return await serve(start_server, {"cr": path})


def state_of(client: Client, name: str) -> str:
    row = client.server.service.catalog.get_instance(client.uids[name][2])
    return str(row.state.value)


# --- rendered ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ct_renderings_match_dcmtk(served: Client, tmp_path: Path) -> None:
    """A signed CT with a rescale intercept, streamable: a window in HU at native size (PNG),
    the default min-max JPEG, and a 64-row JPEG (discard level 1 of the codestream) match
    dcmj2pnm with the same window and size.

    With a narrow 400 HU window at 64 rows the bound is 5, not 2: the window turns the
    CT's noise into about 15 grey levels, and the wavelet's low-pass band keeps more of it
    than dcmtk's 2x2 average (the 1955x1841 CR, smooth like real radiographs, stays
    within 1 at discard level 2)."""
    src = served.paths["ct"]  # type: ignore[attr-defined]
    assert state_of(served, "ct") == "streamable"
    code, headers, body = await served.get("ct", contentType="image/png", windowCenter=40, windowWidth=400)
    assert code == 200 and headers["content-type"] == "image/png" and int(headers["content-length"]) == len(body)
    assert mad(image(body), dcmtk(src, tmp_path / "a.png", "+Ww", "40", "400", "+on")) < PNG_TOLERANCE

    code, headers, body = await served.get("ct")
    assert code == 200 and headers["content-type"] == "image/jpeg"
    assert mad(image(body), dcmtk(src, tmp_path / "b.jpg", "+Wm", "+oj")) < JPEG_TOLERANCE

    code, _, body = await served.get("ct", rows=64)
    assert code == 200
    assert mad(image(body), dcmtk(src, tmp_path / "c.jpg", "+Wm", "+Syv", "64", "+oj")) < JPEG_TOLERANCE
    code, _, body = await served.get("ct", contentType="image/png", rows=64, windowCenter=40, windowWidth=400)
    assert code == 200
    assert mad(image(body), dcmtk(src, tmp_path / "d.png", "+Ww", "40", "400", "+Syv", "64", "+on")) < 5


@pytest_twisted.ensureDeferred
async def test_monochrome1_cr_renderings_match_dcmtk(served_cr: Client, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1955x1841 MONOCHROME1 CR: its own window, 256 columns, decodes discard level 2 of
    the codestream (489x461, not the full image); a region, and a request window, match
    dcmj2pnm (which inverts MONOCHROME1 the same way): high values are dark."""
    src = served_cr.paths["cr"]  # type: ignore[attr-defined]
    reduces: list[int] = []
    decode = openjpeg.decode

    def spy(data: Any, *, reduce: int = 0, layers: int | None = None, threads: int = 1) -> np.ndarray:
        reduces.append(reduce)
        return decode(data, reduce=reduce, layers=layers, threads=threads)

    monkeypatch.setattr(openjpeg, "decode", spy)
    code, _, body = await served_cr.get("cr", contentType="image/png", columns=256)
    assert code == 200 and reduces == [2]
    ours = image(body)
    assert ours.shape == (241, 256)
    assert mad(ours, dcmtk(src, tmp_path / "a.png", "+Wi", "1", "+Sxv", "256", "+on")) < PNG_TOLERANCE
    stored = dcmread(src).pixel_array[::8, ::8].astype(float)
    small = np.asarray(Image.fromarray(ours.astype(np.uint8)).resize(stored.shape[::-1]), float)
    assert np.corrcoef(stored.ravel(), small.ravel())[0, 1] < -0.9  # inverted

    # Region x 0.25..0.75, y 0.5..1.0 = pixels 488..1467 x 920..1841 (rounded outwards).
    code, _, body = await served_cr.get("cr", contentType="image/png", region="0.25,0.5,0.75,1")
    assert code == 200 and reduces == [2]  # full resolution of an uncompressed original: its own pixels
    theirs = dcmtk(src, tmp_path / "b.png", "+Wi", "1", "+C", "488", "920", "979", "921", "+on")
    assert mad(image(body), theirs) < PNG_TOLERANCE
    # Scaled to 245 columns (about 1/4, from discard level 1): dcmj2pnm cannot clip and
    # interpolate at once, so compare with the same pixels of its 489-column rendering.
    code, _, body = await served_cr.get("cr", contentType="image/png", region="0.25,0.5,0.75,1", columns=245)
    assert code == 200 and reduces[-1] == 1
    theirs = dcmtk(src, tmp_path / "c.png", "+Wi", "1", "+Sxv", "489", "+on")[230:460, 122:367]
    assert mad(image(body), theirs) < PNG_TOLERANCE

    code, _, body = await served_cr.get("cr", columns=391, windowCenter=15000, windowWidth=4000)
    assert code == 200
    theirs = dcmtk(src, tmp_path / "d.jpg", "+Ww", "15000", "4000", "+Sxv", "391", "+oj")
    assert mad(image(body), theirs) < JPEG_TOLERANCE


@pytest_twisted.ensureDeferred
async def test_colour_palette_and_frames_match_dcmtk(served: Client, tmp_path: Path) -> None:
    """RGB (streamable) as JPEG and as 200- and 160-column PNGs, a PALETTE COLOR image (not
    streamable: pydicom decodes the original) and frame 2 of a 2-frame RLE image match
    dcmj2pnm; a frame beyond the last is a 400.

    At 160 columns (discard level 1) the bound is 6: this ultrasound screen is text and
    one-pixel lines, where the wavelet's low-pass band is sharper than dcmtk's 2x2 average."""
    paths = served.paths  # type: ignore[attr-defined]
    assert (state_of(served, "rgb"), state_of(served, "palette")) == ("streamable", "not_streamable")
    code, _, body = await served.get("rgb")
    assert code == 200 and mad(image(body), dcmtk(paths["rgb"], tmp_path / "a.jpg", "+oj")) < JPEG_TOLERANCE
    code, _, body = await served.get("rgb", contentType="image/png", columns=200)
    theirs = dcmtk(paths["rgb"], tmp_path / "b.png", "+Sxv", "200", "+on")
    assert code == 200 and mad(image(body), theirs) < PNG_TOLERANCE
    code, _, body = await served.get("rgb", contentType="image/png", columns=160)
    theirs = dcmtk(paths["rgb"], tmp_path / "b2.png", "+Sxv", "160", "+on")
    assert code == 200 and mad(image(body), theirs) < 6

    code, _, body = await served.get("palette", contentType="image/png")
    assert code == 200 and mad(image(body), dcmtk(paths["palette"], tmp_path / "c.png", "+on")) < PNG_TOLERANCE

    code, _, body = await served.get("frames", contentType="image/png", frameNumber=2)
    theirs = dcmtk(paths["frames"], tmp_path / "d.png", "+F", "2", "+on")
    assert code == 200 and mad(image(body), theirs) < PNG_TOLERANCE
    code, _, first = await served.get("frames", contentType="image/png")
    assert mad(image(first), image(body)) > 10  # frame 1 is another picture
    code, _, body = await served.get("frames", frameNumber=3)
    assert code == 400 and body == b"frameNumber is beyond the object's 2 frame(s)\n"


@pytest_twisted.ensureDeferred
async def test_content_negotiation(served: Client) -> None:
    """image/* and lists pick the first supported type; the Accept header is the fallback;
    non-images default to application/dicom and cannot be rendered (406)."""
    for params, headers, expected in [
        ({"contentType": "image/*"}, {}, "image/jpeg"),
        ({"contentType": "image/gif,image/png,image/jpeg"}, {}, "image/png"),
        ({}, {"Accept": "image/png"}, "image/png"),
        ({}, {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}, "image/jpeg"),
        ({"contentType": "image/jpeg"}, {"Accept": "image/png"}, "image/jpeg"),
    ]:
        code, found, _ = await served.get("rgb", headers=headers, **params)
        assert (code, found["content-type"]) == (200, expected), params
    code, found, body = await served.get("sr")
    assert code == 200 and found["content-type"] == "application/dicom"
    assert str(dcmread(io.BytesIO(body)).SOPClassUID) == "1.2.840.10008.5.1.4.1.1.88.33"
    for params in ({"contentType": "image/jpeg"}, {"contentType": "image/*"}):
        code, found, body = await served.get("sr", **params)
        assert code == 406 and found["content-type"] == "text/plain; charset=utf-8", params
    code, _, _ = await served.get("rgb", contentType="image/gif")
    assert code == 406


# --- application/dicom --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_dicom_default_passthrough_and_jpeg2000(served: Client) -> None:
    """Default: Explicit VR Little Endian with the original's pixels (RLE decoded); the
    archived transfer syntax: the archived file byte for byte; .90: our lossless
    codestreams encapsulated, decoding to the original's pixels."""
    paths = served.paths  # type: ignore[attr-defined]
    for name in ("ct", "frames", "palette"):
        code, headers, body = await served.get(name, contentType="application/dicom")
        assert code == 200 and headers["content-type"] == "application/dicom"
        ds = dcmread(io.BytesIO(body))
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        np.testing.assert_array_equal(ds.pixel_array, dcmread(paths[name]).pixel_array)

    row = served.server.service.catalog.get_instance(served.uids["frames"][2])
    archived = served.server.service.archive.path(row.path).read_bytes()
    code, _, body = await served.get("frames", contentType="application/dicom", transferSyntax="1.2.840.10008.1.2.5")
    assert code == 200 and body == archived

    for name in ("ct", "frames"):
        code, _, body = await served.get(name, contentType="application/dicom", transferSyntax="1.2.840.10008.1.2.4.90")
        assert code == 200
        ds = dcmread(io.BytesIO(body))
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
        np.testing.assert_array_equal(ds.pixel_array, dcmread(paths[name]).pixel_array)


@pytest_twisted.ensureDeferred
async def test_jpip_referenced_header(served: Client, tmp_path: Path) -> None:
    """.94: dcmdump shows the JPIP Referenced syntax, no Pixel Data and the provider URL on
    our public URL; that URL, extended with fsiz, streams exactly the original pixels."""
    code, _, body = await served.get("ct", contentType="application/dicom", transferSyntax="1.2.840.10008.1.2.4.94")
    assert code == 200
    (tmp_path / "h.dcm").write_bytes(body)
    dump = subprocess.run(["dcmdump", "+L", str(tmp_path / "h.dcm")], capture_output=True, text=True,
                          timeout=60).stdout
    instance = served.uids["ct"][2]
    assert "=JPIPReferenced" in dump and "(7fe0,0010)" not in dump
    assert f"(0028,7fe0) UR [{PUBLIC_URL}/jpip?target={instance}]" in dump
    header = dcmread(io.BytesIO(body))
    parts = urllib.parse.urlsplit(str(header[0x00287FE0].value))

    def stream() -> np.ndarray:
        client = JpipClient(f"{served.server.url}{parts.path}?{parts.query}", timeout=30)
        client.fetch(fsiz=f"{header.Columns},{header.Rows}")
        return client.view()[0]

    pixels = await threads.deferToThread(stream)
    np.testing.assert_array_equal(pixels, dcmread(served.paths["ct"]).pixel_array)  # type: ignore[attr-defined]

    code, _, body = await served.get("ct", contentType="application/dicom", transferSyntax="1.2.840.10008.1.2.4.95")
    assert code == 200
    deflated = derived.read_part10(body)
    assert deflated[0x00287FE0].value == header[0x00287FE0].value and "PixelData" not in deflated


@pytest_twisted.ensureDeferred
async def test_anonymize(served: Client) -> None:
    """anonymize=yes: no patient name or ID in the bytes, the identity-removed mark, new
    UIDs that are the same on every request (a kept salt), the same pixels; refused with a
    rendered type (400) and with the JPIP header (406). Nothing of the patient is logged."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        code, _, body = await served.get("ct", contentType="application/dicom", anonymize="yes")
        _, _, again = await served.get("ct", contentType="application/dicom", anonymize="yes")
        rendered, _, _ = await served.get("ct", anonymize="yes")
        jpip, _, _ = await served.get("ct", contentType="application/dicom", anonymize="yes",
                                      transferSyntax="1.2.840.10008.1.2.4.94")
    finally:
        globalLogPublisher.removeObserver(events.append)
    original = dcmread(served.paths["ct"])  # type: ignore[attr-defined]
    assert code == 200 and (rendered, jpip) == (400, 406)
    for secret in (str(original.PatientName), str(original.PatientID)):
        assert secret.encode() not in body
        assert not any(secret in (formatEvent(e) or "") for e in events)
    ds = dcmread(io.BytesIO(body))
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.SOPInstanceUID != original.SOPInstanceUID and ds.StudyInstanceUID != original.StudyInstanceUID
    assert dcmread(io.BytesIO(again)).SOPInstanceUID == ds.SOPInstanceUID
    np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)


@pytest_twisted.ensureDeferred
async def test_unsupported_transfer_syntaxes(served: Client) -> None:
    """A valid but unsupported syntax is 406, an invalid one 400; the JPIP and .90 syntaxes
    need our codestreams (406 for the palette image and the SR)."""
    for name, syntax, expected in [
        ("ct", "1.2.840.10008.1.2.4.50", 406),
        ("ct", "1.2.840.10008.1.2", 406),
        ("ct", "1.2.3.4.5", 406),
        ("ct", "1.2.840.10008.1.2.4.5x", 400),
        ("palette", "1.2.840.10008.1.2.4.94", 406),
        ("palette", "1.2.840.10008.1.2.4.90", 406),
        ("sr", "1.2.840.10008.1.2.4.94", 406),
    ]:
        code, headers, body = await served.get(name, contentType="application/dicom", transferSyntax=syntax)
        assert code == expected, (name, syntax, body)
        assert headers["content-type"] == "text/plain; charset=utf-8" and body.endswith(b"\n")


# --- errors, HEAD, caching -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_not_found(served: Client) -> None:
    """An unknown object, or one named with another study or series, is a 404; so is a
    path below /wado."""
    study, series, instance = served.uids["ct"]
    other_study, other_series, _ = served.uids["rgb"]
    base = f"{served.server.url}/wado?requestType=WADO"
    for query in (
        f"&studyUID={study}&seriesUID={series}&objectUID=1.2.3.4.5.6.7",
        f"&studyUID={other_study}&seriesUID={series}&objectUID={instance}",
        f"&studyUID={study}&seriesUID={other_series}&objectUID={instance}",
    ):
        code, _, body = await fetch(base + query)
        assert (code, body) == (404, b"no such object in this study and series\n")
    code, _, _ = await fetch(served.url("ct").replace("/wado?", "/wado/x?"))
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_bad_requests(served: Client) -> None:
    """Missing or malformed UIDs, absurd rows/columns/region, windowWidth 0 and a lone
    window value are clean 400s with a plain-text reason."""
    study, series, instance = served.uids["ct"]
    for query in (
        f"studyUID={study}&seriesUID={series}&objectUID={instance}",
        f"requestType=WADO&seriesUID={series}&objectUID={instance}",
        f"requestType=WADO&studyUID={study}&objectUID={instance}",
        f"requestType=WADO&studyUID={study}&seriesUID={series}",
        f"requestType=WADO&studyUID={study}x&seriesUID={series}&objectUID={instance}",
    ):
        code, headers, body = await fetch(f"{served.server.url}/wado?{query}")
        assert code == 400 and headers["content-type"] == "text/plain; charset=utf-8", query
    for params in ({"rows": 0}, {"rows": 100000}, {"columns": -5}, {"columns": "1e3"},
                   {"region": "0.5,0.5,0.4,1"}, {"region": "0,0,2,1"}, {"region": "0,0,1"},
                   {"windowCenter": 40, "windowWidth": 0}, {"windowCenter": 40},
                   {"rows": 8192, "columns": 8192}):  # 8192x8192 is more than a rendering may be
        code, _, body = await served.get("ct", **params)
        assert code == 400, (params, body)


@pytest_twisted.ensureDeferred
async def test_injection_attempts(served: Client) -> None:
    """Quotes, traversal, NUL, CRLF and markup in every parameter, sent raw on the request
    line, and over-long queries get clean 4xx answers that never echo the value; the
    server keeps serving."""
    study, series, instance = served.uids["ct"]
    fields = {"requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": instance}
    names = list(fields) + ["contentType", "transferSyntax", "anonymize", "rows", "columns", "region",
                            "windowCenter", "windowWidth", "frameNumber", "imageQuality", "presentationUID"]
    values = [b"1'%20OR%20'1'='1", b"%22%3E%3Cscript%3E", b"../../../../etc/passwd", b"..%2F..%2Fcatalog.sqlite3",
              b"1.2%00.3", b"%0d%0aX-Evil:%201", b"9" * 300, b"%ff"]
    port = served.server.http_port
    for name in names:
        for value in values:
            query = {**fields, name: None}
            parts = [k.encode() + b"=" + (v.encode() if v is not None else value) for k, v in query.items()]
            status, body = await threads.deferToThread(raw_get, port, b"/wado?" + b"&".join(parts))
            assert 400 <= status < 500, (name, value, status)
            for needle in (b"passwd", b"script", b"Evil", b"999", b"sqlite", b"OR"):
                assert needle not in body
    status, body = await threads.deferToThread(raw_get, port, b"/wado?requestType=WADO&x=" + b"a" * 5000)
    assert status == 414
    # Over Twisted's 16 KiB head limit: it answers 400 and closes at once, so the answer
    # is often lost to the reset of the unread request (no response at all).
    try:
        status, _ = await threads.deferToThread(raw_get, port, b"/wado?requestType=WADO&x=" + b"a" * 70000)
    except (ConnectionError, AssertionError):
        status = 400
    assert 400 <= status < 500
    code, _, _ = await served.get("ct")
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_head_etag_and_caching(served: Client) -> None:
    """HEAD gives GET's headers without a body; the ETag is strong and quoted, changes with
    the parameters, and If-None-Match (also weak or *) gives 304; Cache-Control is private.
    Several renderings at once all complete."""
    code, headers, body = await served.get("rgb", contentType="image/png", columns=100)
    assert code == 200 and headers["cache-control"] == "private"
    etag = headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and not etag.startswith("W/")
    assert int(headers["content-length"]) == len(body)

    target = served.url("rgb", contentType="image/png", columns=100).removeprefix(served.server.url).encode()
    code, head, empty = await threads.deferToThread(raw_request, served.server.http_port, target, b"HEAD")
    assert (code, empty) == (200, b"")
    assert {k: head[k] for k in ("etag", "content-length", "content-type")} == {
        k: headers[k] for k in ("etag", "content-length", "content-type")}
    code, _, empty = await served.get("rgb", method="HEAD", rows=0)
    assert (code, empty) == (400, b"")

    for match in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        code, found, again = await served.get("rgb", headers={"If-None-Match": match}, contentType="image/png",
                                              columns=100)
        assert (code, again, found["etag"]) == (304, b"", etag), match
    code, _, _ = await served.get("rgb", headers={"If-None-Match": '"nope"'}, contentType="image/png", columns=100)
    assert code == 200
    code, other, _ = await served.get("rgb", contentType="image/png", columns=101)
    assert code == 200 and other["etag"] != etag
    code, dicom, _ = await served.get("rgb", contentType="application/dicom")
    assert code == 200 and dicom["etag"] not in (etag, other["etag"])

    code, _, _ = await fetch(served.url("rgb"), method="POST")
    assert code == 405

    answers = await gatherResults([ensureDeferred(served.get("rgb", rows=20 + i)) for i in range(8)])
    assert [(code, image(body).shape[0]) for code, _, body in answers] == [(200, 20 + i) for i in range(8)]
