"""Manifest registration (ITI-41/RAD-68) by the running server, against a small real test repository.

The repository is a Twisted HTTP server on 127.0.0.1 port 0 started in the test. It checks every
message it receives with ``tests/xds/validator.py`` (schemas, SOAP/WS-Addressing, MTOM) and
answers what each test scripts.
"""

from __future__ import annotations

import io
import json
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from lxml import etree
from pydicom import dcmread
from twisted.internet import task, threads
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from imageshare.xds import mtom, safexml, soap
from imageshare.xds.metadata import RIM, RPLC
from imageshare.xds.outbox import State
from imageshare.xds.responses import RegistryError, Status, registry_response
from tests.helpers import make_instances
from tests.integration.conftest import run_with_deadline
from tests.xds.validator import validate_message

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed"),
]

XDS_FAST = {"retry_initial": "0.2", "retry_max": "0.5", "timeout": "2", "max_attempts": "8"}


class Received:
    """One message the test repository received."""

    def __init__(self, content_type: str, body: bytes) -> None:
        self.content_type = content_type
        self.body = body
        self.errors = validate_message(content_type, body, require_mtom=True)
        root_xml, self.parts = mtom.parse(content_type, body)
        self.envelope = soap.parse_envelope(safexml.parse(root_xml), request=True)

    @property
    def payload(self) -> etree._Element:
        return self.envelope.body

    def associations(self, kind: str) -> list[tuple[str, str]]:
        return [(a.get("sourceObject"), a.get("targetObject"))
                for a in self.payload.iter(f"{{{RIM}}}Association") if a.get("associationType") == kind]

    def entry_uuid(self) -> str:
        (entry,) = self.payload.iter(f"{{{RIM}}}ExtrinsicObject")
        return str(entry.get("id"))

    def unique_id(self) -> str:
        (entry,) = self.payload.iter(f"{{{RIM}}}ExtrinsicObject")
        for identifier in entry.iter(f"{{{RIM}}}ExternalIdentifier"):
            if identifier.get("identificationScheme") == "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab":
                return str(identifier.get("value"))
        raise AssertionError("no uniqueId")


def success(message: Received) -> tuple[int, str, bytes]:
    envelope = soap.build_response(soap.ITI41_RESPONSE, message.envelope.message_id,
                                   registry_response(Status.SUCCESS))
    content_type, body = mtom.build(envelope, {})
    return 200, content_type, body


def failure(code: str) -> Callable[[Received], tuple[int, str, bytes]]:
    def answer(message: Received) -> tuple[int, str, bytes]:
        response = registry_response(Status.FAILURE, [RegistryError(code, "scripted failure")])
        content_type, body = mtom.build(soap.build_response(soap.ITI41_RESPONSE, message.envelope.message_id,
                                                            response), {})
        return 200, content_type, body
    return answer


def fault(code: str) -> Callable[[Received], tuple[int, str, bytes]]:
    def answer(message: Received) -> tuple[int, str, bytes]:
        f = soap.SoapFault(code, "scripted fault")
        return f.http_status, "application/soap+xml; charset=UTF-8", f.to_bytes(relates_to=message.envelope.message_id)
    return answer


def http_503(message: Received) -> tuple[int, str, bytes]:
    return 503, "text/plain", b"busy"


def malformed(message: Received) -> tuple[int, str, bytes]:
    return 200, "application/soap+xml", b"<not-soap"


SLOW = object()  # never answer (the client times out)


class ScriptedRepository(Resource):
    """Records and validates ITI-41 requests; answers from a script (the last entry repeats)."""

    isLeaf = True

    def __init__(self, script: list[Any]) -> None:
        super().__init__()
        self.script = script
        self.received: list[Received] = []
        self.hanging: list[Any] = []
        self.registered: dict[str, int] = {}  # uniqueId -> times accepted

    def render_POST(self, request: Any) -> Any:
        content_type = request.getHeader("content-type") or ""
        message = Received(content_type, request.content.read())
        self.received.append(message)
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if step is SLOW:
            self.hanging.append(request)
            return NOT_DONE_YET
        if step is success:
            if message.unique_id() in self.registered:
                step = failure("XDSDuplicateUniqueIdInRegistry")
            self.registered[message.unique_id()] = self.registered.get(message.unique_id(), 0) + 1
        code, answer_type, body = step(message)
        request.setResponseCode(code)
        request.setHeader("content-type", answer_type)
        return body


