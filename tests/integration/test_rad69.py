"""RAD-69 Retrieve Imaging Document Set against the running server.

Instances arrive by C-STORE and are transcoded; RAD-69 requests built with lxml and
:func:`imageshare.xds.soap.build_request` go to ``/xds/imaging-source`` over HTTP. Every
request and response is checked with the project's validator (schemas, SOAP 1.2,
WS-Addressing, MTOM/XOP), pixels with pydicom and our JPIP client.
"""

from __future__ import annotations

import io
import shutil
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_twisted
import treq
from pydicom import dcmread
from pydicom.uid import generate_uid
from twisted.internet import threads

from imageshare.jpip_cli import JpipClient
from imageshare.manifests import LOCATION_UID_SETTING
from imageshare.transcode import openjpeg
from imageshare.xds import mtom, rad69, soap
from imageshare.xds.responses import Status, parse_registry_response
from imageshare.xds.safexml import parse
from tests.helpers import sample_file, scu_store
from tests.xds.validator import XDS, validate_message

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not openjpeg.is_available(), reason="OpenJPEG >= 2.5 missing"),
    pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmtk is not installed"),
]

PUBLIC_URL = "http://imageshare.example:8080"
EXPLICIT = "1.2.840.10008.1.2.1"
FILES = {"ct": "CT_small.dcm", "palette": "examples_palette.dcm"}  # streamable; stored only


class Source:
    """The running server, its repository UID and the UIDs of what it holds."""

    def __init__(self, server: Any, repository: str, uids: dict[str, tuple[str, str, str]],
                 paths: dict[str, Path]) -> None:
        self.server = server
        self.repository = repository
        self.uids = uids
        self.paths = paths
        self.endpoint = f"{server.url}/xds/imaging-source"

    def doc(self, name: str, *, repository: str | None = None, series: str | None = None,
            instance: str | None = None) -> rad69.DocumentRequest:
        study, own_series, own_instance = self.uids[name]
        return rad69.DocumentRequest(study, series or own_series, repository or self.repository,
                                     instance or own_instance)

    async def post(self, content_type: str, body: bytes) -> tuple[int, str, bytes]:
        response = await treq.post(self.endpoint, data=body, headers={"content-type": [content_type]})
        data = await treq.content(response)
        return response.code, response.headers.getRawHeaders(b"content-type", [b""])[0].decode(), data

    async def retrieve(self, documents: list[rad69.DocumentRequest], syntaxes: list[str]
                       ) -> tuple[Any, list[tuple[str, bytes]]]:
        """Send a valid MTOM request; return (RegistryResponse, [(UID, Part 10 bytes)])."""
        envelope = soap.build_request(soap.RAD69, self.endpoint, rad69.build_request(documents, syntaxes))
        content_type, body = mtom.build(envelope, {})
        assert validate_message(content_type, body, require_mtom=True) == []
        code, answer_type, answer = await self.post(content_type, body)
        assert code == 200, answer[:500]
        assert validate_message(answer_type, answer, require_mtom=True) == []
        xml, parts = mtom.parse(answer_type, answer)
        reply = soap.parse_envelope(parse(xml))
        assert reply.action == soap.RAD69_RESPONSE and reply.relates_to == parse(envelope)[0][1].text
        response = reply.body
        found = []
        for document in response.findall(f"{{{XDS}}}DocumentResponse"):
            assert document.findtext(f"{{{XDS}}}RepositoryUniqueId") == self.repository
            assert document.findtext(f"{{{XDS}}}mimeType") == "application/dicom"
            found.append((document.findtext(f"{{{XDS}}}DocumentUniqueId"),
                          mtom.element_bytes(document.find(f"{{{XDS}}}Document"), parts)))
        return parse_registry_response(response[0]), found


def uids_of(path: Path) -> tuple[str, str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


@pytest_twisted.async_fixture
async def source(start_server: Any) -> Source:
    """A server holding CT_small (streamable) and a PALETTE COLOR image (not streamable)."""
    server = await start_server(http={"public_url": PUBLIC_URL})
    paths = {name: sample_file(f) for name, f in FILES.items()}
    statuses = await threads.deferToThread(scu_store, server.dicom_port, list(paths.values()))
    assert statuses == [0] * len(paths)
    await server.service.transcoder.when_idle()
    catalog = server.service.catalog
    # The Retrieve Location UID our manifests carry: generated once, kept in the catalog.
    repository = await threads.deferToThread(catalog.ensure_setting, LOCATION_UID_SETTING, generate_uid(prefix=None))
    states = {name: catalog.get_instance(uids_of(p)[2]).state.value for name, p in paths.items()}
    assert states == {"ct": "streamable", "palette": "not_streamable"}
    return Source(server, repository, {name: uids_of(p) for name, p in paths.items()}, paths)


@pytest_twisted.ensureDeferred
async def test_jpip_referenced_header_streams_the_pixels(source: Source) -> None:
    """[.94, Explicit VR LE] for the streamable CT gives the JPIP Referenced header: no Pixel
    Data, the provider URL on our public URL; JPIP at that URL gives exactly the pixels."""
    registry, found = await source.retrieve([source.doc("ct")], [rad69.JPIP_REFERENCED, EXPLICIT])
    assert registry.status is Status.SUCCESS and registry.errors == ()
    ((uid, data),) = found
    header = dcmread(io.BytesIO(data))
    instance = source.uids["ct"][2]
    assert uid == instance and header.file_meta.TransferSyntaxUID == rad69.JPIP_REFERENCED
    assert "PixelData" not in header
    provider = str(header[0x00287FE0].value)
    assert provider == f"{PUBLIC_URL}/jpip?target={instance}"
    parts = urllib.parse.urlsplit(provider)

    def stream() -> np.ndarray:
        client = JpipClient(f"{source.server.url}{parts.path}?{parts.query}", timeout=30)
        client.fetch(fsiz=f"{header.Columns},{header.Rows}")
        return client.view()[0]

    pixels = await threads.deferToThread(stream)
    np.testing.assert_array_equal(pixels, dcmread(source.paths["ct"]).pixel_array)


@pytest_twisted.ensureDeferred
async def test_native_and_jpeg2000(source: Source) -> None:
    """[Explicit VR LE] gives the decoded pixels of the original; [.90] our lossless JPEG 2000
    codestreams, which decode to the same pixels; the palette image (not streamable) asked
    for [.94, .90, Explicit VR LE] falls through to Explicit VR LE."""
    original = dcmread(source.paths["ct"])
    registry, ((_, data),) = await source.retrieve([source.doc("ct")], [EXPLICIT])
    ds = dcmread(io.BytesIO(data))
    assert registry.status is Status.SUCCESS and ds.file_meta.TransferSyntaxUID == EXPLICIT
    np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)

    registry, ((_, data),) = await source.retrieve([source.doc("ct")], [rad69.JPEG2000_LOSSLESS, EXPLICIT])
    ds = dcmread(io.BytesIO(data))
    assert ds.file_meta.TransferSyntaxUID == rad69.JPEG2000_LOSSLESS
    np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)

    registry, ((_, data),) = await source.retrieve(
        [source.doc("palette")], [rad69.JPIP_REFERENCED, rad69.JPEG2000_LOSSLESS, EXPLICIT])
    ds = dcmread(io.BytesIO(data))
    assert registry.status is Status.SUCCESS and ds.file_meta.TransferSyntaxUID == EXPLICIT
    np.testing.assert_array_equal(ds.pixel_array, dcmread(source.paths["palette"]).pixel_array)


