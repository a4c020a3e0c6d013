"""
pynetdicom's association server, bounded in what one peer can make it spend.

pynetdicom accepts connections in a thread of its own and runs each association in two
more. As it comes, it reads a PDU as long as its header claims, lets any number of
connections wait for their A-ASSOCIATE-RQ for ``acse_timeout``, counts associations only
in total and after negotiation, and does the TLS handshake in the accept thread (one
silent client stops every other). This module plugs into its public extension points,
``AE.make_server(server_class=...)`` and the server's ``request_handler``, and adds:

* caps on connections per client address and in total, checked in the accept thread
  before any thread is started; a connection over a cap is closed at once, and the
  refusals are logged at most once a minute per address, with a count;
* the TLS handshake in the connection's own thread, within the negotiation deadline;
* a deadline (``negotiation_timeout``) for the whole A-ASSOCIATE-RQ to arrive, and
  ``network_timeout`` on the socket, so a peer that stops mid-PDU is dropped;
* every received byte goes through :class:`~.pduguard.PduFramer` before pynetdicom sees
  it: a PDU or a message over our limits gets an A-ABORT, the socket is closed, and
  pynetdicom reads end of stream; nothing past the limit is read.

A connection is counted from accept until its association thread has ended, whatever the
way it ends (the handler's ``finally``).
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
import time
from typing import Any, Callable

from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from imageshare.audit.trail import NO_AUDIT, AuditTrail
from imageshare.config import DicomConfig
from imageshare.conncaps import ConnectionCaps
from imageshare.logsafe import Logger
from imageshare.logthrottle import LogThrottle
from imageshare.protocols.dicom.pduguard import (
    REASON_NOT_SPECIFIED,
    PduFramer,
    Refusal,
    abort_pdu,
    max_pdata_length,
)

log = Logger(namespace="imageshare.dicom")

#: Seconds between two log lines about refusals from one address.
LOG_INTERVAL = 60.0
#: Seconds we wait for an A-ABORT to leave before closing anyway.
_ABORT_SEND_TIMEOUT = 1.0


class ConnectionGuard:
    """
    The per-connection state behind :class:`GuardedSocket`: framer, deadline, drop.

    ``recv`` runs in pynetdicom's DUL thread; ``drop`` in the request handler's thread.
    The lock keeps a close in one from racing a shutdown in the other (a file descriptor
    closed by one thread could be reused by another connection before the shutdown).
    """

    def __init__(self, framer: PduFramer, on_refused: Callable[[Refusal], None], stall_timeout: float) -> None:
        self.lock = threading.RLock()
        #: Set when the A-ASSOCIATE-RQ is complete or the connection was dropped.
        self.settled = threading.Event()
        self.framer = framer
        self._on_refused = on_refused
        self._stall_timeout = stall_timeout
        self.dropped = False

    @property
    def negotiating(self) -> bool:
        """True until the whole A-ASSOCIATE-RQ has come in."""
        return not self.framer.associate_received

    def recv(self, sock: socket.socket, raw_recv: Callable[[int, int], bytes], bufsize: int, flags: int) -> bytes:
        """Read from the socket and let the framer judge; ``b""`` once refused."""
        if self.dropped:
            return b""
        try:
            data = raw_recv(bufsize, flags)
        except TimeoutError:
            # pynetdicom only reads once select() saw data, so this is a peer that stopped
            # in the middle of a PDU.
            stalled = f"no data for {self._stall_timeout:g} s in the middle of a PDU"
            self._refuse(sock, Refusal(stalled, REASON_NOT_SPECIFIED))
            return b""
        except (OSError, ValueError):
            if self.dropped:  # drop() shut the socket down under this read
                return b""
            raise
        refusal = self.framer.receive(data)
        if refusal is not None:
            self._refuse(sock, refusal)
            return b""
        if not self.negotiating:
            self.settled.set()
        return data

    def _refuse(self, sock: socket.socket, refusal: Refusal) -> None:
        # In the DUL thread, which alone writes to the socket: the A-ABORT cannot
        # interleave with a PDU of ours.
        with self.lock:
            self.dropped = True
            try:
                sock.settimeout(_ABORT_SEND_TIMEOUT)
                sock.sendall(abort_pdu(refusal.abort_reason))
            except (OSError, ValueError):
                pass
            _hard_shutdown(sock)
            sock.close()
        self.settled.set()
        self._on_refused(refusal)

    def drop(self, sock: socket.socket, refusal: Refusal) -> None:
        """
        End the connection from another thread: no A-ABORT (the peer has not asked for an
        association; PS3.8 lets ARTIM expiry just close), and no close() either, which is
        left to pynetdicom's thread, woken from its read by the shutdown.
        """
        with self.lock:
            if self.dropped or not self.negotiating:  # the request came in just in time
                return
            self.dropped = True
            _hard_shutdown(sock)
        self.settled.set()
        self._on_refused(refusal)


def _hard_shutdown(sock: socket.socket) -> None:
    try:
        if isinstance(sock, ssl.SSLSocket):
            # The plain socket's shutdown: SSLSocket.shutdown() would discard the TLS
            # state under a read that may be running in another thread.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        else:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class GuardedSocket(socket.socket):
    """A socket whose ``recv`` goes through its :class:`ConnectionGuard`, once it has one."""

    guard: ConnectionGuard | None = None

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        guard = self.guard
        if guard is None:
            return super().recv(bufsize, flags)
        return guard.recv(self, super().recv, bufsize, flags)

    def close(self) -> None:
        guard = self.guard
        if guard is None:
            super().close()
            return
        with guard.lock:
            super().close()


class GuardedSSLSocket(GuardedSocket, ssl.SSLSocket):  # type: ignore[misc]
    """The TLS form: what ``SSLContext.wrap_socket`` returns once the server set it as the
    context's ``sslsocket_class``. It must stay an ``SSLSocket``: pynetdicom asks
    ``pending()`` of those, for data already decrypted that select() cannot see."""


def _refused_by_tls(e: BaseException) -> bool:
    """Whether a failed handshake is a TLS refusal (a certificate, a protocol), for the audit
    trail; not a timeout, a reset, or a peer that closed before or during it."""
    return isinstance(e, ssl.SSLError) and not isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError))


class GuardedRequestHandler(RequestHandler):
    """One connection, in its own thread: TLS, guard, association, wait, release."""

    server: "GuardedAssociationServer"
    association: Association | None = None

    def handle(self) -> None:
        server = self.server
        address = str(self.client_address[0])
        peer = f"{address}:{self.client_address[1]}"
        deadline = time.monotonic() + server.negotiation_timeout
        try:
            sock = self._secure(self.request, deadline, address, peer)
            if sock is None:
                return
            guard = ConnectionGuard(
                server.new_framer(),
                lambda refusal: server.report_refusal(address, peer, refusal),
                server.network_timeout,
            )
            sock.guard = guard
            sock.settimeout(server.network_timeout)
            self.request = sock
            super().handle()  # builds the association (see _create_association) and starts it
            if not guard.settled.wait(max(0.0, deadline - time.monotonic())):
                late = f"no A-ASSOCIATE-RQ within {server.negotiation_timeout:g} s"
                guard.drop(sock, Refusal(late, REASON_NOT_SPECIFIED))
            assoc = self.association
            if assoc is not None:
                if guard.negotiating:
                    # Dropped before the request was whole, so pynetdicom has none queued:
                    # its acceptor thread would wait on for it. An empty item ends that wait
                    # the way a timeout does (Association.run_reactor), and frees the count.
                    assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]
                else:
                    assoc.acse_timeout = server.ae.acse_timeout  # for the release, as configured
                assoc.join()
        finally:
            try:
                self.request.close()
            except OSError:
                pass
            server.release(address)

    def _secure(self, sock: GuardedSocket, deadline: float, address: str, peer: str) -> GuardedSocket | None:
        """The TLS handshake, here rather than in the accept thread, within the deadline."""
        context = self.server.ssl_context
        if context is None:
            return sock
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            self.request = tls
            tls.do_handshake()
        except (OSError, ValueError) as e:
            failed = f"TLS handshake failed: {type(e).__name__}: {e}"
            self.server.report_refusal(address, peer, Refusal(failed, REASON_NOT_SPECIFIED))
            if _refused_by_tls(e):
                self.server.audit.node_authentication_failed(address, f"DICOM TLS listener, peer {peer}", failed)
            return None
        assert isinstance(tls, GuardedSSLSocket)
        return tls

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # pynetdicom's acceptor thread waits acse_timeout for the A-ASSOCIATE-RQ, and its
        # ARTIM timer runs as long. Past negotiation_timeout the connection is gone
        # anyway, so the threads (and our count of them) end then too.
        acse_timeout = self.server.ae.acse_timeout
        negotiation_timeout = self.server.negotiation_timeout
        assoc.acse_timeout = negotiation_timeout if acse_timeout is None else min(negotiation_timeout, acse_timeout)
        self.association = assoc
        return assoc


class GuardedAssociationServer(ThreadedAssociationServer):
    """
    The association server with our limits; build it with ``AE.make_server``.

    Parameters
    ----------
    ae, address, ae_title, contexts, ssl_context, evt_handlers
        As for pynetdicom's ``AssociationServer``. A TLS context gets
        :class:`GuardedSSLSocket` as its ``sslsocket_class``.
    config
        The ``[dicom]`` section: ``max_pdu``, ``max_object_size``, ``max_associations``,
        ``max_associations_per_address``, ``negotiation_timeout``, ``network_timeout``.
    backlog
        The listen queue.
    clock
        Seconds, for the log throttle.
    audit
        Records TLS handshakes refused by this side or the peer (110113, 110126), from the
        connection's thread (the trail is thread-safe and does not block).
    """

    # Handler threads only wait for their association: they must not hold up shutdown,
    # which aborts the associations after closing the server.
    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        ae: Any,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[Any],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        config: DicomConfig,
        backlog: int = 50,
        clock: Callable[[], float] = time.monotonic,
        audit: AuditTrail = NO_AUDIT,
    ) -> None:
        self.audit = audit
        self.negotiation_timeout = config.negotiation_timeout
        self.network_timeout = config.network_timeout
        self._max_pdata = max_pdata_length(config.max_pdu, config.max_object_size)
        self._max_object = config.max_object_size
        self._lock = threading.Lock()
        self._limits = ConnectionCaps(config.max_associations, config.max_associations_per_address)
        self._throttle = LogThrottle(LOG_INTERVAL)
        self._clock = clock
        self.request_queue_size = backlog  # read by listen() in the base constructor
        if ssl_context is not None:
            ssl_context.sslsocket_class = GuardedSSLSocket
        super().__init__(
            ae, address, ae_title, contexts, ssl_context, evt_handlers, request_handler=GuardedRequestHandler
        )

    def new_framer(self) -> PduFramer:
        return PduFramer(max_pdata=self._max_pdata, max_object_size=self._max_object)

    @property
    def connections(self) -> int:
        """Connections open now (admitted, not yet released)."""
        with self._lock:
            return self._limits.open

    def connections_from(self, address: str) -> int:
        with self._lock:
            return self._limits.held(address)

    # -- socketserver hooks, all in the accept thread but the last --------------------

    def get_request(self) -> tuple[GuardedSocket, Any]:
        # No TLS here: the handshake waits on the peer, and this thread serves everyone.
        assert self.socket is not None  # bound in the constructor
        conn, address = self.socket.accept()
        return GuardedSocket(conn.family, conn.type, conn.proto, fileno=conn.detach()), address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        address = str(client_address[0])
        with self._lock:
            refused = self._limits.admit(address)
            held = self._limits.held(address)
            count = self._throttle.hit((address, "limit"), self._clock()) if refused else None
        if refused is None:
            return True
        if count is not None:
            log.warn(
                "refused {count} DICOM connection(s) from {address} since the last report: "
                "{held} open from it (max {per_address}), {total} in total (max {max_total})",
                count=count,
                address=address,
                held=held,
                per_address=self._limits.max_per_address,
                total=self.connections,
                max_total=self._limits.max_total,
            )
        return False  # the caller closes the socket at once

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:
            # No thread, so no handler to release the count.
            self.release(str(client_address[0]))
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.failure("unexpected error on the DICOM connection from {address}", address=str(client_address[0]))

    def release(self, address: str) -> None:
        with self._lock:
            self._limits.release(address)

    def report_refusal(self, address: str, peer: str, refusal: Refusal) -> None:
        """Log a dropped connection, throttled per address. Any thread."""
        with self._lock:
            count = self._throttle.hit((address, "drop"), self._clock())
        if count is None:
            return
        log.warn(
            "dropped DICOM connection from {peer}: {reason} (PDU type {pdu_type}, claimed length "
            "{claimed_length}); {count} dropped from {address} since the last report",
            peer=peer,
            reason=refusal.reason,
            pdu_type=f"{refusal.pdu_type:#04x}" if refusal.pdu_type is not None else "-",
            claimed_length=refusal.claimed_length if refusal.claimed_length is not None else "-",
            count=count,
            address=address,
        )

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket (connections are the AE's)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()
