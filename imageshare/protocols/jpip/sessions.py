"""
JPIP sessions and channels (ISO/IEC 15444-9 Annex B/C.3), without clocks or I/O.

A session binds one target (one codestream of one instance) to one cache model, and has
one or more channels; requests name a channel by its ``cid``. Time is passed in as
``now`` so that the owner can drive expiry from a ``Clock`` (style.md: "keep session.py
free of clocks").
"""

from __future__ import annotations

import math
import secrets
from typing import Any, Callable, Generic, Iterable, TypeVar

import attrs

M = TypeVar("M")


class SessionError(Exception):
    """A request cannot be served in the session it names; ``status`` is the HTTP status."""

    status = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownChannel(SessionError):
    """No such channel (never existed, closed or expired): the client starts anew."""

    status = 404


class SessionLimit(SessionError):
    """Too many sessions or channels; try again later.

    ``retry_after`` is the number of seconds after which one of the sessions in the way
    expires if it stays idle (``None`` where waiting frees nothing, e.g. channels).
    """

    status = 503

    def __init__(self, reason: str, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@attrs.define(eq=False)
class Channel:
    cid: str
    transport: str
    session: "Session[Any]"
    #: Requests that arrived before this number are pre-empted (a newer one came without wait=yes).
    cut_before: int = 0
    #: What the transport is sending for this channel now (opaque here; the server's Body).
    active: Any = None


@attrs.define(eq=False)
class Session(Generic[M]):
    """One client's view of one target: the cache model its channels share."""

    target: Any  # opaque to this module: what the server needs to find the codestream
    model: M
    last_used: float
    #: Whose session it is (a peer address today, an authenticated principal later).
    client: str = ""
    #: Who opened it (an authenticated principal, ``""`` without access control): only
    #: that owner may use its channels; to anyone else they do not exist.
    owner: str = ""
    channels: dict[str, Channel] = attrs.Factory(dict)
    closed: bool = False


def new_cid(transport: str) -> str:
    """An unguessable channel id; the 4th character tells the transport (as Kakadu does)."""
    tag = {"http": "JPH_", "http-tcp": "JPHT", "http-udp": "JPHU"}.get(transport, "JPHX")
    return tag + secrets.token_hex(16)


class SessionRegistry(Generic[M]):
    """
    All live sessions, with limits and idle expiry.

    Parameters
    ----------
    idle_timeout
        Seconds without a request after which a session and its channels are dropped.
    max_sessions
        Sessions alive at once; beyond it new sessions are refused (503).
    max_sessions_per_client
        Sessions one client may hold at once; beyond it that client's new sessions are
        refused (503), other clients' are not. ``None``: no per-client cap.
    max_channels
        Channels per session.
    on_close
        Called with every channel that ends (``cclose``, expiry, its session dropped), so
        that the owner can release what the channel holds (a TCP connection, a response).
    """

    def __init__(
        self,
        *,
        idle_timeout: float,
        max_sessions: int,
        max_sessions_per_client: int | None = None,
        max_channels: int = 8,
        on_close: Callable[[Channel], None] | None = None,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.max_sessions_per_client = max_sessions_per_client
        self.max_channels = max_channels
        self._on_close = on_close
        self._channels: dict[str, Channel] = {}
        self._sessions: set[Session[M]] = set()
        # Live sessions by client; a client without sessions has no entry.
        self._by_client: dict[str, set[Session[M]]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def count(self, client: str) -> int:
        """Live sessions of ``client``."""
        return len(self._by_client.get(client, ()))

    def admit(self, client: str, now: float) -> None:
        """
        Check that ``client`` may open a session now, without opening one.

        Lets the owner refuse before doing any work for the request; :meth:`open` checks
        again.

        Raises
        ------
        SessionLimit
            At the per-client or the global cap, once idle sessions are dropped.
        """
        # Expiry is swept periodically by the owner; scanning every session on every new
        # one would make session creation O(n). Only at a limit is it worth a sweep, and
        # at the client's own limit only its sessions are looked at.
        cap = self.max_sessions_per_client
        if cap is not None and self.count(client) >= cap:
            self._expire(list(self._by_client[client]), now)
            if self.count(client) >= cap:
                raise SessionLimit(f"too many sessions for this client ({cap})",
                                   self._retry_after(self._by_client[client], now))
        if len(self._sessions) >= self.max_sessions:
            self.expire(now)
        if len(self._sessions) >= self.max_sessions:
            raise SessionLimit(f"too many sessions ({self.max_sessions})", self._retry_after(self._sessions, now))

    def open(self, target: Any, model: M, transport: str, now: float, client: str = "", owner: str = "") -> Channel:
        """Start a session of ``client`` with its first channel.

        Raises
        ------
        SessionLimit
            See :meth:`admit`.
        """
        self.admit(client, now)
        session: Session[M] = Session(target=target, model=model, last_used=now, client=client, owner=owner)
        self._sessions.add(session)
        self._by_client.setdefault(client, set()).add(session)
        return self._add_channel(session, transport)

    def _retry_after(self, sessions: Iterable[Session[M]], now: float) -> int:
        """Seconds until the least recently used of ``sessions`` expires if left idle."""
        oldest = min((s.last_used for s in sessions), default=now)
        return max(1, math.ceil(oldest + self.idle_timeout - now))

    def add_channel(self, cid: str, transport: str, now: float) -> Channel:
        """A new channel in the session of channel ``cid``."""
        session = self.channel(cid, now).session
        if len(session.channels) >= self.max_channels:
            raise SessionLimit(f"too many channels in this session ({self.max_channels})")
        return self._add_channel(session, transport)

    def _add_channel(self, session: Session[M], transport: str) -> Channel:
        cid = new_cid(transport)
        channel = Channel(cid=cid, transport=transport, session=session)
        session.channels[cid] = channel
        self._channels[cid] = channel
        return channel

    def channel(self, cid: str, now: float) -> Channel:
        """The live channel ``cid``; touching it keeps its session alive."""
        channel = self._channels.get(cid)
        if channel is None or channel.session.closed:
            raise UnknownChannel(f"unknown or expired channel {cid[:48]!r}")
        if now - channel.session.last_used > self.idle_timeout:
            self._drop(channel.session)
            raise UnknownChannel(f"unknown or expired channel {cid[:48]!r}")
        channel.session.last_used = now
        return channel

    def close(self, cid: str | None, which: Iterable[str], now: float) -> list[str]:
        """
        Close channels (``cclose``): the listed ones, or every channel of the session of
        ``cid`` for ``*``. All must belong to one session. A session without channels ends.

        Returns the closed channel ids.
        """
        which = list(which)
        if which == ["*"]:
            if cid is None:
                raise SessionError("cclose=* needs a cid")
            session = self.channel(cid, now).session
            targets = list(session.channels)
        else:
            targets = which
            sessions = {id(self.channel(c, now).session) for c in targets}
            if len(sessions) > 1:
                raise SessionError("cclose names channels of different sessions")
        closed = []
        for c in targets:
            channel = self._channels.pop(c, None)
            if channel is not None:
                channel.session.channels.pop(c, None)
                closed.append(c)
                self._closed(channel)
                if not channel.session.channels:
                    self._drop(channel.session)
        return closed

    def find(self, cid: str) -> Channel | None:
        """The live channel ``cid``, without touching its session (for transports)."""
        channel = self._channels.get(cid)
        return None if channel is None or channel.session.closed else channel

    def expire(self, now: float) -> list[Session[M]]:
        """Drop idle sessions; return them (the caller may log or release resources)."""
        return self._expire(self._sessions, now)

    def _expire(self, sessions: Iterable[Session[M]], now: float) -> list[Session[M]]:
        idle = [s for s in sessions if now - s.last_used > self.idle_timeout]
        for s in idle:
            self._drop(s)
        return idle

    def _drop(self, session: Session[M]) -> None:
        """End a session: every path that ends one (cclose, expiry, limits) comes here."""
        if session.closed:
            return  # already dropped: its slots are free already
        session.closed = True
        channels = list(session.channels.values())
        for c in session.channels:
            self._channels.pop(c, None)
        session.channels.clear()
        self._sessions.discard(session)
        mine = self._by_client.get(session.client)
        if mine is not None:
            mine.discard(session)
            if not mine:
                del self._by_client[session.client]  # clients come and go: keep no empty entries
        for channel in channels:
            self._closed(channel)

    def _closed(self, channel: Channel) -> None:
        if self._on_close is not None:
            self._on_close(channel)