class Repository:
    """The test repository's listening port (stoppable and restartable on the same port)."""

    def __init__(self, resource: ScriptedRepository) -> None:
        self.resource = resource
        self.port: Any = None
        self.number = 0

    def listen(self, number: int = 0) -> "Repository":
        from twisted.internet import reactor

        self.port = reactor.listenTCP(number, Site(resource=self.resource), interface="127.0.0.1")
        self.number = self.port.getHost().port
        return self

    async def stop(self) -> None:
        for request in self.resource.hanging:
            if not request.finished and not request._disconnected:
                request.finish()
        self.resource.hanging.clear()
        if self.port is not None:
            port, self.port = self.port, None
            await port.stopListening()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.number}/xds/repository"


@pytest.fixture
def repository():
    """Factory for scripted test repositories; each is stopped at teardown."""
    made: list[Repository] = []

    def make(script: list[Any]) -> Repository:
        repo = Repository(ScriptedRepository(script))
        made.append(repo)
        return repo

    yield make
    for repo in made:
        pytest_twisted.blockon(_stop(repo))


def _stop(repo: Repository) -> Any:
    from twisted.internet.defer import ensureDeferred

    return ensureDeferred(repo.stop())


async def send_study(server: Any, folder: Path) -> str:
    result = await threads.deferToThread(
        run_with_deadline,
        ["storescu", "-aet", "MODALITY", "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port),
         "+sd", str(folder)],
    )
    assert result.returncode == 0, result.stderr
    return str(dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID)


def get_status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/status", timeout=10) as r:
        return json.load(r)  # type: ignore[no-any-return]


async def wait_for(check: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"{what} not reached within {timeout} s")


async def outbox_state(server: Any, uid: str) -> Any:
    return await threads.deferToThread(server.service.xds_outbox.get, uid)


async def wait_state(server: Any, state: State, count: int = 1, timeout: float = 30) -> None:
    await wait_for(lambda: server.service.xds.counts[state] >= count, timeout, f"{count} {state.value}")


@pytest_twisted.ensureDeferred
async def test_registered_then_replaced_with_rplc(start_server, repository, tmp_path: Path) -> None:
    """A study's manifest is registered once with a valid MTOM ITI-41 request carrying the KOS; a
    rebuilt manifest is submitted with an RPLC association to the first DocumentEntry; /status
    counts both as registered."""
    repo = repository([success]).listen()
    server = await start_server(manifest={"stable_after": "0.5"}, xds={"repository_url": repo.url, **XDS_FAST})
    files = make_instances(tmp_path / "all", 2, seed="xds-rplc")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(files[0], tmp_path / "a")
    shutil.copy(files[1], tmp_path / "b")
    await send_study(server, tmp_path / "a")
    await wait_state(server, State.REGISTERED, 1)
    (first,) = repo.resource.received
    assert first.errors == []
    assert first.envelope.action == soap.ITI41 and first.envelope.to == repo.url
    assert first.associations(RPLC) == []
    (kos,) = first.parts.values()
    assert dcmread(io.BytesIO(kos[1])).SOPInstanceUID == first.unique_id()

    await send_study(server, tmp_path / "b")
    await wait_state(server, State.REGISTERED, 2)
    second = repo.resource.received[-1]
    assert second.errors == []
    assert second.associations(RPLC) == [(second.entry_uuid(), first.entry_uuid())]
    assert len(repo.resource.received) == 2
    status = await threads.deferToThread(get_status, server.url)
    assert (status["xds_registered"], status["xds_pending"], status["xds_failed"]) == (2, 0, 0)


