"""
The issuer's signing keys: a JWK Set from a file or an https URL, cached.

An unknown ``kid`` refetches the set, at most once per :attr:`JwksSource.min_interval`
seconds; concurrent refetches share one fetch. A fetch that hangs, fails or returns
something that is not a JWK Set leaves the keys as they were (or none: then every token
is refused with 401, fail closed). Fetches are bounded in time and in size, and run with
treq on the reactor, never blocking it. A file is small and local: it is read directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from joserfc.jwk import KeySet
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed

from imageshare.auth.tokens import load_key_set
from imageshare.logsafe import Logger

__all__ = ["JwksSource", "MAX_JWKS_BYTES", "make_jwks_client"]

#: A JWK Set larger than this is refused (real ones are a few KiB).
MAX_JWKS_BYTES = 1 << 20


class _TooLarge(Exception):
    pass


class JwksSource(Service):
    """
    Parameters
    ----------
    location
        An ``https://`` URL or a file path.
    clock
        ``seconds()`` and ``callLater`` (the reactor).
    http_client
        treq-compatible client (``get(url, headers=)``); needed for a URL.
    """

    log = Logger(namespace="imageshare.auth")
    name = "jwks"

    def __init__(self, location: str, clock: Any, *, http_client: Any = None, timeout: float = 10.0,
                 max_bytes: int = MAX_JWKS_BYTES, min_interval: float = 60.0) -> None:
        self._location = location
        self._clock = clock
        self._http = http_client
        self._timeout = timeout
        self._max_bytes = max_bytes
        self.min_interval = min_interval
        self.keys: KeySet | None = None
        self._last_fetch: float | None = None
        self._inflight: Deferred[KeySet | None] | None = None
        self._is_url = location.startswith("https://")
        if not self._is_url:
            self._read_file()  # at build time: a bad file stops start-up

    def startService(self) -> None:
        super().startService()
        if self._is_url:
            self.refresh()

    def _read_file(self) -> None:
        self._last_fetch = self._clock.seconds()
        path = Path(self._location)
        with open(path, "rb") as f:
            data = f.read(self._max_bytes + 1)
        if len(data) > self._max_bytes:
            raise ValueError(f"{path}: the JWK Set is larger than {self._max_bytes} bytes")
        self.keys = load_key_set(data)

    def current(self) -> Deferred[KeySet | None]:
        """The keys: the cached ones, or (none yet) the outcome of a fetch."""
        if self.keys is not None:
            return succeed(self.keys)
        return self.refresh()

    def refresh(self) -> Deferred[KeySet | None]:
        """Fetch again unless fetched within :attr:`min_interval`; fires with the keys then held."""
        now = self._clock.seconds()
        if self._inflight is not None:
            d: Deferred[KeySet | None] = Deferred()
            self._inflight.addBoth(lambda r: (d.callback(self.keys), r)[1])
            return d
        if self._last_fetch is not None and now - self._last_fetch < self.min_interval:
            return succeed(self.keys)
        self._last_fetch = now
        if not self._is_url:
            try:
                self._read_file()
            except (OSError, ValueError) as e:
                self.log.warn("JWK Set file unusable: {reason}", reason=str(e))
            return succeed(self.keys)
        inflight = ensureDeferred(self._fetch())
        self._inflight = inflight

        def done(result: Any) -> KeySet | None:
            self._inflight = None
            return self.keys

        inflight.addBoth(done)
        return inflight

    async def _fetch(self) -> None:
        d = ensureDeferred(self._get())
        d.addTimeout(self._timeout, self._clock)
        try:
            data = await d
            keys = load_key_set(data)
        except Exception as e:  # every way a fetch can fail leaves the keys as they were
            self.log.warn("JWK Set fetch from {url} failed: {reason}", url=self._location,
                          reason=type(e).__name__ if not str(e) else str(e))
            return
        self.keys = keys
        self.log.info("JWK Set fetched from {url}: {count} key(s)", url=self._location, count=len(keys.keys))

    async def _get(self) -> bytes:
        import treq

        response = await self._http.get(self._location, headers={b"Accept": [b"application/json"]})
        if response.code != 200:
            response.deliverBody(_Discard())
            raise ValueError(f"HTTP {response.code}")
        if response.length is not None and isinstance(response.length, int) and response.length > self._max_bytes:
            response.deliverBody(_Discard())
            raise _TooLarge(f"larger than {self._max_bytes} bytes")
        chunks: list[bytes] = []
        size = [0]

        def collect(data: bytes) -> None:
            size[0] += len(data)
            if size[0] > self._max_bytes:
                raise _TooLarge(f"larger than {self._max_bytes} bytes")
            chunks.append(data)

        await treq.collect(response, collect)
        return b"".join(chunks)


class _Discard:
    """Takes an unwanted body and stops it (the connection is not reused)."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass


def make_jwks_client(reactor: Any, ca_file: Path | None, timeout: float) -> Any:
    """A treq client for the JWK Set URL: TLS trusting ``ca_file`` (else the platform's roots)."""
    import treq
    from twisted.internet import ssl
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.iweb import IPolicyForHTTPS
    from zope.interface import implementer

    trust = ssl.Certificate.loadPEM(ca_file.read_bytes()) if ca_file else ssl.platformTrust()

    @implementer(IPolicyForHTTPS)
    class _Policy:
        def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
            return ssl.optionsForClientTLS(hostname.decode("idna"), trustRoot=trust)

    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, contextFactory=_Policy(), connectTimeout=timeout, pool=pool)
    return treq.client.HTTPClient(agent)


