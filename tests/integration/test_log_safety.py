"""
The server's own log, as twistd writes it, cannot be flooded, forged or made to leak.

A real ``twistd -n imageshare`` receives what an anonymous client can send (a JPIP POST
with huge unknown field names, a SOAP request whose ``wsa:Action`` holds ``&#10;`` and a
fake log line) and a study whose patient attributes are distinctive and partly invalid
(pydicom warns about invalid values, quoting them). It is then stopped, and its log file
is read line by line.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.helpers import make_instances
from tests.integration.conftest import run_with_deadline

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed"),
]

#: No line of the log may be longer than this (a field is cut at 256 characters).
MAX_LINE = 4096

#: Patient and study values of the test data, some invalid for their VR so that pydicom
#: warns about them (quoting them), none of which may reach the log.
PATIENT_VALUES = {
    "PatientName": "Zyxwvut^Privacy",
    "PatientID": "PID-8472910",
    "PatientBirthDate": "1962O231",  # letter O: invalid DA
    "PatientSex": "female",  # lower case: invalid CS
    "StudyDate": "2O240101",  # invalid DA
    "AccessionNumber": "ACC-55512",
    "InstitutionName": "Hospital Qwertyuiop",
    "ReferringPhysicianName": "Plmoknijb^Doctor",
    "StudyDescription": "Knee Xyzzyplugh",
}

FORGED = "2026-01-01T00:00:00+0000 [imageshare#critical] FORGED-LINE"


def _request(url: str, body: bytes | None = None, content_type: str = "") -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if content_type else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as e:
        e.read()
        return int(e.code)


def _study(folder: Path) -> list[Path]:
    paths = make_instances(folder, 2, seed="privacy")
    for path in paths:
        ds = dcmread(path)
        for keyword, value in PATIENT_VALUES.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
    return paths


def test_log_is_bounded_unforgeable_and_free_of_patient_values(twistd, tmp_path: Path) -> None:
    """Every log line stays under MAX_LINE, the forged line is escaped inside its own event,
    and no patient or study value of the received data appears anywhere in the log."""
    server = twistd(manifest={"stable_after": "1"}).start()
    base = f"http://127.0.0.1:{server.ports['http']}"

    folder = tmp_path / "study"
    paths = _study(folder)
    uid = str(dcmread(paths[0]).SOPInstanceUID)
    result = run_with_deadline(
        ["storescu", "-aet", "MODALITY", "-aec", "IMAGESHARE", "127.0.0.1", str(server.ports["dicom"]),
         *map(str, paths)]
    )
    assert result.returncode == 0, result.stderr
    server.wait_status(lambda s: s["streamable"] == 2 and s["manifests"] == 1, timeout=120)

    # Anonymous JPIP POST: unknown field names of 40 KB each (their list is logged).
    fields = "&".join(f"{'u' * 40_000}{i}=1" for i in range(20))
    status = _request(f"{base}/jpip", f"target={uid}&fsiz=64,64&{fields}".encode(), "application/x-www-form-urlencoded")
    assert status == 200

    # A SOAP action with a line break and a fake log line after it.
    envelope = (
        '<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" '
        'xmlns:a="http://www.w3.org/2005/08/addressing"><s:Header>'
        f"<a:Action>urn:evil&#10;{FORGED}</a:Action><a:MessageID>urn:uuid:1</a:MessageID>"
        "</s:Header><s:Body><x/></s:Body></s:Envelope>"
    ).encode()
    assert _request(f"{base}/xds/registry", envelope, "application/soap+xml; charset=utf-8") >= 400

    # Serving the study reads every attribute again (renderings, headers).
    ds = dcmread(paths[0])
    query = urllib.parse.urlencode({"requestType": "WADO", "studyUID": ds.StudyInstanceUID,
                                    "seriesUID": ds.SeriesInstanceUID, "objectUID": uid})
    assert _request(f"{base}/wado?{query}") == 200
    assert _request(f"{base}/wado?{query}&contentType=application/dicom") == 200
    assert server.stop() in (0, -15)  # as test_crash: twistd may end on the signal itself

    lines = server.log_path.read_text(errors="replace").splitlines()
    assert any("ignored unknown JPIP request fields" in line for line in lines)
    assert max(map(len, lines)) <= MAX_LINE, max(lines, key=len)[:300]
    forged = [line for line in lines if "FORGED-LINE" in line]
    assert forged, "the SOAP action was not logged at all"
    assert all(not line.startswith(FORGED) and "urn:evil\\x0a" in line for line in forged)
    for keyword, value in PATIENT_VALUES.items():
        leaks = [line for line in lines if value in line]
        assert not leaks, f"{keyword} in the log: {leaks[0][:300]}"
