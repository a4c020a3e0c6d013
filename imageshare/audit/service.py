"""
The audit subsystem as one service: writer thread, local log, spool, sender.

:meth:`Audit.record` may be called from any thread: it formats the RFC 5424 message (cheap,
pure) and queues it for the audit writer, one thread, which appends it to the local audit
log (fsynced), adds it to the spool when a repository is configured, and wakes the sender
on the reactor. One thread keeps the order; nothing blocks the reactor or the caller.
Messages recorded before the service starts wait for it; those recorded after it stopped
(an association thread finishing late) are written directly by the caller.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from imageshare.audit.messages import AuditMessage, Node
from imageshare.audit.sender import SyslogSender, TlsLink, UdpLink
from imageshare.audit.store import AuditLog, Spool
from imageshare.audit.syslog import format_message
from imageshare.audit.trail import AuditTrail
from imageshare.config import AuditConfig, Config
from imageshare.endpoints import client_tls_material
from imageshare.logsafe import Logger

__all__ = ["Audit", "build_audit"]

log = Logger(namespace="imageshare.audit")


class Audit(MultiService, AuditTrail):
    """See the module docstring; built by :func:`build_audit`."""

    def __init__(self, reactor: Any, data_dir: Path, config: AuditConfig, *, source_id: str, app: Node,
                 hostname: str, tls_options: Any = None) -> None:
        MultiService.__init__(self)
        AuditTrail.__init__(self, source_id, app, reactor.seconds, config.site_id)
        self.setName("audit")
        self._reactor = reactor
        self._hostname = hostname
        self._procid = str(os.getpid())
        self._lock = threading.Lock()  # one writer at a time: the pool's thread, or a late caller
        self._pool = ThreadPool(1, 1, name="audit-writer")
        self._stopped = False
        self.log_path = data_dir / "audit.log"
        self._log = AuditLog(self.log_path)
        self.spool: Spool | None = None
        self.sender: SyslogSender | None = None
        self._full_since = 0  # messages left out of the spool in the current episode
        if config.syslog is not None:
            kind, host, port = config.syslog
            self.spool = Spool(data_dir / "audit-spool.sqlite3", config.max_spool)
            if kind == "udp":
                link: Any = UdpLink(reactor, host, port)
            else:
                from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

                link = TlsLink(wrapClientTLS(tls_options, HostnameEndpoint(reactor, host, port, timeout=10)))
            spool = self.spool
            self.sender = SyslogSender(
                link,
                lambda after: self._run(spool.batch, after, 200),
                lambda last: self._run(spool.remove_through, last),
                reactor,
                where=f"{kind}:{host}:{port}",
                retry_max=config.retry_max,
            )
            self.sender.setServiceParent(self)

    @property
    def pending(self) -> int:
        """Messages waiting for the repository (``audit_pending`` in /status)."""
        return self.spool.pending if self.spool is not None else 0

    def _run(self, fn: Any, *args: Any) -> "Deferred[Any]":
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def record(self, message: AuditMessage) -> None:
        when = datetime.datetime.fromtimestamp(self._reactor.seconds(), datetime.timezone.utc)
        body = format_message(message.to_xml(), when=when, hostname=self._hostname, app_name="imageshare",
                              procid=self._procid)
        if self._stopped:
            self._write(body)
        else:
            self._pool.callInThread(self._write, body)

    def _write(self, body: bytes) -> None:
        with self._lock:
            try:
                self._log.append(body)
            except Exception:
                log.failure("audit message could not be written to {path}", path=str(self.log_path))
            if self.spool is None:
                return
            try:
                added = self.spool.add(body)
            except Exception:
                log.failure("audit message could not be spooled")
                return
            if not added:
                if self._full_since == 0:
                    log.error("audit spool full ({max} bytes): new audit messages are kept in the local audit "
                              "log only until the repository takes the waiting ones", max=self.spool.max_bytes)
                self._full_since += 1
                return
            if self._full_since:
                log.warn("audit spool accepting again; {count} audit message(s) were not forwarded (they are "
                         "in the local audit log)", count=self._full_since)
                self._full_since = 0
        if self.sender is not None and not self._stopped:
            self._reactor.callFromThread(self.sender.wake)

    def startService(self) -> None:
        self._pool.start()
        super().startService()
        self.application_started()

    def stopService(self) -> "Deferred[None]":
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self.application_stopped()
        await self._run(lambda: None)  # everything recorded so far is written (one thread: FIFO)
        await super().stopService()  # type: ignore[misc]
        with self._lock:
            self._stopped = True
        self._pool.stop()

    def close(self) -> None:
        """Close the files (after the service stopped); later messages are lost, and logged."""
        with self._lock:
            self._log.close()
            if self.spool is not None:
                self.spool.close()


def _tls_options(config: AuditConfig, host: str) -> Any:
    from twisted.internet import ssl

    trust, client_cert = client_tls_material(config.ca_file, config.client_cert, config.client_key)
    return ssl.optionsForClientTLS(host, trustRoot=trust, clientCertificate=client_cert)


def build_audit(config: Config, reactor: Any, data_dir: Path) -> Audit:
    """The audit subsystem for the composition root: add it to the service tree, pass it to the parts."""
    ac = config.audit
    tls = _tls_options(ac, ac.syslog[1]) if ac.syslog is not None and ac.syslog[0] == "tls" else None
    hostname = socket.gethostname()
    return Audit(reactor, data_dir, ac, source_id=ac.source_id or config.dicom.ae_title,
                 app=Node(config.dicom.ae_title, hostname), hostname=hostname, tls_options=tls)
