"""
JPIP over HTTP (ISO/IEC 15444-9 Annex F): the ``/jpip`` resource.

A thin adapter: it parses the request (``request.py``), asks the :class:`JpipServer` for
a reply and streams the messages through a pull producer, so that a full-resolution
response is written as the transport asks for it, never held whole in memory, and the
session's cache model records exactly what was handed to the transport. Replies for
``http-tcp`` channels carry only the status and JPIP headers here; their messages go to
the channel's TCP connection (``tcp.py``).

Pre-emption needs to hear of a request before Twisted, which holds pipelined requests
back while a response streams, gets to it: :meth:`JpipResource.observe` is called by the
site's HTTP channel with every request as soon as its bytes are in. That is before the
guard has checked its token, so with access control on it checks the token itself
(``authenticate``) and pre-empts only for the session's owner: anyone else presenting a
channel id never cuts the owner's response (and gets 404 when its turn comes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IPullProducer
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from imageshare.audit.trail import NO_AUDIT, AuditTrail
from imageshare.auth.guard import principal_of
from imageshare.logsafe import Logger
from imageshare.logthrottle import RefusalLog
from imageshare.protocols.jpip.request import JpipRequestError, parse_request
from imageshare.protocols.jpip.server import EXPOSED_HEADERS, Body, JpipError, JpipServer, Reply, target_uid
from imageshare.web.clients import ClientKey, peer_address
from imageshare.web.cors import Cors, add_vary
from imageshare.web.pipeline import ScannedRequest

if TYPE_CHECKING:
    from imageshare.auth.tokens import Principal
    from imageshare.protocols.jpip.tcp import AuxChannels

log = Logger(namespace="imageshare.jpip")
# A client can provoke refusals as fast as it can send: one line per client and status.
refusals = RefusalLog(log)

# Bytes written per resumeProducing: big enough to keep the socket busy, small enough
# that a slow client holds little memory.
WRITE_BATCH = 64 * 1024


@implementer(IPullProducer)
class BodyProducer:
    """Writes a :class:`Body` into a request as the transport asks for more."""

    def __init__(self, request: Request, body: Body) -> None:
        self._request = request
        self._body = body
        self._messages: Iterator[tuple[bytes, Any]] = body.messages()
        self._done = False

    def start(self) -> None:
        self._body.on_cut = self._cut
        self._request.registerProducer(self, False)

    def _cut(self) -> None:
        # Pre-empted: end now with EOR 3, even if the client is not reading, so that the
        # next request (held back behind this response) is served without waiting.
        if self._done:
            return
        message, piece = next(self._messages)  # the body yields its EOR 3 now
        self._request.write(message)
        self._body.sent(message, piece)
        self._finish()

    def resumeProducing(self) -> None:
        if self._done:
            return
        # One write per call: the HTTP channel pauses its producer once per write that
        # finds the transport buffer full but resumes it only once, so several writes
        # per call would leave the response paused for ever.
        batch: list[tuple[bytes, Any]] = []
        size = 0
        finished = False
        try:
            while size < WRITE_BATCH:
                message, piece = next(self._messages)
                batch.append((message, piece))
                size += len(message)
        except StopIteration:
            finished = True
        except Exception:
            # A response cut without its EOR must not look complete to the client: drop
            # the connection instead of ending the body normally.
            log.failure("building a JPIP response failed")
            self._done = True
            self._body.close()
            self._request.unregisterProducer()
            self._request.loseConnection()
            return
        if batch:
            self._request.write(b"".join(m for m, _ in batch))
            for message, piece in batch:
                self._body.sent(message, piece)
        if finished:
            self._finish()

    def stopProducing(self) -> None:
        # The client went away: whatever was not written is not in the model.
        self._done = True
        self._body.close()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self._body.close()
        self._request.unregisterProducer()
        self._request.finish()


class JpipResource(Resource):
    """``/jpip`` and ``/jpip/<target>``: GET and POST.

    Parameters
    ----------
    server
        Answers the parsed requests.
    chunked
        Stream bodies chunked; ``False`` sends Content-Length.
    cors_origins
        Origins allowed to read the responses from a browser (``*`` for any):
        ``[http] cors_origins``, see :mod:`imageshare.web.cors`.
    aux
        The http-tcp channels, if that listener is up.
    client_key
        Names the client of a request, whose sessions count against its cap.
    visible
        ``(patient, sop_instance_uid) -> Deferred[bool]``: whether a token naming
        ``patient`` may see the target (off the reactor); a target it may not see is
        answered exactly as a missing one. ``None``: such tokens see no target.
    in_study
        ``(study_uid, sop_instance_uid) -> Deferred[bool]``: whether the target is in the
        one study a URL grant opens (off the reactor); others answer as missing ones.
        ``None``: such principals see no target.
    audit
        Records the JPIP data served (110104 R): once per session and its target (the
        reply that first serves data in it), once per stateless request.
    """

    isLeaf = True

    def __init__(
        self,
        server: JpipServer,
        *,
        chunked: bool = True,
        cors_origins: tuple[str, ...] = (),
        aux: "AuxChannels | None" = None,
        client_key: ClientKey = peer_address,
        visible: Callable[[str, str], Deferred[bool]] | None = None,
        audit: AuditTrail = NO_AUDIT,
        authenticate: "Callable[[bytes | None], Awaitable[Principal]] | None" = None,
        in_study: Callable[[str, str], Deferred[bool]] | None = None,
    ) -> None:
        super().__init__()
        self._in_study = in_study
        # The guard's token check (Authenticator.authenticate), for early pre-emption; None: access control off.
        self._authenticate = authenticate
        self._audit = audit  # ATNA 110104 R: the first data of each session (or stateless request)
        self._server = server
        self._visible = visible
        self._chunked = chunked
        # POST bodies are forms (Content-Type is not safelisted for a script's fetch);
        # the JPIP response headers carry the session and the window actually sent.
        self._cors = Cors(cors_origins, methods=("GET", "POST"), allow_headers=("Content-Type",),
                          expose=(EXPOSED_HEADERS, "Retry-After"))
        self._aux = aux
        self._client_key = client_key

    def observe(self, scanned: ScannedRequest, arrival: int) -> None:
        """A request's bytes are in (maybe behind a streaming response): pre-empt early."""
        target, _, query = scanned.target.partition(b"?")
        if target != b"/jpip" and not target.startswith(b"/jpip/"):
            return
        if b"cid=" not in query and b"cid=" not in scanned.body:
            return  # no channel, nothing to pre-empt (and most first views): skip the parse
        headers = dict(scanned.headers)
        try:
            parsed = parse_request(
                scanned.method.decode("ascii", "replace"),
                None,
                query,
                scanned.body if scanned.method == b"POST" else None,
                _decode(headers.get(b"content-type")),
                None,
            )
        except JpipRequestError:
            return  # answered with its error when its turn comes
        if parsed.cid is None or parsed.wait:
            return
        if self._authenticate is None:
            self._server.preempt(parsed.cid, arrival)  # access control off: no owners to tell apart
            return
        cid = parsed.cid
        d = ensureDeferred(self._authenticate(headers.get(b"authorization")))

        def authorised(principal: Principal) -> None:
            # Only the session's owner cuts its running response; the arrival number keeps the
            # order right however long the check took.
            self._server.preempt(cid, arrival, f"{principal.issuer}\x00{principal.subject}")

        # A bad token pre-empts nothing: the guard answers it when its turn comes.
        d.addCallbacks(authorised, lambda _: None)

    def render_OPTIONS(self, request: Request) -> int:
        return self._cors.preflight(request)

    def render_GET(self, request: Request) -> Any:
        return self._render(request)

    def render_POST(self, request: Request) -> Any:
        return self._render(request)

    def _render(self, request: Request) -> Any:
        self._cors.apply(request)
        granted = getattr(principal_of(request), "study", None) is not None
        # An answer opened by a URL grant is the principal's own: never in a shared cache.
        request.setHeader(b"cache-control", b"private, no-cache" if granted else b"no-cache")
        path_target = "/".join(p.decode("utf-8", "replace") for p in request.postpath) or None
        body = request.content.read() if request.method == b"POST" and request.content else None
        query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
        try:
            parsed = parse_request(
                request.method.decode("ascii", "replace"),
                path_target,
                query,
                body,
                _header(request, b"content-type"),
                _header(request, b"accept"),
            )
        except JpipRequestError as e:
            if e.field == "type":
                add_vary(request, "Accept")  # a 415 may come from the Accept header
            return self._error(request, e.status, e.reason)
        if parsed.type_from_accept:
            # No type field: the Accept header picks jpp-stream or jpt-stream (or the default).
            add_vary(request, "Accept")
        if parsed.unknown:
            refusals.info(
                (peer_address(request), "unknown"),
                "ignored unknown JPIP request fields {fields}",
                fields=[name for name in parsed.unknown if name != "grant"][:20],
            )

        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        # Numbered by the HTTP channel when its request line came in (see observe).
        arrival = getattr(request, "arrival", None)
        # The User-Agent picks the tile-header layout (``[jpip] openjpeg_user_agents``).
        principal = principal_of(request)
        patient = principal.patient if principal is not None else None

        async def answer() -> Reply:
            if patient is not None and parsed.target is not None:
                # A token naming a patient sees that patient's targets only; others do not exist.
                allowed = self._visible is not None and await self._visible(patient, target_uid(parsed.target))
                if not allowed:
                    raise JpipError(404, "no such target, or it is not (yet) streamable")
            # A session belongs to the principal (issuer, subject) that opened it.
            owner = f"{principal.issuer}\x00{principal.subject}" if principal is not None else ""
            study = principal.study if principal is not None else None
            if study is not None:
                # A URL grant opens its one study's targets only (others do not exist), and
                # its sessions are its own: never the token holder's sessions on other studies.
                owner += f"\x00{study}"
                if parsed.target is not None and not (
                        self._in_study is not None and await self._in_study(study, target_uid(parsed.target))):
                    raise JpipError(404, "no such target, or it is not (yet) streamable")
            return await self._server.respond(parsed, arrival, self._client_key(request),
                                              _header(request, b"user-agent"), owner=owner)

        d = ensureDeferred(answer())
        d.addCallbacks(
            lambda reply: self._stream(request, reply, parsed.qid, gone), lambda f: self._failed(request, f, gone)
        )
        return NOT_DONE_YET

    def _stream(self, request: Request, reply: Reply, qid: int | None, gone: list[bool]) -> None:
        body = reply.body
        if reply.audit is not None:  # once per session: see Reply.audit
            self._audit.instances_served("JPIP", peer_address(request), [reply.audit], principal_of(request))
        if reply.transport == "http-tcp" and reply.cid is not None and self._aux is not None:
            # The data goes to the channel's TCP connection whether or not this request's
            # HTTP connection is still there: the client reads it from the other socket.
            self._aux.deliver(reply.cid, qid or 0, body)
            if not gone:
                self._headers(request, reply)
                request.setHeader(b"content-length", b"0")
                request.finish()
            return
        if gone:  # the client left while we looked things up
            body.close()
            return
        self._headers(request, reply)
        if not self._chunked:
            body.preemptible = False  # the length is promised: the response runs to its end
            request.setHeader(b"content-length", str(body.length()).encode())
        producer = BodyProducer(request, body)
        request.notifyFinish().addErrback(lambda _: producer.stopProducing())
        producer.start()

    @staticmethod
    def _headers(request: Request, reply: Reply) -> None:
        request.setResponseCode(reply.status)
        for name, value in reply.headers:
            request.setHeader(name.encode(), value.encode())
        request.setHeader(b"content-type", reply.content_type.encode())

    def _failed(self, request: Request, failure: Failure, gone: list[bool]) -> None:
        if failure.check(JpipError):
            e: JpipError = failure.value  # type: ignore[assignment]
            status, reason = e.status, e.reason
            if e.retry_after is not None and not gone:
                request.setHeader(b"retry-after", str(e.retry_after).encode("ascii"))
        elif failure.check(JpipRequestError):
            r: JpipRequestError = failure.value  # type: ignore[assignment]
            status, reason = r.status, r.reason
        else:
            log.failure("JPIP request failed", failure)
            status, reason = 500, "internal error, see the server log"
        if gone:
            return
        request.write(self._error(request, status, reason))
        request.finish()

    @staticmethod
    def _error(request: Request, status: int, reason: str) -> bytes:
        client = peer_address(request)
        refusals.info((client, status), "JPIP request from {client} refused with {status}: {reason}",
                      client=client, status=status, reason=reason)
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (reason + "\n").encode("utf-8")


def _header(request: Request, name: bytes) -> str | None:
    return _decode(request.getHeader(name))


def _decode(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None
