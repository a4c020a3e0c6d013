"""
The JPIP server: from a parsed request to a reply (status, headers, messages).

Transport-independent: the HTTP resource (``http.py``) feeds it requests and writes out
what it returns, over HTTP or, for ``http-tcp`` channels, through the auxiliary TCP
channel (``tcp.py``). It owns the sessions and the target cache; every blocking step
(catalog lookups, reading and mapping codestreams) goes to the catalog pool, so the
reactor thread only plans and frames messages.

Pre-emption (15444-9 C.3.3 / KDU ``preempt_request``): requests are numbered as they
arrive (the HTTP channel numbers pipelined requests before Twisted gets to them). A
request on a channel without ``wait=yes`` cuts every earlier response of that channel at
the next message boundary with EOR 3, whether it is streaming or still waiting its turn.

Tile-header bins are sent in the layout the client reads (``plan.py``): ISO/IEC 15444-9's
by default, OpenJPEG's for the clients configured by User-Agent. A session keeps the layout
chosen when it was opened, so its cache model always counts the bytes of one layout.
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator

import attrs
from twisted.internet.defer import Deferred, DeferredLock, maybeDeferred
from twisted.python.failure import Failure

from imageshare.audit.identity import served_record
from imageshare.codestream.index import CodestreamIndex
from imageshare.dicom.uids import is_valid_uid
from imageshare.interfaces import ICatalog
from imageshare.logsafe import Logger
from imageshare.protocols.jpip.cachemodel import CacheModel, CacheSpecTooLarge, apply_spec
from imageshare.protocols.jpip.cachespec import parse_cache_spec
from imageshare.protocols.jpip.messages import EorReason, MessageEncoder
from imageshare.protocols.jpip.plan import (
    OPENJPEG,
    PART9,
    TILE_HEADER_LAYOUTS,
    Piece,
    PlanResult,
    TargetBins,
    commit,
    plan,
)
from imageshare.protocols.jpip.request import JpipRequest, JpipRequestError
from imageshare.protocols.jpip.sessions import Channel, SessionError, SessionRegistry, UnknownChannel
from imageshare.protocols.jpip.tcpchunks import MAX_MESSAGE
from imageshare.protocols.jpip.window import Window, precincts, resolve
from imageshare.store.records import State

# The cache of ready responses for empty models: entries, and the largest kept.
_FRESH_ENTRIES = 256
_FRESH_MAX_BYTES = 1 << 20

#: Transports this server can grant, in order of preference (http-tcp needs its listener).
TRANSPORTS = ("http-tcp", "http")

#: Suffixes a target name may carry after the SOP Instance UID, dropped before the lookup:
#: OpenJPEG's decoder (opj_dec_server) keeps a stream only if its target name contains
#: "jp2". A UID is digits and dots, so neither suffix can be part of one.
TARGET_SUFFIXES = (".jp2", ".j2c")


def target_uid(target: str) -> str:
    """The SOP Instance UID a target names: ``<uid>``, ``<uid>.jp2`` or ``<uid>.j2c``."""
    for suffix in TARGET_SUFFIXES:
        if target[-len(suffix) :].lower() == suffix:
            return target[: -len(suffix)]
    return target


# Headers a browser client must be allowed to read (CORS).
EXPOSED_HEADERS = (
    "JPIP-cnew, JPIP-tid, JPIP-qid, JPIP-fsiz, JPIP-roff, JPIP-rsiz, JPIP-comps, "
    "JPIP-layers, JPIP-len, JPIP-stream"
)


class JpipError(Exception):
    """A request that gets an HTTP error status instead of a stream.

    ``retry_after`` (seconds), if set, tells a refused client when to try again.
    """

    def __init__(self, status: int, reason: str, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after

    @classmethod
    def from_session(cls, e: SessionError) -> "JpipError":
        """The answer to a request its session state refuses (limits carry ``retry_after``)."""
        return cls(e.status, e.reason, getattr(e, "retry_after", None))


@attrs.frozen(eq=False)
class Target:
    """One codestream (frame) of one instance, ready to serve."""

    sop_instance_uid: str
    stream: int  # codestream number: frame number − 1
    tid: str
    index: CodestreamIndex
    bins: TargetBins
    data: Any  # the codestream, memory-mapped (read-only)
    size: int
    #: The instance and its patient for the audit trail (a ``ServedRecord``), read by the loader.
    record: Any = attrs.field(default=None, repr=False)
    _other_bins: dict[str, TargetBins] = attrs.field(factory=dict, init=False, repr=False)

    def bins_for(self, layout: str) -> TargetBins:
        """The data-bins with tile-header bins in ``layout`` (``bins`` is the part9 one)."""
        if layout == self.bins.tile_header_layout:
            return self.bins
        bins = self._other_bins.get(layout)
        if bins is None:
            # Built on first use by such a client: per tile, from the index, without
            # reading the codestream (tile-header bytes are gathered when first sent).
            bins = self._other_bins[layout] = TargetBins(self.index, layout, self.data)
        return bins


class TargetLoader:
    """Finds and maps codestreams (blocking: run it on a pool)."""

    def __init__(self, catalog: ICatalog, data_dir: Path) -> None:
        self._catalog = catalog
        self._data_dir = data_dir

    def __call__(self, sop_instance_uid: str, stream: int) -> Target | None:
        row = self._catalog.get_instance(sop_instance_uid)
        if row is None or row.state is not State.STREAMABLE:
            return None
        frames = self._catalog.frames(sop_instance_uid)
        if not 0 <= stream < len(frames):
            return None
        frame = frames[stream]
        index = CodestreamIndex.from_json((self._data_dir / frame.index_path).read_bytes())
        path = self._data_dir / frame.codestream_path
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        # The tid names these exact bytes: a re-sent instance is a new generation with a
        # new path, so its codestream gets a new tid and clients drop their caches.
        tid = hashlib.sha256(f"{frame.codestream_path}:{frame.codestream_size}".encode()).hexdigest()[:32]
        return Target(sop_instance_uid, stream, tid, index, TargetBins(index), data, len(data),
                      served_record(self._catalog, row))


@attrs.define(eq=False)
class SessionState:
    """What a session keeps: its instance, the client's cache model, a request lock."""

    sop_instance_uid: str
    model: CacheModel
    tids: dict[int, str] = attrs.Factory(dict)  # codestream → the tid the model describes
    lock: DeferredLock = attrs.Factory(DeferredLock)
    # Fixed when the session opens: the model's bin lengths are those of this layout.
    layout: str = PART9
    # Whether the audit trail has this session's (one) target: recorded once per session.
    audited: bool = False


