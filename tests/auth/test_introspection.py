"""Token introspection (RFC 7662): answers to principals, the cache, and the Introspector with fakes."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import parse_qs

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock

from imageshare.auth.introspection import (
    AnswerCache, basic_authorization, is_jwt, parse_answer, principal_from_answer, request_body, token_key,
)
from imageshare.auth.introspector import Introspector
from imageshare.auth.tokens import Policy, Principal, TokenError
from tests.auth.keys import AUDIENCE, ISSUER
from tests.auth.test_jwks import _Response, result

POLICY = Policy(issuer=ISSUER, audience=AUDIENCE, leeway=60)
NOW = 1_800_000_000.0


def answer(**claims: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"active": True, "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": NOW + 600,
                            "scope": "image.read admin", "client_id": "viewer", "jti": "j1"}
    base.update(claims)
    return {k: v for k, v in base.items() if v is not None}


def test_active_answer_is_a_principal() -> None:
    """An active answer gives the same Principal type as a JWT, with scopes, client and expiry."""
    principal = principal_from_answer(answer(aud=["other", AUDIENCE]), POLICY, NOW)
    assert principal == Principal(issuer=ISSUER, subject="alice", jti="j1", client_id="viewer",
                                  scopes=frozenset({"image.read", "admin"}), patient=None, expires=NOW + 600)


def test_optional_claims() -> None:
    """Without iss, aud and exp the answer is trusted as the issuer's; the subject falls back."""
    principal = principal_from_answer({"active": True, "username": "bob", "scope": "image.read"}, POLICY, NOW)
    assert principal.issuer == ISSUER and principal.subject == "bob" and principal.expires == float("inf")
    assert principal_from_answer({"active": True, "client_id": "svc"}, POLICY, NOW).subject == "svc"
    with pytest.raises(TokenError, match="no subject"):
        principal_from_answer({"active": True}, POLICY, NOW)


@pytest.mark.parametrize(("claims", "reason"), [
    ({"active": False}, "not active"),
    ({"exp": NOW - 61}, "expired"),
    ({"nbf": NOW + 61}, "not valid yet"),
    ({"iss": "https://idp.example.org/realms/other"}, "another issuer"),
    ({"aud": "account"}, "audience"),
    ({"aud": ["a", "b"]}, "audience"),
    ({"scope": ["image.read"]}, "scope"),
    ({"exp": "soon"}, "exp"),
    ({"token_type": "refresh_token"}, "not an access token"),
    ({"extensions": {"ihe_bppc": "x"}}, "ihe_bppc"),
])
def test_refused_answers(claims: dict[str, Any], reason: str) -> None:
    """Inactive, expired, not yet valid, wrong iss/aud, bad claim types: TokenError naming the check."""
    with pytest.raises(TokenError, match=reason):
        principal_from_answer(answer(**claims), POLICY, NOW)


def test_leeway_and_missing_scope() -> None:
    """exp within the leeway still passes; a missing scope is no scope (the guard answers 403)."""
    assert principal_from_answer(answer(exp=NOW - 30), POLICY, NOW).expires == NOW - 30
    assert principal_from_answer(answer(scope=None), POLICY, NOW).scopes == frozenset()


def test_patient() -> None:
    """The IUA patient claim (extensions.ihe_bppc.patient_id) restricts the principal."""
    pid = "123^^^&1.2.3&ISO"
    principal = principal_from_answer(answer(extensions={"ihe_bppc": {"patient_id": pid}}), POLICY, NOW)
    assert principal.patient == pid


@pytest.mark.parametrize("body", [b"<html>", b"[]", b'{"active": "yes"}', b"{}", b"\xff",
                                  b'{"active": false, "x": "' + b"a" * 70000 + b'"}'])
def test_garbage_answers(body: bytes) -> None:
    """Not JSON, not an object, no boolean active, too large: the token cannot be checked."""
    with pytest.raises(TokenError, match="cannot be checked"):
        parse_answer(body)


