"""Who may do what over DICOM (issue 12): calling-AE lists per operation, certificate pins,
and who may replace a stored instance. Real pynetdicom and dcmtk clients against the real
server on loopback."""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from twisted.internet import threads
from twisted.logger import globalLogPublisher

from tests.helpers import make_instances, scu_store
from tests.integration.test_tls import make_cert

pytestmark = pytest.mark.integration
NOT_AUTHORIZED = 0x0124


def _associate(port: int, aet: str, *contexts: Any, tls: tuple[ssl.SSLContext, str] | None = None) -> Any:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cx in contexts or (Verification,):
        ae.add_requested_context(cx)
    return ae.associate("127.0.0.1", port, ae_title="IMAGESHARE", tls_args=tls)


def _study(uid: str = "") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = uid
    return ds


def _find(port: int, aet: str) -> list[int]:
    assoc = _associate(port, aet, StudyRootQueryRetrieveInformationModelFind)
    assert assoc.is_established
    try:
        return [int(s.Status) for s, _ in assoc.send_c_find(_study(), StudyRootQueryRetrieveInformationModelFind)]
    finally:
        assoc.release()


def _move(port: int, aet: str, study: str, destination: str) -> list[int]:
    assoc = _associate(port, aet, StudyRootQueryRetrieveInformationModelMove)
    assert assoc.is_established
    try:
        return [int(s.Status) for s, _ in
                assoc.send_c_move(_study(study), destination, StudyRootQueryRetrieveInformationModelMove)]
    finally:
        assoc.release()


