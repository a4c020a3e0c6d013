"""JwksSource with a fake HTTP client and a Clock: caching, rate limit, failures, bounds."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from imageshare.auth.jwks import JwksSource
from tests.auth.keys import Keys


class _Transport:
    def stopProducing(self) -> None:
        pass

    def loseConnection(self) -> None:
        pass


class _Response:
    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self.length = len(body)
        self._body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(_Transport())
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


class FakeClient:
    def __init__(self) -> None:
        self.answers: list[Any] = []
        self.calls = 0

    def get(self, url: str, headers: Any = None) -> Deferred[Any]:
        self.calls += 1
        answer = self.answers.pop(0)
        return answer if isinstance(answer, Deferred) else succeed(answer)


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def test_fetch_cache_and_rate_limit() -> None:
    """Fetched once; a refresh within a minute does not fetch; after it, it does."""
    keys, clock, client = Keys(), Clock(), FakeClient()
    client.answers = [_Response(200, keys.jwks()), _Response(200, keys.jwks(keys.rotated))]
    source = JwksSource("https://idp/jwks", clock, http_client=client)
    assert [k.kid for k in result(source.current()).keys] == ["rsa1", "ec1"]
    assert [k.kid for k in result(source.refresh()).keys] == ["rsa1", "ec1"] and client.calls == 1
    clock.advance(61)
    assert [k.kid for k in result(source.refresh()).keys] == ["rsa2"] and client.calls == 2


def test_failures_keep_the_keys_and_are_bounded() -> None:
    """A 500, garbage, an oversized body and a hang (timeout) leave the keys as they were."""
    keys, clock, client = Keys(), Clock(), FakeClient()
    source = JwksSource("https://idp/jwks", clock, http_client=client, timeout=5, max_bytes=4096)
    client.answers = [_Response(500, b"oops")]
    assert result(source.current()) is None  # nothing held: callers fail closed
    client.answers = [_Response(200, keys.jwks())]
    clock.advance(61)
    held = result(source.refresh())
    for answer in (_Response(200, b"<html>"), _Response(200, b" " * 5000)):
        clock.advance(61)
        client.answers = [answer]
        assert result(source.refresh()) is held
    clock.advance(61)
    client.answers = [Deferred()]  # never answers
    d = source.refresh()
    concurrent = source.refresh()  # shares the fetch in flight
    clock.advance(5)
    assert result(d) is held and result(concurrent) is held and client.calls == 5
