"""
The DICOM listener: pynetdicom's association server, owned by a Twisted service.

pynetdicom brings its own socket server and thread per association, so Twisted does not
host the socket; this service only starts and stops it. Binding happens synchronously in
:meth:`startService` (fast, and a failure to bind should stop start-up); shutting down
blocks while associations finish, so it runs on a thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
)
from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from imageshare.config import DicomConfig
from imageshare.endpoints import parse_dicom_endpoint
from imageshare.protocols.dicom.handlers import StoreHandler, event_handlers

_NATIVE = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]
_COMPRESSED = [
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000,
    JPEGLSNearLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    HTJ2K,
]


def accepted_transfer_syntaxes() -> list[UID]:
    """The syntaxes we accept: native ones, and compressed ones pydicom can decode here.

    Accepting a syntax whose pixels we could not decode would store an instance we can
    never transcode; the sender can always fall back to Explicit VR Little Endian.
    """
    return _NATIVE + [ts for ts in _COMPRESSED if get_decoder(ts).is_available]


class DicomListenerService(Service):
    """Runs the C-ECHO / C-STORE SCP on the configured endpoint."""

    log = Logger(namespace="imageshare.dicom")

    def __init__(
        self,
        config: DicomConfig,
        store_handler: StoreHandler,
        reactor: Any,
        *,
        config_dir: Path | None = None,
    ) -> None:
        self.setName("dicom")
        self._config = config
        self._store_handler = store_handler
        self._reactor = reactor
        self._config_dir = config_dir
        self._endpoint = parse_dicom_endpoint(config.listen)
        self._ae: AE | None = None
        self._server: Any = None
        self.port: int | None = None

    def _make_ae(self) -> AE:
        c = self._config
        ae = AE(ae_title=c.ae_title)
        ae.maximum_pdu_size = c.max_pdu
        ae.maximum_associations = c.max_associations
        ae.acse_timeout = c.acse_timeout
        ae.dimse_timeout = c.dimse_timeout
        ae.network_timeout = c.network_timeout
        ae.require_called_aet = True
        if c.allowed_calling_aets:
            ae.require_calling_aet = list(c.allowed_calling_aets)
        syntaxes = accepted_transfer_syntaxes()
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        return ae

    def startService(self) -> None:
        ep = self._endpoint
        self._ae = self._make_ae()
        self._server = self._ae.start_server(
            (ep.interface, ep.port),
            block=False,
            evt_handlers=event_handlers(self._store_handler),
            ssl_context=ep.ssl_context(self._config_dir),
        )
        self.port = self._server.server_address[1]
        super().startService()
        self.log.info(
            "DICOM listener {ae_title} listening on {interface}:{port} ({transport})",
            ae_title=self._config.ae_title,
            interface=ep.interface,
            port=self.port,
            transport="tls" if ep.tls else "tcp",
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        server, ae = self._server, self._ae
        self._server = self._ae = None

        def shutdown() -> None:
            if server is not None:
                server.shutdown()
            if ae is not None:
                # Aborts what is left; without it the non-daemon DUL threads keep twistd alive.
                ae.shutdown()

        d: Deferred[None] = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), shutdown)
        d.addCallback(lambda _: self.log.info("DICOM listener stopped"))
        return d
