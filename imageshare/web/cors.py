"""
Cross-origin reads by browsers (CORS, the Fetch standard) for the browser-facing resources.

One policy, ``[http] cors_origins``, says which web origins may read our responses from
a script; each resource (``/jpip``, ``/wado``) wraps it in a :class:`Cors` with what it
answers: its methods, the request headers a script may send and the response headers a
script may read. The resource calls :meth:`Cors.apply` on every response and
:meth:`Cors.preflight` to answer ``OPTIONS``.

- An origin not in the list gets no ``Access-Control-*`` header at all (the browser then
  hides the response from the script; the request itself was harmless, like any GET).
- With a list of origins the response names the request's origin and so depends on it:
  every response then says ``Vary: Origin``, also one without CORS headers, so that a
  shared cache never hands one origin's answer to another. ``*`` needs no ``Vary``.
- No credentials are allowed (no cookies or HTTP authentication are used here).
"""

from __future__ import annotations

from typing import Sequence

from twisted.web.server import NOT_DONE_YET, Request

__all__ = ["Cors", "add_vary"]

#: Seconds a browser may reuse a preflight answer (browsers cap it: Chromium at 7200).
MAX_AGE = 600


def add_vary(request: Request, *names: str) -> None:
    """Add ``names`` to the response's ``Vary`` header, keeping what is there, once each."""
    present = [v.strip() for raw in (request.responseHeaders.getRawHeaders(b"vary") or [])
               for v in raw.decode("latin-1").split(",") if v.strip()]
    lowered = {v.lower() for v in present}
    added = [n for n in names if n.lower() not in lowered]
    if added:
        request.responseHeaders.setRawHeaders(b"vary", [", ".join(present + added).encode("latin-1")])


class Cors:
    """
    The CORS answers of one resource.

    Parameters
    ----------
    origins
        Allowed origins (``https://viewer.example.org``, compared without regard to
        case), or ``*`` for any; empty: none, and no CORS header is ever sent.
    methods
        Methods the resource answers besides ``OPTIONS`` (preflight ``Allow-Methods``).
    allow_headers
        Request headers a script may send beyond the CORS-safelisted ones.
    expose
        Response headers a script may read beyond the CORS-safelisted ones.
    max_age
        Seconds a browser may cache the preflight answer.
    """

    def __init__(
        self,
        origins: Sequence[str],
        *,
        methods: Sequence[str],
        allow_headers: Sequence[str] = (),
        expose: Sequence[str] = (),
        max_age: int = MAX_AGE,
    ) -> None:
        self._any = "*" in origins
        self._origins = frozenset(o.lower() for o in origins if o != "*")
        self._methods = ", ".join(methods).encode("ascii")
        self._allow = ", ".join((*methods, "OPTIONS")).encode("ascii")
        self._allow_headers = ", ".join(allow_headers).encode("ascii")
        self._expose = ", ".join(expose).encode("ascii")
        self._max_age = b"%d" % max_age

    @property
    def enabled(self) -> bool:
        return self._any or bool(self._origins)

    def allowed_origin(self, origin: bytes | None) -> bytes | None:
        """The ``Access-Control-Allow-Origin`` value for a request from ``origin``, or ``None``."""
        if self._any:
            return b"*"
        if origin is None:
            return None
        try:
            allowed = origin.decode("ascii").lower() in self._origins
        except UnicodeDecodeError:
            return None
        return origin if allowed else None

    def _origin_headers(self, request: Request) -> bool:
        if not self._any and self._origins:
            add_vary(request, "Origin")
        value = self.allowed_origin(request.getHeader(b"origin"))
        if value is None:
            return False
        request.setHeader(b"access-control-allow-origin", value)
        return True

    def apply(self, request: Request) -> None:
        """Set the CORS headers of an actual (non-preflight) response; call before it is written."""
        if self._origin_headers(request) and self._expose:
            request.setHeader(b"access-control-expose-headers", self._expose)

    def preflight(self, request: Request) -> int:
        """
        Answer ``OPTIONS``: 204 with ``Allow``, and for an allowed origin the methods,
        headers and lifetime a browser asks for before a request a script makes.

        The request is finished here (return the result from ``render``): a body returned
        from ``render`` would make Twisted add ``Content-Length``, which a 204 must not have.
        """
        request.setResponseCode(204)
        request.setHeader(b"allow", self._allow)
        if self._origin_headers(request) and request.getHeader(b"access-control-request-method") is not None:
            request.setHeader(b"access-control-allow-methods", self._methods)
            if self._allow_headers:
                request.setHeader(b"access-control-allow-headers", self._allow_headers)
            request.setHeader(b"access-control-max-age", self._max_age)
        request.finish()
        return NOT_DONE_YET
