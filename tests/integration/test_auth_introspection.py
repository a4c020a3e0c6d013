"""Opaque bearer tokens checked by RFC 7662 introspection against an https endpoint on loopback."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import pytest_twisted
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.auth.keys import AUDIENCE, ISSUER, Keys
from tests.integration.test_auth import _tls_files, get, www

pytestmark = pytest.mark.integration

CLIENT = ("imageshare", "rs-secret")


class IntrospectionEndpoint(Resource):
    """Answers by token: ``good-*`` active (admin), ``inactive``, ``hang`` never, ``garbage`` not JSON."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hits = 0
        self.hanging: list[Any] = []

    def render_POST(self, request: Any) -> Any:
        self.hits += 1
        expected = b"Basic " + base64.b64encode(":".join(CLIENT).encode())
        if request.getHeader(b"authorization") != expected:
            request.setResponseCode(401)
            return b'{"error": "invalid_client"}'
        form = parse_qs(request.content.read().decode())
        token = form["token"][0]
        assert form["token_type_hint"] == ["access_token"]
        if token == "hang":
            self.hanging.append(request)
            return NOT_DONE_YET
        if token == "garbage":
            return b"<html>garbage"
        request.setHeader(b"content-type", b"application/json")
        if not token.startswith("good-"):
            return b'{"active": false}'
        now = int(time.time())
        return json.dumps({"active": True, "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now + 600,
                           "iat": now, "scope": token[len("good-"):], "client_id": "viewer"}).encode()


@pytest.fixture
def introspection_server(reactor, tmp_path: Path):
    from twisted.internet import ssl

    ca_pem, server_pem = _tls_files(tmp_path)
    endpoint = IntrospectionEndpoint()
    options = ssl.PrivateCertificate.loadPEM(server_pem.read_text()).options()
    port = reactor.listenSSL(0, Site(endpoint), options, interface="127.0.0.1")
    endpoint.url = f"https://localhost:{port.getHost().port}/introspect"  # type: ignore[attr-defined]
    endpoint.ca = ca_pem  # type: ignore[attr-defined]
    yield endpoint
    for request in endpoint.hanging:
        if not request.finished and not request._disconnected:
            request.finish()
    pytest_twisted.blockon(port.stopListening())


def _auth(endpoint: Any, **extra: str) -> dict[str, str]:
    return {"mode": "bearer", "issuer": ISSUER, "audience": AUDIENCE, "introspection_url": endpoint.url,
            "introspection_client_id": CLIENT[0], "introspection_client_secret": CLIENT[1],
            "jwks_ca_file": str(endpoint.ca), "jwks_timeout": "1", **extra}


@pytest_twisted.ensureDeferred
async def test_opaque_tokens_introspected(start_server, reactor, tmp_path: Path,
                                          introspection_server: Any) -> None:
    """With jwks and introspection_url: JWTs are verified locally, opaque tokens introspected
    (cached), inactive, garbage and hanging answers refused with 401 within the timeout."""
    keys = Keys()
    endpoint = introspection_server
    server = await start_server(auth=_auth(endpoint, jwks=str(keys.write_jwks(tmp_path / "jwks.json"))))
    status = f"{server.url}/status"

    assert (await get(status, keys.token(scope="admin")))[0] == 200
    assert endpoint.hits == 0

    code, headers, _ = await get(status, "good-admin")
    assert code == 200 and not www(headers)
    assert endpoint.hits == 1
    assert (await get(status, "good-admin"))[0] == 200
    assert endpoint.hits == 1  # from the cache

    code, headers, _ = await get(status, "good-image.read")
    assert code == 403 and 'error="insufficient_scope"' in www(headers)

    for token, reason in (("inactive", "not active"), ("garbage", "cannot be checked")):
        code, headers, body = await get(status, token)
        assert code == 401 and 'error="invalid_token"' in www(headers) and reason in www(headers), token
        assert token.encode() not in body
    hits = endpoint.hits
    assert (await get(status, "inactive"))[0] == 401
    assert endpoint.hits == hits  # a refusal is cached briefly

    started = reactor.seconds()
    code, headers, _ = await get(status, "hang")
    assert code == 401 and 'error="invalid_token"' in www(headers)
    assert reactor.seconds() - started < 5


@pytest_twisted.ensureDeferred
async def test_introspection_only(start_server, introspection_server: Any) -> None:
    """Without jwks every token is introspected, JWT-shaped or not; wrong client credentials fail closed."""
    endpoint = introspection_server
    server = await start_server(auth=_auth(endpoint))
    status = f"{server.url}/status"
    assert (await get(status, "good-admin"))[0] == 200
    assert (await get(status, "aGVh.cGF5.c2ln"))[0] == 401
    assert endpoint.hits == 2

    other = await start_server(auth=_auth(endpoint, introspection_client_secret="wrong"))
    code, headers, _ = await get(f"{other.url}/status", "good-admin")
    assert code == 401 and "cannot be checked" in www(headers)