def test_request_helpers() -> None:
    """JWT form detection, the form body, Basic credentials form-encoded, the hash key."""
    assert is_jwt("aGVh.cGF5.c2ln") and not is_jwt("opaque-token") and not is_jwt("a.b.c.d")
    assert not is_jwt("a+b.c.d")
    assert parse_qs(request_body("t/k+n=").decode()) == {"token": ["t/k+n="], "token_type_hint": ["access_token"]}
    auth = basic_authorization("imageshare", "s:e cret")
    assert base64.b64decode(auth.split()[1]) == b"imageshare:s%3Ae%20cret"
    assert token_key("x") != token_key("y") and len(token_key("x")) == 32


def test_cache_lifetimes_and_bound() -> None:
    """Active answers live until exp (at most max_ttl), refusals inactive_ttl; least recently used goes first."""
    cache = AnswerCache(max_entries=2, max_ttl=300, inactive_ttl=10)
    short = principal_from_answer(answer(exp=NOW + 100), POLICY, NOW)
    long = principal_from_answer(answer(exp=NOW + 10_000), POLICY, NOW)
    cache.put_active(b"s", short, NOW)
    cache.put_active(b"l", long, NOW)
    assert cache.get(b"s", NOW + 99) == short and cache.get(b"s", NOW + 100) is None
    assert cache.get(b"l", NOW + 299) == long and cache.get(b"l", NOW + 300) is None
    cache.put_refused(b"r", "the token is not active", NOW)
    assert cache.get(b"r", NOW + 9) == "the token is not active" and cache.get(b"r", NOW + 10) is None
    cache.put_active(b"past", principal_from_answer(answer(exp=NOW - 1), POLICY, NOW), NOW)
    assert cache.get(b"past", NOW) is None  # within the leeway: valid, but not cached
    for i in range(5):
        cache.put_refused(b"%d" % i, "x", NOW)
    cache.get(b"3", NOW)
    cache.put_refused(b"5", "x", NOW)
    assert len(cache) == 2 and cache.get(b"3", NOW) == "x" and cache.get(b"4", NOW) is None


class FakePoster:
    def __init__(self) -> None:
        self.answers: list[Any] = []
        self.calls: list[tuple[str, bytes, Any]] = []

    def post(self, url: str, data: bytes, headers: Any = None) -> Deferred[Any]:
        self.calls.append((url, data, headers))
        answer = self.answers.pop(0)
        return answer if isinstance(answer, Deferred) else succeed(answer)


def _introspector() -> tuple[Introspector, FakePoster, Clock]:
    clock, client = Clock(), FakePoster()
    clock.advance(NOW)
    return Introspector("https://idp/introspect", "rs", "secret", POLICY, clock, http_client=client,
                        timeout=5), client, clock


def _principal(introspector: Introspector, token: str) -> Any:
    return result(ensureDeferred(introspector.principal(token)))


def test_introspector_posts_and_caches() -> None:
    """One POST with Basic credentials per token; the second ask is answered from the cache."""
    introspector, client, clock = _introspector()
    client.answers = [_Response(200, json.dumps(answer()).encode())]
    assert _principal(introspector, "opaque").subject == "alice"
    assert _principal(introspector, "opaque").subject == "alice"
    (url, data, headers), = client.calls
    assert url == "https://idp/introspect" and parse_qs(data.decode())["token"] == ["opaque"]
    assert headers[b"Authorization"] == [basic_authorization("rs", "secret")]
    clock.advance(301)
    client.answers = [_Response(200, b'{"active": false}')]
    failure = _principal(introspector, "opaque")
    assert failure.check(TokenError) and "not active" in failure.value.description
    assert _principal(introspector, "opaque").check(TokenError) and len(client.calls) == 2  # cached refusal


def test_introspector_fails_closed() -> None:
    """A 500, garbage, an oversized answer and a hang (timeout) refuse the token, and are not cached."""
    introspector, client, clock = _introspector()
    hang: Deferred[Any] = Deferred()
    client.answers = [_Response(500, b"oops"), _Response(200, b"<html>"), _Response(200, b" " * 70000), hang]
    for _ in range(3):
        failure = _principal(introspector, "opaque")
        assert failure.check(TokenError) and failure.value.description == "the token cannot be checked"
    d = ensureDeferred(introspector.principal("opaque"))
    clock.advance(5)
    failure = result(d)
    assert failure.check(TokenError) and failure.value.description == "the token cannot be checked"
    assert len(client.calls) == 4 and len(introspector.cache) == 0
