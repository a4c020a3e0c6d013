"""
The DICOM listener: pynetdicom's association server, owned by a Twisted service.

pynetdicom brings its own socket server and thread per association, so Twisted does not
host the socket; this service only starts and stops it. The server is
:class:`~.server.GuardedAssociationServer`, pynetdicom's with our bounds on connections,
negotiation time and PDU sizes (issue 10). Binding happens synchronously in
:meth:`startService` (fast, and a failure to bind should stop start-up); shutting down
blocks while associations finish, so it runs on a thread.

Besides C-ECHO and C-STORE, the AE is the Query/Retrieve SCP (Patient Root and Study
Root FIND, GET and MOVE, see :mod:`.qr`). For C-GET the peer proposes storage contexts in
which it takes the SCP role (role selection, PS3.7 D.3.3.4); those, and only those, are
accepted with the syntaxes we can send, JPIP Referenced included. Storage contexts for
instances sent to us never accept JPIP Referenced: we store no header-only objects.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, cast

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
from pynetdicom import AE, AllStoragePresentationContexts, build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from imageshare.config import DicomConfig
from imageshare.endpoints import parse_dicom_endpoint
from imageshare.dicom.derived import JPIP_REFERENCED
from imageshare.logsafe import Logger
from imageshare.protocols.dicom.access import AccessPolicy
from imageshare.protocols.dicom.handlers import StoreHandler, event_handlers
from imageshare.protocols.dicom.qr import QueryRetrieveSCP, RetrieveAE
from imageshare.protocols.dicom.server import GuardedAssociationServer

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


_QUERY_RETRIEVE = [
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
]
_STORAGE = frozenset(cx.abstract_syntax for cx in AllStoragePresentationContexts)


def _retrieve_context(abstract_syntax: str, syntaxes: list[UID]) -> PresentationContext:
    context = build_context(abstract_syntax, syntaxes)
    context.scu_role = context.scp_role = True
    return context


def offer_retrieve_syntaxes(event: Any) -> None:
    """EVT_REQUESTED, before negotiation: storage contexts the requestor takes the SCP
    role for (C-GET) accept what we can send. Native syntaxes come first (everything can
    go out decoded), then the compressed ones we archive, and JPIP Referenced last, so
    that it is chosen only in a context that proposes it alone (PS3.17 GG)."""
    assoc = event.assoc
    scp_role = {str(uid) for uid, item in assoc.requestor.role_selection.items() if item.scp_role} & _STORAGE
    if not scp_role:
        return
    syntaxes = accepted_transfer_syntaxes() + [JPIP_REFERENCED]
    assoc.acceptor.supported_contexts = [
        _retrieve_context(cx.abstract_syntax, syntaxes) if cx.abstract_syntax in scp_role else cx
        for cx in assoc.acceptor.supported_contexts
    ]


class DicomListenerService(Service):
    """Runs the C-ECHO / C-STORE SCP, and the Q/R SCP if given, on the configured endpoint."""

    log = Logger(namespace="imageshare.dicom")

    def __init__(
        self,
        config: DicomConfig,
        store_handler: StoreHandler,
        reactor: Any,
        *,
        config_dir: Path | None = None,
        query_retrieve: QueryRetrieveSCP | None = None,
        access: AccessPolicy | None = None,
    ) -> None:
        self.setName("dicom")
        # Calling-AE lists and certificate pins, checked before negotiation (access.py);
        # without it, only allowed_calling_aets, by pynetdicom.
        self._access = access
        self._config = config
        self._store_handler = store_handler
        self._query_retrieve = query_retrieve
        self._reactor = reactor
        self._config_dir = config_dir
        self._endpoint = parse_dicom_endpoint(config.listen)
        self._ae: AE | None = None
        self._server: GuardedAssociationServer | None = None
        self.port: int | None = None

    def _make_ae(self) -> AE:
        c = self._config
        # RetrieveAE: C-MOVE associations to destinations go through qr.DestinationLink.
        ae = RetrieveAE(ae_title=c.ae_title)
        ae.maximum_pdu_size = c.max_pdu
        # The server admits at most this many connections, so pynetdicom's own check
        # (after negotiation, "Local Limit Exceeded") never fires before ours.
        ae.maximum_associations = c.max_associations
        ae.acse_timeout = c.acse_timeout
        ae.dimse_timeout = c.dimse_timeout
        ae.network_timeout = c.network_timeout
        ae.connection_timeout = c.acse_timeout  # TCP connect to a C-MOVE destination
        ae.require_called_aet = True
        if c.allowed_calling_aets and self._access is None:
            ae.require_calling_aet = list(c.allowed_calling_aets)
        syntaxes = accepted_transfer_syntaxes()
        # With Q/R: roles as the requestor proposes them, SCP for C-GET (offer_retrieve_syntaxes
        # widens those contexts), the default SCU otherwise.
        roles = True if self._query_retrieve is not None else None
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes, scu_role=roles, scp_role=roles)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        if self._query_retrieve is not None:
            for abstract_syntax in _QUERY_RETRIEVE:
                ae.add_supported_context(abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        return ae

    def connections(self, address: str | None = None) -> int:
        """Connections open now, in total or from ``address``; 0 when stopped."""
        server = self._server
        if server is None:
            return 0
        return server.connections if address is None else server.connections_from(address)

    def _event_handlers(self) -> list[tuple[Any, Any]]:
        handlers = event_handlers(self._store_handler)
        if self._access is not None:
            handlers.insert(0, (evt.EVT_REQUESTED, self._access.on_requested))
        if self._query_retrieve is not None:
            handlers += self._query_retrieve.handlers() + [(evt.EVT_REQUESTED, offer_retrieve_syntaxes)]
        return handlers

    def startService(self) -> None:
        ep = self._endpoint
        self._ae = self._make_ae()
        # make_server, not start_server: only it takes our server class.
        server = self._server = cast(
            GuardedAssociationServer,
            self._ae.make_server(
                (ep.interface, ep.port),
                evt_handlers=self._event_handlers(),
                ssl_context=ep.ssl_context(self._config_dir),
                server_class=GuardedAssociationServer,
                config=self._config,
                backlog=ep.backlog,
                audit=self._store_handler.audit,  # TLS handshakes refused: 110113/110126
            ),
        )
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, name=f"DicomAcceptor@{self.port}", daemon=True).start()
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