@pytest_twisted.ensureDeferred
async def test_transient_answers_are_retried(start_server, repository, tmp_path: Path) -> None:
    """A Receiver SOAP fault, HTTP 503, a malformed body and a response slower than [xds] timeout are
    each retried with backoff; the identical request is sent every time and ends registered."""
    repo = repository([fault("Receiver"), http_503, malformed, SLOW, success]).listen()
    server = await start_server(manifest={"stable_after": "0.5"},
                                xds={"repository_url": repo.url, **XDS_FAST, "timeout": "1"})
    make_instances(tmp_path / "s", 1, seed="xds-transient")
    await send_study(server, tmp_path / "s")
    await wait_state(server, State.REGISTERED, 1, timeout=60)
    received = repo.resource.received
    assert len(received) == 5
    assert all(m.errors == [] for m in received)
    assert len({m.body for m in received}) == 1  # re-sent as is
    row = await outbox_state(server, received[0].unique_id())
    assert row.state is State.REGISTERED and row.attempts == 5


@pytest.mark.parametrize("answer", [failure("XDSRegistryMetadataError"), fault("Sender")], ids=["failure", "sender"])
@pytest_twisted.ensureDeferred
async def test_permanent_answers_fail_visibly(start_server, repository, tmp_path: Path, answer: Any) -> None:
    """A Failure RegistryResponse with a permanent error, or a Sender SOAP fault, leaves the submission
    failed after one attempt, with the reason kept and counted in /status."""
    repo = repository([answer]).listen()
    server = await start_server(manifest={"stable_after": "0.5"}, xds={"repository_url": repo.url, **XDS_FAST})
    make_instances(tmp_path / "s", 1, seed="xds-permanent")
    await send_study(server, tmp_path / "s")
    await wait_state(server, State.FAILED, 1)
    (message,) = repo.resource.received
    row = await outbox_state(server, message.unique_id())
    assert row.state is State.FAILED and row.last_error
    status = await threads.deferToThread(get_status, server.url)
    assert (status["xds_failed"], status["xds_pending"], status["xds_registered"]) == (1, 0, 0)


@pytest_twisted.ensureDeferred
async def test_repository_down_then_restart_mid_retry(start_server, repository, tmp_path: Path) -> None:
    """With the repository down, the submission is retried (connection refused); the server is
    stopped in the middle of the retries and a new one started on the same data directory; once
    the repository is up the pending row is registered exactly once."""
    repo = repository([success]).listen()
    number = repo.number
    await repo.stop()  # the port is known and now refuses connections
    xds = {"repository_url": repo.url, **XDS_FAST, "max_attempts": "100"}
    server = await start_server(manifest={"stable_after": "0.5"}, xds=xds)
    make_instances(tmp_path / "s", 1, seed="xds-down")
    await send_study(server, tmp_path / "s")
    outbox = server.service.xds_outbox

    def tried() -> bool:
        rows = outbox.due(float("inf"), 10)
        return bool(rows) and rows[0].attempts >= 2

    await wait_for(lambda: server.service.xds.counts[State.PENDING] == 1, 30, "pending")
    deadline = time.monotonic() + 30
    while not await threads.deferToThread(tried):
        assert time.monotonic() < deadline, "no retries"
        from twisted.internet import reactor
        await task.deferLater(reactor, 0.1, lambda: None)
    await server.service.stopService()

    again = await start_server(manifest={"stable_after": "0.5"}, xds=xds)
    assert again.data_dir == server.data_dir
    repo.listen(number)
    await wait_state(again, State.REGISTERED, 1, timeout=30)
    assert len(repo.resource.received) == 1
    assert sum(repo.resource.registered.values()) == 1
    status = await threads.deferToThread(get_status, again.url)
    assert (status["xds_registered"], status["xds_pending"]) == (1, 0)


