"""Bearer tokens on the running server ([auth] mode = bearer): statuses and challenges."""

from __future__ import annotations

import datetime
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from imageshare.xds import soap
from tests.auth.keys import AUDIENCE, ISSUER, Keys, tamper

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def bearer(tmp_path: Path, keys: Keys, **extra: str) -> dict[str, str]:
    return {"mode": "bearer", "issuer": ISSUER, "audience": AUDIENCE,
            "jwks": str(keys.write_jwks(tmp_path / "jwks.json")), **extra}


async def get(url: str, token: str | None = None, method: str = "GET", **kw: Any) -> tuple[int, Any, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    headers.update(kw.pop("headers", {}))
    response = await treq.request(method, url, headers=headers, **kw)
    return response.code, response.headers, await response.content()


def www(headers: Any) -> str:
    return (headers.getRawHeaders("www-authenticate") or [""])[0]


@pytest_twisted.ensureDeferred
async def test_tokens_from_a_jwks_file(start_server, tmp_path: Path, keys: Keys) -> None:
    """Each kind of good and bad token gets its status and WWW-Authenticate, on /status, /wado and /jpip."""
    server = await start_server(auth=bearer(tmp_path, keys))
    status = f"{server.url}/status"
    admin = keys.token(scope="admin")

    code, headers, _ = await get(status, admin)
    assert code == 200 and not www(headers)
    for alg in ("PS256", "ES256"):
        assert (await get(status, keys.token(alg=alg, scope="admin")))[0] == 200

    code, headers, _ = await get(status)
    assert code == 401
    assert www(headers).startswith("Bearer") and "error=" not in www(headers)
    assert f'resource_metadata="{server.service.config.http.public_url}/.well-known/oauth-protected-resource"' \
        in www(headers)

    import time
    now = int(time.time())
    cases = {
        "expired": keys.token(scope="admin", exp=now - 3600, iat=now - 7200),
        "not valid yet": keys.token(scope="admin", nbf=now + 3600),
        "another issuer": keys.token(scope="admin", iss="https://idp.example.org/realms/other"),
        "audience": keys.token(scope="admin", aud="account"),
        "typ": keys.token(scope="admin", typ="JWT"),
        "algorithm": keys.unsigned(scope="admin"),
        "algorithm ": keys.hmac_with_public_key(),
        "unknown key": keys.token(scope="admin", key=keys.rotated),
        "signature": tamper(admin),
        "not a signed JWT": "not-a-jwt",
        "too large": "a" * 20000,
    }
    for expected, token in cases.items():
        code, headers, body = await get(status, token)
        assert code == 401, expected
        assert 'error="invalid_token"' in www(headers), expected
        assert expected.strip() in www(headers), (expected, www(headers))
        assert token.encode() not in body

    code, headers, _ = await get(status, keys.token(scope="image.read"))
    assert code == 403
    assert 'error="insufficient_scope"' in www(headers) and 'scope="admin"' in www(headers)

    # The image interfaces need image.read; with it the request reaches the resource (400: no query).
    assert (await get(f"{server.url}/wado", keys.token(scope="admin")))[0] == 403
    assert (await get(f"{server.url}/wado", keys.token()))[0] == 400
    assert (await get(f"{server.url}/jpip", keys.token(scope="xds.read")))[0] == 403
    assert (await get(f"{server.url}/jpip", keys.token()))[0] not in (401, 403)
    assert (await get(f"{server.url}/jpip"))[0] == 401

    # Open: liveness, the RFC 9728 metadata, CORS preflight.
    code, _, body = await get(f"{server.url}/health")
    assert (code, body) == (200, b"ok\n")
    code, _, body = await get(f"{server.url}/.well-known/oauth-protected-resource")
    metadata = json.loads(body)
    assert code == 200 and metadata["resource"] == AUDIENCE and metadata["authorization_servers"] == [ISSUER]
    assert metadata["bearer_methods_supported"] == ["header"]
    assert {"image.read", "xds.read", "xds.write", "admin"} <= set(metadata["scopes_supported"])
    code, _, _ = await get(f"{server.url}/jpip", method="OPTIONS",
                           headers={"Origin": "https://viewer.example.org", "Access-Control-Request-Method": "GET"})
    assert code not in (401, 403)


@pytest_twisted.ensureDeferred
async def test_relaxed_typ_and_scope_names(start_server, tmp_path: Path, keys: Keys) -> None:
    """require_typ empty accepts JWT (Keycloak's default); scope names come from the config."""
    server = await start_server(auth=bearer(tmp_path, keys, require_typ="", scope_admin="imageshare:admin"))
    assert (await get(f"{server.url}/status", keys.token(typ="JWT", scope="imageshare:admin")))[0] == 200
    assert (await get(f"{server.url}/status", keys.token(typ="JWT", scope="admin")))[0] == 403


def _envelope(action: str) -> bytes:
    return (f'<s:Envelope xmlns:s="{soap.SOAP12_NS}" xmlns:a="{soap.WSA_NS}"><s:Header>'
            f'<a:Action s:mustUnderstand="1">{action}</a:Action></s:Header><s:Body/></s:Envelope>').encode()


@pytest_twisted.ensureDeferred
async def test_xds_scope_by_action(start_server, tmp_path: Path, keys: Keys) -> None:
    """At the embedded registry and repository, ITI-18/ITI-43 need xds.read and ITI-41/ITI-42 xds.write."""
    server = await start_server(auth=bearer(tmp_path, keys))
    reader = keys.token(scope="xds.read")
    writer = keys.token(scope="xds.write")
    ct = {"Content-Type": soap.SOAP12_CONTENT_TYPE}
    for path, action, needed in (("registry", soap.ITI18, "xds.read"), ("repository", soap.ITI43, "xds.read"),
                                 ("repository", soap.ITI41, "xds.write"), ("registry", soap.ITI42, "xds.write")):
        url = f"{server.url}/xds/{path}"
        allowed, refused = (reader, writer) if needed == "xds.read" else (writer, reader)
        code, headers, _ = await get(url, refused, method="POST", data=_envelope(action), headers=ct)
        assert code == 403 and f'scope="{needed}"' in www(headers), (path, action)
        code, _, _ = await get(url, allowed, method="POST", data=_envelope(action), headers=ct)
        assert code not in (401, 403), (path, action)
    assert (await get(f"{server.url}/xds/imaging-source", reader, method="POST", data=b"x"))[0] == 403
    assert (await get(f"{server.url}/xds/registry", method="POST", data=_envelope(soap.ITI18)))[0] == 401

    # A write labelled as a read in the Content-Type is let in for the read, and refused by
    # the endpoint, which acts on the envelope's own action.
    for path, write in (("registry", soap.ITI42), ("repository", soap.ITI41)):
        labelled = {"Content-Type": f'{soap.SOAP12_CONTENT_TYPE};action="{soap.ITI18}"'}
        envelope = _envelope(write).replace(b"</s:Header>", b"<a:MessageID>urn:uuid:0</a:MessageID></s:Header>") \
            .replace(b"<s:Body/>", b"<s:Body><x/></s:Body>")  # a well-formed request, up to its body
        code, _, body = await get(f"{server.url}/xds/{path}", reader, method="POST", data=envelope,
                                  headers=labelled)
        assert code == 403 and b"authorised for" in body, (path, code, body)


# -- a JWK Set over https on loopback -------------------------------------------------------


def _tls_files(folder: Path) -> tuple[Path, Path]:
    """A self-signed CA and a server certificate for localhost/127.0.0.1: (ca.pem, server.pem)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem = folder / "ca.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_pem = folder / "server.pem"
    server_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_pem, server_pem


class JwksEndpoint(Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body
        self.mode = "ok"
        self.hits = 0
        self.hanging: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        self.hits += 1
        if self.mode == "hang":
            self.hanging.append(request)
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        return self.body if self.mode == "ok" else b"<html>garbage" * 10


@pytest.fixture
def jwks_server(reactor, tmp_path: Path, keys: Keys):
    from twisted.internet import ssl

    ca_pem, server_pem = _tls_files(tmp_path)
    endpoint = JwksEndpoint(keys.jwks())
    options = ssl.PrivateCertificate.loadPEM(server_pem.read_text()).options()
    port = reactor.listenSSL(0, Site(endpoint), options, interface="127.0.0.1")
    endpoint.url = f"https://localhost:{port.getHost().port}/jwks"  # type: ignore[attr-defined]
    endpoint.ca = ca_pem  # type: ignore[attr-defined]
    yield endpoint
    for request in endpoint.hanging:
        if not request.finished and not request._disconnected:
            request.finish()
    pytest_twisted.blockon(port.stopListening())


async def _sleep(reactor: Any, seconds: float) -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


@pytest_twisted.ensureDeferred
async def test_jwks_over_https_rotation_and_failures(start_server, reactor, tmp_path: Path, keys: Keys,
                                                     jwks_server: Any) -> None:
    """A JWK Set URL: fetched with treq trusting jwks_ca_file, refetched on an unknown kid (rate-limited)."""
    server = await start_server(auth={"mode": "bearer", "issuer": ISSUER, "audience": AUDIENCE,
                                      "jwks": jwks_server.url, "jwks_ca_file": str(jwks_server.ca),
                                      "jwks_timeout": "1"})
    status = f"{server.url}/status"
    assert (await get(status, keys.token(scope="admin")))[0] == 200
    assert (await get(status, keys.token(alg="ES256", scope="admin")))[0] == 200
    fetched = jwks_server.hits
    assert fetched >= 1

    # Rotation: the issuer now signs with rsa2. The first unknown kid fetches again.
    source = server.service.auth.services[0]
    source._last_fetch -= 120  # as if the last fetch were two minutes ago
    jwks_server.body = keys.jwks(keys.rsa, keys.rotated)
    assert (await get(status, keys.token(key=keys.rotated, scope="admin")))[0] == 200
    assert jwks_server.hits == fetched + 1

    # Within the minute, unknown kids do not fetch again.
    for _ in range(3):
        code, headers, _ = await get(status, keys.token(scope="admin", kid="nope"))
        assert code == 401 and "unknown key" in www(headers)
    assert jwks_server.hits == fetched + 1

    # Garbage and a hanging server leave the keys held; with none held, requests fail closed.
    jwks_server.mode = "garbage"
    source._last_fetch -= 120
    assert (await get(status, keys.token(scope="admin", kid="nope")))[0] == 401
    assert (await get(status, keys.token(scope="admin")))[0] == 200
    source.keys = None
    jwks_server.mode = "hang"
    source._last_fetch -= 120
    started = reactor.seconds()
    code, headers, _ = await get(status, keys.token(scope="admin"))
    assert code == 401 and 'error="invalid_token"' in www(headers)
    assert reactor.seconds() - started < 10


@pytest_twisted.ensureDeferred
async def test_embedded_repository_registration_still_works(start_server, reactor, tmp_path: Path,
                                                            keys: Keys) -> None:
    """The server's own ITI-41 to its embedded repository passes the guard with its internal token."""
    import time

    from twisted.internet import task, threads

    from imageshare.xds.outbox import State
    from tests.helpers import make_instances, scu_store

    server = await start_server(auth=bearer(tmp_path, keys), manifest={"stable_after": "0.5"},
                                xds={"retry_initial": "0.5", "retry_max": "1"})
    paths = make_instances(tmp_path / "study", 1, seed="auth-embedded")
    assert await threads.deferToThread(scu_store, server.dicom_port, paths) == [0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.service.xds.counts[State.REGISTERED] < 1:
        await task.deferLater(reactor, 0.2, lambda: None)
    assert server.service.xds.counts[State.REGISTERED] == 1
    assert server.service.xds.counts[State.FAILED] == 0


@pytest_twisted.ensureDeferred
async def test_refusals_are_audited(start_server, tmp_path: Path, keys: Keys) -> None:
    """A 401 is audited as a failed login (110114, outcome 4), a 403 as a security alert
    (110113) naming the token's user; neither message holds the token."""
    from tests.audit.schema import assert_valid
    from imageshare.audit.syslog import split_message

    server = await start_server(auth=bearer(tmp_path, keys))
    audit_log = server.data_dir / "audit.log"
    expired = keys.token(scope="admin", exp=1, iat=0)
    limited = keys.token(scope="image.read")
    assert (await get(f"{server.url}/status", expired))[0] == 401
    assert (await get(f"{server.url}/status", limited))[0] == 403

    def events() -> list[Any]:
        lines = [line for line in audit_log.read_bytes().split(b"\n") if line] if audit_log.exists() else []
        return [assert_valid(split_message(line)[1]) for line in lines]

    from twisted.internet import reactor, task
    for _ in range(100):  # the trail writes on its own thread
        found = {m.find("EventIdentification/EventID").get("csd-code") for m in events()}
        if {"110114", "110113"} <= found:
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    messages = events()
    login = [m for m in messages if m.find("EventIdentification/EventID").get("csd-code") == "110114"]
    alert = [m for m in messages if m.find("EventIdentification/EventID").get("csd-code") == "110113"]
    assert len(login) == 1 and login[0].find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert len(alert) == 1
    assert any("@" + ISSUER in (p.get("UserName") or "") for p in alert[0].iter("ActiveParticipant"))
    raw = audit_log.read_bytes()
    assert expired.encode() not in raw and limited.encode() not in raw