def _get(port: int, aet: str, study: str) -> list[int]:
    from pynetdicom import build_role

    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGESHARE", ext_neg=[build_role(CTImageStorage, scp_role=True)])
    assert assoc.is_established
    try:
        return [int(s.Status) for s, _ in assoc.send_c_get(_study(study), StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()


@pytest_twisted.ensureDeferred
async def test_allow_lists_per_operation(start_server, tmp_path: Path) -> None:
    """Each operation is open only to its list: others get 0x0124 (Refused: Not Authorized)
    and a refused C-MOVE connects to nothing; an AE allowed for no operation is rejected at
    association time; refusals are logged, throttled, and reported to on_refused."""
    # A destination that counts connections: a refused C-MOVE must not open any.
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(8)
    sink.settimeout(0.5)
    server = await start_server(
        dicom={
            "allowed_calling_aets": "STORER QUERIER MOVER",
            "store_calling_aets": "STORER",
            "query_calling_aets": "QUERIER",
            "retrieve_calling_aets": "MOVER",
        },
        dicom_destinations={"SINK": f"127.0.0.1:{sink.getsockname()[1]}"},
    )
    refusals: list[Any] = []
    server.service.dicom_access.on_refused.append(refusals.append)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    port = server.dicom_port
    paths = make_instances(tmp_path / "in", 1, seed="access")
    study = str(__import__("pydicom").dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    try:
        assert await threads.deferToThread(scu_store, port, paths, ae_title="STORER") == [0]
        assert await threads.deferToThread(scu_store, port, paths, ae_title="QUERIER") == [NOT_AUTHORIZED]
        assert await threads.deferToThread(scu_store, port, paths, ae_title="MOVER") == [NOT_AUTHORIZED]
        found = await threads.deferToThread(_find, port, "QUERIER")
        assert found[-1] == 0 and len(found) == 2  # one match, then Success
        assert await threads.deferToThread(_find, port, "STORER") == [NOT_AUTHORIZED]
        assert (await threads.deferToThread(_move, port, "STORER", study, "SINK"))[-1] == NOT_AUTHORIZED
        with pytest.raises(TimeoutError):
            sink.accept()
        assert (await threads.deferToThread(_get, port, "QUERIER", study))[-1] == NOT_AUTHORIZED
        for _ in range(3):
            assoc = await threads.deferToThread(_associate, port, "STRANGER")
            assert assoc.is_rejected
    finally:
        globalLogPublisher.removeObserver(events.append)
        sink.close()
    kinds = [(r.calling_aet, r.operation) for r in refusals]
    assert kinds == [("QUERIER", "store"), ("MOVER", "store"), ("STORER", "query"), ("STORER", "retrieve"),
                     ("QUERIER", "retrieve")] + [("STRANGER", None)] * 3
    lines = [e for e in events if "refused DICOM" in str(e.get("log_format", ""))]
    stranger = [e for e in lines if e.get("calling_aet") == "STRANGER"]
    assert len(stranger) == 1  # three rejections, one line (throttled)
    assert stranger[0]["what"] == "association" and stranger[0]["reason"] == "calling AE title not allowed"


@pytest.mark.skipif(shutil.which("echoscu") is None, reason="dcmtk is not installed")
@pytest_twisted.ensureDeferred
async def test_dcmtk_per_operation(start_server, tmp_path: Path) -> None:
    """dcmtk: an AE allowed only to store associates, but its C-FIND is refused with
    0x0124; an AE in no list cannot associate (every operation has a list here: an empty
    one would let any AE associate for that operation)."""
    server = await start_server(dicom={"store_calling_aets": "STORER", "query_calling_aets": "QUERIER",
                                       "retrieve_calling_aets": "MOVER"})
    port = str(server.dicom_port)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=60)

    ok = await threads.deferToThread(run, "echoscu", "-aet", "STORER", "-aec", "IMAGESHARE", "127.0.0.1", port)
    assert ok.returncode == 0, ok.stderr
    no = await threads.deferToThread(run, "echoscu", "-aet", "STRANGER", "-aec", "IMAGESHARE", "127.0.0.1", port)
    assert no.returncode != 0 and "Rejected" in (no.stdout + no.stderr)
    find = await threads.deferToThread(run, "findscu", "-v", "-S", "-aet", "STORER", "-aec", "IMAGESHARE",
                                       "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
                                       "127.0.0.1", port)
    # dcmtk's C-FIND status table predates 0x0124 in PS3.4: it prints "Unknown Status: 0x124".
    assert "Final Find Response" in find.stderr and "0x124" in find.stderr, find.stderr


def _spki_sha256(cert: Any) -> bytes:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


@pytest_twisted.ensureDeferred
async def test_certificate_pin(start_server, tmp_path: Path) -> None:
    """A pinned AE title associates only with the certificate whose SPKI SHA-256 is pinned,
    even when another certificate from the same trusted CA is presented; other AE titles
    are not pinned."""
    import base64

    ca = make_cert(tmp_path, "ca", ca=True)
    make_cert(tmp_path, "server", issuer=ca)
    good, _ = make_cert(tmp_path, "good", issuer=ca)
    make_cert(tmp_path, "other", issuer=ca)
    second, _ = make_cert(tmp_path, "second", issuer=ca)
    server = await start_server(
        dicom={"listen": f"ssl:0:interface=127.0.0.1:privateKey={tmp_path}/server.key:"
                         f"certKey={tmp_path}/server.crt:caCerts={tmp_path}/ca.crt"},
        dicom_peers={"PINNED": f"sha256:{_spki_sha256(good).hex()}",
                     "ROTATING": f"sha256:{_spki_sha256(good).hex()}, "
                                 f"sha256:{base64.b64encode(_spki_sha256(second)).decode()}"},
    )
    refusals: list[Any] = []
    server.service.dicom_access.on_refused.append(refusals.append)

    def tls(name: str) -> tuple[ssl.SSLContext, str]:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tmp_path / "ca.crt"))
        ctx.load_cert_chain(str(tmp_path / f"{name}.crt"), str(tmp_path / f"{name}.key"))
        return ctx, "localhost"

    def echo(aet: str, cert: str) -> str:
        assoc = _associate(server.dicom_port, aet, tls=tls(cert))
        if not assoc.is_established:
            return "rejected" if assoc.is_rejected else "failed"
        status = assoc.send_c_echo()
        assoc.release()
        return f"{int(status.Status):#06x}"

    assert await threads.deferToThread(echo, "PINNED", "good") == "0x0000"
    assert await threads.deferToThread(echo, "PINNED", "other") == "rejected"
    assert await threads.deferToThread(echo, "ROTATING", "second") == "0x0000"
    assert await threads.deferToThread(echo, "ROTATING", "other") == "rejected"
    assert await threads.deferToThread(echo, "ANYONE", "other") == "0x0000"
    assert [(r.calling_aet, r.reason) for r in refusals] == [
        ("PINNED", "client certificate does not match the pin of this AE title"),
        ("ROTATING", "client certificate does not match the pin of this AE title"),
    ]