@attrs.frozen
class Reply:
    """Status line, JPIP headers and the messages to send, with the channel that carries them."""

    status: int
    headers: tuple[tuple[str, str], ...]
    content_type: str
    body: "Body"
    cid: str | None = None  # the channel whose transport carries the body (None: stateless)
    transport: str = "http"
    #: Set when this reply is the first to serve data of its session's target, or is
    #: stateless: what the audit trail records (the target's ``record``); else ``None``.
    audit: Any = None


class Body:
    """
    The messages of one response, produced lazily, committed to the model as they go.

    :meth:`messages` yields one message at a time (header and body); the caller calls
    :meth:`sent` once those bytes are handed to the transport, so a response cut short
    leaves the model exact. The session's lock is released by :meth:`close`.

    A body on a channel can be pre-empted (:meth:`cut`): the messages end at the next
    boundary with EOR 3. The transport sets :attr:`on_cut` to act at once, even while it
    is waiting for its peer, so that the next request is not held up by a slow reader.
    """

    def __init__(
        self,
        target: Target,
        result: PlanResult,
        model: CacheModel | None,
        release: Callable[[], None] | None,
        encoded: tuple[bytes, ...] | None = None,
        *,
        arrival: int = 0,
        channel: Channel | None = None,
    ) -> None:
        self._target = target
        self._result = result
        self._encoded = encoded
        self._model = model
        self._release = release
        self._encoder = MessageEncoder()
        self._encoder.reset()  # explicit class and codestream on the first message
        self.bytes_sent = 0
        self.arrival = arrival
        self._channel = channel
        #: False where the length was promised up front (Content-Length framing).
        self.preemptible = channel is not None
        self.on_cut: Callable[[], None] | None = None
        self._cut = False
        self._finished = False  # every planned message has been yielded
        if channel is not None:
            channel.active = self
            self._cut = channel.cut_before > arrival  # a newer request came while this one queued

    @property
    def eor_reason(self) -> int:
        if self._cut and not self._finished:
            return int(EorReason.WINDOW_CHANGE)
        return self._result.eor_reason

    @property
    def is_cut(self) -> bool:
        """Pre-empted before all its messages went out."""
        return self._cut and not self._finished

    def cut(self) -> None:
        """A newer request pre-empts this response (no effect once it is complete)."""
        if self._cut or self._finished or not self.preemptible or self._channel is None:
            return  # already cut, complete, closed, or its length was promised
        self._cut = True
        if self.on_cut is not None:
            self.on_cut()

    def length(self) -> int:
        """Exact size of the whole body (for Content-Length)."""
        if self._encoded is not None:
            return sum(len(m) for m in self._encoded)
        encoder = MessageEncoder()
        encoder.reset()
        total = 0
        for p in self._result.pieces:
            total += len(encoder.header(p.bin_class, p.csn, p.bin_id, p.bin_offset, p.length, p.complete, p.aux))
            total += p.length
        return total + len(encoder.eor(self._result.eor_reason))

    def messages(self) -> Iterator[tuple[bytes, Piece | None]]:
        """Each message's bytes with the piece it carries (``None`` for the final EOR)."""
        pieces = self._result.pieces
        data = self._target.data
        for i, piece in enumerate(pieces):
            if self._cut and self.preemptible:
                yield self._encoder.eor(EorReason.WINDOW_CHANGE), None
                return
            if self._encoded is not None:
                yield self._encoded[i], piece
                continue
            head = self._encoder.header(
                piece.bin_class, piece.csn, piece.bin_id, piece.bin_offset, piece.length, piece.complete, piece.aux
            )
            yield head + piece.body(data), piece
        self._finished = True
        yield self._encoder.eor(self._result.eor_reason), None

    def sent(self, message: bytes, piece: Piece | None) -> None:
        """A message went to the transport: from now on the client holds it."""
        self.bytes_sent += len(message)
        if piece is not None and self._model is not None:
            commit(self._model, [piece])

    def close(self) -> None:
        if self._channel is not None:
            if self._channel.active is self:
                self._channel.active = None
            self._channel = None
        if self._release is not None:
            release, self._release = self._release, None
            release()


