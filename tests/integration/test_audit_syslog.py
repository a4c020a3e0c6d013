"""
A real audit record repository: Debian's rsyslog with its TLS driver (rsyslog-gnutls),
started unprivileged by the test on a loopback port, receives the audit messages of a
scripted session; stopped mid-session and started again, nothing is missing, order is
kept, and duplicates appear only as at-least-once delivery allows.
"""

from __future__ import annotations

import datetime
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
from pydicom.dataset import Dataset
from twisted.internet import threads

from imageshare.audit.syslog import split_message
from tests.audit.schema import assert_valid
from tests.helpers import make_instances, scu_store

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("rsyslogd") is None, reason="rsyslog is not installed (make system-deps)"),
]


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for localhost / 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("audit test CA")).issuer_name(name("audit test CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rsyslog:
    """rsyslogd -n with a config of its own: imtcp + gtls on 127.0.0.1, omfile of the raw messages."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.out = folder / "received.log"
        self.proc: subprocess.Popen[bytes] | None = None
        ca, cert, key = _certificates(folder)
        work = folder / "work"
        work.mkdir()
        self.conf = folder / "rsyslog.conf"
        self.conf.write_text(f"""
global(workDirectory="{work}" maxMessageSize="64k"
       defaultNetstreamDriverCAFile="{ca}" defaultNetstreamDriverCertFile="{cert}"
       defaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
input(type="imtcp" port="{port}" address="127.0.0.1")
template(name="raw" type="string" string="%rawmsg%\\n")
action(type="omfile" file="{self.out}" template="raw" flushOnTXEnd="on" asyncWriting="off")
""")
        self.ca = ca

    def start(self) -> None:
        self.proc = subprocess.Popen(["rsyslogd", "-n", "-f", str(self.conf), "-i", str(self.folder / "rsyslog.pid")],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read().decode() if self.proc.stdout else "exited"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("rsyslogd did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def messages(self) -> list[bytes]:
        if not self.out.exists():
            return []
        return [line for line in self.out.read_bytes().split(b"\n") if line]


def _find(port: int) -> None:
    ae = AE(ae_title="FINDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGESHARE")
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    identifier.PatientID = ""
    list(assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind))
    assoc.release()


def _refused(port: int) -> None:
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGESHARE")
    assert assoc.is_rejected


async def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await deferLater(reactor, 0.2, lambda: None)


def _events(lines: list[bytes]) -> list[str]:
    from lxml import etree

    out = []
    for line in lines:
        root = etree.fromstring(split_message(line)[1])
        out.append(root.find("EventIdentification/EventID").get("csd-code"))
    return out



def assert_delivered(received: list[bytes], logged: list[bytes]) -> None:
    """At least once and in order: with repeats of a message already seen collapsed, the
    repository got exactly the local log; every message is an RFC 5424 audit message (PRI
    <85>, MSGID IHE+RFC-3881) valid against the schema."""
    seen: set[bytes] = set()
    unique = []
    for line in received:
        if line not in seen:
            seen.add(line)
            unique.append(line)
    assert unique == logged
    for line in received:
        header, xml = split_message(line)
        assert header[0] == "<85>1" and header[5] == "IHE+RFC-3881"
        assert_valid(xml)

@pytest_twisted.ensureDeferred
async def test_rsyslog_receives_every_message(start_server, tmp_path: Path) -> None:
    """Every audit message of a session reaches rsyslog over TLS, valid, in order, none
    missing, even though rsyslog is stopped mid-session and started again."""
    receiver = Rsyslog(tmp_path / "rsyslog", _free_port()) if (tmp_path / "rsyslog").mkdir() is None else None
    assert receiver is not None
    receiver.start()
    try:
        server = await start_server(
            dicom={"allowed_calling_aets": "TESTSCU FINDER"},
            audit={"syslog": f"tls:localhost:{receiver.port}", "ca_file": str(receiver.ca)},
        )
        audit_log = server.data_dir / "audit.log"
        port = server.dicom_port
        paths = make_instances(tmp_path / "in", 2, seed="audit")
        assert await threads.deferToThread(scu_store, port, paths) == [0, 0]
        await threads.deferToThread(_find, port)
        await threads.deferToThread(_refused, port)
        await _wait(lambda: server.service.audit.pending == 0 and len(receiver.messages()) >= 5, 30,
                    "the first messages")

        receiver.stop()  # the repository goes away mid-session
        more = make_instances(tmp_path / "more", 1, seed="audit2")
        assert await threads.deferToThread(scu_store, port, more) == [0]
        await threads.deferToThread(_find, port)
        await _wait(lambda: server.service.audit.pending >= 2, 10, "messages spooled during the outage")
        receiver.start()
        await _wait(lambda: server.service.audit.pending == 0, 60, "the spool to drain")

        local = [line for line in audit_log.read_bytes().split(b"\n") if line]
        assert_delivered(receiver.messages(), local)
        events = _events(local)
        assert events[0] == "110100"  # application start
        assert events.count("110104") == 3  # three instances stored
        assert events.count("110112") == 2  # two queries
        assert events.count("110113") == 1  # the refused association
        assert b"\n" not in b"".join(local)
    finally:
        receiver.stop()


# -- the HTTP interfaces too, with access control on ------------------------------------------


def _post(url: str, content_type: str, body: bytes, token: str) -> tuple[int, str, bytes]:
    """POST with a bearer token (blocking; run in a thread): status, Content-Type, body."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": content_type, "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def _event_types(lines: list[bytes]) -> list[tuple[str, str]]:
    """(EventID, EventTypeCode or "") of each message."""
    from lxml import etree

    out = []
    for line in lines:
        event = etree.fromstring(split_message(line)[1]).find("EventIdentification")
        kind = event.find("EventTypeCode")
        out.append((event.find("EventID").get("csd-code"), kind.get("csd-code") if kind is not None else ""))
    return out


@pytest_twisted.ensureDeferred
async def test_rsyslog_receives_the_served_and_refused_events(start_server, tmp_path: Path) -> None:
    """With [auth] mode = bearer: store, the manifest's registration (RAD-68), a WADO GET, a
    JPIP session of two requests, RAD-69, ITI-43, a 401, a 403 and a refused association all
    reach rsyslog, stopped and started again mid-session: the local log exactly, in order."""
    import re

    import treq
    from pydicom import dcmread

    from imageshare.manifests import LocationUid
    from imageshare.transcode import openjpeg
    from imageshare.xds import metadata as md
    from imageshare.xds import mtom, rad69, soap
    from imageshare.xds.outbox import State
    from tests.auth.keys import AUDIENCE, ISSUER, Keys
    from tests.integration.test_xds_embedded import Client, unique_id_of

    if not openjpeg.is_available():
        pytest.skip("OpenJPEG >= 2.5 missing")
    keys = Keys()
    token = keys.token()  # image.read xds.read

    class BearerClient(Client):
        async def send(self, path: str, content_type: str, body: bytes, *,
                       mtom_required: bool) -> tuple[int, str, bytes]:
            return await threads.deferToThread(_post, f"{self.base}{path}", content_type, body, token)

    (tmp_path / "rsyslog").mkdir()
    receiver = Rsyslog(tmp_path / "rsyslog", _free_port())
    receiver.start()
    try:
        http_port = _free_port()
        server = await start_server(
            dicom={"allowed_calling_aets": "TESTSCU"},
            http={"listen": f"tcp:{http_port}:interface=127.0.0.1", "public_url": f"http://127.0.0.1:{http_port}"},
            auth={"mode": "bearer", "issuer": ISSUER, "audience": AUDIENCE,
                  "jwks": str(keys.write_jwks(tmp_path / "jwks.json"))},
            manifest={"stable_after": "0.5"},
            xds={"retry_initial": "0.5", "retry_max": "1"},
            audit={"syslog": f"tls:localhost:{receiver.port}", "ca_file": str(receiver.ca), "retry_max": "2"},
        )
        audit = server.service.audit
        audit_log = server.data_dir / "audit.log"

        def local() -> list[bytes]:
            return [line for line in audit_log.read_bytes().split(b"\n") if line] if audit_log.exists() else []

        def served(event_type: str) -> int:
            return sum(1 for _, kind in _event_types(local()) if kind == event_type)

        async def get(url: str, with_token: str | None) -> tuple[int, Any, bytes]:
            headers = {"Authorization": f"Bearer {with_token}"} if with_token is not None else {}
            response = await treq.get(url, headers=headers)
            return response.code, response.headers, await response.content()

        # Receiver up: store (and the manifest's registration), WADO, a 401, a refused association.
        files = make_instances(tmp_path / "study", 2, seed="audit-http")
        first = dcmread(files[0], stop_before_pixels=True)
        study, series, instance = str(first.StudyInstanceUID), str(first.SeriesInstanceUID), str(first.SOPInstanceUID)
        assert await threads.deferToThread(scu_store, server.dicom_port, files) == [0, 0]
        await _wait(lambda: server.service.xds.counts[State.REGISTERED] >= 1, 20, "the manifest's registration")
        await server.service.transcoder.when_idle()
        await _wait(lambda: served("RAD-68") >= 1, 10, "the RAD-68 message")

        wado = (f"{server.url}/wado?requestType=WADO&studyUID={study}&seriesUID={series}"
                f"&objectUID={instance}&contentType=application/dicom")
        assert (await get(wado, token))[0] == 200
        assert (await get(wado, None))[0] == 401
        await threads.deferToThread(_refused, server.dicom_port)
        await _wait(lambda: served("RAD-55") == 1 and len(local()) >= 7, 10, "the first HTTP messages")
        before = len(local())
        await _wait(lambda: audit.pending == 0 and len(receiver.messages()) >= before, 20, "the first messages")

        # The repository goes away: JPIP (two requests), RAD-69, ITI-43, a 403.
        receiver.stop()
        code, headers, _ = await get(f"{server.url}/jpip?target={instance}&type=jpp-stream&fsiz=64,64&cnew=http",
                                     token)
        assert code == 200
        cid = re.search(r"cid=([^,]+)", headers.getRawHeaders(b"jpip-cnew")[0].decode()).group(1)
        assert (await get(f"{server.url}/jpip?cid={cid}&fsiz=128,128", token))[0] == 200

        config = server.service.config
        location = await server.service.db_pool.run(LocationUid(server.service.catalog,
                                                                 config.manifest.retrieve_location_uid))
        endpoint = f"{server.url}/xds/imaging-source"
        document = rad69.DocumentRequest(study, series, location, instance)
        envelope = soap.build_request(soap.RAD69, endpoint, rad69.build_request([document], ["1.2.840.10008.1.2.1"]))
        content_type, body = mtom.build(envelope, {})
        assert (await threads.deferToThread(_post, endpoint, content_type, body, token))[0] == 200

        client = BearerClient(server, location)
        domain = config.xds.domain(location)
        found = await client.find(domain.patient_id(str(first.PatientID), str(first.get("IssuerOfPatientID", ""))))
        answer, _ = await client.retrieve((location, unique_id_of(found[0])))
        assert answer.find(f"{{{md.XDS}}}DocumentResponse") is not None

        assert (await get(wado, keys.token(scope="xds.read")))[0] == 403
        outage = 4  # JPIP, RAD-69, ITI-43, the 403
        await _wait(lambda: len(local()) >= before + outage, 10, "the messages of the outage")
        await _wait(lambda: audit.pending >= outage, 10,
                    f"messages spooled during the outage: {audit.pending}, {_event_types(local())[before:]}")
        receiver.start()
        await _wait(lambda: audit.pending == 0, 20, "the spool to drain")

        logged = local()
        assert_delivered(receiver.messages(), logged)
        events = _event_types(logged)
        ids = [event for event, _ in events]
        assert ids[0] == "110100"
        assert ids.count("110104") == 2 + 3  # two stored; WADO, JPIP, RAD-69 retrieved
        for expected in (("110104", "RAD-55"), ("110104", "JPIP"), ("110104", "RAD-69"),
                         ("110106", "RAD-68"), ("110106", "ITI-43")):
            assert events.count(expected) == 1, (expected, events)
        assert ids.count("110114") == 1  # the 401
        assert ids.count("110113") == 2  # the 403 and the refused association
    finally:
        receiver.stop()
