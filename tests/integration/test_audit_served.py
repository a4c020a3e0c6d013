"""
The audit trail of what the HTTP interfaces serve, read from the local ``audit.log``: a WADO
GET, a JPIP session of two requests, a RAD-69 retrieval, the manifest's registration
(RAD-68) and an ITI-43 retrieval each leave exactly their messages, valid against the
PS3.15 A.5.1 schema, naming the instance, study, patient and client.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
import treq
from lxml import etree
from pydicom import dcmread
from twisted.internet import task, threads

from imageshare.audit.syslog import split_message
from imageshare.manifests import LocationUid
from imageshare.transcode import openjpeg
from imageshare.xds import metadata as md
from imageshare.xds import mtom, rad69, soap
from imageshare.xds.outbox import State
from tests.audit.schema import assert_valid
from tests.helpers import make_instances, scu_store
from tests.integration.test_xds_embedded import Client, unique_id_of

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not openjpeg.is_available(), reason="OpenJPEG >= 2.5 missing"),
]


async def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await task.deferLater(reactor, 0.1, lambda: None)


def _messages(path: Path) -> list[etree._Element]:
    lines = [line for line in path.read_bytes().split(b"\n") if line] if path.exists() else []
    return [assert_valid(split_message(line)[1]) for line in lines]


def _served(messages: list[etree._Element], event_type: str) -> list[etree._Element]:
    return [m for m in messages if m.find("EventIdentification/EventTypeCode") is not None
            and m.find("EventIdentification/EventTypeCode").get("csd-code") == event_type]


def _object_ids(message: etree._Element, id_type: str) -> list[str]:
    return [o.get("ParticipantObjectID") for o in message.iter("ParticipantObjectIdentification")
            if o.find("ParticipantObjectIDTypeCode").get("csd-code") == id_type]


@pytest_twisted.ensureDeferred
async def test_served_events_are_audited(start_server, tmp_path: Path) -> None:
    """WADO (RAD-55), JPIP (once for a two-request session), RAD-69, RAD-68 and ITI-43 each
    produce exactly their 110104/110106 messages, with study, patient (and instance) objects
    and the client's address as its network access point."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = await start_server(
        http={"listen": f"tcp:{port}:interface=127.0.0.1", "public_url": f"http://127.0.0.1:{port}"},
        manifest={"stable_after": "0.5"},
        xds={"retry_initial": "0.5", "retry_max": "1"},
    )
    audit_log = server.data_dir / "audit.log"
    files = make_instances(tmp_path / "study", 2, seed="audit-served")
    first = dcmread(files[0], stop_before_pixels=True)
    study, series, instance = str(first.StudyInstanceUID), str(first.SeriesInstanceUID), str(first.SOPInstanceUID)
    patient_id = str(first.PatientID)
    assert await threads.deferToThread(scu_store, server.dicom_port, files) == [0, 0]
    submitter = server.service.xds
    await _wait(lambda: submitter.counts[State.REGISTERED] >= 1, 60, "the manifest's registration")
    await server.service.transcoder.when_idle()
    await _wait(lambda: len(_served(_messages(audit_log), "RAD-68")) >= 1, 10, "the RAD-68 message")

    # WADO-URI GET: one 110104 R, RAD-55.
    response = await treq.get(f"{server.url}/wado?requestType=WADO&studyUID={study}&seriesUID={series}"
                              f"&objectUID={instance}&contentType=application/dicom")
    assert response.code == 200
    await response.content()

    # JPIP: two requests in one session for the same target: one message.
    response = await treq.get(f"{server.url}/jpip?target={instance}&type=jpp-stream&fsiz=64,64&cnew=http")
    assert response.code == 200
    await response.content()
    cid = re.search(r"cid=([^,]+)", response.headers.getRawHeaders(b"jpip-cnew")[0].decode()).group(1)
    response = await treq.get(f"{server.url}/jpip?cid={cid}&fsiz=128,128")
    assert response.code == 200
    await response.content()

    # RAD-69 for one instance.
    config = server.service.config
    location = await server.service.db_pool.run(LocationUid(server.service.catalog,
                                                             config.manifest.retrieve_location_uid))
    endpoint = f"{server.url}/xds/imaging-source"
    document = rad69.DocumentRequest(study, series, location, instance)
    envelope = soap.build_request(soap.RAD69, endpoint, rad69.build_request([document], ["1.2.840.10008.1.2.1"]))
    content_type, body = mtom.build(envelope, {})
    response = await treq.post(endpoint, data=body, headers={"Content-Type": content_type})
    assert response.code == 200
    await response.content()

    # ITI-43 of the registered manifest.
    client = Client(server, location)
    domain = config.xds.domain(location)
    found = await client.find(domain.patient_id(patient_id, str(first.get("IssuerOfPatientID", ""))))
    kos_uid = unique_id_of(found[0])
    answer, _ = await client.retrieve((location, kos_uid))
    assert answer.find(f"{{{md.XDS}}}DocumentResponse") is not None

    await _wait(lambda: len(_served(_messages(audit_log), "ITI-43")) >= 1
                and len(_served(_messages(audit_log), "RAD-69")) >= 1, 10, "the served messages")
    from twisted.internet import reactor

    await task.deferLater(reactor, 0.5, lambda: None)  # nothing more is coming
    messages = _messages(audit_log)

    def one(event_type: str) -> Any:
        found = _served(messages, event_type)
        assert len(found) == 1, f"{len(found)} {event_type} message(s)"
        return found[0]

    for event_type in ("RAD-55", "JPIP", "RAD-69"):
        message = one(event_type)
        event = message.find("EventIdentification")
        assert (event.find("EventID").get("csd-code"), event.get("EventActionCode")) == ("110104", "R")
        assert _object_ids(message, "110180") == [study]
        assert _object_ids(message, "2") == [patient_id]
        assert [i.get("UID") for i in message.iter("Instance")] == [instance]
        requestor = [p for p in message.iter("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
        assert [p.get("NetworkAccessPointID") for p in requestor] == ["127.0.0.1"]

    submission = one("RAD-68")
    assert submission.find("EventIdentification/EventID").get("csd-code") == "110106"
    assert submission.find("EventIdentification").get("EventOutcomeIndicator") == "0"
    assert _object_ids(submission, "2") == [patient_id]

    retrieval = one("ITI-43")
    assert retrieval.find("EventIdentification/EventID").get("csd-code") == "110106"
    assert _object_ids(retrieval, "9") == [kos_uid]
