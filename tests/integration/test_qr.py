"""DICOM Query/Retrieve against the running server: dcmtk findscu/getscu/movescu, pynetdicom
SCUs and storage SCPs, and JPIP Referenced (.94) headers whose URL streams the exact pixels."""

from __future__ import annotations

import shutil
import ssl
import sys
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import pytest_twisted
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_role, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from twisted.internet import threads

from imageshare.dicom.derived import JPIP_REFERENCED
from imageshare.jpip_cli import JpipClient
from tests.helpers import make_instances, sample_file, scu_store
from tests.integration.conftest import run_with_deadline

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("findscu") is None, reason="dcmtk is not installed"),
]

AET = "IMAGESHARE"
_JPIP_SYNTAXES = {"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.204",
                  "1.2.840.10008.1.2.4.205"}


class StoreSCP:
    """A pynetdicom storage SCP on 127.0.0.1, port 0: a C-MOVE destination that keeps what it gets."""

    def __init__(self, ae_title: str, syntaxes: list[str], ssl_context: ssl.SSLContext | None = None) -> None:
        self.received: list[tuple[str, Dataset]] = []
        self.ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, syntaxes)
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, ssl_context=ssl_context,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port: int = self.server.server_address[1]

    def _store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append((str(event.context.transfer_syntax), ds))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()