class JpipServer:
    """
    Serves JPIP requests for the instances in the catalog.

    Parameters
    ----------
    load
        ``(sop_instance_uid, stream) -> Deferred[Target | None]`` (runs the loader on a pool).
    now
        Current time in seconds (``reactor.seconds`` or a ``Clock``'s).
    aux_port
        Where the http-tcp listener listens (set once it does); ``None``: http only.
    public_aux_host, public_aux_port
        Announced in ``JPIP-cnew`` for http-tcp channels (``host=``, ``auxport=``) instead
        of nothing and :attr:`aux_port`, when clients reach the aux listener through NAT or
        a TCP proxy; http-tcp is still granted only while the listener is up.
    max_sessions_per_client
        Sessions one client (see :meth:`respond`) may hold; ``None``: no per-client cap.
    tile_header_layout
        The tile-header bin layout for every client (``part9`` or ``openjpeg``,
        ``[jpip] tile_header_layout``).
    openjpeg_user_agents
        User-Agent prefixes of clients that get the ``openjpeg`` layout whatever
        ``tile_header_layout`` says (``[jpip] openjpeg_user_agents``).
    """

    log = Logger(namespace="imageshare.jpip")

    def __init__(
        self,
        load: Callable[[str, int], Any],
        now: Callable[[], float],
        *,
        session_timeout: float = 300,
        max_sessions: int = 1000,
        max_model_bytes: int = 8 << 20,
        target_cache: int = 64,
        aux_port: int | None = None,
        max_sessions_per_client: int | None = None,
        public_aux_host: str | None = None,
        public_aux_port: int | None = None,
        tile_header_layout: str = PART9,
        openjpeg_user_agents: tuple[str, ...] = (),
    ) -> None:
        if tile_header_layout not in TILE_HEADER_LAYOUTS:
            raise ValueError(f"unknown tile-header layout {tile_header_layout!r}")
        # An empty prefix would match every client: that is what tile_header_layout is for.
        self._tile_header_layout = tile_header_layout
        self._openjpeg_user_agents = tuple(a for a in openjpeg_user_agents if a)
        self._load = load
        self._now = now
        self.aux_port = aux_port
        self._public_aux_host = public_aux_host
        self._public_aux_port = public_aux_port
        #: Called with every channel that ends, so transports can let go of it.
        self.channel_closed: list[Callable[[Channel], None]] = []
        self.sessions: SessionRegistry[SessionState] = SessionRegistry(
            idle_timeout=session_timeout,
            max_sessions=max_sessions,
            max_sessions_per_client=max_sessions_per_client,
            on_close=self._closed,
        )
        self._arrivals = itertools.count(1)
        self._loading: dict[tuple[str, int], list[Deferred[Target | None]]] = {}
        self._max_model_bytes = max_model_bytes
        self._targets: OrderedDict[tuple[str, int], Target] = OrderedDict()
        self._target_cache = target_cache
        # Responses to clients that hold nothing (a new session's first view, a stateless
        # request without model) depend only on the codestream and the window: many
        # viewers open a study on the same first view, so those are kept ready to send.
        self._fresh: OrderedDict[tuple[Any, ...], tuple[PlanResult, tuple[bytes, ...]]] = OrderedDict()
        self._windows: OrderedDict[tuple[str, Window], tuple[Any, list[tuple[int, int, int, int]]]] = OrderedDict()

    def layout_for(self, user_agent: str | None) -> str:
        """The tile-header layout for a client, from its User-Agent (``None``: none sent)."""
        if user_agent is not None and user_agent.startswith(self._openjpeg_user_agents):
            return OPENJPEG
        return self._tile_header_layout

    def next_arrival(self) -> int:
        """Number a request as it arrives: later requests pre-empt earlier ones."""
        return next(self._arrivals)

    def preempt(self, cid: str, arrival: int, owner: str | None = None) -> None:
        """Request ``arrival`` came on channel ``cid`` without ``wait=yes``: cut what came before.

        ``owner`` given: only a request of the session's owner pre-empts.
        """
        channel = self.sessions.find(cid)
        if channel is None or (owner is not None and channel.session.owner != owner):
            return
        channel.cut_before = max(channel.cut_before, arrival)
        body = channel.active
        if body is not None and body.arrival < arrival:
            body.cut()

    def _closed(self, channel: Channel) -> None:
        for hook in self.channel_closed:
            hook(channel)

    async def target(self, sop_instance_uid: str, stream: int) -> Target:
        """The codestream to serve, from the cache or loaded off the reactor."""
        key = (sop_instance_uid, stream)
        target = self._targets.get(key)
        if target is not None:
            self._targets.move_to_end(key)
            return target
        if not is_valid_uid(sop_instance_uid):
            raise JpipError(404, "no such target")
        # Requests for a codestream being loaded wait for that one load, and resume in the
        # order they came: the requests of a session must reach its lock in arrival order.
        waiters = self._loading.get(key)
        first = waiters is None
        if waiters is None:
            waiters = self._loading[key] = []
        waiting: Deferred[Target | None] = Deferred()
        waiters.append(waiting)
        if first:
            maybeDeferred(self._load, sop_instance_uid, stream).addBoth(self._loaded, key)
        loaded = await waiting
        if loaded is None:
            raise JpipError(404, "no such target, or it is not (yet) streamable")
        return loaded

    def _loaded(self, result: Any, key: tuple[str, int]) -> None:
        waiters = self._loading.pop(key, [])
        if isinstance(result, Target):
            self._targets[key] = result
            while len(self._targets) > self._target_cache:
                self._targets.popitem(last=False)
        for waiting in waiters:
            if isinstance(result, Failure):
                waiting.errback(result)
            else:
                waiting.callback(result)

    def forget(self, sop_instance_uid: str) -> None:
        """Drop cached codestreams of an instance (it was received again)."""
        for key in [k for k in self._targets if k[0] == sop_instance_uid]:
            tid = self._targets.pop(key).tid
            for cache in (self._fresh, self._windows):
                for stale in [k for k in cache if k[0] == tid]:
                    del cache[stale]

    def expire(self) -> int:
        """Drop idle sessions (called periodically); return how many."""
        return len(self.sessions.expire(self._now()))

    async def respond(
        self, request: JpipRequest, arrival: int | None = None, client: str = "", user_agent: str | None = None,
        owner: str = "",
    ) -> Reply:
        """
        Serve one request; ``arrival`` numbers it (:meth:`next_arrival`) for pre-emption.

        ``client`` names who asks (the peer address, or later an authenticated principal):
        a new session counts against that client's cap. ``user_agent`` (the HTTP header)
        picks the tile-header layout of a stateless request or of the session it opens;
        requests in a session keep the session's. ``owner`` names the authenticated
        principal: a session belongs to the owner that opened it, and its channels answer
        anyone else as unknown (404).

        Raises
        ------
        JpipError
            For 4xx/5xx answers (unknown target or channel, limits, bad combinations).
        """
        if arrival is None:
            arrival = self.next_arrival()
        if request.cid is not None and not request.wait:
            self.preempt(request.cid, arrival, owner)
        now = self._now()
        headers: list[tuple[str, str]] = []
        if request.qid is not None:
            headers.append(("JPIP-qid", str(request.qid)))
        stream = self._stream(request, headers)
        session_state: SessionState | None = None
        channel: Channel | None = None
        try:
            if request.cid is not None:
                found = self.sessions.find(request.cid)
                if found is not None and found.session.owner != owner:
                    raise UnknownChannel(f"unknown or expired channel {request.cid[:48]!r}")
                channel = self.sessions.channel(request.cid, now)
                session_state = channel.session.model
                if request.target is not None and target_uid(request.target) != session_state.sop_instance_uid:
                    raise JpipError(400, "a session serves one target; open a new session for another")
                if request.cnew:
                    # The response to the request that opens a channel travels on it.
                    channel = self.sessions.add_channel(request.cid, self._transport(request), now)
                    headers.append(("JPIP-cnew", self._cnew(channel)))
                if request.cclose:
                    self.sessions.close(request.cid, request.cclose, now)
                uid = session_state.sop_instance_uid
            else:
                if request.cclose:
                    raise JpipError(400, "cclose needs a cid")
                if request.target is None:
                    raise JpipError(400, "no target")
                uid = target_uid(request.target)
        except SessionError as e:
            raise JpipError.from_session(e) from None

        new_transport = self._transport(request) if request.cid is None and request.cnew else None
        if new_transport is not None:
            # Refuse a client over its cap before loading anything for it.
            try:
                self.sessions.admit(client, now)
            except SessionError as e:
                raise JpipError.from_session(e) from None
        target = await self.target(uid, stream)
        if new_transport is not None:
            session_state = SessionState(uid, CacheModel(), layout=self.layout_for(user_agent))
            try:
                # Checked again: other requests of this client may have opened sessions
                # while this one waited for its target.
                channel = self.sessions.open(uid, session_state, new_transport, self._now(), client, owner)
            except SessionError as e:
                raise JpipError.from_session(e) from None
            headers.append(("JPIP-cnew", self._cnew(channel)))
            self.log.debug("JPIP session of {client} sends {layout} tile headers (User-Agent {user_agent})",
                           client=client, layout=session_state.layout, user_agent=user_agent)
        if channel is not None and self.sessions.find(channel.cid) is None:
            channel = None  # cclose ended this channel: the answer goes back on the request
        transport = channel.transport if channel is not None else "http"
        max_message = MAX_MESSAGE if transport == "http-tcp" else None  # chunks hold whole messages

        tid_matches = request.tid is not None and request.tid == target.tid
        if not tid_matches:
            headers.append(("JPIP-tid", target.tid))

        try:
            window = self._window(request)
            resolved, selected = self._resolve(target, window)
        except ValueError as e:
            raise JpipError(400, f"bad view-window: {e}") from None
        for name in ("fsiz", "roff", "rsiz"):
            # The region is reported also when the request left it out (then it is the
            # whole frame granted): OpenJPEG's viewer otherwise keeps -1 for it and asks
            # for nonsense next (opj_server does the same).
            omitted = name != "fsiz" and request.fsiz is not None and getattr(request, name) is None
            if name in resolved.changed or omitted:
                x, y = getattr(resolved, name)
                headers.append((f"JPIP-{name}", f"{x},{y}"))
        if "comps" in resolved.changed:
            headers.append(("JPIP-comps", ",".join(str(c) for c in resolved.comps)))
        if "layers" in resolved.changed:
            headers.append(("JPIP-layers", str(resolved.layers)))
        jpt = request.type == "jpt-stream"
        content_type = "image/jpt-stream" if jpt else "image/jpp-stream"

        if session_state is not None:
            await session_state.lock.acquire()
            model = session_state.model
            if model.approx_bytes() > self._max_model_bytes:
                session_state.lock.release()
                # The session ends once its EOR 6 is out, so that it goes out on the
                # channel's own transport (an http-tcp connection closes with the session).
                body = Body(target, PlanResult((), int(EorReason.SESSION_LIMIT), 0), None,
                            lambda: self._end_session(request))
                return Reply(200, tuple(headers), content_type, body, channel.cid if channel else None, transport)
            # The instance was received again since the model was built: what the client
            # holds describes other bytes, so it starts afresh (it sees the new JPIP-tid).
            if session_state.tids.setdefault(stream, target.tid) != target.tid:
                session_state.model = model = CacheModel()
                session_state.tids = {stream: target.tid}
            release: Callable[[], None] | None = session_state.lock.release
        else:
            release = None
        layout = session_state.layout if session_state is not None else self.layout_for(user_agent)
        encoded: tuple[bytes, ...] | None = None
        try:
            bins = target.bins_for(layout)
            if session_state is not None:
                self._apply_specs(request, model, target, bins, tid_matches)
            else:
                model = self._stateless_model(request, target, bins, tid_matches)
            if channel is not None and channel.cut_before > arrival:
                result = PlanResult((), int(EorReason.WINDOW_CHANGE), 0)  # pre-empted while it queued
            elif model.entries == 0:
                result, encoded = self._fresh_plan(target, bins, resolved, selected, stream, jpt, request.len,
                                                   request.align, max_message)
            else:
                result = plan(bins, target.index, resolved, selected, model, stream, jpt=jpt,
                              byte_limit=request.len, align=request.align, max_message=max_message)
        except BaseException:
            if release is not None:
                release()
            raise
        if request.len and not result.pieces and result.eor_reason == EorReason.BYTE_LIMIT:
            headers.append(("JPIP-len", "100"))  # too small to carry even one message
        body = Body(target, result, model if session_state else None, release, encoded,
                    arrival=arrival, channel=channel)
        # Audited once per session (a session serves one instance), and per stateless request.
        audit = target.record if session_state is None or not session_state.audited else None
        if session_state is not None:
            session_state.audited = True
        return Reply(200, tuple(headers), content_type, body, channel.cid if channel else None, transport, audit)

    def _resolve(self, target: Target, window: Window) -> tuple[Any, list[tuple[int, int, int, int]]]:
        """The window's geometry and precincts; viewers repeat windows, so they are memoised."""
        key = (target.tid, window)
        hit = self._windows.get(key)
        if hit is not None:
            self._windows.move_to_end(key)
            return hit
        resolved = resolve(target.index, window)
        selected = precincts(target.index, resolved) if window.fsiz is not None else []
        self._windows[key] = (resolved, selected)
        while len(self._windows) > _FRESH_ENTRIES:
            self._windows.popitem(last=False)
        return resolved, selected

    def _fresh_plan(
        self, target: Target, bins: TargetBins, resolved: Any, selected: list[tuple[int, int, int, int]],
        stream: int, jpt: bool, byte_limit: int | None, align: bool, max_message: int | None,
    ) -> tuple[PlanResult, tuple[bytes, ...] | None]:
        """The plan for an empty cache model, from a small cache of encoded responses."""
        key = (target.tid, stream, resolved, jpt, byte_limit, align, max_message, bins.tile_header_layout)
        hit = self._fresh.get(key)
        if hit is not None:
            self._fresh.move_to_end(key)
            return hit
        result = plan(bins, target.index, resolved, selected, CacheModel(), stream, jpt=jpt,
                      byte_limit=byte_limit, align=align, max_message=max_message)
        if result.size > _FRESH_MAX_BYTES:
            return result, None  # large responses are produced lazily, not kept
        encoder = MessageEncoder()
        encoder.reset()
        encoded = tuple(
            encoder.header(p.bin_class, p.csn, p.bin_id, p.bin_offset, p.length, p.complete, p.aux)
            + p.body(target.data)
            for p in result.pieces
        ) + (encoder.eor(result.eor_reason),)
        self._fresh[key] = (result, encoded)
        while len(self._fresh) > _FRESH_ENTRIES:
            self._fresh.popitem(last=False)
        return result, encoded

    # -- helpers ---------------------------------------------------------------------------

    def _end_session(self, request: JpipRequest) -> None:
        if request.cid is not None:
            try:
                self.sessions.close(request.cid, ["*"], self._now())
            except SessionError:
                pass

    def _transport(self, request: JpipRequest) -> str:
        """The transport to grant: the best of ours the client offered (never one it did not)."""
        for ours in TRANSPORTS:
            if ours in request.cnew and (ours != "http-tcp" or self.aux_port is not None):
                return ours
        raise JpipError(501, f"none of the offered transports ({', '.join(request.cnew)}) is supported")

    def _cnew(self, channel: Channel) -> str:
        granted = f"cid={channel.cid},path=jpip,transport={channel.transport}"
        if channel.transport == "http-tcp":
            # host= names where the channel's requests and its TCP connection go (JPIP-cnew,
            # 15444-9 D.2); without it clients use the host they reached, the right default.
            if self._public_aux_host is not None:
                granted += f",host={self._public_aux_host}"
            granted += f",auxport={self._public_aux_port or self.aux_port}"
        return granted

    @staticmethod
    def _stream(request: JpipRequest, headers: list[tuple[str, str]]) -> int:
        if not request.stream:
            return 0
        lo, hi, _step = request.stream[0]
        if len(request.stream) > 1 or (hi is not None and hi != lo) or hi is None:
            headers.append(("JPIP-stream", str(lo)))  # one codestream per request
        return lo

    @staticmethod
    def _window(request: JpipRequest) -> Window:
        fsiz = request.fsiz
        return Window(
            fsiz=(fsiz.fx, fsiz.fy) if fsiz is not None else None,
            round=fsiz.round if fsiz is not None else "round-down",
            roff=request.roff,
            rsiz=request.rsiz,
            comps=request.comps,
            layers=request.layers,
        )

    def _apply_specs(
        self, request: JpipRequest, model: CacheModel, target: Target, bins: TargetBins, tid_matches: bool
    ) -> None:
        # Statements about the client's cache only make sense for the bytes it names.
        if request.model and (tid_matches or request.tid is None):
            self._apply(model, request.model, target, bins, subtractive=True)

    def _stateless_model(
        self, request: JpipRequest, target: Target, bins: TargetBins, tid_matches: bool
    ) -> CacheModel:
        # Bin lengths (":n" qualifiers, whole bins, need=) are those of the request's layout.
        model = CacheModel()
        usable = tid_matches or request.tid is None
        if request.model and usable:
            self._apply(model, request.model, target, bins, subtractive=True)
        if request.need and usable:
            # need= names what the client lacks: it holds everything else.
            for key in bins.keys(target.stream):
                length = bins.length(key[0], key[2]) or 0
                model.add(key, length, complete=True)
            self._apply(model, request.need, target, bins, subtractive=False, invert=True)
        return model

    def _apply(
        self, model: CacheModel, text: str, target: Target, bins: TargetBins, *, subtractive: bool,
        invert: bool = False,
    ) -> None:  # fmt: skip
        try:
            spec = parse_cache_spec(text, allow_subtractive=subtractive)
            items = [attrs.evolve(i, subtractive=True) for i in spec.items] if invert else spec.items
            apply_spec(model, items, target.index, target.stream, bin_lengths=bins.length)
        except JpipRequestError:
            raise
        except CacheSpecTooLarge as e:
            raise JpipError(400, f"cache description too large: {e}") from None
        if spec.ignored:
            self.log.info("ignored cache items {items}", items=list(spec.ignored)[:10])

