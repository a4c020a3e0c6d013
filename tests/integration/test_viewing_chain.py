"""The viewing side end to end: a study arrives, its manifest is found by C-FIND and WADO,
an image's JPIP-referenced header comes by WADO, and its URL streams the exact pixels."""

from __future__ import annotations

import copy
import io
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_twisted
from pydicom import dcmread
from pydicom.uid import generate_uid
from twisted.internet import threads
from twisted.logger import formatEvent, globalLogPublisher

from imageshare.jpip_cli import JpipClient
from tests.helpers import sample_file
from tests.integration.test_manifest_e2e import manifest_other_than, storescu
from tests.integration.test_qr import findscu

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("findscu") is None, reason="dcmtk is not installed"),
]

KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def http_get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


@pytest_twisted.ensureDeferred
async def test_manifest_and_header_reach_a_viewer(start_server, tmp_path: Path) -> None:
    """storescu sends a 3-image study; its manifest is built and C-FIND (IMAGE level) lists it
    beside the images; WADO returns it as application/dicom (and refuses to render it with
    406); WADO returns an image's JPIP-referenced header, whose Pixel Data Provider URL
    gives the exact pixels over JPIP. No log event along the way names the patient."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        await _chain(start_server, tmp_path)
    finally:
        globalLogPublisher.removeObserver(events.append)
    src = dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True)
    secrets = {str(src.PatientName), str(src.PatientID)}
    assert any(e.get("log_namespace", "").startswith("imageshare") for e in events)
    for event in events:
        text = formatEvent(event) + repr({k: v for k, v in event.items() if not k.startswith("log_")})
        assert not any(secret in text for secret in secrets), text


async def _chain(start_server: Any, tmp_path: Path) -> None:
    server = await start_server(manifest={"stable_after": "0.5"})
    src = dcmread(sample_file("CT_small.dcm"))
    study, series = generate_uid(), generate_uid()
    folder = tmp_path / "study"
    folder.mkdir()
    images = []
    for i in range(3):
        ds = copy.deepcopy(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
        images.append(str(ds.SOPInstanceUID))
    await storescu(server, folder)
    await server.service.transcoder.when_idle()
    manifest = await manifest_other_than(server, study, None)

    # Hierarchical C-FIND: the study's series (the images' and the manifest's), then each one's images.
    series_found, _ = await threads.deferToThread(
        findscu, server.dicom_port, "-S",
        ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}", "SeriesInstanceUID", "Modality"],
        tmp_path / "find-series",
    )
    assert sorted(str(r.Modality) for r in series_found) == ["CT", "KO"]
    found = []
    for s in series_found:
        rows, _ = await threads.deferToThread(
            findscu, server.dicom_port, "-S",
            ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}", f"SeriesInstanceUID={s.SeriesInstanceUID}",
             "SOPInstanceUID", "SOPClassUID"], tmp_path / f"find-{s.Modality}",
        )
        found += rows
    by_uid = {str(r.SOPInstanceUID): r for r in found}
    assert set(by_uid) == {*images, manifest}
    assert by_uid[manifest].SOPClassUID == KOS
    manifest_series = next(str(s.SeriesInstanceUID) for s in series_found if s.Modality == "KO")

    wado = f"{server.url}/wado?requestType=WADO&studyUID={study}"
    status, ctype, body = await threads.deferToThread(
        http_get, f"{wado}&seriesUID={manifest_series}&objectUID={manifest}&contentType=application/dicom")
    assert (status, ctype) == (200, "application/dicom")
    kos = dcmread(io.BytesIO(body))
    listed = {r.ReferencedSOPInstanceUID for s in kos.CurrentRequestedProcedureEvidenceSequence[0]
              .ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert listed == set(images)
    status, _, _ = await threads.deferToThread(
        http_get, f"{wado}&seriesUID={manifest_series}&objectUID={manifest}&contentType=image/jpeg")
    assert status == 406

    status, _, body = await threads.deferToThread(
        http_get, f"{wado}&seriesUID={series}&objectUID={images[1]}&contentType=application/dicom"
                  "&transferSyntax=1.2.840.10008.1.2.4.94")
    assert status == 200
    header = dcmread(io.BytesIO(body))
    assert header.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.94" and "PixelData" not in header
    url = urllib.parse.urlsplit(str(header[0x00287FE0].value))
    assert url.query == f"target={images[1]}"

    def stream() -> np.ndarray:
        # The header names the configured public URL; the test server listens on port 0.
        client = JpipClient(f"{server.url}{url.path}?{url.query}", timeout=30)
        client.fetch(fsiz=f"{header.Columns},{header.Rows}")
        return client.view()[0]

    np.testing.assert_array_equal(await threads.deferToThread(stream), src.pixel_array)
