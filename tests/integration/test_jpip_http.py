"""JPIP over HTTP against the running server, validated with OpenJPEG's own JPIP tools."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_twisted
import treq
from pydicom import dcmread
from twisted.internet import threads

from imageshare.protocols.jpip.messages import Eor, Message, StreamParser
from tests.helpers import make_cr, sample_file, scu_store
from tests.protocols.jpip import opj

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not opj.HAVE_TOOLS, reason="OpenJPEG's JPIP tools are not installed"),
]


class Jpip:
    """A minimal test client: GET requests, whole bodies, headers by name."""

    def __init__(self, base: str) -> None:
        self.base = base

    async def get(self, query: str) -> tuple[int, dict[str, str], bytes]:
        response = await treq.get(f"{self.base}/jpip?{query}".encode("ascii"))
        body = await treq.content(response)
        headers = {k.decode().lower(): v[-1].decode() for k, v in response.headers.getAllRawHeaders()}
        return response.code, headers, body


def parse(body: bytes) -> list[Message | Eor]:
    parser = StreamParser()
    out = parser.feed(body)
    parser.close()
    return out


@pytest_twisted.async_fixture
async def served(start_server, tmp_path: Path) -> dict[str, Any]:
    """A running server holding CT_small (signed 16-bit) and a CR-sized image, transcoded."""
    server = await start_server()
    cr_path, cr_pixels = make_cr(tmp_path)
    statuses = await threads.deferToThread(scu_store, server.dicom_port, [sample_file("CT_small.dcm"), cr_path])
    assert statuses == [0, 0]
    await server.service.transcoder.when_idle()
    catalog = server.service.catalog
    cr_uid = str(dcmread(cr_path, stop_before_pixels=True).SOPInstanceUID)
    ct = dcmread(sample_file("CT_small.dcm"))
    frames = {uid: catalog.frames(uid)[0] for uid in (cr_uid, str(ct.SOPInstanceUID))}
    return {
        "server": server,
        "client": Jpip(server.url),
        "cr": (cr_uid, cr_pixels, frames[cr_uid]),
        "ct": (str(ct.SOPInstanceUID), ct.pixel_array, frames[str(ct.SOPInstanceUID)]),
    }


@pytest_twisted.ensureDeferred
async def test_session_first_view_then_full_resolution(served: Any, tmp_path: Path) -> None:
    """A new session's first view decodes exactly like opj_decompress -r N of the whole
    codestream, stays under 3% of it, and its headers name the frame and the region sent
    (the request named no region); then the full resolution in the same session equals
    the DICOM pixels, and a repeat sends nothing but the EOR."""
    client, server = served["client"], served["server"]
    uid, pixels, frame = served["cr"]
    full = server.data_dir / frame.codestream_path
    code, headers, first = await client.get(f"target={uid}&fsiz=256,256&cnew=http&type=jpp-stream")
    assert code == 200, first
    assert headers["content-type"] == "image/jpp-stream"
    assert headers["cache-control"] == "no-cache"
    cnew = dict(item.split("=", 1) for item in headers["jpip-cnew"].split(","))
    assert cnew["path"] == "jpip" and cnew["transport"] == "http" and len(cnew["cid"]) >= 32
    assert "jpip-tid" in headers
    fx, fy = (int(v) for v in headers["jpip-fsiz"].split(","))
    assert (fx, fy) == (245, 231)  # 1955x1841 at discard level 3, rounded down
    assert (headers["jpip-roff"], headers["jpip-rsiz"]) == ("0,0", "245,231")  # the whole frame
    assert first[:5] == bytes.fromhex("7008000000")  # metadata-bin 0, explicit, empty, complete
    messages = parse(first)
    assert isinstance(messages[-1], Eor) and messages[-1].reason == 2
    assert len(first) <= 0.03 * full.stat().st_size

    rebuilt = opj.transcode(tmp_path, first)
    view = opj.decode(rebuilt, tmp_path, (fy, fx), precision=15, signed=False)
    reference = opj.decode(full, tmp_path, (fy, fx), precision=15, signed=False, reduce=3)
    np.testing.assert_array_equal(view, reference)

    cid = cnew["cid"]
    code, headers, rest = await client.get(f"cid={cid}&fsiz=1955,1841")
    assert code == 200 and "jpip-cnew" not in headers
    assert "jpip-fsiz" not in headers and (headers["jpip-roff"], headers["jpip-rsiz"]) == ("0,0", "1955,1841")
    assert parse(rest)[-1] == Eor(1)  # image done
    rebuilt = opj.transcode(tmp_path, first, rest)
    np.testing.assert_array_equal(opj.decode(rebuilt, tmp_path, pixels.shape, precision=15, signed=False), pixels)
    # Never twice: the two responses together hold each data-bin byte once.
    seen: dict[tuple[int, int, int], int] = {}
    for m in opj.messages(first, rest):
        key = (m.bin_class, m.csn, m.bin_id)
        assert m.offset == seen.get(key, 0), key
        seen[key] = m.offset + len(m.data)

    code, _, again = await client.get(f"cid={cid}&fsiz=1955,1841")
    assert code == 200 and again == bytes([0, 1, 0])


@pytest_twisted.ensureDeferred
async def test_signed_ct_full_session(served: Any, tmp_path: Path) -> None:
    """A signed 16-bit CT streamed at full size in a new session decodes to the DICOM pixels."""
    uid, pixels, frame = served["ct"]
    code, headers, body = await served["client"].get(f"target={uid}&fsiz=128,128&cnew=http")
    assert code == 200 and "jpip-fsiz" not in headers  # 128x128 is exact
    assert (headers["jpip-roff"], headers["jpip-rsiz"]) == ("0,0", "128,128")  # no region asked: all of it
    rebuilt = opj.transcode(tmp_path, body)
    decoded = opj.decode(rebuilt, tmp_path, pixels.shape, precision=frame.precision, signed=True)
    np.testing.assert_array_equal(decoded, pixels)


@pytest_twisted.ensureDeferred
async def test_stateless_region(served: Any, tmp_path: Path) -> None:
    """A stateless region request (no channel) carries exactly that region, and far less than the image."""
    uid, pixels, frame = served["cr"]
    code, headers, body = await served["client"].get(f"target={uid}&fsiz=1955,1841&roff=600,700&rsiz=400,300")
    assert code == 200 and "jpip-cnew" not in headers
    assert not {"jpip-fsiz", "jpip-roff", "jpip-rsiz"} & set(headers)  # served exactly as asked
    assert len(body) < 0.2 * (served["server"].data_dir / frame.codestream_path).stat().st_size
    rebuilt = opj.transcode(tmp_path, body)
    decoded = opj.decode(rebuilt, tmp_path, pixels.shape, precision=15, signed=False)
    np.testing.assert_array_equal(decoded[700:1000, 600:1000], pixels[700:1000, 600:1000])


@pytest_twisted.ensureDeferred
async def test_errors(served: Any) -> None:
    """Unknown target and channel 404, malformed 400, unsupported type 415, POST works."""
    client = served["client"]
    uid = served["ct"][0]
    assert (await client.get("target=1.2.3.4&fsiz=64,64"))[0] == 404
    assert (await client.get("target=../../etc/passwd&fsiz=64,64"))[0] == 404
    assert (await client.get("cid=JPH_0123456789abcdef&fsiz=64,64"))[0] == 404
    assert (await client.get(f"target={uid}&fsiz=abc"))[0] == 400
    assert (await client.get(f"target={uid}&roff=1,1"))[0] == 400
    assert (await client.get(f"target={uid}&fsiz=64,64&type=raw"))[0] == 415
    assert (await client.get(f"target={uid}&fsiz=64,64&cnew=http-udp"))[0] == 501
    code, headers, body = await client.get(f"target={uid}&fsiz=64,64&bogus=1&qid=7")
    assert code == 200 and headers["jpip-qid"] == "7"
    response = await treq.post(
        f"{client.base}/jpip".encode(), data=f"target={uid}&fsiz=64,64".encode(),
        headers={b"Content-Type": [b"application/x-www-form-urlencoded"]},
    )
    assert response.code == 200
    assert (await treq.content(response))[:5] == bytes.fromhex("7008000000")
    response = await treq.get(f"{client.base}/jpip/{uid}?fsiz=64,64".encode())
    assert response.code == 200
    await treq.content(response)


def assert_never_twice(*bodies: bytes) -> None:
    """Across the bodies of one session, every message continues its data-bin where it stopped."""
    held: dict[tuple[int, int, int], int] = {}
    for m in opj.messages(*bodies):
        key = (m.bin_class, m.csn, m.bin_id)
        assert m.offset == held.get(key, 0), f"bin {key} resent or skipped"
        held[key] = m.offset + len(m.data)


@pytest_twisted.ensureDeferred
async def test_zoom_and_pan_with_byte_limits(served: Any, tmp_path: Path) -> None:
    """Zoom, pan and len-limited requests in one session never repeat a byte, and end exact."""
    client = served["client"]
    uid, pixels, _ = served["cr"]
    code, headers, first = await client.get(f"target={uid}&fsiz=489,461&cnew=http&len=2000")
    assert code == 200 and parse(first)[-1] == Eor(4)  # byte limit
    assert len(first) <= 2000 + 3
    cid = dict(i.split("=", 1) for i in headers["jpip-cnew"].split(","))["cid"]
    bodies = [first]
    windows = ["fsiz=489,461&len=5000", "fsiz=489,461", "fsiz=978,921&roff=100,100&rsiz=300,200",
               "fsiz=978,921&roff=350,100&rsiz=300,200", "fsiz=1955,1841&roff=900,800&rsiz=256,256&len=20000",
               "fsiz=1955,1841&roff=900,800&rsiz=256,256", "fsiz=1955,1841&layers=2", "fsiz=1955,1841&layers=9"]
    for query in windows:
        code, headers, body = await client.get(f"cid={cid}&{query}")
        assert code == 200, body
        bodies.append(body)
        if "layers=9" in query:
            assert headers["jpip-layers"] == "5"  # only 5 exist
    assert parse(bodies[-1])[-1] == Eor(1)  # image done
    assert_never_twice(*bodies)
    rebuilt = opj.transcode(tmp_path, *bodies)
    np.testing.assert_array_equal(opj.decode(rebuilt, tmp_path, pixels.shape, precision=15, signed=False), pixels)


@pytest_twisted.ensureDeferred
async def test_content_length_mode_limits_and_expiry(start_server, tmp_path: Path) -> None:
    """chunked=no sends Content-Length; the session limit gives 503; idle sessions expire (404)."""
    server = await start_server(jpip={"chunked": "no", "max_sessions": "2", "session_timeout": "1"})
    assert await threads.deferToThread(scu_store, server.dicom_port, [sample_file("CT_small.dcm")]) == [0]
    await server.service.transcoder.when_idle()
    uid = str(dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True).SOPInstanceUID)
    client = Jpip(server.url)
    response = await treq.get(f"{server.url}/jpip?target={uid}&fsiz=64,64&cnew=http".encode())
    body = await treq.content(response)
    assert response.length == len(body)  # the agent read a Content-Length (it drops the header)
    assert response.headers.getRawHeaders(b"transfer-encoding") is None
    cnew = response.headers.getRawHeaders(b"jpip-cnew")[0].decode()
    cid = dict(i.split("=", 1) for i in cnew.split(","))["cid"]
    assert (await client.get(f"target={uid}&fsiz=64,64&cnew=http"))[0] == 200
    code, _, reason = await client.get(f"target={uid}&fsiz=64,64&cnew=http")
    assert code == 503, reason
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    await deferLater(reactor, 2.2, lambda: None)  # past the timeout and a sweep
    assert len(server.service.jpip.sessions) == 0
    assert (await client.get(f"cid={cid}&fsiz=64,64"))[0] == 404
    assert (await client.get(f"target={uid}&fsiz=64,64&cnew=http"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_ready_first_views_still_fill_each_session_model(served: Any) -> None:
    """Two new sessions get the same first view (served from the ready-response cache), and
    each session's model records it: a repeat in either sends only the EOR."""
    client = served["client"]
    uid = served["cr"][0]
    query = f"target={uid}&fsiz=256,256&cnew=http"
    _, h1, first = await client.get(query)
    _, h2, second = await client.get(query)
    assert first == second and h1["jpip-cnew"] != h2["jpip-cnew"]
    for headers in (h1, h2):
        cid = dict(i.split("=", 1) for i in headers["jpip-cnew"].split(","))["cid"]
        code, _, again = await client.get(f"cid={cid}&fsiz=256,256")
        assert code == 200 and again == bytes([0, 2, 0])