def _variant(src: Path, dst: Path, **changes: str) -> Path:
    from pydicom import dcmread

    ds = dcmread(src)
    for name, value in changes.items():
        setattr(ds, name, value)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def _row(server: Any, uid: str) -> tuple[Any, ...]:
    import sqlite3

    with sqlite3.connect(server.data_dir / "catalog.sqlite3") as db:
        return db.execute(  # type: ignore[no-any-return]
            "SELECT i.generation, i.source_aet, p.patient_id, p.patient_name FROM instances i"
            " JOIN studies s ON s.study_instance_uid = i.study_instance_uid"
            " JOIN patients p ON p.pk = s.patient_pk WHERE i.sop_instance_uid=?", (uid,)).fetchone()


@pytest_twisted.ensureDeferred
async def test_replace_same_source(start_server, tmp_path: Path) -> None:
    """By default only the AE that stored an instance may replace it: another AE gets 0x0124
    and nothing changes, nor may it move the study to another patient with a new instance;
    the first sender's change of Patient ID is stored, logged at warning level without the
    values, reported to on_identity_change and audited (110110 Patient Record, U, naming the
    patient the instance belongs to now)."""
    from pydicom import dcmread

    from imageshare.audit.syslog import split_message
    from tests.audit.schema import assert_valid

    server = await start_server()
    changes: list[Any] = []
    audited = server.service.ingestor.on_identity_change
    server.service.ingestor.on_identity_change = lambda change: (changes.append(change), audited(change))
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    first, second = make_instances(tmp_path / "in", 2, seed="replace")
    uid = str(dcmread(first, stop_before_pixels=True).SOPInstanceUID)
    port = server.dicom_port
    forged = _variant(first, tmp_path / "forged.dcm", PatientName="Forged^Name", PatientID="OTHER-ID")
    try:
        assert await threads.deferToThread(scu_store, port, [first], ae_title="SENDER_A") == [0]
        before = _row(server, uid)
        assert await threads.deferToThread(scu_store, port, [forged], ae_title="SENDER_B") == [NOT_AUTHORIZED]
        assert _row(server, uid) == before
        moved = _variant(second, tmp_path / "moved.dcm", PatientID="OTHER-ID")
        assert await threads.deferToThread(scu_store, port, [moved], ae_title="SENDER_B") == [NOT_AUTHORIZED]
        assert _row(server, uid) == before
        assert await threads.deferToThread(scu_store, port, [forged], ae_title="SENDER_A") == [0]
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert _row(server, uid)[:3] == (2, "SENDER_A", "OTHER-ID")
    assert [(c.sop_instance_uid, c.calling_aet, c.changes) for c in changes] == [
        (uid, "SENDER_A", ("instance patient identity", "study moved to another patient"))]
    warned = [e for e in events if "patient identity changed" in str(e.get("log_format", ""))]
    assert len(warned) == 1
    text = repr(warned[0])
    assert "OTHER-ID" not in text and "Forged" not in text and dcmread(first).PatientID not in text

    def patient_records() -> list[Any]:
        lines = (server.data_dir / "audit.log").read_bytes().split(b"\n")
        messages = [assert_valid(split_message(line)[1]) for line in lines if line]
        return [m for m in messages if m.find("EventIdentification/EventID").get("csd-code") == "110110"]

    for _ in range(100):  # the trail writes on its own thread
        if patient_records():
            break
        await threads.deferToThread(time.sleep, 0.05)
    (record,) = patient_records()
    assert record.find("EventIdentification").get("EventActionCode") == "U"
    assert [o.get("ParticipantObjectID") for o in record.iter("ParticipantObjectIdentification")
            if o.get("ParticipantObjectTypeCodeRole") == "1"] == ["OTHER-ID"]


@pytest_twisted.ensureDeferred
async def test_replace_never_and_any(start_server, tmp_path: Path) -> None:
    """replace = never refuses any re-send (0x0124), even from the first sender; replace = any
    lets another AE replace it."""
    from pydicom import dcmread

    (first,) = make_instances(tmp_path / "in", 1, seed="never")
    uid = str(dcmread(first, stop_before_pixels=True).SOPInstanceUID)
    never = await start_server(dicom={"replace": "never"})
    assert await threads.deferToThread(scu_store, never.dicom_port, [first], ae_title="A") == [0]
    assert await threads.deferToThread(scu_store, never.dicom_port, [first], ae_title="A") == [NOT_AUTHORIZED]
    assert _row(never, uid)[0] == 1
    await never.service.stopService()
    anyone = await start_server(dicom={"replace": "any"}, storage={"data_dir": str(tmp_path / "any")})
    assert await threads.deferToThread(scu_store, anyone.dicom_port, [first], ae_title="A") == [0]
    assert await threads.deferToThread(scu_store, anyone.dicom_port, [first], ae_title="B") == [0]
    assert _row(anyone, uid)[:2] == (2, "A")


