"""Ingest over real DICOM associations: pynetdicom and dcmtk clients against the running server."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage, Verification
from twisted.internet import threads

from tests.helpers import make_instances, part10_file, sample_file, scu_store, wire_dataset
from tests.integration.conftest import run_with_deadline

pytestmark = pytest.mark.integration
needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed")


def get_status(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(url + "/status", timeout=10) as r:
        assert r.headers["Content-Type"] == "application/json"
        return json.load(r)  # type: ignore[no-any-return]


async def wait_idle(server: Any) -> dict[str, Any]:
    await server.service.transcoder.when_idle()
    return await threads.deferToThread(get_status, server.url)


@pytest_twisted.ensureDeferred
async def test_echo_and_store_with_pynetdicom(start_server, tmp_path: Path) -> None:
    """C-ECHO succeeds; C-STOREd instances are acknowledged, stored, transcoded and counted.

    Every log event emitted meanwhile is kept: none may carry a patient's name or ID.
    """
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        await _echo_and_store(start_server)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any(e.get("sop_instance_uid") for e in events)  # the observer did see our events
    secrets = set()
    for name in STORE_SET:
        ds = dcmread(sample_file(name), stop_before_pixels=True)
        secrets |= {str(ds.get("PatientName", "")), str(ds.get("PatientID", ""))}
    secrets -= {""}
    for event in events:
        text = formatEvent(event) + repr({k: v for k, v in event.items() if not k.startswith("log_")})
        assert not any(secret in text for secret in secrets), text


STORE_SET = ["CT_small.dcm", "MR_small_RLE.dcm", "JPGExtended.dcm", "SC_rgb_small_odd.dcm", "rtplan.dcm",
             "image_dfl.dcm", "JPEG2000.dcm", "SC_rgb_rle_2frame.dcm", "examples_palette.dcm"]


async def _echo_and_store(start_server: Any) -> None:
    server = await start_server()

    def echo() -> int:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="IMAGESHARE")
        assert assoc.is_established
        status = assoc.send_c_echo()
        assoc.release()
        return int(status.Status)

    assert await threads.deferToThread(echo) == 0
    paths = [sample_file(n) for n in STORE_SET]
    statuses = await threads.deferToThread(scu_store, server.dicom_port, paths)
    assert statuses == [0] * len(paths)
    status = await wait_idle(server)
    assert status["instances"] == len(paths)
    assert status["transcode_pending"] == 0
    assert status["transcode_failed"] == 0
    assert status["not_image"] == 1  # the RT plan
    assert status["not_streamable"] == 1  # palette colour
    assert status["streamable"] == len(paths) - 2
    assert status["frames"] == len(paths) - 2 + 1  # SC_rgb_rle_2frame has 2 frames
    assert isinstance(status["uptime_s"], int)


@needs_dcmtk
@pytest_twisted.ensureDeferred
async def test_store_with_dcmtk_storescu(start_server, tmp_path: Path) -> None:
    """dcmtk's storescu sends a folder in one association; every file is acknowledged and kept."""
    server = await start_server()
    files = make_instances(tmp_path / "in", 20)
    result = await threads.deferToThread(
        run_with_deadline,
        ["storescu", "-v", "-aet", "STORESCU", "-aec", "IMAGESHARE", "127.0.0.1", str(server.dicom_port),
         "+sd", str(tmp_path / "in")],
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Received Store Response (Success)") + result.stdout.count(
        "Received Store Response (Success)") == 20
    status = await wait_idle(server)
    assert status["instances"] == 20 and status["streamable"] == 20 and status["frames"] == 20
    # The archived files are the instances that were sent.
    sent = {dcmread(f).SOPInstanceUID for f in files}
    db = sqlite3.connect(server.data_dir / "catalog.sqlite3")
    assert {u for (u,) in db.execute("SELECT sop_instance_uid FROM instances")} == sent
    db.close()