@pytest_twisted.ensureDeferred
async def test_error_matrix(source: Source) -> None:
    """Unknown repository -> XDSUnknownRepositoryId; unknown instance, or one asked under
    another series -> XDSDocumentUniqueIdError; each with its UID as the location, and the
    found document returned: PartialSuccess. Nothing found -> Failure. No producible syntax
    (JPEG baseline, or .94 for a non-streamable image) -> XDSRepositoryError."""
    ct = source.uids["ct"][2]
    registry, found = await source.retrieve(
        [source.doc("ct"), source.doc("ct", repository="1.2.3.999"), source.doc("ct", instance="2.25.404"),
         source.doc("ct", series="2.25.405")],
        [EXPLICIT],
    )
    assert registry.status is Status.PARTIAL_SUCCESS
    assert [(e.code, e.location) for e in registry.errors] == [
        ("XDSUnknownRepositoryId", ct), ("XDSDocumentUniqueIdError", "2.25.404"), ("XDSDocumentUniqueIdError", ct)]
    assert [uid for uid, _ in found] == [ct]

    registry, found = await source.retrieve([source.doc("ct", instance="2.25.404")], [EXPLICIT])
    assert registry.status is Status.FAILURE and registry.error_codes == ("XDSDocumentUniqueIdError",)
    assert found == []

    for name, syntaxes in [("ct", ["1.2.840.10008.1.2.4.50"]), ("palette", [rad69.JPIP_REFERENCED])]:
        registry, found = await source.retrieve([source.doc(name)], syntaxes)
        assert registry.status is Status.FAILURE and found == []
        assert [(e.code, e.location) for e in registry.errors] == [("XDSRepositoryError", source.uids[name][2])]
        assert "transfer syntax not supported" in registry.errors[0].context


SOAP11 = (b'<?xml version="1.0"?><e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/">'
          b"<e:Body><x/></e:Body></e:Envelope>")
XXE = (b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
       b'<e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope"><e:Body><a>&x;</a></e:Body></e:Envelope>')


@pytest_twisted.ensureDeferred
async def test_hostile_bodies(source: Source) -> None:
    """Malformed XML, XXE, SOAP 1.1, another action, a 2 MiB body and a GET get clean answers
    (SOAP faults 400/500/413, 405), and the server goes on answering a valid request."""

    def fault_of(content_type: str, body: bytes) -> soap.SoapFault:
        assert content_type.startswith("application/soap+xml")
        fault = soap.parse_envelope(parse(body)).fault
        assert fault is not None
        return fault

    for content_type, body, expected in [
        (soap.SOAP12_CONTENT_TYPE, b"<e:Envelope", (400, "Sender")),
        (soap.SOAP12_CONTENT_TYPE, XXE, (400, "Sender")),
        ("text/xml", SOAP11, (500, "VersionMismatch")),
        (soap.SOAP12_CONTENT_TYPE, b"<x>" + b"a" * (2 * 1024 * 1024) + b"</x>", (413, "Sender")),
    ]:
        code, answer_type, answer = await source.post(content_type, body)
        assert (code, fault_of(answer_type, answer).code) == expected
        assert b"root:" not in answer  # the external entity was never read

    envelope = soap.build_request(soap.ITI43, source.endpoint, rad69.build_request([source.doc("ct")], [EXPLICIT]))
    code, answer_type, answer = await source.post(*mtom.build(envelope, {}))
    fault = fault_of(answer_type, answer)
    assert (code, fault.subcode) == (400, f"{{{soap.WSA_NS}}}ActionNotSupported")

    response = await treq.get(source.endpoint)
    await treq.content(response)
    assert response.code == 405 and response.headers.getRawHeaders(b"allow") == [b"POST"]

    registry, found = await source.retrieve([source.doc("ct")], [EXPLICIT])
    assert registry.status is Status.SUCCESS and len(found) == 1