@pytest_twisted.ensureDeferred
async def test_move_destination_pin(start_server, tmp_path: Path) -> None:
    """A C-MOVE destination with a pin in [dicom_peers] gets the instances only if its
    certificate's SPKI SHA-256 matches: another certificate from the trusted CA is aborted
    before anything is sent (0xA801)."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    from tests.integration.test_qr import StoreSCP

    ca = make_cert(tmp_path, "ca", ca=True)
    make_cert(tmp_path, "server", issuer=ca)
    make_cert(tmp_path, "client", issuer=ca)
    dest_cert, _ = make_cert(tmp_path, "dest", issuer=ca)
    imposter_cert, _ = make_cert(tmp_path, "imposter", issuer=ca)
    scps = {}
    for name in ("dest", "imposter"):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.crt"))
        ctx.load_cert_chain(str(tmp_path / f"{name}.crt"), str(tmp_path / f"{name}.key"))
        scps[name] = StoreSCP("PINNEDDEST", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], ctx)
    pin = f"sha256:{_spki_sha256(dest_cert).hex()}"
    try:
        server = await start_server(
            dicom={"listen": f"ssl:0:interface=127.0.0.1:privateKey={tmp_path}/server.key:"
                             f"certKey={tmp_path}/server.crt:caCerts={tmp_path}/ca.crt"},
            dicom_destinations={"PINNEDDEST": f"127.0.0.1:{scps['dest'].port}:tls",
                                "IMPOSTER": f"127.0.0.1:{scps['imposter'].port}:tls"},
            dicom_peers={"PINNEDDEST": pin, "IMPOSTER": pin},
        )
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tmp_path / "ca.crt"))
        client.load_cert_chain(str(tmp_path / "client.crt"), str(tmp_path / "client.key"))
        (path,) = make_instances(tmp_path / "in", 1, seed="pin")
        ds = dcmread(path)

        def store_and_move(destination: str) -> list[int]:
            ae = AE(ae_title="MOVER")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="IMAGESHARE", tls_args=(client, "localhost"))
            assert assoc.is_established
            try:
                assert int(assoc.send_c_store(ds).Status) == 0
                return [int(s.Status) for s, _ in assoc.send_c_move(
                    _study(str(ds.StudyInstanceUID)), destination, StudyRootQueryRetrieveInformationModelMove)]
            finally:
                assoc.release()

        assert (await threads.deferToThread(store_and_move, "IMPOSTER"))[-1] == 0xA801
        assert scps["imposter"].received == []
        assert await threads.deferToThread(store_and_move, "PINNEDDEST") == [0xFF00, 0x0000]
        assert [d.SOPInstanceUID for _, d in scps["dest"].received] == [ds.SOPInstanceUID]
    finally:
        for scp in scps.values():
            scp.stop()


@pytest_twisted.ensureDeferred
async def test_replace_same_source_over_tls(start_server, tmp_path: Path) -> None:
    """Over TLS the source is the calling AE and its certificate: the same AE title with
    another certificate (from the trusted CA) may not replace the instance."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian

    ca = make_cert(tmp_path, "ca", ca=True)
    for name in ("server", "first", "second"):
        make_cert(tmp_path, name, issuer=ca)
    server = await start_server(
        dicom={"listen": f"ssl:0:interface=127.0.0.1:privateKey={tmp_path}/server.key:"
                         f"certKey={tmp_path}/server.crt:caCerts={tmp_path}/ca.crt"})
    (path,) = make_instances(tmp_path / "in", 1, seed="tls-source")
    ds = dcmread(path)

    def store(cert: str) -> int:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tmp_path / "ca.crt"))
        ctx.load_cert_chain(str(tmp_path / f"{cert}.crt"), str(tmp_path / f"{cert}.key"))
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="IMAGESHARE", tls_args=(ctx, "localhost"))
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(ds).Status)
        finally:
            assoc.release()

    assert await threads.deferToThread(store, "first") == 0
    assert await threads.deferToThread(store, "second") == NOT_AUTHORIZED
    assert await threads.deferToThread(store, "first") == 0
    assert _row(server, str(ds.SOPInstanceUID))[:2] == (2, "MODALITY")
