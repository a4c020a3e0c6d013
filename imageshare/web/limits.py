"""
What one HTTP client may make the server spend, as plain values and counters (no I/O).

The channel (:mod:`imageshare.web.channel`) and the listeners' connection caps
(:mod:`imageshare.web.connections`) enforce these; here are only the rules:

- :class:`BodyLimits`: the largest request body per path prefix, looked up from the
  request-target as soon as the headers are in, before any of the body is read;
- :class:`HttpLimits`: that table, the three receive deadlines of a connection and the
  longest request line and head.

Connections at once are counted by :class:`imageshare.conncaps.ConnectionCaps`.

Their refusals are logged through :mod:`imageshare.logthrottle`, so that a flood of
refusals cannot flood the log too.
"""

from __future__ import annotations

from typing import Mapping
from urllib.parse import unquote_to_bytes

import attrs

__all__ = ["BodyLimits", "HttpLimits", "request_segments"]


def request_segments(target: bytes) -> tuple[bytes, ...]:
    """
    The path segments of a request-target, unquoted, as ``twisted.web.server`` resolves them.

    ``Request.process`` splits the path (the target before ``?``) on ``/`` after the first
    byte and unquotes each segment; matching the same way means a quoted spelling
    (``/%6Apip``) reaches the limit of the resource it reaches.
    """
    path = target.split(b"?", 1)[0]
    return tuple(unquote_to_bytes(s) for s in path[1:].split(b"/"))


@attrs.frozen
class BodyLimits:
    """
    The largest request body, by path prefix; ``default`` where no prefix matches.

    Parameters
    ----------
    default
        Bytes allowed where no prefix matches.
    prefixes
        ``{"/jpip": 1048576, "/xds": 67108864}``: the longest prefix, compared segment by
        segment, wins; ``"/xds"`` covers ``/xds/repository`` but not ``/xdsfoo``.
    """

    default: int
    prefixes: Mapping[str, int] = attrs.field(factory=dict)
    _table: tuple[tuple[tuple[bytes, ...], int], ...] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        table = []
        for prefix, limit in self.prefixes.items():
            if not prefix.startswith("/") or limit < 0:
                raise ValueError(f"a body limit needs an absolute path and a size: {prefix!r}={limit}")
            table.append((request_segments(prefix.rstrip("/").encode()), limit))
        # Longest first: the first match is the most specific one.
        object.__setattr__(self, "_table", tuple(sorted(table, key=lambda t: -len(t[0]))))

    def limit_for(self, target: bytes) -> int:
        """The body limit for the request-target ``target`` (as on the request line)."""
        segments = request_segments(target)
        for prefix, limit in self._table:
            if segments[: len(prefix)] == prefix:
                return limit
        return self.default


@attrs.frozen
class HttpLimits:
    """
    Bounds on receiving requests over one HTTP connection.

    Attributes
    ----------
    bodies
        Request body limits.
    header_timeout
        Seconds from the first byte of a request until its headers are complete.
    body_timeout
        Seconds from the end of the headers until the body is complete.
    idle_timeout
        Seconds a connection stays open with no request in progress.
    max_request_line
        Bytes of a request line (without CRLF); longer gets 414. Twisted's own bound was
        16384 (a longer line closed the connection without an answer), kept as the default
        so that no request served before is refused now (a JPIP GET may carry a long
        ``model=``).
    header_bytes
        Bytes the header lines may add to the request line: the head (request line and
        header lines, without CRLFs) is at most :attr:`max_head`; longer gets 431.
    """

    bodies: BodyLimits = BodyLimits(65536)
    header_timeout: float = 20.0
    body_timeout: float = 120.0
    idle_timeout: float = 60.0
    max_request_line: int = 16384
    header_bytes: int = 16384  # HTTPChannel.totalHeadersSize

    @property
    def max_head(self) -> int:
        """Bytes of a whole head: request line and header lines, CRLFs not counted."""
        return self.max_request_line + self.header_bytes
