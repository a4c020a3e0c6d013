"""C-MOVE to real destinations: Orthanc retrieving a study from us into itself, storage SCPs
that do or do not take JPIP Referenced headers, and one that aborts mid-retrieve.

Orthanc (Debian package ``orthanc``) accepts the JPIP Referenced syntaxes in negotiation and
aborts the association when such an object arrives, so it must get originals; only a
destination configured with ``:jpip`` gets headers.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import pytest_twisted
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelMove,
)
from twisted.internet import threads

from imageshare.dicom.derived import JPIP_REFERENCED
from imageshare.store import query
from tests.helpers import make_instances, scu_store
from tests.integration.test_qr import StoreSCP, associate, c_get, jpip_pixels, study_identifier

pytestmark = pytest.mark.integration

ORTHANC = shutil.which("Orthanc", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))  # Debian: sbin
needs_orthanc = pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (Debian package orthanc)")
ORTHANC_AET = "ORTHANC"


def free_port() -> int:
    """A port free on loopback now (Orthanc refuses port 0); it may be taken before use."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PortTaken(Exception):
    """Orthanc could not bind one of its ports."""


class Orthanc:
    """An Orthanc process with its own configuration and storage in ``folder``."""

    def __init__(self, folder: Path, *, peer_aet: str, peer_port: int, dicom_port: int, http_port: int) -> None:
        self.folder = folder
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.log_path = folder / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "imageshare-test",
            "DicomAet": ORTHANC_AET,
            "DicomPort": dicom_port,
            "HttpPort": http_port,
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            # Orthanc binds every interface: take stores and echoes from the modality named
            # here, at its address, only.
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {"imageshare": [peer_aet, "127.0.0.1", peer_port]},
            # AcceptedTransferSyntaxes left at its default (1.2.840.10008.1.*: .94 included).
        }
        self.config_path = folder / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self, timeout: float = 20) -> None:
        """Start and wait for the REST API; :class:`PortTaken` if a port was in use."""
        # Debian's dcmtk (inside Orthanc) waits on delayed ACKs unless told not to.
        env = dict(os.environ, TCP_NODELAY="1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(ORTHANC), str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.folder, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self.log_path.read_text(errors="replace")
                if "already in use" in text:
                    raise PortTaken(text[-500:])
                raise AssertionError(f"Orthanc exited with {self.proc.returncode}:\n{text[-3000:]}")
            try:
                if self.rest("GET", "/system", timeout=2)["DicomPort"] == self.dicom_port:
                    return
            except (OSError, ValueError):
                time.sleep(0.05)
        raise AssertionError(f"Orthanc did not answer within {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def rest(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw[:1] in (b"{", b"[") else raw

    def stop(self) -> None:
        """Kill it: its storage is thrown away with tmp_path, and a clean stop takes 3.5 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture
def orthanc_and_server(start_server, tmp_path: Path) -> Iterator[Any]:
    """``await orthanc_and_server(options)``: our server, with Orthanc as the C-MOVE
    destination ORTHANC (``host:port`` + ``options``), and Orthanc naming our server; each
    Orthanc is stopped (killed if need be) at teardown."""
    started: list[Orthanc] = []

    async def start(options: str = "") -> tuple[Any, Orthanc]:
        for attempt in (1, 2):  # a picked port can be taken before Orthanc binds it: retry once
            dicom_port, http_port = free_port(), free_port()
            server = await start_server(dicom_destinations={ORTHANC_AET: f"127.0.0.1:{dicom_port}{options}"},
                                        manifest={"stable_after": "1"})
            orthanc = Orthanc(tmp_path / f"orthanc{attempt}", peer_aet=server.ae_title, peer_port=server.dicom_port,
                              dicom_port=dicom_port, http_port=http_port)
            started.append(orthanc)
            try:
                await threads.deferToThread(orthanc.start)
                return server, orthanc
            except PortTaken:
                if attempt == 2:
                    raise
                await server.service.stopService()
        raise AssertionError("unreachable")

    try:
        yield start
    finally:
        for orthanc in started:
            orthanc.stop()


async def stored_study(server: Any, folder: Path, seed: str) -> tuple[list[Path], str, dict[str, str]]:
    """Three CT images sent to ``server``, transcoded (streamable), and their study's
    manifest built: (source files, study UID, {SOP Instance UID: state} of the study)."""
    sources = make_instances(folder, 3, seed=seed)
    assert await threads.deferToThread(scu_store, server.dicom_port, sources) == [0, 0, 0]
    await server.service.transcoder.when_idle()  # streamable: .94 would be offered if allowed
    study = str(dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID)
    catalog = server.service.catalog
    manifest = await threads.deferToThread(
        _wait, lambda: next((m[1] for m in catalog.current_manifests() if m[0] == study), None), 15, "manifest")
    await server.service.transcoder.when_idle()

    def states() -> dict[str, str]:
        with catalog.reader() as conn:
            matches = query.resolve(conn, query.STUDY_ROOT, study_identifier(study))
        return {m.sop_instance_uid: m.state.value for m in matches}

    expected = await threads.deferToThread(states)
    assert len(expected) == 4 and expected[manifest] == "not_image", expected
    assert sum(state == "streamable" for state in expected.values()) == 3, expected
    return sources, study, expected


def orthanc_retrieve(orthanc: Orthanc, study: str) -> Any:
    """Orthanc's REST API: C-FIND the study on our server, then C-MOVE it into Orthanc;
    the JSON answer, or the text of an HTTP error."""
    found = orthanc.rest("POST", "/modalities/imageshare/query", {"Level": "Study", "Query": {"StudyInstanceUID": study}})
    answers = orthanc.rest("GET", f"/queries/{found['ID']}/answers")
    assert answers == ["0"], answers
    try:
        return orthanc.rest("POST", f"/queries/{found['ID']}/answers/0/retrieve",
                            {"TargetAet": ORTHANC_AET, "Synchronous": True, "Timeout": 20})
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}: {e.read()[:2000]!r}"


def orthanc_instances(orthanc: Orthanc) -> dict[str, Dataset]:
    """Every instance Orthanc stored, by SOP Instance UID, as its files hold them."""
    out = {}
    for orthanc_id in orthanc.rest("GET", "/instances"):
        ds = dcmread(io.BytesIO(orthanc.rest("GET", f"/instances/{orthanc_id}/file")))
        out[str(ds.SOPInstanceUID)] = ds
    return out


def assert_same_pixels(received: dict[str, Dataset], sources: list[Path]) -> None:
    for path in sources:
        sent = dcmread(path)
        got = received.get(str(sent.SOPInstanceUID))
        if got is not None:
            assert "PixelData" in got and got.file_meta.TransferSyntaxUID != JPIP_REFERENCED
            assert np.array_equal(got.pixel_array, sent.pixel_array)


@needs_orthanc
@pytest_twisted.ensureDeferred
async def test_orthanc_retrieves_a_study_into_itself(orthanc_and_server, tmp_path: Path) -> None:
    """Orthanc, default transfer syntaxes, queries us (C-FIND) and retrieves a transcoded
    study by C-MOVE into itself: every instance arrives, the manifest too, and the pixels
    of each image are identical to the source's (no JPIP header goes to a destination that
    is not configured for it)."""
    server, orthanc = await orthanc_and_server()
    sources, study, expected = await stored_study(server, tmp_path / "ct", "orthanc")
    result = await threads.deferToThread(orthanc_retrieve, orthanc, study)
    received = await threads.deferToThread(orthanc_instances, orthanc)
    assert set(received) == set(expected), (result, orthanc.log_path.read_text()[-3000:])
    assert isinstance(result, dict) and result["RemoteAet"] == server.ae_title, result  # C-MOVE succeeded
    assert_same_pixels(received, sources)
    manifest = next(uid for uid, state in expected.items() if state == "not_image")
    assert received[manifest].SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection


@needs_orthanc
@pytest_twisted.ensureDeferred
async def test_orthanc_configured_for_jpip_by_mistake(orthanc_and_server, tmp_path: Path) -> None:
    """Orthanc wrongly configured with ``:jpip``: it accepts .94, then aborts on the first
    header; we associate again without .94 and the rest of the study arrives as originals,
    pixels intact: exactly one image is missing, the one that was in flight."""
    server, orthanc = await orthanc_and_server(":jpip")
    sources, study, expected = await stored_study(server, tmp_path / "ct", "misconfigured")
    result = await threads.deferToThread(orthanc_retrieve, orthanc, study)
    received = await threads.deferToThread(orthanc_instances, orthanc)
    missing = set(expected) - set(received)
    assert len(missing) == 1 and expected[missing.pop()] == "streamable", (result, sorted(received))
    assert set(received) <= set(expected)
    assert_same_pixels(received, sources)


@pytest.fixture
def jpip_destinations() -> Iterator[dict[str, StoreSCP]]:
    """Two storage SCPs that both accept .94 and every other syntax."""
    every = [str(ts) for ts in ALL_TRANSFER_SYNTAXES] + [JPIP_REFERENCED]
    scps = {name: StoreSCP(name, every) for name in ("ANYTS", "WANTSJPIP")}
    yield scps
    for scp in scps.values():
        scp.stop()


def move(port: int, study: str, destination: str) -> list[tuple[Dataset, Dataset | None]]:
    """A pynetdicom C-MOVE of a study; every response, the final one last."""
    assoc = associate(port, StudyRootQueryRetrieveInformationModelMove)
    try:
        return list(assoc.send_c_move(study_identifier(study), destination, StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()


def counts(final: Dataset) -> tuple[int, int, int, int]:
    """(Status, completed, failed, warning) of a final C-MOVE response."""
    return (int(final.Status), int(final.get("NumberOfCompletedSuboperations", -1)),
            int(final.get("NumberOfFailedSuboperations", -1)), int(final.get("NumberOfWarningSuboperations", -1)))


@pytest_twisted.ensureDeferred
async def test_jpip_headers_only_where_configured(start_server, jpip_destinations: dict[str, StoreSCP],
                                                  tmp_path: Path) -> None:
    """Of two destinations that both accept .94, only the one configured with ``:jpip``
    gets JPIP Referenced headers (whose Pixel Data Provider URL streams exactly the source
    pixels); the other gets the originals. A C-GET SCU gets headers only where it proposes
    .94 in a presentation context of its own."""
    any_ts, wants = jpip_destinations["ANYTS"], jpip_destinations["WANTSJPIP"]
    server = await start_server(dicom_destinations={"ANYTS": f"127.0.0.1:{any_ts.port}",
                                                    "WANTSJPIP": f"127.0.0.1:{wants.port}:jpip"})
    sources = make_instances(tmp_path / "ct", 2, seed="jpipdest")
    assert await threads.deferToThread(scu_store, server.dicom_port, sources) == [0, 0]
    await server.service.transcoder.when_idle()
    study = str(dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID)
    by_uid = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in sources}

    for name, scp in (("ANYTS", any_ts), ("WANTSJPIP", wants)):
        responses = await threads.deferToThread(move, server.dicom_port, study, name)
        assert counts(responses[-1][0]) == (0x0000, 2, 0, 0)
        assert len(scp.received) == 2
    for ts, got in any_ts.received:
        assert ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        assert np.array_equal(got.pixel_array, dcmread(by_uid[str(got.SOPInstanceUID)]).pixel_array)
    for ts, header in wants.received:
        assert ts == JPIP_REFERENCED and "PixelData" not in header
        pixels = await threads.deferToThread(jpip_pixels, header, server.url, server.service.config.http.public_url)
        assert np.array_equal(pixels, dcmread(by_uid[str(header.SOPInstanceUID)]).pixel_array)

    # C-GET: .94 proposed with Explicit VR Little Endian in one context: the originals.
    together = [(CTImageStorage, [JPIP_REFERENCED, ExplicitVRLittleEndian])]
    responses, received = await threads.deferToThread(c_get, server.dicom_port, study_identifier(study), together)
    assert responses[-1][0] == 0x0000 and [ts for ts, _ in received] == [ExplicitVRLittleEndian] * 2


class ScriptedSCP:
    """A pynetdicom storage SCP on 127.0.0.1:0 that answers its n-th C-STORE (counted over
    all associations) as ``script[n]`` says: ``"abort"`` (A-ABORT, no response) or a status."""

    def __init__(self, ae_title: str, script: list[str | int]) -> None:
        self.script = script
        self.stores: list[tuple[str, str]] = []  # (SOP Instance UID, "abort" or status)
        self.associations = 0
        self.ae = AE(ae_title=ae_title)
        self.ae.dimse_timeout = self.ae.network_timeout = 30
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_ESTABLISHED, self._established)])
        self.port: int = self.server.server_address[1]

    def _established(self, event: Any) -> None:
        self.associations += 1

    def _store(self, event: Any) -> int:
        action = self.script[len(self.stores) % len(self.script)]
        self.stores.append((str(event.request.AffectedSOPInstanceUID), str(action)))
        if action == "abort":
            event.assoc.abort()
            return 0x0000  # never sent: the association is gone
        return int(action)

    def stop(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()


@pytest_twisted.ensureDeferred
async def test_destination_aborts_mid_retrieve(start_server, tmp_path: Path) -> None:
    """A destination that aborts on its first C-STORE: the C-MOVE associates again once and
    goes on; the final response counts completed, failed and warning sub-operations as they
    were, and each failure is logged with UID, syntax, destination and status, without
    patient data. A destination that aborts every time ends the retrieve after the second
    association, the rest counted as failed."""
    from twisted.logger import globalLogPublisher

    # 0x0001 is a warning (PS3.7 C) that pynetdicom's table lacks: it must count as one.
    flaky = ScriptedSCP("FLAKY", ["abort", 0x0000, 0xB007, 0xA700, 0x0001])
    broken = ScriptedSCP("BROKEN", ["abort"])
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        server = await start_server(dicom_destinations={"FLAKY": f"127.0.0.1:{flaky.port}",
                                                        "BROKEN": f"127.0.0.1:{broken.port}"})
        sources = make_instances(tmp_path / "ct", 5, seed="flaky")
        assert await threads.deferToThread(scu_store, server.dicom_port, sources) == [0] * 5
        uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sources]
        study = str(dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID)

        responses = await threads.deferToThread(move, server.dicom_port, study, "FLAKY")
        final, identifier = responses[-1]
        assert counts(final) == (0xB000, 1, 2, 2)  # completed, failed, warning
        assert identifier is not None and list(identifier.FailedSOPInstanceUIDList) == [uids[0], uids[3]]
        assert flaky.associations == 2 and [u for u, _ in flaky.stores] == uids

        responses = await threads.deferToThread(move, server.dicom_port, study, "BROKEN")
        final, identifier = responses[-1]
        assert counts(final) == (0xA702, 0, 5, 0)
        assert identifier is not None and sorted(identifier.FailedSOPInstanceUIDList) == sorted(uids)
        assert broken.associations == 2 and len(broken.stores) == 2
    finally:
        globalLogPublisher.removeObserver(events.append)
        flaky.stop()
        broken.stop()

    failures = [e for e in events if "sub-operation" in e.get("log_format", "") and "failed" in e["log_format"]]
    by_uid = {(e["destination"], e["sop_instance_uid"]): e for e in failures}
    aborted = by_uid[("FLAKY", uids[0])]
    assert aborted["transfer_syntax"] == ExplicitVRLittleEndian and aborted["status"] is None
    assert aborted["reason"].startswith("no response")
    refused = by_uid[("FLAKY", uids[3])]
    assert refused["status"] == 0xA700 and refused["calling_aet"] == "PYSCU"
    assert {u for d, u in by_uid if d == "BROKEN"} == set(uids[:2])
    patient = dcmread(sources[0], stop_before_pixels=True)
    for event in events:
        text = repr({k: v for k, v in event.items() if k != "log_logger"})
        assert str(patient.PatientName) not in text and str(patient.PatientID) not in text
