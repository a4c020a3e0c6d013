"""
The HTTP side of access control: one guard resource in front of each protected subtree.

:class:`Guard` is a leaf: the site stops at it, it checks the bearer token (asynchronously:
the key set may have to be fetched), and only then walks the rest of the path into the
resource it wraps and renders it, as ``twisted.web.guard.HTTPAuthSessionWrapper`` does
with its credentials. Preflight ``OPTIONS`` (CORS) passes unchecked. The verified
:class:`~imageshare.auth.tokens.Principal` is attached to the request: read it with
:func:`principal_of`.
"""

from __future__ import annotations

import hmac
import math
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request, UnsupportedMethod

from imageshare.auth import grants
from imageshare.auth.introspection import is_jwt
from imageshare.auth.introspector import Introspector
from imageshare.auth.jwks import JwksSource
from imageshare.auth.tokens import Policy, Principal, TokenError, UnknownKey, bearer_token, challenge, verify
from imageshare.logsafe import Logger

__all__ = ["Authenticator", "Forbidden", "Guard", "RefusalHook", "attach", "grant_for", "principal_of"]

#: ``hook(request, status, reason, principal)``, told of each refused request: 401 (no
#: principal) or 403 (with the principal whose token lacked the scope). ``reason`` is the
#: error description, never the token.
RefusalHook = Callable[[Request, int, str, "Principal | None"], None]

_ATTRIBUTE = "_imageshare_principal"
_GRANTS = "_imageshare_grants"
log = Logger(namespace="imageshare.auth")


def principal_of(request: Any) -> Principal | None:
    """The principal whose token the request carried; ``None`` when access control is off."""
    return getattr(request, _ATTRIBUTE, None)


def attach(request: Any, principal: Principal) -> None:
    setattr(request, _ATTRIBUTE, principal)


def grant_for(request: Any) -> Callable[[str], str | None] | None:
    """
    ``study_uid -> grant``: signs URLs handed to the request's principal (see
    :mod:`imageshare.auth.grants`); ``None`` when access control is off.
    """
    return getattr(request, _GRANTS, None)


class Forbidden(Exception):
    """A good token without the scope the transaction needs (HTTP 403)."""

    def __init__(self, scope: str, description: str | None = None, principal: Principal | None = None) -> None:
        super().__init__(scope)
        self.scope = scope
        self.description = description or f"the {scope} scope is required"
        self.principal = principal  # whose token it was, for the audit trail


class _Missing(TokenError):
    """No Authorization header at all."""


class Authenticator:
    """
    Verifies tokens against the key set of ``source``; ``clock.seconds()`` is now. With an
    ``introspector``, tokens that are not JWTs (all tokens, without a ``source``) are
    introspected instead (RFC 7662).

    ``internal`` is a random token the server gives its own clients (the XDS submitter
    posting to the embedded repository); it stands for ``internal_principal``.
    """

    def __init__(self, policy: Policy, source: JwksSource | None, clock: Any, *, internal: str | None = None,
                 internal_principal: Principal | None = None, grant_key: bytes | None = None,
                 grant_lifetime: int = 300, introspector: Introspector | None = None) -> None:
        self.policy = policy
        self._introspector = introspector
        self._grant_key = grant_key
        self._grant_lifetime = grant_lifetime
        self._source = source
        self._clock = clock
        self._internal = internal
        self._internal_principal = internal_principal

    async def authenticate(self, header: bytes | None) -> Principal:
        """The principal of an ``Authorization`` header value; raises :class:`TokenError`."""
        token = bearer_token(header, self.policy.max_token_bytes)
        if token is None:
            raise _Missing("no bearer token")
        if self._internal is not None and self._internal_principal is not None \
                and hmac.compare_digest(token.encode(), self._internal.encode()):
            return self._internal_principal
        if self._introspector is not None and (self._source is None or not is_jwt(token)):
            # An opaque token (or no key set configured): ask the issuer (RFC 7662).
            return await self._introspector.principal(token)
        if self._source is None:
            raise TokenError("the signing keys are unavailable")
        keys = await self._source.current()
        try:
            return verify(token, keys, self.policy, self._clock.seconds())
        except UnknownKey:
            # The issuer may have rotated its keys: fetch again (rate-limited) and retry once.
            keys = await self._source.refresh()
            return verify(token, keys, self.policy, self._clock.seconds())

    def issue_grant(self, principal: Principal, study: str) -> str | None:
        """
        A URL grant to read ``study`` for ``principal``: it ends with the principal's own
        expiry if that comes first, so a grant never outlives what it was made from (and a
        grant's holder, given a new one, gets no more time). ``None`` without a key.
        """
        if self._grant_key is None:
            return None
        expires = self._clock.seconds() + self._grant_lifetime
        if math.isfinite(principal.expires):
            expires = min(expires, principal.expires)
        return grants.sign(self._grant_key, grants.Grant(study, principal.issuer, principal.subject,
                                                         int(expires)))

    def grant_principal(self, text: str, scope: str) -> Principal:
        """The principal of a URL grant: ``scope`` on its one study. Raises :class:`TokenError`."""
        if self._grant_key is None:
            raise TokenError("URL grants are not accepted")
        try:
            grant = grants.verify(self._grant_key, text, self._clock.seconds())
        except grants.GrantError as e:
            raise TokenError(e.description) from None
        return Principal(issuer=grant.issuer, subject=grant.subject, jti=None, client_id=None,
                         scopes=frozenset({scope}), patient=None, expires=float(grant.expires), study=grant.study)