@pytest.fixture
def destinations() -> Iterator[dict[str, StoreSCP]]:
    """Two C-MOVE destinations: PLAIN takes every real-pixel syntax, JPIPDEST takes .94 too."""
    plain = StoreSCP("PLAIN", [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _JPIP_SYNTAXES])
    jpip = StoreSCP("JPIPDEST", [JPIP_REFERENCED, ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    yield {"PLAIN": plain, "JPIPDEST": jpip}
    plain.stop()
    jpip.stop()


@pytest_twisted.async_fixture
async def qr(start_server, destinations: dict[str, StoreSCP], tmp_path: Path, monkeypatch) -> dict[str, Any]:
    """A running server holding a 3-instance CT study, an MR, a JPEG 2000 SC and an RT plan,
    transcoded, with the two destinations configured (JPIPDEST with ``:jpip``)."""
    # Other tests switch this process-wide flag on; the files must be sent decoded here.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", False)
    server = await start_server(dicom_destinations={
        "PLAIN": f"127.0.0.1:{destinations['PLAIN'].port}",
        "JPIPDEST": f"127.0.0.1:{destinations['JPIPDEST'].port}:jpip",  # configured to want .94
    })
    ct = make_instances(tmp_path / "ct", 3, seed="qr")
    others = [sample_file(n) for n in ("MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm")]
    statuses = await threads.deferToThread(scu_store, server.dicom_port, ct + others)
    assert statuses == [0] * 6
    await server.service.transcoder.when_idle()
    first = dcmread(ct[0], stop_before_pixels=True)
    return {"server": server, "ct": ct, "ct_study": str(first.StudyInstanceUID),
            "ct_series": str(first.SeriesInstanceUID), "others": others, "tmp": tmp_path}


# -- dcmtk ----------------------------------------------------------------------------------


def findscu(port: int, model: str, keys: list[str], out: Path) -> tuple[list[Dataset], str]:
    """Run findscu -P/-S with -X; return the responses (from the extracted files) and its log."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = ["findscu", "-v", model, "-aet", "FINDSCU", "-aec", AET, "-X", "-od", str(out), "127.0.0.1", str(port)]
    for k in keys:
        args += ["-k", k]
    result = run_with_deadline(args, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))], result.stdout + result.stderr


@pytest_twisted.ensureDeferred
async def test_findscu_patient_and_study_root(qr: dict[str, Any]) -> None:
    """findscu (-P and -S) at every level, with wildcard, list, range and single-value keys."""
    server, out = qr["server"], qr["tmp"] / "find"

    async def run(model: str, *keys: str) -> list[Dataset]:
        responses, _ = await threads.deferToThread(findscu, server.dicom_port, model, list(keys), out)
        return responses

    patients = await run("-P", "QueryRetrieveLevel=PATIENT", "PatientName=compressed*", "PatientID",
                         "NumberOfPatientRelatedStudies")
    assert sorted(str(d.PatientID) for d in patients) == ["1CT1", "4MR1", "8NM1"]
    assert all(d.RetrieveAETitle == AET and d.QueryRetrieveLevel == "PATIENT" for d in patients)
    assert all(int(d.NumberOfPatientRelatedStudies) == 1 for d in patients)

    studies = await run("-P", "QueryRetrieveLevel=STUDY", "PatientID=1CT1", "StudyInstanceUID", "StudyDate",
                        "ModalitiesInStudy", "NumberOfStudyRelatedInstances")
    assert [(d.StudyInstanceUID, d.ModalitiesInStudy, int(d.NumberOfStudyRelatedInstances)) for d in studies] == [
        (qr["ct_study"], "CT", 3)]

    in_range = await run("-S", "QueryRetrieveLevel=STUDY", "StudyDate=20040801-20041231", "ModalitiesInStudy=MR\\NM",
                         "PatientID", "StudyInstanceUID")
    assert sorted(str(d.PatientID) for d in in_range) == ["4MR1", "8NM1"]
    assert await run("-S", "QueryRetrieveLevel=STUDY", "StudyDate=-20031231", "StudyInstanceUID") != []  # RT plan
    assert await run("-S", "QueryRetrieveLevel=STUDY", "StudyDate=20300101-", "StudyInstanceUID") == []

    series = await run("-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={qr['ct_study']}", "SeriesInstanceUID",
                       "Modality", "NumberOfSeriesRelatedInstances")
    assert [(d.SeriesInstanceUID, d.Modality, int(d.NumberOfSeriesRelatedInstances)) for d in series] == [
        (qr["ct_series"], "CT", 3)]

    wanted = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in qr["ct"][1:]]
    images = await run("-S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={qr['ct_study']}",
                       f"SeriesInstanceUID={qr['ct_series']}", "SOPInstanceUID=" + "\\".join(wanted + ["1.2.3"]),
                       "InstanceNumber", "Rows", "Columns", "SOPClassUID")
    assert [(d.SOPInstanceUID, int(d.InstanceNumber), d.Rows, d.Columns) for d in images] == [
        (wanted[0], 2, 128, 128), (wanted[1], 3, 128, 128)]
    assert all(d.SOPClassUID == CTImageStorage for d in images)

    _, log = await threads.deferToThread(findscu, server.dicom_port, "-S",
                                         ["QueryRetrieveLevel=PATIENT", "PatientID"], out)
    assert "Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in log, log  # Study Root: no PATIENT level


def find_negotiated(port: int, model: str, identifier: Dataset,
                    relational: bool) -> tuple[bytes | None, list[tuple[int, Dataset | None]]]:
    """C-FIND from a pynetdicom SCU, asking for relational queries (SOP Class Extended
    Negotiation, Service Class Application Information byte 1 = 1) or not; returns what the
    server answered for that item and the responses."""
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(model)
    ext_neg = []
    if relational:
        item = SOPClassExtendedNegotiation()
        item.sop_class_uid = model
        item.service_class_application_information = b"\x01\x00\x00"  # relational, no dt/fuzzy matching
        ext_neg.append(item)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET, ext_neg=ext_neg)
    assert assoc.is_established
    try:
        answered = assoc.acceptor.sop_class_extended.get(model)
        return answered, [(int(s.Status), i) for s, i in assoc.send_c_find(identifier, model)]
    finally:
        assoc.release()


@pytest_twisted.ensureDeferred
async def test_relational_find(qr: dict[str, Any]) -> None:
    """C-FIND at IMAGE and SERIES level without the unique keys of the levels above is
    answered when the SCU negotiated relational queries for its FIND SOP class (a pynetdicom
    SCU, and pynetdicom's findscu with --relational-query), and refused with 0xA900 when it
    did not (the same SCU without the item, and dcmtk's findscu, which has no option for
    it: PS3.4 C.4.1.2.2 hierarchical rules)."""
    port = qr["server"].dicom_port
    ct_uids = sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in qr["ct"])
    images = Dataset()
    images.QueryRetrieveLevel = "IMAGE"
    images.Modality = "CT"  # a SERIES key, matched at IMAGE level
    images.StudyInstanceUID = images.SeriesInstanceUID = images.SOPInstanceUID = ""
    mr = dcmread(sample_file("MR_small.dcm"), stop_before_pixels=True)
    series = Dataset()
    series.QueryRetrieveLevel = "SERIES"
    series.PatientID = ""  # Patient Root: no PatientID, no StudyInstanceUID given
    series.Modality = "MR"
    series.SeriesInstanceUID = ""

    for model, identifier in [(StudyRootQueryRetrieveInformationModelFind, images),
                              (PatientRootQueryRetrieveInformationModelFind, series)]:
        answered, responses = await threads.deferToThread(find_negotiated, port, model, identifier, True)
        assert answered is not None and answered[:1] == b"\x01"
        assert responses[-1] == (0x0000, None) and {s for s, _ in responses[:-1]} == {0xFF00}
        found = [i for _, i in responses[:-1]]
        if identifier is images:
            assert sorted(str(d.SOPInstanceUID) for d in found) == ct_uids
            assert {(d.StudyInstanceUID, d.SeriesInstanceUID) for d in found} == {(qr["ct_study"], qr["ct_series"])}
        else:
            assert [(d.SeriesInstanceUID, d.PatientID) for d in found] == [(mr.SeriesInstanceUID, mr.PatientID)]

        answered, responses = await threads.deferToThread(find_negotiated, port, model, identifier, False)
        assert answered is None and [s for s, _ in responses] == [0xA900]

    # pynetdicom's findscu application, in its own process, with --relational-query.
    out = qr["tmp"] / "relational"
    out.mkdir()
    result = await threads.deferToThread(run_with_deadline, [
        sys.executable, "-m", "pynetdicom", "findscu", "-S", "--relational-query", "-w", "-aet", "FINDSCU",
        "-aec", AET, "127.0.0.1", str(port), "-k", "QueryRetrieveLevel=IMAGE", "-k", "Modality=CT",
        "-k", "SOPInstanceUID="], 60, cwd=out)
    assert result.returncode == 0, result.stderr
    assert sorted(str(dcmread(p).SOPInstanceUID) for p in out.glob("rsp*.dcm")) == ct_uids, result.stderr

    # dcmtk's findscu cannot negotiate it: the hierarchical rules apply.
    responses, log = await threads.deferToThread(findscu, port, "-S", [
        "QueryRetrieveLevel=IMAGE", "Modality=CT", "SOPInstanceUID"], qr["tmp"] / "find")
    assert responses == [] and "Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in log, log


@pytest_twisted.ensureDeferred
async def test_getscu_study(qr: dict[str, Any]) -> None:
    """getscu -S at STUDY level: every instance arrives in -od, equal to what was stored."""
    server, out = qr["server"], qr["tmp"] / "get"
    out.mkdir()
    result = await threads.deferToThread(run_with_deadline, [
        "getscu", "-S", "-aet", "GETSCU", "-aec", AET, "-od", str(out), "127.0.0.1", str(server.dicom_port),
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={qr['ct_study']}"])
    assert result.returncode == 0, result.stderr + result.stdout
    received = {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in out.iterdir())}
    assert len(received) == 3, result.stdout + result.stderr
    for path in qr["ct"]:
        sent = dcmread(path)
        got = received[str(sent.SOPInstanceUID)]
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert got == sent  # every data element, pixel data included


def movescu(port: int, destination: str, keys: list[str], model: str = "-S") -> str:
    args = ["movescu", "-v", model, "-aet", "MOVESCU", "-aem", destination, "-aec", AET, "127.0.0.1", str(port)]
    for k in keys:
        args += ["-k", k]
    result = run_with_deadline(args, timeout=120)
    return result.stdout + result.stderr


@pytest_twisted.ensureDeferred
async def test_movescu_to_configured_destination(qr: dict[str, Any], destinations: dict[str, StoreSCP]) -> None:
    """movescu to a destination from [dicom_destinations]: the study's instances arrive as
    stored (originals, compressed ones untouched); an unknown destination gets 0xA801."""
    server, plain = qr["server"], destinations["PLAIN"]
    log = await threads.deferToThread(movescu, server.dicom_port, "PLAIN",
                                      ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={qr['ct_study']}"])
    assert len(plain.received) == 3, log
    for path in qr["ct"]:
        sent = dcmread(path)
        ts, got = next(r for r in plain.received if r[1].SOPInstanceUID == sent.SOPInstanceUID)
        assert ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)  # the destination's choice
        assert got.PixelData == sent.PixelData
    j2k = dcmread(sample_file("JPEG2000.dcm"))
    await threads.deferToThread(movescu, server.dicom_port, "PLAIN",
                                ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={j2k.StudyInstanceUID}"])
    ts, got = plain.received[-1]
    assert ts == j2k.file_meta.TransferSyntaxUID and got.PixelData == j2k.PixelData  # not re-encoded

    # Patient Root, PATIENT level: everything of that patient.
    await threads.deferToThread(movescu, server.dicom_port, "PLAIN",
                                ["QueryRetrieveLevel=PATIENT", "PatientID=4MR1"], "-P")
    assert plain.received[-1][1].SOPInstanceUID == dcmread(sample_file("MR_small.dcm")).SOPInstanceUID
    assert len(plain.received) == 5

    log = await threads.deferToThread(movescu, server.dicom_port, "NOWHERE",
                                      ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={qr['ct_study']}"])
    assert "Final Move Response (Refused: MoveDestinationUnknown)" in log, log  # dcmtk's name for 0xA801


# -- pynetdicom SCUs --------------------------------------------------------------------------


def study_identifier(study_uid: str, level: str = "STUDY") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID = study_uid
    return ds


def associate(port: int, *contexts: Any, roles: list[Any] | None = None, handlers: Any = None) -> Any:
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cx in contexts:
        if isinstance(cx, tuple):
            ae.add_requested_context(*cx)
        else:
            ae.add_requested_context(cx)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET, ext_neg=roles or [], evt_handlers=handlers or [])
    assert assoc.is_established
    return assoc


def c_get(port: int, identifier: Dataset, storage: list[tuple[str, list[str]]],
          cancel_at: int | None = None) -> tuple[list[tuple[int, Dataset | None]], list[tuple[str, Dataset]]]:
    """C-GET with SCP-role storage contexts; optionally send C-CANCEL while storing instance n."""
    received: list[tuple[str, Dataset]] = []
    holder: dict[str, Any] = {}

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append((str(event.context.transfer_syntax), ds))
        if cancel_at is not None and len(received) == cancel_at:
            assoc = holder["assoc"]
            cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == StudyRootQueryRetrieveInformationModelGet)
            assoc.send_c_cancel(1, cx.context_id)
        return 0x0000

    assoc = associate(port, StudyRootQueryRetrieveInformationModelGet, *storage,
                      roles=[build_role(sop_class, scp_role=True) for sop_class, _ in storage],
                      handlers=[(evt.EVT_C_STORE, on_store)])
    holder["assoc"] = assoc
    try:
        responses = [(int(s.Status), i) for s, i in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet,
                                                                        msg_id=1)]
    finally:
        assoc.release()
    return responses, received


def jpip_pixels(header: Dataset, server_url: str, public_url: str) -> np.ndarray:
    """Fetch the full-resolution frame the header's Pixel Data Provider URL points at."""
    url = str(header[0x00287FE0].value)
    assert url.startswith(f"{public_url}/jpip?target=")
    parts = urllib.parse.urlsplit(url)
    client = JpipClient(f"{server_url}{parts.path}?{parts.query}", timeout=30)
    client.fetch(fsiz=f"{header.Columns},{header.Rows}")
    return client.view()[0]


@pytest_twisted.ensureDeferred
async def test_get_jpip_referenced_only(qr: dict[str, Any]) -> None:
    """A C-GET SCU accepting only .94 for CT receives headers without Pixel Data whose URL
    streams exactly the source pixels; instances of classes it did not offer fail."""
    server = qr["server"]
    responses, received = await threads.deferToThread(
        c_get, server.dicom_port, study_identifier(qr["ct_study"]), [(CTImageStorage, [JPIP_REFERENCED])])
    assert len(received) == 3 and responses[-1][0] == 0x0000
    public_url = server.service.config.http.public_url
    for ts, header in received:
        assert ts == JPIP_REFERENCED and "PixelData" not in header
        source = dcmread(next(p for p in qr["ct"] if dcmread(p).SOPInstanceUID == header.SOPInstanceUID))
        assert (header.Rows, header.Columns, header.BitsStored) == (source.Rows, source.Columns, source.BitsStored)
        pixels = await threads.deferToThread(jpip_pixels, header, server.url, public_url)
        assert np.array_equal(pixels, source.pixel_array)

    # The MR study, asked for without any MR storage context: the sub-operation fails, listed.
    mr = dcmread(sample_file("MR_small.dcm"), stop_before_pixels=True)
    responses, received = await threads.deferToThread(
        c_get, server.dicom_port, study_identifier(str(mr.StudyInstanceUID)), [(CTImageStorage, [JPIP_REFERENCED])])
    status, final = responses[-1]
    assert received == [] and status == 0xA702
    assert str(final.FailedSOPInstanceUIDList) == str(mr.SOPInstanceUID)


@pytest_twisted.ensureDeferred
async def test_move_to_jpip_destination(qr: dict[str, Any], destinations: dict[str, StoreSCP]) -> None:
    """C-MOVE to a destination that accepts .94: streamable images arrive as JPIP headers,
    the RT plan (not an image) as its original; counts in the final response are right."""
    server, dest = qr["server"], destinations["JPIPDEST"]

    def move(identifier: Dataset, destination: str = "JPIPDEST") -> list[tuple[int, Dataset | None]]:
        assoc = associate(server.dicom_port, StudyRootQueryRetrieveInformationModelMove)
        try:
            return [(int(s.Status), i) for s, i in assoc.send_c_move(identifier, destination,
                                                                     StudyRootQueryRetrieveInformationModelMove)]
        finally:
            assoc.release()

    unknown = await threads.deferToThread(move, study_identifier(qr["ct_study"]), "jpipdest")  # AE titles keep case
    assert [s for s, _ in unknown] == [0xA801] and dest.received == []

    responses = await threads.deferToThread(move, study_identifier(qr["ct_study"]))
    assert [s for s, _ in responses] == [0xFF00, 0xFF00, 0xFF00, 0x0000]
    assert [ts for ts, _ in dest.received] == [JPIP_REFERENCED] * 3
    header = dest.received[0][1]
    source = dcmread(qr["ct"][0])
    pixels = await threads.deferToThread(jpip_pixels, header, server.url, server.service.config.http.public_url)
    assert np.array_equal(pixels, source.pixel_array)

    plan = dcmread(sample_file("rtplan.dcm"))
    await threads.deferToThread(move, study_identifier(str(plan.StudyInstanceUID)))
    ts, got = dest.received[-1]
    assert ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) and got.SOPInstanceUID == plan.SOPInstanceUID


@pytest_twisted.ensureDeferred
async def test_bad_requests_fail_cleanly(qr: dict[str, Any]) -> None:
    """Malformed identifiers, an unsupported SOP class and a cancelled C-GET end with the
    standard statuses, no patient name or ID is logged, and the server keeps answering."""
    from twisted.logger import formatEvent, globalLogPublisher

    server = qr["server"]
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        await _bad_requests(qr)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any(e.get("log_namespace") == "imageshare.dicom" for e in events)
    for event in events:
        text = formatEvent(event) + repr({k: v for k, v in event.items() if not k.startswith("log_")})
        assert "CompressedSamples" not in text and "1CT1" not in text, text

    def echo() -> int:
        assoc = associate(server.dicom_port, Verification)
        status = int(assoc.send_c_echo().Status)
        assoc.release()
        return status

    assert await threads.deferToThread(echo) == 0


async def _bad_requests(qr: dict[str, Any]) -> None:
    port = qr["server"].dicom_port

    def find(model: str, identifier: Dataset) -> list[tuple[int, str]]:
        assoc = associate(port, model)
        try:
            return [(int(s.Status), str(s.get("ErrorComment", ""))) for s, _ in assoc.send_c_find(identifier, model)]
        finally:
            assoc.release()

    wrong_level = Dataset()
    wrong_level.QueryRetrieveLevel = "FRAME"
    wrong_level.PatientName = "CompressedSamples*"
    missing_key = Dataset()
    missing_key.QueryRetrieveLevel = "SERIES"
    missing_key.SeriesInstanceUID = ""
    no_patient_id = study_identifier("")
    bad_date = study_identifier("")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # meant to be invalid
        bad_date.StudyDate = "yesterday"
    for model, identifier, status in [
        (StudyRootQueryRetrieveInformationModelFind, wrong_level, 0xA900),
        (StudyRootQueryRetrieveInformationModelFind, missing_key, 0xA900),
        (PatientRootQueryRetrieveInformationModelFind, no_patient_id, 0xA900),
        (StudyRootQueryRetrieveInformationModelFind, bad_date, 0xC000),
    ]:
        responses = await threads.deferToThread(find, model, identifier)
        assert len(responses) == 1 and responses[0][0] == status and responses[0][1], responses

    # C-GET with a missing unique key: refused before any sub-operation.
    responses, received = await threads.deferToThread(
        c_get, port, study_identifier("", level="SERIES"), [(CTImageStorage, [ExplicitVRLittleEndian])])
    assert received == [] and responses[-1][0] == 0xA900

    # An information model we do not serve: its context is rejected, nothing else breaks.
    def worklist() -> bool:
        assoc = associate(port, Verification, ModalityWorklistInformationFind)
        try:
            return any(cx.abstract_syntax == ModalityWorklistInformationFind for cx in assoc.accepted_contexts)
        finally:
            assoc.release()

    assert not await threads.deferToThread(worklist)

    # JPIP Referenced is never accepted for C-STOREs to us, and refused if a peer that also
    # took the SCP role (and so had .94 accepted) sends such a header anyway.
    header = dcmread(sample_file("CT_small.dcm"))
    del header.PixelData
    header.SOPInstanceUID = "1.2.826.0.1.3680043.10.1489.777"
    header.add_new(0x00287FE0, "UR", "http://example.org/jpip?target=x")
    header.file_meta.TransferSyntaxUID = JPIP_REFERENCED

    def store_header(roles: list[Any]) -> int | None:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(CTImageStorage, [JPIP_REFERENCED])
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title=AET, ext_neg=roles)
        try:
            if not any(cx.abstract_syntax == CTImageStorage for cx in assoc.accepted_contexts):
                return None
            return int(assoc.send_c_store(header).Status)
        finally:
            assoc.release()

    assert await threads.deferToThread(store_header, []) is None
    both = build_role(CTImageStorage, scu_role=True, scp_role=True)
    assert await threads.deferToThread(store_header, [both]) == 0xC000
    assert qr["server"].service.catalog.get_instance(header.SOPInstanceUID) is None

    # C-CANCEL while the second of three instances is being stored: the C-GET stops there.
    responses, received = await threads.deferToThread(
        c_get, port, study_identifier(qr["ct_study"]), [(CTImageStorage, [ExplicitVRLittleEndian])], 2)
    status, final = responses[-1]
    assert status == 0xFE00 and len(received) == 2


@pytest_twisted.ensureDeferred
async def test_move_to_tls_destination(start_server, tmp_path: Path) -> None:
    """A ``host:port:tls`` destination is reached over TLS: the server checks the
    destination's certificate against the listener's CA and presents its own certificate."""
    from tests.integration.test_tls import make_cert

    ca = make_cert(tmp_path, "ca", ca=True)
    for name in ("server", "dest", "client"):
        make_cert(tmp_path, name, issuer=ca)
    dest_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.crt"))
    dest_tls.load_cert_chain(str(tmp_path / "dest.crt"), str(tmp_path / "dest.key"))
    dest_tls.verify_mode = ssl.CERT_REQUIRED  # only the server's certificate gets in
    dest = StoreSCP("TLSDEST", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], dest_tls)
    try:
        server = await start_server(
            dicom={"listen": f"ssl:0:interface=127.0.0.1:privateKey={tmp_path}/server.key:"
                             f"certKey={tmp_path}/server.crt:caCerts={tmp_path}/ca.crt"},
            dicom_destinations={"TLSDEST": f"127.0.0.1:{dest.port}:tls"},
        )
        client_tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tmp_path / "ca.crt"))
        client_tls.load_cert_chain(str(tmp_path / "client.crt"), str(tmp_path / "client.key"))
        ct = dcmread(sample_file("CT_small.dcm"))

        def store_and_move() -> list[int]:
            ae = AE(ae_title="TLSSCU")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=AET, tls_args=(client_tls, "localhost"))
            assert assoc.is_established
            try:
                assert int(assoc.send_c_store(ct).Status) == 0
                return [int(s.Status) for s, _ in assoc.send_c_move(
                    study_identifier(str(ct.StudyInstanceUID)), "TLSDEST", StudyRootQueryRetrieveInformationModelMove)]
            finally:
                assoc.release()

        assert await threads.deferToThread(store_and_move) == [0xFF00, 0x0000]
        assert [ds.SOPInstanceUID for _, ds in dest.received] == [ct.SOPInstanceUID]
    finally:
        dest.stop()
