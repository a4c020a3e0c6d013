"""
Response header names spelt on the wire as their standards spell them.

``twisted.web.http_headers.Headers`` stores every name in "Http-Header-Case" (each
dash-separated word capitalised), so ``JPIP-cnew`` set by the JPIP resource leaves as
``Jpip-Cnew``. HTTP says header names are case-insensitive, but JPIP clients do not all
agree: OpenJPEG's viewer (``opj_jpip_viewer``) looks ``JPIP-cnew``, ``JPIP-fsiz``... up
case-sensitively in Java's header map, misses them all, and its decoder then gets a
stream without a channel id and aborts. ISO/IEC 15444-9 (D.2) spells every JPIP response
header ``JPIP-`` plus the lower-case request field name (``JPIP-tid``, ``JPIP-cnew``,
``JPIP-qid``, ``JPIP-fsiz``, ``JPIP-rsiz``, ``JPIP-roff``, ``JPIP-comps``, ``JPIP-stream``,
``JPIP-layers``, ``JPIP-len``, ``JPIP-quality``, ``JPIP-type``, ``JPIP-mset``...), so one
rule covers them all, including ones not sent today.

The respelling happens when Twisted reads the names to write them
(:meth:`Headers.getAllRawHeaders`, public API), not by changing Twisted's global name
table: lookups stay case-insensitive and nothing outside our own requests changes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from twisted.web.http_headers import Headers

__all__ = ["WireCaseHeaders", "wire_name"]

_JPIP = b"jpip-"


def wire_name(name: bytes) -> bytes:
    """
    The spelling of a header name on the wire.

    Parameters
    ----------
    name
        A header name in any case (Twisted hands out ``Jpip-Cnew``).

    Returns
    -------
    bytes
        ``JPIP-`` and the rest in lower case for JPIP headers (``JPIP-cnew``); any other
        name unchanged.
    """
    if name[:5].lower() == _JPIP:
        return b"JPIP-" + name[5:].lower()
    return name


class WireCaseHeaders(Headers):
    """
    ``Headers`` whose names come out as :func:`wire_name` spells them.

    Used as a request's ``responseHeaders`` (see ``ArrivalRequest``); storage and lookups
    are Twisted's own, so ``getRawHeaders(b"jpip-cnew")`` and friends work as before.
    """

    __slots__ = ()

    def getAllRawHeaders(self) -> Iterator[tuple[bytes, Sequence[bytes]]]:
        for name, values in super().getAllRawHeaders():
            yield wire_name(name), values
