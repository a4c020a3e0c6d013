"""
Access control on the HTTP interfaces (issue 12): bearer tokens, scopes, the principal.

The composition root calls :func:`build_auth` once and uses the :class:`Auth` it returns:
``auth.guard(resource, auth.scopes.image_read)`` wraps a resource, ``auth.services`` go into
the service tree. With ``[auth] mode = none`` every guard is the resource itself.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.application.service import Service
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from imageshare.auth.grants import KEY_BYTES
from imageshare.auth.guard import Authenticator, Guard, RefusalHook, principal_of
from imageshare.auth.introspector import Introspector
from imageshare.auth.jwks import JwksSource, make_jwks_client
from imageshare.auth.tokens import Policy, Principal
from imageshare.config import AuthConfig, Config
from imageshare.web.clients import peer_address
from imageshare.xds import soap

__all__ = ["GRANT_KEY_FILE", "Auth", "Scopes", "audit_refusals", "authorised_as_read", "build_auth", "grant_key",
           "principal_of", "soap_scope"]

#: The URL grants' signing key, in the data folder (see :mod:`imageshare.auth.grants`).
GRANT_KEY_FILE = "grant-key"


@attrs.frozen
class Scopes:
    """The configured names of the four scopes."""

    image_read: str = "image.read"
    xds_read: str = "xds.read"
    xds_write: str = "xds.write"
    admin: str = "admin"


_ACTION_PARAM = re.compile(rb'action\s*=\s*"?([^";\s]+)', re.I)
_ACTION_ELEMENT = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?Action\b[^>]*>\s*([^<\s]+)\s*<")
_READ_ACTIONS = frozenset({soap.ITI18, soap.ITI43})


def soap_scope(scopes: Scopes) -> Callable[[Request], str]:
    """
    The scope of a SOAP request at the embedded registry or repository, by its action:
    ITI-18 and ITI-43 read, anything else (ITI-41, ITI-42, unknown) writes.
    """

    def scope(request: Request) -> str:
        action = None
        content_type = request.getHeader(b"content-type") or b""
        match = _ACTION_PARAM.search(content_type)
        if match:
            action = match.group(1)
        else:
            content = request.content
            if content is not None:
                content.seek(0)
                head = content.read(65536)
                content.seek(0)
                match = _ACTION_ELEMENT.search(head)
                action = match.group(1) if match else None
        name = action.decode("latin-1") if action else ""
        if name in _READ_ACTIONS:
            # The endpoint acts on the envelope's own action: it must then be this read.
            setattr(request, _AUTHORISED_READ, name)
            return scopes.xds_read
        return scopes.xds_write

    return scope


_AUTHORISED_READ = "_imageshare_authorised_read"


def authorised_as_read(request: Request) -> str | None:
    """The read action (ITI-18, ITI-43) for which the guard let a SOAP request in with the
    read scope, or ``None``; the endpoint refuses an envelope that asks for another."""
    return getattr(request, _AUTHORISED_READ, None)


class HealthResource(Resource):
    """``/health``: liveness, no data, always open."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b"ok\n"


class MetadataResource(Resource):
    """``/.well-known/oauth-protected-resource`` (RFC 9728)."""

    isLeaf = True

    def __init__(self, document: dict[str, Any]) -> None:
        super().__init__()
        self._body = json.dumps(document, sort_keys=True).encode() + b"\n"

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"access-control-allow-origin", b"*")
        return self._body


@attrs.define
class Auth:
    """What the composition root needs of access control."""

    config: AuthConfig
    scopes: Scopes
    authenticator: Authenticator | None = None
    services: list[Service] = attrs.field(factory=list)
    resource_metadata: str | None = None
    metadata: dict[str, Any] | None = None
    #: A random token for the server's own requests to itself (the embedded repository).
    internal_token: str | None = None
    #: Told of every refused request (the audit trail): see :class:`Guard`.
    on_refused: RefusalHook | None = None

    @property
    def enabled(self) -> bool:
        return self.authenticator is not None

    def guard(self, resource: IResource, scope: str | Callable[[Request], str], *,
              patients: bool | Callable[[Request], bool] = True, grants: bool = False) -> IResource:
        """
        ``resource`` behind a token check for ``scope``; ``resource`` itself when access control is off.

        ``patients=False``: the resource does not filter by patient, so tokens restricted to
        one patient are refused there (403); a function of the request decides per request.
        ``grants=True``: a URL grant opens GET and HEAD too; the resource filters by
        ``principal_of(request).study``.
        """
        if self.authenticator is None:
            return resource
        return Guard(resource, scope, self.authenticator, resource_metadata=self.resource_metadata,
                     patients=patients, on_refused=self.on_refused, grants=grants)

    def open_resources(self) -> dict[bytes, IResource]:
        """The resources that stay open, by their child name of ``/``."""
        out: dict[bytes, IResource] = {b"health": HealthResource()}
        if self.metadata is not None:
            well_known = Resource()
            well_known.putChild(b"oauth-protected-resource", MetadataResource(self.metadata))
            out[b".well-known"] = well_known
        return out

    def internal_client(self, http_client: Any) -> Any:
        """``http_client`` adding the internal token to its POSTs (for the embedded repository)."""
        if self.internal_token is None:
            return http_client
        return _Authorised(http_client, self.internal_token)


