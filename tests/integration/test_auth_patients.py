"""Per-patient tokens (IUA extensions.ihe_bppc.patient_id) on WADO, JPIP, RAD-69 and XDS."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from pydicom import dcmread
from pydicom.uid import generate_uid
from twisted.internet import threads

from imageshare.manifests import LOCATION_UID_SETTING
from imageshare.transcode import openjpeg
from imageshare.xds import mtom, rad69, soap
from imageshare.xds.safexml import parse
from tests.auth.keys import AUDIENCE, ISSUER, Keys
from tests.helpers import make_instances, scu_store

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not openjpeg.is_available(), reason="OpenJPEG >= 2.5 missing"),
]

AUTHORITY = "1.2.3.4.5"
XDS = "urn:ihe:iti:xds-b:2007"


def patient_files(folder: Path, seed: str, patient_id: str) -> tuple[str, str, str]:
    (path,) = make_instances(folder / seed, 1, seed=seed)
    ds = dcmread(path)
    ds.PatientID = patient_id
    ds.save_as(path, enforce_file_format=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


async def fetch(url: str, token: str, method: str = "GET", **kw: Any) -> tuple[int, bytes, Any]:
    headers = {"Authorization": f"Bearer {token}", **kw.pop("headers", {})}
    response = await treq.request(method, url, headers=headers, **kw)
    return response.code, await response.content(), response.headers


@pytest_twisted.ensureDeferred
async def test_a_patient_token_sees_only_its_patient(start_server, tmp_path: Path) -> None:
    """Another patient's object answers exactly as a missing one in WADO, JPIP and RAD-69."""
    keys = Keys()
    server = await start_server(
        auth={"mode": "bearer", "issuer": ISSUER, "audience": AUDIENCE,
              "jwks": str(keys.write_jwks(tmp_path / "jwks.json"))},
        xds={"patient_authority": AUTHORITY},
    )
    a = patient_files(tmp_path, "a", "PAT-A")
    b = patient_files(tmp_path, "b", "PAT-B")
    paths = sorted((tmp_path / "a").glob("*.dcm")) + sorted((tmp_path / "b").glob("*.dcm"))
    assert await threads.deferToThread(scu_store, server.dicom_port, paths) == [0, 0]
    await server.service.transcoder.when_idle()
    missing = (a[0], a[1], generate_uid())

    only_a = keys.token(extensions={"ihe_bppc": {"patient_id": f"PAT-A^^^&{AUTHORITY}&ISO"}})
    everyone = keys.token()

    def wado(uids: tuple[str, str, str]) -> str:
        study, series, instance = uids
        return (f"{server.url}/wado?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={instance}"
                "&contentType=application/dicom")

    assert (await fetch(wado(a), only_a))[0] == 200
    assert (await fetch(wado(b), everyone))[0] == 200
    hidden = await fetch(wado(b), only_a)
    absent = await fetch(wado(missing), only_a)
    assert hidden[0] == absent[0] == 404 and hidden[1] == absent[1]

    def jpip(uids: tuple[str, str, str]) -> str:
        return f"{server.url}/jpip?target={uids[2]}&type=jpp-stream&fsiz=64,64&cnew=http"

    assert (await fetch(jpip(a), only_a))[0] == 200
    assert (await fetch(jpip(b), everyone))[0] == 200
    hidden = await fetch(jpip(b), only_a)
    absent = await fetch(jpip(missing), only_a)
    assert hidden[0] == absent[0] == 404 and hidden[1] == absent[1]

    # RAD-69: B's instance is refused as an unknown document; A's is returned.
    catalog = server.service.catalog
    repository = await threads.deferToThread(catalog.ensure_setting, LOCATION_UID_SETTING, generate_uid(prefix=None))
    endpoint = f"{server.url}/xds/imaging-source"

    async def rad69_errors(uids: tuple[str, str, str], token: str) -> tuple[int, list[str]]:
        document = rad69.DocumentRequest(uids[0], uids[1], repository, uids[2])
        envelope = soap.build_request(soap.RAD69, endpoint,
                                      rad69.build_request([document], ["1.2.840.10008.1.2.1"]))
        content_type, body = mtom.build(envelope, {})
        code, answer, headers = await fetch(endpoint, token, "POST", data=body,
                                            headers={"Content-Type": content_type})
        assert code == 200
        xml, parts = mtom.parse(headers.getRawHeaders(b"content-type")[0].decode(), answer)
        reply = soap.parse_envelope(parse(xml)).body
        errors = [e.get("errorCode") + ":" + (e.get("codeContext") or "")
                  for e in reply.iter("{urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0}RegistryError")]
        return len(reply.findall(f"{{{XDS}}}DocumentResponse")), errors

    assert (await rad69_errors(a, only_a)) == (1, [])
    hidden_r = await rad69_errors(b, only_a)
    absent_r = await rad69_errors(missing, only_a)
    assert hidden_r[0] == absent_r[0] == 0
    assert [e.split(":")[0] for e in hidden_r[1]] == [e.split(":")[0] for e in absent_r[1]]
    assert (await rad69_errors(b, everyone))[0] == 1

    # The embedded XDS services filter reads by patient (test_xds_patient_tokens.py); such a
    # token cannot submit: 403.
    code, _, headers = await fetch(f"{server.url}/xds/registry", keys.token(
        scope="xds.read xds.write", extensions={"ihe_bppc": {"patient_id": f"PAT-A^^^&{AUTHORITY}&ISO"}}), "POST",
        data=b"<x/>", headers={"Content-Type": f'application/soap+xml; action="{soap.ITI42}"'})
    assert code == 403 and b"insufficient_scope" in headers.getRawHeaders(b"www-authenticate")[0]


@pytest_twisted.ensureDeferred
async def test_jpip_sessions_belong_to_their_principal(start_server, tmp_path: Path) -> None:
    """A JPIP channel id presented by another principal answers as an unknown channel (404)."""
    import re

    keys = Keys()
    server = await start_server(auth={"mode": "bearer", "issuer": ISSUER, "audience": AUDIENCE,
                                      "jwks": str(keys.write_jwks(tmp_path / "jwks.json"))})
    uids = patient_files(tmp_path, "s", "PAT-S")
    assert await threads.deferToThread(scu_store, server.dicom_port, sorted((tmp_path / "s").glob("*.dcm"))) == [0]
    await server.service.transcoder.when_idle()
    alice, bob = keys.token(sub="alice"), keys.token(sub="bob")
    code, _, headers = await fetch(f"{server.url}/jpip?target={uids[2]}&type=jpp-stream&fsiz=64,64&cnew=http", alice)
    assert code == 200
    cid = re.search(r"cid=([^,]+)", headers.getRawHeaders(b"jpip-cnew")[0].decode()).group(1)

    stolen = await fetch(f"{server.url}/jpip?cid={cid}&fsiz=128,128", bob)
    unknown = await fetch(f"{server.url}/jpip?cid=JPH_{'0' * 32}&fsiz=128,128", bob)
    assert stolen[0] == unknown[0] == 404
    assert stolen[1].replace(cid.encode(), b"X") == unknown[1].replace(f"JPH_{'0' * 32}".encode(), b"X")
    assert (await fetch(f"{server.url}/jpip?cid={cid}&fsiz=128,128", alice))[0] == 200
