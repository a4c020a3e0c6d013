"""
Bearer access tokens (RFC 6750, RFC 9068, IHE IUA ITI-72): the resource server's checks.

Pure: bytes and values in, a :class:`Principal` or a :class:`TokenError` out. No reactor,
no I/O; the signing keys and the time are passed in. Signatures are checked with joserfc,
everything around them (header, sizes, claim types, times, audience) here, so that a hostile
token can only ever end in a :class:`TokenError`, never another exception.

A token is never logged or put in an error description: descriptions name the check that
failed, nothing the client sent.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Iterable, Mapping

import attrs
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "Policy",
    "Principal",
    "TokenError",
    "UnknownKey",
    "bearer_token",
    "challenge",
    "claim_number",
    "claim_patient",
    "claim_string",
    "load_key_set",
    "verify",
]

#: The algorithms a token may be signed with: public-key ones only (never ``none`` or HMAC).
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}

#: Default cap on the Authorization header (bytes): IdP tokens are 1-3 KiB.
MAX_TOKEN_BYTES = 8192
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_TOKEN68 = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")
_MAX_KEYS = 100


class TokenError(Exception):
    """The token is missing, malformed, badly signed, expired or not for us (HTTP 401)."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class UnknownKey(TokenError):
    """No key of the key set matches the token's ``kid``: the set may have rotated."""


@attrs.frozen
class Policy:
    """What a token must satisfy; from ``[auth]``."""

    issuer: str
    audience: str
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256")
    leeway: float = 60.0
    #: ``at+jwt``, or empty to accept ``JWT`` (and no ``typ``) too.
    require_typ: str = "at+jwt"
    max_token_bytes: int = MAX_TOKEN_BYTES


@attrs.frozen
class Principal:
    """Who a verified token speaks for; attached to the request for authorization and audit."""

    issuer: str
    subject: str
    jti: str | None
    client_id: str | None
    scopes: frozenset[str]
    #: IUA ``extensions.ihe_bppc.patient_id`` (CX ``ID^^^&OID&ISO``), if the token names one.
    patient: str | None
    expires: float
    #: The one study a URL grant (:mod:`imageshare.auth.grants`) allows; ``None`` for a token.
    study: str | None = None

    @property
    def user(self) -> str:
        """IUA's audit user name: ``alias<sub@iss>`` without the alias."""
        return f"{self.subject}@{self.issuer}"


def bearer_token(header: bytes | None, max_bytes: int = MAX_TOKEN_BYTES) -> str | None:
    """
    The token of an ``Authorization: Bearer`` header; ``None`` if there is no header.

    Raises
    ------
    TokenError
        Another scheme, an empty or oversized token, or characters outside token68.
    """
    if header is None:
        return None
    if len(header) > max_bytes + 16:
        raise TokenError("the token is too large")
    scheme, _, value = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        raise TokenError("expected the Bearer scheme")
    value = value.strip()
    try:
        token = value.decode("ascii")
    except UnicodeDecodeError:
        raise TokenError("the token is malformed") from None
    if not token or not _TOKEN68.match(token):
        raise TokenError("the token is malformed")
    return token


def _b64json(segment: str, what: str) -> dict[str, Any]:
    if not _B64URL.match(segment):
        raise TokenError(f"the token {what} is malformed")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise TokenError(f"the token {what} is malformed") from None
    if not isinstance(value, dict):
        raise TokenError(f"the token {what} is malformed")
    return value


def _compatible(key: Any, alg: str) -> bool:
    """Whether ``key`` may verify ``alg``: the key type, curve, ``use`` and ``alg`` agree."""
    if key.get("use") not in (None, "sig"):
        return False
    if key.get("alg") not in (None, alg):
        return False
    if alg[:2] in ("RS", "PS"):
        return isinstance(key, RSAKey)
    if alg in _EC_CURVES:
        return isinstance(key, ECKey) and key.get("crv") == _EC_CURVES[alg]
    return False


def load_key_set(data: bytes) -> KeySet:
    """
    Public keys from a JWK Set document; keys of other types (``oct``...) and private parts are dropped.

    Raises
    ------
    ValueError
        Not a JWK Set, or no usable public key in it.
    """
    try:
        document = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ValueError("not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK Set")
    keys = []
    for entry in document["keys"][:_MAX_KEYS]:
        if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC"):
            continue
        if not isinstance(entry.get("kid", ""), str):
            continue
        try:
            key = RSAKey.import_key(entry) if entry["kty"] == "RSA" else ECKey.import_key(entry)
            # Only the public part, whatever the document held.
            keys.append(key.__class__.import_key(key.as_dict(private=False)))
        except (JoseError, ValueError, TypeError, KeyError):
            continue
    if not keys:
        raise ValueError("no usable public key")
    return KeySet(keys)


def claim_number(claims: Mapping[str, Any], name: str, required: bool) -> float | None:
    """A numeric claim (NumericDate and the like), checked for type; also for introspection answers."""
    value = claims.get(name)
    if value is None:
        if required:
            raise TokenError(f"the token has no {name} claim")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise TokenError(f"the token's {name} claim is not a number")
    return float(value)


def claim_string(claims: Mapping[str, Any], name: str, required: bool) -> str | None:
    """A non-empty string claim, checked for type."""
    value = claims.get(name)
    if value is None:
        if required:
            raise TokenError(f"the token has no {name} claim")
        return None
    if not isinstance(value, str) or not value:
        raise TokenError(f"the token's {name} claim is not a string")
    return value


