"""
The HTTP side of token introspection (RFC 7662, IHE IUA ITI-102): one POST per unknown token.

The answer is checked and cached by the pure :mod:`imageshare.auth.introspection`. The POST
runs with treq on the reactor, never blocking it, bounded in time (``timeout``) and size
(64 KiB); any failure (unreachable, hanging, not 200, garbage) refuses the token (fail
closed, not cached: the next request asks again). The token is never logged; at debug, the
first 12 hex digits of its SHA-256 name it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import ensureDeferred

from imageshare.auth import introspection
from imageshare.auth.jwks import _Discard, _TooLarge
from imageshare.auth.tokens import Policy, Principal, TokenError
from imageshare.logsafe import Logger

__all__ = ["Introspector"]

log = Logger(namespace="imageshare.auth")


class Introspector:
    """
    Parameters
    ----------
    url
        The introspection endpoint (``https://``).
    client_id, client_secret
        The resource server's own credentials, sent with HTTP Basic (RFC 7662 section 2.1).
    policy
        Issuer, audience and leeway the answers are checked against.
    clock
        ``seconds()`` and ``callLater`` (the reactor).
    http_client
        treq-compatible client (``post(url, data=, headers=)``).
    """

    def __init__(self, url: str, client_id: str, client_secret: str, policy: Policy, clock: Any, *,
                 http_client: Any, timeout: float = 10.0,
                 cache: introspection.AnswerCache | None = None) -> None:
        self._url = url
        self._authorization = introspection.basic_authorization(client_id, client_secret)
        self._policy = policy
        self._clock = clock
        self._http = http_client
        self._timeout = timeout
        self.cache = cache if cache is not None else introspection.AnswerCache()

    async def principal(self, token: str) -> Principal:
        """The principal of an opaque token; raises :class:`TokenError`."""
        key = introspection.token_key(token)
        cached = self.cache.get(key, self._clock.seconds())
        if isinstance(cached, Principal):
            return cached
        if isinstance(cached, str):
            raise TokenError(cached)
        d = ensureDeferred(self._post(token))
        d.addTimeout(self._timeout, self._clock)
        try:
            body = await d
        except Exception as e:  # every way the call can fail refuses the token
            log.warn("token introspection at {url} failed: {reason}", url=self._url,
                     reason=type(e).__name__ if not isinstance(e, ValueError) else str(e))
            raise TokenError("the token cannot be checked") from None
        try:
            answer = introspection.parse_answer(body)
        except TokenError:
            log.warn("token introspection at {url} answered something that is not an answer", url=self._url)
            raise
        now = self._clock.seconds()
        try:
            principal = introspection.principal_from_answer(answer, self._policy, now)
        except TokenError as e:
            log.debug("introspected token {key} refused: {reason}", key=key.hex()[:12], reason=e.description)
            self.cache.put_refused(key, e.description, now)
            raise
        self.cache.put_active(key, principal, now)
        return principal

    async def _post(self, token: str) -> bytes:
        import treq

        response = await self._http.post(
            self._url, data=introspection.request_body(token),
            headers={b"Content-Type": [b"application/x-www-form-urlencoded"], b"Accept": [b"application/json"],
                     b"Authorization": [self._authorization]})
        limit = introspection.MAX_ANSWER_BYTES
        if response.code != 200:
            response.deliverBody(_Discard())
            raise ValueError(f"HTTP {response.code}")
        if isinstance(response.length, int) and response.length > limit:
            response.deliverBody(_Discard())
            raise _TooLarge(f"larger than {limit} bytes")
        chunks: list[bytes] = []
        size = [0]

        def collect(data: bytes) -> None:
            size[0] += len(data)
            if size[0] > limit:
                raise _TooLarge(f"larger than {limit} bytes")
            chunks.append(data)

        await treq.collect(response, collect)
        return b"".join(chunks)