@pytest_twisted.ensureDeferred
async def test_manifests_built_with_xds_off_are_registered_once_enabled(start_server, repository,
                                                                        tmp_path: Path) -> None:
    """A manifest made current while [xds] is off has no outbox row; a new server started on the
    same data directory with [xds] on queues it at start and registers it exactly once."""
    off = await start_server(manifest={"stable_after": "0.5"}, xds={"enabled": "no"})
    make_instances(tmp_path / "s", 1, seed="xds-reconcile")
    await send_study(off, tmp_path / "s")
    await wait_for(lambda: off.service.manifests.built >= 1, 30, "a manifest")
    (manifest_uid,) = [uid for _, uid, _ in await threads.deferToThread(off.service.catalog.current_manifests)]
    assert await outbox_state(off, manifest_uid) is None
    await off.service.stopService()

    repo = repository([success]).listen()
    on = await start_server(manifest={"stable_after": "0.5"}, xds={"repository_url": repo.url, **XDS_FAST})
    assert on.data_dir == off.data_dir
    await wait_state(on, State.REGISTERED, 1)
    await task_sleep(1.0)  # a second registration would come now
    (message,) = repo.resource.received
    assert message.errors == [] and message.unique_id() == manifest_uid
    assert repo.resource.registered == {manifest_uid: 1}
    row = await outbox_state(on, manifest_uid)
    assert row.state is State.REGISTERED and row.attempts == 1
    status = await threads.deferToThread(get_status, on.url)
    assert (status["xds_registered"], status["xds_pending"], status["xds_failed"]) == (1, 0, 0)


def tls_repository(tmp_path: Path) -> tuple[Any, ScriptedRepository, Any]:
    """A repository over TLS that requires a client certificate signed by our test CA."""
    from twisted.internet import reactor, ssl

    from tests.integration.test_tls import make_cert

    ca = make_cert(tmp_path, "ca", ca=True)
    make_cert(tmp_path, "server", issuer=ca)
    make_cert(tmp_path, "client", issuer=ca)
    authority = ssl.Certificate.loadPEM((tmp_path / "ca.crt").read_bytes())
    server_cert = ssl.PrivateCertificate.loadPEM((tmp_path / "server.crt").read_bytes()
                                                 + (tmp_path / "server.key").read_bytes())
    resource = ScriptedRepository([success])
    # options(authority): the client must present a certificate that CA signed.
    port = reactor.listenSSL(0, Site(resource), server_cert.options(authority), interface="127.0.0.1")
    return port, resource, f"https://localhost:{port.getHost().port}/xds/repository"


@pytest_twisted.ensureDeferred
async def test_tls_repository_with_client_certificate(start_server, tmp_path: Path) -> None:
    """An HIE repository over TLS that requires a client certificate: with [xds] ca_file,
    client_cert and client_key the manifest is registered (host name and CA checked)."""
    port, resource, url = tls_repository(tmp_path)
    try:
        server = await start_server(manifest={"stable_after": "0.5"}, xds={
            "repository_url": url, **XDS_FAST, "ca_file": str(tmp_path / "ca.crt"),
            "client_cert": str(tmp_path / "client.crt"), "client_key": str(tmp_path / "client.key")})
        await send_study(server, make_study(tmp_path / "tls"))
        await wait_state(server, State.REGISTERED, 1)
        (message,) = resource.received
        assert message.errors == [] and message.envelope.to == url
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_tls_repository_refuses_us_without_client_certificate(start_server, tmp_path: Path) -> None:
    """Without client_cert the TLS handshake fails: the submission stays pending (retried as a
    connection failure), nothing reaches the repository."""
    port, resource, url = tls_repository(tmp_path)
    try:
        server = await start_server(manifest={"stable_after": "0.5"}, xds={
            "repository_url": url, **XDS_FAST, "ca_file": str(tmp_path / "ca.crt")})
        await send_study(server, make_study(tmp_path / "nocert"))
        await wait_for(lambda: server.service.xds.counts[State.PENDING] >= 1, what="a pending submission")
        await task_sleep(1.5)  # several attempts at the fast retry settings
        assert resource.received == [] and server.service.xds.counts[State.REGISTERED] == 0
    finally:
        await port.stopListening()


def make_study(folder: Path) -> Path:
    make_instances(folder, 1, seed=f"xds-{folder.name}")
    return folder


async def task_sleep(seconds: float) -> None:
    from twisted.internet import reactor

    await task.deferLater(reactor, seconds, lambda: None)