def claim_patient(claims: Mapping[str, Any]) -> str | None:
    """IUA's ``extensions.ihe_bppc.patient_id`` (affinity-domain CX), or ``None``."""
    extensions = claims.get("extensions")
    if extensions is None:
        return None
    if not isinstance(extensions, dict):
        raise TokenError("the token's extensions claim is not an object")
    bppc = extensions.get("ihe_bppc")
    if bppc is None:
        return None
    if not isinstance(bppc, dict):
        raise TokenError("the token's ihe_bppc extension is not an object")
    return claim_string(bppc, "patient_id", False)


def _check_header(header: Mapping[str, Any], policy: Policy) -> str:
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in policy.algorithms or alg not in ASYMMETRIC_ALGORITHMS:
        raise TokenError("the token's signing algorithm is not accepted")
    typ = header.get("typ")
    if typ is not None and not isinstance(typ, str):
        raise TokenError("the token's typ header is not a string")
    typ_l = (typ or "").lower()
    typ_l = typ_l[len("application/"):] if typ_l.startswith("application/") else typ_l
    if policy.require_typ:
        wanted = policy.require_typ.lower()
        wanted = wanted[len("application/"):] if wanted.startswith("application/") else wanted
        if typ_l != wanted:
            raise TokenError(f"the token's typ is not {policy.require_typ}")
    elif typ_l not in ("", "jwt", "at+jwt"):
        raise TokenError("the token's typ is not accepted")
    if "crit" in header:
        raise TokenError("the token has critical header parameters")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenError("the token's kid header is not a string")
    return alg


def _candidates(keys: KeySet, kid: str | None, alg: str) -> list[Any]:
    if kid is not None:
        found = [k for k in keys.keys if k.kid == kid]
        if not found:
            raise UnknownKey("the token is signed with an unknown key")
    else:
        found = list(keys.keys)
    usable = [k for k in found if _compatible(k, alg)]
    if not usable:
        raise TokenError("no key fits the token's signing algorithm")
    return usable


def verify(token: str, keys: KeySet | None, policy: Policy, now: float) -> Principal:
    """
    Check a JWT access token completely: form, header, signature, then claims.

    Raises
    ------
    UnknownKey
        The ``kid`` is not in ``keys`` (the caller may refetch the key set once and retry).
    TokenError
        Anything else wrong; its ``description`` is safe to send and to log.
    """
    if len(token) > policy.max_token_bytes:
        raise TokenError("the token is too large")
    parts = token.split(".")
    if len(parts) != 3 or not all(_B64URL.match(p) for p in parts):
        raise TokenError("the token is not a signed JWT")
    header = _b64json(parts[0], "header")
    alg = _check_header(header, policy)
    if keys is None:
        raise TokenError("the signing keys are unavailable")
    verified = False
    for key in _candidates(keys, header.get("kid"), alg):
        try:
            jws.deserialize_compact(token, key, algorithms=[alg])
        except (JoseError, ValueError, TypeError):
            continue
        except Exception:  # noqa: BLE001 - a crafted signature must never escape as a 500
            continue
        verified = True
        break
    if not verified:
        raise TokenError("the token's signature is not valid")
    claims = _b64json(parts[1], "payload")
    return check_claims(claims, policy, now)


def check_claims(claims: Mapping[str, Any], policy: Policy, now: float) -> Principal:
    """The claim checks of RFC 9068 section 4 on an already verified payload."""
    issuer = claim_string(claims, "iss", True)
    if issuer != policy.issuer:
        raise TokenError("the token is from another issuer")
    aud = claims.get("aud")
    audiences: Iterable[Any] = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not any(isinstance(a, str) and a == policy.audience for a in audiences):
        raise TokenError("the token is not for this audience")
    expires = claim_number(claims, "exp", True)
    assert expires is not None
    if now > expires + policy.leeway:
        raise TokenError("the token has expired")
    not_before = claim_number(claims, "nbf", False)
    if not_before is not None and now + policy.leeway < not_before:
        raise TokenError("the token is not valid yet")
    issued = claim_number(claims, "iat", True)
    assert issued is not None
    if now + policy.leeway < issued:
        raise TokenError("the token is issued in the future")
    subject = claim_string(claims, "sub", True)
    assert subject is not None
    scope = claims.get("scope", "")
    if not isinstance(scope, str):
        raise TokenError("the token's scope claim is not a string")
    return Principal(
        issuer=issuer,
        subject=subject,
        jti=claim_string(claims, "jti", False),
        client_id=claim_string(claims, "client_id", False),
        scopes=frozenset(scope.split()),
        patient=claim_patient(claims),
        expires=expires,
    )


def _quoted(text: str) -> str:
    # RFC 6750 3: error_description is %x20-21 / %x23-5B / %x5D-7E.
    return "".join(c for c in text if 0x20 <= ord(c) <= 0x7E and c not in '"\\')


def challenge(
    *, error: str | None = None, description: str | None = None, scope: str | None = None,
    realm: str | None = None, resource_metadata: str | None = None,
) -> bytes:
    """A ``WWW-Authenticate: Bearer ...`` value (RFC 6750 section 3, RFC 9728 section 5.1)."""
    params = []
    for name, value in (("realm", realm), ("resource_metadata", resource_metadata), ("error", error),
                        ("error_description", description), ("scope", scope)):
        if value:
            params.append(f'{name}="{_quoted(value)}"')
    return ("Bearer " + ", ".join(params)).strip().encode("ascii")
