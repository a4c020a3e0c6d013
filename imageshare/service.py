"""
The server as one service tree: catalog, archive, pools, transcoder, HTTP and DICOM.

:func:`make_service` wires the parts from a :class:`~imageshare.config.Config`. Start and
stop are ordered explicitly rather than left to ``MultiService``, because the order
matters for durability: on start, crash recovery runs before anything can receive or
transcode; on stop, the DICOM listener closes first (no new instances), then HTTP, then the
transcoder and its pools drain, and the catalog closes last.
"""

from __future__ import annotations

import functools
import gc
import logging
from typing import Any, Callable

from pynetdicom import _config as pynetdicom_config
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from imageshare import __version__
from imageshare.audit import build_audit
from imageshare.auth import audit_refusals, build_auth, soap_scope
from imageshare.auth.patients import PatientAccess
from imageshare.config import Config
from imageshare.conncaps import ConnectionCaps
from imageshare.endpoints import server_endpoint
from imageshare.fairqueue import FairQueue
from imageshare.logbridge import bridge_stdlib_logging
from imageshare.logsafe import Logger, set_minimum_level
from imageshare.manifests import LocationUid, ManifestBuilder, ManifestService
from imageshare.protocols.dicom.bridge import ReactorBridge
from imageshare.protocols.dicom.access import AccessPolicy
from imageshare.protocols.dicom.handlers import StoreHandler
from imageshare.protocols.dicom.listener import DicomListenerService
from imageshare.protocols.dicom.qr import QueryRetrieveSCP, client_tls_context
from imageshare.protocols.jpip.http import JpipResource
from imageshare.protocols.jpip.server import JpipServer, TargetLoader
from imageshare.protocols.jpip.tcp import AuxChannels
from imageshare.store.archive import Archive
from imageshare.store.catalog import SqliteCatalog
from imageshare.store.ingest import Ingestor, Stored
from imageshare.transcode import worker
from imageshare.transcode.job import mark_failed
from imageshare.transcode.params import EncodeParams
from imageshare.transcode.service import TranscodeService
from imageshare.wado.cache import ResponseCache
from imageshare.web.connections import HTTP_REFUSAL, CappedFactory, ensure_open_files
from imageshare.web.limits import BodyLimits, HttpLimits
from imageshare.web.rad69 import DEFAULT_MAX_BODY as RAD69_MAX_BODY, Rad69Handler, Rad69Resource, Rad69Retriever
from imageshare.web.root import QuietSite, RootResource
from imageshare.web.status import StatusResource
from imageshare.web.wado import WadoResource, WadoRetriever
from imageshare.web.xds import SoapResource, XdsEndpoint, domain_authorities
from imageshare.workers import ProcessPoolService, SharedFlag, WorkerPoolService
from imageshare.xds.outbox import Outbox, State as XdsState
from imageshare.xds.store import XdsStore
from imageshare.xds.submitter import RequestBuilder, SubmitterService, make_http_client


class ListenerService(Service):
    """
    Listens on a Twisted endpoint for the lifetime of the service.

    Unlike ``StreamServerEndpointService`` it fails start-up when the endpoint cannot
    listen (a port in use must not leave a server running without HTTP), and it tells
    where it listens, which port 0 in tests needs.
    """

    log = Logger(namespace="imageshare.http")

    def __init__(
        self, endpoint: IStreamServerEndpoint, factory: Any, description: str, *, name: str = "http",
        label: str = "HTTP", on_listening: Callable[[IListeningPort], None] | None = None,
    ) -> None:
        self.setName(name)
        self._endpoint = endpoint
        self._factory = factory
        self._description = description
        self._label = label
        self._on_listening = on_listening
        self.port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort] | None = None

    def startService(self) -> None:
        super().startService()
        failures: list[Failure] = []
        self._listening = self._endpoint.listen(self._factory)
        self._listening.addCallbacks(self._listened, failures.append)
        if failures:  # TCP, SSL and UNIX endpoints fail synchronously
            failures[0].raiseException()

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        address = port.getHost()
        self.log.info(
            "{label} listening on {host}:{port} ({description})",
            label=self._label,
            host=getattr(address, "host", "?"),
            port=getattr(address, "port", 0),
            description=self._description,
        )
        if self._on_listening is not None:
            self._on_listening(port)
        return port

    def when_listening(self) -> Deferred[IListeningPort]:
        """Fires with the listening port."""
        if self.port is not None:
            return succeed(self.port)
        if self._listening is None:
            raise RuntimeError("the service has not been started")
        d: Deferred[IListeningPort] = Deferred()
        self._listening.addCallback(lambda port: (d.callback(port), port)[1])
        return d

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return maybeDeferred(port.stopListening)
        return None