class _Authorised:
    def __init__(self, client: Any, token: str) -> None:
        self._client = client
        self._token = token

    def post(self, url: Any, *args: Any, headers: Any = None, **kw: Any) -> Any:
        headers = dict(headers or {})
        headers[b"Authorization"] = [b"Bearer " + self._token.encode("ascii")]
        return self._client.post(url, *args, headers=headers, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def audit_refusals(trail: Any) -> RefusalHook:
    """A refusal hook recording each 401 and 403 in the audit trail (``AuditTrail.http_refused``)."""

    def hook(request: Request, status: int, reason: str, principal: Principal | None) -> None:
        trail.http_refused(peer_address(request), request.path.decode("ascii", "replace"), status, reason, principal)

    return hook


def grant_key(data_dir: Path) -> bytes:
    """
    The URL grants' key in ``data_dir``, made on first use: 32 random bytes, mode 0600,
    written to a temporary file and linked into place, so a reader never sees a partial key
    and two servers starting together agree on one. Blocking: for start-up.
    """
    path = data_dir / GRANT_KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{GRANT_KEY_FILE}.{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except OSError as e:
                if e.errno != errno.EEXIST:
                    raise
        finally:
            tmp.unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ValueError(f"{path} is not a URL grant key ({KEY_BYTES} bytes): remove it to make a new one")
    return key


def build_auth(config: Config, reactor: Any, *, on_refused: RefusalHook | None = None) -> Auth:
    """Access control as ``config`` says: the one factory for the composition root."""
    ac = config.auth
    scopes = Scopes(ac.scope_image_read, ac.scope_xds_read, ac.scope_xds_write, ac.scope_admin)
    if not ac.enabled:
        return Auth(ac, scopes, on_refused=on_refused)
    is_url = ac.jwks.startswith("https://")
    source = JwksSource(ac.jwks, reactor, timeout=ac.jwks_timeout,
                        http_client=make_jwks_client(reactor, ac.jwks_ca_file, ac.jwks_timeout) if is_url else None) \
        if ac.jwks else None
    policy = Policy(issuer=ac.issuer, audience=ac.audience, algorithms=ac.algorithms, leeway=ac.leeway,
                    require_typ=ac.require_typ)
    introspector = Introspector(
        ac.introspection_url, ac.introspection_client_id, ac.introspection_client_secret, policy, reactor,
        http_client=make_jwks_client(reactor, ac.jwks_ca_file, ac.jwks_timeout), timeout=ac.jwks_timeout,
    ) if ac.introspection_url else None
    internal = secrets.token_urlsafe(32) if config.xds.enabled and config.xds.embedded else None
    internal_principal = Principal(issuer="imageshare", subject="xds-submitter", jti=None, client_id=None,
                                   scopes=frozenset({scopes.xds_write}), patient=None, expires=float("inf"))
    authenticator = Authenticator(policy, source, reactor, internal=internal, internal_principal=internal_principal,
                                  grant_key=grant_key(config.storage.data_dir), grant_lifetime=ac.grant_lifetime,
                                  introspector=introspector)
    public_url = config.http.public_url
    metadata = {
        "resource": ac.audience,
        "authorization_servers": [ac.issuer],
        "scopes_supported": sorted({scopes.image_read, scopes.xds_read, scopes.xds_write, scopes.admin}),
        "bearer_methods_supported": ["header"],
    }
    services: list[Service] = [source] if source is not None else []
    return Auth(ac, scopes, authenticator, services, f"{public_url}/.well-known/oauth-protected-resource",
                metadata, internal, on_refused)