class Guard(Resource):
    """
    Lets a request into ``wrapped`` only with a token that has ``scope``.

    Parameters
    ----------
    wrapped
        The protected resource (its whole subtree).
    scope
        The scope name, or a function of the request giving it (SOAP: by action).
    authenticator
        Checks the token.
    resource_metadata
        The RFC 9728 metadata URL, named in challenges.
    patients
        Whether the resource filters by a token's patient (``principal_of(request).patient``),
        or a function of the request telling it (the XDS endpoints: reads only); if not,
        tokens that name a patient are refused with 403 (fail closed).
    on_refused
        Told of every 401 and 403 (the audit trail records them).
    grants
        Whether a URL grant (``grant=`` in the query) is accepted instead of the header on
        GET and HEAD; the resource must then filter by ``principal_of(request).study``.
    """

    isLeaf = True

    def __init__(self, wrapped: IResource, scope: str | Callable[[Request], str], authenticator: Authenticator,
                 *, resource_metadata: str | None = None, patients: bool | Callable[[Request], bool] = True,
                 on_refused: RefusalHook | None = None, grants: bool = False) -> None:
        super().__init__()
        self._on_refused = on_refused
        self._grants = grants and isinstance(scope, str)
        self._patients = patients
        self.wrapped = wrapped
        self._scope = scope
        self._auth = authenticator
        self._metadata = resource_metadata

    def render(self, request: Request) -> Any:
        if request.method == b"OPTIONS":
            return self._render_wrapped(request)
        gone: list[Any] = []
        request.notifyFinish().addErrback(gone.append)
        header = request.getHeader(b"authorization")
        d = self._granted(request) if header is None else None
        if d is None:
            d = Deferred.fromCoroutine(self._auth.authenticate(header))

        def authorised(principal: Principal) -> None:
            scope = self._scope if isinstance(self._scope, str) else self._scope(request)
            if principal.study is not None:
                request.setHeader(b"cache-control", b"private")
            if scope not in principal.scopes:
                raise Forbidden(scope, principal=principal)
            filters = self._patients if isinstance(self._patients, bool) else self._patients(request)
            if principal.patient is not None and not filters:
                raise Forbidden(scope, "a token restricted to one patient cannot be used here", principal)
            attach(request, principal)
            setattr(request, _GRANTS, lambda study: self._auth.issue_grant(principal, study))
            log.debug("access by {subject} (jti {jti}) with {scope}", subject=principal.subject,
                      jti=principal.jti, scope=scope)
            if not gone:
                self._render_wrapped(request)

        def refused(failure: Failure) -> None:
            if gone:
                return
            self._report(request, failure)
            if failure.check(Forbidden):
                scope = failure.value.scope
                self._refuse(request, 403, challenge(error="insufficient_scope",
                                                     description=failure.value.description, scope=scope,
                                                     resource_metadata=self._metadata), b"insufficient scope\n")
            elif failure.check(_Missing):
                self._refuse(request, 401, challenge(resource_metadata=self._metadata), b"a bearer token is required\n")
            elif failure.check(TokenError):
                description = failure.value.description
                log.debug("bearer token refused: {reason}", reason=description)
                self._refuse(request, 401, challenge(error="invalid_token", description=description,
                                                     resource_metadata=self._metadata), b"invalid token\n")
            else:
                log.failure("authentication failed", failure)
                # Fail closed: an unexpected error is an unusable token, never a way in.
                self._refuse(request, 401, challenge(error="invalid_token", description="the token cannot be checked",
                                                     resource_metadata=self._metadata), b"invalid token\n")

        d.addCallback(authorised)
        d.addErrback(refused)
        d.addErrback(lambda f: log.failure("guard failed", f))
        return NOT_DONE_YET

    def _granted(self, request: Request) -> Deferred[Principal] | None:
        """The principal of the request's URL grant, if this guard takes them and it has one."""
        if not self._grants or request.method not in (b"GET", b"HEAD"):
            return None
        _, _, query = request.uri.partition(b"?")
        try:
            text = grants.grant_in_query(query)
            if text is None:
                return None
            assert isinstance(self._scope, str)
            return succeed(self._auth.grant_principal(text, self._scope))
        except grants.GrantError as e:
            return fail(TokenError(e.description))
        except TokenError as e:
            return fail(e)

    def _report(self, request: Request, failure: Failure) -> None:
        if self._on_refused is None:
            return
        if failure.check(Forbidden):
            status, reason, principal = 403, failure.value.description, failure.value.principal
        else:
            status, principal = 401, None
            reason = "missing" if failure.check(_Missing) else (
                failure.value.description if failure.check(TokenError) else "the token cannot be checked")
        try:
            self._on_refused(request, status, reason, principal)
        except Exception:
            log.failure("reporting a refused request failed")

    @staticmethod
    def _refuse(request: Request, status: int, www_authenticate: bytes, body: bytes) -> None:
        request.setResponseCode(status)
        request.setHeader(b"www-authenticate", www_authenticate)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _render_wrapped(self, request: Request) -> Any:
        """Walk the rest of the path into the wrapped tree and render it, as ``Request.render`` would."""
        try:
            resource = getChildForRequest(self.wrapped, request)
            body = resource.render(request)
        except UnsupportedMethod as e:
            allowed = getattr(e, "allowedMethods", ()) or ()
            request.setResponseCode(405)
            request.setHeader(b"allow", b", ".join(allowed))
            body = b""
        except Exception:
            request.processingFailed(Failure())
            return NOT_DONE_YET
        if body is NOT_DONE_YET:
            return NOT_DONE_YET
        if not isinstance(body, bytes):
            request.processingFailed(Failure(TypeError(f"{resource!r} rendered {type(body).__name__}")))
            return NOT_DONE_YET
        request.setHeader(b"content-length", b"%d" % len(body))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()
        return NOT_DONE_YET