@pytest_twisted.ensureDeferred
async def test_hostile_requests_get_clean_errors(served: Any) -> None:
    """Absurd numbers and broken cache descriptions get 4xx, and the session stays usable."""
    client = served["client"]
    uid = served["cr"][0]
    _, headers, _ = await client.get(f"target={uid}&fsiz=64,64&cnew=http")
    cid = dict(i.split("=", 1) for i in headers["jpip-cnew"].split(","))["cid"]
    for query in (
        f"cid={cid}&fsiz=99999999999999999999,1",
        f"cid={cid}&fsiz=-5,10",
        f"cid={cid}&fsiz=64,64&model=P%5B%5D,,,",
        f"cid={cid}&fsiz=64,64&len=99999999999999999999999",
        f"cid={cid}&fsiz=64,64&comps=5-2",
        f"target={uid}&fsiz=64,64&need=-Hm",
        f"target={uid}&" + "&".join(f"f{i}=1" for i in range(300)),
    ):
        code, _, body = await client.get(query)
        assert 400 <= code < 500, (query[:80], code, body[:200])
    # Absurd but valid windows are clipped, not refused.
    code, headers, _ = await client.get(f"cid={cid}&fsiz=4000000000,4000000000&roff=3999999999,0&rsiz=10,10")
    assert code == 200 and headers["jpip-fsiz"] == "1955,1841"
    code, _, body = await client.get(f"cid={cid}&fsiz=64,64&model=P0:L99,H*,Hm")
    assert code == 200, body


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed imageshare-jpip command."""
    cli = str(Path(sys.executable).parent / "imageshare-jpip")
    return subprocess.run([cli, *args], capture_output=True, text=True, timeout=120)


@pytest_twisted.ensureDeferred
async def test_command_line_client(served: Any, tmp_path: Path) -> None:
    """imageshare-jpip fetches a first view (equal to the reduced decode), a byte-limited full
    session (equal to the DICOM pixels), a region and a layer-limited view, and saves them."""
    from imageshare.transcode import openjpeg

    server = served["server"]
    uid, pixels, frame = served["cr"]
    full = (server.data_dir / frame.codestream_path).read_bytes()
    base = f"{server.url}/jpip?target={uid}"
    r = await threads.deferToThread(run_cli, base, "--fsiz", "256,256", "-o", str(tmp_path / "v.npy"))
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), openjpeg.decode(full, reduce=3))
    r = await threads.deferToThread(run_cli, f"{server.url}/jpip/{uid}", "--fsiz", "1955,1841", "--session",
                                    "--len", "400000", "-o", str(tmp_path / "full.npy"))
    assert r.returncode == 0, r.stderr
    assert "over http" in r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "full.npy"), pixels)
    r = await threads.deferToThread(run_cli, base, "--fsiz", "1955,1841", "--roff", "600,700", "--rsiz", "400,300",
                                    "-o", str(tmp_path / "roi.npy"))
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "roi.npy"), pixels[700:1000, 600:1000])
    r = await threads.deferToThread(run_cli, base, "--fsiz", "489,461", "--layers", "2",
                                    "-o", str(tmp_path / "l2.npy"))
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "l2.npy"), openjpeg.decode(full, reduce=2, layers=2))
    r = await threads.deferToThread(run_cli, base, "--fsiz", "128,128", "-o", str(tmp_path / "v.png"))
    assert r.returncode == 0 and (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"
    r = await threads.deferToThread(run_cli, f"{server.url}/jpip?target=1.2.3", "--fsiz", "64,64",
                                    "-o", str(tmp_path / "x.npy"))
    assert r.returncode != 0 and "404" in r.stderr


@pytest_twisted.ensureDeferred
async def test_mr_and_rgb_sessions_and_jpt(start_server, tmp_path: Path) -> None:
    """Full sessions of an MR and an RGB image equal the DICOM pixels after opj_jpip_transcode;
    a JPT-stream of the RGB image does too; thousands of stateless requests leave no session."""
    server = await start_server()
    names = ["MR_small.dcm", "SC_rgb_small_odd.dcm"]
    assert await threads.deferToThread(scu_store, server.dicom_port, [sample_file(n) for n in names]) == [0, 0]
    await server.service.transcoder.when_idle()
    client = Jpip(server.url)
    for name in names:
        ds = dcmread(sample_file(name))
        pixels = ds.pixel_array
        frame = server.service.catalog.frames(str(ds.SOPInstanceUID))[0]
        for kind in ("jpp-stream", "jpt-stream"):
            if kind == "jpt-stream" and pixels.ndim == 2:
                continue
            code, headers, body = await client.get(
                f"target={ds.SOPInstanceUID}&fsiz={pixels.shape[1]},{pixels.shape[0]}&cnew=http&type={kind}")
            assert code == 200 and headers["content-type"] == f"image/{kind}"
            folder = tmp_path / f"{name}-{kind}"
            folder.mkdir()
            rebuilt = opj.transcode(folder, body)
            decoded = opj.decode(rebuilt, folder, pixels.shape, precision=frame.precision, signed=frame.signed)
            np.testing.assert_array_equal(decoded, pixels)
    # Frame k of a multi-frame instance is codestream k-1 (stream=).
    multi = dcmread(sample_file("SC_rgb_rle_2frame.dcm"))
    assert await threads.deferToThread(scu_store, server.dicom_port, [sample_file("SC_rgb_rle_2frame.dcm")]) == [0]
    await server.service.transcoder.when_idle()
    rows, cols = multi.Rows, multi.Columns
    for stream in (0, 1):
        code, headers, body = await client.get(f"target={multi.SOPInstanceUID}&stream={stream}&fsiz={cols},{rows}")
        assert code == 200, body
        assert {m.csn for m in parse(body) if isinstance(m, Message)} == {stream}
        folder = tmp_path / f"stream{stream}"
        folder.mkdir()
        decoded = opj.decode(opj.transcode(folder, body), folder, (rows, cols, 3), precision=8, signed=False)
        np.testing.assert_array_equal(decoded, multi.pixel_array[stream])
    assert (await client.get(f"target={multi.SOPInstanceUID}&stream=2&fsiz=16,16"))[0] == 404
    ds = dcmread(sample_file("MR_small.dcm"))
    sessions = len(server.service.jpip.sessions)
    for _ in range(2000):
        code, _, _ = await client.get(f"target={ds.SOPInstanceUID}&fsiz=16,16")
        assert code == 200
    assert len(server.service.jpip.sessions) == sessions


@pytest_twisted.ensureDeferred
async def test_cors_and_second_channel(start_server) -> None:
    """Configured origins get CORS headers exposing the JPIP ones (also on errors and preflight);
    a second channel of a session shares its cache model; cclose ends channels."""
    server = await start_server(http={"cors_origins": "https://viewer.example.org"})
    assert await threads.deferToThread(scu_store, server.dicom_port, [sample_file("CT_small.dcm")]) == [0]
    await server.service.transcoder.when_idle()
    uid = str(dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True).SOPInstanceUID)
    origin = {b"Origin": [b"https://viewer.example.org"]}
    response = await treq.get(f"{server.url}/jpip?target={uid}&fsiz=128,128&cnew=http".encode(), headers=origin)
    await treq.content(response)
    assert response.headers.getRawHeaders(b"access-control-allow-origin") == [b"https://viewer.example.org"]
    assert b"JPIP-cnew" in response.headers.getRawHeaders(b"access-control-expose-headers")[0]
    cid = dict(i.split("=", 1) for i in response.headers.getRawHeaders(b"jpip-cnew")[0].decode().split(","))["cid"]
    other = await treq.get(f"{server.url}/jpip?target={uid}&fsiz=64,64".encode(),
                           headers={b"Origin": [b"https://elsewhere.example.org"]})
    await treq.content(other)
    assert other.headers.getRawHeaders(b"access-control-allow-origin") is None
    preflight = await treq.request("OPTIONS", f"{server.url}/jpip".encode(),
                                   headers={**origin, b"Access-Control-Request-Method": [b"POST"]})
    await treq.content(preflight)
    assert preflight.code == 204 and preflight.headers.getRawHeaders(b"access-control-allow-methods")
    missing = await treq.get(f"{server.url}/jpip?target=1.2.3&fsiz=64,64".encode(), headers=origin)
    await treq.content(missing)
    assert missing.code == 404 and missing.headers.getRawHeaders(b"access-control-allow-origin")

    client = Jpip(server.url)
    code, headers, _ = await client.get(f"cid={cid}&cnew=http&fsiz=128,128")
    second = dict(i.split("=", 1) for i in headers["jpip-cnew"].split(","))["cid"]
    assert code == 200 and second != cid
    code, _, body = await client.get(f"cid={second}&fsiz=128,128")
    assert body == bytes([0, 1, 0])  # the first channel already delivered everything
    assert (await client.get(f"cid={second}&cclose={second}&fsiz=128,128"))[0] == 200
    assert (await client.get(f"cid={second}&fsiz=128,128"))[0] == 404
    assert (await client.get(f"cid={cid}&fsiz=128,128"))[0] == 200