class ImageShareService(MultiService):
    """The whole server. Children are named: see :func:`make_service`."""

    log = Logger(namespace="imageshare")

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        data_dir = config.storage.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.catalog = SqliteCatalog(data_dir / "catalog.sqlite3")
        self.archive = Archive(data_dir / "archive")
        # The ATNA audit trail ([audit]): local log, spool, syslog; the parts that record events get it.
        self.audit = build_audit(config, reactor, data_dir)
        # replace: who may re-send an instance (same_source: the AE, and certificate, that stored it).
        self.ingestor = Ingestor(self.archive, self.catalog, max_object_size=config.dicom.max_object_size,
                                 replace=config.dicom.replace, on_identity_change=self.audit.identity_changed)
        self.bridge = ReactorBridge(reactor)
        # Seen by the worker processes: running jobs stop between frames at shutdown.
        self.stopping = SharedFlag()
        self.started_at = reactor.seconds()
        # Bearer tokens on every HTTP interface ([auth]); guards are no-ops with mode = none.
        self.auth = auth = build_auth(config, reactor, on_refused=audit_refusals(self.audit))
        scopes = auth.scopes

        tc = config.transcode
        self.db_pool = WorkerPoolService("catalog-pool", 2, reactor)
        # WADO-URI reads, decodes and renders here; the pool size caps concurrent renderings.
        self.wado_pool = WorkerPoolService("wado-pool", config.wado.workers, reactor)
        # WADO-URI and RAD-69 clients take turns for it; 128 waiting in all bounds what many
        # addresses together can hold (each waiting request keeps a connection open).
        self.wado_queue = FairQueue(self.wado_pool, max_per_client=config.wado.max_queue_per_client,
                                    max_waiting=128)
        params = EncodeParams(
            lossless=tc.lossless,
            layer_rates=tc.layer_rates,
            precinct=tc.precinct_size,
            threads=tc.openjpeg_threads,
        )
        self.transcode_pool = ProcessPoolService(
            "transcode-pool",
            tc.workers,
            reactor,
            initializer=worker.initialize,
            initargs=(str(data_dir), params, tc.nice, self.stopping),
        )
        self.transcoder = TranscodeService(
            worker.transcode,
            self.catalog,
            self.transcode_pool,
            self.db_pool,
            max_queue=tc.max_queue,
            give_up=functools.partial(mark_failed, self.catalog),
            on_done=lambda uid: self.jpip.forget(uid),
        )
        # Manifest registration (ITI-41/RAD-68) from a durable outbox of its own.
        self.xds_outbox = Outbox(data_dir / "xds-outbox.sqlite3")
        self.xds: SubmitterService | None = None
        if config.xds.enabled:
            self.xds = SubmitterService(
                self.xds_outbox,
                RequestBuilder(self.xds_outbox, self.archive.root, self.catalog, config.xds),
                self.db_pool,
                auth.internal_client(make_http_client(reactor, config.xds)),
                reactor,
                config.xds,
                catalog=self.catalog,
                audit=self.audit,
            )
        mc = config.manifest
        self.manifests = ManifestService(
            ManifestBuilder(
                self.catalog,
                self.archive,
                self.ingestor,
                retrieve_ae_title=mc.retrieve_ae_title or config.dicom.ae_title,
                retrieve_url=f"{config.http.public_url}/wado",
            ),
            self.catalog,
            self.db_pool,
            reactor,
            stable_after=mc.stable_after,
            location_uid=mc.retrieve_location_uid,
            enabled=mc.enabled,
            on_stored=self._stored,
            on_built=self.xds.manifest_built if self.xds is not None else None,
        )

        jc = config.jpip
        # Tokens naming a patient see only that patient's studies (catalog queries: on a pool).
        location = LocationUid(self.catalog, mc.retrieve_location_uid)
        patients = PatientAccess(self.catalog, lambda: config.xds.domain(location()))
        loader = TargetLoader(self.catalog, data_dir)
        self.jpip = JpipServer(
            lambda uid, stream: self.db_pool.run(loader, uid, stream),
            reactor.seconds,
            session_timeout=jc.session_timeout,
            max_sessions=jc.max_sessions,
            max_sessions_per_client=jc.max_sessions_per_client,
            max_model_bytes=jc.max_model_bytes,
            target_cache=jc.target_cache,
            public_aux_host=jc.tcp_public_host,
            public_aux_port=jc.tcp_public_port,
            tile_header_layout=jc.tile_header_layout,
            openjpeg_user_agents=jc.openjpeg_user_agents,
        )
        self.jpip_aux = AuxChannels(self.jpip, reactor, window=jc.tcp_window, attach_timeout=jc.tcp_attach_timeout)
        self.jpip_sweeper = TimerService(min(30.0, jc.session_timeout / 2), self.jpip.expire)
        self.jpip_sweeper.clock = reactor

        root = RootResource()
        jpip_resource = JpipResource(
            self.jpip,
            chunked=jc.chunked,
            cors_origins=config.http.cors_origins,
            aux=self.jpip_aux if jc.tcp_listen else None,
            visible=lambda patient, uid: self.db_pool.run(patients.instance_allowed, patient, uid),
            in_study=lambda study, uid: self.db_pool.run(patients.instance_in_study, study, uid),
            audit=self.audit,
            # With access control on, early pre-emption (observe) checks the token: owners only.
            authenticate=auth.authenticator.authenticate if auth.authenticator is not None else None,
        )
        # URL grants (handed out in JPIP-referenced headers) open /jpip and /wado for one study.
        root.putChild(b"jpip", auth.guard(jpip_resource, scopes.image_read, grants=True))
        self.wado_cache = ResponseCache(config.wado.cache_bytes) if config.wado.cache_bytes else None
        wado = WadoRetriever(self.catalog, self.archive, data_dir, public_url=config.http.public_url,
                             cache=self.wado_cache, decode_threads=config.wado.decode_threads, patients=patients)
        root.putChild(b"wado", auth.guard(WadoResource(wado, self.wado_queue, cors_origins=config.http.cors_origins,
                                                       audit=self.audit),
                                          scopes.image_read, grants=True))
        self.xds_root = Resource()
        root.putChild(b"xds", self.xds_root)
        # The embedded XDS.b repository and registry; its uniqueId is the manifests' Retrieve Location UID.
        self.xds_store = XdsStore(data_dir / "xds.sqlite3")
        xds_endpoint = XdsEndpoint(
            self.xds_store,
            LocationUid(self.catalog, config.xds.repository_unique_id) if config.xds.repository_unique_id else location,
            patient_authorities=domain_authorities(config.xds, location),
            max_body=config.xds.max_body,
        )
        xds_scope = soap_scope(scopes)

        def xds_reads(request: Any) -> bool:
            # ITI-18 and ITI-43 show a patient's token that patient's objects only (the endpoint
            # filters); ITI-41/42 (and anything not a read) refuse such tokens with 403.
            return xds_scope(request) == scopes.xds_read

        for name, handler in ((b"repository", xds_endpoint.repository), (b"registry", xds_endpoint.registry)):
            self.xds_root.putChild(name, auth.guard(SoapResource(handler, self.db_pool, max_body=config.xds.max_body,
                                                                 audit=self.audit),
                                                    xds_scope, patients=xds_reads))
        # RAD-69 reads and converts instances as WADO does: on the WADO pool.
        rad69_retriever = Rad69Retriever(self.catalog, self.archive, data_dir, public_url=config.http.public_url,
                                         repository_uid=location, patients=patients)
        # A RAD-69 request names documents only: it keeps its own smaller limit inside [xds] max_body.
        rad69_handler = Rad69Handler(rad69_retriever, max_body=min(config.xds.max_body, RAD69_MAX_BODY))
        self.xds_root.putChild(b"imaging-source", auth.guard(Rad69Resource(rad69_handler, self.wado_queue,
                                                                           audit=self.audit),
                                                             scopes.image_read))
        root.putChild(b"status", auth.guard(
            StatusResource(
                self.catalog,
                self.db_pool,
                started=self.started_at,
                now=reactor.seconds,
                extra=lambda: {"transcode_queue": self.transcoder.queued, "manifests": self.manifests.count,
                               "audit_pending": self.audit.pending, **self._xds_counts()},
            ),
            scopes.admin,
        ))
        for name, resource in auth.open_resources().items():  # /health, RFC 9728 metadata
            root.putChild(name, resource)
        self.root = root
        hc = config.http
        limits = HttpLimits(
            # Request bodies by path: the resources that take large ones; the rest hold little.
            bodies=BodyLimits(hc.max_body, {"/jpip": jc.max_body, "/xds": config.xds.max_body}),
            header_timeout=hc.header_timeout,
            body_timeout=hc.body_timeout,
            idle_timeout=hc.idle_timeout,
            max_request_line=hc.max_request_line,
        )
        site = QuietSite(root, request_log=hc.request_log, next_arrival=self.jpip.next_arrival, limits=limits,
                         reactor=reactor)
        site.observers.append(jpip_resource.observe)
        config_dir = config.path.parent if config.path else None
        self.http = ListenerService(server_endpoint(reactor, hc.listen, config_dir),
                                    self._capped(site, "HTTP", refusal=HTTP_REFUSAL), hc.public_url,
                                    on_listening=self._http_listening)
        self.jpip_tcp: ListenerService | None = None
        if jc.tcp_listen:
            self.jpip_tcp = ListenerService(
                server_endpoint(reactor, jc.tcp_listen, config_dir),
                self._capped(self.jpip_aux.factory(), "JPIP aux"),
                "JPIP http-tcp channels",
                name="jpip-tcp",
                label="JPIP aux",
                on_listening=self._aux_listening,
            )
        # Calling-AE lists and certificate pins; its on_refused list is where the audit
        # trail hooks in (a callback per refused association or operation).
        self.dicom_access = AccessPolicy(config.dicom, config.dicom_peers)
        self.dicom_access.on_refused.append(self.audit.dicom_refused)  # ATNA 110113 / 110126
        self.dicom = DicomListenerService(
            config.dicom,
            StoreHandler(self.ingestor, self.bridge, self._stored, access=self.dicom_access, audit=self.audit),
            reactor,
            config_dir=config_dir,
            query_retrieve=QueryRetrieveSCP(
                self.catalog,
                self.archive,
                ae_title=config.dicom.ae_title,
                public_url=config.http.public_url,
                destinations=config.dicom_destinations,
                tls_context=functools.partial(client_tls_context, config.dicom.listen, config_dir),
                access=self.dicom_access,
                audit=self.audit,
            ),
            access=self.dicom_access,
        )
        # Listeners start first: they are what can fail at start (a port in use), and then
        # no pool thread or worker process has started that would keep the process alive.
        # Nothing is served before the reactor runs, by when everything has started.
        listeners = [self.http] + ([self.jpip_tcp] if self.jpip_tcp is not None else []) + [self.dicom]
        for child in (*listeners, self.audit, *auth.services, self.db_pool, self.wado_pool, self.transcode_pool, self.transcoder,
                      self.jpip_sweeper, self.manifests, *([self.xds] if self.xds is not None else [])):
            child.setServiceParent(self)

    def _capped(self, factory: Any, label: str, *, refusal: bytes | None = None) -> CappedFactory:
        # Each listener counts its own connections, within the [http] caps.
        hc = self.config.http
        return CappedFactory(factory, ConnectionCaps(hc.max_connections, hc.max_connections_per_address),
                             self.reactor, label=label, refusal=refusal)

    def _xds_counts(self) -> dict[str, int]:
        # The submitter's counts as of its last change: /status stays off the database.
        counts = self.xds.counts if self.xds is not None else {state: 0 for state in XdsState}
        return {"xds_pending": counts[XdsState.PENDING], "xds_failed": counts[XdsState.FAILED],
                "xds_registered": counts[XdsState.REGISTERED]}

    def _http_listening(self, port: IListeningPort) -> None:
        # The embedded repository is this process: reach it where HTTP really listens.
        # Over TLS the certificate names the public host, so the public URL is kept.
        if self.xds is not None and self.config.xds.embedded and self.config.http.listen.startswith("tcp"):
            address = port.getHost()
            host = getattr(address, "host", "127.0.0.1")
            host = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
            self.xds.post_url = f"http://{host}:{address.port}/xds/repository"

    def _aux_listening(self, port: IListeningPort) -> None:
        # Announced in JPIP-cnew; http-tcp is granted only from now on.
        self.jpip.aux_port = port.getHost().port

    def _stored(self, stored: Stored) -> None:
        uid = stored.record.sop_instance_uid
        self.jpip.forget(uid)  # its codestreams are about to be replaced
        self.transcoder.enqueue(uid)

    def startService(self) -> None:
        # Settle what a crash left behind before anything receives or transcodes.
        published, removed = self.ingestor.recover()
        if published or removed:
            self.log.warn(
                "recovered after an unclean stop: {published} instance(s) published, "
                "{removed} unacknowledged file(s) removed",
                published=published,
                removed=removed,
            )
        self.log.info("ImageShare {version} starting, data in {data_dir}", version=__version__,
                      data_dir=str(self.config.storage.data_dir))
        for warning in self.config.deprecations:
            self.log.warn("configuration: {warning}", warning=warning)
        c = self.config
        # Every connection the caps admit is a file; 256 more for the archive, pools and catalog.
        ensure_open_files(c.http.max_connections * (2 if c.jpip.tcp_listen else 1) + c.dicom.max_associations + 256)
        super().startService()
        # Everything built so far (modules, the service tree) lives as long as the process:
        # keep it out of the collector's full passes, which otherwise pause the reactor
        # for tens of milliseconds once many sessions are open.
        gc.freeze()

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        # Service.stopService (not MultiService's): children are stopped here, in order.
        self.running = 0
        self.stopping.set()
        self.jpip.aux_port = None
        self.jpip_aux.close_all()
        children = (self.dicom, self.http, self.jpip_tcp, self.jpip_sweeper, self.manifests, self.xds,
                    self.transcoder, self.transcode_pool, self.wado_pool, self.db_pool, self.audit)
        for child in children:
            if child is not None and child.running:
                try:
                    await maybeDeferred(child.stopService)
                except Exception:
                    self.log.failure("stopping {name} failed", name=child.name)
        self.bridge.stop()
        self.xds_outbox.close()
        self.xds_store.close()
        self.catalog.close()
        self.audit.close()
        self.log.info("ImageShare stopped")


def make_service(config: Config, reactor: Any) -> ImageShareService:
    """Build the server; nothing listens until the service starts."""
    set_minimum_level(config.log.level)
    bridge_stdlib_logging(("pynetdicom", "pydicom", "glymur"), logging.WARNING)
    # Process-wide pynetdicom settings, set once here (never per request). Query
    # identifiers carry patient names and IDs: keep them out of the log.
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    return ImageShareService(config, reactor)