@pytest_twisted.ensureDeferred
async def test_calling_ae_allow_list(start_server) -> None:
    """With an allow-list, an unknown calling AE is rejected and a listed one accepted."""
    server = await start_server(dicom={"allowed_calling_aets": "GOODSCU"})
    path = [(sample_file("CT_small.dcm"))]
    assert await threads.deferToThread(scu_store, server.dicom_port, path, ae_title="BADSCU") == [None]
    assert await threads.deferToThread(scu_store, server.dicom_port, path, ae_title="GOODSCU") == [0]
    # A wrong called AE title is rejected too.
    assert await threads.deferToThread(scu_store, server.dicom_port, path, ae_title="GOODSCU",
                                       called="SOMEONEELSE") == [None]


@pytest_twisted.ensureDeferred
async def test_bad_input_gets_failure_status_and_server_keeps_serving(start_server, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Truncated and UID-less data sets, garbage bytes and tiny PDUs: failures, then normal service."""
    # Send files' bytes as they are (pynetdicom would otherwise decode and re-encode); the
    # setting is process-wide, so it is undone after this test.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    server = await start_server()
    port = server.dicom_port
    good = (sample_file("CT_small.dcm"))

    def send_raw_dataset(payload: bytes, sop_instance_uid: str) -> int | None:
        f = part10_file(tmp_path / "raw.dcm", payload, transfer_syntax=ExplicitVRLittleEndian,
                        sop_class_uid=CTImageStorage, sop_instance_uid=sop_instance_uid)
        return scu_store(port, [f], contexts=[build_context(CTImageStorage, ExplicitVRLittleEndian)])[0]

    data, _, _, sop = wire_dataset(good)
    for payload in (data[: len(data) // 2], b"\xde\xad\xbe\xef" * 64):
        status = await threads.deferToThread(send_raw_dataset, payload, sop)
        assert status is not None and 0xC000 <= status <= 0xCFFF

    ds = dcmread(good)
    del ds.SOPInstanceUID
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    nouid = await threads.deferToThread(send_raw_dataset, buf.getvalue(), "1.2.3.4.5")
    assert nouid is not None and 0xC000 <= nouid <= 0xCFFF

    def garbage_socket() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 20)
            s.settimeout(10)
            try:
                return s.recv(100)
            except (ConnectionResetError, TimeoutError):
                return b""

    await threads.deferToThread(garbage_socket)

    def half_open() -> None:
        # A client that connects and says nothing must not block others.
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"\x01\x00\x00\x00\x10\x00")  # the start of an A-ASSOCIATE-RQ, then silence
        time.sleep(0.2)
        s.close()

    await threads.deferToThread(half_open)

    # A client with a tiny maximum PDU: our responses must be cut to fit it.
    assert await threads.deferToThread(scu_store, port, [good], max_pdu=64) == [0]

    status = await wait_idle(server)
    assert status["instances"] == 1
    assert status["streamable"] == 1


@pytest_twisted.ensureDeferred
async def test_pdu_flood_with_tiny_max_pdu(start_server, tmp_path: Path) -> None:
    """A server limited to 64-byte PDUs receives instances as floods of ~700 PDUs each, intact."""
    server = await start_server(dicom={"max_pdu": "64"})
    files = make_instances(tmp_path / "in", 5, seed="flood")
    statuses = await threads.deferToThread(scu_store, server.dicom_port, files, max_pdu=64)
    assert statuses == [0] * 5
    status = await wait_idle(server)
    assert status["instances"] == 5 and status["streamable"] == 5
    for f in files:
        ds = dcmread(f)
        archived = dcmread(server.data_dir / "archive" / server.service.archive.relative_path(ds.SOPInstanceUID))
        assert archived.PixelData == ds.PixelData


@needs_dcmtk
@pytest_twisted.ensureDeferred
async def test_unlimited_max_pdu_with_dcmtk(start_server, tmp_path: Path) -> None:
    """max_pdu = 0 (no limit) negotiates with dcmtk's storescu and stores."""
    server = await start_server(dicom={"max_pdu": "0"})
    make_instances(tmp_path / "in", 3, seed="nolimit")
    result = await threads.deferToThread(
        run_with_deadline,
        ["storescu", "-aec", "IMAGESHARE", "127.0.0.1", str(server.dicom_port), "+sd", str(tmp_path / "in")],
    )
    assert result.returncode == 0, result.stderr
    status = await wait_idle(server)
    assert status["instances"] == 3
